"""DDP's gradient buckets (c10d::Reducer::all_reduce_bucket) tell its allreduces apart from
the job's own on the same group: decoded bucket ordinals, the calls' origin, the steps."""

from __future__ import annotations

import polars as pl
import pytest
import scenarios
import test_decode
from test_decode import record

from argus.analyze.diagnosis import diagnose
from argus.analyze.matching import align_seq, collectives
from argus.analyze.steps import detect_steps
from argus.analyze.timeline import build_timeline
from argus.collect.c10d import Group
from argus.collect.decode import DecodeContext, decode_records
from argus.recording.io import Recording, coerce
from argus.recording.schema import EVENTS_SCHEMA, empty_stacks

pytestmark = pytest.mark.unit
refs = test_decode.refs  # the fixture: probe ids of the shipped specs

BUCKET = "_ZN4c10d7Reducer17all_reduce_bucketERNS0_6BucketE"
ALLREDUCE = ("_ZN4c10d16ProcessGroupGloo9allreduceERSt6vectorIN2at6TensorESaIS3_EERKNS_16"
             "AllreduceOptionsE")
STEP_NS = 40_000_000
MS = 1_000_000


def _job(refs, steps: int, buckets: int, log_every: int, ranks: int = 2) -> Recording:
    """A gloo DDP job seen from its c10d calls: per step, `buckets` gradient buckets (each a
    Reducer::all_reduce_bucket, then the allreduce it makes, on the thread that runs the
    backward), and every `log_every`-th step the loss allreduced on the same group right
    after the optimizer. The same process group (torch's "0") on every rank."""
    probes, ids = refs
    groups = {(1000 + r, 0xA000 + r): Group("0", r, ranks) for r in range(ranks)}
    ctx = DecodeContext(probes, rank_of={1000 + r: r for r in range(ranks)},
                        pg_group=lambda tgid, this: groups.get((tgid, this)))
    blobs = []
    for s in range(steps):
        for r in range(ranks):
            tgid, t = 1000 + r, 5 * MS + s * STEP_NS + r * 100_000
            for b in range(buckets):
                at = t + 20 * MS + b * 3 * MS
                # Bucket& in rsi: one address per bucket (the reducer's bucket vector)
                blobs.append(record(ids[BUCKET], tgid=tgid, tid=tgid, ts=at,
                                    args=(0x5000 + r, 0x9000 + 0x40 * (buckets - b))))
                blobs.append(record(ids[ALLREDUCE], tgid=tgid, tid=tgid, ts=at + 50_000,
                                    args=(0x7000, 0xA000 + r)))
            if s % log_every == log_every - 1:
                blobs.append(record(ids[ALLREDUCE], tgid=tgid, tid=tgid, ts=t + 36 * MS,
                                    args=(0x7000, 0xA000 + r)))
    blobs.sort(key=lambda b: int.from_bytes(b[16:24], "little"))  # by ts_ns
    ev = decode_records(blobs, ctx)
    man = scenarios._manifest("n0", list(range(ranks)), 0, 0, 0, steps * STEP_NS + 10 * MS,
                              ranks, "duration")
    return Recording(man, coerce(ev, EVENTS_SCHEMA, "events"), empty_stacks())


def test_buckets_are_numbered_per_process_and_tag_the_call_they_make(refs):
    rec = _job(refs, steps=6, buckets=3, log_every=5)
    b = rec.events.filter(pl.col("name") == "c10d::Reducer::all_reduce_bucket")
    # 3 bucket addresses per process, numbered by first call: 0, 1, 2 every step
    assert b.filter(pl.col("tgid") == 1000)["seq"].to_list() == [0, 1, 2] * 6
    coll = collectives(build_timeline([rec]))
    per = coll.group_by("rank", "origin").len().sort("rank", "origin", nulls_last=True)
    # 18 bucket allreduces per rank (6 per bucket) and the loss's 1: not DDP's
    assert per.rows() == [(0, "ddp0", 6), (0, "ddp1", 6), (0, "ddp2", 6), (0, None, 1),
                          (1, "ddp0", 6), (1, "ddp1", 6), (1, "ddp2", 6), (1, None, 1)]


@pytest.mark.parametrize("buckets", [1, 3])
def test_a_loss_allreduced_every_5_steps_on_ddps_group_is_not_a_step(refs, buckets):
    # one bucket: 5 of 6 calls alike, the same op on the same group. Untagged (the calls'
    # tokens alike), a period of 6 calls made 30 steps of 151 (measured on the zoo's real
    # torch sync_every_n job); tagged but without the once-per-step rule, the same.
    rec = _job(refs, steps=31, buckets=buckets, log_every=5)
    tl = build_timeline([rec])
    d = detect_steps(tl, align_seq(collectives(tl)))
    assert d.method == "torch"
    assert d.steps.group_by("rank").len().sort("rank")["len"].to_list() == [30, 30]
    assert d.period == buckets
    # a step ends at the call before the next first bucket: the loss's allreduce, in the
    # steps that make one (it moves that boundary 16 ms later, 13 ms with 3 buckets)
    st = d.steps.filter(pl.col("rank") == 0).sort("step")
    times = st["step_time_ns"].to_list()
    shift = 16 * MS - 3 * MS * (buckets - 1) - 50_000
    loss_t = collectives(tl).filter((pl.col("rank") == 0) & pl.col("origin").is_null())["t_ns"]
    logged = [i for i, (a, b) in enumerate(st.select("start_ns", "end_ns").rows())
              if any(a < t <= b for t in loss_t)]
    assert logged == [3, 8, 13, 18, 23, 28]
    assert times == [STEP_NS + shift if i in logged else STEP_NS - shift if i - 1 in logged
                     else STEP_NS for i in range(30)]
    assert diagnose([rec])["steps"]["count"] == 30


def test_without_bucket_ordinals_the_tag_alone_does_not_merge_steps(refs):
    # recordings made before the bucket address was captured: origin "ddp", no ordinal;
    # the once-per-step rule needs the bucket's identity and is not applied
    rec = _job(refs, steps=31, buckets=1, log_every=5)
    rec.events = rec.events.with_columns(
        pl.when(pl.col("name") == "c10d::Reducer::all_reduce_bucket").then(None)
        .otherwise(pl.col("seq")).alias("seq"))
    tl = build_timeline([rec])
    coll = collectives(tl)
    assert set(coll["origin"].drop_nulls().to_list()) == {"ddp"}
    assert detect_steps(tl, align_seq(coll)).period == 6
