"""The analysers on real pipeline-parallel recordings: PyTorch (CPU, gloo) jobs of the zoo
(tests/workloads/shapes.py, 4 stages of one rank each under torchrun), traced by `argus
attach` after their process groups existed (tests/data, recorded 2026-12-02 with
`scripts/zoo --shapes pp_gpipe,pp_1f1b --faults healthy,slow_stage,straggler10,hang --runs 1
--keep DIR`; truth.json is the job's own):

- `pp_gpipe_slow_stage1`: GPipe over send/recv, stage 1's compute +25 %.
- `pp_1f1b_straggler_rank3`: 1F1B over isend/irecv, rank 3 (the last stage) burns 10 % of
  the step in host work.
- `pp_1f1b_straggler_rank3_gaps` (2026-12-03, 10 runs): the same fault; rank 3's recv,
  send pairs (a cycle of 2 markers, 4 per step) were cut by its idle gaps instead, which
  its host work made look regular: 146 steps for the job's 119 (3 of the 4 such runs);
  its 4 TCP retransmits in 118 steps were a warning (a stage's evidence counts blocks).
- `pp_1f1b_healthy`: 1F1B, no fault.
- `pp_1f1b_hang_rank3`: 1F1B, rank 3 blocks forever before its 4th recv of step 7.

In a pipeline the slow stage is the one that waits least for the others in its sends and
receives (gloo's RecvWork/SendWork::wait, timed by Work::finishAndThrow); before those
probes nothing was said on the first two, and the hang was not seen (no collective).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workloads.harness import score

from argus.analyze.diagnosis import diagnose
from argus.recording.io import load_recording

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data"
SERIOUS = ("warning", "critical")


def _diag(name: str) -> tuple[dict, dict]:
    d = DATA / name
    return diagnose([load_recording(d)]), json.loads((d / "truth.json").read_text())


def _serious(report: dict) -> list[dict]:
    return [f for f in report["findings"] if f["severity"] in SERIOUS]


@pytest.mark.parametrize(("name", "rank"), [("pp_gpipe_slow_stage1", 1),
                                            ("pp_1f1b_straggler_rank3", 3),
                                            ("pp_1f1b_straggler_rank3_gaps", 3)])
def test_the_stage_that_waits_least_is_the_slow_stage(name, rank):
    report, truth = _diag(name)
    assert [f["ranks"] for f in truth["faults"]] == [[rank]]
    s = score(report, truth)
    assert s["steps_ok"] and s["ranks_ok"] and s["found"] and s["wrong"] == []
    (f,) = [f for f in _serious(report) if f["kind"] == "straggler"]
    assert (f["rank"], f["cause"], f["pipeline_stage"]) == (rank, "host", [rank])
    ev = f["evidence"]
    # one rank per stage on the world group: the two middle stages share a key and are
    # each other's peers, so they are two stages
    assert ev["stages"] == [[0], [1], [2], [3]]
    assert ev["metric"] == "p2p_wait_ns" and ev["least_wait_in_fraction_of_blocks"] >= 0.9
    assert ev["p2p_wait_ms"]["other_stages"] - ev["p2p_wait_ms"]["stage"] > 4.0
    assert ev["score"] >= 6 if "score" in ev else f["score"] >= 6
    # nothing else serious but the straggler's own hot function (1F1B: its host work)
    others = [(x["kind"], x.get("rank")) for x in _serious(report) if x is not f]
    assert others in ([], [("cpu_hotspot", rank)])


def test_a_healthy_pipeline_has_no_warning_and_its_steps():
    report, truth = _diag("pp_1f1b_healthy")
    assert truth["faults"] == []
    s = score(report, truth)
    assert s["steps_ok"] and s["ranks_ok"] and not s["false_alarm"], s
    assert [r["steps"] for r in report["ranks"]] == [148] * 4  # the job's 149, less the first


@pytest.mark.parametrize(("name", "steps"), [("pp_1f1b_straggler_rank3", 139),
                                             ("pp_1f1b_straggler_rank3_gaps", 118)])
def test_the_last_stages_steps_are_its_recv_send_pairs_merged_not_its_idle_gaps(name, steps):
    report, truth = _diag(name)
    assert truth["steps"] == {"min": steps + 1, "max": steps + 1}  # less the first
    assert [r["steps"] for r in report["ranks"]] == [steps] * 4


def test_a_rank_that_never_sends_or_receives_is_the_hang():
    """Ranks 0-2 are blocked in send/recv waits (in flight at the end); rank 3 is in none:
    it is the missing rank, named with the Python line it is stuck on."""
    report, truth = _diag("pp_1f1b_hang_rank3")
    (h,) = _serious(report)
    assert h["kind"] == "collective_hang"
    assert (h["missing_ranks"], h["waiting_ranks"], h["op"]) == ([3], [0, 1, 2], "recv")
    assert {w["call"] for w in h["waiting"]} <= {"c10d::ProcessGroupGloo::RecvWork::wait",
                                                 "c10d::ProcessGroupGloo::SendWork::wait"}
    assert "stuck_before_collective" in h["summary"]
    s = score(report, truth)
    assert s["found"] and s["steps_ok"]
    # the job's 7 steps before the hang (6 complete on rank 3, which hung in its 8th);
    # 3 were counted while rank 0's 8-marker step lost to a 15-marker window that recurs
    # every 16 markers
    assert truth["steps"] == {"min": 7, "max": 7}
    assert [r["steps"] for r in report["ranks"]] == [7, 7, 7, 6]
