"""argus attach on REAL PyTorch DDP (CPU build, gloo) under torchrun, through the torchrun PID.

tests/bpf/ddp_train.py is the job: each rank builds DDP around a tiny model (one gradient
bucket), waits for a go file, then runs STEPS steps and writes its ground truth. argus
attaches to torchrun (which maps libtorch_cpu itself but is a launcher, not a rank) before
the go file exists, so every counted call is one the job made after attach.

What DDP does here (torch 2.13 CPU, measured with these probes):
- construction (DDP(...)): 1 allgather (parameter shape check) + 2 broadcasts (module
  state sync), no allreduce: before the go file by default, so never counted;
- every step: 1 autograd Engine::execute, 1 c10d ProcessGroupGloo::allreduce (the single
  bucket), each collective executed as one AsyncWork::execute on a gloo worker thread;
- once, in the forward of step 2: 2 broadcasts (the reducer rebuilds its buckets in the
  order gradients became ready and syncs the indices), so on the process group the
  collective sequence is allreduce, broadcast, broadcast, allreduce x (STEPS-1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from argus.analyze.diagnosis import diagnose
from argus.analyze.matching import collectives
from argus.analyze.timeline import build_timeline
from argus.collect import c10d, procfs
from argus.collect.session import run_session
from argus.collect.tracer import TraceOptions
from argus.errors import TargetNotFound
from argus.recording.io import load_recording
from argus.sim.expect import SERIOUS

pytestmark = pytest.mark.bpf

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("ddp_train.py")
STEPS = 13
ALLREDUCE = "c10d::ProcessGroupGloo::allreduce"
BROADCAST = "c10d::ProcessGroupGloo::broadcast"
ALLGATHER = "c10d::ProcessGroupGloo::allgather"
BARRIER = "c10d::ProcessGroupGloo::barrier"  # ddp_train.py's one barrier before teardown
PG_WORK = "c10d::ProcessGroupGloo::AsyncWork::execute"
# Entry probes only on C++ (see cuda_probes/torch.toml): execute's duration comes from the
# finishWorkGloo call it makes on the same thread when the collective is done.
PG_DONE = "c10d::ProcessGroupGloo::AsyncWork::finishWorkGloo"
AUTOGRAD = "torch::autograd::Engine::execute"
BUCKET = "c10d::Reducer::all_reduce_bucket"  # DDP's reducer launching a gradient bucket


def _torchrun() -> str:
    exe = Path(sys.executable).with_name("torchrun")
    if not exe.exists():
        pytest.skip(
            f"torchrun not found next to {sys.executable}: run `make setup` (installs torch)"
        )
    return str(exe)


class Job:
    """A torchrun job of ddp_train.py whose ranks wait for `go`."""

    def __init__(self, tmp: Path, nproc: int, steps: int = STEPS, *extra: str):
        self.tmp, self.nproc, self.steps = tmp, nproc, steps
        self.go, self.truth_dir = tmp / "go", tmp / "truth"
        cmd = [_torchrun(), "--standalone", f"--nproc-per-node={nproc}", str(SCRIPT),
               "--steps", str(steps), "--go", str(self.go), "--truth", str(self.truth_dir),
               *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = open(tmp / "torchrun.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
        self.t0 = time.monotonic()

    def wait_ready(self, timeout: float = 180) -> float:
        """Every rank has built DDP and waits for go; seconds since torchrun started."""
        deadline = time.monotonic() + timeout
        while len(list(self.truth_dir.glob("ready.*"))) < self.nproc:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(
                    f"torchrun did not get ready: {(self.tmp / 'torchrun.log').read_text()[-3000:]}"
                )
            time.sleep(0.05)
        return time.monotonic() - self.t0

    def finish(self, timeout: float = 120) -> list[dict]:
        rc = self.proc.wait(timeout=timeout)
        assert rc == 0, (self.tmp / "torchrun.log").read_text()[-3000:]
        return [
            json.loads((self.truth_dir / f"truth.{r}.json").read_text()) for r in range(self.nproc)
        ]

    def close(self) -> None:
        """Stop torchrun and its ranks. torchrun stops its workers on SIGTERM, but each runs
        in a session of its own, so a torchrun that does not get to (SIGKILL, a timeout)
        leaves them orphaned: they are found first and killed by PID."""
        if self.proc.poll() is None:
            try:
                ranks = procfs.children(self.proc.pid)
            except TargetNotFound:  # torchrun ended meanwhile
                ranks = []
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for pid in ranks:
                try:
                    if SCRIPT.name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
                except (FileNotFoundError, ProcessLookupError):
                    pass
        self.log.close()


def _record(tmp: Path, nproc: int, *extra: str):
    job = Job(tmp, nproc, STEPS, *extra)
    try:
        ready_s = job.wait_ready()
        t0 = time.monotonic()
        timing = {"ready_s": ready_s}

        def started(tracer):
            timing["attach_s"] = time.monotonic() - t0
            job.go.touch()

        result = run_session(
            [job.proc.pid], tmp / "rec", TraceOptions(), duration_s=120, on_started=started
        )
        timing["session_s"] = time.monotonic() - t0
        truth = job.finish()
    finally:
        job.close()
    rec = load_recording(result.path)
    return job.proc.pid, truth, timing, rec


@pytest.fixture(scope="module")
def ddp2(tmp_path_factory):
    # Rank 1 is slowed (50 ms of CPU per step in slow_rank_compute): counts must not change.
    return _record(tmp_path_factory.mktemp("ddp2"), 2, "--slow-rank", "1", "--slow-ms", "50")


@pytest.fixture(scope="module")
def ddp2_warm(tmp_path_factory):
    # Two warm-up steps before go: the bucket rebuild is done, only allreduces are left.
    # The group is named only from what the BPF program read at its first call (the read of
    # the process's memory when the ring is drained fails here, as it does once a rank has
    # exited: a short job on a busy machine recorded `pg0`)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(c10d, "read_group", lambda *a, **k: None)
        return _record(tmp_path_factory.mktemp("ddp2warm"), 2, "--warmup-steps", "2")


@pytest.fixture(scope="module")
def ddp2_init(tmp_path_factory):
    # Wait for go before DDP() is built: its construction collectives are recorded too.
    return _record(tmp_path_factory.mktemp("ddp2init"), 2, "--wait-at", "ddp")


def _counts(rec, pid: int) -> tuple[dict, dict]:
    kernel = rec.manifest["call_counts"][str(pid)]
    rows = rec.events.filter((pl.col("tgid") == pid) & (pl.col("channel") == "torch"))
    return kernel, {str(k): v for k, v in rows.group_by("name").len().iter_rows()}


def _check_ranks(launcher: int, truth: list[dict], rec, steps: int = STEPS) -> dict[int, int]:
    """Every rank recorded with the RANK of its environment; torchrun is no rank. rank -> tgid."""
    m = rec.manifest
    # nothing lost; a sampled stack walk (native or Python) may fail now and then, e.g. on a
    # rank that is exiting, and is counted, not lost data
    walks = ("stack_user_walk", "stack_kernel_walk", "stack_map_full", "py_walk_failed")
    assert {k: v for k, v in m["drops"].items() if v and k not in walks} == {}
    ranks = {r["rank"]: r for r in m["ranks"]}
    assert sorted(ranks) == list(range(len(truth)))
    assert launcher not in {r["tgid"] for r in m["ranks"]}
    assert launcher in m["launchers"]
    for t in truth:
        r = ranks[t["rank"]]
        assert r["tgid"] == t["pid"]
        assert (r["world_size"], r["local_rank"]) == (len(truth), t["local_rank"])
        assert r["env"]["RANK"] == str(t["rank"])
        assert "libtorch_cpu" in {lib["name"] for lib in r["libraries"]}
        assert t["steps"] == steps
    return {t["rank"]: t["pid"] for t in truth}


def test_torchrun_pid_records_every_rank(ddp2):
    launcher, truth, timing, rec = ddp2
    _check_ranks(launcher, truth, rec)
    assert rec.manifest["end_reason"] == "targets_exited"
    torch_probes = {p["name"]: p for p in rec.manifest["probes"] if p["channel"] == "torch"}
    for name in (ALLREDUCE, BROADCAST, PG_WORK, AUTOGRAD):
        assert torch_probes[name]["status"] == "attached"
        assert sorted(torch_probes[name]["tgids"]) == sorted(t["pid"] for t in truth)
        assert torch_probes[name]["placement"]["emulated"] is True  # push prologues here
    # The NCCL process-group methods live in libtorch_cuda (cuda_probes/torch_nccl.toml),
    # which a CPU build has not: never looked for in libtorch_cpu
    assert not any("ProcessGroupNCCL" in name for name in torch_probes)
    assert {p["library"].rsplit("/", 1)[-1] for p in rec.manifest["probes"]
            if p["channel"] == "torch"} == {"libtorch_cpu.so"}


def test_exact_collective_counts_per_rank(ddp2):
    launcher, truth, timing, rec = ddp2
    for t in truth:
        kernel, rows = _counts(rec, t["pid"])
        expected = {
            ALLREDUCE: STEPS,  # one bucket, one allreduce per step
            BUCKET: STEPS,  # ... that DDP's reducer launched
            AUTOGRAD: STEPS,  # one backward per step
            BROADCAST: 2,  # bucket rebuild in step 2 (construction's were before go)
            BARRIER: 1,
            PG_WORK: STEPS + 3,  # every collective runs once on the gloo worker thread
            PG_DONE: STEPS + 3,  # ... and completes there
        }
        assert kernel == expected, t["rank"]
        assert rows == expected, t["rank"]
    assert truth[1]["slow_function"] == "slow_rank_compute" and truth[1]["slow_ms"] == 50
    assert truth[0]["slow_function"] is None
    assert all(t["params"] == 145 for t in truth)


def test_process_group_id_and_sequence_agree_across_ranks(ddp2):
    launcher, truth, timing, rec = ddp2
    sequences = {}
    for t in truth:
        coll = rec.events.filter(
            (pl.col("tgid") == t["pid"]) & pl.col("name").is_in([ALLREDUCE, BROADCAST, ALLGATHER])
        ).sort("ts_ns")
        # `this` (rsi: the return slot is rdi) is the group's c10d::Backend, read in the live
        # process: torch's name for the world group ("0"), its size and this rank's place
        assert coll["comm"].unique().to_list() == ["pg:0"]
        assert coll["comm_nranks"].unique().to_list() == [len(truth)]
        assert coll["comm_rank"].unique().to_list() == [t["rank"]]
        assert coll["seq"].to_list() == list(range(STEPS + 2))
        assert coll["dur_ns"].null_count() == coll.height  # entry probes: issue time only
        sequences[t["rank"]] = coll["op"].to_list()
    assert sequences[0] == ["allreduce", "broadcast", "broadcast"] + ["allreduce"] * (STEPS - 1)
    assert all(ops == sequences[0] for ops in sequences.values())


def test_pg_work_runs_on_a_gloo_worker_thread_with_durations(ddp2):
    launcher, truth, timing, rec = ddp2
    for t in truth:
        work = rec.events.filter((pl.col("tgid") == t["pid"]) & (pl.col("name") == PG_WORK))
        assert work.height == STEPS + 3  # the collectives and the final barrier
        assert work["dur_ns"].null_count() == 0 and work["dur_ns"].min() > 0
        assert not work["in_flight"].any()
        assert t["pid"] not in work["tid"].to_list()  # not the main thread
        issued = rec.events.filter((pl.col("tgid") == t["pid"]) & (pl.col("name") == ALLREDUCE))
        assert set(issued["tid"].to_list()) == {t["pid"]}  # the main thread issues them
        # each allreduce follows DDP's launch of its one bucket (ordinal 0) on that thread
        bucket = rec.events.filter((pl.col("tgid") == t["pid"]) & (pl.col("name") == BUCKET))
        assert bucket["seq"].to_list() == [0] * STEPS
        assert set(bucket["tid"].to_list()) == {t["pid"]}
    coll = collectives(build_timeline([rec]))
    per = coll.group_by("rank", "op", "origin").len().sort("rank", "op", "origin")
    assert per.rows() == [row for r in range(len(truth)) for row in
                          [(r, "allreduce", "ddp0", STEPS), (r, "barrier", None, 1),
                           (r, "broadcast", None, 2)]]


def test_after_warmup_allreduce_seq_is_0_to_steps(ddp2_warm):
    launcher, truth, timing, rec = ddp2_warm
    _check_ranks(launcher, truth, rec)
    for t in truth:
        kernel, rows = _counts(rec, t["pid"])
        assert kernel == rows == {ALLREDUCE: STEPS, BUCKET: STEPS, AUTOGRAD: STEPS, BARRIER: 1,
                                  PG_WORK: STEPS + 1, PG_DONE: STEPS + 1}
        ar = rec.events.filter((pl.col("tgid") == t["pid"]) & (pl.col("name") == ALLREDUCE)).sort(
            "ts_ns"
        )
        assert ar["seq"].to_list() == list(range(STEPS))
        assert ar["comm"].unique().to_list() == ["pg:0"]
        assert ar.select("comm_rank", "comm_nranks").unique().rows() == [(t["rank"], 2)]


def test_ddp_construction_collectives(ddp2_init):
    """What the default run does not count: DDP() makes 1 allgather + 2 broadcasts, no allreduce."""
    launcher, truth, timing, rec = ddp2_init
    _check_ranks(launcher, truth, rec)
    for t in truth:
        kernel, rows = _counts(rec, t["pid"])
        expected = {
            ALLGATHER: 1,
            BROADCAST: 2 + 2,
            ALLREDUCE: STEPS,
            BUCKET: STEPS,
            AUTOGRAD: STEPS,
            BARRIER: 1,
            PG_WORK: STEPS + 6,
            PG_DONE: STEPS + 6,
        }
        assert kernel == rows == expected
        coll = rec.events.filter(
            (pl.col("tgid") == t["pid"]) & pl.col("name").is_in([ALLREDUCE, BROADCAST, ALLGATHER])
        ).sort("ts_ns")
        assert coll["op"].to_list()[:6] == ["allgather", "broadcast", "broadcast", "allreduce",
                                            "broadcast", "broadcast"]
        assert coll["seq"].to_list() == list(range(STEPS + 5))


def test_cli_attach_to_4_rank_torchrun(tmp_path, monkeypatch, capsys):
    """`argus attach <torchrun pid> -d 20 -o out/` on a 4-rank job whose rank 2 spends 60 ms
    of CPU per step in slow_rank_compute() (every rank waits 20 ms: `--compute-ms`): every
    rank recorded with exact counts, and the diagnosis names rank 2 a host straggler and
    nothing else (the 2-rank case: tests/bpf/test_ddp_diagnosis.py)."""
    import argus.cli.attach as attach_cmd
    from argus.cli import main

    steps = 30
    job = Job(tmp_path, 4, steps, "--compute-ms", "20", "--slow-rank", "2", "--slow-ms", "60")
    out = tmp_path / "out"
    try:
        job.wait_ready()
        real_run_session = attach_cmd.run_session

        def run_session_then_go(*args, on_started=None, **kwargs):
            def started(tracer):
                if on_started is not None:
                    on_started(tracer)
                job.go.touch()  # released only once every rank is probed

            return real_run_session(*args, on_started=started, **kwargs)

        monkeypatch.setattr(attach_cmd, "run_session", run_session_then_go)
        rc = main(["attach", str(job.proc.pid), "-d", "20", "-o", str(out)])
        truth = job.finish()
    finally:
        job.close()
    assert rc == 0, capsys.readouterr().err
    rec = load_recording(out)
    assert rec.manifest["end_reason"] == "targets_exited"  # well within the 20 s
    _check_ranks(job.proc.pid, truth, rec, steps)
    for t in truth:
        kernel, rows = _counts(rec, t["pid"])
        assert kernel[ALLREDUCE] == rows[ALLREDUCE] == steps, t["rank"]
        assert kernel[PG_WORK] == steps + 3
    report = diagnose([rec])
    assert report["steps"]["detected"] and report["steps"]["method"] == "torch", report["steps"]
    assert report["steps"]["collectives_per_step"] == 1 and report["steps"]["count"] >= steps - 3
    serious = [f for f in report["findings"] if f["severity"] in SERIOUS]
    stragglers = [(f["rank"], f["cause"]) for f in serious if f["kind"] == "straggler"]
    assert stragglers == [(2, "host")], report["findings"]
    assert not [f for f in serious if f.get("rank") not in (2, None)], report["findings"]
