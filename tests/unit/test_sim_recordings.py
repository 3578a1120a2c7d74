"""The analysers on real recordings of the simulated job (argus attach, saved in tests/data).

Each directory holds a recording of 4 ranks x 40 steps (15 for the hang) and the simulator's
truth; `diagnose` must name each planted fault with the right kind and rank, and nothing else.
Re-record with tests/bpf/test_diagnosis_e2e.py's recipe (argus.cli.demo.run_demo).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from argus.analyze.diagnosis import diagnose
from argus.recording.io import load_recording
from argus.sim.expect import SERIOUS, score

DATA = Path(__file__).resolve().parents[1] / "data"


def _diag(name: str, hang_after_s: float = 10.0):
    d = DATA / name
    truth = json.loads((d / "truth.json").read_text())
    report = diagnose([load_recording(d)], hang_after_s=hang_after_s)
    return report, truth, score(report, truth)


def _serious(report):
    return [(f["kind"], f.get("rank")) for f in report["findings"] if f["severity"] in SERIOUS]


def test_healthy_recording_has_no_warning():
    report, truth, s = _diag("sim_healthy")
    assert report["steps"]["count"] == 40 and report["steps"]["method"] == "collectives"
    assert [r["steps"] for r in report["ranks"]] == [40] * 4
    assert _serious(report) == []


@pytest.mark.parametrize(
    "name, rank, cause",
    [("sim_straggler", 2, "gpu"), ("sim_throttle", 3, "gpu"), ("sim_host_stall", 1, "host")],
)
def test_straggler_rank_and_cause(name, rank, cause):
    report, truth, s = _diag(name)
    assert _serious(report) == [("straggler", rank)]
    f = report["findings"][0]
    assert f["cause"] == cause and f["start_step"] is None
    assert s["faults"][0]["found"] and s["false_alarms"] == []


def test_jit_stall_window_straggler_and_hotspot():
    report, truth, s = _diag("sim_jit_stall")
    assert _serious(report) == [("straggler", 1), ("cpu_hotspot", 1), ("anomalous_window", None)]
    hot = next(f for f in report["findings"] if f["kind"] == "cpu_hotspot")
    assert hot["function"] == "jit_compile_graph"
    assert (hot["start_step"], hot["end_step"]) == (10, 10)
    assert s["faults"][0]["found"] and s["false_alarms"] == []


def test_link_degradation_is_a_stall_from_its_start_step():
    report, truth, s = _diag("sim_link")
    assert _serious(report) == [("collective_stall", None), ("anomalous_window", None)]
    stall = report["findings"][0]
    assert stall["op"] == "allreduce" and stall["since_step"] == truth["faults"][0]["start"]
    assert s["faults"][0]["found"]


def test_hang_missing_rank_and_seq_equal_the_truth():
    report, truth, s = _diag("sim_hang", hang_after_s=2.0)
    fault = truth["faults"][0]
    (h,) = [f for f in report["findings"] if f["kind"] == "collective_hang"]
    assert h["missing_ranks"] == fault["ranks"] == [3]
    assert h["waiting_ranks"] == [0, 1, 2]
    assert (h["op"], h["seq"]) == ("allreduce", fault["params"]["comm_seq"])
    assert s["faults"][0]["found"] and s["false_alarms"] == []
    # with the default --hang-after (10 s) the 5 s wait at the end is not a hang yet
    report, _, _ = _diag("sim_hang")
    assert not [f for f in report["findings"] if f["kind"] == "collective_hang"]
