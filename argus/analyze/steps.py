"""Training steps found in the event stream, without any framework hook, and per-step metrics.

A training step repeats one pattern of calls. Per rank, the markers are its collectives on
EVERY communicator it uses, merged in time order (a tensor-parallel allreduce per layer, the
data-parallel gradient buckets, a pipeline's send/recv: one step is the period of the whole
pattern, not of one group's collective); without collectives, its GPU waits (syncs,
blocking read-backs). A marker's token is (communicator, op, bytes, a send/recv's peer, and
whether DDP's reducer made the call for a gradient bucket).

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

import numpy as np
import polars as pl

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
MAX_PERIOD = 512  # markers per step at most (a 64-layer TP model: ~260 allreduces)
MAX_MARKERS = 4096  # markers per rank the period search reads (the first ones)
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: invertible mod 2^64
_HASH_INV = np.uint64(pow(0x9E3779B97F4A7C15, -1, 2**64))
MIN_AGREEMENT = 0.5  # a candidate period: >= 50% of markers equal to the one p later
COVER_SHARE = 0.95  # the cycle: the smallest period covering >= 95% of the best's coverage
GAP_BREAK = 3.0  # idle gaps before markers: a cycle start's gap is >= 3x the others'
STEP_WORK = 0.5  # a cut inside a wait-to-wait segment: >= this share of a step start's calls
MIN_STEP_WORK = 4  # calls before a step's start (median) for them to tell steps apart
P2P_OPS = ("send", "recv")


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


def _gap_cut(gaps: list[int]) -> float | None:
    """The natural break of the idle gaps (pooled over the ranks): the two-class split of
    their logarithms with the largest between-class variance (Otsu), kept when the classes
    (>= 3 gaps and >= 5% of them each) differ >= GAP_BREAK-fold (geometric means) and by
    >= 2 within-class standard deviations. Gaps inside a step and between steps form two
    clusters; one collective per step (gloo DDP with one bucket) gives one noisy cluster:
    no break (None), every marker alike."""
    x = np.sort(np.log(np.maximum(np.asarray(gaps, dtype=np.float64), 1.0)))
    n = x.size
    side = max(3, int(0.05 * n + 0.999))
    if n < 2 * side:
        return None
    c, c2 = np.cumsum(x), np.cumsum(x * x)
    i = np.arange(side, n - side + 1)
    m0, m1 = c[i - 1] / i, (c[-1] - c[i - 1]) / (n - i)
    between = (i / n) * (1 - i / n) * (m1 - m0) ** 2
    k = int(np.argmax(between))
    j = int(i[k])
    var0 = c2[j - 1] / j - m0[k] ** 2
    var1 = (c2[-1] - c2[j - 1]) / (n - j) - m1[k] ** 2
    within = float(np.sqrt(max(0.0, (j * var0 + (n - j) * var1) / n)))
    gap = float(m1[k] - m0[k])
    if gap < np.log(GAP_BREAK) or gap < 2 * within:
        return None
    return float(np.exp((x[j - 1] + x[j]) / 2))


@dataclass
class _Markers:
    """One rank's markers in time order: tokens (ints), entry/end times, the idle before each
    (from the previous marker's end, or its entry for entry-only calls; a GPU wait in between
    makes it at least that wait), and the collective each is (comm, aligned seq)."""

    tok: np.ndarray  # int64 token ids
    t: list[int]
    end: list[int]  # end, or entry for calls without a return
    idle: list[int | None]
    comm: list[str | None]
    gseq: list[int | None]
    p2p: list[bool]  # a send/recv (its seq is the rank's own count)
    waited: list[bool]  # a GPU wait between the previous marker and this one
    waits: list[tuple[int, int | None]]  # the rank's GPU waits (entry, end), by entry
    work: list[int]  # the rank's other traced calls between the previous marker and this one
    bucket: np.ndarray  # bool: DDP's call for a known gradient bucket (once per step each)

    @property
    def wait_t(self) -> list[int]:
        return [w[0] for w in self.waits]


def _markers(tl_rank: pl.DataFrame, coll_rank: pl.DataFrame | None,
             vocab: dict[tuple, int]) -> _Markers:
    waits = (tl_rank.filter(pl.col("kind").is_in(["sync", "readback"]))
             .select("t_ns", "end_ns").sort("t_ns").rows())
    if coll_rank is not None:
        # one marker per call: c10d numbers its sends and its receives apart (send 0 and
        # recv 0 are two calls)
        cr = coll_rank.unique(["comm", "gseq", "op", "peer"], keep="first").sort("t_ns")
        # a send/recv's peer is part of its token: a pipeline stage's forward (recv from
        # the stage before, send to the one after) and backward (the other way) differ
        # and so is DDP's origin of a gradient bucket's call (gloo's calls have no bytes)
        if "origin" not in cr.columns:
            cr = cr.with_columns(pl.lit(None, pl.Utf8).alias("origin"))
        rows = [((c, op, -1 if b is None else b,
                  -1 if q is None or op not in P2P_OPS else q, o or ""), t, e, c, g,
                 op in P2P_OPS)
                for c, op, b, q, o, t, e, g in cr.select(
                    "comm", "op", "bytes", "peer", "origin", "t_ns", "end_ns", "gseq").rows()]
    else:  # the waits are the markers: a step ends with its last one
        waits = []
        rows = [((name, -1 if k is None else k, -1 if b is None else b), t, e, None, None,
                 False)
                for name, k, b, t, e in tl_rank.filter(pl.col("kind").is_in(["sync", "readback"]))
                .sort("t_ns").select("name", "memcpy_kind", "bytes", "t_ns", "end_ns").rows()]
    tok = np.fromiter((vocab.setdefault(r[0], len(vocab)) for r in rows), dtype=np.int64,
                      count=len(rows))
    t = [r[1] for r in rows]
    end = [r[2] if r[2] is not None else r[1] for r in rows]
    wt = [w[0] for w in waits]
    idle: list[int | None] = [None]
    waited = [False]
    for i in range(1, len(rows)):
        gap = t[i] - end[i - 1]
        j = bisect_left(wt, t[i - 1])  # the waits entered after the previous marker
        w = j < len(waits) and waits[j][0] < t[i]
        if w and waits[j][1] is not None:
            gap = max(gap, waits[j][1] - waits[j][0])
        idle.append(gap)
        waited.append(bool(w))
    # the host's other calls between markers (launches, copies, event records, waits):
    # program order, not timing
    calls = np.sort(tl_rank["t_ns"].to_numpy())
    at = np.searchsorted(calls, np.asarray(t, dtype=np.int64), side="left")
    after = np.searchsorted(calls, np.asarray(end, dtype=np.int64), side="right")
    work = [0] + [max(0, int(at[i] - after[i - 1])) for i in range(1, len(rows))]
    bucket = np.fromiter((len(r[0]) > 4 and r[0][4][3:].isdigit() for r in rows), dtype=bool,
                         count=len(rows))
    return _Markers(tok, t, end, idle, [r[3] for r in rows], [r[4] for r in rows],
                    [r[5] for r in rows], waited, waits, work, bucket)


def _median_idle(idle: list[int | None], at: list[int]) -> float:
    """The median idle before the markers at positions `at` (-1 when none is known)."""
    vals = [idle[i] for i in at if idle[i] is not None]
    return median(vals) if vals else -1.0


class _WindowIds:
    """Ids of the windows of p tokens of one token array, for any p: called with p, an id per
    window starting at each position (equal windows, equal ids; ids numbered by first
    occurrence, so the windows of a prefix (`limit`) keep their ids in the whole array). A
    polynomial rolling hash of the window (mod 2^64, random token values), its prefix sums
    made once per array: O(n log n) per period, where comparing the windows themselves cost
    O(n p log n) (22 s for the 177 candidate periods of a 4-rank 1F1B pipeline); making the
    prefix sums again for each period took 1.33 ms per period at 4096 tokens, 0.76 without."""

    def __init__(self, tok: np.ndarray):
        uniq, codes = np.unique(tok, return_inverse=True)
        vals = np.random.default_rng(len(uniq)).integers(1, 2**63, size=uniq.size,
                                                         dtype=np.uint64) | np.uint64(1)
        with np.errstate(over="ignore"):
            powers = np.cumprod(np.full(tok.size, _HASH_BASE, dtype=np.uint64))
            powers = np.concatenate(([np.uint64(1)], powers[:-1]))
            inverse = np.cumprod(np.full(tok.size, _HASH_INV, dtype=np.uint64))
            self._inverse = np.concatenate(([np.uint64(1)], inverse[:-1]))
            self._prefix = np.concatenate(([np.uint64(0)], np.cumsum(
                vals[codes.reshape(-1)] * powers, dtype=np.uint64)))
        self.size = tok.size

    def __call__(self, p: int, limit: int | None = None) -> np.ndarray:
        n = (self.size if limit is None else min(limit, self.size)) - p + 1
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        with np.errstate(over="ignore"):
            h = (self._prefix[p:p + n] - self._prefix[:n]) * self._inverse[:n]
        _u, first, inv = np.unique(h, return_index=True, return_inverse=True)
        order = np.empty(first.size, dtype=np.int64)
        order[np.argsort(first)] = np.arange(first.size)
        return order[inv.reshape(-1)]


def _occurrences(win: np.ndarray, w: int, p: int) -> list[int]:
    """Positions of window id w, left to right, not overlapping."""
    out: list[int] = []
    nxt = -1
    for i in np.flatnonzero(win == w).tolist():
        if i >= nxt:
            out.append(i)
            nxt = i + p
    return out


def _cycle(m: _Markers) -> tuple[int, list[int], bool, bool] | None:
    """(markers per step, positions where the steps start, whether a step's markers are one
    token repeated, whether the starts follow a cut: a GPU wait or a long idle) of one
    rank's markers: by its GPU waits when it has them, else by the tokens' period (module
    doc)."""
    if sum(m.waited) >= 2:
        return _cycle_by_waits(m, m.waited)
    return _cycle_by_tokens(m)


def _cycle_by_waits(m: _Markers,
                    cut_before: list[bool]) -> tuple[int, list[int], bool, bool] | None:
    """Steps of a rank that waits for its GPU (`cut_before`: a wait precedes the marker), or
    whose markers are alike and cut by long idle gaps. These cut the markers into segments;
    segment signatures (their tokens) repeat with a period of k segments (1 when one
    signature makes >= 70% of them: the others are steps with extra calls; else the
    smallest k with >= 75% of segments equal to the one k later: a forward and a backward
    separated by a loss read-back are 2); the step starts at the segment signature that follows the
    longest waits (median). Those are the steps, unless the waits come every N steps: a
    step whose long idle gaps (their natural break, `_gap_cut`, over the rank's steps) cut
    it into equal parts is that many steps (`_split_by_gaps`: parts of one token repeated,
    equal buckets, only where the host made a step start's calls before each cut). A host
    that reads the loss back every 5th step waits twice in that step (after its forward,
    at its end): its segments alternate 1 and 4 steps (k = 2) and each pair is split in 5."""
    n = len(m.t)
    cuts = [i for i in range(n) if cut_before[i]]
    bounds = list(zip(cuts, cuts[1:] + [n], strict=True))
    sig_id: dict[tuple, int] = {}
    sigs = [sig_id.setdefault(tuple(m.tok[a:b].tolist()), len(sig_id)) for a, b in bounds]
    full = sigs[:-1]  # the last segment may be cut short by the end of the recording
    k = 1
    top_share = Counter(full).most_common(1)[0][1] / len(full) if full else 1.0
    for q in range(1, min(8, len(full) // 2) + 1) if top_share < 0.7 else ():
        pairs = len(full) - q
        if pairs >= 2 and sum(full[j] == full[j + q] for j in range(pairs)) >= 0.75 * pairs:
            k = q
            break
    if k == 1:
        starts = cuts
    else:
        counts = Counter(full)
        regular = [sg for sg, c in counts.items() if c >= 0.5 * len(full) / k]

        def wait_before(sg: int) -> float:
            return _median_idle(m.idle, [a for (a, _b), x in zip(bounds, sigs, strict=True)
                                         if x == sg])

        head = max(regular, key=lambda sg: (wait_before(sg), counts[sg], -sg))
        starts = [a for (a, _b), x in zip(bounds, sigs, strict=True) if x == head]
    if len(starts) < 2:
        return None
    starts = _split_by_gaps(m, starts)
    dist = Counter(b - a for a, b in zip(starts, starts[1:], strict=False))
    p = dist.most_common(1)[0][0]
    first = starts[0]
    uniform = bool(np.all(m.tok[first:first + p] == m.tok[first]))
    return p, starts, uniform, True


def _split_by_gaps(m: _Markers, starts: list[int]) -> list[int]:
    """Steps (between `starts`) that hold several steps (the host waits every N steps only):
    each is split where the markers are preceded by as much other host work as a step's
    start (>= STEP_WORK of the median calls before the starts: the optimizer, the data and
    the next forward's launches, not one bucket's backward; exact in program order, where
    idle time is not: a preempted host stretches any gap), or, on a host that makes no
    calls between its markers (c10d only), where the long idle gaps (their natural break)
    are, and only into >= 2 parts of one signature. Idle gaps alone do not split parts of
    one token repeated (equal buckets): they may be one step's buckets."""
    if len(starts) < 2:
        return starts
    head_work = median(m.work[a] for a in starts[1:])
    by_work = head_work >= MIN_STEP_WORK
    if by_work:
        def cut_at(i: int) -> bool:
            return m.work[i] >= STEP_WORK * head_work
    else:
        inner = [m.idle[i] for a, b in zip(starts, starts[1:], strict=False)
                 for i in range(a + 1, b) if m.idle[i] is not None]
        cut = _gap_cut(inner) if len(inner) >= 4 else None
        if cut is None:
            return starts

        def cut_at(i: int) -> bool:
            return m.idle[i] is not None and m.idle[i] > cut
    out: list[int] = []
    split: Counter = Counter()
    for a, b in zip(starts, starts[1:] + [len(m.t)], strict=True):
        cuts = [a] + [i for i in range(a + 1, b) if cut_at(i)]
        parts = [tuple(m.tok[x:y].tolist()) for x, y in zip(cuts, cuts[1:] + [b], strict=True)]
        whole = b < len(m.t) or len(parts) == 1
        alike = len(parts) >= 2 and whole and len(set(parts)) == 1
        if alike and (by_work or len(set(parts[0])) >= 2):
            out += cuts
            split[parts[0]] += 1
        else:
            out.append(a)
    if by_work and split:
        # the steps before the first wait (the host ran ahead from the start): the same
        # parts, cut the same way, back from the first start
        part = split.most_common(1)[0][0]
        lead = [i for i in range(1, starts[0]) if cut_at(i)] + [starts[0]]
        keep = []
        for x, y in zip(lead[-2::-1], lead[:0:-1], strict=True):
            if tuple(m.tok[x:y].tolist()) != part:
                break
            keep.append(x)
        out = keep[::-1] + out
    return out


def _cycle_by_tokens(m: _Markers) -> tuple[int, list[int], bool, bool] | None:
    """Steps of a rank that never waits for its GPU (c10d calls only): the period of its
    tokens (module doc)."""
    tok = m.tok[:MAX_MARKERS]
    n = tok.size
    if n < 3:
        return None
    cands = []
    for p in range(1, min(MAX_PERIOD, n // 2) + 1):
        if np.mean(tok[:-p] == tok[p:]) >= MIN_AGREEMENT:
            cands.append(p)
    best: dict[int, tuple[float, int, np.ndarray]] = {}
    ids_of = _WindowIds(m.tok)
    has_buckets = bool(m.bucket[:n].sum() >= 2)
    for p in cands:
        win = ids_of(p, n)
        ids, counts = np.unique(win, return_counts=True)
        w = int(ids[np.argmax(counts)])
        occ = _occurrences(win, w, p)
        head = slice(occ[0], occ[0] + p)
        buckets = tok[head][m.bucket[:n][head]]
        if np.unique(buckets).size < buckets.size:
            continue  # DDP allreduces each gradient bucket once per step: several steps
        if has_buckets and not buckets.size:
            continue  # ... and every step has them: part of a step
        # the markers it covers: occurrences back to back (p apart) with another; a window
        # that recurs q > p markers apart is not a cycle of p (a 15-marker window of an
        # 8-marker step recurs every 16: it covered more than the 8-marker cycle itself)
        chained = sum(1 for i, x in enumerate(occ)
                      if (i and x - occ[i - 1] == p) or (i + 1 < len(occ) and occ[i + 1] - x == p))
        if chained >= 2:
            best[p] = (chained * p / n, w, win)
    if not best:
        return None
    top = max(c for c, _w, _win in best.values())
    p = min(q for q, (c, _w, _win) in best.items() if c >= COVER_SHARE * top)
    _c, w, win = best[p]
    occ = _occurrences(win, w, p)
    # the phase: the rotation with the most occurrences (calls that are not in every step
    # come between steps: a rotation that has them inside its window loses those steps),
    # then the one whose starts follow the longest idle
    idle = m.idle[:n]

    def phase(r: int) -> tuple[int, float, int]:
        if occ[0] + r >= win.size:
            return (0, -1.0, -r)
        wr = int(win[occ[0] + r])
        return (len(_occurrences(win, wr, p)), _median_idle(idle, [i + r for i in occ
                                                                   if i + r < n]), -r)

    r = max(range(p), key=phase)
    if r:
        w = int(win[occ[0] + r])
    uniform = bool(np.all(tok[occ[0]:occ[0] + p] == tok[occ[0]]))
    starts = _occurrences(ids_of(p), w, p)
    return p, starts, uniform, False


def _spread(m: _Markers, starts: list[int]) -> float:
    """Coefficient of variation of the time between consecutive step starts."""
    d = np.diff(np.asarray([m.t[i] for i in starts], dtype=np.float64))
    return float(d.std() / d.mean()) if d.size >= 2 and d.mean() > 0 else float("inf")


def _gap_cuts(m: _Markers, levels: int = 3) -> list[float]:
    """Candidate step-cutting idle thresholds of one rank: the natural break of its idle
    gaps (`_gap_cut`), then that of the gaps above it, and so on (a pipeline stage's gaps:
    a send right after a receive, the compute between micro-batches, the optimizer between
    steps)."""
    gaps = [g for g in m.idle if g is not None]
    out: list[float] = []
    while gaps and len(out) < levels:
        cut = _gap_cut(gaps) if len(gaps) >= 6 else None
        if cut is None:
            break
        out.append(cut)
        gaps = [g for g in gaps if g > cut]
    return out


def _by_gaps(m: _Markers) -> tuple[int, list[int], bool, bool] | None:
    """The steps of a rank that never waits for its GPU, cut where its long idle gaps are:
    of the candidate thresholds (`_gap_cuts`), the one whose steps are the most regular in
    time (`_spread`)."""
    best = None
    for cut in _gap_cuts(m):
        flags = [g is not None and g > cut for g in m.idle]
        c = _cycle_by_waits(m, flags) if sum(flags) >= 2 else None
        if c is not None and (best is None or _spread(m, c[1]) < _spread(m, best[1])):
            best = c
    return best


def _agree_on_period(all_m: dict[int, _Markers],
                     cycles: dict[int, tuple | None]) -> dict[int, tuple | None]:
    """The ranks of a job make one step per step. A rank whose step is a shorter pattern
    repeated (a last pipeline stage under 1F1B: recv, send, recv, send, ... from one peer)
    is seen with k cycles per step where another rank's pattern is unambiguous (the first
    stage's warm-up sends): where a rank's cycles, regularly p markers apart, take 1/k of
    the longest mean cycle time of the ranks (k >= 2, within 15%; the mean: a step's
    repeats are not evenly spaced, its bubble is in one of them), they are merged k at a
    time, from the phase whose starts follow the longest idle (median)."""
    spans: dict[int, float] = {}
    for r, c in cycles.items():
        if c is not None and len(c[1]) >= 3:
            t = all_m[r].t
            spans[r] = (t[c[1][-1]] - t[c[1][0]]) / (len(c[1]) - 1)
    if len(spans) < 2:
        return cycles
    ref = max(spans.values())
    out = dict(cycles)
    for r, span in spans.items():
        p, starts, uniform, cut = cycles[r]
        ratio = ref / span if span > 0 else 0.0
        k = round(ratio)
        regular = np.mean(np.diff(starts) == p) >= 0.9
        if k < 2 or abs(ratio - k) > 0.15 * k or not regular or len(starts) < 2 * k:
            continue
        leads = [_median_idle(all_m[r].idle, starts[j::k]) for j in range(k)]
        phase = max(range(k), key=lambda j: (leads[j], -j))
        out[r] = (p * k, starts[phase::k], uniform, cut)
    return out


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


def _close(m: _Markers, i: int) -> int | None:
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


def _rank_steps(m: _Markers, p: int, starts: list[int], cut: bool) -> list[dict[str, Any]]:
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


def _global_ids(per_rank: dict[int, list[dict[str, Any]]]) -> dict[int, list[int]]:
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
    waited = ranked.filter(pl.col("kind").is_in(["sync", "readback"]))["rank"].unique()
    if coll.height:
        ranks = sorted(coll["rank"].unique().to_list())
        method = ("collectives" if (coll["channel"] == "nccl").any()
                  or (waited.len() * 2 >= len(ranks) and waited.len() > 0) else "torch")
    else:
        ranks = waited.sort().to_list()
        method = "sync"
    if not ranks:
        return empty
    vocab: dict[tuple, int] = {}
    all_m: dict[int, _Markers] = {}
    hosts: dict[int, str] = {}
    for r in ranks:
        tr = ranked.filter(pl.col("rank") == r)
        cr = coll.filter(pl.col("rank") == r) if method != "sync" else None
        all_m[r] = _markers(tr, cr, vocab)
        hosts[r] = tr["host"][0] if tr.height else None
    cycles = {r: _cycle(m) for r, m in all_m.items()}
    if any(sum(m.waited) < 2 for m in all_m.values()):
        # ranks that never wait for their GPU (c10d calls only): the long idle gaps may
        # cut the steps as waits do (equal buckets, a pipeline stage's micro-batches: the
        # tokens repeat within a step)
        agreed = _agree_on_period(all_m, cycles)
        for r, m in all_m.items():
            if sum(m.waited) >= 2:
                continue
            by_gaps = _by_gaps(m)
            # kept when it makes the steps clearly more regular in time than the tokens'
            # cycle as the other ranks' steps make it (a break found in a continuum of gaps,
            # or in a few calls back to back at the start, does not; nor do the gaps of a
            # last 1F1B stage whose recv, send pairs are merged 4 at a time: a straggler's
            # host work there cut 146 steps of 119)
            if by_gaps is not None and (agreed[r] is None or _spread(m, by_gaps[1])
                                        < 0.75 * _spread(m, agreed[r][1])):
                cycles[r] = by_gaps
    cycles = _agree_on_period(all_m, cycles)
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
        return StepDetection(pl.DataFrame(schema=STEP_COLUMNS), "none", 0, None)
    if method == "sync":
        ids = {r: list(range(len(s))) for r, s in per_rank.items()}
    else:
        ids = _global_ids(per_rank)
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
    comm = Counter(s["key"][0] for ss in per_rank.values() for s in ss[:1]).most_common(1)[0][0]
    return StepDetection(steps.sort(["rank", "step"]), method, periods.most_common(1)[0][0], comm)


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
