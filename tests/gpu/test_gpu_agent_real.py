"""The gpu tier: argus's GPU agent in a real PyTorch NCCL job, checked against torch.profiler.

A small job (tests/gpu/agent_job.py: 1 rank per GPU, 2 ranks where there are 2 GPUs) is
started with the variables of `argus gpu-env` (NCCL_PROFILER_PLUGIN, CUDA_INJECTION64_PATH)
and ARGUS_GPU_CUPTI naming the real libcupti the job's torch uses. After its warm-up the
test opens every rank's ring (GpuAgentRing), enables it and waits for the acknowledgement,
then lets the job run STEPS steps under torch.profiler (CUDA activities) in the same
process. Then it disables the agent (which flushes CUPTI) and reads the rings.

Checks, per rank:
- kernels: the agent's CUPTI kernel records are exactly the kernels in torch.profiler's
  trace of the same steps (same count, same names truncated to the agent's 31 bytes) and
  each kernel's duration agrees within 1 us (both come from CUPTI's start/end of the same
  kernel; Kineto writes microseconds, older versions rounded to whole microseconds, so
  1 us is its rounding, not a measurement error);
- collectives (2 GPUs): the NCCL profiler records carry exactly one coll_seq per all_reduce
  call of the measured steps, consecutive, with op AllReduce and the call's bytes, at least
  one channel each, the same communicator hash and sequence numbers on both ranks; and
  CUPTI and torch.profiler each saw exactly one NCCL kernel per call.

Skips, each with the reason and what to do: no GPU, a torch without CUDA, no real
libcupti, the agent not built, another CUPTI tool already injected, NCCL too old for the
profiler plugin API the agent speaks (v4/v5: NCCL 2.26+), one GPU only (the collective
test), and a second CUPTI subscriber winning CUPTI's activity buffers (torch.profiler's
Kineto and the agent both use CUPTI's activity API; where only one of them receives the
records the comparison cannot be made, and the skip says which one got them).

Run it on a GPU machine:  ARGUS_GPU_PYTHON=/path/to/venv-with-cuda-torch/bin/python \
    .venv/bin/python -m pytest -m gpu tests/gpu/test_gpu_agent_real.py -rs
"""

from __future__ import annotations

import collections
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from argus.collect.gpu_agent import (
    ACTIVE_CUPTI,
    ACTIVE_NCCL,
    LOADED_CUPTI,
    LOADED_NCCL,
    GpuAgentRing,
    gpu_env,
)

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "build" / "agent" / "libargus_gpu_agent.so"
REAL_CUPTI = REPO / "build" / "real" / "nvidia" / "cuda_cupti" / "lib" / "libcupti.so.12"
JOB = Path(__file__).with_name("agent_job.py")
STEPS = 13
NAME_BYTES = 31  # the agent keeps this much of a kernel name
DUR_TOL_NS = 1000  # see the module doc
PROBE = """
import json, sys
out = {"exe": sys.executable}
try:
    import torch
except ImportError as e:
    out["error"] = f"no torch ({e})"
else:
    out.update(torch=torch.__version__, cuda=torch.version.cuda,
               available=bool(torch.version.cuda) and torch.cuda.is_available(),
               devices=torch.cuda.device_count() if torch.version.cuda else 0)
    try:
        import nvidia.cuda_cupti, os
        out["cupti"] = os.path.join(list(nvidia.cuda_cupti.__path__)[0], "lib", "libcupti.so.12")
    except ImportError:
        out["cupti"] = None
print(json.dumps(out))
"""


def _job_python() -> str:
    return os.environ.get("ARGUS_GPU_PYTHON") or sys.executable


def _environment() -> tuple[dict | None, str | None]:
    """What the job's Python has (torch, CUDA, devices, libcupti), or why this cannot run."""
    if not Path("/dev/nvidia0").exists():
        return None, "gpu tier: no NVIDIA GPU on this machine (/dev/nvidia0 is absent)"
    if not AGENT.is_file():
        return None, f"gpu tier: the GPU agent is not built ({AGENT}); run `make setup`"
    if os.environ.get("CUDA_INJECTION64_PATH"):
        return None, ("gpu tier: CUDA_INJECTION64_PATH is already set "
                      f"({os.environ['CUDA_INJECTION64_PATH']}): another CUPTI tool (Nsight?) "
                      "is injected; run the test without it")
    py = _job_python()
    try:
        out = subprocess.run([py, "-c", PROBE], capture_output=True, text=True, timeout=120)
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as err:
        return None, f"gpu tier: could not ask {py} for its torch ({err})"
    if info.get("error"):
        return None, (f"gpu tier: {py} has {info['error']}; set ARGUS_GPU_PYTHON to a Python "
                      "with a CUDA build of torch")
    if not info.get("cuda"):
        return None, (f"gpu tier: {py}'s torch {info['torch']} is a CPU build; set "
                      "ARGUS_GPU_PYTHON to a Python with a CUDA build (pip install torch "
                      "--index-url https://download.pytorch.org/whl/cu124)")
    if not info.get("available"):
        return None, (f"gpu tier: torch {info['torch']} (CUDA {info['cuda']}) sees no usable "
                      "GPU (torch.cuda.is_available() is False: driver too old?)")
    cupti = info.get("cupti")
    if not cupti or not Path(cupti).is_file():
        # torch's own copy is the one to use: a second copy of libcupti in one process is a
        # second CUPTI. The wheel make setup fetches is the fallback.
        cupti = str(REAL_CUPTI) if REAL_CUPTI.is_file() else None
    if not cupti:
        return None, ("gpu tier: no real libcupti.so.12: `pip install nvidia-cuda-cupti-cu12` "
                      f"into {py}'s environment (torch's CUDA wheels depend on it), or run "
                      "`make setup` (build/real)")
    info["cupti"] = cupti
    return info, None


def _line(proc: subprocess.Popen, timeout_s: float) -> dict:
    """The rank's next JSON line, waiting at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"rank {proc.pid} exited ({proc.wait()}): "
                                     f"{proc.stderr.read()[-4000:]}")
            if line.startswith("{"):
                return json.loads(line)
    raise AssertionError(f"rank {proc.pid} said nothing in {timeout_s:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the job once; per rank: its lines, the agent's records, the profiler's trace."""
    info, reason = _environment()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("gpu_agent")
    world = min(2, info["devices"])
    go, done = tmp / "go", tmp / "exit"
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, **gpu_env(REPO / "build"), "ARGUS_GPU_CUPTI": info["cupti"],
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "ARGUS_TEST_STEPS": str(STEPS), "ARGUS_TEST_GO": str(go),
               "ARGUS_TEST_EXIT": str(done), "ARGUS_TEST_TRACE": str(tmp / f"prof{rank}.json")}
        procs.append(subprocess.Popen([_job_python(), str(JOB)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    rings = []
    out: dict[int, dict] = {}
    try:
        ready = [_line(p, 300) for p in procs]
        for p, r in zip(procs, ready, strict=True):
            ring = GpuAgentRing.open(p.pid, timeout=30)
            rings.append(ring)
            loaded = ring.loaded
            if not loaded & LOADED_CUPTI:
                pytest.skip(f"gpu tier: the agent's CUPTI half did not load in rank "
                            f"{r['rank']} (CUDA injection ran, but {info['cupti']} gave no "
                            "activity API, or another subscriber holds it)")
            want = ACTIVE_CUPTI | (ACTIVE_NCCL if loaded & LOADED_NCCL else 0)
            ring.enable()
            assert ring.wait_active(want, timeout=10), (ring.active, want)
            out[r["rank"]] = {"ready": r, "loaded": loaded,
                              "nccl_version": ring.header("nccl_version")}
        go.touch()
        for p, r in zip(procs, ready, strict=True):
            out[r["rank"]]["done"] = _line(p, 300)
        for ring, r in zip(rings, ready, strict=True):
            ring.disable()  # switching off flushes CUPTI's buffers into the ring
            assert ring.wait_active(0, timeout=10), ring.active
            frames = []
            while (f := ring.read()).height:
                frames.append(f)
            out[r["rank"]]["records"] = pl.concat(frames) if frames else ring.read()
            out[r["rank"]]["drops"] = ring.drops()
            trace = json.loads((tmp / f"prof{r['rank']}.json").read_text())
            out[r["rank"]]["profiler"] = [e for e in trace["traceEvents"]
                                          if e.get("ph") == "X" and e.get("cat") == "kernel"]
    finally:
        done.touch()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ring in rings:
            ring.close()
    return {"world": world, "ranks": out, "info": info}


def _cupti_both_or_skip(rank: int, r: dict) -> tuple[pl.DataFrame, list[dict]]:
    kernels = r["records"].filter(pl.col("kind") == "kernel")
    prof = r["profiler"]
    assert kernels.height or prof, f"rank {rank}: neither the agent nor torch.profiler " \
        "saw a kernel"
    if not kernels.height:
        pytest.skip(f"gpu tier: more than one CUPTI subscriber: torch.profiler (Kineto) got "
                    f"CUPTI's activity records ({len(prof)} kernels) and the agent none, on "
                    f"rank {rank}: CUPTI delivered them to one client only")
    if not prof:
        pytest.skip(f"gpu tier: more than one CUPTI subscriber: the agent got CUPTI's "
                    f"activity records ({kernels.height} kernels) and torch.profiler none, on "
                    f"rank {rank}: CUPTI delivered them to one client only")
    return kernels, prof


def test_kernel_records_match_torch_profiler_for_the_same_steps(job):
    for rank, r in job["ranks"].items():
        assert (r["drops"].ring_full, r["drops"].cupti) == (0, 0), r["drops"]
        kernels, prof = _cupti_both_or_skip(rank, r)
        per_step = 3 if job["world"] > 1 else 2  # GEMM, relu (+ the NCCL kernel)
        assert len(prof) >= per_step * STEPS, (rank, len(prof))
        assert kernels.height == len(prof), (rank, kernels.height, len(prof))
        want = collections.Counter(e["name"].encode()[:NAME_BYTES].decode("utf-8", "replace")
                                   for e in prof)
        assert collections.Counter(kernels["name"].to_list()) == want
        for name in want:
            got = sorted(kernels.filter(pl.col("name") == name)["dur_ns"].to_list())
            ref = sorted(round(e["dur"] * 1000) for e in prof
                         if e["name"].encode()[:NAME_BYTES].decode("utf-8", "replace") == name)
            worst = max(abs(a - b) for a, b in zip(got, ref, strict=True))
            assert worst <= DUR_TOL_NS, (rank, name, worst, got[:5], ref[:5])
            assert all(d > 0 for d in got), (rank, name)


def test_collective_records_match_the_all_reduce_calls(job):
    if job["world"] < 2:
        pytest.skip("gpu tier: one GPU: a 1-rank NCCL all_reduce launches no collective "
                    "kernel, and two ranks cannot share a GPU; needs 2 GPUs")
    seqs = {}
    for rank, r in job["ranks"].items():
        calls = r["done"]["allreduce_calls"]
        assert calls == STEPS
        if not r["loaded"] & LOADED_NCCL:
            pytest.skip(f"gpu tier: NCCL {r['ready']['nccl']} did not load the agent's "
                        "profiler plugin (it exports ncclProfiler_v4/v5: NCCL 2.26 or newer)")
        assert r["nccl_version"] in (4, 5)
        coll = r["records"].filter(pl.col("kind") == "coll")
        assert coll.height >= calls, (rank, coll.height)
        by_seq = coll.group_by("coll_seq").agg(pl.len().alias("channels"),
                                               pl.col("channel").n_unique().alias("distinct"))
        assert by_seq.height == calls, (rank, by_seq.sort("coll_seq"))
        s = sorted(by_seq["coll_seq"].to_list())
        assert s == list(range(s[0], s[0] + calls)), s  # consecutive: nothing lost
        assert (by_seq["channels"] == by_seq["distinct"]).all()  # one record per channel
        assert set(coll["op"].to_list()) == {"AllReduce"}
        assert set(coll["bytes"].to_list()) == {r["done"]["bytes"]}
        assert coll["comm_hash"].n_unique() == 1
        assert all(0 < d < 10**9 for d in coll["dur_ns"].to_list())
        seqs[rank] = (coll["comm_hash"][0], s)
        kernels, prof = _cupti_both_or_skip(rank, r)
        nccl_prof = [e for e in prof if e["name"].lower().startswith("nccl")]
        assert len(nccl_prof) == calls
        assert kernels.filter(pl.col("name").str.to_lowercase().str.starts_with("nccl")).height \
            == calls
    assert seqs[0] == seqs[1]  # one communicator, the same sequence numbers on both ranks
