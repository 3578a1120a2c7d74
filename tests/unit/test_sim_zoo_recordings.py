"""The straggler detector on recordings of the zoo's simulated shapes with a 5 % host
straggler (tests/data, 2026-12-03, `scripts/zoo --shapes sim_pp,sim_sync_every_n --faults
straggler5 --runs 5 --keep DIR`, seed 1; truth.json is the job's own). 5 % of the
simulator's nominal 50 ms step, 2.5 ms per step:

- `sim_pp_straggler_rank2_5pct`: 2 pipeline stages x 2 data-parallel ranks, rank 2 (stage
  1) works 2.5 ms longer before each step than its stage peer (3.5 % of the 69.8 ms step),
  step by step excess / noise 3.6: missed in 5 of 5 runs until host work was compared over
  blocks of steps within a stage (the most in all 23 blocks of 5 steps: the sign test among
  the stage's 2 ranks, z = (23 - 11.5) / sqrt(23 / 4) = 4.8).
- `sim_sync_every_n_straggler_rank3_5pct`: the host reads back every 5th step; rank 3 is
  the latest over 5-step cycles in 23 of 27; judged over blocks of 5 cycles (5 blocks) the
  sign test could not reach 4 (at most (5 - 1.25) / sqrt(5 x 3/16) = 3.9): missed in 5 of 5
  runs until a cycle was its own block.
- `sim_sync_every_n_straggler_rank0_loaded` (same day, `scripts/with-load scripts/zoo
  --shapes sim_sync_every_n --faults healthy,straggler25 --runs 2`: one CPU hog per vCPU
  beside it): rank 0 burns the host's idle and 25 % more (58.9 ms per step), the job 53.7 ->
  75.5 ms per step. Rank 0, late by over a step at its collectives, was aligned a whole step
  (4 equal buckets) off the others by entry time: its first bucket of a step nearest their
  next step's; the summaries' steps realigned it, the raw report did not (they differed),
  and its steps' median with the others' lost the 5th-step wait (the 5-step phases
  explained 71 % of the step-time variance, < 80 %: no sync period, ranks 3 and 1 named
  critical stragglers of single steps). Both paths now realign by steps.
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


def _run(name: str):
    d = DATA / name
    truth = json.loads((d / "truth.json").read_text())
    report = diagnose([load_recording(d)])
    s = score(report, truth)
    (f,) = [f for f in report["findings"] if f["kind"] == "straggler"]
    return report, truth, s, f


def test_a_pipeline_stages_slower_dp_rank_is_found_over_blocks_within_its_stage():
    report, truth, s, f = _run("sim_pp_straggler_rank2_5pct")
    assert [x["ranks"] for x in truth["faults"]] == [[2]]
    assert s["found"] and s["steps_ok"] and s["ranks_ok"] and s["wrong"] == [], s
    ev = f["evidence"]
    assert (f["rank"], f["cause"], ev["metric"]) == (2, "host", "host_gap_ns")
    assert (ev["blocks"], ev["block_steps"], ev["slowest_in_fraction_of_blocks"]) == (23, 5, 1.0)
    assert f["score"] == pytest.approx((23 - 11.5) / (23 / 4) ** 0.5, abs=0.01)
    assert ev["host_gap_score"] < 4  # step by step: not a finding
    assert 2.0 <= ev["excess_ms"] <= 3.0  # the planted 2.5 ms


def test_a_host_that_reads_back_every_n_steps_is_judged_over_blocks_of_cycles():
    report, truth, s, f = _run("sim_sync_every_n_straggler_rank3_5pct")
    assert [x["ranks"] for x in truth["faults"]] == [[3]]
    assert s["found"] and s["steps_ok"] and s["ranks_ok"] and s["wrong"] == [], s
    ev = f["evidence"]
    assert (f["rank"], f["cause"], ev["sync_every"]) == (3, "host", 5)
    # one 5-step cycle per block: 27 blocks, the latest in 23
    assert (ev["blocks"], ev["block_steps"]) == (27, 5)
    assert round(ev["slowest_in_fraction_of_blocks"] * 27) == 23
    assert f["score"] == pytest.approx((23 - 27 / 4) / (27 * 3 / 16) ** 0.5, abs=0.01)
    assert [x["kind"] for x in report["findings"] if x["severity"] != "info"] == ["straggler"]


def test_a_loaded_hosts_sync_period_is_still_found_and_its_straggler_named():
    d = DATA / "sim_sync_every_n_straggler_rank0_loaded"
    truth = json.loads((d / "truth.json").read_text())
    report = diagnose([load_recording(d)])
    s = score(report, truth)
    assert [x["ranks"] for x in truth["faults"]] == [[0]]
    assert s["found"] and s["wrong"] == [] and s["steps_ok"], s
    (f,) = [f for f in report["findings"] if f["kind"] == "straggler"]
    ev = f["evidence"]
    # judged over 5-step cycles; over a step late at its collectives once aligned right
    # (the others run up to 5 steps ahead of their GPU, it does not)
    assert (f["rank"], f["severity"], ev["metric"], ev["sync_every"]) == (
        0, "critical", "lateness_ns", 5)
    assert ev["lateness_ms"]["rank"] > 75.5 > abs(ev["lateness_ms"]["others"])
    assert 10.0 <= ev["host_gap_ms"]["rank"] - ev["host_gap_ms"]["others"] <= 15.0
