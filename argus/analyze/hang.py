"""Collective hangs: ranks blocked at collective k while others never arrived.

A hang is seen at the end of a recording: ranks with a call still in flight (a sync, a
read-back or a blocking collective; `in_flight` rows) entered at least `threshold` before the
recording ended, where threshold = max(hang_after, 5 x the median step time). For each comm,
k = the highest aligned seq any waiting rank issued; waiting ranks are those whose last seq on
that comm is k, missing ranks those whose last seq is lower (they never arrived) or that
exited (a `proc` `exit` event). The reported seq is the first collective a missing rank never
issued (lowest last seq among them + 1): the waiting ranks may have issued later ones too.
A rank behind on the comm that is itself waiting is a victim, not the cause, when another
rank behind is not waiting at all: with several communicators of one local name (made before
attach, `anon0` on each TP group) or a cascade (the DP peers of a TP group stuck behind its
hung rank), the ranks that never arrived are the ones blocked outside any GPU wait or
collective. Of comms naming the same culprits, the one where a waiting rank is the fewest
collectives ahead of them is where they are awaited.
For each missing rank the report gives what it is doing now:
its latest CPU stacks (the last sampled intervals) and any call it is blocked in; where the
host channel recorded it, its latest OFF-CPU stack (where its main thread is blocked, and for
how long) comes first, since a hung rank is usually asleep and then has no CPU samples.
Where the session dumped the ranks' Python stacks at its end (`pystacks.parquet`, taken when
calls were in flight for long), each missing rank's Python stack (`missing_python_stacks`)
is given next to one waiting rank's (`waiting_python_stack`), and the summary names the
missing rank's innermost Python function with file:line: the line of training code it is
stuck on.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import polars as pl

from argus.analyze.hotspot import attribute

STEP_MULTIPLE = 5.0
LATEST_INTERVALS = 5


def _on_cpu(stacks: pl.DataFrame) -> pl.DataFrame:
    if "state" not in stacks.columns:
        return stacks
    return stacks.filter(pl.col("state").is_null() | (pl.col("state") != "off_cpu"))


def latest_offcpu(stacks: pl.DataFrame, rank: int) -> dict[str, Any] | None:
    """The rank's latest off-CPU stack (host channel): of the last interval's blocked
    threads, the main thread (tid == tgid) if blocked, else the one blocked longest."""
    if "state" not in stacks.columns:
        return None
    mine = stacks.filter((pl.col("rank") == rank) & (pl.col("state") == "off_cpu"))
    if mine.height == 0:
        return None
    last = mine.filter(pl.col("ts_ns") == pl.col("ts_ns").max())
    last = last.with_columns((pl.col("tid") == pl.col("tgid")).alias("_main")).sort(
        ["_main", "blocked_ns"], descending=True, nulls_last=True
    )
    row = last.row(0, named=True)
    fns, mods = row["functions"] or [], row["modules"] or []
    user = [f for f, m in zip(fns, list(mods) + [None] * len(fns), strict=False)
            if m != "[kernel]"]
    return {
        "tid": row["tid"],
        "thread": row["thread"],
        "blocked_s": round((row["blocked_ns"] or 0) / 1e9, 3),
        "function": attribute(fns, mods) or (user[0] if user else None),
        "functions": list(fns),
    }


def _where(function: str, file: str | None, line: int | None) -> str:
    base = (file or "?").rsplit("/", 1)[-1]
    return f"{function} ({base}:{line})" if line else f"{function} ({base})"


def python_stack(pystacks: pl.DataFrame | None, rank: int) -> dict[str, Any] | None:
    """The rank's Python stack from the end-of-session dump: its main thread (tid == tgid)
    when that has Python frames, else the first thread that has. `function`/`file`/`line`
    are its innermost Python frame; `frames` the Python frames, innermost first, as
    "function (file:line)"."""
    if pystacks is None or pystacks.height == 0:
        return None
    mine = pystacks.filter(pl.col("rank") == rank)
    if mine.height == 0:
        return None
    mine = mine.with_columns((pl.col("tid") == pl.col("tgid")).alias("_main")).sort(
        ["_main", "tid"], descending=[True, False]
    )
    for row in mine.iter_rows(named=True):
        kinds = row["kinds"] or []
        py = [i for i, k in enumerate(kinds) if k == "python"]
        if not py:
            continue
        fns, files, lines = row["functions"] or [], row["files"] or [], row["lines"] or []
        at = [_where(fns[j], files[j], lines[j]) for j in range(len(fns))]
        i = py[0]
        return {
            "rank": rank,
            "tgid": row["tgid"],
            "tid": row["tid"],
            "thread": row["thread"],
            "state": row["state"],
            "wchan": row["wchan"],
            "function": fns[i],
            "file": files[i],
            "line": lines[i],
            "where": at[i],
            "frames": [at[j] for j in py],
        }
    return None


def latest_stacks(stacks: pl.DataFrame, rank: int, top: int = 3) -> list[dict[str, Any]]:
    """The rank's most sampled stacks over its last `LATEST_INTERVALS` sampling intervals."""
    mine = _on_cpu(stacks).filter(pl.col("rank") == rank)
    if mine.height == 0:
        return []
    last_ts = mine.get_column("ts_ns").unique().sort().tail(LATEST_INTERVALS)
    recent = mine.filter(pl.col("ts_ns").is_in(last_ts.implode()))
    c: Counter = Counter()
    frames: dict[tuple, tuple] = {}
    for fns, mods, n in recent.select("functions", "modules", "count").rows():
        key = tuple(fns or [])
        c[key] += int(n or 0)
        frames[key] = (fns or [], mods or [])
    total = sum(c.values()) or 1
    out = []
    # most samples first; ties by the stack's text, so the order does not depend on row order
    ranked = sorted(c.items(), key=lambda kv: (-kv[1], tuple(f or "" for f in kv[0])))
    for key, n in ranked[:top]:
        fns, mods = frames[key]
        user = [f for f, m in zip(fns, list(mods) + [None] * len(fns), strict=False)
                if m != "[kernel]"]
        out.append(
            {
                "samples": n,
                "share": round(n / total, 3),
                "function": attribute(fns, mods) or (user[0] if user else None),
                "functions": list(fns),
            }
        )
    return out


def detect_hangs(
    tl: pl.DataFrame,
    coll: pl.DataFrame,
    stacks: pl.DataFrame,
    end_ns: dict[str, int],
    hang_after_s: float,
    step_ns: float | None,
    pystacks: pl.DataFrame | None = None,
) -> list[dict[str, Any]]:
    """collective_hang findings (see module doc); `end_ns` is each host's recording end;
    `pystacks` the recordings' end-of-session Python stacks (optional)."""
    if tl.height == 0:
        return []
    threshold = max(hang_after_s * 1e9, STEP_MULTIPLE * (step_ns or 0))
    end = pl.col("host").replace_strict(end_ns, default=None, return_dtype=pl.Int64)
    stuck = (
        tl.filter(
            pl.col("in_flight")
            & pl.col("rank").is_not_null()
            & pl.col("kind").is_in(["sync", "readback", "collective", "other"])
        )
        .with_columns((end - pl.col("t_ns")).alias("waited_ns"))
        .filter(pl.col("waited_ns") >= threshold)
        .sort("t_ns")
        .unique("rank", keep="first")
    )
    if stuck.height == 0:
        return []
    waiting = {r["rank"]: r for r in stuck.rows(named=True)}
    exited = set(tl.filter(pl.col("kind") == "exit")["rank"].drop_nulls().to_list())
    if coll.height == 0:
        return [_finding(None, None, None, waiting, [], exited, tl, stacks, threshold,
                         pystacks)]
    last = coll.group_by(["comm", "rank"]).agg(pl.col("gseq").max().alias("last"))
    best = None
    for comm in last["comm"].unique().sort().to_list():
        lc = dict(last.filter(pl.col("comm") == comm).select("rank", "last").rows())
        k = max((lc[r] for r in waiting if r in lc), default=None)
        if k is None:
            continue
        missing = sorted({r for r, s in lc.items() if s < k} | (exited & set(lc)))
        culprits = [r for r in missing if r not in waiting or r in exited]
        if culprits:  # the waiting ones behind are victims (see the module doc)
            missing = culprits
        arrived = sorted(r for r in lc if r not in missing and r not in exited)
        lowest = min(lc[r] for r in missing) if missing else k
        gap = min((lc[r] - lowest for r in arrived if r in waiting and lc[r] > lowest),
                  default=0)
        cand = (bool(culprits), len(missing), len(arrived), -gap, comm, k, arrived, missing)
        if best is None or cand[:4] > best[:4]:
            best = cand
    if best is None:
        return [_finding(None, None, None, waiting, [], exited, tl, stacks, threshold,
                         pystacks)]
    *_, comm, k, arrived, missing = best
    # The collective the missing ranks never reached: the first one after the lowest last
    # seq among them (the waiting ranks may have issued several more, e.g. later buckets).
    lc = dict(last.filter(pl.col("comm") == comm).select("rank", "last").rows())
    behind = [lc[r] for r in missing if lc[r] < k]
    if behind:
        k = min(behind) + 1
    row = coll.filter((pl.col("comm") == comm) & (pl.col("gseq") == k)).head(1)
    op = row["op"][0] if row.height else None
    return [_finding(comm, k, op, {r: waiting.get(r) for r in arrived}, missing, exited, tl,
                     stacks, threshold, pystacks)]


def _finding(
    comm, seq, op, waiting, missing, exited, tl, stacks, threshold, pystacks=None
) -> dict[str, Any]:
    missing_py = [p for p in (python_stack(pystacks, r) for r in missing) if p]
    py_of = {p["rank"]: p for p in missing_py}
    waiting_py = next(
        (p for p in (python_stack(pystacks, r) for r in sorted(waiting)) if p), None
    )
    missing_stacks = []
    for r in missing:
        mine = tl.filter(pl.col("rank") == r)
        fl = mine.filter(pl.col("in_flight")).sort("t_ns").tail(1)
        lastev = mine.filter(pl.col("kind") != "exit").sort("t_ns").tail(1)
        missing_stacks.append(
            {
                "rank": r,
                "tgid": int(mine["tgid"][0]) if mine.height else None,
                "exited": r in exited,
                "in_flight": fl["name"][0] if fl.height else None,
                "last_call": lastev["name"][0] if lastev.height else None,
                "stacks": latest_stacks(stacks, r),
                "blocked": latest_offcpu(stacks, r),
            }
        )
    waits = [
        {
            "rank": r,
            "call": w["name"] if w else None,
            "waited_s": round(w["waited_ns"] / 1e9, 3) if w else None,
        }
        for r, w in sorted(waiting.items())
    ]
    longest = max((w["waited_s"] or 0 for w in waits), default=0)
    where = f"{op} seq {seq} on comm {comm}" if comm is not None else "the GPU or a collective"
    if missing:
        doing = []
        for m in missing_stacks:
            py = py_of.get(m["rank"])
            if m["exited"]:
                doing.append(f"rank {m['rank']} exited")
            elif py is not None:
                b = m["blocked"]
                extra = (f", off-CPU for {b['blocked_s']:.1f} s" if b and b["blocked_s"]
                         else "")
                doing.append(f"rank {m['rank']} is stuck in Python {py['where']}{extra}")
            elif m["blocked"] and m["blocked"]["function"]:
                b = m["blocked"]
                doing.append(f"rank {m['rank']} is blocked in {b['function']} "
                             f"(off-CPU for {b['blocked_s']:.1f} s)")
            elif m["stacks"] and m["stacks"][0]["function"]:
                doing.append(f"rank {m['rank']} is in {m['stacks'][0]['function']}")
            else:
                doing.append(f"rank {m['rank']} never arrived")
        tail = "; ".join(doing)
    else:
        tail = "every rank arrived, so the collective itself is stuck"
    ranks_txt = ", ".join(str(w["rank"]) for w in waits) or "none"
    return {
        "kind": "collective_hang",
        "severity": "critical",
        "summary": (f"Hang at {where}: rank(s) {ranks_txt} have waited {longest:.1f} s; {tail}."),
        "comm": comm,
        "seq": seq,
        "op": op,
        "waiting_ranks": [w["rank"] for w in waits],
        "missing_ranks": list(missing),
        "waiting": waits,
        "missing_stacks": missing_stacks,
        "missing_python_stacks": missing_py,
        "waiting_python_stack": waiting_py,
        "threshold_s": round(threshold / 1e9, 3),
    }
