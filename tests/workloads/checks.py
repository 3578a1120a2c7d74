"""What the zoo's bpf tests share (tests/bpf/test_zoo_*.py): the issue's "done when" per
run, as assertions, and the marker for what argus still gets wrong.

Each test module runs each of its shapes twice through tests/workloads/harness.py (the
procedure of scripts/zoo: the job's groups exist and it has warmed up before `argus attach`
starts; it is released on argus's `argus: tracing` line; `argus report --json` of the
recording is scored against the job's own truth): once healthy, once with one planted
fault. Per run and criterion one test:
- healthy: no warning/critical finding; argus's step count within 2 of the job's;
- fault: the fault found on the right rank and kind (straggler on the slowed rank or
  stage, collective_hang with missing_ranks == [the hung rank]) and no straggler / hang
  naming another rank; the step count within 2.
What the current argus fails is marked `known_wrong("<what, measured>")`: a strict xfail,
so the test fails the moment the diagnosis is fixed (then the marker goes)."""

from __future__ import annotations

from collections import Counter

import pytest

from workloads import harness as zh
from workloads import shapes as zoo


def known_wrong(what: str, strict: bool = True):
    """A strict xfail for an assertion the current argus fails (only an AssertionError
    counts: a run that could not be made is an error, never an expected failure).
    strict=False only for a false alarm seen in some runs, not all: a strict marker would
    make the tier flaky; the reason says how often it was seen."""
    return pytest.mark.xfail(strict=strict, raises=AssertionError, reason=f"issue 13: {what}")


def shape_params(shapes: list[str], check: str, known: dict) -> list:
    """`shapes` for a parametrize, each (check, shape) in `known` marked with its
    known_wrong(reason[, strict])."""
    out = []
    for s in shapes:
        k = known.get((check, s))
        if k is None:
            out.append(s)
        else:
            what, strict = (k, True) if isinstance(k, str) else k
            out.append(pytest.param(s, marks=known_wrong(what, strict)))
    return out


def check_no_serious_finding(run: dict) -> None:
    assert run["serious"] == [], f"{run['fault']}: argus said {zh.said(run['serious'])}"


def check_steps(run: dict) -> None:
    lo, hi = run["steps_job"]
    assert lo - 2 <= run["steps_argus"] <= hi + 2, (
        f"{run['fault']}: argus counted {run['steps_argus']} steps, the job made {lo}..{hi}")


def check_fault_found(run: dict) -> None:
    assert run["found"] is True and run["wrong"] == [], (
        f"{run['fault']}: argus said {zh.said(run['serious'])}")


def check_job_issued_its_sites(run: dict) -> None:
    """The job itself: every rank issued exactly the collectives shapes.sites() says, per
    group, over its steps (what the hang sites are drawn from)."""
    t = run["truth"]
    assert t["outcome"] == "completed" and t["steps"]["min"] == t["steps"]["max"] > 0
    for r in t["ranks"]:
        want: Counter = Counter()
        for site in zoo.sites(t["shape"], r["rank"], t["nproc"]):
            want[site.group] += sum(site.occurs(s) for s in range(r["steps_completed"]))
        assert r["collectives"] == dict(want), (r["rank"], r["collectives"], dict(want))


def cell(check: str):
    """Marks a ZooCells test with the check its known-wrong cells are keyed by."""

    def mark(f):
        f.zoo_check = check
        return f

    return mark


class ZooCells:
    """The checks of a zoo test module, one healthy and one faulty run per shape. A
    subclass sets FAULTS (shape -> planted fault), KNOWN ((check, shape) -> known_wrong
    reason, or (reason, strict)) and RUN_S; tests/bpf/conftest.py parametrizes `shape` with
    `shape_params`. Each (shape, healthy|fault) run is made once for the class."""

    FAULTS: dict = {}
    KNOWN: dict = {}
    RUN_S: float = zh.RUN_S

    @pytest.fixture(scope="class")
    @classmethod
    def runs(cls, tmp_path_factory):
        return zh.Runs(tmp_path_factory, cls.FAULTS, run_s=cls.RUN_S)

    @cell("sites")
    def test_the_job_issues_exactly_its_collectives(self, runs, shape):
        check_job_issued_its_sites(runs.get(shape, "healthy"))

    @cell("serious")
    def test_healthy_run_has_no_warning_or_critical_finding(self, runs, shape):
        check_no_serious_finding(runs.get(shape, "healthy"))

    @cell("steps")
    def test_healthy_run_step_count_within_2(self, runs, shape):
        check_steps(runs.get(shape, "healthy"))

    @cell("found")
    def test_planted_fault_found_on_the_right_rank_and_kind(self, runs, shape):
        check_fault_found(runs.get(shape, "fault"))

    @cell("fault_steps")
    def test_fault_run_step_count_within_2(self, runs, shape):
        check_steps(runs.get(shape, "fault"))
