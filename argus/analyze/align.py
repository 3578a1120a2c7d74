"""Clock alignment of several nodes on matched collectives.

Each node's recording has its own monotonic clock, converted to wall time by its manifest;
wall clocks of different nodes disagree by NTP error. Events that happen at the same true
instant on every rank give the offsets: the end of the end-of-step synchronize (it returns when
the step's last collective completed, for every rank at once) or, for blocking c10d calls,
the return of the same (comm, seq) collective. For every non-reference host the offset is
the median of (reference time - host time) over all matched pairs; the residual is the median
absolute deviation of those differences after correction.
"""

from __future__ import annotations

from statistics import median
from typing import Any

import polars as pl


def estimate_offsets(steps: pl.DataFrame, coll: pl.DataFrame) -> dict[str, Any]:
    """Return `{reference, offsets_ns: {host: ns}, residual_ns, pairs, method}`.

    `offsets_ns[host]` is what to add to that host's wall times. One host: all zero.
    Method `step_end` when steps with an end-of-step sync exist, else `collective_end`.
    """
    hosts = sorted(
        set(steps.get_column("host").drop_nulls().to_list() if steps.height else [])
        | set(coll.get_column("host").drop_nulls().to_list() if coll.height else [])
    )
    out: dict[str, Any] = {
        "reference": hosts[0] if hosts else None,
        "offsets_ns": {h: 0 for h in hosts},
        "residual_ns": 0,
        "pairs": 0,
        "method": None,
    }
    if len(hosts) < 2:
        return out
    if steps.height:
        ev = steps.select("host", "rank", pl.col("step").alias("key"), pl.col("end_ns").alias("t"))
        method = "step_end"
    else:
        ev = coll.filter(pl.col("end_ns").is_not_null()).select(
            "host", "rank", (pl.col("comm") + ":" + pl.col("gseq").cast(pl.Utf8)).alias("key"),
            pl.col("end_ns").alias("t"),
        )
        method = "collective_end"
    # per key, per host: the median time of its ranks
    per = ev.group_by(["key", "host"]).agg(pl.col("t").median())
    ref = hosts[0]
    base = per.filter(pl.col("host") == ref).select("key", pl.col("t").alias("t_ref"))
    residuals: list[float] = []
    pairs = 0
    for h in hosts[1:]:
        j = per.filter(pl.col("host") == h).join(base, on="key")
        if j.height == 0:
            continue
        diffs = (j["t_ref"] - j["t"]).to_list()
        off = int(median(diffs))
        out["offsets_ns"][h] = off
        residuals += [abs(d - off) for d in diffs]
        pairs += j.height
    out["residual_ns"] = int(median(residuals)) if residuals else 0
    out["pairs"] = pairs
    out["method"] = method
    return out
