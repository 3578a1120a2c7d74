"""Seq alignment across ranks and step detection details."""

from __future__ import annotations

import polars as pl
import pytest
import scenarios

from argus.analyze.matching import align_seq, collectives
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
    # by (op, bytes) and time alone, a bucket 2 on won
    blind = align_seq(_equal_buckets(8_500_000, with_calls=False)).filter(pl.col("rank") == 1)
    assert (blind["gseq"] - blind["seq"]).unique().to_list() == [2]
