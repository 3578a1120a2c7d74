"""argus attach on the simulated job: recorded counts equal the simulator's truth, exactly."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from argus.collect import procfs
from argus.collect import tracer as tracer_mod
from argus.collect.session import run_session
from argus.collect.tracer import TraceOptions
from argus.recording.io import load_recording
from argus.recording.schema import MANIFEST_KEYS
from argus.sim.launcher import SimConfig, start_job

pytestmark = pytest.mark.bpf

REPO = Path(__file__).resolve().parents[2]
STUB_KERNELS = {
    "embedding_fwd_kernel", "layernorm_fwd_kernel", "flash_attn_fwd_kernel", "cross_entropy_kernel",
    "softmax_bwd_kernel", "gelu_bwd_kernel", "matmul_bwd_kernel", "grad_norm_kernel",
    "fused_adam_kernel",
}


def _trace_job(tmp_path: Path, cfg: SimConfig, opts: TraceOptions | None = None):
    """Start the job waiting for its go file, attach to the launcher, release, record."""
    go = tmp_path / "go"
    cfg.wait_go = str(go)
    cfg.truth = str(tmp_path / "truth.json")
    job = start_job(cfg)
    try:
        ranks = job.wait_ready()
        result = run_session(
            [job.launcher_pid],
            tmp_path / "rec",
            opts or TraceOptions(),
            duration_s=60,
            on_started=lambda tracer: go.touch(),
        )
        assert job.wait(timeout=30) == 0
    finally:
        if job.proc.poll() is None:
            job.terminate()
    truth = json.loads(Path(cfg.truth).read_text())
    return ranks, truth, result, load_recording(result.path)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    # 3 ranks x 7 steps: prime counts make off-by-a-multiple errors visible. Rank 1 spends
    # 400 ms CPU-busy in jit_compile_graph() in step 3: ~20 samples at 49 Hz.
    return _trace_job(tmp, SimConfig(ranks=3, steps=7, faults=["jit_stall:rank=1,ms=400,start=3"]))


def test_every_rank_is_identified(traced):
    ranks, truth, result, rec = traced
    by_tgid = {r["tgid"]: r for r in rec.manifest["ranks"]}
    assert sorted(by_tgid) == sorted(ranks)
    for r in truth["ranks"]:
        assert by_tgid[r["tgid"]]["rank"] == r["rank"]
        assert by_tgid[r["tgid"]]["local_rank"] == r["local_rank"]
        assert by_tgid[r["tgid"]]["world_size"] == 3
        libs = {lib["name"] for lib in by_tgid[r["tgid"]]["libraries"]}
        assert {"libcudart", "libnccl", "libcuda"} <= libs
    assert rec.manifest["end_reason"] == "targets_exited"
    assert rec.manifest["host"] == socket.gethostname()  # the hostname, nothing else
    assert set(MANIFEST_KEYS) <= set(rec.manifest)


def test_recorded_counts_equal_truth_for_every_probed_symbol(traced):
    ranks, truth, result, rec = traced
    # no call lost; a sampled stack walk may fail when a rank exits mid-sample (the sample
    # is kept, without that stack): counted, and rare
    drops = rec.manifest["drops"]
    walks = ("stack_user_walk", "stack_kernel_walk", "py_walk_failed")
    assert {k: v for k, v in drops.items() if v and k not in walks} == {}, drops
    samples = rec.manifest["counts"]["stack_samples"]
    assert sum(drops[k] for k in walks) <= max(2, samples // 100), (drops, samples)
    attached = {p["name"] for p in rec.manifest["probes"] if p["status"] == "attached"}
    # Every probe the stand-ins export must have attached (the _ptsz variants included).
    for must in ("cudaLaunchKernel", "cudaLaunchKernel_ptsz", "cudaMemcpy", "cudaStreamSynchronize",
                 "ncclAllReduce", "ncclCommInitRank", "ncclGroupEnd", "cuLaunchKernel",
                 "cuModuleGetFunction", "cudaLaunchKernelExC", "cudaGraphLaunch"):
        assert must in attached, must
    ev = rec.events.filter(pl.col("channel") != "proc")
    checked = 0
    for r in truth["ranks"]:
        lib_calls = {sym: n for calls in r["library_calls"].values() for sym, n in calls.items()}
        kernel_counts = rec.manifest["call_counts"][str(r["tgid"])]
        rows = ev.filter(pl.col("tgid") == r["tgid"]).group_by("name").len()
        row_counts = {str(k): v for k, v in rows.iter_rows()}
        for name in attached:
            expected = lib_calls.get(name, 0)
            assert kernel_counts.get(name, 0) == expected, (r["rank"], name)
            assert row_counts.get(name, 0) == expected, (r["rank"], name)
            checked += expected
    assert checked > 3 * 7 * 100  # launches dominate: thousands of exact matches


def test_collective_sequence_numbers_agree_across_ranks(traced):
    ranks, truth, result, rec = traced
    ar = rec.events.filter(pl.col("name") == "ncclAllReduce")
    comms = ar["comm"].unique().to_list()
    assert len(comms) == 1 and comms[0] is not None and not comms[0].startswith("anon")
    per_rank = {r: g.sort("ts_ns") for (r,), g in ar.group_by("rank")}
    assert sorted(per_rank) == [0, 1, 2]
    n = truth["ranks"][0]["library_calls"]["libnccl.so.2"]["ncclAllReduce"]
    for g in per_rank.values():
        assert g["seq"].to_list() == list(range(1, n + 1)) or g["seq"].to_list() == list(range(n))
        assert g["comm_rank"].to_list() == [g["rank"][0]] * n
        assert set(g["comm_nranks"].to_list()) == {3}
        assert g["dur_ns"].null_count() == 0 and g["count"].min() > 0
    # The k-th allreduce is the same operation on every rank (same element count).
    counts = [g["count"].to_list() for g in per_rank.values()]
    assert counts[0] == counts[1] == counts[2]


def test_kernel_names_resolved_from_launch_addresses(traced):
    ranks, truth, result, rec = traced
    launches = rec.events.filter(pl.col("name") == "cudaLaunchKernel")
    assert launches["kernel"].null_count() == 0
    assert set(launches["kernel"].unique().to_list()) <= STUB_KERNELS
    assert {"flash_attn_fwd_kernel", "fused_adam_kernel"} <= set(launches["kernel"].to_list())
    driver = rec.events.filter(pl.col("name") == "cuLaunchKernel")
    assert driver.height > 0 and driver["kernel"].null_count() == 0


def test_syncs_have_durations(traced):
    ranks, truth, result, rec = traced
    reads = rec.events.filter((pl.col("name") == "cudaMemcpy") & (pl.col("memcpy_kind") == 2))
    assert reads.height == 2 * 3 * 7  # two loss read-backs per step (after forward, at the end)
    assert reads["dur_ns"].min() > 0


def test_cpu_stacks_name_the_busy_function_on_its_rank(traced):
    ranks, truth, result, rec = traced
    st = rec.stacks.with_columns(
        jit=pl.col("functions").list.contains("jit_compile_graph")
    )
    jit = st.filter(pl.col("jit"))
    assert jit["rank"].unique().to_list() == [1]
    # 400 ms of wall time CPU-busy is ~20 samples at 49 Hz on an idle core; on a loaded 2-core
    # box the rank is on-CPU for only part of it: samples only come while it runs.
    assert jit["count"].sum() >= 3
    # The sampled stacks walk down through the named functions of the rank program. (A
    # sample taken inside the vDSO's clock_gettime, which keeps no frame pointer, loses its
    # caller cpu_busy: check the order on the frames every sample has.)
    for frames in jit["functions"].to_list():
        assert frames.index("jit_compile_graph") < frames.index("main")
    assert any("cpu_busy" in f for f in jit["functions"].to_list())


def test_ranks_started_after_attach_are_traced(tmp_path):
    """Attach to a shell that execs the launcher only once argus is attached: the launcher
    and its ranks start after attach, are followed through fork/exec in the kernel, and
    (held at their --wait-go file until argus has traced both) are recorded from their
    first call: counts equal the truth exactly, communicators are named from their init."""
    started, release = tmp_path / "started", tmp_path / "release"
    forked, truth = tmp_path / "forked", tmp_path / "truth.json"
    # The shell holds one child for as long as it waits (argus attaches to a process only if
    # it maps a probed library or has children; between two short sleeps it has none).
    cmd = (f"sleep 600 & : > {forked}; while [ ! -e {started} ]; do sleep 0.02; done; "
           f"kill $!; wait $!; exec {sys.executable} "
           f"{REPO / 'scripts' / 'simulate'} -q --ranks 2 --steps 11 --truth {truth} "
           f"--wait-go {release}")
    shell = subprocess.Popen(["sh", "-c", cmd])
    deadline = time.monotonic() + 30
    while not forked.exists() and time.monotonic() < deadline and shell.poll() is None:
        time.sleep(0.01)
    assert forked.exists(), "the shell did not start its child"
    tracers = []

    def ranks_traced() -> bool:
        traced = [t for t in tracers[0].targets.values() if t.traced and t.rank is not None]
        if len(traced) == 2 and not release.exists():
            release.touch()
        return False

    try:
        result = run_session(
            [shell.pid], tmp_path / "rec", TraceOptions(channels=("cuda", "nccl")), 60,
            on_started=lambda tracer: (tracers.append(tracer), started.touch()),
            should_stop=ranks_traced,
        )
        assert shell.wait(timeout=30) == 0
    finally:
        if shell.poll() is None:
            shell.kill()
    rec = load_recording(result.path)
    t = json.loads(truth.read_text())
    assert sorted(r["rank"] for r in rec.manifest["ranks"]) == [0, 1]
    assert shell.pid in rec.manifest["launchers"]  # the shell became the launcher by exec
    for r in t["ranks"]:
        calls = {s: n for lib in r["library_calls"].values() for s, n in lib.items()}
        kernel = rec.manifest["call_counts"][str(r["tgid"])]
        for name in ("ncclCommInitRank", "ncclCommInitRankConfig", "ncclAllReduce",
                     "cudaLaunchKernel", "cudaMemcpy", "cudaSetDevice"):
            assert kernel.get(name, 0) == calls[name], (r["rank"], name)
        got = rec.events.filter(
            (pl.col("tgid") == r["tgid"]) & pl.col("name").is_in(["ncclBroadcast", "ncclAllReduce"])
        )
        assert got.height == calls["ncclAllReduce"] + calls["ncclBroadcast"]
        # Every collective on the communicator, from the first: the init broadcast is seq 0.
        assert got.sort("ts_ns")["seq"].to_list() == list(range(got.height))
        assert got["comm"].unique().to_list() == [got["comm"][0]]
        assert not got["comm"][0].startswith("anon")  # named from the ncclUniqueId at init


def test_a_library_dlopened_after_attach_is_probed_and_unchanged_maps_are_not_reread(
        tmp_path, monkeypatch):
    """A process under a watched launcher dlopen()s libcudart once argus has stopped
    treating it as just started: the periodic check (the size of its executable mappings)
    sees the load and probes it; the maps backstop is pushed out of reach, the process calls
    cudaSetDevice 37 times once probed, exactly 37 are recorded; and no check reread its
    /proc/PID/maps while nothing had been loaded (every read of them found a change)."""
    monkeypatch.setattr(tracer_mod, "MAPS_BACKSTOP_S", 3600.0)
    reads = {"unchanged": 0, "changed": 0}
    real_scan = tracer_mod.Tracer._scan

    def scan(self, t, code=None):
        before = t.maps_text
        real_scan(self, t, code)
        if t.tgid == child_pid.get("pid") and t.tgid not in self._hot and before is not None:
            reads["unchanged" if t.maps_text == before else "changed"] += 1

    monkeypatch.setattr(tracer_mod.Tracer, "_scan", scan)
    checks = {"n": 0}
    real_code = procfs.mapped_code

    def mapped_code(tgid, proc_root="/proc"):
        if tgid == child_pid.get("pid"):
            checks["n"] += 1
        return real_code(tgid, proc_root)

    monkeypatch.setattr(procfs, "mapped_code", mapped_code)
    go, release = tmp_path / "go", tmp_path / "release"
    lib = REPO / "build" / "stubs" / "libcudart.so.12"
    child = (
        "import ctypes, os, time\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        f"cudart = ctypes.CDLL({str(lib)!r})\n"
        f"while not os.path.exists({str(release)!r}): time.sleep(0.01)\n"
        "for _ in range(37): cudart.cudaSetDevice(0)\n"
    )
    shell = subprocess.Popen(["sh", "-c", f"{sys.executable} -c \"$CHILD\"; true"],
                             env={"CHILD": child, "PATH": "/usr/bin:/bin"})
    tracers: list = []
    child_pid: dict = {}

    def step() -> bool:
        tr = tracers[0]
        kids = [t for t in tr.targets.values() if t.tgid != shell.pid]
        if kids and not go.exists() and kids[0].tgid not in tr._hot and checks["n"] >= 2:
            go.touch()  # cooled down, checked twice with nothing new: now load the library
        if kids and not release.exists() and any(
                a.uprobes for p, a in kids[0].attached.items() if "libcudart" in p):
            release.touch()  # probed: now call it
        return False

    def started(tracer):
        tracers.append(tracer)
        kids = [t for t in tracer.targets.values() if t.tgid != shell.pid]
        child_pid["pid"] = kids[0].tgid if kids else None

    try:
        deadline = time.monotonic() + 30
        while not procfs.children(shell.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        result = run_session([shell.pid], tmp_path / "rec", TraceOptions(channels=("cuda",)),
                             60, on_started=started, should_stop=step)
        assert shell.wait(timeout=30) == 0
    finally:
        if shell.poll() is None:
            shell.kill()
    assert go.exists() and release.exists()
    rec = load_recording(result.path)
    (rank,) = rec.manifest["ranks"]
    assert rank["tgid"] == child_pid["pid"]
    assert any("libcudart" in x["path"] for x in rank["libraries"])
    assert rec.manifest["call_counts"][str(rank["tgid"])]["cudaSetDevice"] == 37
    assert rec.manifest["end_reason"] == "targets_exited"
    assert reads["unchanged"] == 0 and reads["changed"] >= 1, reads
    assert checks["n"] >= 3, checks
