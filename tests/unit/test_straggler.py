"""Straggler scopes on a step series measured on the simulator (2 ranks, 30 steps).

`host_stall:rank=0,ms=28,start=9` (scripts/accuracy's missed draw): rank 0's host arrival
lateness per step, in ms, as argus measured it under CPU load. With 2 ranks the other
rank's lateness is the mirror image. The slowdown is moderate (1.5x) and starts at step 9
of 30: over the whole recording the lateness is bimodal, so its spread is the fault itself.
"""

from __future__ import annotations

import polars as pl
import pytest

from argus.analyze.anomaly import detect_windows
from argus.analyze.straggler import detect_stragglers

pytestmark = pytest.mark.unit

LATE_MS = [0.4, 1.6, -0.1, 1.6, 1.5, 0.3, 0.5, -0.3, 0.3,  # steps 0-8: healthy
           13.1, 13.5, 4.6, 17.2, 19.9, 18.0, 29.4, 13.3, 13.0, 17.9, 14.1, 15.2, 14.1,
           13.8, 13.8, 14.1, 18.4, 14.8, 17.0, 14.9, 13.4]
STEP_MS = [61.4, 57.6, 58.0, 57.6, 54.5, 56.7, 57.6, 57.6, 57.3,
           84.7, 82.6, 85.0, 89.3, 92.0, 111.1, 92.9, 86.6, 89.3, 90.7, 82.6, 85.4, 82.6,
           86.0, 82.6, 86.6, 90.2, 83.8, 87.7, 84.4, 83.9]


def _metrics(late_ms: list[float]) -> pl.DataFrame:
    rows, t = [], 0
    for step, (late, dur) in enumerate(zip(late_ms, STEP_MS, strict=True)):
        for rank, sign in ((0, 1), (1, -1)):
            rows.append({
                "rank": rank, "step": step, "step_time_ns": int(dur * 1e6),
                "start_ns": t, "end_ns": t + int(dur * 1e6),
                "lateness_ns": int(sign * late * 1e6), "compute_wait_ns": 1_000_000,
                "sync_wait_ns": 500_000, "coll_wait_ns": int(max(0.0, -sign * late) * 1e6),
                "host_gap_ns": 0,
            })
        t += int(dur * 1e6)
    return pl.DataFrame(rows)


def _find(late_ms):
    m = _metrics(late_ms)
    windows = detect_windows(m)
    step_ns = float(m["step_time_ns"].median())
    return windows, detect_stragglers(m, windows, step_ns)


def test_moderate_stall_from_mid_run_is_found_in_its_window():
    windows, found = _find(LATE_MS)
    assert [(w["start_step"], w["end_step"], w["severity"]) for w in windows] == [
        (9, 29, "warning")
    ]
    assert [(f["rank"], f["cause"], f["start_step"], f["end_step"]) for f in found] == [
        (0, "host", 9, 29)
    ]
    # scored against rank 0's noise in steps 0-8 (~1 ms), not the whole recording's (~11 ms)
    assert found[0]["score"] > 4 and found[0]["evidence"]["noise_ms"] < 5


def test_the_same_series_without_the_stall_has_no_straggler():
    calm = LATE_MS[:9] * 4
    _, found = _find(calm[:30])
    assert found == []


# --- the waits-least metric (straggler.least_wait): consistency, not spread ---------------

def _waits(excess_ms: float, least: int, spread_ms: float, steps: int = 80, ranks: int = 4,
           seed: int = 7) -> pl.DataFrame:
    """Per (rank, step) a collective wait of ~30 ms with `spread_ms` of noise; rank `least`
    waits `excess_ms` less (the rank the others wait for)."""
    import random

    rnd = random.Random(seed)
    rows = []
    for step in range(steps):
        for rank in range(ranks):
            w = 30.0 + rnd.gauss(0.0, spread_ms) - (excess_ms if rank == least else 0.0)
            rows.append({"rank": rank, "step": step, "coll_wait_ns": int(max(w, 0.0) * 1e6)})
    return pl.DataFrame(rows)


def test_sign_z_is_the_sign_tests_z():
    from argus.analyze.straggler import sign_z

    assert sign_z(17, 17, 4) == pytest.approx((17 - 17 / 4) / (17 * 0.25 * 0.75) ** 0.5)
    assert sign_z(4, 16, 4) == 0.0  # as often as chance
    assert sign_z(3, 0, 4) == 0.0 and sign_z(3, 5, 1) == 0.0


def test_a_consistent_least_waiter_is_flagged_however_much_its_blocks_spread():
    """A 6 ms per-step excess under 6 ms of per-step noise (the zoo's TP x DP straggler on 2
    vCPUs: spread score 1.8, the least in every block): flagged by its consistency."""
    from argus.analyze.straggler import least_wait

    got = least_wait(_waits(6.0, least=1, spread_ms=6.0), "coll_wait_ns", 90e6)
    assert list(got) == [1]
    s = got[1]
    assert s["blocks"] == 16 and s["steps"] == 80 and s["slowest_fraction"] >= 0.9
    assert s["spread_score"] < 4 <= s["score"]  # the spread alone would not have told
    assert 4.5e6 <= s["excess_ns"] <= 7.5e6


def test_alike_ranks_and_a_consistent_but_tiny_difference_are_not_flagged():
    from argus.analyze.straggler import least_wait

    assert least_wait(_waits(0.0, least=1, spread_ms=6.0), "coll_wait_ns", 90e6) == {}
    # the least in every block, but by 1 % of the step (< MIN_IMPACT, 3 %): a role, not a fault
    assert least_wait(_waits(0.9, least=1, spread_ms=0.1), "coll_wait_ns", 90e6) == {}
    # four blocks are too few to tell (z = 3.5 when the least in all four)
    assert least_wait(_waits(6.0, least=1, spread_ms=0.5, steps=20), "coll_wait_ns",
                      90e6) == {}


def test_a_host_that_reads_back_every_n_steps_is_scored_over_its_cycles():
    """sim_sync_every_n's straggler: its host falls behind within each 5-step cycle and
    catches up at the read-back (lateness 0, 25, 50, 75, 0 ms against the others' ~0), the
    others wait at the read-back instead. Per step its lateness spreads as widely as it is
    large; per cycle it is the same every time."""
    import random

    rnd = random.Random(3)
    rows, t = [], 0
    for step in range(100):
        dur = int((211.0 if step % 5 == 3 else 6.0) * 1e6)
        for rank in range(4):
            late = [0.0, 25.0, 50.0, 75.0, 0.0][step % 5] if rank == 1 else rnd.gauss(0, 0.5)
            rows.append({"rank": rank, "step": step, "step_time_ns": dur, "start_ns": t,
                         "end_ns": t + dur, "lateness_ns": int(late * 1e6),
                         "coll_wait_ns": 0, "host_gap_ns": 0, "compute_wait_ns": None,
                         "sync_wait_ns": 0})
        t += dur
    m = pl.DataFrame(rows)
    (f,) = detect_stragglers(m, [], 53e6, sync_every=5)
    ev = f["evidence"]
    assert (f["rank"], f["cause"], ev["metric"], ev["sync_every"], ev["steps"]) == (
        1, "host", "lateness_ns", 5, 100)
    assert ev["excess_ms"] == pytest.approx(30.0, abs=1.0)  # 150 ms per 5-step cycle
    assert "over 5-step cycles" in f["summary"]
    per_step = [x for x in detect_stragglers(m, [], 53e6) if x["rank"] == 1]
    assert per_step == [] or per_step[0]["score"] < f["score"]


# Real torchrun DDP, 2 ranks (tests/bpf/test_python_cpu_samples.py), rank 1 burning 60 ms of
# CPU per step, the unit tier and a bursty CPU hog beside it: rank 1's arrival lateness per
# step (ms; rank 0's is its mirror) and the step times. Late in 38 of 38 steps, by 23-126 ms,
# so the spread of its excess (MAD 25 ms) left D / noise at 3.3: no straggler was found (and
# so no CPU hotspot) in 2 of 5 such runs.
BUSY_LATE_MS = [1.8, 34.7, 37.1, 125.7, 50.5, 44.9, 50.7, 60.9, 41.7, 45.6, 53.7, 43.5, 61.4,
                42.8, 62.1, 45.0, 47.1, 40.9, 78.9, 42.6, 47.4, 74.1, 30.9, 33.4, 30.4, 30.8,
                37.1, 38.2, 33.4, 32.6, 46.9, 22.9, 22.3, 30.8, 30.8, 31.0, 36.7, 41.6]
BUSY_STEP_MS = [73.5, 76.7, 253.9, 102.6, 92.6, 106.7, 126.8, 100.3, 97.7, 114.4, 88.6, 124.5,
                87.2, 125.9, 92.0, 97.7, 93.8, 171.3, 91.4, 97.0, 150.2, 65.8, 69.0, 66.0,
                68.7, 80.7, 86.7, 79.2, 66.9, 95.9, 66.5, 67.1, 63.3, 63.3, 63.5, 76.6, 91.6,
                71.7]


def _two_ranks(late_ms: list[float], step_ms: list[float]) -> pl.DataFrame:
    rows, t = [], 0
    for step, (late, dur) in enumerate(zip(late_ms, step_ms, strict=True)):
        for rank, sign in ((1, 1), (0, -1)):
            rows.append({"rank": rank, "step": step, "step_time_ns": int(dur * 1e6),
                         "start_ns": t, "end_ns": t + int(dur * 1e6),
                         "lateness_ns": int(sign * late * 1e6), "host_gap_ns": 0,
                         "coll_wait_ns": int(max(0.0, -sign * 2 * late) * 1e6),
                         "compute_wait_ns": None, "sync_wait_ns": None})
        t += int(dur * 1e6)
    return pl.DataFrame(rows)


def test_a_rank_late_in_every_step_is_a_straggler_however_its_lateness_spreads():
    m = _two_ranks(BUSY_LATE_MS, BUSY_STEP_MS)
    step_ns = float(m["step_time_ns"].median())
    (f,) = detect_stragglers(m, [], step_ns)
    ev = f["evidence"]
    assert (f["rank"], f["cause"], ev["metric"], f["start_step"]) == (1, "host", "lateness_ns",
                                                                       None)
    assert f["score"] < 4  # its spread alone would not flag it
    assert ev["slowest_in_fraction_of_steps"] == 1.0
    assert ev["sign_z"] == pytest.approx(38 / 2 / (38 ** 0.5 / 2), abs=0.01)  # 6.16
    assert ev["excess_ms"] == pytest.approx(2 * 42.2, abs=2)  # vs rank 0's mirror image
    assert f["severity"] == "critical"  # 84 ms of an 88 ms step


def test_a_rank_late_in_most_but_not_nearly_all_steps_needs_its_spread_to_be_flagged():
    """The same rank late in only 32 of 38 steps (84 %: below CONSISTENT), early in the
    other 6: nothing, as before the sign test (its excess / noise stays below 4)."""
    late = [-x if i % 6 == 5 else x for i, x in enumerate(BUSY_LATE_MS)]
    assert sum(x > 0 for x in late) == 32
    m = _two_ranks(late, BUSY_STEP_MS)
    assert detect_stragglers(m, [], float(m["step_time_ns"].median())) == []


def test_a_pipeline_stages_arrival_by_role_is_not_a_straggler():
    """The healthy simulator's 2 stages x 2 DP under load: the first stage's ranks arrive
    ~6 ms later than the second's in every step (their place in the schedule), rank 2 the
    later of the two in 2 of 3 steps. Compared across the stages rank 2 was a warning
    straggler (score 4.9, 66 % of the steps; 1 of 20 healthy runs on a busy host and two
    CI runs); within its stage it is nothing."""
    import random

    rnd = random.Random(11)
    rows, t = [], 0
    for step in range(60):
        first = 0 if step % 3 == 0 else 2  # the later of stage 0's ranks this step
        for rank in range(4):
            late = (6.0 + (0.6 if rank == first else -0.6)) if rank in (0, 2) else -6.0
            rows.append({"rank": rank, "step": step, "step_time_ns": 68_000_000,
                         "start_ns": t, "end_ns": t + 68_000_000,
                         "lateness_ns": int((late + rnd.gauss(0, 0.4)) * 1e6),
                         "host_gap_ns": int((3.0 + rnd.gauss(0, 0.1)) * 1e6),
                         "coll_wait_ns": 20_000, "compute_wait_ns": None,
                         "sync_wait_ns": 63_000_000})
        t += 68_000_000
    m = pl.DataFrame(rows)
    across = detect_stragglers(m, [], 68e6)  # as if one stage: the role looks like a fault
    assert [(f["rank"], f["evidence"]["metric"]) for f in across] == [(2, "lateness_ns")]
    assert detect_stragglers(m, [], 68e6, pipeline=True, stages=[[0, 2], [1, 3]]) == []


def test_a_pipeline_stages_host_work_is_compared_within_the_stage():
    """The simulator's 2 stages x 2 DP: the last stage's ranks do more host work by role
    (+20 ms: the loss); rank 0's 10 % host straggler, 6.9 ms more than its stage peer, was
    missed when host_gap was not compared across stages at all (its lateness scored 3-5)."""
    import random

    rnd = random.Random(5)
    rows, t = [], 0
    for step in range(60):
        for rank in range(4):
            gap = 1.0 + (20.0 if rank in (1, 3) else 0.0) + (6.9 if rank == 0 else 0.0)
            rows.append({"rank": rank, "step": step, "step_time_ns": 74_000_000,
                         "start_ns": t, "end_ns": t + 74_000_000,
                         "host_gap_ns": int((gap + rnd.gauss(0, 0.3)) * 1e6),
                         "lateness_ns": None, "coll_wait_ns": 0, "compute_wait_ns": None,
                         "sync_wait_ns": 0})
        t += 74_000_000
    m = pl.DataFrame(rows)
    (f,) = detect_stragglers(m, [], 74e6, pipeline=True, stages=[[0, 2], [1, 3]])
    assert (f["rank"], f["evidence"]["metric"]) == (0, "host_gap_ns")
    assert f["evidence"]["excess_ms"] == pytest.approx(6.9, abs=0.3)
    assert f["evidence"]["stage"] == [0, 2]  # compared with its stage peer (rank 2) only
    assert f["evidence"]["host_gap_ms"]["others"] == pytest.approx(1.0, abs=0.3)
    assert "than the other ranks of its pipeline stage" in f["summary"]
    # one rank per stage: no peer to compare with, host_gap is not read at all
    assert detect_stragglers(m, [], 74e6, pipeline=True, stages=[[0], [1], [2], [3]]) == []
