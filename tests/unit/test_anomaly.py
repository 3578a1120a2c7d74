"""Anomalous windows on synthetic step-time series: which slowdowns are warnings."""

from __future__ import annotations

import polars as pl
import pytest

from argus.analyze.anomaly import detect_windows

pytestmark = pytest.mark.unit

BASE_MS = 20.0


def _metrics(slow: dict[int, float], steps: int = 30, ranks: int = 3) -> pl.DataFrame:
    """Per rank per step rows; step k takes BASE_MS * slow.get(k, 1) (+ a little jitter)."""
    rows, t = [], 0
    for k in range(steps):
        dur = int(BASE_MS * 1e6 * slow.get(k, 1.0)) + (k % 3) * 100_000
        for r in range(ranks):
            rows.append(
                {"rank": r, "step": k, "step_time_ns": dur, "start_ns": t, "end_ns": t + dur}
            )
        t += dur
    return pl.DataFrame(rows)


def _windows(slow, **kw):
    return [(w["start_step"], w["end_step"], w["severity"], w["warmup"])
            for w in detect_windows(_metrics(slow, **kw))]  # fmt: skip


def test_two_slow_steps_mid_run_are_a_hiccup_not_a_warning():
    assert _windows({14: 1.35, 15: 1.35}) == [(14, 15, "info", False)]


def test_slow_steps_mid_run_are_a_warning_when_they_cost_the_job_1_5_steps():
    assert _windows({14: 1.55, 15: 1.55, 16: 1.55}) == [(14, 16, "warning", False)]
    assert _windows({k: 1.35 for k in range(14, 19)}) == [(14, 18, "warning", False)]
    # tests/bpf/test_ddp_diagnosis.py's healthy 3-rank job: steps 6-8 at 1.32x (0.66 steps
    # lost in all, no CPU contention to explain them); a collective stall was built on it
    assert _windows({6: 1.25, 7: 1.32, 8: 1.4}) == [(6, 8, "info", False)]
    assert _windows({14: 1.35, 15: 1.35, 16: 1.35}) == [(14, 16, "info", False)]


def test_one_step_twice_as_slow_is_a_warning():
    assert _windows({20: 2.5}) == [(20, 20, "warning", False)]


def test_slow_first_steps_are_warmup():
    # the healthy DDP job of tests/bpf/test_ddp_diagnosis.py once showed steps 1-2 at 1.31x
    assert _windows({1: 1.31, 2: 1.31}) == [(1, 2, "info", True)]
    assert _windows({0: 1.6, 1: 1.6, 2: 1.6, 3: 1.6}) == [(0, 3, "info", True)]
    # test_ddp_diagnosis.py's healthy 3-rank job on a busy machine: step 0 at 2.2x (52 ms
    # for 24); a collective stall was built on the warning window
    assert _windows({0: 2.2}) == [(0, 0, "info", True)]
    assert _windows({0: 2.2, 1: 2.2, 2: 2.2}) == [(0, 2, "warning", False)]


def test_warmup_does_not_hide_a_severe_or_later_slowdown():
    assert _windows({0: 3.0}) == [(0, 0, "warning", False)]
    assert _windows({3: 1.5, 4: 1.5, 5: 1.5}) == [(3, 5, "warning", False)]


def test_steady_job_has_no_window():
    assert _windows({}) == []
