"""Straggler ranks: the rank that is consistently the slowest, and whether GPU or host.

Metrics per (rank, step), from `steps.step_metrics`:
- `compute_wait_ns` (the read-back wait for the rank's own GPU work): high on a GPU-slow rank.
  Its end-of-step sync wait is SHORTER than the others' (they wait for it), so a naive
  "who waits least on communication" view calls it healthy.
- `lateness_ns` (host arrival at each collective vs the median arrival): high on a host-slow
  rank (data loading, CPU contention, JIT compile).
- `host_gap_ns` (from the step's start to its first traced call: the host work before the
  step's GPU work, data loading above all): high on a host-slow rank even where its late
  arrival is diluted (a tensor-parallel peer waits for it, the next calls of both are late
  together).

Pipeline stages differ by role (the first stage loads the data, each stage arrives at its
data-parallel allreduce at its own point of the schedule): where the stages have data-
parallel ranks (`stages`), every metric is compared within a stage only (the healthy
simulator's 2 stages x 2 DP: the first stage's two ranks arrive 3-8 ms later than the
second's in every run, each the latest of the four in ~50 % of the steps, score up to 4.9);
with one rank per stage, `host_gap_ns` is not read and the others are compared across the
stages. A stage slow as a whole is `pipeline.py`'s.

Detector, per metric and per scope (the whole recording, then each warning anomalous window
and its peak: its steps >= 2x the baseline): for
each step, d = own value - median of the other ranks; per rank, D = median of d over the
steps, noise = max(1.4826 * MAD of d, 1% of the step time, 50 us, in a window: the rank's
noise over the steps outside every warning window, or over the whole recording when fewer
than 5 such steps remain), score = D / noise. A rank
is flagged when it has the metric in >= 50% of the scope's steps and is the slowest in
>= 50% of those, score >= 4 (or: clearly the slowest, by >= 3% of the step and 0.2 ms over
the others' median, in >= 90% of them and the sign test's z of those steps >= 4: a rank
late in every step by an amount that spreads with the load, 38 of 38 steps at D / noise 3.3
on a busy host) and D >= 3% of
the median step time (and >= 0.2 ms); in a window, D must also be >= 25% of the window's
excess over the baseline (a rank delayed 30 ms in a step that another rank's 500 ms JIT
compile stretched does not explain it). Of 379 healthy zoo runs (10 shapes, busy and quiet
hosts), no rank was the slowest in even 80% of the steps by >= 3% of the step; of 122 fault
runs with such a rank, it was the planted one in all. Severity: critical when D >= 25% of
the step time.
Cause `gpu` when the compute-wait metric or the device time of the rank's compute kernels
(`gpu_compute_ns`: the GPU agent's records, `argus.analyze.kernels`) flags the rank, else
`host`; one finding per rank, the device-time one first (a GPU straggler is never also
reported with cause host).

When no metric flags a rank step by step, over blocks of 5 steps (a value that moves
between adjacent steps cancels in a block's sum; `consistently_most`): the rank that is late
(`lateness_ns`) or works longer before its step (`host_gap_ns`) in most blocks, or that
waits least in its collectives (`coll_wait_ns`, `least_wait`: the one the others wait for;
pipeline stages: in their sends/receives, `pipeline.py`). A rank is flagged when it has the
most (the least wait) in >= 50% of >= 4 blocks, the sign test's z of those blocks
((k - n/R) / sqrt(n (1/R)(1 - 1/R)) for R ranks alike) is >= 4, and its median excess is
>= 3% of the step time (and >= 0.2 ms); of the three metrics, the one whose flagged rank
has the highest z names the stragglers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from statistics import median
from typing import Any

import numpy as np
import polars as pl

MIN_FRACTION = 0.5
MIN_SCORE = 4.0
MIN_IMPACT = 0.03
CRITICAL_IMPACT = 0.25
MIN_ABS_NS = 200_000
NOISE_FLOOR_NS = 50_000
PEAK = 2.0  # a window's peak steps: >= 2x its baseline
EXPLAIN = 0.25  # in a window, a straggler's excess explains >= 25% of the window's
MIN_CALM_STEPS = 5  # steps outside the warning windows needed to measure a rank's own noise
BLOCK_STEPS = 5  # the least-wait metric is scored over blocks of this many steps
MIN_BLOCKS = 4
CONSISTENT = 0.9  # clearly the slowest in >= 90 % of the steps: flagged by the sign test

def min_excess_ns(step_ns: float) -> float:
    """The least excess per step a straggler has: MIN_IMPACT of the step and MIN_ABS_NS."""
    return max(MIN_IMPACT * step_ns, MIN_ABS_NS)


METRICS = (("gpu_compute_ns", "gpu"), ("compute_wait_ns", "gpu"), ("lateness_ns", "host"),
           ("host_gap_ns", "host"))
DEVICE_METRIC = "gpu_compute_ns"  # the GPU agent's device time (argus.analyze.kernels)
WHAT = {
    "gpu_compute_ns": "runs its compute kernels longer on its GPU (device time)",
    "compute_wait_ns": "waits longer for its own GPU work (read-back)",
    "lateness_ns": "arrives late at collectives (host side)",
    "host_gap_ns": "works longer on the host before its first call of the step (data "
                   "loading, CPU work)",
    "coll_wait_ns": "waits least in its collectives (the others wait for it)",
}


def _group_median(group: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(groups ascending, median of `x` per group), each median as `statistics.median`
    takes it (the middle value, or the mean of the two middle ones: bit for bit). Each
    group's values sorted on their own (polars, in parallel: a sort of all 2 M rows of
    10,240 ranks took 2.5x as long)."""
    df = (pl.DataFrame({"g": group, "x": x})
          .group_by("g").agg(pl.col("x").sort(), pl.len().alias("n")).sort("g")
          .with_columns(((pl.col("n") - 1) // 2).alias("lo"), (pl.col("n") // 2).alias("hi")))
    lo_v = df.select(pl.col("x").list.get(pl.col("lo")))["x"].to_numpy()
    hi_v = df.select(pl.col("x").list.get(pl.col("hi")))["x"].to_numpy()
    same = df["lo"].to_numpy() == df["hi"].to_numpy()
    return df["g"].to_numpy(), np.where(same, lo_v, (lo_v + hi_v) / 2)


def _others_median(step: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per row of a frame sorted by (step, x): the median of the OTHER rows of its step
    (as `statistics.median` takes it)."""
    starts = np.flatnonzero(np.concatenate(([True], step[1:] != step[:-1])))
    sizes = np.diff(np.concatenate((starts, [step.size])))
    g_start, n = np.repeat(starts, sizes), np.repeat(sizes, sizes)
    i = np.arange(step.size) - g_start  # own position in the sorted step
    m = n - 1  # others

    def rem(j: np.ndarray) -> np.ndarray:  # j-th smallest of the others
        return x[g_start + j + (j >= i)]

    odd = (m % 2) == 1
    h = m // 2
    med_even = (rem(np.maximum(h - 1, 0)) + rem(np.where(odd, 0, h))) / 2
    return np.where(odd, rem(np.where(odd, (m - 1) // 2, 0)), med_even)


def score_ranks(
    m: pl.DataFrame, col: str, step_ns: float, noise_min: dict[int, float] | None = None
) -> dict[int, dict[str, float]]:
    """Per rank of `m` (rank, step, `col`; one row per (rank, step)): D (`excess_ns`, the
    median over the steps of its value minus the others' median), `noise_ns`, `score`
    D / noise, the fraction of the steps it is the slowest in (the largest value, the lowest
    rank on a tie) and slowest by >= `min_excess_ns(step_ns)` over the others' median
    (`clearly_slowest_fraction`), `steps` (see module doc). Steps with one rank do not count.
    Vectorised (a sort per step and per rank: 10,000 ranks in seconds); ranks in the order
    they first appear in `m`'s steps."""
    v = (m.filter(pl.col(col).is_not_null())
         .select("rank", "step", pl.col(col).cast(pl.Float64).alias("_x"))
         .with_row_index("_i"))
    v = v.filter(pl.len().over("step") >= 2)
    if v.height == 0:
        return {}
    # the order of the ranks: by their first row, steps in the order they first appear
    key = pl.col("_i").min().over("step") * (v.height + 1) + pl.col("_i")
    order = (v.group_by("rank").agg(key.min().alias("_k")).sort("_k")["rank"].to_list())
    # by step, value, and the lowest rank last among equal values: each step's last row is
    # its slowest (the largest value, the lowest rank on a tie)
    v = v.sort("step", "_x", "rank", descending=[False, False, True])
    step = v["step"].to_numpy()
    x = v["_x"].to_numpy()
    rank = v["rank"].to_numpy().astype(np.int64)
    d = x - _others_median(step, x)
    is_top = np.concatenate((step[1:] != step[:-1], [True]))
    n_steps = int(is_top.sum())
    slowest = Counter(rank[is_top].tolist())
    clearly = Counter(rank[is_top & (d >= min_excess_ns(step_ns))].tolist())
    ranks, big_d = _group_median(rank, d)  # ranks ascending
    by_rank = dict(zip(ranks.tolist(), big_d.tolist(), strict=True))
    if rank.min() >= 0 and rank.max() < 1 << 24:  # rank ids index a table: no search
        lut = np.zeros(int(rank.max()) + 1)
        lut[ranks] = big_d
        dev = np.abs(d - lut[rank])
        n_rows = np.bincount(rank)
        counts = {int(r): int(n_rows[r]) for r in ranks.tolist()}
    else:
        dev = np.abs(d - big_d[np.searchsorted(ranks, rank)])
        counts = Counter(rank.tolist())
    _r, mad = _group_median(rank, dev)
    mads = dict(zip(_r.tolist(), mad.tolist(), strict=True))
    floor = max(0.01 * step_ns, NOISE_FLOOR_NS)
    out = {}
    for r in order:
        r = int(r)
        noise = max(1.4826 * mads[r], floor, (noise_min or {}).get(r, 0.0))
        out[r] = {
            "excess_ns": by_rank[r],
            "noise_ns": noise,
            "score": by_rank[r] / noise,
            "slowest_fraction": slowest.get(r, 0) / n_steps,
            "clearly_slowest_fraction": clearly.get(r, 0) / n_steps,
            "steps": counts[r],
        }
    return out


def _median_of(m: pl.DataFrame, col: str, rank: int, own: bool) -> float | None:
    sel = m.filter((pl.col("rank") == rank) if own else (pl.col("rank") != rank))[col]
    sel = sel.drop_nulls()
    return float(sel.median()) / 1e6 if sel.len() else None


def block_sums(m: pl.DataFrame, col: str, n: int = BLOCK_STEPS) -> pl.DataFrame:
    """Per (rank, block of `n` consecutive steps) the sum of `col`, for the blocks that every
    rank has in full (`step` is the block's index): a metric whose per-step values are too
    noisy to score (a wait that moves between adjacent steps cancels in the sum)."""
    v = m.filter(pl.col(col).is_not_null())
    if v.height == 0:
        return pl.DataFrame(schema={"rank": pl.Int32, "step": pl.Int64, col: pl.Int64})
    b = (v.with_columns((pl.col("step") // n).alias("block"))
         .group_by("rank", "block").agg(pl.col(col).sum(), pl.len().alias("_n"))
         .filter(pl.col("_n") == n))
    ranks = b["rank"].n_unique()
    full = b.group_by("block").agg(pl.len().alias("_k")).filter(pl.col("_k") == ranks)
    return (b.join(full.select("block"), on="block")
            .select("rank", pl.col("block").alias("step"), col).sort("rank", "step"))


def sign_z(k: int, n: int, r: int) -> float:
    """The sign test's z of a rank that is the least of `r` alike ranks in `k` of `n` blocks:
    (k - n/r) / sqrt(n (1/r) (1 - 1/r)); 0 when it cannot be told (n = 0, r < 2)."""
    if n == 0 or r < 2:
        return 0.0
    p = 1.0 / r
    return (k - n * p) / math.sqrt(n * p * (1 - p))


def consistently_most(
    m: pl.DataFrame, col: str, step_ns: float,
    score: Callable[..., dict[int, dict[str, float]]] | None = None, block: int = BLOCK_STEPS,
) -> dict[int, dict[str, float]]:
    """The ranks of `m` (rank, step, `col`: a per-step metric, more is slower) that have the
    most of `col` consistently, flagged (module doc): per rank the per-step `excess_ns` (over
    the others' median) and `noise_ns`, `score` the sign test's z of the blocks it has the
    most in, `spread_score` excess / noise, `slowest_fraction` (of the blocks it has the most
    in), `blocks`, `steps`.

    Scored over blocks of BLOCK_STEPS steps (one step's value is too noisy: a wait moves
    across a step boundary, which a sum over a few steps cancels). Flagged by how CONSISTENTLY
    the rank has the most, not by how far the per-block differences spread: on 4 ranks of 2
    vCPUs a straggler's 4-7 ms less wait per step spread 2-3 ms per block (excess / noise
    1.7-3.7) while it was the least in 79-100 % of the blocks (z 5.4-7.1; healthy ranks <= 0.44
    of the blocks, z <= 1.9)."""
    b = block_sums(m.select("rank", "step", col), col, block)
    n_blocks, n_ranks = b["step"].n_unique(), b["rank"].n_unique()
    out: dict[int, dict[str, float]] = {}
    for r, s in (score or score_ranks)(b, col, block * step_ns).items():
        per = {
            "excess_ns": s["excess_ns"] / block,
            "noise_ns": s["noise_ns"] / block,
            "score": sign_z(round(s["slowest_fraction"] * n_blocks), n_blocks, n_ranks),
            "spread_score": s["score"],
            "slowest_fraction": s["slowest_fraction"],
            "blocks": s["steps"],
            "block_steps": block,
            "steps": s["steps"] * block,
        }
        if (
            s["steps"] >= max(MIN_BLOCKS, MIN_FRACTION * n_blocks)
            and per["slowest_fraction"] >= MIN_FRACTION
            and per["score"] >= MIN_SCORE
            and per["excess_ns"] >= min_excess_ns(step_ns)
        ):
            out[r] = per
    return out


def least_wait(
    m: pl.DataFrame, col: str, step_ns: float,
    score: Callable[..., dict[int, dict[str, float]]] | None = None, block: int = BLOCK_STEPS,
) -> dict[int, dict[str, float]]:
    """The ranks of `m` (rank, step, `col`: a wait per step) that wait least, flagged as
    `consistently_most` flags the most (`excess_ns`: how much less it waits than the
    others' median)."""
    return consistently_most(m.select("rank", "step", (-pl.col(col)).alias("less_wait_ns")),
                             "less_wait_ns", step_ns, score, block)


def _summary(f: dict[str, Any], n: int = 1) -> str:
    """A straggler finding's summary line, from its fields (per step)."""
    ev, col = f["evidence"], f["evidence"]["metric"]
    where = (f" in steps {f['start_step']}-{f['end_step']}" if f["start_step"] is not None
             else " throughout the recording")
    more = "less" if col == "coll_wait_ns" else "more"
    than = "the other ranks of its pipeline stage" if "stage" in ev else "the other ranks"
    return (f"Rank {f['rank']} is the straggler{where}: it {WHAT[col]}, "
            f"{ev['excess_ms']:.1f} ms per step {more} than {than} "
            f"({f['impact']:.0%} of the {ev['step_time_ms_p50']:.1f} ms step"
            + (f"; over {n}-step cycles: its host reads back every {n} steps" if n > 1 else "")
            + ").")


def _finding(r: int, col: str, cause: str, s: dict[str, float], window: dict[str, Any] | None,
             m: pl.DataFrame, step_ns: float, others: dict[str, dict[str, float] | None],
             stage: list[int] | None = None) -> dict[str, Any]:
    """The straggler finding of rank `r` flagged by metric `col` with score `s` (per step);
    `stage`: the pipeline stage it was compared within (its evidence's others are the
    stage's other ranks, `evidence.stage` names them)."""
    impact = s["excess_ns"] / step_ns
    if stage is not None:
        m = m.filter(pl.col("rank").is_in(stage))
    ev: dict[str, Any] = {
        "metric": col,
        "excess_ms": round(s["excess_ns"] / 1e6, 3),
        "noise_ms": round(s["noise_ns"] / 1e6, 3),
        "slowest_in_fraction_of_steps": round(s["slowest_fraction"], 3),
        **({"clearly_slowest_in_fraction_of_steps": round(s["clearly_slowest_fraction"], 3),
            "sign_z": round(s["sign_z"], 2)} if "sign_z" in s else {}),
        "steps": s["steps"],
        "step_time_ms_p50": round(step_ns / 1e6, 3),
        **({"stage": sorted(stage)} if stage is not None else {}),
    }
    for key, c in (
        ("compute_wait_ms", "compute_wait_ns"),
        ("sync_wait_ms", "sync_wait_ns"),
        ("coll_wait_ms", "coll_wait_ns"),
        ("lateness_ms", "lateness_ns"),
        ("host_gap_ms", "host_gap_ns"),
        ("gpu_compute_ms", "gpu_compute_ns"),
        ("gpu_coll_ms", "gpu_coll_ns"),
    ):
        if c not in m.columns:
            continue
        own, oth = _median_of(m, c, r, True), _median_of(m, c, r, False)
        if own is not None:
            ev[key] = {"rank": round(own, 3), "others": round(oth, 3) if oth is not None else None}
    for c2, x in others.items():
        if x is not None:
            ev[f"{c2[:-3]}_score"] = round(x["score"], 2)
    f = {
        "kind": "straggler",
        "severity": "critical" if impact >= CRITICAL_IMPACT else "warning",
        "summary": "",
        "rank": r,
        "cause": cause,
        "score": round(s["score"], 2),
        "impact": round(impact, 3),
        "start_step": window["start_step"] if window else None,
        "end_step": window["end_step"] if window else None,
        "evidence": ev,
    }
    f["summary"] = _summary(f)
    return f


def _blocks_finding(r: int, col: str, s: dict[str, float], m: pl.DataFrame, step_ns: float,
                    others: dict[str, dict[str, float] | None],
                    stage: list[int] | None = None) -> dict[str, Any]:
    """A whole-recording host straggler flagged over blocks of steps (`consistently_most`):
    its evidence says in what fraction of the blocks it was the slowest (waited least, for
    `coll_wait_ns`) and carries `blocks`, `block_steps` and `spread_score`."""
    f = _finding(r, col, "host", s, None, m, step_ns, others, stage)
    ev = f["evidence"]
    least = "least_wait" if col == "coll_wait_ns" else "slowest"
    ev[f"{least}_in_fraction_of_blocks"] = ev.pop("slowest_in_fraction_of_steps")
    ev |= {"blocks": s["blocks"], "block_steps": s["block_steps"],
           "spread_score": round(s["spread_score"], 2)}
    return f


SUMMED = ("compute_wait_ns", "sync_wait_ns", "coll_wait_ns", "p2p_wait_ns", "lateness_ns",
          "host_gap_ns", "step_time_ns", "gpu_compute_ns", "gpu_coll_ns",
          "gpu_copy_ns")  # metrics a sync cycle's sum stands for


def _by_cycles(metrics: pl.DataFrame, windows: list[dict[str, Any]],
               n: int) -> tuple[pl.DataFrame, list[dict[str, Any]]]:
    """`metrics` and `windows` over whole n-step cycles (a host that reads back every n
    steps: its lateness and waits move between the steps of a cycle, it runs ahead in some,
    catches up in one): per (rank, cycle k) the sums of `SUMMED` over steps k*n..k*n+n-1
    (cycles every rank has in full), `step` = k; windows' steps as cycles."""
    cols = [c for c in SUMMED if c in metrics.columns]
    b = (metrics.with_columns((pl.col("step") // n).alias("_c"))
         .group_by("rank", "_c")
         .agg(*[pl.col(c).sum() if c == "step_time_ns" else
                pl.when(pl.col(c).is_not_null().any()).then(pl.col(c).sum()) for c in cols],
              pl.col("start_ns").min(), pl.col("end_ns").max(), pl.len().alias("_n"))
         .filter(pl.col("_n") == n).drop("_n").rename({"_c": "step"}))
    ranks = b["rank"].n_unique()
    full = b.group_by("step").agg(pl.len().alias("_k")).filter(pl.col("_k") == ranks)
    b = b.join(full.select("step"), on="step").sort("rank", "step")
    ws = [{**w, "start_step": w["start_step"] // n, "end_step": w["end_step"] // n,
           "steps": max(1, w["steps"] // n),
           "baseline_step_time_ms": w.get("baseline_step_time_ms", 0) * n} for w in windows]
    return b, ws


def detect_stragglers(
    metrics: pl.DataFrame,
    windows: list[dict[str, Any]],
    step_ns: float,
    pipeline: bool = False,
    sync_every: int = 1,
    stages: Sequence[Sequence[int]] | None = None,
    block: int = BLOCK_STEPS,
) -> list[dict[str, Any]]:
    """Straggler findings (see module doc), at most one per rank: its strongest scope (GPU
    over host cause, then the whole recording over a window, then the score).

    Every metric is scored by `score_ranks`, on raw recordings and on summaries alike.
    `pipeline`: the ranks are pipeline stages, whose work differs by role: every metric is compared
    within each of `stages` (their data-parallel ranks; a 10 % host straggler on the
    simulator's 2 stages x 2 DP: 6.9 ms per step more, score 9, where its lateness across
    the stages scored 3-5; module doc). `sync_every` n > 1 (a host that
    reads back every n steps, `anomaly.sync_period`): scored over n-step cycles
    (`_by_cycles`), reported per step."""
    if sync_every > 1:
        b, ws = _by_cycles(metrics, windows, sync_every)
        n = sync_every
        # a cycle already sums n steps: blocks of ~BLOCK_STEPS steps are of fewer cycles
        # (28 cycles of 5 make 5 blocks of 5 cycles, whose sign test cannot reach 4)
        found = detect_stragglers(b, ws, step_ns * n, pipeline, stages=stages,
                                  block=max(1, round(BLOCK_STEPS / n)))
        for f in found:
            ev = f["evidence"]
            for k in ("excess_ms", "noise_ms", "step_time_ms_p50"):
                if k in ev:
                    ev[k] = round(ev[k] / n, 3)
            for v in ev.values():
                if isinstance(v, dict) and {"rank", "others"} <= set(v):
                    v.update({x: round(v[x] / n, 3) if v[x] is not None else None
                              for x in ("rank", "others")})
            ev["steps"] = ev["steps"] * n
            if "block_steps" in ev:
                ev["block_steps"] = ev["block_steps"] * n
            ev["sync_every"] = n
            if f["start_step"] is not None:
                f["start_step"], f["end_step"] = f["start_step"] * n, f["end_step"] * n + n - 1
            f["summary"] = _summary(f, n)
        return found
    # pipeline stages: their work differs by role (the first stage loads the data, each
    # stage arrives at its data-parallel allreduce and its sends at its own point of the
    # schedule), so where a stage has data-parallel ranks every metric is compared within
    # the stage only (a slow stage as a whole is pipeline.py's); with one rank per stage
    # host_gap_ns is not read at all, the others are compared across stages
    groups = [list(g) for g in (stages or []) if len(g) >= 2]
    peers = {r: g for g in groups for r in g} if pipeline else {}

    def _score_fn(m: pl.DataFrame, col: str, step_ns: float,
                  noise_min: dict[int, float] | None = None) -> dict[int, dict[str, float]]:
        if not (pipeline and groups):
            return score_ranks(m, col, step_ns, noise_min)
        out: dict[int, dict[str, float]] = {}
        for g in groups:
            out |= score_ranks(m.filter(pl.col("rank").is_in(g)), col, step_ns, noise_min)
        return out

    metrics_used = tuple((c, k) for c, k in METRICS
                         if c in metrics.columns
                         and not (pipeline and c == "host_gap_ns" and not groups))
    if metrics.height == 0 or metrics["rank"].n_unique() < 2 or step_ns <= 0:
        return []
    scopes: list[tuple[dict[str, Any] | None, pl.DataFrame]] = [(None, metrics)]
    # Only windows that warn: an `info` window is a hiccup (a few steps ~20-40% slower on a
    # shared host), and in it whichever rank the scheduler delayed would look like a
    # straggler. A window's noise is at least the rank's noise over the whole recording: a
    # window of one or two steps has no spread of its own (MAD 0), so a one-step delay of
    # a few % of a step would score high.
    per_step = dict(metrics.group_by("step").agg(pl.col("step_time_ns").median()).rows())
    for w in (w for w in windows if w["severity"] in ("warning", "critical")):
        sub = metrics.filter(pl.col("step").is_between(w["start_step"], w["end_step"]))
        if sub.height:
            scopes.append((w, sub))
        # its peak: the steps >= 2x the baseline inside a longer window (a one-step JIT
        # compile inside a window stretched by the contention it caused)
        base = w.get("baseline_step_time_ms", 0) * 1e6
        peak = sorted(
            st
            for st, t in per_step.items()
            if w["start_step"] <= st <= w["end_step"] and t is not None and t >= PEAK * base
        )
        if base > 0 and peak and len(peak) < w["steps"]:
            scopes.append(
                ({**w, "start_step": peak[0], "end_step": peak[-1]},
                 metrics.filter(pl.col("step").is_between(peak[0], peak[-1])))
            )
    best: dict[int, dict[str, Any]] = {}
    whole = {col: _score_fn(metrics, col, step_ns) for col, _ in metrics_used}
    # A window's noise floor: each rank's noise over the steps outside every warning window
    # (its normal behaviour). The whole recording's noise would include the window itself:
    # a rank slowed from mid-run has a bimodal series whose spread is the fault's own size.
    calm = metrics
    for w in (w for w in windows if w["severity"] in ("warning", "critical")):
        calm = calm.filter(~pl.col("step").is_between(w["start_step"], w["end_step"]))
    base_noise = (
        {col: _score_fn(calm, col, step_ns) for col, _ in metrics_used}
        if calm["step"].n_unique() >= MIN_CALM_STEPS
        else whole
    )
    for window, m in scopes:
        window_excess = 0.0  # how much longer the window's steps are than the baseline
        if window is not None:
            in_scope = [
                t
                for st, t in per_step.items()
                if window["start_step"] <= st <= window["end_step"] and t is not None
            ]
            if in_scope:
                base = window.get("baseline_step_time_ms", 0) * 1e6
                window_excess = max(0.0, median(in_scope) - base)
        scored = {
            col: whole[col]
            if window is None
            else _score_fn(m, col, step_ns, {r: x["noise_ns"] for r, x in base_noise[col].items()})
            for col, _ in metrics_used
        }
        in_scope_steps = m["step"].n_unique()
        n_ranks = m["rank"].n_unique()
        for col, cause in metrics_used:
            for r, s in scored[col].items():
                clear = s.get("clearly_slowest_fraction", 0.0)
                s["sign_z"] = sign_z(round(clear * s["steps"]), s["steps"],
                                      len(peers[r]) if r in peers else n_ranks)
                if not (
                    # a metric the rank has in a few of the scope's steps says nothing of
                    # the rank throughout (a read-back in its first step only)
                    s["steps"] >= MIN_FRACTION * in_scope_steps
                    and s["slowest_fraction"] >= MIN_FRACTION
                    and (s["score"] >= MIN_SCORE
                         or (clear >= CONSISTENT and s["sign_z"] >= MIN_SCORE))
                    and s["excess_ns"] >= min_excess_ns(step_ns)
                    and s["excess_ns"] >= EXPLAIN * window_excess
                ):
                    continue
                # GPU cause first (device time over the host's read-back wait), throughout
                # beats a window
                rkey = (cause == "gpu", window is None, col == DEVICE_METRIC, s["score"])
                if r in best and best[r]["_rank_key"] >= rkey:
                    continue
                others = {c2: scored[c2].get(r) for c2, _ in metrics_used if c2 != col}
                best[r] = {"_rank_key": rkey,
                           **_finding(r, col, cause, s, window, m, step_ns, others,
                                      peers.get(r))}
    if not best:
        # When no metric flags a rank step by step: the metric by which a rank is the most
        # consistently the slowest over blocks of steps (the sign test's z), however noisy
        # its steps are one by one. The rank the others wait for waits least in its
        # collectives, however its calls look (a tensor-parallel peer that waits for it is
        # late at the next collectives with it: measured on 2 TP x 2 DP with a 10 % host
        # straggler, 4-7 ms less wait per step, the least of the four in 79-100 % of the
        # blocks, lateness scored 0.6-1.2); a rank that works longer before its step does so
        # in nearly every block (the simulator's 2 TP x 2 DP, 10 % host straggler on 2 busy
        # vCPUs: 6.1 ms more host work per step, the most in all 15 blocks, while every
        # rank's host work jumped 3 -> 10-30 ms in one step of ~8: excess / noise 1.7). Not
        # before the step-by-step metrics: a rank slowed INSIDE its collectives (CPU
        # contention on its gloo worker thread) makes the others look as if they waited least.
        # Pipeline stages: host work only, within each stage (the sign test among the
        # stage's data-parallel ranks).
        tries: list[tuple[str, dict[int, dict[str, float]]]] = []
        if pipeline:
            if groups and "host_gap_ns" in metrics.columns:
                within: dict[int, dict[str, float]] = {}
                for g in groups:
                    within |= consistently_most(metrics.filter(pl.col("rank").is_in(g)),
                                                "host_gap_ns", step_ns, score_ranks, block)
                tries.append(("host_gap_ns", within))
        else:
            tries = [(col, consistently_most(metrics, col, step_ns, _score_fn, block))
                     for col in ("host_gap_ns", "lateness_ns") if col in metrics.columns]
            if "coll_wait_ns" in metrics.columns:
                tries.append(("coll_wait_ns",
                              least_wait(metrics, "coll_wait_ns", step_ns, _score_fn, block)))
        tries = [t for t in tries if t[1]]
        if tries:  # the one metric that flags a rank most consistently, its ranks only
            col, flagged = max(tries, key=lambda t: max(x["score"] for x in t[1].values()))
            for r, s in flagged.items():
                others = {c2: whole[c2].get(r) for c2, _ in metrics_used}  # (none flagged it)
                best[r] = {"_rank_key": (False, True, False, s["score"]),
                           **_blocks_finding(r, col, s, metrics, step_ns, others,
                                             peers.get(r))}
    out = []
    for f in best.values():
        f.pop("_rank_key")
        out.append(f)
    return sorted(out, key=lambda f: -f["score"])
