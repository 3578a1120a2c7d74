"""The zoo's data-parallel shapes on real PyTorch (gloo, 4 ranks under torchrun), healthy
and with one planted fault each, scored as the issue's "done when" says
(tests/workloads/checks.py; the run is scripts/zoo's: tests/workloads/harness.py):

- ddp: DDP, one gradient bucket; fault: a host straggler, rank 1, 25 % of the step.
- grad_accum: DDP, 4 micro-steps per step under no_sync(); fault: straggler, rank 2, 25 %.
- sync_every_n: DDP, the loss allreduced + .item()'d every 5th step only; fault: rank 3
  hangs before the loss allreduce of step 9 (its 2nd allreduce of that step).

Six runs of ~8 s of steps each (~35 s with torch's start and argus's own)."""

from __future__ import annotations

import pytest
from workloads.checks import ZooCells
from workloads.launch import Faults

pytestmark = [pytest.mark.bpf, pytest.mark.zoo]

FAULTS = {
    "ddp": Faults(straggler=(1, 25.0)),
    "grad_accum": Faults(straggler=(2, 25.0)),
    "sync_every_n": Faults(hang={"rank": 3, "group": "world", "op": "allreduce", "step": 9,
                                 "nth": 1}),
}
# Measured 2026-12-02, one run per cell under make test-zoo (docs/accuracy.md, "zoo").
KNOWN = {
    ("serious", "sync_every_n"): ("healthy: warn collective_stall + warn anomalous_window "
                                  "(1 run of 1)", False),
}


class TestDataParallel(ZooCells):
    FAULTS = FAULTS
    KNOWN = KNOWN
