"""The slow stage of a pipeline-parallel job (a pipeline bubble).

In a pipeline job every stage waits for the slowest one (its sends arrive late, the other
stages' receives wait), and the host of every rank only waits at the end of the step: the
step times, read-back waits and collective arrivals look alike on all ranks. What differs
is how long each stage waits for the others, and how busy its GPU is.

Stages: ranks that make point-to-point calls (send/recv) are a pipeline; ranks sharing the
communicator that delimits their steps (the stage's data-parallel communicator,
`steps.step_comms`) and their place in the pipeline (`stage_keys`: whether their first
send/recv is a send, and to how many peers they send or receive) form a stage. The place
matters where the comm's name does not tell stages apart: each stage's data-parallel comm,
made by ncclCommSplit before attach, is `anon1` on the ranks of every stage alike. Ranks
that are each other's send/recv peers are never one stage (one rank per stage on the world
group: the middle stages share a key).

Two detectors, the first that finds a stage wins:
- host side, from `p2p_wait_ns` (time in c10d's send/recv waits, `steps.step_metrics`):
  per step, a stage's wait is the median over its ranks; the stage that waits LEAST is
  flagged as `straggler.least_wait` flags a rank, stages for ranks (blocks of 5 steps that
  every stage has in full: the least in >= 50 % of >= 4 blocks, the sign test's z >= 4,
  its median excess >= 3 % of the step and >= 0.2 ms). Cause `host` (a gloo job's
  stage computes on the host); critical at >= 25 % of the step. A host straggler in a
  pipeline of one rank per stage is its stage: found the same way.
- GPU side, from NVML: per rank, the mean `util_gpu_pct` of its samples inside its
  detected steps (>= `MIN_SAMPLES`); per stage, the median over its ranks. The busiest
  stage is slow when its busy share is >= `MIN_RATIO` x the median of the other stages'
  and >= `MIN_POINTS` points above it. Cause `gpu`; critical at >= `CRITICAL_RATIO`.
Each rank of the slow stage gets a `straggler` finding (`evidence.metric` =
`p2p_wait_ns` or `gpu_util_pct`, `pipeline_stage` = the stage's ranks), unless it already
has one for the whole recording (a window-scoped one gives way).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median
from typing import Any

import polars as pl

from argus.analyze import straggler
from argus.analyze.gpu import gpu_samples
from argus.analyze.steps import P2P_OPS, step_comms
from argus.recording.io import Recording

MIN_SAMPLES = 2
MIN_RATIO = 1.1  # a stage 25 % slower on the GPU: 1.28; healthy simulated stages: 1.04
MIN_POINTS = 3.0
CRITICAL_RATIO = 2.0
BLOCK_STEPS = straggler.BLOCK_STEPS  # the p2p detector scores sums over blocks of 5 steps


def stages(coll: pl.DataFrame) -> list[list[int]]:
    """The pipeline stages (lists of ranks), or [] when the job makes no send/recv."""
    if coll.height == 0 or not coll["op"].is_in(P2P_OPS).any():
        return []
    return stages_of(stage_keys(coll))


def stage_keys(coll: pl.DataFrame) -> dict[int, str]:
    """Per rank, what the ranks of its pipeline stage share (module doc): its step
    communicator, and for a rank making send/recv calls its first one's direction and its
    number of distinct peers (`anon1|send1`)."""
    keys = step_comms(coll)
    p2p = coll.filter(pl.col("op").is_in(P2P_OPS))
    if p2p.height == 0:
        return keys
    roles = p2p.sort("t_ns").group_by("rank", maintain_order=True).agg(
        pl.col("op").first().alias("first"), pl.col("peer").drop_nulls().unique().alias("peers"))
    peers: dict[int, set[int]] = {}
    for r, first, ps in roles.rows():
        if r in keys:
            keys[r] = f"{keys[r]}|{first}{len(ps)}"
            peers[r] = set(ps)
    # Ranks that send to / receive from each other are not one stage: in a pipeline of one
    # rank per stage on the world group, the middle stages have the same key (`pg0|recv2`)
    # and are each other's peers. Then each of those ranks is a stage of its own.
    groups: dict[str, list[int]] = {}
    for r, k in keys.items():
        groups.setdefault(k, []).append(r)
    for k, ranks in groups.items():
        if any(peers.get(r, set()) & (set(ranks) - {r}) for r in ranks):
            for r in ranks:
                keys[r] = f"{k}|r{r}"
    return keys


def stages_of(step_comm: dict[int, str]) -> list[list[int]]:
    """Ranks grouped by the communicator that delimits their steps (`steps.step_comms`), of
    a job that makes send/recv: the stages, or [] when there is one group."""
    groups: dict[str, list[int]] = {}
    for r, c in sorted(step_comm.items()):
        groups.setdefault(c, []).append(r)
    return sorted(groups.values()) if len(groups) > 1 else []


def _util(recordings: Sequence[Recording], steps: pl.DataFrame, offsets_ns) -> dict[int, float]:
    g = gpu_samples(recordings, offsets_ns)
    if g is None or steps.height == 0 or "util_gpu_pct" not in g.columns:
        return {}
    spans = steps.group_by("rank").agg(pl.col("start_ns").min(), pl.col("end_ns").max())
    inside = g.join(spans, on="rank").filter(
        pl.col("t_ns").is_between(pl.col("start_ns"), pl.col("end_ns"))
        & pl.col("util_gpu_pct").is_not_null()
    )
    per = inside.group_by("rank").agg(pl.col("util_gpu_pct").mean(), pl.len().alias("n"))
    return {int(r): float(u) for r, u, n in per.rows() if n >= MIN_SAMPLES}


def _by_p2p_wait(st: list[list[int]], metrics: pl.DataFrame,
                 step_ns: float) -> tuple[list[int], dict[str, Any]] | None:
    """The stage that waits least in its sends/receives (module doc), with its evidence, or
    None: per step, a stage's wait is the median over its ranks; scored as
    `straggler.score_ranks` scores a rank, the stages standing for ranks."""
    if "p2p_wait_ns" not in metrics.columns or step_ns <= 0:
        return None
    stage_of = {r: i for i, ranks in enumerate(st) for r in ranks}
    m = metrics.filter(pl.col("p2p_wait_ns").is_not_null()
                       & pl.col("rank").is_in(list(stage_of)))
    if m.height == 0:
        return None
    per = (m.with_columns(pl.col("rank").replace_strict(stage_of, return_dtype=pl.Int32)
                          .alias("stage"))
           .group_by("stage", "step").agg(pl.col("p2p_wait_ns").median()))
    n_stages = per["stage"].n_unique()
    if n_stages < 2:
        return None
    scored = straggler.least_wait(per.select(pl.col("stage").alias("rank"), "step",
                                             "p2p_wait_ns"), "p2p_wait_ns", step_ns)
    if not scored:
        return None
    i = max(scored, key=lambda j: (scored[j]["score"], -j))
    x = scored[i]
    waits = dict(per.group_by("stage").agg(pl.col("p2p_wait_ns").median()).rows())
    others = [w for j, w in waits.items() if j != i]
    return st[i], {
        "metric": "p2p_wait_ns",
        "p2p_wait_ms": {"stage": round(waits[i] / 1e6, 3),
                        "other_stages": round(median(others) / 1e6, 3)},
        "excess_ms": round(x["excess_ns"] / 1e6, 3),  # per step
        "noise_ms": round(x["noise_ns"] / 1e6, 3),
        "score": round(x["score"], 2),
        "spread_score": round(x["spread_score"], 2),
        "impact": x["excess_ns"] / step_ns,
        "blocks": x["blocks"],
        "block_steps": BLOCK_STEPS,
        "least_wait_in_fraction_of_blocks": round(x["slowest_fraction"], 3),
        "step_time_ms_p50": round(step_ns / 1e6, 3),
    }


def _by_gpu_util(recordings: Sequence[Recording], st: list[list[int]], metrics: pl.DataFrame,
                 offsets_ns) -> tuple[list[int], dict[str, Any]] | None:
    """The busiest stage on the GPU (module doc), with its evidence, or None."""
    util = _util(recordings, metrics, offsets_ns)
    per_stage = []
    for ranks in st:
        vals = [util[r] for r in ranks if r in util]
        if vals:
            per_stage.append((median(vals), ranks))
    if len(per_stage) < 2:
        return None
    per_stage.sort(key=lambda x: -x[0])
    slow, ranks = per_stage[0]
    base = median(u for u, _ in per_stage[1:])
    ratio = slow / base if base > 0 else float("inf")
    if ratio < MIN_RATIO or slow - base < MIN_POINTS:
        return None
    return ranks, {
        "metric": "gpu_util_pct",
        "gpu_util_pct": {"rank": {r: round(util[r], 1) for r in ranks if r in util},
                         "stage": round(slow, 1), "other_stages": round(base, 1)},
        "ratio": round(min(ratio, 99.0), 2),
    }


def detect_slow_stage(
    recordings: Sequence[Recording],
    st: list[list[int]],
    metrics: pl.DataFrame,
    offsets_ns: dict[str, int] | None,
    stragglers: list[dict[str, Any]],
    step_ns: float,
) -> list[dict[str, Any]]:
    """`stragglers` plus a finding for each rank of a slow pipeline stage (see module doc);
    `st` are the stages (`stages(coll)`), `metrics` the step metrics (`steps.step_metrics`);
    a rank's window-scoped finding gives way to its stage finding."""
    if not st:
        return stragglers
    slow = _by_p2p_wait(st, metrics, step_ns) or _by_gpu_util(recordings, st, metrics,
                                                               offsets_ns)
    if slow is None:
        return stragglers
    ranks, ev = slow
    named = {f.get("rank") for f in stragglers if f.get("start_step") is None}
    kept = [f for f in stragglers if f.get("rank") not in set(ranks) - named]
    others = sorted(r for rs in st if rs != ranks for r in rs)
    stage_txt = f"the slow pipeline stage (ranks {', '.join(map(str, ranks))})"
    if ev["metric"] == "p2p_wait_ns":
        impact = ev.pop("impact")
        severity = "critical" if impact >= straggler.CRITICAL_IMPACT else "warning"
        score, cause = ev.pop("score"), "host"
        why = (f"it waits {ev['p2p_wait_ms']['stage']:.1f} ms per step in its sends and "
               f"receives, {ev['excess_ms']:.1f} ms less than the other stages "
               f"({ev['p2p_wait_ms']['other_stages']:.1f} ms), which wait for it "
               f"({impact:.0%} of the {step_ns / 1e6:.1f} ms step)")
    else:
        ratio = ev["ratio"]
        util = ev["gpu_util_pct"]
        severity = "critical" if ratio >= CRITICAL_RATIO else "warning"
        score, cause, impact = ratio, "gpu", (util["stage"] - util["other_stages"]) / 100.0
        ratio_txt = f"{ratio:.1f}x" if ratio < 99 else "far more than"
    out = list(kept)
    for r in ranks:
        if r in named:
            continue
        if ev["metric"] == "gpu_util_pct":
            own = util["rank"].get(r, util["stage"])
            why = (f"its GPU is busy {own:.0f}% of the time, {ratio_txt} the other stage(s)' "
                   f"{util['other_stages']:.0f}%, which idle waiting for it (a pipeline bubble)")
        out.append(
            {
                "kind": "straggler",
                "severity": severity,
                "summary": f"Rank {r} is in {stage_txt}: {why}.",
                "rank": r,
                "cause": cause,
                "score": score,
                "impact": round(impact, 3),
                "start_step": None,
                "end_step": None,
                "pipeline_stage": list(ranks),
                "evidence": {**_evidence_of(ev, r), "stages": st, "other_stage_ranks": others},
            }
        )
    return out


def _evidence_of(ev: dict[str, Any], r: int) -> dict[str, Any]:
    """The finding's evidence for rank `r`: the GPU path's per-rank busy share as `rank`."""
    if ev["metric"] != "gpu_util_pct":
        return dict(ev)
    util = ev["gpu_util_pct"]
    return {**ev, "gpu_util_pct": {"rank": util["rank"].get(r, util["stage"]),
                                   "stage": util["stage"], "other_stages": util["other_stages"]}}
