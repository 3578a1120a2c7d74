"""The launcher of the simulated job: a torchrun-like parent whose children are the ranks
(build/sim/argus-sim-rank), each with torchrun's environment and ARGUS_SIM_* settings.

`run_job(config)` makes the calling process the launcher and returns the truth dict;
`start_job(config)` starts a separate launcher process (python -m argus.sim) and
returns a SimJob handle at once; `main(argv)` is scripts/simulate.

Readiness: once every rank has started (and, with --wait-go, is waiting for the go file
without having made any CUDA/NCCL call) the launcher prints one line on stdout:
    ready launcher=<pid> ranks=<pid>,<pid>,...
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from argus import resources
from argus.sim.faults import Fault, FaultSpecError, parse_fault

RANK_EXE = "sim/argus-sim-rank"
STUB_FILES = ("stubs/libcudart.so.12", "stubs/libcuda.so.1", "stubs/libnccl.so.2",
              "stubs/libnvidia-ml.so.1", "stubs/libargus_simgpu.so")
TRUTH_SCHEMA = "argus.sim.truth/1"


class SimError(RuntimeError):
    """A simulated job that cannot start; the message is one sentence with the remedy."""


@dataclass
class SimConfig:
    ranks: int = 4
    steps: int | None = None          # default 50 when duration is None too
    duration_s: float | None = None
    faults: list[str] = field(default_factory=list)
    truth: str | None = None
    wait_go: str | None = None
    wait_at: str = "init"             # "init": before any CUDA call; "step": after init + 1 step
    pp: int = 1
    tp: int = 1                       # tensor-parallel ranks per group (ncclCommSplit)
    layers: int = 4                   # --tp: layers, each with a TP allreduce fwd and bwd
    sync_every: int = 1               # the host reads the loss back every N steps
    readback: str = "forward"         # ... after the forward (and at the end) | "end" only
    kernels_per_step: int = 96
    launch_rate: float | None = None  # launches/s per rank; overrides kernels_per_step
    step_ms: float = 50.0             # GPU time of one step at speed 1.0
    cpu_ms: float = 3.0               # CPU data loading per step
    buckets: int = 4
    bucket_mb: float = 25.0
    seed: int = 0
    timeout_s: float | None = None
    node: str | None = None           # ARGUS_SIM_NODE (NVML namespace); default env or node0
    build_dir: str | None = None
    log_every: int = 10
    quiet: bool = False               # rank logs go to the job dir instead of stderr
    launcher_env: str = "torchrun"    # "plain": RANK, WORLD_SIZE, LOCAL_RANK only (a shell loop)


def find_build_dir(explicit: str | None = None) -> Path:
    """ARGUS_BUILD_DIR, else the repo's build/ (two levels above this package)."""
    if explicit:
        return Path(explicit).resolve()
    env = os.environ.get("ARGUS_BUILD_DIR")
    if env:
        return Path(env).resolve()
    return resources.sim_build_dir()


def _check_build(build: Path) -> None:
    missing = [p for p in (RANK_EXE, *STUB_FILES) if not (build / p).exists()]
    if missing:
        raise SimError(f"the simulator is not built ({build / missing[0]} is missing): "
                       f"run `make setup` (or `make -C cuda_probes/standins`) first.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _validate(cfg: SimConfig) -> list[Fault]:
    if cfg.ranks < 1 or cfg.ranks > 64:
        raise FaultSpecError("--ranks must be between 1 and 64.")
    if cfg.pp < 1 or cfg.ranks % cfg.pp:
        raise FaultSpecError(f"--pp {cfg.pp} must divide --ranks {cfg.ranks}.")
    if cfg.tp < 1 or cfg.ranks % cfg.tp:
        raise FaultSpecError(f"--tp {cfg.tp} must divide --ranks {cfg.ranks}.")
    if cfg.tp > 1 and cfg.pp > 1:
        raise FaultSpecError("--tp and --pp cannot be combined (use one of them).")
    if cfg.layers < 1:
        raise FaultSpecError("--layers must be >= 1.")
    if cfg.readback not in ("forward", "end"):
        raise FaultSpecError("--readback must be forward or end.")
    if cfg.sync_every < 1:
        raise FaultSpecError("--sync-every must be >= 1.")
    if cfg.sync_every > 1 and cfg.duration_s is not None:
        raise FaultSpecError("--sync-every needs --steps: with --duration every rank must "
                             "read the loss back every step.")
    if cfg.wait_at not in ("init", "step"):
        raise FaultSpecError(f"--wait-at must be init or step, not {cfg.wait_at!r}.")
    if cfg.steps is not None and cfg.steps < 1:
        raise FaultSpecError("--steps must be >= 1.")
    if cfg.duration_s is not None and cfg.duration_s <= 0:
        raise FaultSpecError("--duration must be > 0.")
    if cfg.buckets < 1 or cfg.buckets > 64:
        raise FaultSpecError("--buckets must be between 1 and 64.")
    if cfg.kernels_per_step < 8:
        raise FaultSpecError("--kernels-per-step must be >= 8.")
    warmup = 1 if cfg.wait_at == "step" else 0
    return [parse_fault(s, cfg.ranks, cfg.pp, cfg.buckets, tp=cfg.tp, layers=cfg.layers,
                        warmup_steps=warmup) for s in cfg.faults]


def _kernels_per_step(cfg: SimConfig) -> int:
    if cfg.launch_rate:
        # a step lasts about step_ms of GPU time plus ~5 ms of CPU and communication
        return max(8, round(cfg.launch_rate * (cfg.step_ms + 5.0) / 1000.0))
    return cfg.kernels_per_step


class _Job:
    """The launcher's own state (runs in the launcher process)."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.faults = _validate(cfg)
        self.build = find_build_dir(cfg.build_dir)
        _check_build(self.build)
        self.job_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.jobdir = Path(tempfile.mkdtemp(prefix=f"argus-sim-{self.job_id}-"))
        self.node = cfg.node or os.environ.get("ARGUS_SIM_NODE") or "node0"
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        self.started_at = time.time()
        self.t0 = time.monotonic()
        self.stop_signal = 0
        # started by start_job(): stop when that parent goes away (no orphaned jobs)
        self.parent = os.getppid() if os.environ.get("ARGUS_SIM_WATCH_PARENT") else None

    def orphaned(self) -> bool:
        if self.parent is not None and os.getppid() != self.parent:
            self.stop_signal = signal.SIGTERM
            return True
        return False

    def rank_env(self, rank: int, port: int) -> dict[str, str]:
        c = self.cfg
        env = dict(os.environ)
        steps = c.steps if c.steps is not None else (0 if c.duration_s else 50)
        env.update({
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(c.ranks),
            "LOCAL_WORLD_SIZE": str(c.ranks), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
            "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(c.ranks), "ROLE_NAME": "default",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_RUN_ID": self.job_id, "TORCHELASTIC_RESTART_COUNT": "0",
            "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True",
            "ARGUS_SIM_JOB": self.job_id, "ARGUS_SIM_JOB_DIR": str(self.jobdir),
            "ARGUS_SIM_NODE": self.node, "ARGUS_SIM_GPUS": str(max(8, c.ranks)),
            "ARGUS_SIM_STEPS": str(steps),
            "ARGUS_SIM_DURATION_S": str(c.duration_s or 0),
            "ARGUS_SIM_KERNELS": str(_kernels_per_step(c)),
            "ARGUS_SIM_STEP_MS": str(c.step_ms), "ARGUS_SIM_CPU_MS": str(c.cpu_ms),
            "ARGUS_SIM_BUCKETS": str(c.buckets), "ARGUS_SIM_BUCKET_MB": str(c.bucket_mb),
            "ARGUS_SIM_PP": str(c.pp), "ARGUS_SIM_SEED": str(c.seed),
            "ARGUS_SIM_TP": str(c.tp), "ARGUS_SIM_LAYERS": str(c.layers),
            "ARGUS_SIM_SYNC_EVERY": str(c.sync_every),
            "ARGUS_SIM_READBACK": c.readback, "ARGUS_SIM_WAIT_AT": c.wait_at,
            "ARGUS_SIM_LOG_EVERY": str(c.log_every),
            "ARGUS_SIM_FAULTS": ";".join(f.normalised(c.buckets) for f in self.faults),
            "ARGUS_SIM_WAIT_GO": os.path.abspath(c.wait_go) if c.wait_go else "",
        })
        if c.launcher_env == "plain":  # what `RANK=$r WORLD_SIZE=N LOCAL_RANK=$r exe &` leaves
            for k in ("LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                      "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE"):
                env.pop(k, None)
        return env

    def start(self) -> None:
        port = _free_port()
        exe = str(self.build / RANK_EXE)
        for r in range(self.cfg.ranks):
            err = None
            if self.cfg.quiet:
                err = open(self.jobdir / f"rank-{r}.log", "wb")
                self.logs.append(err)
            self.procs.append(subprocess.Popen(
                [exe], env=self.rank_env(r, port), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, cwd=str(self.jobdir)))

    def wait_ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        n = self.cfg.ranks
        while time.monotonic() < deadline and not self.stop_signal and not self.orphaned():
            if sum((self.jobdir / f"ready-{r}").exists() for r in range(n)) == n:
                return True
            if any(p.poll() is not None for p in self.procs):
                return False
            time.sleep(0.005)
        return False

    def terminate(self, grace: float = 5.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def run(self) -> tuple[dict, int]:
        timed_out = False
        try:
            self.start()
            ready = self.wait_ready()
            if ready:
                pids = ",".join(str(p.pid) for p in self.procs)
                print(f"ready launcher={os.getpid()} ranks={pids}", flush=True)
            deadline = (self.t0 + self.cfg.timeout_s) if self.cfg.timeout_s else None
            while not self.stop_signal and not self.orphaned():
                if all(p.poll() is not None for p in self.procs):
                    break
                if any(p.poll() not in (None, 0) for p in self.procs):
                    break  # a rank failed: stop the others (they would wait forever)
                if deadline and time.monotonic() >= deadline:
                    timed_out = True
                    break
                time.sleep(0.02)
        finally:
            self.terminate()
            for f in self.logs:
                f.close()
        truth = self.truth(timed_out)
        return truth, truth["exit_code"]

    def truth(self, timed_out: bool) -> dict:
        ranks = []
        for r, p in enumerate(self.procs):
            path = self.jobdir / f"rank-{r}.json"
            try:
                d = json.loads(path.read_text())
            except (OSError, ValueError):
                d = {"rank": r, "local_rank": r, "tgid": p.pid, "exit": "missing",
                     "hung": False, "steps_completed": 0, "step_time_ms": [],
                     "collectives": {}, "p2p": {}, "library_calls": {}, "caller_calls": {}}
            d["returncode"] = p.returncode
            ranks.append(d)
        hang = any(f.kind == "hang" for f in self.faults)
        failed = any(p.returncode not in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
                     for p in self.procs)
        if self.stop_signal:
            outcome, code = "interrupted", 128 + self.stop_signal
        elif timed_out:
            outcome, code = "timeout", (0 if hang else 1)
        elif failed or any(d["exit"] != "completed" for d in ranks):
            outcome, code = "failed", 1
        else:
            outcome, code = "completed", 0
        cfg = asdict(self.cfg)
        cfg["kernels_per_step"] = _kernels_per_step(self.cfg)
        cfg["steps"] = self.cfg.steps if self.cfg.steps is not None else (
            None if self.cfg.duration_s else 50)
        cfg["node"] = self.node
        cfg.pop("build_dir", None)
        cfg.pop("truth", None)
        return {
            "schema": TRUTH_SCHEMA,
            "job_id": self.job_id,
            "node": self.node,
            "launcher_tgid": os.getpid(),
            "started_at": self.started_at,
            "wall_s": round(time.monotonic() - self.t0, 3),
            "outcome": outcome,
            "exit_code": code,
            "config": cfg,
            "faults": [f.to_truth() for f in self.faults],
            "ranks": ranks,
        }

    def cleanup(self) -> None:
        shutil.rmtree(self.jobdir, ignore_errors=True)
        for f in glob.glob(f"/dev/shm/argus-sim-{self.job_id}-*"):
            try:
                os.unlink(f)
            except OSError:
                pass
        # device files of ranks that were terminated (a clean exit removes its own)
        pids = {p.pid for p in self.procs}
        for r in range(self.cfg.ranks):
            f = f"/dev/shm/argus-sim-{self.node}-gpu{r}"
            try:
                with open(f, "rb") as fh:
                    head = fh.read(12)
                if len(head) == 12 and int.from_bytes(head[8:12], "little") in pids:
                    os.unlink(f)
            except OSError:
                pass


def run_job(cfg: SimConfig, *, install_signal_handlers: bool = True) -> dict:
    """Run the job with this process as the launcher; returns the truth dict (also written
    to cfg.truth if set). Raises FaultSpecError (usage) or SimError (not built)."""
    job = _Job(cfg)
    old = {}

    def on_signal(signum, _frame):
        job.stop_signal = signum

    if install_signal_handlers:
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, on_signal)
    try:
        truth, _ = job.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        job.cleanup()
    if cfg.truth:
        tmp = f"{cfg.truth}.tmp"
        with open(tmp, "w") as f:
            json.dump(truth, f, indent=1)
            f.write("\n")
        os.replace(tmp, cfg.truth)
    return truth


class SimJob:
    """A launcher started by start_job(): a child process of the caller whose children are
    the ranks. `launcher_pid` is known at once; `rank_pids` after wait_ready()."""

    def __init__(self, proc: subprocess.Popen, truth_path: str, owns_truth: bool):
        self.proc = proc
        self.launcher_pid = proc.pid
        self.truth_path = truth_path
        self.rank_pids: list[int] = []
        self._owns_truth = owns_truth

    def wait_ready(self, timeout: float = 30.0) -> list[int]:
        """Block until the launcher prints its ready line; returns the rank PIDs."""
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("ready "):
                fields = dict(kv.split("=", 1) for kv in line.split()[1:])
                self.rank_pids = [int(p) for p in fields["ranks"].split(",")]
                return self.rank_pids
        raise SimError("the simulated job did not become ready: see its stderr.")

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait()

    def truth(self) -> dict:
        with open(self.truth_path) as f:
            return json.load(f)

    def close(self) -> None:
        """Stop the job if it still runs and remove the temporary truth file (if start_job
        chose it)."""
        if self.proc.poll() is None:
            self.terminate()
        if self.proc.stdout:
            self.proc.stdout.close()
        if self._owns_truth:
            try:
                os.unlink(self.truth_path)
            except OSError:
                pass


def config_to_argv(cfg: SimConfig) -> list[str]:
    a = ["--ranks", str(cfg.ranks), "--pp", str(cfg.pp), "--tp", str(cfg.tp),
         "--layers", str(cfg.layers), "--sync-every", str(cfg.sync_every),
         "--readback", cfg.readback,
         "--wait-at", cfg.wait_at, "--step-ms", str(cfg.step_ms),
         "--cpu-ms", str(cfg.cpu_ms), "--buckets", str(cfg.buckets), "--bucket-mb",
         str(cfg.bucket_mb), "--seed", str(cfg.seed), "--log-every", str(cfg.log_every),
         "--kernels-per-step", str(cfg.kernels_per_step)]
    if cfg.steps is not None:
        a += ["--steps", str(cfg.steps)]
    if cfg.duration_s is not None:
        a += ["--duration", str(cfg.duration_s)]
    for f in cfg.faults:
        a += ["--fault", f]
    for opt, v in (("--truth", cfg.truth), ("--wait-go", cfg.wait_go),
                   ("--launch-rate", cfg.launch_rate), ("--timeout", cfg.timeout_s),
                   ("--node", cfg.node), ("--build-dir", cfg.build_dir)):
        if v is not None:
            a += [opt, str(v)]
    if cfg.quiet:
        a.append("--quiet")
    if cfg.launcher_env != "torchrun":
        a += ["--launcher-env", cfg.launcher_env]
    return a


def start_job(cfg: SimConfig) -> SimJob:
    """Start a launcher process (non-blocking). Validates the config here first, so a bad
    spec raises FaultSpecError and a missing build raises SimError in the caller."""
    _validate(cfg)
    _check_build(find_build_dir(cfg.build_dir))
    owns = cfg.truth is None
    if owns:
        fd, path = tempfile.mkstemp(prefix="argus-sim-truth-", suffix=".json")
        os.close(fd)
        cfg = SimConfig(**{**asdict(cfg), "truth": path})
    root = str(resources.package_root())
    env = dict(os.environ)
    env["ARGUS_SIM_WATCH_PARENT"] = "1"
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen([sys.executable, "-m", "argus.sim", *config_to_argv(cfg)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
    return SimJob(proc, cfg.truth, owns)


EPILOG = """\
faults (repeatable --fault KIND:key=val,...; rank=R or ranks=R+R, start=STEP, steps=N):
  straggler:rank=2,factor=1.5        rank 2's GPU is 1.5x slower
  host_stall:rank=1,ms=40,start=10   rank 1's data loading takes 40 ms longer (CPU-busy)
  link:rank=3,factor=4               collectives through rank 3 cost 4x
  hang:rank=1,start=20               rank 1 stops forever before step 20's first allreduce
  hang:rank=1,start=20,comm=tp       (with --tp) ... before step 20's first TP allreduce
  jit_stall:rank=0,ms=800,start=5    rank 0 compiles a graph for 800 ms in step 5
  bubble:stage=1,factor=2            (with --pp) pipeline stage 1 is 2x slower
  throttle:rank=0,mhz=1100           rank 0's SM clock drops to 1100 MHz (NVML shows it)

examples:
  scripts/simulate --ranks 4 --steps 50                      # a healthy job
  scripts/simulate --ranks 4 --steps 50 --fault straggler:rank=2,factor=1.5 --truth t.json
  scripts/simulate --ranks 4 --duration 30 --wait-go /tmp/go # attach a tracer, then touch /tmp/go
  scripts/simulate --ranks 4 --steps 100 --fault hang:rank=1,start=10 --timeout 5
  scripts/simulate --ranks 4 --tp 2 --steps 100 --wait-go /tmp/go --wait-at step
                                           # Megatron-shaped, communicators made before go
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simulate",
        description="Run a simulated multi-rank GPU training job on the stand-in CUDA/NCCL "
                    "libraries (no GPU needed) and write what was injected.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4, help="number of rank processes (default 4)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="training steps (default 50)")
    g.add_argument("-d", "--duration", type=float, help="run for about SEC seconds (all ranks "
                   "run the same number of steps)")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a fault (repeatable), see below")
    p.add_argument("--truth", metavar="FILE", help="write the ground truth JSON to FILE")
    p.add_argument("--wait-go", metavar="FILE", help="ranks wait, with no CUDA call made, "
                   "until FILE exists")
    p.add_argument("--wait-at", choices=("init", "step"), default="init",
                   help="with --wait-go: wait before any CUDA/NCCL call (init, default) or "
                   "after init and one warm-up step, communicators made (step)")
    p.add_argument("--pp", type=int, default=1, metavar="STAGES",
                   help="pipeline-parallel stages (default 1: pure data parallel)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel group size: ncclCommSplit TP and DP communicators, "
                   "a TP allreduce per layer forward and backward (default 1)")
    p.add_argument("--layers", type=int, default=4, help="layers with --tp (default 4)")
    p.add_argument("--sync-every", type=int, default=1, metavar="N",
                   help="the host reads the loss back only every N steps (default 1)")
    p.add_argument("--readback", choices=("forward", "end"), default="forward",
                   help="where the host reads the loss back: after the forward and at the "
                   "step's end (default), or at the end only (after the collectives)")
    p.add_argument("--kernels-per-step", type=int, default=96, metavar="K")
    p.add_argument("--launch-rate", type=float, metavar="PER_S",
                   help="target kernel launches per second per rank (sets K)")
    p.add_argument("--step-ms", type=float, default=50.0, help="GPU time per step (default 50)")
    p.add_argument("--cpu-ms", type=float, default=3.0, help="CPU data loading per step")
    p.add_argument("--buckets", type=int, default=4, help="gradient allreduce buckets per step")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="size of one bucket in MB")
    p.add_argument("--seed", type=int, default=0, help="recorded in the truth")
    p.add_argument("--timeout", type=float, metavar="SEC", help="SIGTERM the ranks after SEC; "
                   "exit 0 if a hang fault explains it, else 1")
    p.add_argument("--node", help="simulated node id for the NVML files (default "
                   "$ARGUS_SIM_NODE or node0)")
    p.add_argument("--build-dir", help="build folder (default $ARGUS_BUILD_DIR or ./build)")
    p.add_argument("--log-every", type=int, default=10, help="log a line every N steps")
    p.add_argument("-q", "--quiet", action="store_true", help="rank logs are not shown")
    p.add_argument("--launcher-env", choices=("torchrun", "plain"), default="torchrun",
                   help="the ranks' environment: torchrun's (default) or a plain shell loop's "
                   "(RANK, WORLD_SIZE, LOCAL_RANK only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = SimConfig(
        ranks=args.ranks, steps=args.steps, duration_s=args.duration, faults=args.fault,
        truth=args.truth, wait_go=args.wait_go, wait_at=args.wait_at, pp=args.pp,
        tp=args.tp, layers=args.layers, sync_every=args.sync_every, readback=args.readback,
        kernels_per_step=args.kernels_per_step, launch_rate=args.launch_rate,
        step_ms=args.step_ms, cpu_ms=args.cpu_ms, buckets=args.buckets,
        bucket_mb=args.bucket_mb, seed=args.seed, timeout_s=args.timeout, node=args.node,
        build_dir=args.build_dir, log_every=args.log_every, quiet=args.quiet,
        launcher_env=args.launcher_env)
    try:
        truth = run_job(cfg)
    except FaultSpecError as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 2
    except SimError as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 1
    steps = [r["steps_completed"] for r in truth["ranks"]]
    print(f"simulate: {truth['outcome']}: {len(steps)} ranks, steps {min(steps)}..{max(steps)}, "
          f"{truth['wall_s']:.1f} s" + (f", truth in {cfg.truth}" if cfg.truth else ""),
          file=sys.stderr)
    return truth["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
