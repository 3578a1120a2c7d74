"""Start a zoo shape under a launcher; a handle that never leaves orphaned ranks.

    job = launch.start("tp_dp", "torchrun", workdir, steps=150, faults=Faults(straggler=(1, 10)))
    try:
        job.wait_ready()            # every rank made its groups, warmed up, waits for go
        ... attach argus to job.targets, wait for its `argus: tracing` line ...
        job.release()               # the go file
        job.wait(120)
        truth = job.truth()         # argus.zoo.truth/1, also written to job.truth_path
    finally:
        job.stop()                  # SIGTERM the launcher, then every rank PID it had

Launchers (torch shapes):
- torchrun: `torchrun --standalone --nproc-per-node=N train.py ...`; argus gets its PID.
- shell: tests/workloads/shell_launch.sh, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* only.
- mpi: the same script with Open MPI's OMPI_COMM_WORLD_* (no RANK: train.py maps them).
- pmi: the same script with MPICH/Intel MPI's PMI_RANK/PMI_SIZE/MPI_LOCALRANKID.
- separate: N processes started one by one, each in a session of its own, no common
  parent but this one; argus gets the N rank PIDs.
Sim shapes run under the simulator's own launcher (`sim`): argus.sim.start_job with
`wait_at="step"`, so their communicators exist before the go file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # tests/
from workloads import shapes as zoo  # noqa: E402

TRAIN = HERE / "train.py"
SHELL = HERE / "shell_launch.sh"
LAUNCHERS = ("torchrun", "shell", "mpi", "pmi", "separate")
TRUTH_SCHEMA = "argus.zoo.truth/1"
# what a launcher must not inherit from the caller (a test run under torchrun, say)
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
              "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
              "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "SLURM_JOB_ID")
SIM_STEP_MS = 50.0  # the simulator's GPU time per step (its --step-ms default)
SIM_BUCKETS = 4
SIM_LAYERS = 4
SIM_SYNC_EVERY = 5


class LaunchError(RuntimeError):
    """A job that did not start or get ready; the message names its log."""


@dataclass
class Faults:
    straggler: tuple[int, float] | None = None  # (rank, % of the step's device time)
    hang: dict | None = None  # {rank, group, op, step, nth}
    slow_stage: tuple[int, float] | None = None  # (stage, % more device time)
    # host work a straggler burns first, before any of it slows the job: a host that runs
    # ahead of its GPU (shapes.HOST_AHEAD) has this much idle per step (the job's step minus
    # its host's own step, measured on the healthy run)
    slack_ms: float = 0.0

    def straggler_ms(self, base_ms: float) -> float:
        """The straggler's host work per step: its % of the step, beyond the host's slack."""
        return self.slack_ms + (self.straggler[1] / 100.0 * base_ms if self.straggler else 0.0)

    def truth(self, shape: str, world: int, base_ms: float) -> list[dict]:
        out = []
        if self.straggler:
            r, pct = self.straggler
            out.append({"kind": "straggler", "ranks": [r], "pct": pct, "of_step_ms": base_ms,
                        "slack_ms": self.slack_ms,
                        "ms_per_step": round(self.straggler_ms(base_ms), 3)})
        if self.hang:
            h = self.hang
            out.append({"kind": "hang", "ranks": [h["rank"]], "group": h["group"],
                        "op": h["op"], "step": h["step"], "nth": h["nth"]})
        if self.slow_stage:
            st, pct = self.slow_stage
            out.append({"kind": "slow_stage", "stage": st, "pct": pct,
                        "ranks": zoo.stage_ranks(shape, st, world)})
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """Every live descendant of pid (children of children too)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            continue
    return out


def _is_ours(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker in f.read()
    except OSError:
        return False


class Job:
    """One zoo job (see the module doc). `targets` are the PIDs to give argus."""

    def __init__(self, shape: str, launcher: str, workdir: Path, *, nproc: int = 4,
                 steps: int | None = None, duration: float | None = None,
                 faults: Faults | None = None, step_ms: float | None = None,
                 straggler_base_ms: float | None = None, comm: str | None = None,
                 extra: tuple[str, ...] = ()):
        if shape not in zoo.SHAPES:
            raise ValueError(f"unknown shape {shape!r} (known: {', '.join(zoo.SHAPES)})")
        self.sim = shape in zoo.SIM_SHAPES
        if self.sim and launcher != "sim":
            raise ValueError(f"{shape} runs under the simulator's launcher ('sim')")
        if not self.sim and launcher not in LAUNCHERS:
            raise ValueError(f"unknown launcher {launcher!r} (known: {', '.join(LAUNCHERS)})")
        self.shape, self.launcher, self.nproc = shape, launcher, nproc
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.truth_dir = self.workdir / "truth"
        self.go = self.workdir / "go"
        self.truth_path = self.workdir / "truth.json"
        self.steps, self.duration = steps, duration
        self.faults = faults or Faults()
        self.step_ms = step_ms if step_ms is not None else (SIM_STEP_MS if self.sim else 40.0)
        # what a straggler's PCT is a percentage of (default: the device time per step)
        self.base_ms = straggler_base_ms or self.step_ms
        self.comm, self.extra = comm, tuple(extra)
        self.procs: list[subprocess.Popen] = []
        self.rank_pids: list[int] = []
        self._seen_pids: set[int] = set()
        self._sim = None
        self._logs: list = []
        self.started_at = time.time()
        self._start()

    # ---------------------------------------------------------------- starting
    def _train_args(self) -> list[str]:
        a = [str(TRAIN), "--shape", self.shape, "--truth-dir", str(self.truth_dir),
             "--wait-go", str(self.go), "--step-ms", str(self.step_ms)]
        if self.duration is not None:
            a += ["--duration", str(self.duration)]
        elif self.steps is not None:
            a += ["--steps", str(self.steps)]
        f = self.faults
        if f.straggler:
            a += ["--straggler", f"{f.straggler[0]}:{f.straggler[1]}",
                  "--straggler-base-ms", f"{self.base_ms:.3f}"]
        if f.hang:
            h = f.hang
            a += ["--hang", f"{h['rank']}:{h['group']}:{h['op']}:{h['step']}:{h['nth']}"]
        if f.slow_stage:
            a += ["--slow-stage", f"{f.slow_stage[0]}:{f.slow_stage[1]}"]
        if self.comm:
            a += ["--comm", self.comm]
        return a + list(self.extra)

    def _log(self, name: str):
        f = open(self.workdir / name, "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(f)
        return f

    def _start(self) -> None:
        if self.sim:
            self._start_sim()
            return
        py, env = sys.executable, clean_env()
        args = self._train_args()
        if self.launcher == "torchrun":
            torchrun = Path(py).with_name("torchrun")
            cmd = [str(torchrun), "--standalone", f"--nproc-per-node={self.nproc}", *args]
            self.procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                               stdout=self._log("launcher.log"),
                                               stderr=subprocess.STDOUT))
        elif self.launcher in ("shell", "mpi", "pmi"):
            style = {"shell": "plain", "mpi": "ompi", "pmi": "pmi"}[self.launcher]
            cmd = ["bash", str(SHELL), "--style", style, str(self.nproc), str(free_port()),
                   "--", py, *args]
            self.procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                               stdout=self._log("launcher.log"),
                                               stderr=subprocess.STDOUT))
        else:  # separate: one process at a time, nothing in common but the rendezvous
            port = str(free_port())
            for r in range(self.nproc):
                renv = {**env, "RANK": str(r), "WORLD_SIZE": str(self.nproc),
                        "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
                self.procs.append(subprocess.Popen([py, *args], env=renv, cwd=REPO,
                                                   stdin=subprocess.DEVNULL,
                                                   stdout=self._log(f"rank-{r}.log"),
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def _sim_faults(self) -> list[str]:
        f, out = self.faults, []
        if f.straggler:
            out.append(f"host_stall:rank={f.straggler[0]},ms={f.straggler_ms(self.base_ms):.3f}")
        if f.hang:
            h = f.hang
            per_step = 2 * SIM_LAYERS if h["group"] == "tp" else SIM_BUCKETS
            at = h["step"] * per_step + h["nth"]
            out.append(f"hang:rank={h['rank']},at={at},comm={h['group']}")
        if f.slow_stage:
            st, pct = f.slow_stage
            out.append(f"bubble:stage={st},factor={1.0 + pct / 100.0:.3f}")
        return out

    def _start_sim(self) -> None:
        from argus.sim.launcher import SimConfig, start_job

        cfg = SimConfig(ranks=self.nproc, steps=self.steps, duration_s=self.duration,
                        faults=self._sim_faults(), truth=str(self.workdir / "sim-truth.json"),
                        wait_go=str(self.go), wait_at="step", step_ms=self.step_ms,
                        buckets=SIM_BUCKETS, layers=SIM_LAYERS, quiet=True,
                        node=self.sim_node,
                        tp=2 if self.shape == "sim_tp_dp" else 1,
                        pp=2 if self.shape == "sim_pp" else 1,
                        sync_every=SIM_SYNC_EVERY if self.shape == "sim_sync_every_n"
                        else 1)
        self._sim = start_job(cfg)
        self.procs.append(self._sim.proc)

    @property
    def sim_node(self) -> str:
        return f"zoo{os.getpid()}"

    @property
    def argus_env(self) -> dict[str, str]:
        """What argus needs beside the job: a simulated job's GPUs are read through the
        simulator's NVML (its node's files), as `argus demo` does; real jobs need nothing."""
        if self.launcher != "sim":
            return {}
        from argus.sim.launcher import find_build_dir

        return {"ARGUS_NVML_LIB": str(find_build_dir() / "stubs" / "libnvidia-ml.so.1"),
                "ARGUS_SIM_NODE": self.sim_node}

    # ---------------------------------------------------------------- running
    @property
    def launcher_pid(self) -> int | None:
        return None if self.launcher == "separate" else self.procs[0].pid

    @property
    def targets(self) -> list[int]:
        """What to give `argus attach`: the launcher, or (separate) every rank PID."""
        if self.launcher == "separate":
            return [p.pid for p in self.procs]
        return [self.procs[0].pid]

    def wait_ready(self, timeout: float = 240.0) -> list[int]:
        """Block until every rank waits for the go file; returns the rank PIDs by rank."""
        if self._sim is not None:
            self.rank_pids = self._sim.wait_ready(timeout)
            self._seen_pids.update(self.rank_pids)
            return self.rank_pids
        deadline = time.monotonic() + timeout
        while True:
            ready = sorted(self.truth_dir.glob("ready.*"))
            if len(ready) == self.nproc:
                try:
                    pids = {int(p.suffix[1:]): int(p.read_text()) for p in ready}
                except ValueError:  # a file being written
                    pids = {}
                if len(pids) == self.nproc:
                    self.rank_pids = [pids[r] for r in range(self.nproc)]
                    self._seen_pids.update(self.rank_pids)
                    return self.rank_pids
            self._remember_pids()
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                raise LaunchError(f"{self.shape} under {self.launcher} did not get ready "
                                  f"(see {self.workdir}):\n{self.log_tail()}")
            time.sleep(0.05)

    def _remember_pids(self) -> None:
        for p in self.procs:
            self._seen_pids.add(p.pid)
            self._seen_pids.update(_descendants(p.pid))

    def release(self) -> None:
        self.go.touch()

    def wait(self, timeout: float) -> int | None:
        """The launcher's (or every separate rank's worst) exit code; None on timeout."""
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(max(0.01, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                return None
        return max(codes, key=abs) if codes else None

    def hung_ranks(self) -> list[int]:
        """Ranks that reached their planted hang (torch shapes: DIR/hung.R.json)."""
        return sorted(int(p.name.split(".")[1]) for p in self.truth_dir.glob("hung.*.json"))

    def wait_hung(self, timeout: float) -> bool:
        """Until the planted hang was reached (the sim does not say: a hang is reached when
        every rank stopped completing steps; callers bound it by time instead)."""
        deadline = time.monotonic() + timeout
        want = self.faults.hang["rank"] if self.faults.hang else None
        while time.monotonic() < deadline:
            if want in self.hung_ranks():
                return True
            if any(p.poll() is not None for p in self.procs):
                return False
            time.sleep(0.05)
        return False

    def log_tail(self, n: int = 3000) -> str:
        parts = []
        for f in sorted(self.workdir.glob("*.log")):
            try:
                parts.append(f"--- {f.name}\n{f.read_text()[-n:]}")
            except OSError:
                pass
        return "\n".join(parts)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the launcher (torchrun and the shell pass it on; each rank writes its
        truth), then SIGTERM and, after `grace`, SIGKILL every rank PID seen that still
        runs: a launcher that could not pass it on leaves no rank behind."""
        if self._sim is not None:
            self._sim.close()
        else:
            self._remember_pids()
            for p in self.procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in self.procs:
                try:
                    p.wait(max(0.01, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            marker = str(TRAIN).encode()
            left = [q for q in self._seen_pids if _alive(q) and _is_ours(q, marker)]
            for q in left:
                try:
                    os.kill(q, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and any(_alive(q) for q in left):
                time.sleep(0.05)
            for q in left:
                if _alive(q) and _is_ours(q, marker):
                    try:
                        os.kill(q, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for f in self._logs:
            f.close()
        self._logs = []

    # ---------------------------------------------------------------- truth
    def truth(self) -> dict:
        """The job's ground truth (argus.zoo.truth/1), written to truth_path too."""
        ranks = self._sim_ranks() if self.sim else self._torch_ranks()
        done = [r["steps_completed"] for r in ranks]
        hung = any(r.get("hung") for r in ranks)
        if hung:
            outcome = "hung"
        elif all(r["exit"] == "completed" for r in ranks):
            outcome = "completed"
        else:
            outcome = "failed"
        t = {
            "schema": TRUTH_SCHEMA, "shape": self.shape, "launcher": self.launcher,
            "nproc": self.nproc, "started_at": self.started_at,
            "config": {"steps": self.steps, "duration_s": self.duration,
                       "step_ms": self.step_ms, "extra": list(self.extra)},
            "faults": self.faults.truth(self.shape, self.nproc, self.base_ms),
            "outcome": outcome,
            # the job's own count: steps every rank got through (a hang: the hung step)
            "steps": {"min": min(done, default=0), "max": max(done, default=0)},
            "ranks": ranks,
        }
        tmp = self.truth_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(t, indent=1))
        os.replace(tmp, self.truth_path)
        return t

    def _torch_ranks(self) -> list[dict]:
        out = []
        for r in range(self.nproc):
            try:
                d = json.loads((self.truth_dir / f"truth.{r}.json").read_text())
            except (OSError, ValueError):
                d = {"rank": r, "exit": "missing", "steps_completed": 0, "step_time_ms": [],
                     "hung": r in self.hung_ranks(), "collectives": {}}
            d.setdefault("pid", self.rank_pids[r] if r < len(self.rank_pids) else None)
            out.append(d)
        return out

    def _sim_ranks(self) -> list[dict]:
        try:
            t = json.loads((self.workdir / "sim-truth.json").read_text())
        except (OSError, ValueError):
            return [{"rank": r, "exit": "missing", "steps_completed": 0, "step_time_ms": [],
                     "hung": False, "collectives": {}} for r in range(self.nproc)]
        keep = ("rank", "local_rank", "stage", "exit", "hung", "steps_completed",
                "step_time_ms", "collectives", "warmup_steps")
        return [{**{k: r.get(k) for k in keep}, "pid": r.get("tgid")} for r in t["ranks"]]


def start(shape: str, launcher: str | None, workdir: Path, **kw) -> Job:
    """Start `shape` under `launcher` (default: torchrun; sim shapes: sim)."""
    if launcher is None:
        launcher = "sim" if shape in zoo.SIM_SHAPES else "torchrun"
    return Job(shape, launcher, workdir, **kw)
