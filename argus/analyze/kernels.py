"""GPU kernel time per rank per step: the device activity of argus's GPU agent.

Input: each recording's `kernels` frame (`schema.KERNELS_SCHEMA`: device start/duration on
the node's CLOCK_MONOTONIC; empty without the agent), put on the aligned wall clock as the
events are (`clock.mono_to_wall` + the host's offset). Every record is one of three classes:

- `compute`: a CUPTI kernel record that is not NCCL's (names starting `ncclDevKernel` /
  `ncclKernel` are NCCL's).
- `coll`: a collective or p2p operation. From NCCL's profiler (kind coll/p2p, one record per
  kernel channel): one operation per (comm_hash, coll_seq, kind), from its first channel's
  start to its last channel's end. Only where a rank has no such record: CUPTI's NCCL
  kernels (one per operation). Never both, so no operation is counted twice. An operation's
  device time includes waiting for the other ranks inside the kernel: the device clock of a
  collective ends at the same moment on every rank, so the rank that arrived LAST has the
  shortest collective kernels.
- `copy`: memcpy and memset records.

A record belongs to the step its device start falls in ([start_ns, end_ns) of the rank's
step, as `steps.step_metrics` assigns host calls). A step ends with the host's wait for its
GPU (the end-of-step synchronize), so each step's device work falls inside it; a host that
reads back only every N steps runs ahead, and its device work moves between the steps of a
cycle (the straggler detector then sums whole cycles, `straggler._by_cycles`). Only the
steps inside the span a rank's records cover count: from its first record's start to its
last record's end, which must reach into the step's last tenth (the end-of-step wait
returns just after the GPU's last work; the agent was enabled after tracing began, and
earlier steps have no device time, not zero).

Per (rank, step): `gpu_compute_ns`, `gpu_coll_ns`, `gpu_copy_ns` (sums of device time; null
where the rank has no record in the step, 0 for a class without records in a step with
others) and per kernel family (the kernel's name up to its first `(` or `<`; collectives by
their NCCL function) the count, the sum and the durations.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median
from typing import Any

import polars as pl

from argus.analyze.timeline import build_kernels
from argus.recording.io import Recording

NCCL_PREFIXES = ("ncclDevKernel", "ncclKernel")
CLASSES = ("compute", "coll", "copy")
KERNEL_METRICS = ("gpu_compute_ns", "gpu_coll_ns", "gpu_copy_ns")
FAMILY_SCHEMA: dict[str, pl.DataType] = {
    "rank": pl.Int32, "step": pl.Int64, "cls": pl.Utf8, "family": pl.Utf8, "n": pl.UInt32,
    "ns": pl.Int64, "durs": pl.List(pl.Int64),
}
MIN_RATIO = 1.05  # a family "got slower": >= 5 % more device time per step than its peers'
MIN_FAMILY_NS = 100_000  # ... and >= 0.1 ms per step more
TOP_FAMILIES = 5
LATE_SHARE = 0.5  # a rank's collective kernels shorter by >= this share of the others'


def empty_families() -> pl.DataFrame:
    return pl.DataFrame(schema=FAMILY_SCHEMA)


def device_records(recordings: Sequence[Recording],
                   offsets_ns: dict[str, int] | None = None) -> pl.DataFrame:
    """Every recording's kernels as operations (module doc): rank, cls, family, t_ns (aligned
    wall ns of the device start), dur_ns; sorted by t_ns."""
    frames = []
    for rec in recordings:  # one recording at a time: its ranks' NCCL records (_operations)
        k = build_kernels([rec], offsets_ns)
        k = k.filter(pl.col("rank").is_not_null() & pl.col("dur_ns").is_not_null())
        if k.height:
            frames.append(_operations(k))
    if not frames:
        return pl.DataFrame(schema={"rank": pl.Int32, "cls": pl.Utf8, "family": pl.Utf8,
                                    "t_ns": pl.Int64, "dur_ns": pl.Int64})
    return pl.concat(frames).sort("t_ns")


def _operations(k: pl.DataFrame) -> pl.DataFrame:
    """One recording's rows (with t_ns) -> rank, cls, family, t_ns, dur_ns (module doc)."""
    name = pl.col("name").fill_null("")
    nccl_kernel = (pl.col("kind") == "kernel") & pl.any_horizontal(
        [name.str.starts_with(p) for p in NCCL_PREFIXES])
    chan = k.filter(pl.col("kind").is_in(["coll", "p2p"]))
    with_chan = chan["rank"].unique().to_list()
    ops = (chan.group_by("rank", "comm_hash", "coll_seq", "kind")
           .agg(pl.col("name").first().alias("family"), pl.col("t_ns").min(),
                (pl.col("t_ns") + pl.col("dur_ns")).max().alias("_end"))
           .select("rank", pl.lit("coll").alias("cls"), "family", "t_ns",
                   (pl.col("_end") - pl.col("t_ns")).alias("dur_ns")))
    rest = k.filter(~pl.col("kind").is_in(["coll", "p2p"])
                    & ~(nccl_kernel & pl.col("rank").is_in(with_chan)))
    rest = rest.select(
        "rank",
        pl.when(pl.col("kind").is_in(["memcpy", "memset"])).then(pl.lit("copy"))
        .when(nccl_kernel).then(pl.lit("coll")).otherwise(pl.lit("compute")).alias("cls"),
        pl.when(pl.col("kind").is_in(["memcpy", "memset"])).then(pl.col("kind"))
        .otherwise(name.str.replace(r"[(<].*$", "")).alias("family"),
        "t_ns", "dur_ns",
    )
    cols = {"rank": pl.Int32, "cls": pl.Utf8, "family": pl.Utf8, "t_ns": pl.Int64,
            "dur_ns": pl.Int64}
    return pl.concat([f.select([pl.col(c).cast(t) for c, t in cols.items()])
                      for f in (ops, rest)])


def step_kernels(ops: pl.DataFrame, steps: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per (rank, step) KERNEL_METRICS, per (rank, step, family) FAMILY_SCHEMA rows) of the
    operations of `device_records` in the steps (rank, step, start_ns, end_ns) that lie in
    the span each rank's records cover (module doc)."""
    empty_m = pl.DataFrame(schema={"rank": pl.Int32, "step": pl.Int64,
                                   **{c: pl.Int64 for c in KERNEL_METRICS}})
    if ops.height == 0 or steps.height == 0:
        return empty_m, empty_families()
    span = ops.group_by("rank").agg(pl.col("t_ns").min().alias("_t0"),
                                    (pl.col("t_ns") + pl.col("dur_ns")).max().alias("_t1"))
    covered = (steps.select("rank", "step", "start_ns", "end_ns").join(span, on="rank")
               .filter((pl.col("start_ns") >= pl.col("_t0"))
                       & (pl.col("_t1") >= pl.col("end_ns") - (pl.col("end_ns")
                                                             - pl.col("start_ns")) // 10))
               .select("rank", "step", "start_ns", "end_ns"))
    if covered.height == 0:
        return empty_m, empty_families()
    keys = covered.sort("start_ns")
    j = (ops.sort("t_ns").join_asof(keys, left_on="t_ns", right_on="start_ns", by="rank",
                                     strategy="backward", check_sortedness=False)
         .filter(pl.col("step").is_not_null() & (pl.col("t_ns") < pl.col("end_ns"))))
    fam = (j.group_by("rank", "step", "cls", "family")
           .agg(pl.len().cast(pl.UInt32).alias("n"), pl.col("dur_ns").sum().alias("ns"),
                pl.col("dur_ns").sort().alias("durs"))
           .sort("rank", "step", "cls", "family")
           .select([pl.col(c).cast(t) for c, t in FAMILY_SCHEMA.items()]))
    return metrics_of(fam), fam


def metrics_of(families: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step) of `families` (FAMILY_SCHEMA rows) KERNEL_METRICS: the sums of each
    class's device time (0 for a class without records in a step that has others)."""
    schema = {"rank": pl.Int32, "step": pl.Int64, **{c: pl.Int64 for c in KERNEL_METRICS}}
    if families.height == 0:
        return pl.DataFrame(schema=schema)
    per = families.group_by("rank", "step").agg(
        *[pl.col("ns").filter(pl.col("cls") == c).sum().alias(f"gpu_{c}_ns") for c in CLASSES])
    return per.select([pl.col(c).cast(t) for c, t in schema.items()]).sort("rank", "step")


def with_kernel_metrics(metrics: pl.DataFrame, km: pl.DataFrame) -> pl.DataFrame:
    """`metrics` (per rank, step) plus KERNEL_METRICS (null where there is no device time)."""
    metrics = metrics.drop([c for c in KERNEL_METRICS if c in metrics.columns])
    if km.height == 0:
        return metrics.with_columns([pl.lit(None, pl.Int64).alias(c) for c in KERNEL_METRICS])
    return metrics.join(km, on=["rank", "step"], how="left")


# ----------------------------------------------------------------------------- evidence


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def kernel_evidence(families: pl.DataFrame, metrics: pl.DataFrame, rank: int,
                    start_step: int | None, end_step: int | None) -> dict[str, Any] | None:
    """What the device times say of `rank` over the steps (all when start_step is None),
    against the other ranks (the median of their per-step means): compute, collective and
    copy ms per step, and the compute kernel families that got slower (>= MIN_RATIO and
    >= MIN_FAMILY_NS more per step), most excess first; None when `rank` has no device time
    there. `last_arrival`: its collective kernels were the shortest of all ranks' (it came
    last to the collectives; the others waited in theirs)."""
    if "gpu_compute_ns" not in metrics.columns:
        return None
    m = metrics.filter(pl.col("gpu_compute_ns").is_not_null())
    if start_step is not None:
        m = m.filter(pl.col("step").is_between(start_step, end_step))
    if m.filter(pl.col("rank") == rank).height == 0:
        return None
    per_rank = m.group_by("rank").agg(*[pl.col(c).mean() for c in KERNEL_METRICS],
                                      pl.len().alias("_n"))
    own = per_rank.filter(pl.col("rank") == rank).row(0, named=True)
    others = per_rank.filter(pl.col("rank") != rank)
    ev: dict[str, Any] = {"source": "device", "steps": int(own["_n"])}
    for key, c in (("compute_ms", "gpu_compute_ns"), ("collective_ms", "gpu_coll_ns"),
                   ("copy_ms", "gpu_copy_ns")):
        oth = others[c].drop_nulls()
        ev[key] = {"rank": _ms(own[c]), "others": _ms(float(oth.median())) if oth.len() else None}
    if others.height:
        shortest = per_rank.sort("gpu_coll_ns", "rank").row(0, named=True)
        ev["last_arrival"] = shortest["rank"] == rank and own["gpu_coll_ns"] is not None and (
            ev["collective_ms"]["others"] or 0) > 0
    ev["families"] = _slower_families(families, m, rank)
    return ev


def _slower_families(families: pl.DataFrame, m: pl.DataFrame, rank: int) -> list[dict[str, Any]]:
    """The compute kernel families whose device time per step on `rank` exceeds the other
    ranks' median by MIN_RATIO and MIN_FAMILY_NS (the steps of `m`)."""
    if families.height == 0:
        return []
    f = families.filter(pl.col("cls") == "compute").join(m.select("rank", "step"),
                                                         on=["rank", "step"])
    n_steps = dict(m.group_by("rank").agg(pl.len()).rows())
    tot = f.group_by("rank", "family").agg(pl.col("ns").sum(), pl.col("n").sum())
    out = []
    for fam, grp in tot.group_by("family"):
        per = {int(r): ns / n_steps[r] for r, ns in grp.select("rank", "ns").rows()}
        cnt = {int(r): n / n_steps[r] for r, n in grp.select("rank", "n").rows()}
        if rank not in per:
            continue
        peers = [per.get(r, 0.0) for r in n_steps if r != rank]
        if not peers:
            continue
        base = median(peers)
        excess = per[rank] - base
        if excess < MIN_FAMILY_NS or (base > 0 and per[rank] < MIN_RATIO * base):
            continue
        out.append({
            "name": fam[0], "excess_ms": _ms(excess),
            "ms_per_step": {"rank": _ms(per[rank]), "others": _ms(base)},
            "ratio": round(per[rank] / base, 3) if base > 0 else None,
            "kernels_per_step": round(cnt[rank], 2),
        })
    out.sort(key=lambda x: (-x["excess_ms"], x["name"]))
    return out[:TOP_FAMILIES]


def cite_in_stragglers(stragglers: list[dict[str, Any]], families: pl.DataFrame,
                       metrics: pl.DataFrame) -> None:
    """Add `evidence.kernels` (`kernel_evidence`) to every straggler finding of a rank with
    device times, in place; a finding flagged by the device time itself (metric
    `gpu_compute_ns`) also says in its summary which kernel families got slower."""
    for f in stragglers:
        if f.get("kind") != "straggler" or f.get("rank") is None:
            continue
        ev = kernel_evidence(families, metrics, f["rank"], f.get("start_step"), f.get("end_step"))
        if ev is None:
            continue
        f["evidence"]["kernels"] = ev
        if f["evidence"].get("metric") != "gpu_compute_ns":
            continue
        c = ev["compute_ms"]
        fams = ", ".join(f"{x['name']} {x['ratio']:.2f}x (+{x['excess_ms']:.1f} ms)"
                         if x["ratio"] else f"{x['name']} (+{x['excess_ms']:.1f} ms)"
                         for x in ev["families"][:3])
        text = (f"; its GPU ran compute kernels {c['rank']:.1f} ms per step vs "
                f"{c['others']:.1f} ms on the other ranks (device time)")
        if fams:
            text += f", slower: {fams}"
        if ev.get("last_arrival"):
            cm = ev["collective_ms"]
            text += (f"; its collective kernels were the shortest ({cm['rank']:.1f} vs "
                     f"{cm['others']:.1f} ms): it arrived last, the others waited in theirs")
        f["summary"] = f["summary"].rstrip(".") + text + "."
