"""Helpers for the simulator tests: build the stand-ins once, run jobs, ctypes snippets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("ARGUS_BUILD_DIR", REPO / "build"))
SIMULATE = REPO / "scripts" / "simulate"

CUDART_REQUIRED = """cudaLaunchKernel cudaLaunchKernelExC cudaLaunchKernel_ptsz
cudaLaunchKernelExC_ptsz cudaGraphLaunch cudaMemcpy cudaMemcpyAsync cudaMemcpyAsync_ptsz
cudaStreamSynchronize
cudaStreamSynchronize_ptsz cudaDeviceSynchronize cudaEventRecord cudaEventSynchronize
cudaEventQuery cudaStreamWaitEvent cudaMalloc cudaFree cudaSetDevice cudaGetDevice
cudaGetDeviceCount cudaStreamCreate cudaStreamCreateWithFlags cudaEventCreate
cudaEventCreateWithFlags cudaGetErrorString cudaGetLastError cudaRuntimeGetVersion
cudaDriverGetVersion""".split()
NCCL_REQUIRED = """ncclGetVersion ncclGetUniqueId ncclCommInitRank ncclCommInitRankConfig
ncclCommInitAll ncclCommSplit ncclCommDestroy ncclCommAbort ncclCommCount ncclCommUserRank
ncclCommCuDevice ncclCommGetAsyncError ncclGetErrorString ncclAllReduce ncclAllGather
ncclReduceScatter ncclBroadcast ncclReduce ncclSend ncclRecv ncclGroupStart
ncclGroupEnd""".split()


def build_standins() -> Path:
    """`make -C cuda_probes/standins` (quick when up to date); returns the build dir."""
    subprocess.run(["make", "-s", "-C", str(REPO / "cuda_probes" / "standins"),
                    f"BUILD={BUILD}"], check=True, capture_output=True)
    return BUILD


def simulate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SIMULATE), "-q", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ,
                                                           "ARGUS_BUILD_DIR": str(BUILD)})


def run_job(tmp_path: Path, *args: str, timeout: float = 60) -> tuple[int, dict]:
    truth = tmp_path / f"truth-{len(list(tmp_path.iterdir()))}.json"
    p = simulate("--truth", str(truth), *args, timeout=timeout)
    assert truth.exists(), p.stderr
    return p.returncode, json.loads(truth.read_text())


CTYPES_PRELUDE = textwrap.dedent("""
    import ctypes, json, os, sys, time
    B = sys.argv[1]
    class dim3(ctypes.Structure):
        _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]
    rt = ctypes.CDLL(os.path.join(B, "stubs", "libcudart.so.12"))
    nccl = ctypes.CDLL(os.path.join(B, "stubs", "libnccl.so.2"))
    rt.cudaLaunchKernel.argtypes = [ctypes.c_void_p, dim3, dim3, ctypes.c_void_p,
                                    ctypes.c_size_t, ctypes.c_void_p]
    KFN = ctypes.cast(rt.cudaGetLastError, ctypes.c_void_p)  # any non-null "kernel"
    def launch(stream, ms):
        threads = int(ms * 1e6)
        assert rt.cudaLaunchKernel(KFN, dim3(threads // 1000, 1, 1), dim3(1000, 1, 1),
                                   None, 0, stream) == 0
    def stream():
        s = ctypes.c_void_p()
        assert rt.cudaStreamCreate(ctypes.byref(s)) == 0
        return s
""")


def run_snippet(code: str, env: dict | None = None, timeout: float = 30) -> dict:
    """Run CTYPES_PRELUDE + code in a fresh python; the code prints one JSON line."""
    p = subprocess.run([sys.executable, "-c", CTYPES_PRELUDE + textwrap.dedent(code),
                        str(BUILD)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])
