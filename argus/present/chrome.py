"""Chrome trace export (Trace Event Format JSON), written as it is built.

Layout (`trace_export.build_trace`): one process per rank (`pid` = rank, named
"rank N (host, tgid TGID)"), a "steps" thread (`tid` 0: one slice per detected step, the
rank's exit as an instant) and one thread per (thread, channel) of its calls (`tid` 1, 2, ...
per rank, named "<channel> tid <tid>"), then the rank's device tracks ("rank N GPU stream
S", "rank N GPU stream S memcpy/memset", "rank N GPU NCCL comm H channel C": complete
events of category `gpu`, one per kernel / copy / NCCL kernel channel, with the device
duration). Calls with a duration are complete events
(`ph: "X"`), strictly nested per thread; calls recorded at entry only are thread instants
(`ph: "i"`, `s: "t"`); calls the recording marks in flight end at the recording end
(`args.in_flight`); a slice cut to fit inside its parent has `args.clipped`. Collectives
are named "<op> #<seq>" with args call, comm, seq, bytes. Findings are global instant
events. Times: `ts`/`dur` in microseconds RELATIVE TO THE EARLIEST EVENT (aligned wall
clock); the absolute origin is in `metadata.origin_wall_ns`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from argus.present.trace_export import STEP_TID, Trace, args_of, build_trace, write_atomically
from argus.recording.io import Recording

CHUNK_ROWS = 50_000
Progress = Callable[[int, int, int], None]  # (rank index from 1, ranks, events so far)


def chrome_events(trace: Trace, progress: Progress | None = None) -> Iterator[dict[str, Any]]:
    """The trace events of `trace`, rank by rank (metadata first), then the findings."""
    origin = trace.origin_ns
    n = 0
    for i, part in enumerate(trace.parts(), 1):
        pid = part.rank
        yield {"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
               "args": {"name": part.name}}
        yield {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
               "args": {"sort_index": pid}}
        tid_of = {}
        for t in part.tracks:
            tid_of[t.uuid] = t.tid
            yield {"ph": "M", "name": "thread_name", "pid": pid, "tid": t.tid,
                   "args": {"name": t.name}}
        n += 2 + len(part.tracks)
        for chunk in part.events.iter_slices(CHUNK_ROWS):
            for row in chunk.iter_rows(named=True):
                ts = round((row["ts_ns"] - origin) / 1000.0, 3)
                ev: dict[str, Any] = {"name": row["name"], "cat": row["cat"], "pid": pid,
                                      "tid": tid_of[row["track"]], "ts": ts}
                if row["end_ns"] is None:
                    ev["ph"] = "i"
                    ev["s"] = "t"
                else:
                    ev["ph"] = "X"
                    ev["dur"] = max(0.0, round(round((row["end_ns"] - origin) / 1000.0, 3) - ts,
                                               3))
                args = args_of(row)
                if args:
                    ev["args"] = args
                yield ev
            n += chunk.height
            if progress:
                progress(i, len(trace.ranks), n)
    for f in trace.findings:
        yield {"ph": "i", "s": "g", "name": f.name, "pid": 0, "tid": STEP_TID,
               "ts": round((f.ts_ns - origin) / 1000.0, 3), "args": {"summary": f.summary}}


def _metadata(trace: Trace) -> dict[str, Any]:
    return {"origin_wall_ns": trace.origin_ns, "report_schema": trace.report_schema,
            "clock_offsets_ns": trace.offsets_ns}


def chrome_trace(
    recordings: Sequence[Recording], report: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The whole trace object in memory (see module doc; for tests and small recordings).
    `report` defaults to `diagnose(recordings)`."""
    trace = build_trace(recordings, report)
    return {"traceEvents": list(chrome_events(trace)), "displayTimeUnit": "ms",
            "metadata": _metadata(trace)}


def dump_chrome(trace: Trace, fh: IO[str], progress: Progress | None = None) -> int:
    """Write `trace` as JSON to `fh`, a chunk of events at a time; return the event count."""
    enc = json.JSONEncoder(separators=(",", ":"))
    fh.write('{"traceEvents":[\n')
    n = 0
    buf: list[str] = []
    for ev in chrome_events(trace, progress):
        buf.append(enc.encode(ev))
        n += 1
        if len(buf) >= CHUNK_ROWS:
            fh.write(("," if n > len(buf) else "") + ",\n".join(buf))
            buf = []
    if buf:
        fh.write(("," if n > len(buf) else "") + ",\n".join(buf))
    fh.write('\n],"displayTimeUnit":"ms","metadata":')
    fh.write(enc.encode(_metadata(trace)))
    fh.write("}\n")
    return n


def write_chrome_trace(path: str, recordings: Sequence[Recording], report=None,
                       progress: Progress | None = None) -> int:
    """Write the trace JSON to `path`; return the number of trace events.

    Streamed (bounded memory) into a temporary file next to `path`, renamed over it once
    complete: a failure (disk full, a file too large) leaves no partial trace, and an
    existing `path` untouched. A `path` that exists and is no regular file (a FIFO,
    /dev/stdout) is written directly."""
    trace = build_trace(recordings, report)
    return write_atomically(path, "w", lambda fh: dump_chrome(trace, fh, progress))
