"""The live state of jobs (`argus.live/1`): what `argus top` shows and the daemon exports.

`job_view(job, recording, summaries, report)` turns the recent window of one job (a
recording, its per-rank-per-step summaries and its diagnosis) into one JSON-ready dict:
per rank the recent step time, compute vs wait, arrival lateness, the last collective and
its sequence number, the hottest CPU frame (a Python function when the samples have Python
frames), and the straggler / hang flags of the report; a hang finding keeps its comm, seq,
op, waiting and missing ranks.
The daemon serves a list of these as `GET /state`; `argus top` renders them; readers
(`argus.present.top`) produce the same dict from a recording, so the view is tested on
recorded data.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from argus.analyze.hotspot import attribute
from argus.recording.io import Recording
from argus.recording.summaries import Summaries

SCHEMA = "argus.live/1"
RECENT_STEPS = 5  # the per-rank numbers are medians over the rank's last RECENT_STEPS steps
# a collective_hang finding keeps where it hangs and who waits / never arrived (what
# `argus report` says of the same segments; an operator goes to the missing ranks' nodes)
_HANG_KEYS = ("comm", "seq", "op", "waiting_ranks", "missing_ranks")


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(float(ns) / 1e6, 3)


def _hot_frames(stacks: pl.DataFrame) -> dict[int, str]:
    """rank -> the function most of its on-CPU samples are charged to, as the differential
    profile charges them (`hotspot.attribute`: the innermost Python frame "fn (file.py:line)"
    when the sample has Python frames, else the leaf-most frame of the program itself;
    samples waiting for the GPU or a collective and idle ones count for nothing). A rank
    whose samples are all waiting or idle shows its most frequent named user leaf frame."""
    if not stacks.height:
        return {}
    st = stacks.filter(
        pl.col("rank").is_not_null() & (pl.col("state").is_null() | (pl.col("state") != "off_cpu"))
    )
    out: dict[int, str] = {}
    charged: dict[int, dict[str, int]] = {}
    leaves: dict[int, dict[str, int]] = {}
    for rank, count, functions, modules in st.select("rank", "count", "functions",
                                                     "modules").rows():
        n = int(count or 0)
        who = attribute(functions, modules)
        if who is not None and "+0x" not in who and not who.startswith("["):
            per = charged.setdefault(int(rank), {})
            per[who] = per.get(who, 0) + n
            continue
        for fn, mod in zip(functions or [], modules or [], strict=False):
            if mod != "[kernel]" and fn and "+0x" not in fn and not fn.startswith("["):
                per = leaves.setdefault(int(rank), {})
                per[fn] = per.get(fn, 0) + n
                break
    for rank in set(charged) | set(leaves):
        per = charged.get(rank) or leaves[rank]
        out[rank] = max(per.items(), key=lambda kv: (kv[1], kv[0]))[0]
    return out


def _last_collectives(summ: Summaries) -> dict[int, tuple[str | None, int | None]]:
    out: dict[int, tuple[str | None, int | None]] = {}
    if not summ.tail.height:
        return out
    for rank, comms in summ.tail.select("rank", "comms").rows():
        best = None
        for c in comms or []:
            if c.get("gseq") is not None and (best is None or c["gseq"] > best["gseq"]):
                best = c
        if rank is not None:
            out[int(rank)] = (best["op"], int(best["gseq"])) if best else (None, None)
    return out


def job_view(job: str, rec: Recording, summ: Summaries, report: dict[str, Any],
             probes: dict[int, int] | None = None, exited: set[int] | None = None,
             ) -> dict[str, Any]:
    """One job's live state (see the module doc). `probes`: tgid -> probes attached;
    `exited`: tgids known to have exited."""
    probes = probes or {}
    exited = exited or set()
    steps = summ.steps
    hot = _hot_frames(rec.stacks)
    last = _last_collectives(summ)
    stragglers = {f["rank"]: f for f in report.get("findings", []) if f.get("kind") == "straggler"
                  and f.get("severity") in ("warning", "critical")}
    hangs = [f for f in report.get("findings", []) if f.get("kind") == "collective_hang"]
    waited: dict[int, float] = {}
    hung_missing: set[int] = set()
    for h in hangs:
        for w in h.get("waiting") or []:
            waited[w["rank"]] = max(waited.get(w["rank"], 0.0), w.get("waited_s") or 0.0)
        hung_missing.update(h.get("missing_ranks") or [])
    ranks = []
    for r in report.get("ranks", []):
        rank = r["rank"]
        mine = steps.filter(pl.col("rank") == rank).sort("step").tail(RECENT_STEPS) if (
            steps.height) else steps

        def med(col: str, mine: pl.DataFrame = mine) -> float | None:
            v = mine[col].drop_nulls() if mine.height else None
            return float(v.median()) if v is not None and len(v) else None

        step_ns = med("step_time_ns")
        wait_ns = None
        if mine.height:
            w = mine.select((pl.col("coll_wait_ns").fill_null(0) + pl.col("sync_wait_ns")
                             .fill_null(0) + pl.col("compute_wait_ns").fill_null(0))
                            .alias("w"))["w"]
            wait_ns = float(w.median())
        op, seq = last.get(rank, (None, None))
        s = stragglers.get(rank)
        tgid = r.get("tgid")
        ranks.append({
            "rank": rank, "tgid": tgid, "host": r.get("host"), "steps": r.get("steps", 0),
            "step_time_ms": _ms(step_ns),
            "compute_ms": _ms(None if step_ns is None or wait_ns is None
                              else max(0.0, step_ns - wait_ns)),
            "wait_ms": _ms(wait_ns),
            "coll_wait_ms": _ms(med("coll_wait_ns")),
            "lateness_ms": _ms(med("lateness_ns")),
            "last_collective": op, "last_seq": seq,
            "hot_frame": hot.get(rank),
            "straggler": s is not None,
            "straggler_score": round(float(s["score"]), 3) if s and s.get("score") is not None
            else 0.0,
            "hang": rank in waited or rank in hung_missing,
            "hang_waited_s": waited.get(rank, 0.0),
            "probes": probes.get(tgid, 0) if tgid is not None else 0,
            "exited": tgid in exited,
        })
    return {
        "job": job,
        "host": rec.host,
        "analysed": True,
        "ranks": ranks,
        "steps": report.get("steps", {}),
        "findings": [
            {k: f.get(k) for k in ("kind", "severity", "summary", "rank", "score", *_HANG_KEYS)
             if k in f}
            for f in report.get("findings", [])
        ][:10],
        "drops": report.get("drops", {}),
    }


# what a rank's view says before the job's first analysis: nothing measured yet (None keeps
# the series out of /metrics, as for any value not known)
_NOT_YET = ("step_time_ms", "compute_ms", "wait_ms", "coll_wait_ms", "lateness_ms",
            "last_collective", "last_seq", "hot_frame", "straggler", "straggler_score", "hang",
            "hang_waited_s")


def pending_view(job: str, host: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """A job traced but not analysed yet (the daemon lets a new job's ranks settle for a
    few intervals, and its analysis waits for the CPU on a busy node): `job_view`'s keys,
    `analysed` False, its ranks ({rank, tgid, probes}) on `host`, running, nothing measured."""
    return {
        "job": job, "host": host, "analysed": False,
        "ranks": [{"rank": r["rank"], "tgid": r["tgid"], "host": host, "steps": 0,
                   **dict.fromkeys(_NOT_YET), "probes": r["probes"], "exited": False}
                  for r in ranks],
        "steps": {"detected": False, "count": 0}, "findings": [], "drops": {},
    }


def node_state(host: str, jobs: list[dict[str, Any]], now_ns: int, **extra: Any) -> dict:
    """The whole node's state: {"schema", "host", "now_ns", "jobs": [job_view...], ...}."""
    return {"schema": SCHEMA, "host": host, "now_ns": now_ns, "jobs": jobs, **extra}
