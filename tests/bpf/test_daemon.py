"""argus daemon on the simulator: a job started after the daemon is traced without any
command, its straggler shows in /metrics, in a real Prometheus and in `argus top --daemon`;
its rotated segments merge into one continuous `argus report`; NVML samples (the stand-in
libnvidia-ml) give gpu_throttle live; a real DataLoader's workers are not ranks; targets
killed, the daemon killed, and many short jobs in a row leave nothing behind.

Every daemon here traces only a PRIVATE copy of the simulator (its own stub library inodes),
so simulated jobs of other test runs on this machine are not traced and do not share its
uprobes (a uprobe lives on the library file's inode)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers.breakpoints import anonymous_text_kb, breakpoints
from rich.console import Console

from argus.cli import main
from argus.present.top import DaemonReader, render
from argus.recording.summaries import load_summaries
from argus.sim.launcher import SimConfig, find_build_dir, start_job

pytestmark = pytest.mark.bpf
REPO = Path(__file__).resolve().parents[2]


def _private_build(dst: Path) -> Path:
    """A private copy of the simulator: a daemon configured for it sees only its jobs."""
    src = find_build_dir()
    if not (src / "sim/argus-sim-rank").exists():
        pytest.skip("the simulator is not built: run `make setup`")
    for d in ("sim", "stubs"):
        shutil.copytree(src / d, dst / d, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return _private_build(tmp_path_factory.mktemp("privbuild"))


@pytest.fixture
def own_build(tmp_path) -> Path:
    """For tests with a daemon of their own: the module's straggler job (still running on
    the shared copy) must not be visible to it."""
    return _private_build(tmp_path / "ownbuild")


class Daemon:
    def __init__(self, tmp: Path, build: Path, env: dict | None = None,
                 discover: str | None = None, **output):
        self.out = tmp / "out"
        cfg = tmp / "daemon.toml"
        out = {"interval_s": 1, "window_s": 15, **output}
        cfg.write_text(
            "[discover]\nlibraries = false\n"
            + (discover or f'include_exe = ["{build}/sim/argus-sim-rank"]\n')
            + "[output]\n" + "".join(f"{k} = {v}\n" for k, v in out.items() if k != "job_grace_s")
            + (f"[diagnosis]\njob_grace_s = {out['job_grace_s']}\n" if "job_grace_s" in out else "")
        )
        self.log = open(tmp / "daemon.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from argus.cli import run; run()", "daemon",
             "-o", str(self.out), "--config", str(cfg), "--metrics-addr", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=self.log, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        deadline = time.monotonic() + 60
        self.port = None
        while time.monotonic() < deadline and self.port is None:
            self.log.seek(0)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", self.log.read())
            if m:
                self.port = int(m.group(1))
            elif self.proc.poll() is not None:
                break
            else:
                time.sleep(0.2)
        assert self.port, self.text()

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read()

    def state(self) -> dict:
        return json.loads(self.get("/state"))

    def job_of(self, tgids) -> dict | None:
        for job in self.state()["jobs"]:
            if {r["tgid"] for r in job["ranks"]} >= set(tgids):
                return job
        return None

    def wait_for(self, pred, timeout: float, what: str):
        """pred() true within `timeout` s plus 3 of the daemon's slowest flushes meanwhile: a
        nice-10 daemon beside a CPU hog per core took 12.8 s per interval's analysis
        (docs/daemon.md), and what it shows waits for it; a daemon that stops producing
        states fails all the same."""
        start, slowest = time.monotonic(), 0.0
        while time.monotonic() < start + timeout + 3 * slowest:
            v = pred()
            if v:
                return v
            assert self.proc.poll() is None, self.text()
            slowest = max(slowest, float(self.state().get("flush_s") or 0.0))
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what} ({timeout} s + 3 x the slowest "
                             f"flush, {slowest} s); daemon log:\n{self.text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def _perf_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]"
        except FileNotFoundError:  # closed between the listing and the read
            pass
    return n


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, build):
    d = Daemon(tmp_path_factory.mktemp("daemon"), build)
    yield d
    if d.proc.poll() is None:
        d.stop()
    d.log.close()


@pytest.fixture(scope="module")
def straggler_job(daemon, build):
    # Started AFTER the daemon; nothing tells the daemon about it.
    job = start_job(SimConfig(ranks=3, steps=2000, faults=["straggler:rank=1,factor=1.6"],
                              build_dir=str(build), quiet=True))
    ranks = job.wait_ready()
    yield job, ranks
    job.close()


def test_job_started_later_is_traced_and_its_straggler_exported(daemon, straggler_job, build):
    job, ranks = straggler_job

    def flagged():
        j = daemon.job_of(ranks)
        return j if j and any(r["straggler"] for r in j["ranks"]) else None

    j = daemon.wait_for(flagged, 60, "the straggler in /state")
    by_rank = {r["rank"]: r for r in j["ranks"]}
    assert sorted(by_rank) == [0, 1, 2]
    assert {r["tgid"] for r in j["ranks"]} == set(ranks)
    assert [r for r in by_rank if by_rank[r]["straggler"]] == [1]
    assert all(r["probes"] > 0 for r in j["ranks"])
    assert j["job"].startswith("torchelastic-")  # the simulator sets TORCHELASTIC_RUN_ID
    text = daemon.get("/metrics").decode()
    score = _straggler_scores(daemon, j["job"])
    assert score[1] > 0 and score[0] == 0 and score[2] == 0
    m = re.search(r'^argus_straggler_score\{(.*)\} (\S+)$', text, re.M)
    assert set(dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))) == {"job_id", "rank", "host"}
    assert re.search(r'^argus_step_time_seconds\{.*rank="1".*\} 0\.\d+', text, re.M)
    # argus top --daemon: the straggler's row is flagged
    console = Console(width=150, record=True, force_terminal=False)
    console.print(render(DaemonReader(f"http://127.0.0.1:{daemon.port}").read()))
    lines = console.export_text().splitlines()
    row = next(ln for ln in lines if re.match(rf"\s*1\s+{ranks[1]}\s", ln))
    assert "STRAGGLER" in row
    others = rf"\s*[02]\s+{ranks[0]}|\s*[02]\s+{ranks[2]}"
    assert not any("STRAGGLER" in ln for ln in lines if re.match(others, ln))


def test_a_plain_shell_launched_job_is_one_job_with_its_straggler(daemon, build):
    """RANK, WORLD_SIZE and LOCAL_RANK only (no MASTER_*, no torchrun or scheduler
    variables): the four ranks are one job, keyed by their launcher, and the straggler's
    score is in /metrics within 30 s of the job's start (plus 3 of the daemon's slowest
    flushes, `Daemon.wait_for`: 34.8 s beside a CPU hog per core)."""
    job = start_job(SimConfig(ranks=4, steps=3000, faults=["straggler:rank=2,factor=1.5"],
                              build_dir=str(build), quiet=True, launcher_env="plain"))
    try:
        ranks = job.wait_ready()
        assert "MASTER_PORT" not in Path(f"/proc/{ranks[0]}/environ").read_bytes().decode()

        def scored():
            j = daemon.job_of(ranks)
            if not j:
                return None
            return j if _straggler_scores(daemon, j["job"]).get(2, 0) > 0 else None

        j = daemon.wait_for(scored, 30, "the plain job's straggler in /metrics")
        launcher = job.launcher_pid  # the simulator's launcher: the ranks' parent
        assert j["job"] == f"launcher-{launcher}-{_start_ticks(launcher)}"
        assert sorted(r["rank"] for r in j["ranks"]) == [0, 1, 2, 3]
        jobs = daemon.state()["jobs"]
        assert len([x for x in jobs if {r["tgid"] for r in x["ranks"]} & set(ranks)]) == 1
    finally:
        job.close()


def _straggler_scores(daemon, job: str) -> dict[int, float]:
    score = {}
    text = daemon.get("/metrics").decode()
    for m in re.finditer(r'^argus_straggler_score\{(.*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels["job_id"] == job:
            score[int(labels["rank"])] = float(m.group(2))
    return score


def _start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_prometheus_scrapes_the_daemon(daemon, straggler_job, tmp_path):
    prom = shutil.which("prometheus")
    if prom is None:
        pytest.skip("Debian's prometheus package is not installed: run `make setup`")
    job, ranks = straggler_job
    port = _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: argus\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{daemon.port}']\n"
    )
    p = subprocess.Popen([prom, f"--config.file={tmp_path / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def query(q: str):
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                return None
            return body["data"]["result"] if body.get("status") == "success" else None

        res = daemon.wait_for(lambda: query('argus_straggler_score{rank="1"} > 0'), 60,
                              "Prometheus to scrape the straggler score")
        assert res[0]["metric"]["job"] == "argus"  # Prometheus's scrape job, ours is job_id
        assert res[0]["metric"]["job_id"].startswith("torchelastic-")
        steps = daemon.wait_for(lambda: query("argus_step_time_seconds"), 30, "step times")
        assert {s["metric"]["rank"] for s in steps} >= {"0", "1", "2"}
        assert all(0 < float(s["value"][1]) < 5 for s in steps)
        up = query('up{job="argus"}')
        assert up and up[0]["value"][1] == "1"
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_a_rank_killed_mid_step_leaves_the_daemon_running(daemon, straggler_job, build):
    other, other_ranks = straggler_job
    job = start_job(SimConfig(ranks=3, steps=2000, build_dir=str(build), quiet=True))
    try:
        ranks = job.wait_ready()
        daemon.wait_for(lambda: daemon.job_of(ranks), 30, "the job to be traced")
        os.kill(ranks[2], signal.SIGKILL)  # mid-step (steps are ~55 ms, always running)

        def exited():
            j = daemon.job_of(ranks)
            return j and 2 in [r["rank"] for r in j["ranks"] if r["exited"]]

        daemon.wait_for(exited, 30, "rank 2 to be seen exited")
        # the simulator's launcher then stops the job; the daemon goes on with the other job
        job.wait(timeout=30)
        t0 = daemon.state()["now_ns"]
        daemon.wait_for(lambda: daemon.state()["now_ns"] > t0, 15, "a new state")
        j = daemon.job_of(other_ranks)
        assert j is not None and not any(r["exited"] for r in j["ranks"])
        assert daemon.state()["targets"] == 3  # the other job's ranks only
        assert b"argus_step_time_seconds" in daemon.get("/metrics")
    finally:
        job.close()


def test_sigterm_flushes_readable_segments_that_merge_into_one_run(daemon, straggler_job,
                                                                    capsys):
    job, ranks = straggler_job
    time.sleep(1.5)
    assert daemon.stop() == 0
    assert "everything flushed" in daemon.text()
    segs = sorted(daemon.out.glob("jobs/torchelastic-*/*/summaries/meta.json"),
                  key=lambda m: int(m.parent.parent.name))
    assert segs, daemon.text()
    seen_ranks = set()
    written = []  # (segment index, rank, step, start_ns)
    job_dirs = set()
    for i, meta in enumerate(segs):
        s = load_summaries(meta.parent.parent)
        if set(s.steps["tgid"].to_list()) <= set(ranks):
            seen_ranks |= set(s.steps["rank"].to_list())
            written += [(i, *r) for r in s.steps.select("rank", "step", "start_ns").rows()]
            job_dirs.add(meta.parent.parent.parent)
    assert seen_ranks == {0, 1, 2}
    keys = [(r, st) for _i, r, _s, st in written]
    assert len(keys) == len(set(keys)), "a step was written twice"
    assert job.proc.poll() is None  # the target keeps running after the daemon stops
    # rotation: the job's steps span several segments, with continuous step ids
    (job_dir,) = job_dirs
    assert len({i for i, *_ in written}) >= 3
    per_rank: dict[int, list[tuple[int, int, int]]] = {}
    for i, rank, step, start in written:
        per_rank.setdefault(rank, []).append((start, step, i))
    for rank, rows in per_rank.items():
        rows.sort()
        ids = [step for _start, step, _i in rows]
        assert ids == list(range(ids[0], ids[0] + len(ids))), (rank, ids)  # no gap, in order
        assert [i for *_x, i in rows] == sorted(i for *_x, i in rows)  # segments in time order
    # argus report over the job's directory merges every segment into one run (the output
    # directory holds two jobs here: the killed one too)
    assert main(["report", str(job_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"]["count"] == len({step for _i, _r, step, _s in written})
    assert {r["rank"]: r["steps"] for r in report["ranks"]} == {
        rank: len(rows) for rank, rows in per_rank.items()}
    assert len(report["recordings"]) == len({i for i, *_ in written})
    stragglers = [f["rank"] for f in report["findings"] if f["kind"] == "straggler"
                  and f["severity"] in ("warning", "critical")]
    assert stragglers == [1]


SCRAPE_S = 15.0  # a common Prometheus scrape interval (the daemon here drains every 1 s)


def _job_series(daemon, job: str) -> dict[tuple[str, int], float]:
    """(metric, rank) -> value of the job's per-rank series in /metrics."""
    out = {}
    for m in re.finditer(r'^(argus_\w+)\{(.*)\} (\S+)$', daemon.get("/metrics").decode(), re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("job_id") == job:
            out[(m.group(1), int(labels["rank"]))] = float(m.group(3))
    return out


def test_a_finished_jobs_series_leave_metrics_within_one_scrape(tmp_path, own_build):
    """Metrics that end with the job: while traced each rank has `argus_rank_up` 1 and the
    straggler its score; once every rank has exited, none of the job's series is in
    /metrics within one scrape interval (an alert `argus_straggler_score > 3 for 5m` stops
    at once), while /state keeps the finished job, its ranks exited, for job_grace_s.
    A daemon of its own: the module's straggler job's segments stay as they were."""
    daemon = Daemon(tmp_path, own_build)
    job = start_job(SimConfig(ranks=3, steps=3000, faults=["straggler:rank=2,factor=1.6"],
                              build_dir=str(own_build), quiet=True))
    try:
        ranks = job.wait_ready()

        def scored():
            j = daemon.job_of(ranks)
            return j if j and _straggler_scores(daemon, j["job"]).get(2, 0) > 0 else None

        key = daemon.wait_for(scored, 60, "the straggler's score in /metrics")["job"]
        series = _job_series(daemon, key)
        assert {r: series.get(("argus_rank_up", r)) for r in range(3)} == {0: 1, 1: 1, 2: 1}
        assert series[("argus_straggler_score", 2)] > 0
        job.terminate()  # the launcher stops its ranks
        assert _wait_gone(ranks, 30), "the ranks did not exit"
        t_end = time.monotonic()
        daemon.wait_for(lambda: not _job_series(daemon, key), SCRAPE_S + 30,
                        "the finished job's series to leave /metrics")
        took = time.monotonic() - t_end
        assert took <= SCRAPE_S, f"the series stayed {took:.1f} s after the job ended"
        j = daemon.job_of(ranks)  # still in /state (argus top --daemon shows it exited)
        assert j is not None and j["ended"] and all(r["exited"] for r in j["ranks"])
        assert not _job_series(daemon, key)
    finally:
        job.close()
        daemon.stop()
        daemon.log.close()


def _wait_gone(pids, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_many_short_jobs_leave_no_probes_fds_or_memory(tmp_path, own_build):
    build = own_build
    d = Daemon(tmp_path, build, interval_s=0.5, job_grace_s=1)
    started = []  # every job, closed however the test ends (a leaked batch loads the rest)
    try:
        d.wait_for(lambda: d.state().get("uprobes") == 0 or None, 30, "the daemon's first scan")
        base_fds = _perf_fds(d.proc.pid)
        rss = []
        n_jobs = 0
        while n_jobs < 30:  # 6 batches: the first 2 warm up, then RSS must stay flat
            batch = []
            for i in range(5):  # 5 tiny jobs at a time: 2 ranks x 3 steps each
                go = tmp_path / f"go-{n_jobs + i}"
                job = start_job(SimConfig(ranks=2, steps=3, step_ms=5, cpu_ms=1,
                                          kernels_per_step=8, wait_go=str(go),
                                          build_dir=str(build), quiet=True))
                started.append(job)
                batch.append((job, job.wait_ready(), go))
            for _job, ranks, _go in batch:  # each job is traced before it may start
                d.wait_for(lambda ranks=ranks: d.job_of(ranks), 30, f"job {ranks} traced")
            for _job, _ranks, go in batch:
                go.touch()
            for job, _ranks, _go in batch:
                assert job.wait(timeout=60) == 0
                job.close()
            n_jobs += len(batch)
            rss.append(_rss_kb(d.proc.pid))

        last = {}

        def idle():
            s = last["s"] = d.state()
            return s if (s["targets"], s["uprobes"], len(s["jobs"])) == (0, 0, 0) else None

        try:
            d.wait_for(idle, 60, "every job to be forgotten")
        except AssertionError:
            s = last["s"]
            raise AssertionError((s["targets"], s["uprobes"], [(j["job"], [(r["rank"], r["exited"])
                                  for r in j["ranks"]]) for j in s["jobs"]], s["errors"])) from None
        # uprobes are closed in the background (the kernel takes ~0.2 s per probe)
        d.wait_for(lambda: _perf_fds(d.proc.pid) == base_fds, 60, "the perf fds to close")
        assert _perf_fds(d.proc.pid) == base_fds
        # memory: no growth with the number of jobs once warmed up (first batches excluded:
        # a fresh clone measured +26 MB in the 2nd batch, then +9, +8)
        growth_mb = (rss[-1] - rss[min(2, len(rss) - 1)]) / 1024
        assert growth_mb < 40, (rss, n_jobs)
        drops = d.state()["drops"]
        assert drops["call_ringbuf"] == 0 and drops["proc_ringbuf"] == 0, drops
    finally:
        for job in started:
            job.close()
        assert d.stop() == 0


def test_daemon_killed_leaves_no_probes_and_targets_keep_running(tmp_path, own_build):
    build = own_build
    d = Daemon(tmp_path, build)
    job = start_job(SimConfig(ranks=2, steps=5000, build_dir=str(build), quiet=True))
    try:
        ranks = job.wait_ready()
        d.wait_for(lambda: d.job_of(ranks), 30, "the job to be traced")
        stubs = build / "stubs"
        assert all(breakpoints(r, stubs) for r in ranks)  # probes are in place
        d.stop(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(breakpoints(r, stubs) for r in ranks):
            time.sleep(0.2)
        left = {r: breakpoints(r, stubs) for r in ranks}
        assert left == {r: [] for r in ranks}, (left, [anonymous_text_kb(r, stubs) for r in ranks])
        time.sleep(1)
        assert job.proc.poll() is None
        for r in ranks:
            state = Path(f"/proc/{r}/stat").read_text().rsplit(")", 1)[1].split()[0]
            assert state in "RS", state
    finally:
        job.close()


def test_nvml_in_the_daemon_finds_the_throttled_gpu(tmp_path, own_build, capsys):
    """The daemon samples NVML (here the simulator's libnvidia-ml stand-in, which reads the
    simulated GPUs of its node): rank 1's throttled GPU is a gpu_throttle finding live and in
    the report of its segments."""
    node = f"dmn{os.getpid()}"
    stub = own_build / "stubs" / "libnvidia-ml.so.1"
    d = Daemon(tmp_path, own_build, env={"ARGUS_NVML_LIB": str(stub), "ARGUS_SIM_NODE": node,
                                         "ARGUS_SIM_GPUS": "4"})  # 4 simulated GPUs
    job = start_job(SimConfig(ranks=3, steps=3000, faults=["throttle:rank=1,mhz=1200"],
                              node=node, build_dir=str(own_build), quiet=True))
    try:
        ranks = job.wait_ready()

        def throttled():
            j = d.job_of(ranks)
            return j if j and any(f["kind"] == "gpu_throttle" for f in j["findings"]) else None

        j = d.wait_for(throttled, 90, "gpu_throttle in /state")
        assert [f["rank"] for f in j["findings"] if f["kind"] == "gpu_throttle"] == [1]
        gpu = d.state()["gpu"]
        assert (gpu["available"], gpu["devices"], gpu["reason"]) == (True, 4, None)
    finally:
        assert d.stop() == 0
        job.close()
    (job_dir,) = {p.parents[2] for p in d.out.glob("jobs/*/*/summaries/gpu-*.parquet")}
    joined = set()
    for seg in job_dir.iterdir():
        g = load_summaries(seg).gpu
        joined |= set(g.select("rank", "device").unique().rows())
    assert joined == {(0, 0), (1, 1), (2, 2)}  # LOCAL_RANK -> device; device 3 unused
    assert main(["report", str(d.out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    f = next(f for f in report["findings"] if f["kind"] == "gpu_throttle")
    assert (f["rank"], f["device"], f["evidence"]["reasons"]) == (1, 1, ["SwThermalSlowdown"])
    assert f["evidence"]["sm_clock_mhz"]["rank"] == 1200.0


DATALOADER = """
import ctypes, os, time
ctypes.CDLL(None).prctl(15, b"argus-dltest", 0, 0, 0)  # PR_SET_NAME: the daemon's rule
import torch
from torch.utils.data import DataLoader, Dataset

class Data(Dataset):
    def __len__(self):
        return 1 << 30

    def __getitem__(self, i):
        time.sleep(0.002)
        return torch.zeros(4)

it = iter(DataLoader(Data(), batch_size=4, num_workers=2, multiprocessing_context="fork"))
next(it)
print("ready", os.getpid(), flush=True)
while True:
    next(it)
"""


def test_dataloader_workers_are_not_traced_as_ranks(tmp_path, own_build):
    """A real torch DataLoader (num_workers=2, forked workers that inherit RANK=0 and map
    libtorch): the daemon traces the rank process only."""
    pytest.importorskip("torch")
    d = Daemon(tmp_path, own_build, discover='include_comm = ["argus-dltest", "pt_data_worker"]\n')
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    (tmp_path / "dl.py").write_text(DATALOADER)
    p = subprocess.Popen([sys.executable, str(tmp_path / "dl.py")], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # its workers die with it: killpg
    try:
        line = p.stdout.readline()
        assert line.startswith("ready"), line
        workers = [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
        assert len(workers) == 2
        for w in workers:  # the workers match the daemon's rules: only the worker rule skips them
            assert Path(f"/proc/{w}/comm").read_text().strip() == "pt_data_worker"
            assert b"RANK=0" in Path(f"/proc/{w}/environ").read_bytes().split(b"\0")
        j = d.wait_for(lambda: d.job_of([p.pid]), 60, "the rank to be traced")
        seen = d.state()["now_ns"]
        d.wait_for(lambda: d.state()["now_ns"] > seen, 15, "a later state")  # scans since
        j = d.job_of([p.pid])
        assert [(r["rank"], r["tgid"]) for r in j["ranks"]] == [(0, p.pid)]
        assert d.state()["targets"] == 1
        assert not any(r["tgid"] in workers for jb in d.state()["jobs"] for r in jb["ranks"])
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        assert d.stop() == 0


LAUNCHER = """
import os, subprocess, sys
# a launcher like torchrun: no RANK of its own, it sets RANK for its child
env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
p = subprocess.Popen([sys.executable, sys.argv[1]], env=env, stdout=sys.stdout)
sys.exit(p.wait())
"""


def test_attach_to_a_launcher_skips_the_ranks_dataloader_workers(tmp_path):
    """`argus attach <launcher>` follows its descendants: the rank it starts is traced, the
    rank's DataLoader workers (forked after attach, with the rank's RANK) are not."""
    pytest.importorskip("torch")
    from argus.collect.session import run_session
    from argus.collect.tracer import TraceOptions

    # the rank creates its DataLoader when told to (after attach): its workers are forked
    # while traced, through the fork tracepoint of a watched launcher's descendant
    script = DATALOADER.replace("it = iter(", "import sys\nsys.stdin.readline()\nit = iter(")
    (tmp_path / "dl.py").write_text(script)
    (tmp_path / "launch.py").write_text(LAUNCHER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    p = subprocess.Popen([sys.executable, str(tmp_path / "launch.py"), str(tmp_path / "dl.py")],
                         env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, start_new_session=True)

    def go(_tracer) -> None:
        p.stdin.write("go\n")
        p.stdin.flush()

    try:
        children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
        deadline = time.monotonic() + 30
        while not children.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.05)  # the launcher has started its rank
        res = run_session([p.pid], tmp_path / "rec", TraceOptions(gpu_interval_s=None),
                          duration_s=20, on_started=go)
        line = p.stdout.readline()
        assert line.startswith("ready"), line
        rank = int(line.split()[1])
        workers = [int(c) for c in
                   Path(f"/proc/{rank}/task/{rank}/children").read_text().split()]
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher, its rank and the rank's workers
        p.wait()
    assert len(workers) == 2
    assert [(r["rank"], r["tgid"]) for r in res.manifest["ranks"]] == [(0, rank)]


def _live_hang(d: Daemon, ranks) -> dict | None:
    j = d.job_of(ranks)
    hangs = [f for f in (j or {}).get("findings", []) if f["kind"] == "collective_hang"]
    return hangs[0] if hangs else None


def _hang_of_segments(job_dir: Path, capsys) -> dict:
    assert main(["report", str(job_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (h,) = [f for f in report["findings"] if f["kind"] == "collective_hang"]
    return h


HANG_KEYS = ("waiting_ranks", "missing_ranks", "comm", "seq", "op")


def _released(d: Daemon, cfg: SimConfig, go: Path) -> tuple:
    """Start a simulated job that waits for `go`, release it once the daemon traces every
    rank (so no step of it goes unseen, however slow the machine)."""
    job = start_job(cfg)
    ranks = job.wait_ready()
    d.wait_for(lambda: d.job_of(ranks), 60, "every rank to be traced")
    go.touch()
    return job, ranks


# -- whatever the drain timing (docs/daemon.md): the drain is delayed ON PURPOSE -----------
# ARGUS_DAEMON_TEST_DRAIN_DELAY_MS makes every flush sleep before it drains (as a daemon
# descheduled on a busy node does): the loop does not poll meanwhile, so each drain brings
# ~1.7 intervals of rows and lands at another point of the ranks' steps (inside a wait,
# right after a boundary, ...), and its in-flight snapshot with it.
DELAY_MS = 700


def _delayed(tmp_path: Path, build: Path, **output) -> Daemon:
    return Daemon(tmp_path, build, env={"ARGUS_DAEMON_TEST_DRAIN_DELAY_MS": str(DELAY_MS)},
                  **output)


def test_delayed_drains_keep_each_ranks_step_ids_continuous(tmp_path, own_build, capsys):
    """A 3-rank job (rank 1 a GPU straggler) under a daemon whose drains come 0.7 s late:
    per rank the segments' ids are consecutive and none twice, one id is one step on every
    rank, and `argus report` over the segments counts exactly those steps."""
    d = _delayed(tmp_path, own_build)
    go = tmp_path / "go"
    job, ranks = _released(d, SimConfig(ranks=3, steps=5000,
                                        faults=["straggler:rank=1,factor=1.6"],
                                        wait_go=str(go), build_dir=str(own_build),
                                        quiet=True), go)
    try:
        j = d.wait_for(lambda: (x := d.job_of(ranks)) and x.get("segments", 0) >= 8 and x,
                       120, "8 segments")
        assert j["job"].startswith("torchelastic-")
        assert d.state()["flush_s"] >= DELAY_MS / 1000  # the delay is in effect
    finally:
        assert d.stop() == 0
        job.close()
    (job_dir,) = list((d.out / "jobs").iterdir())
    rows = []  # (rank, step, start_ns, step_time_ns)
    for seg in sorted(job_dir.iterdir(), key=lambda p: int(p.name)):
        rows += load_summaries(seg).steps.select("rank", "step", "start_ns",
                                                 "step_time_ns").rows()
    keys = [(r, st) for r, _s, st, _t in rows]
    assert len(keys) == len(set(keys)), "a step was written twice"
    ids_of: dict[int, list[tuple[int, int]]] = {}
    for rank, step, start, _t in rows:
        ids_of.setdefault(rank, []).append((start, step))
    assert sorted(ids_of) == [0, 1, 2]
    for rank, pairs in ids_of.items():
        ids = [step for _start, step in sorted(pairs)]
        assert ids == list(range(ids[0], ids[0] + len(ids))), (rank, ids)
        assert len(ids) >= 8 * 5, (rank, len(ids))  # 8 segments of ~10 steps each
    # one id, one step: the ranks' starts of an id lie within half a step time (a rank
    # numbered a step off would put every id off; a stall now and then is allowed)
    half = sorted(t for *_x, t in rows)[len(rows) // 2] // 2
    by_id: dict[int, list[int]] = {}
    for _rank, step, start, _t in rows:
        by_id.setdefault(step, []).append(start)
    shared = [v for v in by_id.values() if len(v) == 3]
    assert len(shared) >= 35
    assert sum(max(v) - min(v) < half for v in shared) >= 0.9 * len(shared)
    assert main(["report", str(job_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"]["count"] == len(by_id)
    assert {r["rank"]: r["steps"] for r in report["ranks"]} == {
        rank: len(pairs) for rank, pairs in ids_of.items()}


def test_delayed_drains_and_a_hang_older_than_the_window(tmp_path, own_build, capsys):
    """Rank 1 hangs; the daemon's drains come 0.7 s late and its window is 4 s, so by the
    time the hang is 10 s old (hang_after_s) the raw rows of its start have aged out: the
    live finding names ranks 0 and 2 waiting and rank 1 missing in every state from the
    first one on, every rank of the job is flagged, and `argus report` over the job's
    segments (the last one rewritten with the latest tail while no step completes) finds
    the same hang: the same waiting and missing ranks, comm, seq and op."""
    d = _delayed(tmp_path, own_build, window_s=4)
    go = tmp_path / "go"
    job, ranks = _released(d, SimConfig(ranks=3, steps=5000, faults=["hang:rank=1,start=40"],
                                        wait_go=str(go), build_dir=str(own_build),
                                        quiet=True), go)
    seen = []
    try:
        first = d.wait_for(lambda: _live_hang(d, ranks), 120, "the hang in /state")
        seen.append(first)
        j = d.job_of(ranks)
        assert {r["rank"]: r["hang"] for r in j["ranks"]} == {0: True, 1: True, 2: True}
        for _ in range(3):  # three later states: the finding stays
            t = d.state()["now_ns"]
            d.wait_for(lambda t=t: d.state()["now_ns"] > t, 30, "a later state")
            seen.append(_live_hang(d, ranks))
        assert d.state()["flush_s"] >= DELAY_MS / 1000  # the delay is in effect
    finally:
        assert d.stop() == 0
        job.close()
    for live in seen:
        assert live is not None
        assert (live["waiting_ranks"], live["missing_ranks"], live["op"]) == ([0, 2], [1],
                                                                             "allreduce")
        assert (live["comm"], live["seq"]) == (first["comm"], first["seq"])
    (job_dir,) = list((d.out / "jobs").iterdir())
    h = _hang_of_segments(job_dir, capsys)
    assert {k: h[k] for k in HANG_KEYS} == {k: first[k] for k in HANG_KEYS}
