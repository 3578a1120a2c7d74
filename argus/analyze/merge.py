"""One job's summaries from several places: consecutive daemon segments of each node, and
several nodes, as the inputs of one diagnosis (`argus report DIR...`).

`merge_nodes(summaries)` groups the summaries by host (a node's recordings or segments),
concatenates each node's segments (`recording.segments.merge_segments`: the daemon numbers
a job's steps continuously across its segments; the segments of a restarted daemon are
numbered on, `continue_ids`), then puts every node's step ids in the
reference node's numbering (`align_step_ids`), so that `analyze.diagnosis.diagnose` matches the
k-th step of every node (it aligns the clocks on the ends of equal step ids).

Why step ids need aligning: each node's daemon (or attach) numbers steps from the first
complete step IT saw; nodes started at different moments number the same step
differently. The shift for a node is the most common difference between a reference step id
and the id of the node's step that ended nearest in wall time (per step id: the median end
over the node's ranks). This needs the nodes' wall clocks to agree within half a step time
(NTP keeps them within milliseconds; training steps take tens of milliseconds or more); the
clock offsets themselves are then estimated on the aligned step ends as for recordings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import polars as pl

from argus.recording.segments import merge_segments
from argus.recording.summaries import Summaries


def _ends(s: Summaries) -> pl.DataFrame:
    return (s.steps.group_by("step").agg(pl.col("end_ns").median().alias("t"))
            .sort("t"))


def step_shift(ref: Summaries, other: Summaries) -> int:
    """d such that `other`'s step k is `ref`'s step k + d (see the module doc); 0 when the
    two share no time span."""
    a, b = _ends(ref), _ends(other)
    if not a.height or not b.height:
        return 0
    ta = a["t"].to_numpy()
    ia = a["step"].to_numpy()
    diffs = []
    for k, t in b.select("step", "t").rows():
        j = int(np.searchsorted(ta, t))
        cands = [x for x in (j - 1, j) if 0 <= x < len(ta)]
        best = min(cands, key=lambda x: abs(ta[x] - t))
        if ta[0] <= t <= ta[-1] or abs(ta[best] - t) < (ta[-1] - ta[0]) / max(1, len(ta) - 1):
            diffs.append(int(ia[best]) - int(k))
    if not diffs:
        return 0
    return Counter(diffs).most_common(1)[0][0]


def align_step_ids(nodes: Sequence[Summaries]) -> list[Summaries]:
    """Every node's step ids in the numbering of the node with the most steps (first host
    name on a tie); the others are shifted by `step_shift`."""
    nodes = list(nodes)
    if len(nodes) < 2:
        return nodes
    ref = max(nodes, key=lambda s: (s.steps["step"].n_unique() if s.steps.height else 0,
                                    [-ord(c) for c in s.host]))
    out = []
    for s in nodes:
        d = 0 if s is ref else step_shift(ref, s)
        out.append(_renumber(s, d))
    return out


def _renumber(s: Summaries, shift: int) -> Summaries:
    if not shift:
        return s
    return Summaries(**{**s.__dict__, "steps": s.steps.with_columns(pl.col("step") + shift),
                        "kernels": s.kernels.with_columns(pl.col("step") + shift)})


def continue_ids(runs: Sequence[Summaries]) -> list[Summaries]:
    """Consecutive runs on one node (a daemon restarted mid-job numbers from 0 again): each
    run's ids continue the previous run's, plus the steps that fit in the gap between them
    (gap / median step time, rounded): same clock, no overlap, so no matching is needed."""
    out: list[Summaries] = []
    for s in sorted(runs, key=lambda r: int(r.steps["start_ns"].min() or 0)
                    if r.steps.height else 0):
        if not out or not s.steps.height or not any(o.steps.height for o in out):
            out.append(s)
            continue
        prev = pl.concat([o.steps for o in out if o.steps.height], how="vertical_relaxed")
        step_ns = float(prev["step_time_ns"].median() or 0)
        gap = int(s.steps["start_ns"].min()) - int(prev["end_ns"].max())
        missing = max(0, round(gap / step_ns)) if step_ns > 0 else 0
        out.append(_renumber(s, int(prev["step"].max()) + 1 + missing - int(s.steps["step"].min())))
    return out


def merge_nodes(summaries: Sequence[Summaries]) -> list[Summaries]:
    """One `Summaries` per host (its segments merged), step ids aligned across hosts; in the
    order the hosts first appear. A host's segments written by several daemon runs
    (manifest `daemon_run`: the daemon was restarted) are numbered on from run to run
    (`continue_ids`) before they are merged."""
    by_host: dict[str, dict[str, list[Summaries]]] = {}
    for s in summaries:
        run = str((s.manifest or {}).get("daemon_run") or "")
        by_host.setdefault(s.host, {}).setdefault(run, []).append(s)
    nodes = []
    for runs in by_host.values():
        merged = [merge_segments(v) for v in runs.values()]
        nodes.append(merge_segments(continue_ids(merged)) if len(merged) > 1 else merged[0])
    return align_step_ids(nodes)
