"""The slow stage of a pipeline-parallel job (a pipeline bubble), from NVML GPU busy time.

In a pipeline job every stage waits for the slowest one (its sends arrive late, the other
stages' receives wait), and the host of every rank only waits at the end of the step: the
step times, read-back waits and collective arrivals look alike on all ranks. What differs is
GPU busy time: the slow stage's GPUs compute most of the step, the others idle in the bubble.

Stages: ranks that make point-to-point calls (send/recv) are a pipeline; ranks sharing the
communicator that delimits their steps (the stage's data-parallel communicator,
`steps.step_comms`) and their place in the pipeline (`stage_keys`: whether their first
send/recv is a send, and to how many peers they send or receive) form a stage. The place
matters where the comm's name does not tell stages apart: each stage's data-parallel comm,
made by ncclCommSplit before attach, is `anon1` on the ranks of every stage alike.
Metric: per rank, the mean NVML `util_gpu_pct` of its
samples inside its detected steps (>= `MIN_SAMPLES`); per stage, the median over its ranks.
Detector: the busiest stage is slow when its busy share is >= `MIN_RATIO` x the median of
the other stages' and >= `MIN_POINTS` points above it. Each of its ranks gets a `straggler`
finding (cause `gpu`, `evidence.metric` = `gpu_util_pct`, `pipeline_stage` = the stage's
ranks), unless it already has one for the whole recording (a window-scoped one gives way).
Severity: warning; critical at >= `CRITICAL_RATIO`.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median
from typing import Any

import polars as pl

from argus.analyze.gpu import gpu_samples
from argus.analyze.steps import P2P_OPS, step_comms
from argus.recording.io import Recording

MIN_SAMPLES = 2
MIN_RATIO = 1.1  # a stage 25 % slower on the GPU: 1.28; healthy simulated stages: 1.04
MIN_POINTS = 3.0
CRITICAL_RATIO = 2.0


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
        pl.col("op").first().alias("first"), pl.col("peer").drop_nulls().n_unique().alias("n"))
    for r, first, n in roles.rows():
        if r in keys:
            keys[r] = f"{keys[r]}|{first}{n}"
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


def detect_slow_stage(
    recordings: Sequence[Recording],
    st: list[list[int]],
    steps: pl.DataFrame,
    offsets_ns: dict[str, int] | None,
    stragglers: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """`stragglers` plus a finding for each rank of a slow pipeline stage (see module doc);
    `st` are the stages (`stages(coll)`); a rank's window-scoped finding gives way to its
    stage finding."""
    if not st:
        return stragglers
    util = _util(recordings, steps, offsets_ns)
    per_stage = []
    for ranks in st:
        vals = [util[r] for r in ranks if r in util]
        if vals:
            per_stage.append((median(vals), ranks))
    if len(per_stage) < 2:
        return stragglers
    per_stage.sort(key=lambda x: -x[0])
    slow, ranks = per_stage[0]
    base = median(u for u, _ in per_stage[1:])
    ratio = slow / base if base > 0 else float("inf")
    if ratio < MIN_RATIO or slow - base < MIN_POINTS:
        return stragglers
    named = {f.get("rank") for f in stragglers if f.get("start_step") is None}
    kept = [f for f in stragglers if f.get("rank") not in set(ranks) - named]
    others = sorted(r for _, rs in per_stage[1:] for r in rs)
    out = list(kept)
    for r in ranks:
        if r in named:
            continue
        ratio_txt = f"{ratio:.1f}x" if ratio != float("inf") else "far more than"
        out.append(
            {
                "kind": "straggler",
                "severity": "critical" if ratio >= CRITICAL_RATIO else "warning",
                "summary": (
                    f"Rank {r} is in the slow pipeline stage (ranks "
                    f"{', '.join(map(str, ranks))}): its GPU is busy {util.get(r, slow):.0f}% "
                    f"of the time, {ratio_txt} the other stage(s)' {base:.0f}%, which idle "
                    f"waiting for it (a pipeline bubble)."
                ),
                "rank": r,
                "cause": "gpu",
                "score": round(min(ratio, 99.0), 2),
                "impact": round((slow - base) / 100.0, 3),
                "start_step": None,
                "end_step": None,
                "pipeline_stage": list(ranks),
                "evidence": {
                    "metric": "gpu_util_pct",
                    "gpu_util_pct": {
                        "rank": round(util.get(r, slow), 1),
                        "stage": round(slow, 1),
                        "other_stages": round(base, 1),
                    },
                    "ratio": round(min(ratio, 99.0), 2),
                    "stages": st,
                    "other_stage_ranks": others,
                },
            }
        )
    return out
