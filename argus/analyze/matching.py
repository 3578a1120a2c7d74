"""Collectives of every rank, matched across ranks by (comm, aligned sequence number).

NCCL collectives carry a per-(tgid, comm) `seq` counted since attach, so when tracing started
mid-run (or a rank was attached later) the same collective has different `seq` on different
ranks. `align_seq` finds, per rank, the shift that maps its `seq` onto a reference rank's:
the shift whose matched collectives have identical (op, bytes) and the closest entry times
(the smallest mean difference).
"""

from __future__ import annotations

import polars as pl

COLLECTIVE_COLUMNS = (
    "rank", "host", "tgid", "tid", "channel", "name", "comm", "op", "bytes", "seq",
    "t_ns", "end_ns", "dur_ns", "in_flight", "peer", "origin", "calls_before",
)


def collectives(tl: pl.DataFrame) -> pl.DataFrame:
    """The collective calls of a timeline, one row per call, with a non-null `seq` and `comm`.

    A rank that has NCCL collectives keeps only those (a c10d call of the NCCL backend wraps
    them); a rank with only c10d (gloo) calls keeps those. Null `comm` becomes `"<channel>"`,
    null `seq` the call's index on its (rank, comm) in time order. `calls_before`: the rank's
    other traced calls since its previous collective (null for its first). `origin` is
    "ddpN" for the c10d call DDP's reducer made for its gradient bucket N (the thread's next
    c10d call after a `ddp_bucket` event; "ddp" when the bucket is not known), else null:
    gloo's calls carry no bytes, and a loss allreduced on DDP's group every N steps would
    otherwise be the same call as a gradient bucket.
    """
    # the rank's other traced calls since its previous collective (launches, copies, syncs):
    # program order, the same on every rank for the same collective
    ranked = tl.filter(pl.col("rank").is_not_null()).sort("t_ns")
    others = (pl.col("kind") != "collective").cast(pl.Int64).cum_sum().over("rank")
    c = ranked.with_columns(others.alias("_others")).filter(
        pl.col("kind").is_in(["collective", "ddp_bucket"]))
    prev = pl.col("kind").shift(1).over(["tgid", "tid"], order_by="t_ns")
    bucket = pl.col("seq").shift(1).over(["tgid", "tid"], order_by="t_ns")
    c = c.with_columns(
        pl.when((pl.col("kind") == "collective") & (pl.col("channel") == "torch")
                & (prev == "ddp_bucket"))
        .then(pl.concat_str(pl.lit("ddp"), bucket.cast(pl.Utf8).fill_null("")))
        .otherwise(pl.lit(None, pl.Utf8))
        .alias("origin")
    ).filter(pl.col("kind") == "collective")
    c = c.with_columns(
        (pl.col("_others") - pl.col("_others").shift(1).over("rank")).alias("calls_before"))
    if "peer" not in c.columns:  # timelines made without it (send/recv peer rank)
        c = c.with_columns(pl.lit(None, pl.Int32).alias("peer"))
    if c.height == 0:
        return c.select(COLLECTIVE_COLUMNS).with_columns(pl.col("seq").alias("gseq"))
    has_nccl = c.filter(pl.col("channel") == "nccl").get_column("rank").unique().to_list()
    c = c.filter((pl.col("channel") == "nccl") | ~pl.col("rank").is_in(has_nccl))
    c = c.with_columns(pl.col("comm").fill_null(pl.col("channel")))
    c = c.sort("t_ns").with_columns(
        pl.col("seq").fill_null(pl.int_range(pl.len()).over(["rank", "comm"]).cast(pl.Int64))
    )
    return c.select(COLLECTIVE_COLUMNS).sort(["rank", "comm", "seq"])


def _calls_alike() -> pl.Expr:
    """Pairs (`calls_before`, `calls_before_r`) after as many of the host's other calls
    (within 2, or 20 %), or not known."""
    a, b = pl.col("calls_before"), pl.col("calls_before_r")
    return a.is_null() | b.is_null() | ((a - b).abs() <= pl.max_horizontal(
        pl.lit(2), 0.2 * pl.max_horizontal(a, b)))


def calls_agreement(ref: pl.DataFrame, other: pl.DataFrame, d: int) -> float | None:
    """The share of `other`'s collectives (seq + d) paired with `ref`'s (seq) after as many
    of the host's other calls, of the pairs where both are known; None when fewer than 8."""
    j = (other.with_columns((pl.col("seq") + d).alias("seq"))
         .join(ref, on="seq", suffix="_r", how="inner")
         .filter(pl.col("calls_before").is_not_null() & pl.col("calls_before_r").is_not_null()))
    return j.select(_calls_alike().mean()).item() if j.height >= 8 else None


def _best_shift(ref: pl.DataFrame, other: pl.DataFrame) -> int:
    """Shift d so that other.seq + d matches ref.seq: identical (op, bytes), closest times."""
    probe = other.head(64).sort("t_ns")
    near = probe.join_asof(
        ref.select(pl.col("t_ns"), pl.col("seq").alias("rseq")).sort("t_ns"),
        on="t_ns",
        strategy="nearest",
    )
    cands = set((near.get_column("rseq") - near.get_column("seq")).drop_nulls().to_list())
    cands.add(0)
    best: tuple[float, float, float, int] | None = None
    for d in sorted(cands, key=abs):
        j = other.with_columns((pl.col("seq") + d).alias("seq")).join(
            ref, on="seq", suffix="_r", how="inner"
        )
        if j.height == 0:
            continue
        # the same op and size, after as many of the host's other calls (program order:
        # a step's first bucket follows the optimizer and the forward, its others one
        # bucket's backward; equal buckets are otherwise alike, and a late rank's k-th
        # bucket lies nearest in time to the others' k + 3rd)
        agree = j.select(
            ((pl.col("op") == pl.col("op_r")) & (pl.col("bytes").eq_missing(pl.col("bytes_r")))
             & _calls_alike()).mean()
        ).item()
        if agree is None or agree < 0.9:
            continue
        # The mean, not the median: a shift by one bucket or one step pairs most collectives
        # with a neighbour issued a moment apart (equal buckets; a host that runs ahead
        # issues 5 steps within 4 ms, then waits for the GPU) and only the pairs across a
        # step or a sync with one a whole step or cycle apart, which a median ignores (the
        # wrong shift won by 1-3 ms where the ranks woke from a sync a few ms apart).
        dt = j.select((pl.col("t_ns") - pl.col("t_ns_r")).abs().mean()).item()
        # The most identical pairs first: a straggler late by about a step puts the NEXT
        # collective of the others nearest in time (shift +-1 with a few ops mismatched).
        key = (0.0 if j.height >= 8 else 1.0, -round(float(agree), 3), float(dt), abs(d))
        if best is None or key < best:
            best = key
            best_d = d
    return best_d if best is not None else 0


def align_seq(coll: pl.DataFrame) -> pl.DataFrame:
    """Add `gseq`: the sequence number of each collective in the reference rank's numbering.

    Per comm, the reference is the rank with the most observed collectives (lowest rank on a
    tie). For every other rank the candidate shifts are those that pair its first collectives
    with the reference's nearest-in-time ones, plus 0; the chosen shift has >= 90% identical
    pairs (op, bytes, and calls_before within 20 %), the most of them, then the smallest
    mean |entry time difference| (a rank late by about one step enters collective k when
    the others enter k + 1).
    """
    if coll.height == 0:
        return coll if "gseq" in coll.columns else coll.with_columns(pl.col("seq").alias("gseq"))
    coll = coll.with_columns(
        (pl.col("calls_before") if "calls_before" in coll.columns else pl.lit(None))
        .cast(pl.Int64).alias("calls_before"))
    parts = []
    for comm in coll.get_column("comm").unique().sort().to_list():
        cc = coll.filter(pl.col("comm") == comm)
        counts = cc.group_by("rank").len().sort(["len", "rank"], descending=[True, False])
        ref_rank = counts.get_column("rank")[0]
        cols = ["seq", "op", "bytes", "t_ns", "calls_before"]
        ref = cc.filter(pl.col("rank") == ref_rank).select(cols)
        for rank in cc.get_column("rank").unique().sort().to_list():
            rc = cc.filter(pl.col("rank") == rank)
            d = 0 if rank == ref_rank else _best_shift(ref, rc.select(cols))
            parts.append(rc.with_columns((pl.col("seq") + d).alias("gseq")))
    return pl.concat(parts).sort(["rank", "comm", "gseq"])


def with_lateness(coll: pl.DataFrame) -> pl.DataFrame:
    """Add `lateness_ns`: entry time minus the median entry time of the same (comm, gseq).

    Only collectives seen on at least two ranks get a value (null otherwise), never send/recv
    (a rank's k-th p2p call pairs with one peer, not with everyone's k-th). A host-side
    straggler enters its collectives late; a GPU-side one does not.
    """
    if coll.height == 0:
        return coll.with_columns(pl.lit(None, pl.Int64).alias("lateness_ns"))
    return coll.with_columns(
        pl.when((pl.len().over(["comm", "gseq"]) >= 2) & ~pl.col("op").is_in(["send", "recv"]))
        .then(pl.col("t_ns") - pl.col("t_ns").median().over(["comm", "gseq"]))
        .otherwise(None)
        .cast(pl.Int64)
        .alias("lateness_ns")
    )


def matched(coll: pl.DataFrame) -> pl.DataFrame:
    """One row per (comm, gseq): op, bytes, ranks seen, first/last arrival and the last rank."""
    if coll.height == 0:
        return pl.DataFrame(
            schema={"comm": pl.Utf8, "gseq": pl.Int64, "op": pl.Utf8, "n_ranks": pl.UInt32}
        )
    return (
        coll.sort("t_ns")
        .group_by(["comm", "gseq"])
        .agg(
            pl.col("op").first(),
            pl.col("bytes").first(),
            pl.len().alias("n_ranks"),
            pl.col("t_ns").min().alias("first_arrival_ns"),
            pl.col("t_ns").max().alias("last_arrival_ns"),
            pl.col("rank").last().alias("last_rank"),
        )
        .sort(["comm", "gseq"])
    )
