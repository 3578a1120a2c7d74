"""The gpu tier: real CUDA on a real NVIDIA GPU. Skipped, with the reason, where there is none.

On a GPU machine this traces a child process that runs real CUDA runtime calls (the real
libcudart from the wheel) and checks the recorded counts, as the simulator tests do with the
stand-ins.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
CUDART = REPO / "build/real/nvidia/cuda_runtime/lib/libcudart.so.12"


def _gpu_reason() -> str | None:
    if not Path("/dev/nvidia0").exists():
        return "gpu tier: no NVIDIA GPU on this machine (/dev/nvidia0 is absent)"
    if not CUDART.exists():
        return "gpu tier: the real libcudart is not fetched; run `make setup`"
    if os.geteuid() != 0:
        return "gpu tier: needs root (real probes)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _require_gpu():
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)


def test_real_cuda_calls_are_counted_exactly(tmp_path):
    from argus.collect.session import run_session
    from argus.collect.tracer import TraceOptions
    from argus.recording.io import load_recording

    go = tmp_path / "go"
    child = textwrap.dedent(f"""
        import ctypes, os, time
        rt = ctypes.CDLL({str(CUDART)!r})
        n = ctypes.c_int()
        assert rt.cudaGetDeviceCount(ctypes.byref(n)) == 0 and n.value > 0
        ptr = ctypes.c_void_p()
        print("ready", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        for _ in range(7):
            assert rt.cudaMalloc(ctypes.byref(ptr), 1 << 20) == 0
            assert rt.cudaDeviceSynchronize() == 0
            assert rt.cudaFree(ptr) == 0
        print("done", flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        res = run_session([p.pid], tmp_path / "rec", TraceOptions(channels=("cuda",)), 30,
                          on_started=lambda tr: go.touch())
    finally:
        p.wait(30)
    ev = load_recording(res.path).events
    for name in ("cudaMalloc", "cudaDeviceSynchronize", "cudaFree"):
        assert ev.filter(pl.col("name") == name).height == 7, name
