"""Training steps found in the event stream, without any framework hook, and per-step metrics.

A step of data-parallel training repeats one pattern of collectives. Three modes, tried in
order:

- `collectives`: the ranks wait for their GPU (a sync or blocking read-back) between the last
  collective of a step and the first of the next; a marker (collective of the busiest comm)
  preceded by such a wait starts a cycle. The dominant cycle signature (the (op, bytes) tuple
  of the collectives between two cycle starts) is then matched against the sequence (by
  aligned `gseq`, so dropped events are wildcards); the step boundary is the END of the first
  wait after the previous collective (the end-of-step synchronize).
- `torch` (c10d only, gloo) or `sync` (no collectives, e.g. one GPU): the smallest period `p`
  of the marker tokens (>= 75% of tokens equal to the one `p` later), rotated so the cycle
  starts after the largest idle gap; the boundary is the end of the marker before a cycle.
- `none`: nothing periodic (a CPU-only process, too few events).

Only complete steps count: a step needs the boundary before it and the one after it, so the
partial first and last steps of a recording are dropped. Extra calls between cycles (a
logging call every N steps) are absorbed into the step they fall in.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from statistics import median
from typing import Any

import polars as pl

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
MAX_PERIOD = 128
PERIOD_AGREEMENT = 0.75
GAP_BREAK = 3.0  # idle gaps before markers: a cycle start's gap is >= 3x the others'


@dataclass
class StepDetection:
    """Detected steps: one row per complete (rank, step), see `STEP_COLUMNS`."""

    steps: pl.DataFrame
    method: str  # collectives | torch | sync | none
    period: int  # markers per cycle
    comm: str | None  # the communicator whose collectives delimit steps

    @property
    def detected(self) -> bool:
        return self.steps.height > 0


def _same(a: tuple, b: tuple) -> bool:
    return all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))


def _matches(tokens: dict[int, tuple], s: int, pattern: list[tuple]) -> bool:
    """Pattern at seq s: first token known and equal, no known token different, half known."""
    first = tokens.get(s)
    if first is None or not _same(first, pattern[0]) or None in first[:-1]:
        return False
    known = 0
    for i, pat in enumerate(pattern):
        tok = tokens.get(s + i)
        if tok is None:
            continue
        if not _same(tok, pat):
            return False
        known += 1
    return known * 2 >= len(pattern)


def _scan(tokens: dict[int, tuple], pattern: list[tuple], starts: list[int] | None) -> list[int]:
    """Cycle starts: left-to-right, non-overlapping occurrences of `pattern`."""
    p = len(pattern)
    seqs = sorted(tokens)
    out: list[int] = []
    nxt = -(1 << 62)
    for s in starts if starts is not None else seqs:
        if s < nxt:
            continue
        if _matches(tokens, s, pattern):
            out.append(s)
            nxt = s + p
    return out


def _period(tokens: dict[int, tuple]) -> int | None:
    """Smallest p with >= 75% of known tokens equal to the token p later (and >= 2 pairs)."""
    seqs = sorted(tokens)
    if len(seqs) < 3:
        return None
    span = seqs[-1] - seqs[0]
    for p in range(1, min(MAX_PERIOD, span // 2) + 1):
        comps = agree = 0
        for s in seqs:
            t2 = tokens.get(s + p)
            if t2 is None:
                continue
            comps += 1
            agree += _same(tokens[s], t2)
        if comps >= 2 and agree >= PERIOD_AGREEMENT * comps:
            return p
    return None


def _gaps(t: list[int], end: list[int | None]) -> list[int | None]:
    """Per marker: the idle gap before it (previous call's end -> entry), None if unknown."""
    return [None] + [
        (t[i] - end[i - 1]) if end[i - 1] is not None else None for i in range(1, len(t))
    ]


def _gap_cut(gaps: list[int]) -> float | None:
    """The natural break of the idle gaps (pooled over the ranks): the largest ratio between
    consecutive sorted gaps, >= GAP_BREAK, with >= 2 gaps and >= 3% of them on each side.
    Gaps inside a step and between steps form two clusters; one collective per step (gloo
    DDP with one bucket) gives one noisy cluster: no break (None), every marker alike."""
    known = sorted(max(g, 1) for g in gaps)
    n = len(known)
    side = max(2, int(0.03 * n + 0.999))
    best = None
    for i in range(side - 1, n - side):
        ratio = known[i + 1] / known[i]
        if ratio >= GAP_BREAK and (best is None or ratio > best[0]):
            best = (ratio, (known[i] * known[i + 1]) ** 0.5)
    return best[1] if best else None


def _rank_markers(
    tl_rank: pl.DataFrame, coll_rank: pl.DataFrame | None, flag_mode: bool
) -> tuple[list[dict[str, Any]], list[tuple[int, int | None]]]:
    """Markers (seq, token, t, end) of one rank and its completed waits (t, end)."""
    waits = (
        tl_rank.filter(pl.col("kind").is_in(["sync", "readback"]))
        .select("t_ns", "end_ns")
        .sort("t_ns")
        .rows()
    )
    markers: list[dict[str, Any]] = []
    if coll_rank is not None:  # token: (op, bytes, wait-before flag or gap bit)
        cr = coll_rank.unique("gseq", keep="first").sort("gseq")
        if cr["bytes"].null_count() == cr.height:  # c10d probes (gloo) carry no sizes
            cr = cr.with_columns(pl.col("bytes").fill_null(-1))
        rows = cr.select("gseq", "op", "bytes", "t_ns", "end_ns").rows()
        wi = 0
        prev_t = None
        prev_seq = None
        for gseq, op, nbytes, t, end in rows:
            flag = None
            if flag_mode and prev_t is not None and prev_seq == gseq - 1:
                while wi < len(waits) and waits[wi][0] <= prev_t:
                    wi += 1
                flag = wi < len(waits) and waits[wi][0] < t
            if end is None and not flag_mode:
                end = t  # entry-only probes (c10d: no uretprobes on C++) return at once
            markers.append({"seq": gseq, "tok": (op, nbytes, flag), "t": t, "end": end})
            prev_t, prev_seq = t, gseq
        if not flag_mode:  # used only when every token looks the same (see detect_steps)
            gaps = _gaps([m["t"] for m in markers], [m["end"] for m in markers])
            for m, g in zip(markers, gaps, strict=True):
                m["gap_ns"] = g
    else:
        rows = (
            tl_rank.filter(pl.col("kind").is_in(["sync", "readback"]))
            .sort("t_ns")
            .select("name", "memcpy_kind", "bytes", "t_ns", "end_ns")
            .rows()
        )
        for i, (name, kind, nbytes, t, end) in enumerate(rows):
            tok = (name, -1 if kind is None else kind, -1 if nbytes is None else nbytes, None)
            markers.append({"seq": i, "tok": tok, "t": t, "end": end})
    return markers, waits


def _choose_pattern(all_markers: list[list[dict[str, Any]]], flag_mode: bool) -> list[tuple] | None:
    """The cycle pattern shared by the ranks (see module doc)."""
    if flag_mode:
        sigs: Counter = Counter()
        for markers in all_markers:
            starts = [i for i, m in enumerate(markers) if m["tok"][-1] is True]
            for a, b in zip(starts, starts[1:], strict=False):
                seg = markers[a:b]
                if seg[-1]["seq"] - seg[0]["seq"] == len(seg) - 1:
                    sigs[tuple(m["tok"] for m in seg)] += 1
        if not sigs:
            return None
        return list(sigs.most_common(1)[0][0])
    periods = Counter()
    for markers in all_markers:
        p = _period({m["seq"]: m["tok"] for m in markers})
        if p:
            periods[p] += 1
    if not periods:
        return None
    p = periods.most_common(1)[0][0]
    windows: Counter = Counter()
    gaps: dict[tuple, list[int]] = {}
    for markers in all_markers:
        by_seq = {m["seq"]: m for m in markers}
        for m in markers:
            win = [by_seq.get(m["seq"] + i) for i in range(p)]
            if any(w is None or None in w["tok"][:-1] for w in win):
                continue
            key = tuple(w["tok"] for w in win)
            windows[key] += 1
            prev = by_seq.get(m["seq"] - 1)
            if prev is not None and prev["end"] is not None:
                gaps.setdefault(key, []).append(m["t"] - prev["end"])
    if not windows:
        return None
    top = [w for w, _ in windows.most_common(p)]
    best = max(top, key=lambda w: (median(gaps[w]) if gaps.get(w) else -1, windows[w]))
    return list(best)


P2P_OPS = ("send", "recv")


def step_comms(coll: pl.DataFrame) -> dict[int, str]:
    """Per rank, the communicator whose collectives delimit its steps: its busiest one
    without point-to-point calls (pipeline jobs: the send/recv of the world communicator
    differ by stage, the data-parallel communicator of each stage repeats one pattern),
    else its busiest one. A side communicator with a handful of calls (< 8) does not count."""
    per = (
        coll.group_by(["rank", "comm"])
        .agg(pl.len().alias("n"), pl.col("op").is_in(P2P_OPS).any().alias("p2p"))
        .with_columns((pl.col("p2p") | (pl.col("n") < 8)).alias("p2p"))
        .sort(["rank", "p2p", "n", "comm"], descending=[False, False, True, False])
    )
    return {r: c for r, c in per.unique("rank", keep="first").select("rank", "comm").rows()}


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
    comm = None
    rank_comm: dict[int, str] = {}
    if coll.height:
        rank_comm = step_comms(coll)
        comm = Counter(rank_comm.values()).most_common(1)[0][0]
        ranks = sorted(rank_comm)
        with_waits = ranked.filter(pl.col("kind").is_in(["sync", "readback"]))["rank"].unique()
        flag_mode = with_waits.len() * 2 >= len(ranks) and with_waits.len() > 0
        method = "collectives" if flag_mode else "torch"
    else:
        ranks = (
            ranked.filter(pl.col("kind").is_in(["sync", "readback"]))["rank"].unique().sort()
        ).to_list()
        flag_mode = False
        method = "sync"
    if not ranks:
        return empty
    per_rank = {}
    for r in ranks:
        tr = ranked.filter(pl.col("rank") == r)
        cr = (
            coll.filter((pl.col("rank") == r) & (pl.col("comm") == rank_comm[r]))
            if comm
            else None
        )
        per_rank[r] = (_rank_markers(tr, cr, flag_mode), tr["host"][0])
    all_markers = [v[0][0] for v in per_rank.values()]
    pattern = _choose_pattern(all_markers, flag_mode)
    if pattern and len(pattern) == 1 and not flag_mode:
        # every marker looks alike (equal buckets): tell cycle starts by their long idle gap
        pooled = [m["gap_ns"] for ms in all_markers for m in ms if m.get("gap_ns") is not None]
        cut = _gap_cut(pooled) if len(pooled) >= 4 else None
        for markers in all_markers:
            for m in markers:
                g = m.get("gap_ns")
                bit = None if g is None or len(pooled) < 4 else (cut is not None and g > cut)
                m["tok"] = m["tok"][:-1] + (bit,)
        pattern = _choose_pattern(all_markers, flag_mode)
    if not pattern:
        return StepDetection(pl.DataFrame(schema=STEP_COLUMNS), "none", 0, comm)
    p = len(pattern)
    rows = []
    for r, ((markers, waits), host) in per_rank.items():
        tokens = {m["seq"]: m["tok"] for m in markers}
        by_seq = {m["seq"]: m for m in markers}
        seqs = sorted(by_seq)
        candidates = [m["seq"] for m in markers if m["tok"][-1] is True] if flag_mode else None
        starts = _scan(tokens, pattern, candidates)

        def boundary_after(seq: int, *, _by=by_seq, _waits=waits) -> int | None:
            """The step boundary that follows marker `seq` (None when not observed)."""
            m = _by.get(seq)
            if m is None:
                return None
            if not flag_mode:
                return m["end"]
            for t, end in _waits:  # first wait entered after the marker
                if t > m["t"]:
                    return end
            return None

        def last_before(s: int, *, _seqs=seqs) -> int | None:
            i = bisect_left(_seqs, s)
            return _seqs[i - 1] if i else None

        bounds = []
        for s in starts:
            prev = last_before(s)
            if prev is None or (not flag_mode and prev != s - 1):
                bounds.append(None)
            else:
                b = boundary_after(prev)
                bounds.append(b if b is not None and b <= by_seq[s]["t"] else None)
        for i, s in enumerate(starts):
            start = bounds[i]
            if start is None:
                continue
            if i + 1 < len(starts):
                if starts[i + 1] - s >= 2 * p:
                    continue  # a hole in the data: do not glue two distant cycles
                end = bounds[i + 1]
            elif (s + p - 1) in by_seq:  # the last cycle: closed by the wait after it
                end = boundary_after(s + p - 1)
            else:
                end = None
            if end is None or end <= start:
                continue
            last = seqs[bisect_left(seqs, s + p) - 1]  # the cycle's last marker seen
            rows.append(
                {
                    "rank": r,
                    "host": host,
                    "step": s,
                    "start_ns": start,
                    "end_ns": end,
                    "step_time_ns": end - start,
                    "first_coll_ns": by_seq[s]["t"] if method != "sync" else None,
                    "last_coll_ns": by_seq[last]["t"] if method != "sync" else None,
                }
            )
    steps = pl.DataFrame(rows, schema=STEP_COLUMNS)
    if steps.height:
        if method == "sync":
            steps = steps.with_columns(
                pl.col("step").rank("ordinal").over("rank").cast(pl.Int64) - 1
            )
        else:
            steps = steps.with_columns(pl.col("step").rank("dense").cast(pl.Int64) - 1)
    return StepDetection(steps.sort(["rank", "step"]), method, p, comm)


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
    waits = ev.group_by(["rank", "step"]).agg(
        pl.col("dur_ns").filter(own).sum().alias("compute_wait_ns"),
        pl.col("dur_ns").filter(end).sum().alias("sync_wait_ns"),
        pl.col("dur_ns").filter(in_coll).sum().alias("coll_wait_ns"),
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
        (pl.col("first_call_ns") - pl.col("start_ns")).alias("host_gap_ns"),
    ).drop("_has_rb", "_has_sync", "first_call_ns")
