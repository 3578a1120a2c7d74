"""CPU hotspots: the differential CPU stack profile of anomalous vs normal time.

Attribution: samples of threads waiting for the GPU or a collective (a frame of the CUDA/NCCL
API) and idle samples are excluded; kernel frames and idle/sleep frames are ignored. The
profile of a set of samples is, per function of the program itself (frames not in a shared
library `*.so*`), its inclusive share of the attributed samples (a generic busy leaf shared
by several callers does not hide the caller that changed); the differential is
share(anomalous) - share(normal), and the hotspot is the function whose share grew the most
(>= 10 points), or the deepest function under it that grew almost as much (`differential`).
`attribute` (one function per sample: the leaf-most own frame) names what a hung rank is
doing.

Evidence (`significant`): a share is estimated from >= MIN_SAMPLES (10) attributed samples,
so with >= 10 on each side the growth of the shares is enough. A thin baseline (< 10
samples: a rank idle outside a short window, other ranks that mostly wait for their GPU)
has no estimable share, yet a function that fills the anomalous side and is (almost) never
seen in the baseline is the clearest hotspot there is. Then the question is whether the
function's samples are concentrated on the anomalous side by more than chance: of the
a + b samples of the function among the A + B attributed samples of both sides, at least a
fall on the anomalous side with probability P (the one-sided Fisher exact test, the
hypergeometric tail). The function must have >= MIN_SAMPLES samples on the anomalous side
and P <= MAX_P (0.01). With 10 of 10 anomalous samples and 3 baseline samples without it,
P = 1/C(13, 3) = 0.0035: a finding; with 2 baseline samples, P = 1/C(12, 2) = 0.015: not
(two samples say too little about normal time); a baseline of 0 samples says nothing.

Scopes: a straggler in a window (its samples in the window vs its samples elsewhere, or vs
the other ranks' samples when it has fewer than MIN_SAMPLES elsewhere; when nothing of its
own grew, vs the other ranks' samples in the window: a rank slow throughout and slower in
the window, whose hotspot is as busy outside it), a
straggler throughout (its samples vs the other ranks'), and an anomalous window without a
straggler (all ranks in the window vs elsewhere).

Python frames: a frame whose module is "py:FILE:FIRSTLINE" (`PY_MODULE`, docs/stacks.md) is a
Python function of the interpreter's frame chain. When a sample carries Python frames, it is
charged to them only ("fn (file.py:line)"), innermost first: the interpreter's own C frames
(`_PyEval_EvalFrameDefault`, ...), which a statically linked python3 does not put in a `.so`,
would otherwise name the interpreter instead of the training code.
"""

from __future__ import annotations

from collections import Counter
from math import exp, lgamma
from typing import Any

import polars as pl

MIN_DELTA = 0.10
OTHER = "(other stacks)"  # a summary's attributed samples of the stacks it did not keep
WARN_DELTA = 0.20
MIN_SAMPLES = 10
MAX_P = 0.01  # thin baseline: one-sided Fisher exact test (see module doc)

IDLE = frozenset(
    "poll ppoll epoll_wait epoll_pwait select pselect nanosleep clock_nanosleep usleep sleep "
    "sched_yield pthread_cond_wait pthread_cond_timedwait __futex_abstimed_wait_common "
    "futex_wait syscall read recv recvmsg accept cpu_idle do_idle".split()
)
WAIT_PREFIXES = ("cuda", "cuStream", "cuCtx", "cuEvent", "cuMemcpy", "nccl", "argus_sim_")


PY_MODULE = "py:"


def python_label(fn: str, mod: str) -> str:
    """"fn (file.py:line)" for a Python frame whose module is "py:/path/file.py:line"."""
    path, _, line = mod[len(PY_MODULE) :].rpartition(":")
    if not path:
        path, line = line, ""
    base = path.rsplit("/", 1)[-1]
    return f"{fn} ({base}:{line})" if line else f"{fn} ({base})"


def _python_frames(functions: list[str], modules: list[str | None]) -> list[str]:
    out = []
    for fn, mod in zip(functions, modules, strict=False):
        if fn is not None and mod and mod.startswith(PY_MODULE):
            label = python_label(fn, mod)
            if label not in out:
                out.append(label)
    return out


def attribute(functions: list[str] | None, modules: list[str] | None) -> str | None:
    """The function one sample is charged to (None: idle, waiting, or kernel only); the
    innermost Python frame when the sample has Python frames."""
    if not functions:
        return None
    modules = list(modules or [None] * len(functions))
    if len(modules) < len(functions):
        modules += [None] * (len(functions) - len(modules))
    user = []
    for fn, mod in zip(functions, modules, strict=False):
        if fn is None:
            continue
        if fn.startswith(WAIT_PREFIXES):
            return None
        if mod == "[kernel]" or fn in IDLE:
            continue
        user.append((fn, mod))
    py = _python_frames(functions, modules)
    if py and user:
        return py[0]
    for fn, mod in user:
        if not mod or ".so" not in mod:
            return fn
    return user[0][0] if user else None


def own_frames(functions: list[str], modules: list[str] | None) -> list[str]:
    """The program's own frames of a sample, leaf first (no shared library, kernel, idle)."""
    modules = list(modules or [])
    modules += [None] * (len(functions) - len(modules))
    py = _python_frames(functions, modules)
    if py:
        return py
    out = []
    for fn, mod in zip(functions, modules, strict=False):
        if fn is None or mod == "[kernel]" or fn in IDLE or (mod and ".so" in mod):
            continue
        if fn not in out:
            out.append(fn)
    return out


NESTED = 0.9  # a callee named instead of its caller: >= 90% of its growth, >= 90% under it


def _profile(stacks: pl.DataFrame) -> tuple[Counter, dict[str, int]]:
    c: Counter = Counter()
    depth: dict[str, int] = {}  # the least depth each function was seen at (0: the leaf)
    for fns, mods, n in stacks.select("functions", "modules", "count").rows():
        if fns is not None and len(fns) == 1 and fns[0] == OTHER:
            c[None] += int(n or 0)  # attributed samples, of stacks a summary did not keep
            continue
        f = attribute(fns, mods)
        if f is None:
            continue
        c[None] += int(n or 0)
        own = own_frames(list(fns), mods) or [f]
        for d, fn in enumerate(own):
            c[fn] += int(n or 0)
            depth[fn] = min(depth.get(fn, d), d)
    return c, depth


def profile(stacks: pl.DataFrame) -> Counter:
    """Samples per function, inclusive: a sample counts for each of the program's own frames
    on its stack (a generic leaf such as a busy loop is shared by its callers, the caller
    that changed is what differs); samples charged to no function (idle, waiting) are kept
    under None so that shares are of all attributed samples."""
    return _profile(stacks)[0]


def _under(stacks: pl.DataFrame, callee: str, caller: str) -> int:
    """Samples in which `caller` is on the stack above `callee`."""
    n_under = 0
    for fns, mods, n in stacks.select("functions", "modules", "count").rows():
        if attribute(fns, mods) is None:
            continue
        own = own_frames(list(fns), mods)
        if callee in own and caller in own[own.index(callee) + 1 :]:
            n_under += int(n or 0)
    return n_under


def differential(anomalous: pl.DataFrame, normal: pl.DataFrame) -> list[dict[str, Any]]:
    """Per function: share of samples in `anomalous` and `normal`, sorted by growth.

    Inclusive shares make a function and its callers grow alike (a loop in `work` called by
    `main`: `main` grows by the same or, counting `main`'s other callees, a little more).
    The first row is then the most specific of them: the deepest function whose growth is
    >= NESTED of the top one's and that runs under it in >= NESTED of its anomalous samples
    (`within` names the caller it was preferred to)."""
    (a, depth), (b, _) = _profile(anomalous), _profile(normal)
    ta, tb = a.pop(None, 0), b.pop(None, 0)
    if ta == 0 or tb == 0:
        return []
    rows = [
        {
            "function": f,
            "share_anomalous": a[f] / ta,
            "share_normal": b[f] / tb,
            "samples_anomalous": a[f],
            "samples_normal": b[f],
            "total_anomalous": ta,
            "total_normal": tb,
        }
        for f in set(a) | set(b)
    ]

    def growth(r):
        return round(r["share_anomalous"] - r["share_normal"], 9)

    rows.sort(key=lambda r: (-growth(r), depth.get(r["function"], 0), r["function"]))
    top = rows[0]
    if growth(top) <= 0:
        return rows
    nested = [
        r for r in rows[1:]
        if growth(r) >= NESTED * growth(top) and r["samples_anomalous"] > 0
        and depth.get(r["function"], 0) < depth.get(top["function"], 0)
    ]
    for r in sorted(nested, key=lambda r: depth.get(r["function"], 0)):
        if _under(anomalous, r["function"], top["function"]) >= NESTED * r["samples_anomalous"]:
            rows.remove(r)
            return [{**r, "within": top["function"]}, *rows]
    return rows


def _log_comb(n: int, k: int) -> float:
    return lgamma(n + 1) - lgamma(k + 1) - lgamma(n - k + 1)


def fisher_greater(a: int, total_a: int, b: int, total_b: int) -> float:
    """One-sided Fisher exact test: the probability that, of the a + b samples of a function
    among total_a + total_b samples, at least `a` fall among the `total_a` ones by chance
    (the hypergeometric upper tail)."""
    n, k = total_a + total_b, a + b
    if total_a == 0 or k == 0:
        return 1.0
    log_all = _log_comb(n, total_a)
    hi = min(total_a, k)
    return min(1.0, sum(exp(_log_comb(k, x) + _log_comb(n - k, total_a - x) - log_all)
                        for x in range(a, hi + 1) if total_a - x <= n - k))


def significant(row: dict[str, Any]) -> bool:
    """Enough evidence that the function's share grew (see module doc): >= MIN_SAMPLES on
    each side, or, against a thinner baseline, >= MIN_SAMPLES of the function on the
    anomalous side and a one-sided Fisher exact p <= MAX_P."""
    if row["total_anomalous"] < MIN_SAMPLES:
        return False
    if row["total_normal"] >= MIN_SAMPLES:
        return True
    return row["samples_anomalous"] >= MIN_SAMPLES and fisher_greater(
        row["samples_anomalous"], row["total_anomalous"], row["samples_normal"],
        row["total_normal"]) <= MAX_P


def _finding(diff, rank, scope: str, extra: dict[str, Any]) -> dict[str, Any] | None:
    if not diff:
        return None
    top = diff[0]
    delta = top["share_anomalous"] - top["share_normal"]
    if delta < MIN_DELTA or not significant(top):
        return None
    who = f"rank {rank}" if rank is not None else "all ranks"
    return {
        "kind": "cpu_hotspot",
        "severity": "warning" if delta >= WARN_DELTA else "info",
        "summary": (
            f"On {who}, {top['function']} took {top['share_anomalous']:.0%} of CPU samples "
            f"{scope} vs {top['share_normal']:.0%} otherwise."
        ),
        "rank": rank,
        "function": top["function"],
        "share_anomalous": round(top["share_anomalous"], 3),
        "share_normal": round(top["share_normal"], 3),
        "samples_anomalous": top["samples_anomalous"],
        "samples_normal": top["samples_normal"],
        **({"within": top["within"]} if "within" in top else {}),
        "profile": [
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
            for r in diff[:5]
        ],
        **extra,
    }


def detect_hotspots(
    stacks: pl.DataFrame,
    windows: list[dict[str, Any]],
    stragglers: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """cpu_hotspot findings for the stragglers and the anomalous windows (see module doc)."""
    if stacks.height == 0:
        return []
    out = []
    in_win = {}
    # A sample row covers its aggregation interval (t_ns is its middle): it belongs to a
    # window when the interval overlaps it (intervals may be longer than a short window).
    half = pl.col("interval_ns").fill_null(0) // 2
    for w in windows:
        in_win[(w["start_step"], w["end_step"])] = ((pl.col("t_ns") - half) <= w["end_ns"]) & (
            (pl.col("t_ns") + half) >= w["start_ns"]
        )
    any_win = pl.lit(False)
    for e in in_win.values():
        any_win = any_win | e
    covered = set()
    for s in stragglers:
        r = s["rank"]
        mine = stacks.filter(pl.col("rank") == r)
        key = (s.get("start_step"), s.get("end_step"))
        if key in in_win:
            normal = mine.filter(~any_win)
            extra = {"start_step": key[0], "end_step": key[1]}
            if profile(normal)[None] < MIN_SAMPLES:  # attributed samples (not frames)
                # a mostly idle rank (waiting for its GPU) has few samples of its own outside
                # a short window: compare with the other ranks' samples instead
                normal = stacks.filter(pl.col("rank") != r)
                extra["compared_with"] = "other_ranks"
            inside = mine.filter(in_win[key])
            scope = f"in steps {key[0]}-{key[1]}"
            covered.add(key)
            f = _finding(differential(inside, normal), r, scope, extra)
            if f is None and "compared_with" not in extra:
                # nothing of its own grew in the window (it was as busy in it before: a
                # rank slow throughout, slower in the window): what it does there that the
                # other ranks do not
                others = stacks.filter((pl.col("rank") != r) & in_win[key])
                f = _finding(differential(inside, others), r, scope,
                             {**extra, "compared_with": "other_ranks_in_window"})
                if f:
                    f["summary"] = f["summary"].replace("otherwise", "on the other ranks")
        else:
            diff = differential(mine, stacks.filter(pl.col("rank") != r))
            f = _finding(diff, r, "on this rank", {"compared_with": "other_ranks"})
            if f:
                f["summary"] = f["summary"].replace("otherwise", "vs the other ranks")
        if f:
            out.append(f)
    for w in windows:
        key = (w["start_step"], w["end_step"])
        if key in covered or w["severity"] == "info":
            continue
        diff = differential(stacks.filter(in_win[key]), stacks.filter(~any_win))
        f = _finding(
            diff, None, f"in steps {key[0]}-{key[1]}", {"start_step": key[0], "end_step": key[1]}
        )
        if f:
            out.append(f)
    return out
