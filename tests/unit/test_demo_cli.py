"""`argus demo --ranks N`: the default planted fault is valid for every N it accepts."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from argus.cli.demo import DEFAULT_FAULT, command, default_fault
from argus.sim.faults import parse_fault

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 7, 64])
def test_default_fault_names_a_rank_of_the_job(ranks):
    spec = default_fault(ranks)
    fault = parse_fault(spec, ranks)  # raises FaultSpecError on a rank the job lacks
    assert fault.ranks == ([0] if ranks == 1 else [min(2, ranks - 1)])
    assert fault.kind == ("jit_stall" if ranks == 1 else "straggler")
    if ranks >= 3:
        assert spec == DEFAULT_FAULT


@pytest.mark.parametrize("ranks", ["0", "65"])
def test_ranks_out_of_range_is_a_usage_error(ranks):
    res = CliRunner().invoke(command, ["--ranks", ranks])
    assert res.exit_code == 2 and "--ranks" in res.output
