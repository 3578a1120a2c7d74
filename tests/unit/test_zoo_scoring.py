"""The zoo harness's scoring and draws (tests/workloads/harness.py), on hand-made reports:
what counts as found, wrong, a false alarm and a step count within 2."""

from __future__ import annotations

import random

import pytest
from workloads import harness as zh
from workloads import launch
from workloads import shapes as zoo

pytestmark = pytest.mark.unit


def _truth(faults, lo=100, hi=100):
    ranks = [{"rank": r, "pid": 1000 + r, "steps_completed": hi, "step_time_ms": [50.0]}
             for r in range(4)]
    return {"faults": faults, "steps": {"min": lo, "max": hi}, "ranks": ranks}


def _report(findings, count=100, ranks=None):
    ranks = ranks if ranks is not None else [{"rank": r, "tgid": 1000 + r} for r in range(4)]
    return {"steps": {"detected": True, "count": count}, "findings": findings, "ranks": ranks}


def _f(kind, severity="warning", **kw):
    return {"kind": kind, "severity": severity, **kw}


def test_healthy_run_false_alarm_is_any_warning_or_critical():
    s = zh.score(_report([_f("cpu_hotspot", "info", rank=0)]), _truth([]))
    assert (s["found"], s["false_alarm"], s["steps_ok"], s["ranks_ok"]) == (None, False, True, True)
    s = zh.score(_report([_f("anomalous_window")]), _truth([]))
    assert s["false_alarm"] is True


def test_straggler_found_only_on_its_rank_and_others_are_wrong():
    truth = _truth([{"kind": "straggler", "ranks": [2]}])
    s = zh.score(_report([_f("straggler", "critical", rank=2), _f("anomalous_window")]), truth)
    assert (s["found"], s["wrong"], s["other"]) == (True, [], [])
    s = zh.score(_report([_f("straggler", rank=1), _f("collective_stall")]), truth)
    assert s["found"] is False
    assert s["wrong"] == ["warn straggler r1"] and s["other"] == ["warn collective_stall"]
    s = zh.score(_report([_f("straggler", "info", rank=2)]), truth)  # info is not a finding
    assert s["found"] is False


def test_slow_stage_needs_every_rank_of_the_stage():
    truth = _truth([{"kind": "slow_stage", "ranks": [1, 3]}])
    assert zh.score(_report([_f("straggler", rank=1)]), truth)["found"] is False
    both = [_f("straggler", rank=1), _f("straggler", rank=3)]
    assert zh.score(_report(both), truth)["found"] is True


def test_hang_found_only_with_exactly_the_hung_rank_missing():
    truth = _truth([{"kind": "hang", "ranks": [1]}], lo=7, hi=8)
    hang = _f("collective_hang", "critical", missing_ranks=[1], waiting_ranks=[0, 2, 3])
    s = zh.score(_report([hang], count=6), truth)
    assert (s["found"], s["steps_ok"]) == (True, True)
    two = _f("collective_hang", "critical", missing_ranks=[0, 1], waiting_ranks=[2, 3])
    s = zh.score(_report([two], count=11), truth)
    assert s["found"] is False and len(s["wrong"]) == 1 and s["steps_ok"] is False


@pytest.mark.parametrize("count,ok", [(97, False), (98, True), (102, True), (103, False)])
def test_step_count_within_2(count, ok):
    assert zh.score(_report([], count=count), _truth([]))["steps_ok"] is ok


def test_undetected_steps_count_zero_and_wrong_rank_numbers_are_seen():
    rep = {"steps": {"detected": False, "count": None}, "findings": [],
           "ranks": [{"rank": 0, "tgid": 1000 + r} for r in range(4)]}
    s = zh.score(rep, _truth([]))
    assert (s["steps_argus"], s["steps_ok"], s["ranks_ok"]) == (0, False, False)


@pytest.mark.parametrize("shape", zoo.SHAPES)
def test_hang_draws_land_on_a_site_the_rank_issues_in_that_step(shape):
    rng = random.Random(5)
    for _ in range(50):
        h = zh.draw("hang", shape, rng, 50.0).hang
        sites = zoo.sites(shape, h["rank"])
        site = zoo.Site(h["group"], h["op"], h["nth"])
        match = [s for s in sites if (s.group, s.op, s.nth) == (site.group, site.op, site.nth)]
        assert len(match) == 1 and match[0].occurs(h["step"])
        assert zh.HANG_STEPS[0] <= h["step"] < zh.HANG_STEPS[1] + zoo.METRICS_EVERY


def test_sim_faults_map_onto_the_simulators_specs(tmp_path):
    job = launch.Job.__new__(launch.Job)  # the mapping only, no process started
    job.faults = launch.Faults(straggler=(2, 10.0), hang={"rank": 1, "group": "tp",
                                                          "op": "allreduce", "step": 8, "nth": 2},
                               slow_stage=(1, 25.0))
    job.base_ms = 60.0
    assert job._sim_faults() == ["host_stall:rank=2,ms=6.000",
                                 "hang:rank=1,at=66,comm=tp",  # 8 steps x 8 TP + 2
                                 "bubble:stage=1,factor=1.250"]
    from argus.sim.faults import parse_fault

    stall, hang, bubble = job._sim_faults()
    assert parse_fault(stall, 4).params == {"ms": 6.0}
    assert parse_fault(hang, 4, tp=2, warmup_steps=1).params == {"at": 66, "comm": "tp",
                                                                 "comm_seq": 74}
    assert parse_fault(bubble, 4, pp=2).ranks == [1, 3]
