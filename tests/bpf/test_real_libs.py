"""argus attach on a process calling the REAL libcudart.so.12 and libnccl.so.2 (PyPI wheels).

No GPU here: the CUDA runtime calls return cudaErrorInsufficientDriver (35) and NCCL calls on
a NULL communicator return ncclInvalidArgument (4), but the functions are entered and return,
so the probes fire. The child calls each probed symbol a distinct PRIME number of times
after argus has attached (a warm-up call of each before attach must not be counted), and the
recording must hold exactly those counts, both as ring-buffer events and as the in-kernel
call_counts. Also checks the probe placement recorded in the manifest on these real files.

Measured on nvidia-cuda-runtime-cu12 12.4.127 / nvidia-nccl-cu12 2.18.3: every probed symbol
starts with an instruction the kernel emulates (no endbr64): the cudart API entry points
with `55 48 89 e5` (push %rbp; mov %rsp,%rbp), ncclAllReduce with `41 57` (push %r15),
ncclSend/ncclRecv with `55` (push %rbp); only ncclCommInitAll starts with a movabs
(`48 b8`, single-stepped).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from argus.collect.session import run_session
from argus.collect.tracer import TraceOptions
from argus.recording.io import load_recording

pytestmark = pytest.mark.bpf

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "build" / "real" / "nvidia"
LIBCUDART = REAL / "cuda_runtime" / "lib" / "libcudart.so.12"
LIBNCCL = REAL / "nccl" / "lib" / "libnccl.so.2"

# symbol -> calls made after attach (distinct primes: a call counted under the wrong probe,
# or counted twice, cannot add up to the right number by accident).
CUDART_CALLS = {
    "cudaLaunchKernel": 13,
    "cudaLaunchKernel_ptsz": 2,
    "cudaStreamSynchronize": 7,
    "cudaStreamSynchronize_ptsz": 17,
    "cudaMemcpy": 5,
    "cudaEventQuery": 3,
    "cudaMalloc": 19,
    "cudaFree": 23,
    "cudaDeviceSynchronize": 29,
    "cudaEventRecord": 31,
}
NCCL_CALLS = {
    "ncclGroupStart": 11,
    "ncclGroupEnd": 11,
    "ncclAllReduce": 37,
    "ncclSend": 41,
    "ncclCommDestroy": 43,
}
# Return values without a GPU (checked by the child, reported in its output).
EXPECTED_RET = {
    **{s: 35 for s in CUDART_CALLS},
    "ncclGroupStart": 0,
    "ncclGroupEnd": 0,
    "ncclAllReduce": 4,
    "ncclSend": 4,
    "ncclCommDestroy": 0,
}
# Probes with a return probe (exit = true in cuda_probes/*.toml) among those called.
EXIT_PROBES = {
    "cudaStreamSynchronize", "cudaStreamSynchronize_ptsz", "cudaMemcpy", "cudaEventQuery",
    "cudaMalloc", "cudaDeviceSynchronize", "ncclGroupEnd", "ncclAllReduce", "ncclSend",
    "ncclCommDestroy",
}
SPIN_FUNCTION = "spin_after_calls"

CHILD = r"""
import ctypes as ct, json, os, sys, time

cudart = ct.CDLL(sys.argv[1])
nccl = ct.CDLL(sys.argv[2])
go, plan = sys.argv[3], json.loads(sys.argv[4])
spin_s = float(sys.argv[5])


class dim3(ct.Structure):
    _fields_ = [("x", ct.c_uint), ("y", ct.c_uint), ("z", ct.c_uint)]


buf = ct.create_string_buffer(256)
ptr = ct.c_void_p()
VP, SZ, INT = ct.c_void_p, ct.c_size_t, ct.c_int
for name in ("cudaLaunchKernel", "cudaLaunchKernel_ptsz"):
    getattr(cudart, name).argtypes = [VP, dim3, dim3, VP, SZ, VP]
cudart.cudaMemcpy.argtypes = [VP, VP, SZ, INT]
cudart.cudaMalloc.argtypes = [VP, SZ]
nccl.ncclAllReduce.argtypes = [VP, VP, SZ, INT, INT, VP, VP]
nccl.ncclSend.argtypes = [VP, SZ, INT, INT, VP, VP]
G, B = dim3(1, 1, 1), dim3(32, 1, 1)
CALLS = {
    "cudaLaunchKernel": lambda: cudart.cudaLaunchKernel(0x1234, G, B, None, 0, None),
    "cudaLaunchKernel_ptsz": lambda: cudart.cudaLaunchKernel_ptsz(0x1234, G, B, None, 0, None),
    "cudaStreamSynchronize": lambda: cudart.cudaStreamSynchronize(None),
    "cudaStreamSynchronize_ptsz": lambda: cudart.cudaStreamSynchronize_ptsz(None),
    "cudaMemcpy": lambda: cudart.cudaMemcpy(buf, buf, 128, 2),  # device -> host
    "cudaEventQuery": lambda: cudart.cudaEventQuery(None),
    "cudaMalloc": lambda: cudart.cudaMalloc(ct.byref(ptr), 4096),
    "cudaFree": lambda: cudart.cudaFree(None),
    "cudaDeviceSynchronize": lambda: cudart.cudaDeviceSynchronize(),
    "cudaEventRecord": lambda: cudart.cudaEventRecord(None, None),
    "ncclGroupStart": lambda: nccl.ncclGroupStart(),
    "ncclGroupEnd": lambda: nccl.ncclGroupEnd(),
    "ncclAllReduce": lambda: nccl.ncclAllReduce(buf, buf, 16, 7, 0, None, None),  # float32 sum
    "ncclSend": lambda: nccl.ncclSend(buf, 16, 7, 1, None, None),
    "ncclCommDestroy": lambda: nccl.ncclCommDestroy(None),
}
# Warm-up before attach (one-time library init happens here): never counted.
rets = {name: fn() for name, fn in CALLS.items()}
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
for name, n in plan.items():
    for _ in range(n):
        rc = CALLS[name]()
        if rc != rets[name]:
            rets[name] = ("changed", rets[name], rc)


def spin_after_calls(seconds):
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1
    return x


spin_after_calls(spin_s)
print("done " + json.dumps(rets), flush=True)
sys.stdin.read()  # wait until the test closes stdin
"""


def _require_real_libs() -> None:
    missing = [str(p) for p in (LIBCUDART, LIBNCCL) if not p.is_file()]
    if missing:
        pytest.skip(
            f"real CUDA/NCCL libraries absent ({', '.join(missing)}): run `make setup` "
            "(scripts/setup.sh fetches nvidia-cuda-runtime-cu12==12.4.127 and "
            "nvidia-nccl-cu12==2.18.3)"
        )


def _trace_child(tmp: Path, opts: TraceOptions, spin_s: float):
    """Start the child, attach to it, release it, stop when it says done; the recording."""
    import json

    go = tmp / "go"
    plan = {**CUDART_CALLS, **NCCL_CALLS}
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "RANK": "5", "LOCAL_RANK": "1",
           "WORLD_SIZE": "8"}
    argv = [sys.executable, "-c", CHILD, str(LIBCUDART), str(LIBNCCL), str(go), json.dumps(plan),
            str(spin_s)]
    child = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    lines: list[str] = []
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
        reader.start()
        t0 = time.monotonic()
        timing: dict[str, float] = {}

        def started(tracer):
            timing["attach_s"] = time.monotonic() - t0
            go.touch()

        result = run_session(
            [child.pid], tmp / "rec", opts, duration_s=120, on_started=started,
            should_stop=lambda: any(ln.startswith("done") for ln in lines),
        )
        assert result.manifest["end_reason"] == "requested"
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    (done,) = [ln for ln in lines if ln.startswith("done")]
    rets = json.loads(done.split(" ", 1)[1])
    return child.pid, rets, timing, load_recording(result.path)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    _require_real_libs()
    return _trace_child(tmp_path_factory.mktemp("real"), TraceOptions(), spin_s=0.5)


@pytest.fixture(scope="module")
def traced_no_cpu(tmp_path_factory):
    _require_real_libs()
    opts = TraceOptions(channels=("cuda", "nccl", "torch"))
    return _trace_child(tmp_path_factory.mktemp("real_nocpu"), opts, spin_s=0.5)


def expected_counts() -> dict[str, int]:
    """What the probes must count: the calls made, plus NCCL's own nested group calls."""
    expected = {**CUDART_CALLS, **NCCL_CALLS}
    # NCCL 2.18.3's ncclSend/ncclRecv wrap themselves in the exported ncclGroupStart() and
    # ncclGroupEnd() (collectives do not): the probes see one nested pair per send.
    expected["ncclGroupStart"] += NCCL_CALLS["ncclSend"]
    expected["ncclGroupEnd"] += NCCL_CALLS["ncclSend"]
    return expected


def _check_exact_counts(pid: int, rec) -> None:
    assert not any(rec.manifest["drops"].values()), rec.manifest["drops"]
    expected = expected_counts()
    kernel_counts = rec.manifest["call_counts"][str(pid)]
    calls = rec.events.filter((pl.col("tgid") == pid) & (pl.col("channel") != "proc"))
    row_counts = {str(k): v for k, v in calls.group_by("name").len().iter_rows()}
    # Exactly the calls made after attach, nothing for symbols never called.
    assert kernel_counts == expected
    assert row_counts == expected
    assert calls.filter(pl.col("in_flight")).height == 0


def test_child_calls_returned_what_no_gpu_returns(traced):
    pid, rets, timing, rec = traced
    assert rets == EXPECTED_RET


def test_exact_counts_per_real_symbol(traced):
    pid, rets, timing, rec = traced
    _check_exact_counts(pid, rec)
    (rank,) = rec.manifest["ranks"]
    assert (rank["tgid"], rank["rank"], rank["local_rank"], rank["world_size"]) == (pid, 5, 1, 8)
    libs = {lib["name"]: lib for lib in rank["libraries"]}
    assert {"libcudart", "libnccl"} <= set(libs)


def test_group_calls_nested_in_ncclsend(traced):
    pid, rets, timing, rec = traced
    calls = rec.events.filter(pl.col("tgid") == pid)
    sends = calls.filter(pl.col("name") == "ncclSend").sort("ts_ns")
    groups = calls.filter(pl.col("name").is_in(["ncclGroupStart", "ncclGroupEnd"]))
    inside = 0
    for ts, dur in sends.select("ts_ns", "dur_ns").iter_rows():
        nested = groups.filter((pl.col("ts_ns") > ts) & (pl.col("ts_ns") < ts + dur)).sort("ts_ns")
        n = nested.height
        # One ncclGroupStart then one ncclGroupEnd inside every send; the end returns the
        # send's error (ncclInvalidArgument: NULL communicator).
        assert nested["name"].to_list() == ["ncclGroupStart", "ncclGroupEnd"]
        assert nested["ret"].to_list() == [None, 4]
        inside += n
    assert inside == 2 * NCCL_CALLS["ncclSend"]
    # The ones the child called itself are outside any send.
    assert groups.height - inside == 2 * NCCL_CALLS["ncclGroupStart"]
    outer_ends = groups.filter(pl.col("name") == "ncclGroupEnd")["ret"].value_counts()
    want = {0: NCCL_CALLS["ncclGroupEnd"], 4: NCCL_CALLS["ncclSend"]}
    assert dict(outer_ends.iter_rows()) == want


def test_durations_and_return_values_of_exit_probes(traced):
    pid, rets, timing, rec = traced
    calls = rec.events.filter((pl.col("tgid") == pid) & (pl.col("channel") != "proc"))
    for name in EXIT_PROBES:
        rows = calls.filter(pl.col("name") == name)
        assert rows["dur_ns"].null_count() == 0, name
        assert rows["dur_ns"].min() > 0, name
        assert rows["dur_ns"].max() < 10**9, name  # error returns: far below a second
        # ncclGroupEnd nested in a failing ncclSend returns the send's error (4).
        want = {0, 4} if name == "ncclGroupEnd" else {EXPECTED_RET[name]}
        assert set(rows["ret"].to_list()) == want, name
    for name in set(CUDART_CALLS) | set(NCCL_CALLS):
        if name not in EXIT_PROBES:
            rows = calls.filter(pl.col("name") == name)
            assert rows["dur_ns"].null_count() == rows.height, name  # entry-only: no duration


def test_arguments_read_from_real_calls(traced):
    pid, rets, timing, rec = traced
    calls = rec.events.filter(pl.col("tgid") == pid)
    memcpy = calls.filter(pl.col("name") == "cudaMemcpy")
    assert set(memcpy["bytes"].to_list()) == {128} and set(memcpy["memcpy_kind"].to_list()) == {2}
    ar = calls.filter(pl.col("name") == "ncclAllReduce").sort("ts_ns")
    assert set(ar["count"].to_list()) == {16}
    assert set(ar["dtype"].to_list()) == {"float32"} and set(ar["bytes"].to_list()) == {64}
    assert set(ar["redop"].to_list()) == {"sum"}
    # Every call on the NULL communicator: one per-communicator sequence 0..n-1.
    assert ar["seq"].to_list() == list(range(NCCL_CALLS["ncclAllReduce"]))
    assert ar["comm"].n_unique() == 1
    send = calls.filter(pl.col("name") == "ncclSend").sort("ts_ns")
    assert set(send["peer"].to_list()) == {1}
    assert send["seq"].to_list() == list(range(NCCL_CALLS["ncclSend"]))
    malloc = calls.filter(pl.col("name") == "cudaMalloc")
    assert set(malloc["bytes"].to_list()) == {4096}


def test_manifest_lists_probes_placed_on_the_real_files(traced):
    pid, rets, timing, rec = traced
    probes = {p["symbol"]: p for p in rec.manifest["probes"]}
    for name in {**CUDART_CALLS, **NCCL_CALLS}:
        p = probes[name]
        assert p["status"] == "attached", (name, p)
        assert p["tgids"] == [pid]
        lib = LIBCUDART if name.startswith("cuda") else LIBNCCL
        assert Path(p["library"]).resolve() == lib.resolve()
        # No endbr64 in these builds: the probe sits on the first instruction, emulated.
        assert p["placement"]["skipped"] == 0, name
        assert p["placement"]["emulated"] is True, name
        assert p["reason"] == ""
    assert probes["ncclAllReduce"]["placement"]["first_insn"].startswith("4157")  # push %r15
    assert probes["ncclSend"]["placement"]["first_insn"].startswith("55")  # push %rbp
    for name in CUDART_CALLS:
        # push %rbp; mov %rsp,%rbp
        assert probes[name]["placement"]["first_insn"] == "554889e5", name
    # Present but not called: attached all the same, counted zero.
    assert probes["ncclCommInitRank"]["status"] == "attached"
    # The one probed symbol whose first instruction is single-stepped (movabs): said so.
    init_all = probes["ncclCommInitAll"]
    assert init_all["status"] == "attached"
    assert init_all["placement"]["emulated"] is False
    assert init_all["placement"]["first_insn"].startswith("48b8")
    assert "single-stepped" in init_all["reason"]
    # Absent from NCCL 2.18.3 (added in 2.23): reported as missing, not fatal.
    assert probes["ncclCommInitRankScalable"]["status"] == "missing"
    assert probes["ncclCommInitRankScalable"]["reason"] == "symbol not in this library"


def test_attach_is_quick_enough(traced):
    pid, rets, timing, rec = traced
    # Compiling the BPF programs and placing ~50 uprobes on the real files, on a noisy
    # 2-core box: a generous bound that still catches e.g. scanning all of the 290 MB libnccl.
    assert timing["attach_s"] < 60, timing


def test_cpu_channel_samples_the_child(traced):
    pid, rets, timing, rec = traced
    assert rec.manifest["channels"]["cpu"] is True and rec.manifest["sample_hz"] > 0
    # 0.5 s of CPU in the child at 49 Hz: ~25 samples; at least a few on a busy box.
    assert rec.stacks.filter(pl.col("tgid") == pid)["count"].sum() >= 3


def test_cpu_channel_switched_off(traced_no_cpu):
    pid, rets, timing, rec = traced_no_cpu
    assert rets == EXPECTED_RET
    channels = rec.manifest["channels"]
    assert {c: channels[c] for c in ("cuda", "nccl", "torch", "cpu")} == {
        "cuda": True, "nccl": True, "torch": True, "cpu": False,
    }
    assert rec.manifest["sample_hz"] == 0
    assert rec.stacks.height == 0 and rec.manifest["counts"]["stack_samples"] == 0
    _check_exact_counts(pid, rec)  # the call channels do not depend on it
