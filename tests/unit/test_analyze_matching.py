"""Seq alignment across ranks and step detection details."""

from __future__ import annotations

import polars as pl
import pytest
import scenarios

from argus.analyze.matching import align_seq, collectives, with_lateness
from argus.analyze.timeline import build_timeline

pytestmark = pytest.mark.unit


def test_mid_run_seq_offsets_are_aligned():
    sc = scenarios.simulate(attach_bucket={0: 1, 1: 2, 2: 0, 3: 1}, steps=6)
    tl = build_timeline(sc.recordings)
    raw = collectives(tl)
    # each rank counts from its own attach: the first seen collective is seq 0 everywhere
    assert raw.group_by("rank").agg(pl.col("seq").min())["seq"].to_list() == [0, 0, 0, 0]
    c = align_seq(raw)
    shift = c.group_by("rank").agg((pl.col("gseq") - pl.col("seq")).first()).sort("rank")
    # rank 1 attached one collective later, rank 2 one earlier than rank 0 (the reference)
    assert shift["gseq"].to_list() == [0, 1, -1, 0] or shift["gseq"].to_list() == [1, 2, 0, 1]
    # matched collectives have identical (op, bytes) on every rank
    per = c.group_by(["comm", "gseq"]).agg(pl.col("bytes").n_unique(), pl.len())
    assert per.filter(pl.col("len") == 4)["bytes"].max() == 1
    assert per.filter(pl.col("len") == 4).height >= 6 * 3


def test_degenerate_recordings_do_not_crash():
    from argus.analyze.diagnosis import diagnose
    from argus.recording.io import Recording, coerce
    from argus.recording.schema import EVENTS_SCHEMA, empty_events, empty_stacks

    base = scenarios.simulate(steps=3).recordings[0]
    empty = Recording(base.manifest, empty_events(), empty_stacks())
    r = diagnose([empty])
    assert r["steps"] == {"detected": False, "count": 0, "step_time_ms_p50": None,
                          "method": "none", "collectives_per_step": 0, "comm": None}
    assert r["findings"] == [] and [x["rank"] for x in r["ranks"]] == [0, 1, 2, 3]
    # CPU-only process: a few torch calls that are not collectives, null ranks, null durations
    ev = coerce(
        pl.DataFrame(
            {
                "ts_ns": [1, 2, 3],
                "tgid": [1000, 1000, 7],
                "rank": [None, None, None],
                "channel": ["torch", "torch", "proc"],
                "name": ["autograd::engine", "autograd::engine", "exit"],
                "dur_ns": [5, None, None],
            }
        ),
        EVENTS_SCHEMA,
        "events",
    )
    r = diagnose([Recording(base.manifest, ev, empty_stacks())])
    assert r["steps"]["detected"] is False
    assert [f for f in r["findings"] if f["severity"] != "info"] == []


def _equal_buckets(late_ns: int, with_calls: bool = True) -> pl.DataFrame:
    """Two ranks, 4 equal buckets per step (40 ms steps, a bucket every 3 ms from 20 ms),
    the host's other calls before each as on the simulator (65 before a step's first bucket:
    the optimizer and the next forward; 14-15 before the others: one bucket's backward);
    rank 1 enters every collective `late_ns` later. Both counted from the same collective."""
    rows = []
    for r in (0, 1):
        for s in range(12):
            for b in range(4):
                rows.append({"rank": r, "comm": "c", "op": "allreduce", "bytes": 1 << 20,
                             "seq": 4 * s + b, "t_ns": s * 40_000_000 + 20_000_000
                             + b * 3_000_000 + (late_ns if r else 0),
                             "calls_before": (65, 14, 14, 15)[b] if with_calls else None})
    return pl.DataFrame(rows)


def test_equal_buckets_of_a_late_rank_are_paired_by_the_calls_before_them():
    # rank 1 enters each bucket 8.5 ms late: the others' buckets 2-3 on are nearest in time
    shifts = align_seq(_equal_buckets(8_500_000)).group_by("rank").agg(
        (pl.col("gseq") - pl.col("seq")).unique())
    assert sorted(shifts.rows()) == [(0, [0]), (1, [0])]
    # by (op, bytes) and time alone too: the mean difference is 8.5 ms, 2 buckets on it is
    # 2.5 ms for half the pairs and ~31 ms across steps for the others (a median of the
    # differences chose the shift by 2 buckets)
    blind = align_seq(_equal_buckets(8_500_000, with_calls=False)).filter(pl.col("rank") == 1)
    assert (blind["gseq"] - blind["seq"]).unique().to_list() == [0]


def _runs_ahead(wake_late_ns: int) -> pl.DataFrame:
    """Two ranks whose hosts run ahead of the GPU, as the simulator's `--sync-every 5
    --readback end` job: each cycle a host issues 5 steps of 4 equal collectives within
    4 ms (a step every 0.75 ms), then waits ~370 ms at the read-back for the GPU. Rank 1
    wakes from every read-back `wake_late_ns` after rank 0 (a busy CPU). The first
    collective after a read-back follows 2 more calls (the copy and the sync): within the
    tolerance, so program order cannot tell the steps apart."""
    rows = []
    for r in (0, 1):
        for c in range(10):
            wake = c * 370_000_000 + (wake_late_ns if r else 0)
            for s in range(5):
                for b in range(4):
                    rows.append({"rank": r, "comm": "c", "op": "allreduce", "bytes": 1 << 20,
                                 "seq": 20 * c + 4 * s + b,
                                 "t_ns": wake + s * 750_000 + b * 150_000,
                                 "calls_before": (67 if s == 0 else 65, 14, 14, 15)[b]})
    return pl.DataFrame(rows)


def test_a_host_that_runs_ahead_is_paired_by_its_cycles_not_by_its_neighbour_step():
    # rank 1 wakes 3 ms late: its step k+1 lies 2.25 ms from rank 0's step k in 4 steps of
    # 5, and a whole cycle from it in the 5th, which a median of the differences ignores
    c = align_seq(_runs_ahead(3_000_000))
    shifts = c.group_by("rank").agg((pl.col("gseq") - pl.col("seq")).unique()).sort("rank")
    assert shifts.rows() == [(0, [0]), (1, [0])]
    late = with_lateness(c).filter(pl.col("rank") == 1)["lateness_ns"]
    assert late.n_unique() == 1 and late[0] == 1_500_000  # half of 3 ms: a median of two
