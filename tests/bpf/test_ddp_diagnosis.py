"""Real PyTorch DDP (CPU, gloo) under torchrun with one slowed rank -> argus names that rank.

tests/bpf/ddp_train.py runs under torchrun; argus attaches through the torchrun PID before
the ranks start their steps; `diagnose` then sees only the torch channel (c10d allreduce,
gloo's AsyncWork::execute, autograd Engine::execute): steps are found from the one
allreduce per step, the slowed rank (60 ms of CPU in slow_rank_compute() per step) arrives
late at every allreduce while the others wait in AsyncWork::execute. Every rank also waits
20 ms per step (`--compute-ms`, a sleep: a host waiting for its GPU), a realistic step on a
shared 2-core machine. Assertions are on kinds, ranks and counts, never on timings.
"""

from __future__ import annotations

import json

import pytest
from test_torch_ddp import Job  # tests/ is on the path (pyproject pythonpath)

from argus.analyze.diagnosis import diagnose
from argus.collect.session import run_session
from argus.collect.tracer import TraceOptions
from argus.recording.io import load_recording
from argus.sim.expect import SERIOUS

pytestmark = pytest.mark.bpf

STEPS = 30


def _diagnose(tmp, nproc: int, *extra: str):
    job = Job(tmp, nproc, STEPS, "--compute-ms", "20", *extra)
    try:
        job.wait_ready()
        result = run_session([job.proc.pid], tmp / "rec", TraceOptions(), duration_s=120,
                             on_started=lambda tracer: job.go.touch())
        job.proc.wait(timeout=120)
    finally:
        job.close()
    # Every rank ran its steps (torch's own teardown may still abort now and then after the
    # truth is written: "terminate called without an active exception" in gloo's exit).
    truth = [json.loads((job.truth_dir / f"truth.{r}.json").read_text()) for r in range(nproc)]
    assert [t["steps"] for t in truth] == [STEPS] * nproc
    return diagnose([load_recording(result.path)]), truth


def _serious(report):
    return [f for f in report["findings"] if f["severity"] in SERIOUS]


@pytest.mark.parametrize("nproc", [2])  # 4 ranks: test_torch_ddp's CLI attach test
def test_slowed_rank_is_the_straggler(tmp_path, nproc):
    report, truth = _diagnose(tmp_path, nproc, "--slow-rank", "1", "--slow-ms", "60")
    steps = report["steps"]
    assert steps["detected"] and steps["method"] == "torch", steps
    assert steps["collectives_per_step"] == 1 and steps["count"] >= STEPS - 3
    stragglers = [f for f in _serious(report) if f["kind"] == "straggler"]
    assert [(f["rank"], f["cause"]) for f in stragglers] == [(1, "host")], report["findings"]
    # Slow from the first step: usually "throughout the recording"; on a loaded 2-core box
    # the first steps can be noisy enough that the strongest scope is a window instead.
    first = stragglers[0]["start_step"]
    assert first is None or first <= steps["count"] // 2
    assert not [f for f in _serious(report) if f.get("rank") not in (1, None)]


def test_healthy_ddp_has_no_warning(tmp_path):
    report, truth = _diagnose(tmp_path, 3)
    assert report["steps"]["detected"] and report["steps"]["method"] == "torch"
    assert [r["steps"] >= STEPS - 3 for r in report["ranks"]] == [True] * 3
    assert _serious(report) == [], report["findings"]
