"""`make bench`'s analyzer rows build a synthetic summaries job in a child process; the bench
runs outside CI, so a schema change that breaks it (a new summaries column) is caught here.
The child's planted faults must be what it finds: a GPU straggler (rank 7, +6 ms compute),
a host stall (rank 11, steps 120-125) and the window it makes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"


def test_the_bench_analyzer_child_finds_its_planted_faults():
    out = subprocess.run([sys.executable, str(BENCH), "--analyzer-child", "64", "--steps", "200"],
                         capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(map(tuple, got["findings"]), key=str) == sorted(
        [("anomalous_window", None), ("straggler", 11), ("straggler", 7)], key=str)
