"""One rank of the gpu tier's agent job (tests/gpu/test_gpu_agent_real.py): a small real
PyTorch NCCL job with torch.profiler on in the same process.

Run by the job's Python (ARGUS_GPU_PYTHON: it needs a CUDA build of torch, not argus), one
process per rank, with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and the variables of
`argus gpu-env` set by the test. Protocol on stdout, one JSON object per line:
  {"ready": PID, ...}  after the warm-up (communicator made, cuBLAS initialised, synced): the
                       test now opens and enables this process's agent ring
  (waits for the file ARGUS_TEST_GO)
  {"done": STEPS, "allreduce_calls": N, ...}  the measured steps ran under torch.profiler
                       (CPU + CUDA activities), its trace is written to ARGUS_TEST_TRACE
  (waits for the file ARGUS_TEST_EXIT: the test disables the agent, which flushes CUPTI,
   and reads the ring while this process is still alive)
A measured step: y = relu(x @ w) (one cuBLAS GEMM, one elementwise kernel), then with 2+
ranks one all_reduce of y (one NCCL kernel), on the default stream; a synchronize at the end.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

N = 512  # y is N x N float32: 1 MiB per all_reduce


def wait_for(path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(f"rank job: {path} did not appear in {timeout_s:.0f} s")
        time.sleep(0.01)


def main() -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    steps = int(os.environ["ARGUS_TEST_STEPS"])
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    if world > 1:
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    g = torch.Generator(device=dev).manual_seed(rank)
    x = torch.randn(N, N, device=dev, generator=g)
    w = torch.randn(N, N, device=dev, generator=g)
    calls = 0

    def step() -> torch.Tensor:
        nonlocal calls
        y = torch.relu(x @ w)
        if world > 1:
            dist.all_reduce(y)
            calls += 1
        return y

    for _ in range(3):  # warm-up: the communicator, cuBLAS handles and workspaces
        step()
    torch.cuda.synchronize()
    calls = 0
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if world > 1 else None
    print(json.dumps({"ready": os.getpid(), "rank": rank, "torch": torch.__version__,
                      "cuda": torch.version.cuda, "nccl": nccl}), flush=True)
    wait_for(os.environ["ARGUS_TEST_GO"], 120)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(os.environ["ARGUS_TEST_TRACE"])
    print(json.dumps({"done": steps, "allreduce_calls": calls, "bytes": N * N * 4}), flush=True)
    wait_for(os.environ["ARGUS_TEST_EXIT"], 120)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
