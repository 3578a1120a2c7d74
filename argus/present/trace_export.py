"""The timeline every trace format writes: per rank, named tracks of strictly nested slices.

`build_trace(recordings, report)` returns a `Trace`: the findings and, per rank (`RankPart`,
built when asked for, one rank at a time), its tracks and one frame of its events sorted by
(track, start, longest first). Tracks: a `steps` track per rank (one slice per detected
step, the rank's exit as an instant) and one track per (thread, channel) of its calls.

What becomes what:
- a call with a duration is a slice [entry, entry + dur_ns];
- a call the recording marks in flight (`in_flight` true: entered, not returned when the
  recording ended) is a slice from its entry to the end of the recording, `in_flight` set;
- a call recorded at entry only (`dur_ns` null, not in flight: launches, event records, ...)
  is an instant at its entry: it has no duration to show, and none is invented;
- a device record (kernel, copy, NCCL kernel channel) is always a slice [device start,
  device start + dur_ns] on its device track, category `gpu`: kernels named by the kernel,
  copies by kind, collectives "<NCCL op> #<coll_seq>" (p2p "<op> peer <peer>") with args
  op, coll_seq, comm_hash (hex), bytes, channel (and peer); copies with bytes.

Strict nesting per track: walking a track's slices in order (start, longest first) with a
stack of open slices, a slice that starts inside the innermost open one but would end after
it is cut at that end (`clipped` set). So a slice either contains another or is disjoint,
and is never longer than the call it represents. `RankPart.max_depth` is the deepest
nesting seen per track (1 = no slice inside another).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import polars as pl

from argus.analyze.diagnosis import diagnose
from argus.analyze.matching import align_seq, collectives
from argus.analyze.steps import detect_steps
from argus.analyze.timeline import build_kernels, build_timeline, recording_end_ns
from argus.recording.io import Recording

STEP_TID = 0
DEVICE_CAT = "gpu"  # the category of every device slice
# Columns of RankPart.events. end_ns null = an instant.
EVENT_COLUMNS = ("track", "ts_ns", "end_ns", "name", "cat", "in_flight", "clipped", "call",
                 "kernel", "comm", "seq", "bytes", "step", "op", "coll_seq", "comm_hash",
                 "channel", "peer")
# The argument columns a writer attaches, host calls / device records (nulls left out).
HOST_ARGS = ("call", "comm", "seq", "bytes", "kernel", "step")
# (A kernel's stream is in its track's name; its CUPTI correlation id is not exported: no
# host call carries it, and a per-kernel value would make every kernel packet distinct.)
DEVICE_ARGS = ("op", "coll_seq", "comm_hash", "bytes", "channel", "peer")


@dataclass(frozen=True)
class Track:
    """One timeline row: `uuid` unique in the trace (> 0), `tid` the Chrome thread id inside
    the rank's process (0 = the steps track)."""

    uuid: int
    rank: int
    tid: int
    name: str


@dataclass
class RankPart:
    rank: int
    name: str  # "rank N (host, tgid T)"
    tracks: list[Track]
    events: pl.DataFrame  # EVENT_COLUMNS, sorted by (track, ts_ns, end_ns descending)
    max_depth: dict[int, int] = field(default_factory=dict)  # track uuid -> deepest nesting
    clipped: int = 0


@dataclass
class Finding:
    name: str
    ts_ns: int
    summary: str


@dataclass
class Trace:
    origin_ns: int  # the earliest event, aligned wall ns
    end_ns: int  # the latest recording end (or event), aligned wall ns
    ranks: list[int]
    n_events: int  # timeline rows with a rank (calls, exits, device records), before steps
    findings: list[Finding]
    offsets_ns: dict[str, int]
    report_schema: str | None
    _tl: pl.DataFrame
    _steps: pl.DataFrame
    _gseq: pl.DataFrame
    _ends: dict[str, int]
    _kern: pl.DataFrame

    def parts(self) -> Iterator[RankPart]:
        """The ranks in order, each built when reached (the previous one can be freed)."""
        uuid = 1
        for rank in self.ranks:
            part = _rank_part(self, rank, uuid)
            uuid = part.tracks[-1].uuid + 1
            yield part


def build_trace(recordings: Sequence[Recording], report: dict[str, Any] | None = None) -> Trace:
    """Align the recordings into one timeline (see the module doc); `report` defaults to
    `diagnose(recordings)`."""
    report = report if report is not None else diagnose(recordings)
    offsets = (report.get("clock_alignment") or {}).get("offsets_ns") or {}
    tl = build_timeline(recordings, offsets).filter(pl.col("rank").is_not_null())
    kern = build_kernels(recordings, offsets).filter(pl.col("rank").is_not_null())
    coll = align_seq(collectives(tl))
    steps = detect_steps(tl, coll).steps
    ends = {r.host: (recording_end_ns(r) or 0) + offsets.get(r.host, 0) for r in recordings}
    starts = [int(f["t_ns"].min()) for f in (tl, kern) if f.height]
    origin = min(starts) if starts else 0
    gseq = (coll.select("rank", "t_ns", "comm", "gseq").unique(["rank", "t_ns", "comm"])
            if coll.height else pl.DataFrame(schema={"rank": pl.Int32, "t_ns": pl.Int64,
                                                     "comm": pl.Utf8, "gseq": pl.Int64}))
    last = max(ends.values()) if ends else origin
    if kern.height:
        last = max(last, int(kern.select((pl.col("t_ns") + pl.col("dur_ns").fill_null(0))
                                         .max()).item()))
    findings = []
    for f in report.get("findings") or []:
        t = f.get("start_ns") or f.get("window_start_ns")
        findings.append(Finding(f"{f['kind']} ({f['severity']})", int(last if t is None else t),
                                str(f.get("summary", ""))))
    ranks = sorted(set(tl["rank"].unique().to_list()) | set(kern["rank"].unique().to_list()))
    return Trace(origin, last, ranks, tl.height + kern.height, findings, offsets,
                 report.get("schema"), tl, steps, gseq, ends, kern)


def _rank_part(trace: Trace, rank: int, first_uuid: int) -> RankPart:
    tl = trace._tl.filter(pl.col("rank") == rank).sort("t_ns", maintain_order=True)
    kern = trace._kern.filter(pl.col("rank") == rank)
    tgid, host = (tl if tl.height else kern).select("tgid", "host").row(0)
    name = f"rank {rank} ({host}, tgid {tgid})"
    # tracks in the order their first call appears; uuid first_uuid is the steps track
    calls = tl.filter(pl.col("kind") != "exit").with_columns(
        pl.coalesce(pl.col("tid"), pl.col("tgid"), pl.lit(0)).alias("_tid"),
        pl.col("channel").fill_null("?").alias("cat"),
    )
    keys = calls.select("_tid", "cat").unique(maintain_order=True)
    tracks = [Track(first_uuid, rank, STEP_TID, "steps")]
    tracks += [Track(first_uuid + 1 + i, rank, 1 + i, f"{c} tid {t}")
               for i, (t, c) in enumerate(keys.rows())]
    keys = keys.with_columns(pl.Series("track", [t.uuid for t in tracks[1:]], pl.Int64))
    end_of_rec = pl.col("host").replace_strict(trace._ends, default=None, return_dtype=pl.Int64)
    calls = calls.join(keys, on=["_tid", "cat"], how="left", maintain_order="left")
    calls = calls.join(trace._gseq, left_on=["rank", "t_ns", pl.col("comm").fill_null(
        pl.col("channel"))], right_on=["rank", "t_ns", "comm"], how="left", maintain_order="left")
    is_coll = pl.col("kind") == "collective"
    in_flight = pl.col("dur_ns").is_null() & pl.col("in_flight")
    seq = pl.coalesce(pl.col("gseq"), pl.col("seq"))
    ev = calls.select(
        pl.col("track"),
        pl.col("t_ns").alias("ts_ns"),
        pl.when(pl.col("dur_ns").is_not_null()).then(pl.col("t_ns") + pl.col("dur_ns"))
        .when(in_flight).then(pl.max_horizontal(end_of_rec.fill_null(pl.col("t_ns")),
                                                pl.col("t_ns")))
        .otherwise(None).alias("end_ns"),
        pl.when(is_coll).then(pl.format("{} #{}", pl.col("op"), seq))
        .otherwise(pl.col("name").fill_null("?")).alias("name"),
        pl.col("cat"),
        in_flight.alias("in_flight"),
        pl.lit(False).alias("clipped"),
        pl.when(is_coll).then(pl.col("name")).alias("call"),
        pl.when(~is_coll).then(pl.col("kernel")).alias("kernel"),
        pl.when(is_coll).then(pl.col("comm")).alias("comm"),
        pl.when(is_coll).then(seq).alias("seq"),
        pl.col("bytes"),
        pl.lit(None, pl.Int64).alias("step"),
        pl.lit(None, pl.Utf8).alias("op"),
        pl.lit(None, pl.Int64).alias("coll_seq"),
        pl.lit(None, pl.Utf8).alias("comm_hash"),
        pl.lit(None, pl.Int64).alias("channel"),
        pl.lit(None, pl.Int64).alias("peer"),
    )
    step_uuid = tracks[0].uuid
    exits = tl.filter(pl.col("kind") == "exit").select(
        pl.lit(step_uuid, pl.Int64).alias("track"), pl.col("t_ns").alias("ts_ns"),
        pl.lit(None, pl.Int64).alias("end_ns"), pl.lit("exit").alias("name"),
        pl.lit("proc").alias("cat"))
    st = trace._steps.filter(pl.col("rank") == rank) if trace._steps.height else None
    dev_tracks, dev = _device_events(kern, rank, tracks[-1].uuid + 1, tracks[-1].tid + 1)
    tracks += dev_tracks
    parts = [ev, exits] + ([dev] if dev.height else [])
    if st is not None and st.height:
        parts.append(st.select(
            pl.lit(step_uuid, pl.Int64).alias("track"), pl.col("start_ns").alias("ts_ns"),
            (pl.col("start_ns") + pl.col("step_time_ns")).alias("end_ns"),
            pl.format("step {}", pl.col("step")).alias("name"), pl.lit("step").alias("cat"),
            pl.col("step").cast(pl.Int64).alias("step")))
    events = pl.concat(parts, how="diagonal_relaxed").with_columns(
        pl.col("in_flight").fill_null(False), pl.col("clipped").fill_null(False),
    ).select(EVENT_COLUMNS).sort(["track", "ts_ns", "end_ns"], descending=[False, False, True],
                                 nulls_last=True, maintain_order=True)
    events, depth, clipped = nest(events)
    return RankPart(rank, name, tracks, events, depth, clipped)


def _device_events(kern: pl.DataFrame, rank: int, first_uuid: int,
                   first_tid: int) -> tuple[list[Track], pl.DataFrame]:
    """The device tracks of one rank's `kernels` rows (module doc), in the order: kernel
    streams, copy streams, NCCL (communicator, channel); each sorted by its numbers."""
    if kern.height == 0:
        return [], pl.DataFrame()
    is_nccl = pl.col("kind").is_in(["coll", "p2p"])
    is_copy = pl.col("kind").is_in(["memcpy", "memset"])
    kern = kern.with_columns(
        pl.when(is_nccl).then(2).when(is_copy).then(1).otherwise(0).alias("_g"),
        pl.when(is_nccl).then(pl.col("comm_hash")).alias("_h"),
        pl.when(is_nccl).then(-1).otherwise(pl.col("device").fill_null(-1)).cast(pl.Int64)
        .alias("_a"),
        pl.when(is_nccl).then(pl.col("channel").fill_null(-1))
        .otherwise(pl.col("stream").fill_null(-1)).cast(pl.Int64).alias("_b"),
    )
    keys = kern.select("_g", "_h", "_a", "_b").unique().sort("_g", "_h", "_a", "_b",
                                                              nulls_last=True)
    one_device = kern.filter(~is_nccl)["device"].n_unique() <= 1
    tracks = []
    for i, (g, h, a, b) in enumerate(keys.rows()):
        if g == 2:
            label = f"NCCL comm {_hex(h)} channel {b}"
        else:
            label = ("" if one_device else f"{a} ") + f"stream {b}" + \
                (" memcpy/memset" if g == 1 else "")
        tracks.append(Track(first_uuid + i, rank, first_tid + i, f"rank {rank} GPU {label}"))
    keys = keys.with_columns(pl.Series("track", [t.uuid for t in tracks], pl.Int64))
    kern = kern.join(keys, on=["_g", "_h", "_a", "_b"], how="left", maintain_order="left",
                     nulls_equal=True)
    hexes = {h: _hex(h) for h in kern["_h"].drop_nulls().unique().to_list()}
    nccl = pl.col("_g") == 2
    name = (pl.when(pl.col("kind") == "p2p")
            .then(pl.format("{} peer {}", pl.col("name"), pl.col("peer")))
            .when(nccl).then(pl.format("{} #{}", pl.col("name"), pl.col("coll_seq")))
            .when(pl.col("name").fill_null("") == "").then(pl.col("kind"))
            .otherwise(pl.col("name")))
    ev = kern.select(
        pl.col("track"),
        pl.col("t_ns").alias("ts_ns"),
        (pl.col("t_ns") + pl.col("dur_ns").fill_null(0).clip(0)).alias("end_ns"),
        name.fill_null("?").alias("name"),
        pl.lit(DEVICE_CAT).alias("cat"),
        pl.lit(False).alias("in_flight"),
        pl.lit(False).alias("clipped"),
        pl.col("bytes"),
        pl.when(nccl).then(pl.col("name")).alias("op"),
        pl.when(nccl).then(pl.col("coll_seq")).alias("coll_seq"),
        pl.col("_h").replace_strict(hexes, default=None, return_dtype=pl.Utf8)
        .alias("comm_hash"),
        pl.when(nccl).then(pl.col("channel").cast(pl.Int64)).alias("channel"),
        pl.when(pl.col("kind") == "p2p").then(pl.col("peer").cast(pl.Int64)).alias("peer"),
    )
    return tracks, ev


def _hex(h: int | None) -> str:
    return "?" if h is None else f"0x{h:016x}"


def nest(events: pl.DataFrame) -> tuple[pl.DataFrame, dict[int, int], int]:
    """Cut slices that partially overlap the innermost open slice of their track (module
    doc); return the frame, the deepest nesting per track and how many were cut. `events`
    is sorted by (track, ts_ns, end_ns descending)."""
    sl = events.with_row_index("_i").filter(pl.col("end_ns").is_not_null())
    depth: dict[int, int] = {}
    if sl.height == 0:
        return events, depth, 0
    idx = sl["_i"].to_numpy()
    track = sl["track"].to_numpy()
    ts = sl["ts_ns"].to_numpy()
    end = sl["end_ns"].to_numpy().copy()
    cut = np.zeros(len(end), dtype=bool)
    stack: list[int] = []
    cur = None
    deepest = 0
    for i, (k, t, e) in enumerate(zip(track.tolist(), ts.tolist(), end.tolist(), strict=True)):
        if k != cur:
            if cur is not None:
                depth[cur] = deepest
            cur, stack, deepest = k, [], 0
        while stack and stack[-1] <= t:
            stack.pop()
        if stack and e > stack[-1]:
            e = stack[-1]
            end[i] = e
            cut[i] = True
        stack.append(e)
        deepest = max(deepest, len(stack))
    depth[cur] = deepest
    n_cut = int(cut.sum())
    if n_cut:
        at = idx[cut]
        new_end = events["end_ns"].clone().scatter(at, end[cut])
        new_cut = events["clipped"].clone().scatter(at, True)
        events = events.with_columns(new_end, new_cut)
    return events, depth, n_cut


def args_of(row: dict[str, Any]) -> dict[str, Any]:
    """The arguments a writer attaches to an event row (nulls and false flags left out)."""
    out: dict[str, Any] = {}
    for k in DEVICE_ARGS if row["cat"] == DEVICE_CAT else HOST_ARGS:
        v = row[k]
        if v is not None:
            out[k] = v
    if row["in_flight"]:
        out["in_flight"] = True
    if row["clipped"]:
        out["clipped"] = True
    return out


def write_atomically(path: str, mode: str, write: Callable[[IO[Any]], int]) -> int:
    """Open a temporary file next to `path` in `mode` ("w" or "wb"), call `write` on it and
    rename it over `path`; return what `write` returned. On any failure the temporary file
    is removed and `path` left as it was. A `path` that exists and is no regular file (a
    FIFO, /dev/stdout) is written directly."""
    target = Path(path)
    if target.exists() and not target.is_file():
        with open(target, mode) as fh:
            return write(fh)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as fh:
            n = write(fh)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


PROGRESS_MIN_EVENTS = 200_000  # plain progress lines only for exports at least this large


class ExportProgress:
    """Progress of an export on `stream` (stderr): a rich progress bar when it is a terminal,
    else plain lines ("export: rank 2/4, 1.2 M events, 3.1 s"), at most one per `every_s`,
    and only once `large()` said the export has at least PROGRESS_MIN_EVENTS events; `done`
    prints the one closing line either way."""

    def __init__(self, stream: IO[str], every_s: float = 1.0, clock=None):
        import time

        self.stream = stream
        self.clock = clock or time.monotonic
        self.t0 = self.clock()
        self.last = self.t0
        self.every_s = every_s
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.show = self.tty
        self._bar = None
        self._task = None

    def large(self, n_events: int) -> None:
        """Say how many events the export has; a large one shows its progress."""
        self.show = self.tty or n_events >= PROGRESS_MIN_EVENTS
        if self.tty:
            self._start_bar()
            self._bar.update(self._task, total=max(1, n_events))

    def _start_bar(self) -> None:
        if self._bar is not None:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("export: {task.description}"), BarColumn(),
                             TextColumn("{task.completed:,} events"), TimeElapsedColumn(),
                             console=Console(file=self.stream), transient=True)
        self._task = self._bar.add_task("starting", total=None)
        self._bar.start()

    def phase(self, text: str) -> None:
        """A step before the events are written ("diagnosing")."""
        if self.tty:
            self._start_bar()
        if not self.show and not self.tty:
            return
        if self._bar is not None:
            self._bar.update(self._task, description=text)
        else:
            self._line(text)

    def __call__(self, rank_index: int, ranks: int, events: int) -> None:
        if not self.show:
            return
        text = f"rank {rank_index}/{ranks}, {_count(events)} events"
        if self._bar is not None:
            self._bar.update(self._task, description=text, completed=events)
        elif self.clock() - self.last >= self.every_s:
            self._line(text)

    def _line(self, text: str) -> None:
        self.last = self.clock()
        self.stream.write(f"export: {text}, {self.last - self.t0:.1f} s\n")
        self.stream.flush()

    def done(self, path: str, size_bytes: int | None, events: int, fmt: str) -> None:
        """The closing line: file, size, events, format and time."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        size = "" if size_bytes is None else f"{_size(size_bytes)}, "
        self.stream.write(f"argus: wrote {events} trace events to {path} "
                          f"({size}{fmt}, {self.clock() - self.t0:.1f} s)\n")
        self.stream.flush()

    def close(self) -> None:
        """Stop the bar (after a failure) without the closing line."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1_000_000 else f"{n / 1e3:.1f} k" if n >= 1000 else str(n)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
