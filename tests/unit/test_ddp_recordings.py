"""The analysers on real recordings: PyTorch DDP (CPU, gloo) under torchrun, and a pipeline
job of the simulator (tests/data).

- `ddp_gloo_slow_rank1`: 3 ranks x 30 steps of tests/bpf/ddp_train.py, `--compute-ms 20
  --slow-rank 1 --slow-ms 60` (rank 1 burns 60 ms of CPU in slow_rank_compute() each step).
- `ddp_gloo_healthy`: 3 ranks x 30 steps, `--compute-ms 20`.
- `sim_bubble`: `scripts/simulate --ranks 4 --pp 2 --fault bubble:stage=1,factor=2`, with
  the simulated GPUs' NVML samples (gpu.parquet).
Re-record with tests/bpf/test_ddp_diagnosis.py's recipe (and argus.cli.demo.run_demo).
Steps come from the torch channel only (c10d allreduce, one per step: no sizes, so every
call is a step marker); assertions are on kinds, ranks and counts.
"""

from __future__ import annotations

import json
from pathlib import Path

from argus.analyze.diagnosis import diagnose
from argus.recording.io import load_recording
from argus.sim.expect import SERIOUS, score

DATA = Path(__file__).resolve().parents[1] / "data"


def _diag(name: str):
    d = DATA / name
    return diagnose([load_recording(d)]), json.loads((d / "truth.json").read_text())


def _stragglers(report):
    return [f for f in report["findings"] if f["kind"] == "straggler" and f["severity"] in SERIOUS]


def test_ddp_slow_rank_is_the_straggler_and_nobody_else():
    report, truth = _diag("ddp_gloo_slow_rank1")
    assert [t["slow_ms"] > 0 for t in truth] == [False, True, False]
    st = report["steps"]
    assert st["detected"] and st["method"] == "torch" and st["collectives_per_step"] == 1
    assert st["comm"] == "pg0" and 28 <= st["count"] <= 30  # the partial first/last drop out
    assert all(r["steps"] >= 27 for r in report["ranks"])
    (f,) = _stragglers(report)
    assert (f["rank"], f["cause"], f["start_step"]) == (1, "host", None)
    ev = f["evidence"]
    assert ev["metric"] == "lateness_ns"
    # the others wait for it inside gloo's AsyncWork::execute (their collective wait)
    assert ev["coll_wait_ms"]["others"] > ev["coll_wait_ms"]["rank"]
    serious = [x for x in report["findings"] if x["severity"] in SERIOUS]
    assert all(x.get("rank") in (1, None) for x in serious), serious


def test_ddp_healthy_has_no_warning():
    report, truth = _diag("ddp_gloo_healthy")
    assert all(t["slow_ms"] == 0 for t in truth)
    assert report["steps"]["detected"] and report["steps"]["method"] == "torch"
    assert [x for x in report["findings"] if x["severity"] in SERIOUS] == []


def test_pipeline_bubble_names_the_slow_stage():
    report, truth = _diag("sim_bubble")
    # steps of the whole pattern on every rank: a stage's 4 sends, 4 receives and 4
    # data-parallel allreduces; the job's 30 steps on every rank (stage 1 counted 29
    # while half its send/recv markers were dropped: NCCL numbers sends and receives apart)
    assert [r["steps"] for r in report["ranks"]] == [30, 30, 30, 30]
    assert [r["steps_completed"] for r in truth["ranks"]] == [30] * 4
    assert report["steps"]["count"] == 30 and report["steps"]["collectives_per_step"] == 12
    stragglers = _stragglers(report)
    assert sorted(f["rank"] for f in stragglers) == [1, 3]
    for f in stragglers:
        assert f["pipeline_stage"] == [1, 3] and f["cause"] == "gpu"
        assert f["evidence"]["metric"] == "gpu_util_pct"
    s = score(report, truth)
    assert s["faults"][0]["found"]
    assert not [x for x in s["false_alarms"] if x["kind"] in ("straggler", "collective_stall")]
