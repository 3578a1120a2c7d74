"""The zoo's model-parallel shapes on real PyTorch (gloo, 4 ranks under torchrun), healthy
and with one planted fault each, scored as the issue's "done when" says
(tests/workloads/checks.py; the run is scripts/zoo's: tests/workloads/harness.py):

- tp_dp: 2 tensor-parallel x 2 data-parallel, five process groups; fault: a host
  straggler, rank 1, 25 % of the step.
- pp_gpipe: 4 stages, GPipe over send/recv; fault: stage 2's device time +25 %.
- pp_1f1b: 4 stages, 1F1B over isend/irecv; fault: rank 2 hangs before its 2nd recv of
  step 7.

Six runs of ~8 s of steps each (~35-45 s with torch's start and argus's own)."""

from __future__ import annotations

import pytest
from workloads.checks import ZooCells
from workloads.launch import Faults

pytestmark = [pytest.mark.bpf, pytest.mark.zoo]

FAULTS = {
    "tp_dp": Faults(straggler=(1, 25.0)),
    "pp_gpipe": Faults(slow_stage=(2, 25.0)),
    "pp_1f1b": Faults(hang={"rank": 2, "group": "world", "op": "recv", "step": 7, "nth": 1}),
}
# Measured 2026-12-02, one run per cell under make test-zoo (docs/accuracy.md, "zoo").
GLOO_PP = "pipelines over gloo send/recv: steps from c10d p2p calls are off"
KNOWN = {
    ("found", "tp_dp"): "straggler r1 25 %: collective stalls and a straggler window only",
    ("serious", "pp_gpipe"): (f"{GLOO_PP}: healthy: warn cpu_hotspot x2, anomalous_window x9",
                              False),
    ("serious", "pp_1f1b"): (f"{GLOO_PP}: healthy: warn anomalous_window x91", False),
    ("steps", "pp_gpipe"): f"{GLOO_PP}: 388 steps for 149",
    ("steps", "pp_1f1b"): f"{GLOO_PP}: 650 steps for 163",
    ("found", "pp_gpipe"): f"{GLOO_PP}: slow stage 2 +25 %: nothing said",
    ("found", "pp_1f1b"): f"{GLOO_PP}: hang of rank 2 at a recv: only anomalous windows",
    ("fault_steps", "pp_gpipe"): f"{GLOO_PP}: 368 steps for 147",
    ("fault_steps", "pp_1f1b"): f"{GLOO_PP}: hang: 29 steps for 7",
}


class TestModelParallel(ZooCells):
    FAULTS = FAULTS
    KNOWN = KNOWN
