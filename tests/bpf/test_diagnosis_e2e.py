"""simulate -> attach -> diagnose: every planted fault is named with the right kind and rank.

Short jobs (4 ranks, 30 steps, ~12 s each with the attach); every assertion is on kinds,
ranks and sequence numbers from the simulator's truth, never on timings.
"""

from __future__ import annotations

import pytest

from argus.cli.demo import run_demo
from argus.sim.expect import SERIOUS, score

pytestmark = pytest.mark.bpf


def _run(tmp_path, faults, ranks=4, steps=30, pp=1, sample_hz=None):
    report, truth, _ = run_demo(ranks, list(faults), steps, tmp_path / "rec", pp, sample_hz)
    return report, truth, score(report, truth)


def _serious(report):
    return [f for f in report["findings"] if f["severity"] in SERIOUS]


def test_healthy_job_has_no_warning(tmp_path):
    report, truth, s = _run(tmp_path, [])
    assert report["steps"]["count"] == 30
    assert _serious(report) == []


@pytest.mark.parametrize(
    "spec, rank, cause",
    [
        ("straggler:rank=2,factor=1.5", 2, "gpu"),
        ("throttle:rank=1,mhz=1200", 1, "gpu"),  # slower kernels: a GPU straggler (no NVML yet)
        ("host_stall:rank=1,ms=30", 1, "host"),
    ],
)
def test_straggler_kinds_name_the_rank_and_cause(tmp_path, spec, rank, cause):
    report, truth, s = _run(tmp_path, [spec])
    stragglers = [f for f in _serious(report) if f["kind"] == "straggler"]
    assert [(f["rank"], f["cause"]) for f in stragglers] == [(rank, cause)]
    assert s["faults"][0]["found"] and s["false_alarms"] == []


def test_jit_stall_names_the_compile_function_on_its_rank(tmp_path):
    # The differential profile needs >= 10 samples on each side. At the default 49 Hz the
    # normal steps of a 30-step job hold only a handful (3 ms of data loading a step), so
    # the test samples at 199 Hz (`-F 199`): ~80 samples in the stall, ~18 in the rest.
    report, truth, s = _run(tmp_path, ["jit_stall:rank=1,ms=400,start=10"], sample_hz=199)
    kinds = {(f["kind"], f.get("rank")) for f in _serious(report)}
    assert ("straggler", 1) in kinds
    hot = [f for f in _serious(report) if f["kind"] == "cpu_hotspot"]
    assert [(f["rank"], f["function"]) for f in hot] == [(1, "jit_compile_graph")]
    assert s["false_alarms"] == []


def test_link_degradation_is_a_collective_stall(tmp_path):
    # factor 20 from step 12: each 50 MB allreduce then takes 15 ms instead of 0.75 ms and no
    # longer hides behind backward (factor 4, the simulator's default, costs ~2 ms a step)
    report, truth, s = _run(tmp_path, ["link:rank=0,factor=20,start=12"])
    kinds = sorted(f["kind"] for f in _serious(report))
    assert kinds == ["anomalous_window", "collective_stall"]
    stall = next(f for f in report["findings"] if f["kind"] == "collective_stall")
    assert stall["op"] == "allreduce" and stall["since_step"] in (11, 12, 13)


def test_hang_names_missing_rank_and_collective(tmp_path):
    report, truth, s = _run(tmp_path, ["hang:rank=3,start=8"], steps=100)
    fault = truth["faults"][0]
    hangs = [f for f in report["findings"] if f["kind"] == "collective_hang"]
    assert len(hangs) == 1
    h = hangs[0]
    assert h["missing_ranks"] == [3]
    assert h["waiting_ranks"] == [0, 1, 2]
    assert h["seq"] == fault["params"]["comm_seq"]
    assert h["op"] == "allreduce" and h["comm"] is not None
    assert s["faults"][0]["found"]


def test_pipeline_bubble_names_the_slow_stage(tmp_path):
    # --pp 2: stage 1 = ranks 1, 3 (rank % pp); steps come from each stage's data-parallel
    # communicator, the slow stage from the GPU busy time the NVML stand-in reports
    report, truth, s = _run(tmp_path, ["bubble:stage=1,factor=2"], pp=2)
    assert [r["steps"] > 0 for r in report["ranks"]] == [True] * 4
    stragglers = [f for f in _serious(report) if f["kind"] == "straggler"]
    assert sorted(f["rank"] for f in stragglers) == [1, 3]
    assert all(f["pipeline_stage"] == [1, 3] for f in stragglers)
    assert s["faults"][0]["found"]
