"""The workload zoo's shapes: which process groups each has and which collectives each rank
issues per step (its "sites"), so that a harness can draw a hang at a real collective and
score what argus says against it. Stdlib only (the harness does not import torch).

A site is (group, op, nth, period): in every step with `step % period == period - 1` the
rank issues its `nth` call of `op` on `group` (counted per step, per group and op, from 0).

Torch shapes (tests/workloads/train.py, real PyTorch on gloo, 4 ranks by default):

- ddp (world): DDP's gradient allreduce (one bucket).
- tp_dp (tp {0,1},{2,3}; dp {0,2},{1,3}; world): per layer a TP allreduce in forward and
  one in backward (Megatron's f/g), DDP's gradient allreduce in dp; every 5th step a world
  allgather + broadcast (metrics).
- pp_gpipe (world, 4 stages): M micro-batches, all forwards (recv from the previous stage,
  send to the next), then all backwards (recv grads from the next, send to the previous).
- pp_1f1b (world, 4 stages): the same in the one-forward-one-backward schedule
  (isend/irecv pairs).
- grad_accum (world): K micro-steps under no_sync(), the gradient allreduce in the K-th.
- sync_every_n (world): DDP's gradient allreduce; every Nth step an allreduce of the
  running loss + .item() (logging).

Sim shapes (argus.sim, the CUDA/NCCL stand-ins; attached after the communicators exist):
sim_ddp, sim_tp_dp (world + ncclCommSplit TP and DP communicators), sim_pp (2 stages x 2
data-parallel, ncclCommSplit by stage), sim_sync_every_n (the host reads the loss back only
every N steps: it runs ahead of the virtual GPU in between).
"""

from __future__ import annotations

from dataclasses import dataclass

TORCH_SHAPES = ("ddp", "tp_dp", "pp_gpipe", "pp_1f1b", "grad_accum", "sync_every_n")
SIM_SHAPES = ("sim_ddp", "sim_tp_dp", "sim_pp", "sim_sync_every_n")
SHAPES = TORCH_SHAPES + SIM_SHAPES
PIPELINES = ("pp_gpipe", "pp_1f1b", "sim_pp")
# hosts that run ahead of their GPU (a read-back every N steps): host work slows the job only
# beyond their idle, so a straggler burns that first (launch.Faults.slack_ms)
HOST_AHEAD = ("sim_sync_every_n",)

METRICS_EVERY = 5  # tp_dp: the world allgather + broadcast period


@dataclass(frozen=True)
class Params:
    """The knobs of a torch shape (train.py's flags of the same names)."""

    layers: int = 4  # tp_dp: TP layers; others: Linear blocks
    micro: int = 4  # pipelines: micro-batches per step
    accum: int = 4  # grad_accum: micro-steps per optimizer step
    log_every: int = 5  # sync_every_n: host sync period


@dataclass(frozen=True)
class Site:
    group: str
    op: str
    nth: int
    period: int = 1

    def occurs(self, step: int) -> bool:
        return step % self.period == self.period - 1

    def spec(self, rank: int, step: int) -> str:
        """train.py's --hang value for a hang of `rank` before this call at `step`."""
        return f"{rank}:{self.group}:{self.op}:{step}:{self.nth}"


def groups(shape: str, world: int = 4) -> dict[str, list[list[int]]]:
    """Group name -> the member lists (one list per group instance of that name)."""
    everyone = [list(range(world))]
    if shape == "tp_dp":
        if world != 4:
            raise ValueError("tp_dp is written for 4 ranks (2 TP x 2 DP)")
        return {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "world": everyone}
    return {"world": everyone}


def sites(shape: str, rank: int, world: int = 4, p: Params = Params()) -> list[Site]:
    """Every collective call `rank` makes per step in a torch shape (see the module doc)."""
    if shape in ("ddp", "grad_accum"):
        return [Site("world", "allreduce", 0)]
    if shape == "sync_every_n":
        return [Site("world", "allreduce", 0), Site("world", "allreduce", 1, p.log_every)]
    if shape == "tp_dp":
        tp = [Site("tp", "allreduce", i) for i in range(2 * p.layers)]
        return tp + [Site("dp", "allreduce", 0),
                     Site("world", "allgather", 0, METRICS_EVERY),
                     Site("world", "broadcast", 0, METRICS_EVERY)]
    if shape in SIM_SHAPES:
        # the simulator plants hangs before a gradient-bucket allreduce (4 buckets; the
        # "dp" communicator, the world one in sim_ddp) or, in sim_tp_dp, a TP allreduce
        dp = [Site("dp", "allreduce", i) for i in range(4)]
        return dp + ([Site("tp", "allreduce", i) for i in range(8)]
                     if shape == "sim_tp_dp" else [])
    if shape in ("pp_gpipe", "pp_1f1b"):
        first, last = rank == 0, rank == world - 1
        n_recv = (0 if first else p.micro) + (0 if last else p.micro)
        n_send = n_recv
        return [Site("world", "recv", i) for i in range(n_recv)] + [
            Site("world", "send", i) for i in range(n_send)
        ]
    raise ValueError(f"no sites for shape {shape!r}")


def stage_ranks(shape: str, stage: int, world: int = 4) -> list[int]:
    """The ranks of a pipeline stage (torch pipelines: one rank per stage; sim_pp: ranks
    r with r % pp == stage, as argus.sim numbers them)."""
    if shape == "sim_pp":
        return [r for r in range(world) if r % 2 == stage]
    return [stage]
