"""A CUDA runtime linked statically into another shared object is probed there.

PyTorch's CUDA builds link cudart statically into libtorch_cuda.so: there is no
libcudart.so.12 in the process to probe. This builds a stand-in `libtorch_cuda.so` that
defines cudaLaunchKernel and cudaStreamSynchronize itself, loads it into a child process
that calls them a prime number of times, and checks argus finds and counts them there.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import polars as pl
import pytest

from argus.collect.session import run_session
from argus.collect.tracer import TraceOptions
from argus.recording.io import load_recording

pytestmark = pytest.mark.bpf

SOURCE = r"""
#include <stddef.h>
typedef struct { unsigned x, y, z; } dim3;
__attribute__((noinline)) int cudaLaunchKernel(const void *f, dim3 g, dim3 b, void **a,
                                               size_t shm, void *stream)
{ __asm__ volatile("" ::: "memory"); return 0; }
__attribute__((noinline)) int cudaStreamSynchronize(void *stream)
{ __asm__ volatile("" ::: "memory"); return 0; }
__attribute__((noinline)) void gemm_kernel_stub(void) { __asm__ volatile(""); }
void at_launch(int n) {
    dim3 g = {1, 1, 1};
    for (int i = 0; i < n; i++) cudaLaunchKernel((const void *)gemm_kernel_stub, g, g, 0, 0, 0);
    for (int i = 0; i < n - 4; i++) cudaStreamSynchronize(0);
}
"""


def test_static_cudart_inside_libtorch_cuda(tmp_path):
    so = tmp_path / "libtorch_cuda.so"
    src = tmp_path / "t.c"
    src.write_text(SOURCE)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-fno-omit-frame-pointer",
                    "-fcf-protection=none", "-o", str(so), str(src)], check=True)
    go = tmp_path / "go"
    child = textwrap.dedent(f"""
        import ctypes, os, time
        lib = ctypes.CDLL({str(so)!r})
        print("ready", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        lib.at_launch(17)
        print("done", flush=True)
        time.sleep(30)
    """)
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        done = {}

        def started(tracer):
            go.touch()

        def finished() -> bool:
            if not done:
                line = p.stdout.readline()
                done["line"] = line
            return True

        res = run_session([p.pid], tmp_path / "rec", TraceOptions(channels=("cuda",)), 30,
                          on_started=started, should_stop=finished)
    finally:
        p.kill()
        p.wait()
    assert done["line"].strip() == "done"
    rec = load_recording(res.path)
    probes = {(pr["symbol"], pr["library"]): pr for pr in rec.manifest["probes"]}
    assert probes[("cudaLaunchKernel", str(so))]["status"] == "attached"
    counts = rec.manifest["call_counts"][str(p.pid)]
    assert counts["cudaLaunchKernel"] == 17
    assert counts["cudaStreamSynchronize"] == 13
    launches = rec.events.filter(pl.col("name") == "cudaLaunchKernel")
    assert launches.height == 17
    assert launches["kernel"].unique().to_list() == ["gemm_kernel_stub"]
