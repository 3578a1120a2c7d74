"""Read an exported trace back (Perfetto protobuf or Chrome JSON) and check every track.

`read_perfetto(path)` / `read_chrome(obj)` return {(group, track name): TrackOut}: the
slices (start, end, name, depth from 1) and instants of each track, rebuilt from the
file alone. `read_perfetto` decodes with the perfetto package's own protos and fails on a
malformed stream (an end without a begin, a slice never ended, time going back on a
sequence). `read_chrome` fails on a partial overlap of two complete events on one track.
`check_tracks` asserts the nesting depth; `check_calls` that every slice is a call that had
a duration (or was in flight) and lasts no longer than it, and every instant an entry-only
call; `check_kernels` that every device track ("rank R GPU ...") holds exactly the
recording's device records of that rank and stream / communicator channel, each a slice at
its device start lasting exactly its `dur_ns`, named and with args as the export promises,
none overlapping another on its track.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TracePacket, TrackEvent

from argus.analyze.timeline import build_kernels, build_timeline, recording_end_ns

DEVICE_TRACK = " GPU "  # in the name of every device track, never in a host track's


@dataclass
class Slice:
    ts: float
    end: float
    name: str
    depth: int
    args: dict = field(default_factory=dict)


@dataclass
class TrackOut:
    slices: list[Slice] = field(default_factory=list)
    instants: list[tuple[float, str, dict]] = field(default_factory=list)

    @property
    def max_depth(self) -> int:
        return max((s.depth for s in self.slices), default=0)


def _ann(a, names, strings) -> tuple[str, object]:
    name = names[a.name_iid] if a.HasField("name_iid") else a.name
    for f in ("bool_value", "int_value", "uint_value", "double_value", "string_value"):
        if a.HasField(f):
            return name, getattr(a, f)
    if a.HasField("string_value_iid"):
        return name, strings[a.string_value_iid]
    raise AssertionError(f"annotation {name} has no value")


def read_perfetto(path) -> dict[tuple[str, str], TrackOut]:
    """Rebuild every track of a TrackEvent trace (see the module doc)."""
    with open(path, "rb") as fh:
        trace = Trace.FromString(fh.read())
    desc: dict[int, tuple[str, int | None]] = {}
    interned: dict[int, dict[str, dict[int, str]]] = {}
    last_ts: dict[int, int] = {}
    stacks: dict[int, list[tuple[int, str, dict]]] = {}
    raw: dict[int, TrackOut] = {}
    for p in trace.packet:
        if p.HasField("track_descriptor"):
            d = p.track_descriptor
            desc[d.uuid] = (d.name, d.parent_uuid if d.HasField("parent_uuid") else None)
            continue
        if not p.HasField("track_event"):
            continue
        seq = p.trusted_packet_sequence_id
        if p.sequence_flags & TracePacket.SEQ_INCREMENTAL_STATE_CLEARED:
            interned[seq] = {"names": {}, "cats": {}, "args": {}, "strings": {}}
        assert seq in interned, f"sequence {seq} uses interned state it never cleared"
        tab = interned[seq]
        i = p.interned_data
        tab["names"].update({e.iid: e.name for e in i.event_names})
        tab["cats"].update({e.iid: e.name for e in i.event_categories})
        tab["args"].update({e.iid: e.name for e in i.debug_annotation_names})
        tab["strings"].update({e.iid: e.str.decode() for e in i.debug_annotation_string_values})
        assert p.timestamp >= last_ts.get(seq, 0), f"time goes back on sequence {seq}"
        last_ts[seq] = p.timestamp
        te = p.track_event
        track = te.track_uuid
        out = raw.setdefault(track, TrackOut())
        stack = stacks.setdefault(track, [])
        if te.type == TrackEvent.TYPE_SLICE_END:
            assert stack, f"slice end without a begin on track {track} at {p.timestamp}"
            ts, name, args = stack.pop()
            out.slices.append(Slice(ts, p.timestamp, name, len(stack) + 1, args))
            continue
        name = tab["names"][te.name_iid] if te.HasField("name_iid") else te.name
        args = dict(_ann(a, tab["args"], tab["strings"]) for a in te.debug_annotations)
        if te.type == TrackEvent.TYPE_SLICE_BEGIN:
            stack.append((p.timestamp, name, args))
        else:
            assert te.type == TrackEvent.TYPE_INSTANT, te.type
            out.instants.append((p.timestamp, name, args))
    for track, stack in stacks.items():
        assert not stack, f"{len(stack)} slice(s) never ended on track {track}"
    tracks = {}
    for uuid, out in raw.items():
        name, parent = desc[uuid]
        group = desc[parent][0] if parent is not None else ""
        assert (group, name) not in tracks, f"two tracks named {group}/{name}"
        out.slices.sort(key=lambda s: (s.ts, -s.end))
        tracks[(group, name)] = out
    return tracks


def read_chrome(obj: dict) -> dict[tuple[str, str], TrackOut]:
    """Every (process, thread) track of a Trace Event Format object; fails on a partial
    overlap of complete events (beyond the 1 ns rounding of microsecond times)."""
    evs = obj["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in evs
             if e["ph"] == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs
               if e["ph"] == "M" and e["name"] == "thread_name"}
    by_track: dict[tuple[int, int], list[dict]] = {}
    tracks: dict[tuple[str, str], TrackOut] = {}
    for e in evs:
        if e["ph"] in "Xi" and e.get("s", "t") == "t":
            by_track.setdefault((e["pid"], e["tid"]), []).append(e)
    for key, lst in by_track.items():
        out = tracks[(procs.get(key[0], str(key[0])), threads.get(key, str(key[1])))] = TrackOut()
        stack: list[float] = []
        for e in sorted(lst, key=lambda e: (e["ts"], -e.get("dur", 0))):
            if e["ph"] == "i":
                out.instants.append((e["ts"], e["name"], e.get("args", {})))
                continue
            end = e["ts"] + e["dur"]
            while stack and stack[-1] <= e["ts"] + 1e-3:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-3, f"partial overlap on {key}: {e}"
            stack.append(end)
            out.slices.append(Slice(e["ts"], end, e["name"], len(stack), e.get("args", {})))
    return tracks


def check_tracks(tracks: dict[tuple[str, str], TrackOut], max_depth: int = 3) -> None:
    """Every track nests at most `max_depth` deep."""
    assert tracks
    deep = {k: t.max_depth for k, t in tracks.items() if t.max_depth > max_depth}
    assert not deep, f"tracks nested deeper than {max_depth}: {deep}"


def check_calls(tracks: dict[tuple[str, str], TrackOut], recordings: Sequence,
                offsets_ns: dict[str, int] | None = None) -> dict[str, int]:
    """Match each slice and instant of a Perfetto export (absolute wall ns) to its recorded
    call by (rank, track, entry time, name); return counts of what was matched."""
    tl = build_timeline(recordings, offsets_ns).filter(pl.col("rank").is_not_null())
    ends = {r.host: recording_end_ns(r) + (offsets_ns or {}).get(r.host, 0) for r in recordings}
    calls: dict[tuple, list] = {}
    for row in tl.filter(pl.col("kind") != "exit").iter_rows(named=True):
        tid = next((v for v in (row["tid"], row["tgid"]) if v is not None), 0)
        track = f"{row['channel'] or '?'} tid {tid}"
        calls.setdefault((row["rank"], track, row["t_ns"]), []).append(row)
    seen = {"slices": 0, "instants": 0, "in_flight": 0, "clipped": 0}
    for (group, name), out in tracks.items():
        if name == "steps" or not group or DEVICE_TRACK in name:
            continue
        rank = int(group.split()[1])
        for s in out.slices:
            rows = calls.get((rank, name, s.ts))
            assert rows, f"slice {s} on {group}/{name} is no recorded call"
            allowed = max(r["dur_ns"] if r["dur_ns"] is not None
                          else ends[r["host"]] - r["t_ns"] if r["in_flight"] else -1
                          for r in rows)
            assert allowed >= 0, f"slice {s} on {group}/{name} is an entry-only call"
            assert s.end - s.ts <= allowed, f"slice {s} longer than its call ({allowed} ns)"
            seen["slices"] += 1
            seen["in_flight"] += bool(s.args.get("in_flight"))
            seen["clipped"] += bool(s.args.get("clipped"))
        for ts, iname, _args in out.instants:
            rows = calls.get((rank, name, ts))
            assert rows and any(r["dur_ns"] is None and not r["in_flight"] for r in rows), \
                f"instant {iname} at {ts} on {group}/{name} is no entry-only call"
            seen["instants"] += 1
    return seen


def _device_track(row: dict, one_device: bool) -> str:
    """The track the export promises a device record (docs/export.md), written here again."""
    r = row["rank"]
    if row["kind"] in ("coll", "p2p"):
        return f"rank {r} GPU NCCL comm 0x{row['comm_hash']:016x} channel {row['channel']}"
    dev = "" if one_device else f"{row['device']} "
    copy = " memcpy/memset" if row["kind"] in ("memcpy", "memset") else ""
    return f"rank {r} GPU {dev}stream {row['stream']}{copy}"


def _device_name(row: dict) -> str:
    if row["kind"] == "p2p":
        return f"{row['name']} peer {row['peer']}"
    if row["kind"] == "coll":
        return f"{row['name']} #{row['coll_seq']}"
    return row["name"] or row["kind"]


def check_kernels(tracks: dict[tuple[str, str], TrackOut], recordings: Sequence,
                  offsets_ns: dict[str, int] | None = None,
                  to_ns=lambda t: t) -> dict[tuple[int, str], int]:
    """Every device record of `recordings` is one slice on its device track and every slice
    of a device track is one record: same start (`to_ns` turns the file's time into wall ns:
    identity for Perfetto, `round(us * 1000) + origin` for Chrome), duration exactly
    `dur_ns`, the name and args of the export; no slice nests in another on a device track
    (a stream runs one kernel at a time). Returns the slice count per (rank, track)."""
    kn = build_kernels(recordings, offsets_ns).filter(pl.col("rank").is_not_null())
    want: dict[tuple[int, str], list[dict]] = {}
    for rank in kn["rank"].unique().to_list():
        k = kn.filter(pl.col("rank") == rank)
        one = k.filter(~pl.col("kind").is_in(["coll", "p2p"]))["device"].n_unique() <= 1
        for row in k.iter_rows(named=True):
            want.setdefault((rank, _device_track(row, one)), []).append(row)
    got: dict[tuple[int, str], int] = {}
    for (group, name), out in tracks.items():
        if DEVICE_TRACK not in name:
            continue
        rank = int(name.split()[1])
        assert group.startswith(f"rank {rank} ("), f"device track {name} under {group}"
        assert not out.instants, f"instants on the device track {name}"
        assert out.max_depth == 1, f"slices nest on the device track {name}"
        rows = sorted(want.get((rank, name), []), key=lambda r: (r["t_ns"], -r["dur_ns"]))
        assert len(out.slices) == len(rows), f"{name}: {len(out.slices)} slices, " \
            f"{len(rows)} records"
        for s, row in zip(out.slices, rows, strict=True):
            ts = to_ns(s.ts)
            assert ts == row["t_ns"], f"{name}: slice at {ts}, record at {row['t_ns']}"
            assert to_ns(s.end) - ts == row["dur_ns"], f"{name}: {s} is not {row['dur_ns']} ns"
            assert s.name == _device_name(row), (s.name, row)
            if row["kind"] in ("coll", "p2p"):
                assert s.args["op"] == row["name"] and s.args["coll_seq"] == row["coll_seq"]
                assert s.args["comm_hash"] == f"0x{row['comm_hash']:016x}"
                assert (s.args["bytes"], s.args["channel"]) == (row["bytes"], row["channel"])
                assert s.args.get("peer") == (row["peer"] if row["kind"] == "p2p" else None)
                assert "stream" not in s.args
            else:
                assert s.args == ({} if row["bytes"] is None else {"bytes": row["bytes"]})
        got[(rank, name)] = len(out.slices)
    missing = set(want) - set(got)
    assert not missing, f"device records without their track: {sorted(missing)}"
    return got
