"""One zoo run, scored: start a shape, `argus attach` it (a subprocess), release it once
argus traces, `argus report --json` the recording, score it against the job's truth. Also
the daemon check. Used by scripts/zoo and tests/bpf/test_zoo_*.py (the same procedure)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers, workloads

from helpers.cli import ARGUS, ArgusProcess  # noqa: E402

from workloads import launch  # noqa: E402
from workloads import shapes as zoo  # noqa: E402

SERIOUS = ("warning", "critical")
FAULTS = ("healthy", "straggler5", "straggler10", "straggler25", "hang", "slow_stage")
RUN_S = 8.0  # torch shapes: --duration
SIM_STEPS = {"sim_ddp": 140, "sim_tp_dp": 80, "sim_pp": 120, "sim_sync_every_n": 140}  # ~8 s
HANG_STEPS = (6, 14)  # a hang's step is drawn in this range (then moved to its site)
HANG_D = 16.0  # argus -d for hang runs: the hang lasts > --hang-after (10 s) at the end
SLOW_STAGE_PCT = 25.0
DAEMON_DEADLINE_S = 30.0


def applies(fault: str, shape: str) -> bool:
    return fault != "slow_stage" or shape in zoo.PIPELINES


def draw(fault: str, shape: str, rng: random.Random, base_ms: float,
         nproc: int = 4) -> launch.Faults:
    """The planted fault of one run (see the module doc)."""
    if fault == "healthy":
        return launch.Faults()
    if fault.startswith("straggler"):
        return launch.Faults(straggler=(rng.randrange(nproc), float(fault[9:])))
    if fault == "slow_stage":
        stages = 2 if shape == "sim_pp" else nproc
        return launch.Faults(slow_stage=(rng.randrange(stages), SLOW_STAGE_PCT))
    if fault == "hang":
        rank = rng.randrange(nproc)
        site = rng.choice(zoo.sites(shape, rank, nproc))
        step = rng.randint(*HANG_STEPS)
        while not site.occurs(step):
            step += 1
        return launch.Faults(hang={"rank": rank, "group": site.group, "op": site.op,
                                   "step": step, "nth": site.nth})
    raise ValueError(fault)


def describe(f: launch.Faults) -> str:
    if f.straggler:
        return f"straggler rank {f.straggler[0]} {f.straggler[1]:g}%"
    if f.hang:
        h = f.hang
        return f"hang rank {h['rank']} at {h['group']}/{h['op']}#{h['nth']} step {h['step']}"
    if f.slow_stage:
        return f"slow stage {f.slow_stage[0]} +{f.slow_stage[1]:g}%"
    return "healthy"


def said(findings: list[dict]) -> str:
    """What argus said, one item per distinct finding, repeats counted."""
    out: dict[str, int] = {}
    for f in findings:
        what = f"{f['severity'][:4]} {f['kind']}"
        if f.get("rank") is not None:
            what += f" r{f['rank']}"
        if f["kind"] == "collective_hang":
            what += f" missing {f.get('missing_ranks')} waiting {f.get('waiting_ranks')}"
        out[what] = out.get(what, 0) + 1
    return "; ".join(w + (f" x{n}" if n > 1 else "") for w, n in out.items()) or "nothing"


def score(report: dict, truth: dict) -> dict:
    """Per run: found (None on healthy runs), steps_ok, ranks_ok, false_alarm, wrong, other."""
    findings = report.get("findings") or []
    serious = [f for f in findings if f.get("severity") in SERIOUS]
    st = report.get("steps") or {}
    count = st.get("count") if st.get("detected") else 0
    lo, hi = truth["steps"]["min"], truth["steps"]["max"]
    named = {r.get("tgid"): r.get("rank") for r in report.get("ranks") or []}
    real = {r.get("pid"): r.get("rank") for r in truth["ranks"]}
    out = {"steps_argus": count, "steps_job": [lo, hi],
           # every rank process found, with its own rank number (launchers that set no RANK)
           "ranks_ok": named == real, "ranks_argus": sorted(named.items(), key=str),
           "steps_ok": count is not None and lo - 2 <= count <= hi + 2,
           "serious": [{k: f.get(k) for k in ("kind", "severity", "rank", "missing_ranks",
                                              "waiting_ranks", "comm", "seq", "op", "score")
                        if k in f} for f in serious]}
    fault = (truth.get("faults") or [None])[0]
    if fault is None:
        out.update(found=None, false_alarm=bool(serious), wrong=[], other=[])
        return out
    ranks = sorted(fault["ranks"])
    if fault["kind"] == "hang":
        hit = [f for f in serious if f["kind"] == "collective_hang"
               and sorted(f.get("missing_ranks") or []) == ranks]
        wrong = [f for f in serious if f["kind"] == "collective_hang" and f not in hit]
        found = bool(hit)
    else:
        hit = [f for f in serious if f["kind"] == "straggler" and f.get("rank") in ranks]
        wrong = [f for f in serious if f["kind"] == "straggler" and f not in hit]
        found = set(ranks) <= {f["rank"] for f in hit}
    other = [f for f in serious
             if f not in hit and f not in wrong and f["kind"] != "anomalous_window"]
    out.update(found=found, false_alarm=False, wrong=[said([f]) for f in wrong],
               other=[said([f]) for f in other])
    return out


def report_of(rec: Path) -> dict:
    p = subprocess.run([ARGUS, "report", str(rec), "--json"], capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"argus report exited {p.returncode}: {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout)


def one_run(shape: str, launcher: str, faults: launch.Faults, base_ms: float, tmp: Path,
            verbose: bool = False, run_s: float = RUN_S, hang_d: float = HANG_D,
            keep_report: bool = False) -> dict:
    """Start, attach, release, wait, report, score (see score(); with keep_report the
    report and truth too). Raises on a run that could not be made."""
    hang = faults.hang is not None
    kw: dict = {"faults": faults}
    if shape in zoo.SIM_SHAPES:
        kw["steps"] = int(SIM_STEPS[shape] * (3 if hang else run_s / RUN_S))
    else:
        kw["duration"] = 60.0 if hang else run_s
    if faults.straggler:
        kw["straggler_base_ms"] = base_ms
    t0, load = time.monotonic(), os.getloadavg()[0]
    job = launch.start(shape, launcher, tmp / "job", **kw)
    argus = None
    try:
        job.wait_ready()
        t_ready = time.monotonic() - t0
        rec = tmp / "rec"
        args = ["attach", *map(str, job.targets), "-o", str(rec)]
        if hang:
            args += ["-d", str(hang_d)]
        argus = ArgusProcess(args, env=job.argus_env)
        t_at = argus.wait_for("argus: tracing", 240)
        job.release()
        if hang:
            rc_argus = argus.wait(hang_d + 240)
        else:
            job.wait(run_s * 10 + 120 if shape not in zoo.SIM_SHAPES else 240)
            rc_argus = argus.wait(240)
        t_done = time.monotonic()
    finally:
        if argus is not None:
            argus.kill()
        job.stop()
    truth = job.truth()
    if rc_argus != 0:
        raise RuntimeError(f"argus attach exited {rc_argus}: {argus.err[-800:]}")
    report = report_of(rec)
    s = score(report, truth)
    s.update(shape=shape, launcher=launcher, fault=describe(faults),
             job_outcome=truth["outcome"], ready_s=round(t_ready, 1), load_1m=round(load, 1),
             traced_s=round(t_done - t_at, 1),
             step_ms_job=_median_step(truth), host_ms_job=_host_step(truth),
             step_ms_argus=(report.get("steps") or {})
             .get("step_time_ms_p50"), ranks_argus=len(report.get("ranks") or []))
    if keep_report:
        s.update(report=report, truth=truth)
    if verbose:
        print(f"  {shape}@{launcher} {describe(faults)}: found={s['found']} "
              f"steps {s['steps_argus']} vs {s['steps_job']} - argus said: "
              f"{said(s['serious'])}", file=sys.stderr)
    return s


def _host_step(truth: dict) -> float | None:
    """The host's own median step (a host that runs ahead of its GPU: its short steps)."""
    times = [statistics.median(r["step_time_ms"]) for r in truth["ranks"] if r["step_time_ms"]]
    return round(statistics.median(times), 1) if times else None


def slack_of(shape: str, healthy: dict) -> float:
    """What a straggler must burn before it slows `shape` (launch.Faults.slack_ms): for a
    host that runs ahead of its GPU, the healthy run's step minus its host's own step."""
    if shape not in zoo.HOST_AHEAD or not healthy.get("step_ms_job"):
        return 0.0
    return round(max(0.0, healthy["step_ms_job"] - (healthy.get("host_ms_job") or 0.0)), 1)


def _median_step(truth: dict) -> float | None:
    """The job's time per step: per rank the mean of its step times (a host that reads back
    only every N steps runs ahead in N - 1 short steps and waits in the Nth: sim_sync_every_n's
    median step was 6 ms for 53 ms per step), the median over the ranks."""
    times = [statistics.fmean(r["step_time_ms"]) for r in truth["ranks"] if r["step_time_ms"]]
    return round(statistics.median(times), 1) if times else None


# ------------------------------------------------------------------ the daemon check
def daemon_check(shape: str, tmp: Path, rng: random.Random, verbose: bool,
                 launcher: str = "shell") -> dict:
    """argus daemon + a job launched by `launcher` (default a plain shell; `mpi`, `pmi`:
    the same shell with Open MPI's or MPICH's rank variables and no RANK) with a 25 %
    straggler (see the doc)."""
    comm = "zoo-rank"
    cfg = tmp / "daemon.toml"
    cfg.write_text(f'[discover]\nlibraries = false\ninclude_comm = ["{comm}"]\n'
                   "[output]\ninterval_s = 1\nwindow_s = 15\n")
    log = open(tmp / "daemon.log", "w+")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen([ARGUS, "daemon", "-o", str(tmp / "out"), "--config", str(cfg),
                               "--metrics-addr", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                              stderr=log)
    result: dict = {"shape": shape, "launcher": launcher}
    job = None
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline and daemon.poll() is None:
            log.seek(0)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", log.read())
            if m:
                port = int(m.group(1))
            else:
                time.sleep(0.2)
        if port is None:
            log.seek(0)
            raise RuntimeError(f"argus daemon did not start: {log.read()[-1500:]}")

        def get(path: str) -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.read()

        slow = rng.randrange(4)
        result["straggler_rank"] = slow
        job = launch.start(shape, launcher, tmp / "job", duration=60.0, comm=comm,
                           faults=launch.Faults(straggler=(slow, 25.0)))
        pids = job.wait_ready()
        job.release()
        t0 = time.monotonic()
        seen_one, score_at, jobs_view, most = None, None, [], 0
        while time.monotonic() - t0 < DAEMON_DEADLINE_S + 30:
            state = json.loads(get("/state"))
            jobs_view = [{"job": j.get("job"), "ranks": sorted(
                (r.get("rank"), r.get("tgid")) for r in j.get("ranks", [])
                if r.get("tgid") in pids)} for j in state.get("jobs", [])]
            jobs_view = [j for j in jobs_view if j["ranks"]]
            most = max(most, len(jobs_view))  # jobs holding any of our ranks, at worst
            ours = [j for j in jobs_view if len(j["ranks"]) == 4]
            if seen_one is None and len(jobs_view) == 1 and ours:
                seen_one = time.monotonic() - t0
            metrics = get("/metrics").decode()
            for line in metrics.splitlines():
                if line.startswith("argus_straggler_score{") and f'rank="{slow}"' in line:
                    if float(line.rsplit(" ", 1)[1]) > 0 and score_at is None:
                        score_at = time.monotonic() - t0
            if seen_one is not None and score_at is not None:
                break
            time.sleep(0.5)
        result.update(one_job_with_4_ranks_s=None if seen_one is None else round(seen_one, 1),
                      straggler_score_s=None if score_at is None else round(score_at, 1),
                      jobs_seen=jobs_view, most_jobs_at_once=most,
                      one_job_ok=seen_one is not None and most == 1,
                      straggler_ok=score_at is not None
                      and score_at <= DAEMON_DEADLINE_S)
    finally:
        if job is not None:
            job.stop()
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(120)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        log.close()
    if verbose:
        print(f"  daemon: {result}", file=sys.stderr)
    return result




class Runs:
    """For a test module: each (shape, "healthy" | "fault") run made once, on first use, and
    kept (a run that could not be made too: its error is raised again, never retried). A
    fault run's straggler is a percentage of the shape's healthy run's median step."""

    def __init__(self, tmp_factory, faults: dict[str, launch.Faults], run_s: float = RUN_S):
        self.tmp_factory, self.faults, self.run_s = tmp_factory, faults, run_s
        self.done: dict[tuple[str, str], dict | BaseException] = {}

    def get(self, shape: str, which: str) -> dict:
        key = (shape, which)
        if key not in self.done:
            base = launch.SIM_STEP_MS if shape in zoo.SIM_SHAPES else 40.0
            planted = launch.Faults() if which == "healthy" else self.faults[shape]
            if which == "fault" and planted.straggler:
                healthy = self.get(shape, "healthy")
                base = healthy["step_ms_job"] or base
                planted = dataclasses.replace(planted, slack_ms=slack_of(shape, healthy))
            launcher = "sim" if shape in zoo.SIM_SHAPES else "torchrun"
            tmp = self.tmp_factory.mktemp(f"{shape}-{which}")
            try:
                self.done[key] = one_run(shape, launcher, planted, base, tmp,
                                         run_s=self.run_s, keep_report=True)
            except Exception as e:  # kept, and raised again for each test that needs it
                self.done[key] = e
        got = self.done[key]
        if isinstance(got, BaseException):
            raise got
        return got
