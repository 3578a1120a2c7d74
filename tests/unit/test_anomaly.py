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
            for w in detect_windows(_metrics(slow, **kw))]


def test_two_slow_steps_mid_run_are_a_hiccup_not_a_warning():
    assert _windows({14: 1.35, 15: 1.35}) == [(14, 15, "info", False)]


def test_slow_steps_mid_run_are_a_warning_when_they_cost_the_job_1_5_steps():
    assert _windows({14: 1.55, 15: 1.55, 16: 1.55}) == [(14, 16, "warning", False)]
    assert _windows({k: 1.35 for k in range(14, 19)}) == [(14, 18, "warning", False)]
    # tests/bpf/test_ddp_diagnosis.py's healthy 3-rank job: steps 6-8 at 1.32x (0.66 steps
    # lost in all, no CPU contention to explain them); a collective stall was built on it
    assert _windows({6: 1.25, 7: 1.32, 8: 1.4}) == [(6, 8, "info", False)]
    assert _windows({14: 1.35, 15: 1.35, 16: 1.35}) == [(14, 16, "info", False)]


def test_one_or_two_slow_steps_are_a_warning_only_from_3x():
    # 2 of 80 healthy real torch runs of the zoo (2 vCPUs): step 30 at 2.12x (a collective
    # stall was built on it) and steps 92-93 at 2.05x
    assert _windows({20: 2.5}) == [(20, 20, "info", False)]
    assert _windows({20: 2.05, 21: 2.05}) == [(20, 21, "info", False)]
    assert _windows({20: 2.05, 22: 2.1}) == [(20, 22, "info", False)]
    # a JIT compile, a stop of the world: one step at 3x or more
    assert _windows({20: 3.2}) == [(20, 20, "warning", False)]
    assert _windows({20: 3.2, 21: 3.2}) == [(20, 21, "warning", False)]
    # three steps at 2x are sustained
    assert _windows({20: 2.05, 21: 2.05, 22: 2.05}) == [(20, 22, "warning", False)]


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


# --- settle: sustained windows the run's own rate of slow steps explains -------------------

WINDOW = {58: 1.45, 59: 1.55, 61: 1.55}  # 3 slow steps of 4, 1.5x, 1.55 steps lost


def _noisy(window: dict[int, float], every: int = 12, steps: int = 96) -> dict[int, float]:
    """Slow single steps (1.45x) every `every` steps, as the healthy TP x DP job on 2 vCPUs
    had them, plus `window`."""
    slow = {k: 1.45 for k in range(5, steps, every)}
    return slow | window


def test_a_dense_window_in_a_run_of_scattered_slow_steps_is_chance():
    from argus.analyze.anomaly import settle

    # 3 slow steps of 4 at 1.5x (1.55 steps lost), slow steps elsewhere at ~8 %
    ws = detect_windows(_metrics(_noisy(WINDOW), steps=96))
    (w,) = [w for w in ws if w["start_step"] == 58]
    assert (w["end_step"], w["anomalous_steps"], w["severity"]) == (61, 3, "warning")
    assert w["chance"] > 0.01
    settle(ws, [])
    assert w["severity"] == "info" and w["by_chance"] is True
    assert "3 slow steps of 4" in w["summary"]
    assert [x for x in ws if x["severity"] != "info"] == []


def test_the_same_window_in_a_steady_run_or_with_its_straggler_stays_a_warning():
    from argus.analyze.anomaly import settle

    ws = detect_windows(_metrics(WINDOW, steps=96))
    settle(ws, [])
    assert [(w["start_step"], w["severity"], w["chance"]) for w in ws] == [(58, "warning", 0.0)]
    ws = detect_windows(_metrics(_noisy(WINDOW), steps=96))
    settle(ws, [{"kind": "straggler", "rank": 2, "start_step": 59, "end_step": 61}])
    assert [w["severity"] for w in ws if w["start_step"] == 58] == ["warning"]


def test_a_sustained_slowdown_is_never_chance():
    from argus.analyze.anomaly import settle

    ws = detect_windows(_metrics(_noisy({k: 1.4 for k in range(40, 52)}), steps=96))
    settle(ws, [])
    (w,) = [w for w in ws if w["start_step"] <= 40 <= w["end_step"]]
    assert w["severity"] == "warning" and w["chance"] < 1e-6


def test_two_slow_steps_around_a_normal_one_are_not_sustained():
    # the healthy TP x DP job: steps 38 (1.7x) and 40 (1.9x), 39 normal: a window of 3 steps
    # of which 2 are slow (a collective stall was built on it)
    assert _windows({38: 1.7, 40: 1.9}, steps=60) == [(38, 40, "info", False)]


# --- a host that reads back only every n steps --------------------------------------------

def _sync_every(n: int, steps: int = 140, slow: dict[int, float] | None = None):
    """sim_sync_every_n's host step times: n - 2 short run-ahead steps (~6 ms), the read-back
    step that waits for the GPU (~211 ms) and the one after it (~36 ms); `slow` multiplies
    whole cycles' steps (cycle index -> factor)."""
    shape = [6.0] * (n - 2) + [211.0, 36.0]
    rows, t = [], 0
    for k in range(steps):
        dur = int((shape[k % n] + 0.3 * (k % 3)) * 1e6 * (slow or {}).get(k // n, 1.0))
        for r in range(4):
            rows.append({"rank": r, "step": k, "step_time_ns": dur, "start_ns": t,
                         "end_ns": t + dur})
        t += dur
    return pl.DataFrame(rows)


def test_the_sync_period_of_a_host_that_runs_ahead_is_found():
    from argus.analyze.anomaly import step_series, sync_period, typical_step_ns

    assert sync_period(step_series(_sync_every(5))) == 5
    assert sync_period(step_series(_sync_every(8))) == 8
    assert sync_period(step_series(_metrics({}, steps=60))) == 1
    assert sync_period(step_series(_metrics(_noisy({}), steps=96))) == 1  # scattered, no cycle
    # the job's step: a cycle's mean (5 steps in 6+6+6+211+36 ms), not the median step (6 ms)
    assert typical_step_ns(_sync_every(5)) / 1e6 == pytest.approx(53.3, abs=0.5)


def test_its_sync_steps_are_no_windows_but_slower_cycles_are():
    assert detect_windows(_sync_every(5)) == []
    ws = detect_windows(_sync_every(5, slow={k: 1.6 for k in range(12, 18)}))
    assert [(w["start_step"], w["end_step"], w["steps"], w["sync_every"], w["severity"])
            for w in ws] == [(60, 89, 30, 5, "warning")]
