"""A tiny real PyTorch DDP job (CPU, gloo) for the bpf tests: run under torchrun.

    torchrun --nproc-per-node=2 tests/bpf/ddp_train.py --steps 13 --go GO --truth DIR
             [--slow-rank R --slow-ms MS] [--compute-ms MS] [--warmup-steps W]
             [--hang-rank R --hang-step S]

Each rank imports torch, joins the gloo process group, wraps a tiny model in DDP (its
parameter broadcast happens here), runs W warm-up steps (default 0), writes
DIR/ready.<rank>, then waits for the GO file before its first traced training step, so a
tracer can attach through the torchrun PID first (`--wait-at ddp`: before DDP() is built,
to observe what its construction does). Then S steps; each step is one forward,
one backward and one SGD update. The model is small enough for ONE gradient bucket
(bucket_cap_mb is large), so DDP's reducer issues exactly one c10d allreduce per step.
`--slow-rank R --slow-ms MS` makes rank R spend MS ms of CPU in `slow_rank_compute()`
each step (a named function a CPU-stack diagnosis can point at). `--compute-ms MS` makes
EVERY rank wait MS ms in `model_compute()` each step (a sleep, as a host waiting for its
GPU: a realistic step length, so that scheduling hiccups of a shared host are small
against it).
`--hang-rank R --hang-step S` makes rank R block forever in `stuck_in_data_loading()` (a
sleep: off-CPU, as a rank waiting on a dead data loader) before the forward of step S, so
the other ranks wait in that step's allreduce; it writes DIR/hung.<rank> first.
At the end each rank writes its ground truth to DIR/truth.<rank>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def slow_rank_compute(ms: float) -> int:
    """Burn `ms` ms of CPU time (not sleep: the CPU channel must see it)."""
    end = time.thread_time() + ms / 1000.0
    n = 0
    while time.thread_time() < end:
        n += 1
    return n


def stuck_in_data_loading(truth: Path, rank: int) -> None:
    """`--hang-rank`: never returns (a rank whose input pipeline is stuck)."""
    (truth / f"hung.{rank}").write_text(str(os.getpid()))
    while True:
        time.sleep(3600)


def model_compute(ms: float) -> None:
    """Every rank's per-step work (`--compute-ms`): a sleep, as a host waiting for its GPU
    (CPU burns of every rank would make a 2-core test machine the bottleneck)."""
    time.sleep(ms / 1000.0)


def train_step(ddp, opt, x, y) -> float:
    import torch.nn.functional as F

    opt.zero_grad(set_to_none=True)
    loss = F.mse_loss(ddp(x), y)
    loss.backward()  # DDP's reducer allreduces the single gradient bucket here
    opt.step()
    return float(loss)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--go", required=True, help="wait for this file before the first step")
    ap.add_argument(
        "--truth", required=True, help="directory for ready.<rank> and truth.<rank>.json"
    )
    ap.add_argument("--slow-rank", type=int, default=-1)
    ap.add_argument("--slow-ms", type=float, default=0.0)
    ap.add_argument("--compute-ms", type=float, default=0.0, help="CPU work of every rank")
    ap.add_argument("--hang-rank", type=int, default=-1)
    ap.add_argument("--hang-step", type=int, default=-1)
    ap.add_argument(
        "--wait-at",
        choices=("step", "ddp"),
        default="step",
        help="wait for GO before the first step (default) or before DDP() is built",
    )
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    truth = Path(args.truth)
    truth.mkdir(parents=True, exist_ok=True)

    def wait_go() -> None:
        (truth / f"ready.{rank}").write_text(str(os.getpid()))
        while not os.path.exists(args.go):
            time.sleep(0.02)

    if args.wait_at == "ddp":
        wait_go()
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
    # 145 float32 parameters: one bucket, whatever the first-bucket cap.
    ddp = DDP(model, bucket_cap_mb=256)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 1, generator=gen)
    for _ in range(args.warmup_steps):
        train_step(ddp, opt, x, y)

    if args.wait_at == "step":
        wait_go()

    losses = []
    for step in range(args.steps):
        if rank == args.hang_rank and step == args.hang_step:
            stuck_in_data_loading(truth, rank)
        if args.compute_ms > 0:
            model_compute(args.compute_ms)
        if rank == args.slow_rank:
            slow_rank_compute(args.slow_ms)
        losses.append(train_step(ddp, opt, x, y))

    logging = ddp._get_ddp_logging_data()
    record = {
        "rank": rank,
        "world_size": world,
        "local_rank": int(os.environ.get("LOCAL_RANK", "-1")),
        "pid": os.getpid(),
        "steps": len(losses),
        "warmup_steps": args.warmup_steps,
        "wait_at": args.wait_at,
        "slow_ms": args.slow_ms if rank == args.slow_rank else 0.0,
        "slow_function": "slow_rank_compute" if rank == args.slow_rank else None,
        "compute_ms": args.compute_ms,
        "params": sum(p.numel() for p in model.parameters()),
        "bucket_sizes": logging.get("bucket_sizes"),
        "rebuilt_bucket_sizes": logging.get("rebuilt_bucket_sizes"),
        "loss_first_last": [losses[0], losses[-1]] if losses else [],
    }
    (truth / f"truth.{rank}.json").write_text(json.dumps(record))
    # Without a barrier the fast rank tears its gloo pairs down while the slow one's gloo
    # thread still reads from them: that thread throws and the slow rank aborts (SIGABRT,
    # seen here once in ~10 runs). The barrier is after the traced steps: not counted.
    dist.barrier()
    # torch 2.13's gloo teardown (destroy_process_group, or the destructors at exit) aborts
    # now and then with "terminate called without an active exception" (1 run in 12 of 4
    # ranks, measured without argus): a joinable thread destroyed. The job is over; leave
    # without running the destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
