"""Training steps found in the event stream, without any framework hook, and per-step metrics.

A training step repeats one pattern of calls. Per rank, the markers are its collectives on
EVERY communicator it uses, merged in time order (a tensor-parallel allreduce per layer, the
data-parallel gradient buckets, a pipeline's send/recv: one step is the period of the whole
pattern, not of one group's collective); without collectives, its GPU waits (syncs,
blocking read-backs). A marker's token is (communicator, op, bytes, a send/recv's peer, and
whether DDP's reducer made the call for a gradient bucket).

The per-rank search of the cycle and its phase (the first two points below) is
`argus.analyze.cycles`; this module turns each rank's cycle into steps with shared ids.

- The cycle: for each candidate period p (in markers), the most common window of p tokens
  and its non-overlapping occurrences (`_occurrences`); the cycle is the smallest p whose
  occurrences cover >= 95% of what the best candidate covers. Calls that are not part of
  every step (a logging allgather every 5 steps) are absorbed into the step they fall in;
  they do not make the pattern 5 steps long. A window in which one DDP gradient bucket is
  allreduced twice is several steps, never a candidate: a DDP job that allreduces its loss
  every 5 steps (one bucket: 5 calls of 6 alike) is 1 step of 1 bucket, not 5 of 6 calls;
  nor is one without a bucket (a TP x DP rank's 8 tensor-parallel allreduces of a step: the
  hung job's partial last step made them cover enough).
  On a rank that never waits for its GPU (c10d calls only), the long idle gaps (their
  natural break, `_gap_cut`) cut the steps as waits do when that makes the steps clearly
  more regular in time (the spread of their start-to-start times below 3/4 of the token
  period's): equal buckets, or a pipeline stage's micro-batches, repeat their tokens
  within a step.
- The phase: the rotation of the window with the most occurrences (calls that are not in
  every step come between steps), then the one preceded by the longest idle (median): a
  step starts after its end-of-step wait, not in the middle of its backward. With GPU
  waits, the waits cut the markers into segments and the step starts at the segment that
  follows the longest waits (`_cycle_by_waits`). A host that waits only every N steps
  has N steps between waits: they are split where a marker follows as many of the host's
  other calls as a step's start does (`_split_by_gaps`).
- Boundary: the end of the first GPU wait between the previous marker and the cycle's first
  marker (the end-of-step synchronize), else the previous marker's end (or entry).
- Step ids: when every rank's cycles start on one communicator, the aligned sequence number
  of the starting collective (the same on every rank); otherwise (pipeline stages start
  their steps on different calls) each rank's steps are matched to the reference rank's
  (the most steps) by nearest start, within half a step.

Methods: `collectives` (NCCL, or c10d with GPU waits), `torch` (c10d calls only, gloo),
`sync` (no collectives: the waits; each rank's steps numbered from 0), `none` (nothing
periodic). Only complete steps count: a step needs the boundary before it and the one
after it, so the partial first and last steps of a recording are dropped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from statistics import median
from typing import Any

import polars as pl

from argus.analyze.cycles import (
    P2P_OPS,
    Markers,
    agree_on_period,
    by_gaps,
    cycle,
    markers,
    spread,
)
from argus.analyze.matching import calls_agreement

STEP_COLUMNS = {
    "rank": pl.Int32,
    "host": pl.Utf8,
    "step": pl.Int64,
    "start_ns": pl.Int64,
    "end_ns": pl.Int64,
    "step_time_ns": pl.Int64,
    "first_coll_ns": pl.Int64,
    "last_coll_ns": pl.Int64,
}


@dataclass
class StepDetection:
    """Detected steps: one row per complete (rank, step), see `STEP_COLUMNS`."""

    steps: pl.DataFrame
    method: str  # collectives | torch | sync | none
    period: int  # markers per cycle
    comm: str | None  # the communicator whose collectives start the steps (most ranks)

    @property
    def detected(self) -> bool:
        return self.steps.height > 0


def step_comms(coll: pl.DataFrame) -> dict[int, str]:
    """Per rank, its busiest communicator without point-to-point calls (a pipeline stage's
    data-parallel communicator: ranks that share it form a stage), else its busiest one.
    A side communicator with a handful of calls (< 8) does not count."""
    per = (
        coll.group_by(["rank", "comm"])
        .agg(pl.len().alias("n"), pl.col("op").is_in(P2P_OPS).any().alias("p2p"))
        .with_columns((pl.col("p2p") | (pl.col("n") < 8)).alias("p2p"))
        .sort(["rank", "p2p", "n", "comm"], descending=[False, False, True, False])
    )
    return {r: c for r, c in per.unique("rank", keep="first").select("rank", "comm").rows()}


def _close(m: Markers, i: int) -> int | None:
    """The step boundary after marker i: the end of the first GPU wait entered after it and
    before the next marker (the end-of-step synchronize); else its end, when a marker
    follows (no wait in this step) or the rank never waits (c10d calls only). None when the
    recording ended first."""
    if i < 0 or i >= len(m.t):
        return None
    nxt = m.t[i + 1] if i + 1 < len(m.t) else None
    j = bisect_left(m.wait_t, m.t[i])
    if j < len(m.waits) and (nxt is None or m.waits[j][0] < nxt):
        end = m.waits[j][1]
        return end if end is not None and (nxt is None or end <= nxt) else None
    return m.end[i] if nxt is not None or not m.waits else None


def _rank_steps(m: Markers, p: int, starts: list[int], cut: bool) -> list[dict[str, Any]]:
    """The complete cycles of one rank: start/end times, first/last marker times, start key.
    A cycle runs from its first marker to the next cycle's (the last one: p markers)."""
    out = []
    spans = [m.t[b] - m.t[a] for a, b in zip(starts, starts[1:], strict=False)]
    typical = median(spans) if spans else 0
    ends = starts[1:] + [starts[-1] + p] if starts else []
    # a hole in the data (a missed start, drops, the job's set-up calls): do not glue steps
    hole = [b > len(m.t) or (b - a >= 2 * p and k + 1 < len(starts)
                             and m.t[b] - m.t[a] > 1.5 * typical)
            for k, (a, b) in enumerate(zip(starts, ends, strict=True))]
    used = False  # the cycle before was a step
    for k, a in enumerate(starts):
        b = ends[k]
        # its start is a step boundary: a cut (a GPU wait, a long idle), the end of the
        # step before it, or the end of the pattern's last marker (a step seen in part at
        # the start of the recording; not a call of the job's set-up, DDP's broadcasts)
        before = cut or used or (a >= 1 and a + p <= len(m.t)
                                 and m.tok[a - 1] == m.tok[a + p - 1])
        used = False
        if hole[k] or not before:
            continue
        start, end = _close(m, a - 1), _close(m, b - 1)
        if start is None or end is None or end <= start:
            continue
        used = True
        # first/last collective: of the group kind where the step has one (a pipeline
        # stage's data-parallel allreduce, not its sends): what step_metrics splits at
        coll = [i for i in range(a, b) if not m.p2p[i]] or list(range(a, b))
        out.append({"start_ns": start, "end_ns": end, "first_coll_ns": m.t[coll[0]],
                    "last_coll_ns": m.t[coll[-1]], "key": (m.comm[a], m.gseq[a], m.p2p[a])})
    return out


def global_step_ids(per_rank: dict[int, list[dict[str, Any]]]) -> dict[int, list[int]]:
    """Step ids shared by the ranks (module doc): by the starting collective when every
    rank's steps start on one communicator (and the ranks' ids agree), else by nearest
    start to the reference's."""
    keys = [s["key"] for steps in per_rank.values() for s in steps]
    # a send/recv's sequence number counts one rank's own calls: no cross-rank identity
    if len({k[0] for k in keys}) == 1 and all(k[0] is not None and k[1] is not None
                                              and not k[2] for k in keys):
        keys = sorted({s["key"][1] for steps in per_rank.values() for s in steps})
        most = max(len(steps) for steps in per_rank.values())
        # ranks agree on the numbering unless there are far more ids than any rank has
        # steps: one local comm name over several groups (each TP group's `pg0`) aligned
        # a group a step off; then by time, as below
        if len(keys) <= 1.1 * most + 2:
            dense = {k: i for i, k in enumerate(keys)}
            return {r: [dense[s["key"][1]] for s in steps] for r, steps in per_rank.items()}
    ref = max(per_rank, key=lambda r: (len(per_rank[r]), -r))
    ref_starts = [s["start_ns"] for s in per_rank[ref]]
    times = [s["end_ns"] - s["start_ns"] for steps in per_rank.values() for s in steps]
    half = median(times) / 2 if times else 0
    out: dict[int, list[int]] = {}
    for r, steps in per_rank.items():
        ids = []
        for s in steps:
            j = bisect_left(ref_starts, s["start_ns"])
            near = [k for k in (j - 1, j) if 0 <= k < len(ref_starts)]
            k = min(near, key=lambda k: abs(ref_starts[k] - s["start_ns"]), default=None)
            ids.append(k if k is not None and abs(ref_starts[k] - s["start_ns"]) <= half
                       else None)
        out[r] = ids
    return out


def _method(ranked: pl.DataFrame, coll: pl.DataFrame) -> tuple[str, list[int]]:
    """How the steps are found (`collectives`, `torch` or `sync`, module doc) and the ranks
    whose markers are read: those with collectives, else those that wait for their GPU."""
    waited = ranked.filter(pl.col("kind").is_in(["sync", "readback"]))["rank"].unique()
    if not coll.height:
        return "sync", waited.sort().to_list()
    ranks = sorted(coll["rank"].unique().to_list())
    method = ("collectives" if (coll["channel"] == "nccl").any()
              or (waited.len() * 2 >= len(ranks) and waited.len() > 0) else "torch")
    return method, ranks


def _gap_cycles(all_m: dict[int, Markers], cycles: dict[int, tuple | None]) -> None:
    """Ranks that never wait for their GPU (c10d calls only): their long idle gaps cut the
    steps as waits do (equal buckets, a pipeline stage's micro-batches: the tokens repeat
    within a step), where that makes the steps clearly more regular in time; in place."""
    agreed = agree_on_period(all_m, cycles)
    for r, m in all_m.items():
        if sum(m.waited) >= 2:
            continue
        gaps = by_gaps(m)
        # kept when it makes the steps clearly more regular in time than the tokens'
        # cycle as the other ranks' steps make it (a break found in a continuum of gaps,
        # or in a few calls back to back at the start, does not; nor do the gaps of a
        # last 1F1B stage whose recv, send pairs are merged 4 at a time: a straggler's
        # host work there cut 146 steps of 119)
        if gaps is not None and (agreed[r] is None or spread(m, gaps[1])
                                 < 0.75 * spread(m, agreed[r][1])):
            cycles[r] = gaps


def _step_frame(per_rank: dict[int, list[dict[str, Any]]], hosts: dict[int, str | None],
                method: str) -> pl.DataFrame:
    """The complete steps of every rank (STEP_COLUMNS) with their shared ids (dense from 0;
    `sync`: each rank's own count); a step no id matched is dropped."""
    if method == "sync":
        ids = {r: list(range(len(s))) for r, s in per_rank.items()}
    else:
        ids = global_step_ids(per_rank)
    rows = []
    for r, steps in per_rank.items():
        for i, s in zip(ids[r], steps, strict=True):
            if i is None:
                continue
            rows.append({"rank": r, "host": hosts[r], "step": i, "start_ns": s["start_ns"],
                         "end_ns": s["end_ns"], "step_time_ns": s["end_ns"] - s["start_ns"],
                         "first_coll_ns": s["first_coll_ns"] if method != "sync" else None,
                         "last_coll_ns": s["last_coll_ns"] if method != "sync" else None})
    steps = pl.DataFrame(rows, schema=STEP_COLUMNS).unique(["rank", "step"], keep="first")
    if steps.height and method != "sync":
        steps = steps.with_columns(pl.col("step").rank("dense").cast(pl.Int64) - 1)
    return steps.sort(["rank", "step"])


def detect_steps(tl: pl.DataFrame, coll: pl.DataFrame) -> StepDetection:
    """Detect the complete steps of every rank (see the module doc for the algorithm).

    `tl` is `timeline.build_timeline(...)`, `coll` is `matching.align_seq(collectives(tl))`.
    Step ids are global (the same id on every rank for the same step) in `collectives` and
    `torch` modes; in `sync` mode they count each rank's steps from 0.
    """
    empty = StepDetection(pl.DataFrame(schema=STEP_COLUMNS), "none", 0, None)
    ranked = tl.filter(pl.col("rank").is_not_null())
    if ranked.height == 0:
        return empty
    method, ranks = _method(ranked, coll)
    if not ranks:
        return empty
    vocab: dict[tuple, int] = {}
    all_m: dict[int, Markers] = {}
    hosts: dict[int, str | None] = {}
    for r in ranks:
        tr = ranked.filter(pl.col("rank") == r)
        cr = coll.filter(pl.col("rank") == r) if method != "sync" else None
        all_m[r] = markers(tr, cr, vocab)
        hosts[r] = tr["host"][0] if tr.height else None
    cycles = {r: cycle(m) for r, m in all_m.items()}
    if any(sum(m.waited) < 2 for m in all_m.values()):
        _gap_cycles(all_m, cycles)
    cycles = agree_on_period(all_m, cycles)
    per_rank: dict[int, list[dict[str, Any]]] = {}
    periods: Counter = Counter()
    for r, c in cycles.items():
        if c is None:
            continue
        # without collectives the markers are the waits themselves: every one is a cut
        steps = _rank_steps(all_m[r], c[0], c[1], c[3] or method == "sync")
        if steps:
            per_rank[r] = steps
            periods[c[0]] += 1
    if not per_rank:
        return empty
    comm = Counter(s["key"][0] for ss in per_rank.values() for s in ss[:1]).most_common(1)[0][0]
    return StepDetection(_step_frame(per_rank, hosts, method), method,
                         periods.most_common(1)[0][0], comm)


def _step_corrections(coll: pl.DataFrame, steps: pl.DataFrame) -> dict[int, int]:
    """rank -> the correction of its `gseq` on its step communicator that makes its steps
    start at the same collective as the reference rank's steps of the same time.

    `align_seq` chooses among shifts whose pairs agree on (op, bytes, calls before) by the
    median entry time difference: with identical buckets (DDP's equal-sized buckets, the
    simulator's) and hosts that make no other calls, a shift by one bucket pairs most
    collectives with the rank's neighbouring bucket of the same step, so the median barely
    moves and the wrong shift can win (seen on daemon windows of a few steps under CPU load:
    ranks off by one bucket, step ids interleaved, a waiting rank counted as missing); a
    shift by whole steps keeps even the calls alike (a straggler late by over a step on a
    host that runs ahead, under load). Steps do not have that ambiguity: every rank's step
    ends at the same end-of-step wait (the GPU finishes a step only when every rank's
    collectives arrived), so the same step starts at nearly the same time on every rank.
    Per rank, its steps are paired with the reference's (the rank with the most steps) by
    nearest start (within half the median step time); when at least 3 pairs are found and
    >= 75% of them differ by the same non-zero number of collectives at the step's first
    collective, that is the rank's correction, unless it pairs fewer of the rank's
    collectives with the reference's after as many other calls
    (`matching.calls_agreement`)."""
    if steps.height == 0 or coll.height == 0:
        return {}
    rank_comm = step_comms(coll)
    rc = pl.DataFrame({"rank": list(rank_comm), "comm": list(rank_comm.values())},
                      schema={"rank": coll.schema["rank"], "comm": pl.Utf8})
    first = (coll.join(rc, on=["rank", "comm"]).select("rank", "comm", "t_ns", "gseq")
             .unique(["rank", "t_ns"], keep="first"))
    f = steps.select("rank", "start_ns", pl.col("first_coll_ns").alias("t_ns")).with_columns(
        pl.col("rank").cast(coll.schema["rank"])).join(first, on=["rank", "t_ns"])
    if f.height == 0:
        return {}
    counts = f.group_by("rank").len().sort(["len", "rank"], descending=[True, False])
    ref = counts["rank"][0]
    half = int((steps["step_time_ns"].median() or 0) // 2)
    fr = f.filter(pl.col("rank") == ref)
    if half <= 0:
        return {}
    ref_comm = fr["comm"][0]
    fr = fr.select("start_ns", pl.col("gseq").alias("_g")).sort("start_ns")
    others = f.filter((pl.col("rank") != ref) & (pl.col("comm") == ref_comm)).sort("start_ns")
    pairs = others.join_asof(fr, on="start_ns", strategy="nearest",
                             tolerance=half).drop_nulls("_g")
    votes = (pairs.group_by("rank", (pl.col("_g") - pl.col("gseq")).alias("d")).len()
             .sort(["rank", "len", "d"], descending=[False, True, False])
             .with_columns(pl.col("len").sum().over("rank").alias("n"))
             .unique("rank", keep="first", maintain_order=True))
    ok = votes.filter((pl.col("n") >= 3) & (pl.col("d") != 0)
                      & (pl.col("len") >= 0.75 * pl.col("n")))
    def numbered(r: int) -> pl.DataFrame:
        return (coll.filter((pl.col("rank") == r) & (pl.col("comm") == ref_comm))
                .select(pl.col("gseq").alias("seq"), "calls_before"))

    out = {}
    ref_c = numbered(ref)
    for r, d in ok.select("rank", "d").rows():
        # not where program order pairs the collectives as they are (align_seq's own
        # check): a straggler late by over a step starts its steps nearest the others' next
        mine = numbered(r)
        now, moved = calls_agreement(ref_c, mine, 0), calls_agreement(ref_c, mine, d)
        if now is not None and moved is not None and moved < now:
            continue
        out[int(r)] = int(d)
    return out


def realign_by_steps(tl: pl.DataFrame, coll: pl.DataFrame,
                     det: StepDetection) -> tuple[pl.DataFrame, StepDetection]:
    """`coll` with each rank's `gseq` on its step communicator corrected so that its steps
    start at the same collective as the reference rank's steps of the same time
    (`_step_corrections`), and the steps detected again; as given when nothing moves
    (steps found from collectives with GPU waits only)."""
    fix = _step_corrections(coll, det.steps) if det.method == "collectives" else {}
    if not fix:
        return coll, det
    comm_of = step_comms(coll)
    move = pl.col("rank").replace_strict(fix, default=0, return_dtype=pl.Int64)
    on_comm = pl.col("comm") == pl.col("rank").replace_strict(
        comm_of, default=None, return_dtype=pl.Utf8)
    coll = coll.with_columns(pl.when(on_comm).then(pl.col("gseq") + move)
                             .otherwise(pl.col("gseq")).alias("gseq"))
    coll = coll.sort(["rank", "comm", "gseq"])
    return coll, detect_steps(tl, coll)


def step_metrics(tl: pl.DataFrame, coll: pl.DataFrame, steps: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step): where the step's time went, host side.

    - `compute_wait_ns`: GPU waits (synchronize or blocking read-back) entered before the
      step's first collective: the host waits for its OWN GPU work (e.g. `loss.item()`
      after forward); long on a GPU-slow rank. Without collectives: the read-backs.
    - `sync_wait_ns`: GPU waits entered after the first collective (the end-of-step
      read-back or synchronize waits for the collectives, i.e. for the slowest rank;
      short on the GPU-slow rank itself). Without collectives: the synchronizes.
    - `coll_wait_ns`: time inside collective calls, plus c10d work objects executing on a
      worker thread (`ProcessGroupGloo::AsyncWork::execute`: gloo waits there for the
      late ranks),
    - `p2p_wait_ns`: time inside the waits of point-to-point work (c10d's
      `ProcessGroupGloo::RecvWork::wait` / `SendWork::wait`, also under dist.send/recv):
      in a pipeline, how long the stage waits for the others (short on the slow stage);
      null on a rank that makes no such wait,
    - `lateness_ns`: max over the step's collectives of entry time minus the median entry
      time of the same collective on all ranks (host-side arrival lateness),
    - `host_gap_ns`: from the step start to the first traced call (CPU work: data loading).
    """
    if steps.height == 0:
        return steps.with_columns(
            [
                pl.lit(None, pl.Int64).alias(c)
                for c in (
                    "compute_wait_ns",
                    "sync_wait_ns",
                    "coll_wait_ns",
                    "p2p_wait_ns",
                    "lateness_ns",
                    "host_gap_ns",
                )
            ]
        )
    keys = steps.select("rank", "step", "start_ns", "end_ns", "first_coll_ns").sort("start_ns")

    def assign(df: pl.DataFrame) -> pl.DataFrame:
        df = df.filter(pl.col("rank").is_not_null()).sort("t_ns")
        j = df.join_asof(
            keys,
            left_on="t_ns",
            right_on="start_ns",
            by="rank",
            strategy="backward",
            check_sortedness=False,
        )
        return j.filter(pl.col("step").is_not_null() & (pl.col("t_ns") < pl.col("end_ns")))

    ev = assign(tl.select("rank", "t_ns", "dur_ns", "kind", "name"))
    # A wait entered before the step's first collective can only wait for the rank's own
    # GPU work (nothing collective is pending yet); one entered after it waits for the
    # collectives too, i.e. for the slowest rank. Without collectives (sync mode): by name.
    is_wait = pl.col("kind").is_in(["readback", "sync"])
    own = (
        pl.when(pl.col("first_coll_ns").is_not_null())
        .then(is_wait & (pl.col("t_ns") < pl.col("first_coll_ns")))
        .otherwise(pl.col("kind") == "readback")
    )
    end = is_wait & ~own
    # c10d (gloo) calls return at once; the collective runs (and waits for the late ranks)
    # in a work object on a worker thread: ProcessGroupGloo::AsyncWork::execute.
    in_coll = (pl.col("kind") == "collective") | pl.col("name").str.ends_with("Work::execute")
    in_p2p = pl.col("name").str.ends_with("RecvWork::wait") | pl.col("name").str.ends_with(
        "SendWork::wait")
    waits = ev.group_by(["rank", "step"]).agg(
        pl.col("dur_ns").filter(own).sum().alias("compute_wait_ns"),
        pl.col("dur_ns").filter(end).sum().alias("sync_wait_ns"),
        pl.col("dur_ns").filter(in_coll).sum().alias("coll_wait_ns"),
        pl.col("dur_ns").filter(in_p2p).sum().alias("p2p_wait_ns"),
        in_p2p.any().alias("_has_p2p"),
        pl.col("t_ns").min().alias("first_call_ns"),
        own.any().alias("_has_rb"),
        end.any().alias("_has_sync"),
    )
    if coll.height and "lateness_ns" in coll.columns:
        late = (
            assign(coll.select("rank", "t_ns", "lateness_ns"))
            .group_by(["rank", "step"])
            .agg(pl.col("lateness_ns").max().cast(pl.Int64))
        )
    else:
        late = pl.DataFrame(schema={"rank": pl.Int32, "step": pl.Int64, "lateness_ns": pl.Int64})
    out = steps.join(waits, on=["rank", "step"], how="left").join(
        late, on=["rank", "step"], how="left"
    )
    return out.with_columns(
        pl.when(pl.col("_has_rb")).then(pl.col("compute_wait_ns")).alias("compute_wait_ns"),
        pl.when(pl.col("_has_sync")).then(pl.col("sync_wait_ns")).alias("sync_wait_ns"),
        pl.when(pl.col("_has_p2p")).then(pl.col("p2p_wait_ns")).alias("p2p_wait_ns"),
        (pl.col("first_call_ns") - pl.col("start_ns")).alias("host_gap_ns"),
    ).drop("_has_rb", "_has_sync", "_has_p2p", "first_call_ns")
