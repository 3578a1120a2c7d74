"""Anomalous windows: runs of steps whose job-wide step time is far above the baseline.

Metric: per step, the median across ranks of the step time. Detector: baseline = the 25th
percentile of that series (robust to windows covering up to ~70% of the run), noise = the
smaller of the lower half's MAD and the consecutive differences' (see `baseline`); a step
is anomalous when it exceeds the baseline by both 20% and 5 noise units. Anomalous steps
separated by at most one normal step are merged into a window. A warning needs a slowdown
>= 2x over >= 3 anomalous steps, or >= 1.3x over >= 3 anomalous steps that cost the job
>= 1.5 baseline steps in all (the sum of the window's excess over the baseline), or, for a
window of one or two anomalous steps, >= HICCUP_SLOWDOWN (3x); anything less is `info` (a
hiccup: on a shared host, CPU contention alone slows a step or two by ~30%; healthy real
DDP jobs on the project's 2-core machine showed 3-step windows of 1.24x and 1.32x, 0.7 and
1.0 steps lost, one with no CPU contention to explain it, and a collective stall was built
on it; 2 of 80 healthy real torch runs of the zoo had a window of 1 or 2 steps at 2.05x and
2.12x, a collective stall built on one; no one can act on one slow step, a 3x one such as
a JIT compile or a stop of the world is still a warning). A window that starts within the
first WARMUP_STEPS steps of the recording is `info` marked `warmup` when it is not >= 2x or
is such a hiccup: the first steps of a job are slow by nature (allocator, autotuning,
connection set-up, lazy init) and nothing before them gives a baseline. A healthy real DDP
job's first step measured 2.2x on a busy machine (52 ms for 24) and a collective stall was
built on it; a slow start of >= 3 steps at >= 2x, or of a step at >= 3x, is still a warning.

A sustained window below 2x is then a hiccup too (`settle`: `info`) when no straggler is
found in it and the job's own rate of slow steps explains it: with p the fraction of
anomalous steps outside the window, the chance that some stretch of the window's length
holds as many anomalous steps, (number of stretches) x P(Binomial(length, p) >= that many),
is > CHANCE (1 %). On 4 ranks of 2 vCPUs, healthy TP x DP jobs over gloo had 1-step windows
of 1.3-1.5x every ~12 steps (p ~ 0.07) and, from them by chance, 3 slow steps in 4 (1.4x,
1.5 steps lost) on which a collective stall was built; a slowdown of 3 steps in a run
whose steps are otherwise steady (p = 0) stays a warning.
"""

from __future__ import annotations

from math import comb
from statistics import median
from typing import Any

import numpy as np
import polars as pl

REL_THRESHOLD = 0.20
NOISE_UNITS = 5.0
WARN_SLOWDOWN = 2.0  # a single step this much slower is a warning
WARN_SLOWDOWN_RUN = 1.3  # a run of >= WARN_RUN_STEPS steps this much slower is a warning
WARN_RUN_STEPS = 3
WARN_LOST_STEPS = 1.5  # ... and cost the job this many baseline steps in all
WARMUP_STEPS = 3
HICCUP_SLOWDOWN = 3.0  # a window of 1-2 anomalous steps is a warning from this on
MAX_PERIOD = 16  # the longest host sync period looked for (steps)
PERIODIC_SHARE = 0.8  # a sync period's phase medians explain >= this share of the variance
CHANCE = 0.01  # a sustained window is a warning only when the run's rate of slow steps
# makes one as dense this unlikely


def step_series(metrics: pl.DataFrame) -> pl.DataFrame:
    """Per step: median step time across ranks, time span, and the number of ranks."""
    if metrics.height == 0:
        return pl.DataFrame(
            schema={
                "step": pl.Int64,
                "step_time_ns": pl.Float64,
                "start_ns": pl.Int64,
                "end_ns": pl.Int64,
                "n_ranks": pl.UInt32,
            }
        )
    return (
        metrics.group_by("step")
        .agg(
            pl.col("step_time_ns").median(),
            pl.col("start_ns").min(),
            pl.col("end_ns").max(),
            pl.len().alias("n_ranks"),
        )
        .sort("step")
    )


def baseline(values: list[float]) -> tuple[float, float]:
    """(baseline, noise) of a step-time series in step order: the 25th percentile, and the
    smaller of two robust spreads: 1.4826 x the MAD of the lower half, and 1.4826 x the
    median absolute difference of consecutive steps / sqrt(2). The first alone is inflated
    when a slow window covers half the run or more (its steps join the lower half); the
    second is not moved by a level shift (a window adds two large differences, a one-step
    hiccup two), so a fault that slows most of a short recording is still seen."""
    v = sorted(values)
    if not v:
        return 0.0, 0.0
    base = v[len(v) // 4]
    lower = v[: max(1, (len(v) + 1) // 2)]
    m = median(lower)
    noise = 1.4826 * median(abs(x - m) for x in lower)
    if len(values) >= 5:
        diffs = [abs(b - a) for a, b in zip(values, values[1:], strict=False)]
        noise = min(noise, 1.4826 * median(diffs) / 2**0.5)
    return float(base), float(noise)


def _chance(k: int, n: int, p: float, stretches: int) -> float:
    """How likely a run whose steps are slow at rate `p` is to hold, somewhere among its
    `stretches` stretches of `n` steps, one with >= `k` slow steps: stretches x
    P(Binomial(n, p) >= k), at most 1 (a union bound: overlapping stretches are not
    independent, so this errs towards calling a window chance)."""
    if p <= 0.0:
        return 0.0
    tail = sum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))
    return min(1.0, max(1, stretches) * tail)


def sync_period(s: pl.DataFrame) -> int:
    """The period n (2..MAX_PERIOD steps) of a step-time series (`step_series`) whose host
    reads back only every n steps (it runs ahead in n - 1 short steps and waits for its GPU
    in the nth), or 1: the smallest n whose phase medians (by step id mod n) differ >= 1.5x
    and explain >= PERIODIC_SHARE of the series' variance, over >= 4 cycles (scattered slow
    steps of a busy node are explained by no phase)."""
    steps, vals = s["step"].to_numpy(), s["step_time_ns"].to_numpy().astype(float)
    if vals.size < 8:
        return 1
    total = float(np.var(vals))
    if total <= 0:
        return 1
    for n in range(2, MAX_PERIOD + 1):
        if vals.size < 4 * n:
            break
        phase = steps % n
        med = np.array([np.median(vals[phase == j]) for j in range(n)])
        if med.min() <= 0 or med.max() < 1.5 * med.min():
            continue
        if 1.0 - float(np.mean((vals - med[phase]) ** 2)) / total >= PERIODIC_SHARE:
            return n
    return 1


def _cycles(s: pl.DataFrame, n: int) -> pl.DataFrame:
    """`step_series` over whole cycles of n steps (blocks of step ids k*n .. k*n + n - 1 that
    have every step): `step` = the block's first step, `last_step`, `step_time_ns` = the mean
    step time of the block, `start_ns`/`end_ns`, `n_steps`."""
    return (s.with_columns((pl.col("step") // n).alias("_b"))
            .group_by("_b").agg(pl.col("step").min(), pl.col("step").max().alias("last_step"),
                                pl.col("step_time_ns").mean(), pl.col("start_ns").min(),
                                pl.col("end_ns").max(), pl.len().alias("n_steps"))
            .filter(pl.col("n_steps") == n).drop("_b").sort("step"))


def typical_step_ns(metrics: pl.DataFrame) -> float:
    """The job's typical time per step: the median step time, or, for a host that reads back
    every n steps (`sync_period`), the median over its n-step cycles of their mean step."""
    s = step_series(metrics)
    if s.height == 0:
        return 0.0
    n = sync_period(s)
    vals = (_cycles(s, n) if n > 1 else s)["step_time_ns"].to_list()
    return float(median(vals)) if vals else float(median(s["step_time_ns"].to_list()))


def detect_windows(metrics: pl.DataFrame) -> list[dict[str, Any]]:
    """Anomalous windows (see module doc), each a finding dict of kind `anomalous_window`.
    A host that reads back every n steps is judged over its n-step cycles (their mean step
    time), not over steps whose times alternate by its syncs."""
    s = step_series(metrics)
    if s.height < 5:
        return []
    n_sync = sync_period(s)
    if n_sync > 1:
        s = _cycles(s, n_sync)
        if s.height < 5:
            return []
    else:
        s = s.with_columns(pl.col("step").alias("last_step"), pl.lit(1).alias("n_steps"))
    vals = s["step_time_ns"].to_list()
    base, noise = baseline(vals)
    if base <= 0:
        return []
    thr = base + max(REL_THRESHOLD * base, NOISE_UNITS * noise)
    rows = s.rows(named=True)
    flagged = [r["step_time_ns"] > thr for r in rows]
    windows: list[list[int]] = []
    i = 0
    while i < len(rows):
        if not flagged[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(rows) and (flagged[j + 1] or (j + 2 < len(rows) and flagged[j + 2])):
            j += 1 if flagged[j + 1] else 2
        windows.append([i, j])
        i = j + 1
    out = []
    n_flagged = sum(flagged)
    for a, b in windows:
        inside = [r["step_time_ns"] for r in rows[a : b + 1]]
        win_ms = median(inside) / 1e6
        slow = median(inside) / base
        n = b - a + 1
        k = sum(flagged[a : b + 1])
        hiccup = k < WARN_RUN_STEPS and slow < HICCUP_SLOWDOWN
        warmup = a < WARMUP_STEPS and (slow < WARN_SLOWDOWN or hiccup)
        lost = sum(t - base for t in inside) / base * n_sync
        chance = _chance(k, n, (n_flagged - k) / max(1, len(rows) - n), len(rows) - n + 1)
        serious = not hiccup and (slow >= WARN_SLOWDOWN or (
            k >= WARN_RUN_STEPS and slow >= WARN_SLOWDOWN_RUN and lost >= WARN_LOST_STEPS))
        severity = "warning" if serious and not warmup else "info"
        out.append(
            {
                "kind": "anomalous_window",
                "severity": severity,
                "summary": (
                    f"Steps {rows[a]['step']}-{rows[b]['last_step']} took {win_ms:.1f} ms "
                    f"(median), {slow:.1f}x the baseline of {base / 1e6:.1f} ms"
                    + (" (warm-up: the first steps of the recording)." if warmup else ".")
                ),
                "start_step": int(rows[a]["step"]),
                "end_step": int(rows[b]["last_step"]),
                "start_ns": int(rows[a]["start_ns"]),
                "end_ns": int(rows[b]["end_ns"]),
                "steps": n * n_sync,
                "baseline_step_time_ms": round(base / 1e6, 3),
                "window_step_time_ms": round(win_ms, 3),
                "slowdown": round(slow, 2),
                "lost_steps": round(lost, 2),
                "threshold_ms": round(thr / 1e6, 3),
                "anomalous_steps": k * n_sync,
                "chance": round(chance, 4),
                **({"sync_every": n_sync} if n_sync > 1 else {}),
                "warmup": warmup,
            }
        )
    return out


def settle(windows: list[dict[str, Any]], stragglers: list[dict[str, Any]]) -> None:
    """Demote, in place, the sustained warning windows below 2x that the run's own rate of
    slow steps explains (`chance` > CHANCE) and in which no straggler was found (module doc):
    `info`, marked `by_chance`. Call after the stragglers, before anything that reads the
    warning windows as scopes (collective stalls, hot spots)."""
    claimed = {(f["start_step"], f["end_step"]) for f in stragglers
               if f.get("start_step") is not None}
    for w in windows:
        if (w["severity"] == "warning" and w["slowdown"] < WARN_SLOWDOWN
                and w["chance"] > CHANCE and not any(
                    a <= w["end_step"] and b >= w["start_step"] for a, b in claimed)):
            w["severity"] = "info"
            w["by_chance"] = True
            w["summary"] = w["summary"][:-1] + (
                f": {w['anomalous_steps']} slow steps of {w['steps']}, as often as this run's "
                f"steps are slow elsewhere (chance {w['chance']:.0%}).")
