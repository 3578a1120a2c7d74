"""Python frames in the CPU samples of real processes (bpf/cpu_stacks.bpf.c + cpython_walk.py).

A Python process that burns CPU in a named function, under each interpreter on this machine
(pyenv 3.10 / 3.11 / 3.12 / 3.13, each a PIE executable linking libpython3.X.so, and Debian's
non-PIE /usr/bin/python3.11 with libpython linked in statically), is traced by `argus
attach`'s session; most of its on-CPU samples must be charged (argus/analyze/hotspot.py
`attribute`) to that function, with its file and first line. Then a real torchrun DDP (gloo)
job whose rank 1 burns CPU in `slow_rank_compute()` each step (tests/bpf/ddp_train.py).

The target loads the stand-in libcudart so that argus treats it as a training process.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import polars as pl
import pytest
from test_torch_ddp import SCRIPT, Job  # tests/ is on the path (pyproject pythonpath)

from argus.analyze.diagnosis import diagnose
from argus.analyze.hotspot import attribute
from argus.collect.session import run_session
from argus.collect.tracer import TraceOptions
from argus.recording.io import load_recording

pytestmark = pytest.mark.bpf

REPO = Path(__file__).resolve().parents[2]
STUB_CUDART = REPO / "build" / "stubs" / "libcudart.so.12"
PYTHONS = {
    "pyenv-3.10": "/root/.pyenv/versions/3.10.13/bin/python3.10",
    "pyenv-3.11": "/root/.pyenv/versions/3.11.7/bin/python3.11",
    "pyenv-3.12": "/root/.pyenv/versions/3.12.1/bin/python3.12",
    "pyenv-3.13": "/root/.pyenv/versions/3.13.0/bin/python3.13",
    "debian-3.11": "/usr/bin/python3.11",
}
BUSY = '''
import ctypes, sys, time
ctypes.CDLL(sys.argv[1])  # a CUDA runtime: argus traces processes that map one


class Trainer:
    def burn_cpu_in_named_function(self, seconds):
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
        return n


def outer():
    return Trainer().burn_cpu_in_named_function(float(sys.argv[2]))


print("ready", flush=True)
sys.stdin.readline()
outer()
'''


def _line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def trace_command(argv: list[str], out: Path, sample_hz: int) -> tuple[subprocess.Popen, object]:
    """Run argv (it loads the stand-in libcudart, prints ready and waits for go on stdin);
    trace it (cuda + cpu at sample_hz) from its go until it exits. (proc, recording)."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"

        def go(_tracer):
            proc.stdin.write("go\n")
            proc.stdin.flush()

        opts = TraceOptions(channels=("cuda", "cpu"), sample_hz=sample_hz, gpu_interval_s=None)
        result = run_session([proc.pid], out, opts, duration_s=20, on_started=go)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    return proc, load_recording(result.path)


def _trace_python(tmp_path: Path, python: str, name: str, text: str):
    """Run `text` as tmp_path/name under `python` for 3 s, traced at 99 Hz (trace_command)."""
    src = tmp_path / name
    src.write_text(text)
    return trace_command([python, str(src), str(STUB_CUDART), "3"], tmp_path / "rec", 99)


def _shares(stacks: pl.DataFrame, tgid: int, tid: int | None = None) -> tuple[dict, int]:
    """{attributed frame: samples} of the on-CPU samples of tgid (thread tid), and the total."""
    rows = stacks.filter((pl.col("tgid") == tgid) & (pl.col("state") == "on_cpu"))
    if tid is not None:
        rows = rows.filter(pl.col("tid") == tid)
    out: dict[str, int] = {}
    total = 0
    for fns, mods, n in rows.select("functions", "modules", "count").rows():
        total += n
        who = attribute(fns, mods)
        out[who] = out.get(who, 0) + n
    return out, total


@pytest.mark.parametrize("which", list(PYTHONS))
def test_busy_python_function_owns_the_cpu_samples(tmp_path, which):
    python = PYTHONS[which]
    if not Path(python).exists():
        pytest.skip(f"{python} is not on this machine")
    if not STUB_CUDART.exists():
        pytest.skip("build/stubs is missing: run `make setup`")
    proc, rec = _trace_python(tmp_path, python, "busy.py", BUSY)
    src = tmp_path / "busy.py"
    py = rec.manifest["python_stacks"]
    st = py["processes"][str(proc.pid)]
    assert st["status"] == "attached", st
    assert st["python"] == ".".join(which.split("-")[1].split(".")[:2])
    assert st["layout"] == ("_Py_DebugOffsets" if which == "pyenv-3.13" else "table")
    assert py["samples"]["walked"] > 0, py
    # a walk that meets a frame being pushed fails and is counted (the sample keeps its
    # native stack): 1 such walk on a fresh clone with the unit tier running beside
    walked, failed = py["samples"]["walked"], rec.manifest["drops"]["py_walk_failed"]
    assert failed <= max(1, walked // 100), (failed, walked, rec.manifest["drops"])
    shares, total = _shares(rec.stacks, proc.pid, proc.pid)
    assert total >= 100, (total, shares)  # ~3 s at 99 Hz
    qual = "burn_cpu_in_named_function" if which == "pyenv-3.10" else (
        "Trainer.burn_cpu_in_named_function")  # co_qualname from 3.11 on
    first = _line_of(BUSY, "def burn_cpu_in_named_function")
    want = f"{qual} (busy.py:{first})"
    print(f"\n{which}: {want} {shares.get(want, 0)}/{total} = {shares.get(want, 0) / total:.3f}; "
          f"{py['samples']}")
    assert shares.get(want, 0) / total > 0.5, (want, shares)
    # the Python frames are in order, innermost first, with the full path, under the
    # caller, and the native eval frames they replace are gone
    rows = rec.stacks.filter((pl.col("tgid") == proc.pid) & (pl.col("state") == "on_cpu"))
    best = max(rows.rows(named=True), key=lambda r: r["count"])
    py_frames = [(f, m) for f, m in zip(best["functions"], best["modules"], strict=True)
                 if m.startswith("py:")]
    assert py_frames[0] == (qual, f"py:{src}:{first}"), best
    assert py_frames[1] == ("outer", f"py:{src}:{_line_of(BUSY, 'def outer')}")
    assert py_frames[2][0] == "<module>"
    assert "_PyEval_EvalFrameDefault" not in best["functions"]


MANY = """
import ctypes, sys, threading, time
ctypes.CDLL(sys.argv[1])
def parked():
    time.sleep(3600)
for i in range(48):  # more thread states than the BPF search covers (ARGUS_PY_THREADS)
    threading.Thread(target=parked, daemon=True).start()
def main_thread_burns():
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        pass
print("ready", flush=True)
sys.stdin.readline()
main_thread_burns()
"""


def test_main_thread_found_among_many_thread_states(tmp_path):
    """The interpreter lists thread states newest first: with 48 younger threads the main
    thread is beyond the in-kernel search; user space hands its thread state to the kernel."""
    proc, rec = _trace_python(tmp_path, PYTHONS["debian-3.11"], "many.py", MANY)
    shares, total = _shares(rec.stacks, proc.pid, proc.pid)
    want = f"main_thread_burns (many.py:{_line_of(MANY, 'def main_thread_burns')})"
    assert total >= 100 and shares.get(want, 0) / total > 0.5, (want, total, shares)


def test_ddp_rank_burning_cpu_in_python_is_attributed_there(tmp_path):
    """Real torchrun DDP (gloo): rank 1 spends 60 ms of CPU per step in slow_rank_compute()."""
    job = Job(tmp_path, 2, 40, "--slow-rank", "1", "--slow-ms", "60")
    try:
        job.wait_ready()
        opts = TraceOptions(sample_hz=99, gpu_interval_s=None)
        result = run_session([job.proc.pid], tmp_path / "rec", opts, duration_s=120,
                             on_started=lambda _t: job.go.touch())
        truth = job.finish()
    finally:
        job.close()
    rec = load_recording(result.path)
    pids = {t["rank"]: t["pid"] for t in truth}
    py = rec.manifest["python_stacks"]
    for r, pid in pids.items():
        assert py["processes"][str(pid)]["status"] == "attached", (r, py)
    shares, total = _shares(rec.stacks, pids[1], pids[1])
    first = _line_of(SCRIPT.read_text(), "def slow_rank_compute")
    want = f"slow_rank_compute (ddp_train.py:{first})"
    assert total >= 50, (total, shares)
    share = shares.get(want, 0) / total
    print(f"\nddp rank 1: {want} {shares.get(want, 0)}/{total} = {share:.3f}; {py['samples']}")
    assert share > 0.5, (want, total, shares)
    # rank 0 does not run it
    shares0, _ = _shares(rec.stacks, pids[0], pids[0])
    assert shares0.get(want, 0) == 0, shares0
    # the diagnosis names the Python function as the slow rank's CPU hotspot
    report = diagnose([rec])
    hot = [f for f in report["findings"] if f["kind"] == "cpu_hotspot"]
    print([(f["rank"], f["function"], f["share_anomalous"]) for f in hot])
    assert hot and hot[0]["rank"] == 1 and hot[0]["function"] == want, report["findings"]
