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
