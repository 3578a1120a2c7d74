"""One rank's step cycle: its markers (the calls that repeat once per step) and the period
and phase of their pattern, by its GPU waits, its idle gaps or its tokens.

The algorithm is `argus.analyze.steps`' module doc ("The cycle", "The phase"); this module
holds the per-rank search, `steps.detect_steps` turns each rank's cycle into steps.

- `markers(tl_rank, coll_rank, vocab)`: one rank's `Markers` (tokens, times, idle gaps,
  GPU waits, the host's other calls between markers).
- `cycle(m)`: (markers per step, step start positions, uniform, cut) by GPU waits
  (`_cycle_by_waits`, split by host work or idle gaps where the host waits every N steps)
  or, on a rank that never waits, by the period of its tokens (`_cycle_by_tokens`).
- `by_gaps(m)`: the cycle cut by the rank's long idle gaps; `spread(m, starts)`: how
  regular in time steps are; `agree_on_period(all_m, cycles)`: a rank that repeats a shorter
  pattern k times per step has its cycles merged k at a time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from statistics import median

import numpy as np
import polars as pl

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
class Markers:
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


def markers(tl_rank: pl.DataFrame, coll_rank: pl.DataFrame | None,
             vocab: dict[tuple, int]) -> Markers:
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
    return Markers(tok, t, end, idle, [r[3] for r in rows], [r[4] for r in rows],
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


def cycle(m: Markers) -> tuple[int, list[int], bool, bool] | None:
    """(markers per step, positions where the steps start, whether a step's markers are one
    token repeated, whether the starts follow a cut: a GPU wait or a long idle) of one
    rank's markers: by its GPU waits when it has them, else by the tokens' period (module
    doc)."""
    if sum(m.waited) >= 2:
        return _cycle_by_waits(m, m.waited)
    return _cycle_by_tokens(m)


def _cycle_by_waits(m: Markers,
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


def _split_by_gaps(m: Markers, starts: list[int]) -> list[int]:
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


def _cycle_by_tokens(m: Markers) -> tuple[int, list[int], bool, bool] | None:
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


def spread(m: Markers, starts: list[int]) -> float:
    """Coefficient of variation of the time between consecutive step starts."""
    d = np.diff(np.asarray([m.t[i] for i in starts], dtype=np.float64))
    return float(d.std() / d.mean()) if d.size >= 2 and d.mean() > 0 else float("inf")


def _gap_cuts(m: Markers, levels: int = 3) -> list[float]:
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


def by_gaps(m: Markers) -> tuple[int, list[int], bool, bool] | None:
    """The steps of a rank that never waits for its GPU, cut where its long idle gaps are:
    of the candidate thresholds (`_gap_cuts`), the one whose steps are the most regular in
    time (`spread`)."""
    best = None
    for cut in _gap_cuts(m):
        flags = [g is not None and g > cut for g in m.idle]
        c = _cycle_by_waits(m, flags) if sum(flags) >= 2 else None
        if c is not None and (best is None or spread(m, c[1]) < spread(m, best[1])):
            best = c
    return best


def agree_on_period(all_m: dict[int, Markers],
                     cycles: dict[int, tuple | None]) -> dict[int, tuple | None]:
    """The ranks of a job make one step per step. A rank whose step is a shorter pattern
    repeated (a last pipeline stage under 1F1B: recv, send, recv, send, ... from one peer)
    is seen with k cycles per step where another rank's pattern is unambiguous (the first
    stage's warm-up sends): where a rank's cycles, regularly p markers apart, take 1/k of
    the longest mean cycle time of the ranks (k >= 2, within 15%; the mean: a step's
    repeats are not evenly spaced, its bubble is in one of them), they are merged k at a
    time, from the phase whose starts follow the longest idle (median).
    The mean cycle times are taken over the time every rank has cycles in (from the latest
    first start to the earliest last one, give or take half the longest median cycle: the
    ranks start one step a few ms apart), so that a stall of the whole job (a busy node's
    CPUs taken for half a second) stretches every rank's mean alike. Over each rank's own
    starts, a rank whose recorded starts went on past a stall had a 1.76x longer mean, and
    the other ranks' steps were merged 2 at a time (a daemon build then numbered two steps
    alike)."""
    timed = {r: [all_m[r].t[i] for i in c[1]] for r, c in cycles.items()
             if c is not None and len(c[1]) >= 3}
    if len(timed) < 2:
        return cycles
    tol = max(median(np.diff(ts).tolist()) for ts in timed.values()) / 2
    lo = max(ts[0] for ts in timed.values()) - tol
    hi = min(ts[-1] for ts in timed.values()) + tol
    spans: dict[int, float] = {}
    for r, ts in timed.items():
        inner = [x for x in ts if lo <= x <= hi]
        if len(inner) >= 3:
            spans[r] = (inner[-1] - inner[0]) / (len(inner) - 1)
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
