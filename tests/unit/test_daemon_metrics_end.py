"""Metrics that end with the job (docs/daemon.md, "Metrics"), no root: a job whose ranks have
all exited has no series in /metrics from the interval that saw it end (its view stays in
/state for `job_grace_s`), a rank gone from a running job keeps only `argus_rank_up` 0,
and a traced rank has `argus_rank_up` 1 beside its other series."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from argus.collect.tracer import TraceOptions
from argus.daemon.service import Daemon, DaemonOptions, _as_of, _Job
from argus.present.live import node_state
from argus.present.metrics import RANK_GAUGES, LiveCollector
from argus.recording import schema

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.fakeproc import make_process  # noqa: E402

pytestmark = pytest.mark.unit


def _rank(rank: int, tgid: int, exited: bool = False, score: float = 0.0) -> dict:
    return {"rank": rank, "tgid": tgid, "host": "n1", "steps": 9, "step_time_ms": 50.0,
            "compute_ms": 40.0, "wait_ms": 10.0, "coll_wait_ms": 8.0, "lateness_ms": 1.0,
            "straggler": score > 0, "straggler_score": score, "hang": False,
            "hang_waited_s": 0.0, "probes": 7, "exited": exited}


def _view(job: str, ranks: list[dict], **extra) -> dict:
    return {"job": job, "host": "n1", "ranks": ranks, "steps": {}, "findings": [],
            "drops": {}, **extra}


def _series(state: dict) -> dict[tuple[str, str, str], float]:
    """(metric, job_id, rank) -> value of every per-rank series."""
    reg = CollectorRegistry()
    reg.register(LiveCollector(lambda: state))
    out = {}
    for fam in reg.collect():
        for s in fam.samples:
            if "job_id" in s.labels:
                out[(s.name, s.labels["job_id"], s.labels["rank"])] = s.value
    return out


def test_an_ended_job_has_no_series_and_a_gone_rank_only_rank_up_zero():
    state = node_state("n1", [
        _view("run", [_rank(0, 10), _rank(1, 11, score=4.5), _rank(2, 12, exited=True)]),
        _view("done", [_rank(0, 20, exited=True), _rank(1, 21, exited=True, score=5.0)],
              ended=True),
    ], 1, targets=2)
    got = _series(state)
    assert not [k for k in got if k[1] == "done"]  # the finished job: nothing
    assert got[("argus_straggler_score", "run", "1")] == 4.5
    assert got[("argus_rank_up", "run", "0")] == 1 and got[("argus_rank_up", "run", "1")] == 1
    assert got[("argus_rank_up", "run", "2")] == 0
    assert [k for k in got if k[2] == "2"] == [("argus_rank_up", "run", "2")]
    # every gauge for a traced rank
    assert {k[0] for k in got if k[2] == "0"} == {n for n, *_ in RANK_GAUGES} | {"argus_rank_up"}
    reg = CollectorRegistry()
    reg.register(LiveCollector(lambda: state))
    assert 'argus_jobs{host="n1"} 1.0' in generate_latest(reg).decode()  # running jobs only


def test_as_of_marks_the_ranks_gone_now_and_the_job_ended_when_all_are():
    view = _view("j", [_rank(0, 10), _rank(1, 11)])
    targets = {10: SimpleNamespace(exited=False), 11: SimpleNamespace(exited=True)}
    one = _as_of(view, [10, 11], targets)
    assert [r["exited"] for r in one["ranks"]] == [False, True] and one["ended"] is False
    both = _as_of(view, [10, 11], {})  # forgotten by the tracer: exited
    assert [r["exited"] for r in both["ranks"]] == [True, True] and both["ended"] is True
    assert view["ranks"][1]["exited"] is False and "ended" not in view  # not changed


def _tracer(targets: dict):
    return SimpleNamespace(
        targets_view=targets, uprobe_count=0, mono_to_wall_ns=0, forget_exited=lambda: [],
        drops=lambda: {}, drain=lambda: (schema.empty_events(), schema.empty_events(),
                                         schema.empty_stacks(), schema.empty_host()),
        kernels=SimpleNamespace(take=lambda: None))


def test_the_interval_that_sees_a_job_end_drops_its_series_and_keeps_its_view(tmp_path):
    d = Daemon(DaemonOptions(output=tmp_path / "out", metrics_addr=None))
    d.tracer = _tracer({t: SimpleNamespace(exited=True, traced=True) for t in (10, 11)})
    d.jobs["j"] = _Job("j", tgids={10, 11},
                       view=_view("j", [_rank(0, 10), _rank(1, 11, score=4.0)]))
    assert _series(node_state("n1", [d.jobs["j"].view], 1))[("argus_straggler_score", "j",
                                                             "1")] == 4.0
    d.flush()
    (job,) = d.state()["jobs"]
    assert job["job"] == "j" and job["ended"] is True and all(r["exited"] for r in job["ranks"])
    assert _series(d.state()) == {}
    assert d.jobs["j"].ended_mono is not None  # forgotten after job_grace_s, not now


def test_a_job_traced_but_not_analysed_yet_is_in_state_with_its_ranks_up(tmp_path):
    """A new job's ranks settle for a few intervals before its first analysis (and a nice-10
    daemon's analysis waits for the CPU on a busy node: 12.8 s per flush beside a CPU hog per
    core): it is in /state from the first interval that traces it, its ranks up in
    /metrics, nothing measured until analysed."""
    proc = tmp_path / "proc"
    for tgid in (10, 11, 12):
        make_process(proc, tgid)
    d = Daemon(DaemonOptions(output=tmp_path / "out", metrics_addr=None,
                             trace=TraceOptions(proc_root=str(proc))))
    targets = {10: SimpleNamespace(exited=False, traced=True, rank=0),
               11: SimpleNamespace(exited=False, traced=True, rank=1),
               12: SimpleNamespace(exited=False, traced=False, rank=2)}  # not placed yet
    d.tracer = _tracer(targets)
    d.tracer.probes_of = lambda tgid: 9
    d.jobs["j"] = job = _Job("j", tgids={10, 11, 12})
    job.win.joined_ns = time.monotonic_ns()  # just joined: settling
    d.flush()
    assert job.view is None  # not analysed
    (view,) = d.state()["jobs"]
    assert (view["job"], view["analysed"], view["ended"], view["findings"]) == ("j", False,
                                                                                False, [])
    assert [(r["rank"], r["tgid"], r["probes"], r["exited"], r["step_time_ms"], r["straggler"])
            for r in view["ranks"]] == [(0, 10, 9, False, None, None), (1, 11, 9, False, None,
                                                                            None)]
    assert _series(d.state()) == {(m, "j", r): v for r in ("0", "1") for m, v in (
        ("argus_rank_up", 1.0), ("argus_probes_attached", 9.0), ("argus_steps", 0.0))}
    targets[11].exited = True
    d.flush()
    (view,) = d.state()["jobs"]
    assert [r["exited"] for r in view["ranks"]] == [False, True] and not view["ended"]


def test_a_rank_gone_from_proc_is_exited_at_the_next_request_before_any_interval(tmp_path):
    """/state and /metrics check the ranks of running jobs against /proc when asked: a rank
    that exited is `exited` at once, a job whose ranks all exited is `ended` with no series,
    even while the interval's analysis that would see it has not come (a busy node)."""
    proc = tmp_path / "proc"
    for tgid in (10, 11):
        make_process(proc, tgid)
    d = Daemon(DaemonOptions(output=tmp_path / "out", metrics_addr=None,
                             trace=TraceOptions(proc_root=str(proc))))
    d._state = node_state("n1", [_view("j", [_rank(0, 10), _rank(1, 11, score=4.0)],
                                       ended=False)], 1, targets=2)
    assert [r["exited"] for r in d.state()["jobs"][0]["ranks"]] == [False, False]
    assert _series(d.state())[("argus_straggler_score", "j", "1")] == 4.0
    assert d.state()["targets"] == 2
    shutil.rmtree(proc / "11")
    make_process(proc, 11, state="Z")  # exited, not reaped yet: gone too
    (job,) = d.state()["jobs"]
    assert [r["exited"] for r in job["ranks"]] == [False, True] and job["ended"] is False
    assert d.state()["targets"] == 1  # the traced processes still running, as /proc has it
    assert set(_series(d.state())) == {("argus_rank_up", "j", "1")} | {
        (n, "j", "0") for n, *_ in RANK_GAUGES} | {("argus_rank_up", "j", "0")}
    shutil.rmtree(proc / "10")
    (job,) = d.state()["jobs"]
    assert job["ended"] is True and all(r["exited"] for r in job["ranks"])
    assert _series(d.state()) == {}
    assert d.state()["targets"] == 0
    assert d._state["jobs"][0]["ended"] is False  # the interval's state itself: unchanged
