"""Collective stalls (link degradation): every rank waits longer for the same collectives.

The time a collective spends on the wire after its last rank arrived is invisible from the
host, but its signature is not: in an anomalous window, every rank's end-of-step sync wait
(NCCL) or time inside the blocking collective call (c10d/gloo) grows, while no rank's own
compute wait or host arrival lateness grows. Detector, per anomalous window without a
straggler: Δ = window median - baseline median (steps outside any window) of, across ranks,
the median sync+collective wait, the max compute wait and the max lateness. A stall is
reported when the wait growth explains >= 50% of the step time growth and compute and
lateness growth each stay below 25% of it. The comm/op is the one whose per-call duration
grew most (c10d), else the one moving the most bytes per step (NCCL, host-side enqueue).

Where the ranks have device times (the GPU agent, `argus.analyze.kernels`), the collective
is judged on the GPU too: `evidence.device` holds the median collective- and compute-kernel
time per step, baseline vs window, and the rank whose collective kernels were the shortest
in the window. A collective's kernels end together on every rank, so the rank that reached
it last has the shortest ones: when that rank's are shorter than the others' median by
>= half of it (`LATE_SHARE`), the finding names it (`late_rank`: it arrived last on its GPU,
late without being late on the host; e.g. its GPU busy with other work). No stall is
reported when the compute kernels' device time grew by >= 25 % of the step time growth
(the GPUs computed longer: not the wire).
"""

from __future__ import annotations

from typing import Any

import polars as pl

WAIT_SHARE = 0.5
OTHER_SHARE = 0.25
LATE_SHARE = 0.5  # a rank's collective kernels this much shorter than the others': it was late


def _med(s: pl.Series) -> float:
    s = s.drop_nulls()
    return float(s.median()) if s.len() else 0.0


def _profile(m: pl.DataFrame) -> dict[str, float]:
    per_step = m.group_by("step").agg(
        pl.col("step_time_ns").median().alias("step_t"),
        (pl.col("sync_wait_ns").fill_null(0) + pl.col("coll_wait_ns").fill_null(0))
        .median()
        .alias("wait"),
        pl.col("compute_wait_ns").max().alias("compute"),
        pl.col("lateness_ns").max().alias("late"),
        *([pl.col("gpu_coll_ns").median().alias("gpu_coll"),
           pl.col("gpu_compute_ns").max().alias("gpu_compute")]
          if "gpu_coll_ns" in m.columns else []),
    )
    cols = [c for c in ("step_t", "wait", "compute", "late", "gpu_coll", "gpu_compute")
            if c in per_step.columns]
    out = {c: _med(per_step[c]) for c in cols}
    if "gpu_coll" in per_step.columns and per_step["gpu_coll"].drop_nulls().len() == 0:
        out.pop("gpu_coll"), out.pop("gpu_compute")
    return out


def _device(metrics: pl.DataFrame, w: dict[str, Any], base: dict[str, float],
            win: dict[str, float]) -> dict[str, Any] | None:
    """`evidence.device` of a window (module doc), or None without device times."""
    if "gpu_coll" not in base or "gpu_coll" not in win:
        return None
    m = metrics.filter(pl.col("step").is_between(w["start_step"], w["end_step"])
                       & pl.col("gpu_coll_ns").is_not_null())
    per = m.group_by("rank").agg(pl.col("gpu_coll_ns").median()).sort("gpu_coll_ns", "rank")
    ev: dict[str, Any] = {
        "collective_ms": {"baseline": round(base["gpu_coll"] / 1e6, 3),
                          "window": round(win["gpu_coll"] / 1e6, 3)},
        "compute_ms": {"baseline": round(base["gpu_compute"] / 1e6, 3),
                       "window": round(win["gpu_compute"] / 1e6, 3)},
    }
    if per.height >= 2:
        r, short = per.row(0)
        others = float(per["gpu_coll_ns"][1:].median())
        ev["shortest_collectives"] = {"rank": int(r), "ms": round(short / 1e6, 3),
                                      "others_ms": round(others / 1e6, 3)}
        if others > 0 and others - short >= LATE_SHARE * others:
            ev["late_rank"] = int(r)
    return ev


def _attribute(coll: pl.DataFrame, metrics: pl.DataFrame, w: dict[str, Any]) -> dict[str, Any]:
    """(comm, op) of the stalled collectives and the growth of their per-call duration."""
    if coll.height == 0:
        return {"comm": None, "op": None}
    inside = coll.filter(pl.col("t_ns").is_between(w["start_ns"], w["end_ns"]))
    outside = coll.filter(~pl.col("t_ns").is_between(w["start_ns"], w["end_ns"]))
    per = lambda df: df.group_by(["comm", "op"]).agg(  # noqa: E731
        pl.col("dur_ns").median().alias("dur"), pl.col("bytes").sum().alias("bytes")
    )
    j = per(inside).join(per(outside), on=["comm", "op"], how="left", suffix="_base")
    if j.height == 0:
        return {"comm": None, "op": None}
    j = j.with_columns((pl.col("dur") / pl.col("dur_base")).alias("ratio"))
    grown = j.filter(pl.col("ratio") >= 1.5).sort("ratio", descending=True)
    if grown.height:
        row = grown.row(0, named=True)
        return {"comm": row["comm"], "op": row["op"], "call_slowdown": round(row["ratio"], 2)}
    row = j.sort("bytes", descending=True).row(0, named=True)
    return {"comm": row["comm"], "op": row["op"]}


def detect_stalls(
    metrics: pl.DataFrame,
    windows: list[dict[str, Any]],
    stragglers: list[dict[str, Any]],
    coll: pl.DataFrame,
) -> list[dict[str, Any]]:
    """Collective-stall findings, one per qualifying anomalous window (see module doc)."""
    if metrics.height == 0 or not windows:
        return []
    in_any = pl.lit(False)
    for w in windows:
        in_any = in_any | pl.col("step").is_between(w["start_step"], w["end_step"])
    base_m = metrics.filter(~in_any)
    if base_m.height == 0:
        return []
    base = _profile(base_m)
    out = []
    for w in windows:
        if w["severity"] == "info":
            continue
        if any(
            s.get("start_step") is None
            or (s["start_step"] <= w["end_step"] and s["end_step"] >= w["start_step"])
            for s in stragglers
            if s["severity"] != "info"  # a rank a busy node delayed (host.explain_stragglers)
        ):
            continue
        win = _profile(metrics.filter(pl.col("step").is_between(w["start_step"], w["end_step"])))
        d_step = win["step_t"] - base["step_t"]
        if d_step <= 0:
            continue
        d_wait, d_comp, d_late = (win[k] - base[k] for k in ("wait", "compute", "late"))
        if not (
            d_wait >= WAIT_SHARE * d_step
            and d_comp < OTHER_SHARE * d_step
            and d_late < OTHER_SHARE * d_step
        ):
            continue
        device = _device(metrics, w, base, win)
        if device is not None and (win["gpu_compute"] - base["gpu_compute"]
                                   >= OTHER_SHARE * d_step):
            continue  # the GPUs computed longer (device time): not the collectives
        attr = _attribute(coll, metrics, w)
        slow = win["step_t"] / base["step_t"] if base["step_t"] else None
        what = f"{attr['op']} on comm {attr['comm']}" if attr.get("op") else "the collectives"
        why = "while no rank computed longer or arrived late (link or network degradation)"
        how = "slowed down"
        if device is not None:
            d_coll = device["collective_ms"]["window"] - device["collective_ms"]["baseline"]
            if "late_rank" in device:
                sc = device["shortest_collectives"]
                how = "took longer"
                why = (f"while no rank arrived late on the host; on the GPU rank "
                       f"{device['late_rank']} arrived last: its collective kernels took "
                       f"{sc['ms']:.1f} ms per step vs {sc['others_ms']:.1f} ms on the others, "
                       "which waited for it in theirs")
            else:
                why = (f"and the collective kernels ran {d_coll:.1f} ms longer per step on the "
                       "GPUs (device time) while no rank computed longer or arrived late "
                       "(link or network degradation)")
        out.append(
            {
                "kind": "collective_stall",
                "severity": "warning",
                "summary": (
                    f"From step {w['start_step']}, {what} {how} on every rank: the wait "
                    f"for collectives grew by {d_wait / 1e6:.1f} ms per step {why}."
                ),
                **attr,
                "since_step": w["start_step"],
                "end_step": w["end_step"],
                "slowdown": round(slow, 2) if slow else None,
                "wait_ms": {
                    "baseline": round(base["wait"] / 1e6, 3),
                    "window": round(win["wait"] / 1e6, 3),
                },
                "evidence": {
                    "step_time_growth_ms": round(d_step / 1e6, 3),
                    "wait_growth_ms": round(d_wait / 1e6, 3),
                    "compute_wait_growth_ms": round(d_comp / 1e6, 3),
                    "lateness_growth_ms": round(d_late / 1e6, 3),
                    **({"device": device} if device is not None else {}),
                },
                **({"late_rank": device["late_rank"]}
                   if device is not None and "late_rank" in device else {}),
            }
        )
    return out
