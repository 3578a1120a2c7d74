"""Perfetto native trace export: TrackEvent protobuf, written packet by packet.

The same timeline as the Chrome export (`trace_export.build_trace`), as a `.pftrace` the
Perfetto UI and trace_processor read directly, with far less memory and size than JSON.
Tracks: per rank a root track "rank N (host, tgid T)" (ordered by rank) with its child
tracks "steps", "<channel> tid <tid>" and the device tracks "rank N GPU stream S", ...
(ordered as in the Chrome export); a global
"findings" track. Slices are TYPE_SLICE_BEGIN / TYPE_SLICE_END pairs, entry-only calls
TYPE_INSTANT. Each track is its own packet sequence (`trusted_packet_sequence_id` = the
track's uuid), so every sequence's timestamps only grow; event names, categories and
argument names/strings are interned per sequence. Timestamps are aligned wall-clock ns
(absolute, not relative). Arguments are debug annotations with the Chrome export's names
(call, comm, seq, bytes, kernel, step, in_flight, clipped; summary on findings; device
slices: op, coll_seq, comm_hash, bytes, channel, peer).

Written one packet at a time (memory bounded by one rank's frame): each distinct packet is
built with the `perfetto` package's protos and serialized, only the timestamp varint and the
`Trace.packet` framing are added by hand, and the serialized bytes of a packet that
interned nothing new are reused for the next identical one (same type, name, category and
arguments on the track): that makes the launch-heavy bulk ~3x cheaper than building every
packet. Track descriptors go through the package's `StreamingTraceProtoBuilder`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO

from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import (
    TracePacket,
    TrackDescriptor,
    TrackEvent,
)
from perfetto.trace_builder.proto_builder import StreamingTraceProtoBuilder

from argus.present.trace_export import (
    DEVICE_ARGS,
    DEVICE_CAT,
    EVENT_COLUMNS,
    HOST_ARGS,
    Trace,
    build_trace,
    write_atomically,
)
from argus.recording.io import Recording

CHUNK_ROWS = 50_000
ROOT_UUID = 1 << 32  # + rank: the rank's root track
FINDINGS_UUID = (1 << 33) + 1
FINDINGS_SEQ = (1 << 31) + 1
Progress = Callable[[int, int, int], None]  # (rank index from 1, ranks, events so far)

CLEARED = TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
NEEDS = TracePacket.SEQ_NEEDS_INCREMENTAL_STATE
BEGIN, END, INSTANT = TrackEvent.TYPE_SLICE_BEGIN, TrackEvent.TYPE_SLICE_END, \
    TrackEvent.TYPE_INSTANT
ARG_NAMES = ("call", "comm", "seq", "bytes", "kernel", "step", "in_flight", "clipped",
             "summary", "op", "coll_seq", "comm_hash", "channel", "peer")
ARG_IID = {n: i for i, n in enumerate(ARG_NAMES, 1)}
STRING_ARGS = ("call", "comm", "kernel", "summary", "op", "comm_hash")
_COL = {c: i for i, c in enumerate(EVENT_COLUMNS)}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(128)]
_HIGH: dict[int, bytes] = {}


def _ts_varint(n: int) -> bytes:
    """`_varint(n)`, faster for timestamps: the groups above bit 28 (the same for seconds
    on end) come from a table."""
    hi = n >> 28
    if not hi:
        return _varint(n)
    tail = _HIGH.get(hi)
    if tail is None:
        if len(_HIGH) > 65536:
            _HIGH.clear()
        tail = _HIGH[hi] = _varint(hi)
    return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, ((n >> 14) & 0x7F) | 0x80,
                  ((n >> 21) & 0x7F) | 0x80)) + tail


class _Out:
    """Framed packets (`Trace.packet`, field 1) buffered into the file, and the package's
    streaming builder for the packets built whole (track descriptors)."""

    def __init__(self, fh: IO[bytes]):
        self.fh = fh
        self.builder = StreamingTraceProtoBuilder(fh)
        self.buf: list[bytes] = []

    def packet(self, data: bytes) -> None:
        n = len(data)
        self.buf.append(b"\x0a" + (_SMALL[n] if n < 128 else _varint(n)) + data)
        if len(self.buf) >= 8192:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.fh.write(b"".join(self.buf))
            self.buf = []

    def whole(self, p: TracePacket) -> None:
        self.flush()
        self.builder.write_packet(p)


class _Sequence:
    """One packet sequence: its id, first-packet flag and interning tables.

    A packet is built with the perfetto protos and serialized without its timestamp; the
    timestamp (field 8, a varint) is prepended to those bytes. Packets that interned nothing
    new are the same bytes every time for the same (type, name, category, arguments), so
    those bytes are kept (at most CACHE entries) and reused: most events are launches of a
    few kernels on one track.
    """

    CACHE = 4096

    def __init__(self, out: _Out, seq_id: int):
        self.out = out
        self.id = seq_id
        self.first = True
        self.names: dict[str, int] = {}
        self.cats: dict[str, int] = {}
        self.strings: dict[str, int] = {}
        self.cache: dict[tuple, bytes] = {}

    def intern(self, p: TracePacket, table: dict[str, int], kind: str, value: str) -> int:
        iid = table.get(value)
        if iid is None:
            iid = table[value] = len(table) + 1
            getattr(p.interned_data, kind).add(iid=iid, **{
                "event_categories": {"name": value}, "event_names": {"name": value},
                "debug_annotation_string_values": {"str": value.encode()}}[kind])
        return iid

    def _build(self, track: int, typ: int, name: str | None, cat: str | None,
               args: tuple) -> tuple[bytes, bool]:
        p = TracePacket()
        p.trusted_packet_sequence_id = self.id
        if self.first:
            p.sequence_flags = CLEARED | NEEDS
            for n, i in ARG_IID.items():
                p.interned_data.debug_annotation_names.add(iid=i, name=n)
            self.first = False
        else:
            p.sequence_flags = NEEDS
        te = p.track_event
        te.type = typ
        te.track_uuid = track
        if name is not None:
            te.name_iid = self.intern(p, self.names, "event_names", name)
        if cat is not None:
            te.category_iids.append(self.intern(p, self.cats, "event_categories", cat))
        for k, v in args:
            a = te.debug_annotations.add()
            a.name_iid = ARG_IID[k]
            if k in STRING_ARGS:
                a.string_value_iid = self.intern(p, self.strings,
                                                 "debug_annotation_string_values", str(v))
            elif isinstance(v, bool):
                a.bool_value = v
            else:
                a.int_value = int(v)
        return p.SerializeToString(), p.HasField("interned_data")

    def event(self, ts: int, track: int, typ: int, name: str | None = None,
              cat: str | None = None, args: tuple = ()) -> None:
        key = (typ, name, cat, args)
        body = self.cache.get(key)
        if body is None:
            body, interned = self._build(track, typ, name, cat, args)
            if not interned:
                if len(self.cache) >= self.CACHE:
                    self.cache.clear()
                self.cache[key] = body
        self.out.packet(b"\x40" + _ts_varint(ts) + body)


def _describe(out: _Out, uuid: int, name: str, parent: int | None, order: int) -> None:
    p = out.builder.create_packet()
    d = p.track_descriptor
    d.uuid = uuid
    d.name = name
    if parent is not None:
        d.parent_uuid = parent
    d.child_ordering = TrackDescriptor.EXPLICIT
    d.sibling_order_rank = order
    out.whole(p)


_ARG_COLS = tuple((k, _COL[k]) for k in HOST_ARGS)
_DEV_ARG_COLS = tuple((k, _COL[k]) for k in DEVICE_ARGS)
_I_FLIGHT, _I_CLIPPED, _I_CAT = _COL["in_flight"], _COL["clipped"], _COL["cat"]


def _args(row: tuple) -> tuple:
    cols = _DEV_ARG_COLS if row[_I_CAT] == DEVICE_CAT else _ARG_COLS
    out = tuple((k, row[i]) for k, i in cols if row[i] is not None)
    if row[_I_FLIGHT]:
        out += (("in_flight", True),)
    if row[_I_CLIPPED]:
        out += (("clipped", True),)
    return out


def dump_perfetto(trace: Trace, fh: IO[bytes], progress: Progress | None = None) -> int:
    """Write `trace` to the binary file `fh` (module doc); return the number of trace events
    (slices and instants, each counted once)."""
    b = _Out(fh)
    n = 0
    i_track, i_ts, i_end, i_name, i_cat = (_COL[c] for c in
                                           ("track", "ts_ns", "end_ns", "name", "cat"))
    for i, part in enumerate(trace.parts(), 1):
        root = ROOT_UUID + part.rank
        _describe(b, root, part.name, None, part.rank)
        for t in part.tracks:
            _describe(b, t.uuid, t.name, root, t.tid)
        seq: _Sequence | None = None
        stack: list[int] = []
        for chunk in part.events.iter_slices(CHUNK_ROWS):
            for row in chunk.iter_rows():
                track = row[i_track]
                if seq is None or seq.id != track:
                    while stack and seq is not None:
                        seq.event(stack.pop(), seq.id, END)
                    seq = _Sequence(b, track)
                ts, end = row[i_ts], row[i_end]
                while stack and stack[-1] <= ts:
                    seq.event(stack.pop(), track, END)
                seq.event(ts, track, INSTANT if end is None else BEGIN, row[i_name],
                          row[i_cat], _args(row))
                if end is not None:
                    stack.append(end)
            n += chunk.height
            if progress:
                progress(i, len(trace.ranks), n)
        while stack and seq is not None:
            seq.event(stack.pop(), seq.id, END)
    if trace.findings:
        _describe(b, FINDINGS_UUID, "findings", None, -1)
        seq = _Sequence(b, FINDINGS_SEQ)
        for f in sorted(trace.findings, key=lambda f: f.ts_ns):
            seq.event(f.ts_ns, FINDINGS_UUID, INSTANT, f.name, "finding",
                      (("summary", f.summary),))
            n += 1
    b.flush()
    return n


def write_perfetto_trace(path: str, recordings: Sequence[Recording], report=None,
                         progress: Progress | None = None) -> int:
    """Write the Perfetto trace to `path` (atomically, as `chrome.write_chrome_trace`);
    return the number of trace events."""
    trace = build_trace(recordings, report)
    return write_atomically(path, "wb", lambda fh: dump_perfetto(trace, fh, progress))
