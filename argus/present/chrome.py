"""Chrome / Perfetto trace export (Trace Event Format JSON).

Layout: one process per rank (`pid` = rank, named "rank N (host, tgid TGID)"), one track per
(thread, channel) (`tid` = a small integer per (rank, tid, channel), named
"<channel> tid <tid>"), plus a "steps" track (`tid` 0) with one slice per detected step.
Calls are complete events (`ph: "X"`); collectives are named "<op> #<seq>" with args comm,
seq, bytes. Calls still in flight end at the recording end (args.in_flight = true).
Findings are global instant events (`ph: "i"`, `s: "g"`). Times: `ts`/`dur` in microseconds
RELATIVE TO THE EARLIEST EVENT (aligned wall clock); the absolute origin is in
`metadata.origin_wall_ns`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from argus.analyze.matching import align_seq, collectives
from argus.analyze.report import diagnose
from argus.analyze.steps import detect_steps
from argus.analyze.timeline import build_timeline, recording_end_ns
from argus.recording.io import Recording

STEP_TID = 0


def chrome_trace(
    recordings: Sequence[Recording], report: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Build the trace object (see module doc). `report` defaults to `diagnose(recordings)`."""
    report = report if report is not None else diagnose(recordings)
    offsets = (report.get("clock_alignment") or {}).get("offsets_ns") or {}
    tl = build_timeline(recordings, offsets).filter(pl.col("rank").is_not_null())
    coll = align_seq(collectives(tl))
    steps = detect_steps(tl, coll).steps
    ends = {r.host: (recording_end_ns(r) or 0) + offsets.get(r.host, 0) for r in recordings}
    origin = int(tl["t_ns"].min()) if tl.height else 0
    us = lambda ns: round((ns - origin) / 1000.0, 3)  # noqa: E731
    gseq = {}
    if coll.height:
        for rank, t, comm, s in coll.select("rank", "t_ns", "comm", "gseq").rows():
            gseq[(rank, t, comm)] = s
    events: list[dict[str, Any]] = []
    tracks: dict[tuple[int, int, str], int] = {}
    for rank, tgid, host in tl.unique("rank", keep="first").select("rank", "tgid", "host").rows():
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0,
                       "args": {"name": f"rank {rank} ({host}, tgid {tgid})"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0,
                       "args": {"sort_index": rank}})
        events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": STEP_TID,
                       "args": {"name": "steps"}})
    body: list[dict[str, Any]] = []
    for row in tl.sort(["rank", "t_ns"]).iter_rows(named=True):
        if row["kind"] == "exit":
            body.append({"ph": "i", "s": "t", "name": "exit", "pid": row["rank"],
                         "tid": STEP_TID, "ts": us(row["t_ns"])})
            continue
        key = (row["rank"], row["tid"] or row["tgid"] or 0, row["channel"] or "?")
        tid = tracks.get(key)
        if tid is None:
            tid = tracks[key] = len(tracks) + 1
            events.append({"ph": "M", "name": "thread_name", "pid": row["rank"], "tid": tid,
                           "args": {"name": f"{key[2]} tid {key[1]}"}})
        dur = row["dur_ns"]
        args: dict[str, Any] = {}
        if dur is None:
            dur = max(0, ends.get(row["host"], row["t_ns"]) - row["t_ns"])
            args["in_flight"] = True
        name = row["name"] or "?"
        if row["kind"] == "collective":
            s = gseq.get((row["rank"], row["t_ns"], row["comm"] or row["channel"]), row["seq"])
            name = f"{row['op']} #{s}"
            args.update({"call": row["name"], "comm": row["comm"], "seq": s,
                         "bytes": row["bytes"]})
        elif row["kernel"]:
            args["kernel"] = row["kernel"]
        if row["bytes"] is not None and "bytes" not in args:
            args["bytes"] = row["bytes"]
        body.append({"ph": "X", "name": name, "cat": row["channel"] or "?", "pid": row["rank"],
                     "tid": tid, "ts": us(row["t_ns"]), "dur": round(dur / 1000.0, 3),
                     "args": args})
    for row in steps.iter_rows(named=True):
        body.append({"ph": "X", "name": f"step {row['step']}", "cat": "step", "pid": row["rank"],
                     "tid": STEP_TID, "ts": us(row["start_ns"]),
                     "dur": round(row["step_time_ns"] / 1000.0, 3),
                     "args": {"step": row["step"]}})
    for f in report.get("findings") or []:
        t = f.get("start_ns") or f.get("window_start_ns")
        if t is None:
            t = max(ends.values()) if ends else origin
        body.append({"ph": "i", "s": "g", "name": f"{f['kind']} ({f['severity']})",
                     "pid": 0, "tid": STEP_TID, "ts": us(t),
                     "args": {"summary": f["summary"]}})
    body.sort(key=lambda e: (e["pid"], e["tid"], e["ts"], -e.get("dur", 0)))
    return {
        "traceEvents": events + body,
        "displayTimeUnit": "ms",
        "metadata": {
            "origin_wall_ns": origin,
            "report_schema": report.get("schema"),
            "clock_offsets_ns": offsets,
        },
    }


def write_chrome_trace(path: str, recordings: Sequence[Recording], report=None) -> int:
    """Write the trace JSON to `path`; return the number of trace events.

    The JSON goes to a temporary file next to `path`, renamed over it once complete: a
    failure (disk full, a file too large) leaves no partial trace, and an existing `path`
    untouched. A `path` that exists and is no regular file (a FIFO, /dev/stdout) is written
    directly."""
    trace = chrome_trace(recordings, report)
    target = Path(path)
    if target.exists() and not target.is_file():
        with open(target, "w") as fh:
            json.dump(trace, fh)
        return len(trace["traceEvents"])
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(trace, fh)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(trace["traceEvents"])
