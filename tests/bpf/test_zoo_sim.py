"""The zoo's CUDA/NCCL-shaped jobs (argus.sim on the stand-in libraries, 4 ranks) attached
AFTER their communicators exist (`wait_at="step"`: init, ncclCommSplit and one step run
before the go file), healthy and with one planted fault each, scored as the issue's
"done when" says (tests/workloads/checks.py; the run is scripts/zoo's):

- sim_ddp: one world communicator; fault: a host straggler (CPU-busy data loading), rank
  2, 25 % of the step.
- sim_tp_dp: world + ncclCommSplit TP and DP communicators, a TP allreduce per layer;
  fault: rank 1 hangs before its 3rd TP allreduce of step 8.
- sim_pp: 2 stages x 2 data-parallel (ncclCommSplit by stage), micro-batches through
  ncclSend/Recv; fault: stage 1 (ranks 1 and 3) 25 % slower on the GPU.
- sim_sync_every_n: the host reads the loss back every 5th step only; fault: a host
  straggler, rank 0, 25 %.

Eight runs of ~4 s of steps each (~80 s in all with argus's start and end; a hang run
traces 16 s)."""

from __future__ import annotations

import pytest
from workloads.checks import ZooCells
from workloads.launch import Faults

pytestmark = pytest.mark.bpf

FAULTS = {
    "sim_ddp": Faults(straggler=(2, 25.0)),
    "sim_tp_dp": Faults(hang={"rank": 1, "group": "tp", "op": "allreduce", "step": 8, "nth": 2}),
    "sim_pp": Faults(slow_stage=(1, 25.0)),
    "sim_sync_every_n": Faults(straggler=(0, 25.0)),
}
# Measured 2026-12-02 (4 s runs): the steps of a job whose step is one kind of collective
# (4 equal buckets) and whose host waits only every 5th step are 5-step periods (13 for 70):
# equal parts of one token are taken for one step's buckets (docs/accuracy.md, limits);
# with those steps its 25 % host straggler was not found.
SYNC_STEPS = "sync-every-5 with equal buckets: 13 steps counted for 70"
KNOWN = {
    ("steps", "sim_sync_every_n"): SYNC_STEPS,
    ("fault_steps", "sim_sync_every_n"): SYNC_STEPS,
    ("found", "sim_sync_every_n"): "sync-every-5 with equal buckets: straggler not found",
}


class TestSimulated(ZooCells):
    FAULTS = FAULTS
    KNOWN = KNOWN
    RUN_S = 4.0
    # check_job_issued_its_sites reads a torch job's truth (shapes.sites); the simulator's
    # truth has no per-site counts
    test_the_job_issues_exactly_its_collectives = None
