"""Exported timelines Perfetto can show: entry-only calls as instants, strict nesting,
in-flight calls only where the recording says so, the GPU agent's device records as
complete slices on per-rank device tracks, Perfetto protobuf and Chrome JSON read back and
checked track by track."""

from __future__ import annotations

import io
import json
import os
import re

import polars as pl
import pytest
import scenarios
from click.testing import CliRunner
from export_synth import COMM_HASH, KERNEL_FRACTION, synth
from helpers.trace_check import (
    check_calls,
    check_kernels,
    check_tracks,
    read_chrome,
    read_perfetto,
)

from argus.cli import export as export_cmd
from argus.present.chrome import chrome_trace
from argus.present.trace_export import PROGRESS_MIN_EVENTS, ExportProgress, build_trace, nest
from argus.recording.io import Recording, coerce, load_recording, write_recording
from argus.recording.schema import EVENTS_SCHEMA, KERNELS_SCHEMA

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """4 ranks x 2 s, 2,000 entry-only launches/s per rank, rank 3 hung in a synchronize;
    each rank's GPU agent records (kernels on streams 7 and 13, copies, NCCL channels)."""
    d = tmp_path_factory.mktemp("synth") / "rec"
    rec = synth(4, 2.0, 2000, hang_rank=3, kernels=True)[0]
    write_recording(d, rec.manifest, rec.events, rec.stacks, kernels=rec.kernels)
    return d


HASH = f"0x{COMM_HASH:016x}"
# per rank: 40 steps x 100 launches (14 of them cuLaunchKernel: stream 13), one memcpy and
# one memset per step, 3 allreduces per step x 2 channels, one send per step (channel 0)
DEVICE_TRACKS = {"GPU stream 7": 40 * 86, "GPU stream 13": 40 * 14,
                 "GPU stream 7 memcpy/memset": 40 * 2,
                 f"GPU NCCL comm {HASH} channel 0": 40 * 4,
                 f"GPU NCCL comm {HASH} channel 1": 40 * 3}


def _device_counts(got):
    """check_kernels' {(rank, track): slices} -> {rank: {track without the rank: slices}}."""
    out: dict[int, dict[str, int]] = {}
    for (rank, name), n in got.items():
        out.setdefault(rank, {})[name.split(" ", 2)[2]] = n
    return out


def _export(d, out, *extra):
    res = CliRunner().invoke(export_cmd.command, [str(d), "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    return res.stderr


def test_a_4_rank_recording_read_back_has_no_slice_longer_than_its_call(job, tmp_path):
    out = tmp_path / "t.pftrace"
    err = _export(job, out)
    rec = load_recording(job)
    ev = rec.events
    entry_only = ev.filter(pl.col("dur_ns").is_null() & ~pl.col("in_flight")).height
    with_dur = ev.filter(pl.col("dur_ns").is_not_null()).height
    tracks = read_perfetto(out)
    check_tracks(tracks, max_depth=3)
    seen = check_calls(tracks, [rec])
    dev = check_kernels(tracks, [rec])
    assert _device_counts(dev) == {r: DEVICE_TRACKS for r in range(4)}
    assert sum(dev.values()) == rec.kernels.height == 4 * 40 * 109
    # every call is there once: entry-only ones as instants, the others as slices
    assert seen["instants"] == entry_only > 0.8 * ev.height
    assert seen["slices"] == with_dur + 1
    assert (seen["in_flight"], seen["clipped"]) == (1, 0)
    (hung,) = [s for (g, _n), t in tracks.items() if g.startswith("rank 3") for s in t.slices
               if s.args.get("in_flight")]
    assert hung.name == "cudaStreamSynchronize"
    end = rec.manifest["ended_ns"] + rec.manifest["clock"]["mono_to_wall_ns"]
    assert hung.end == end and end - hung.ts == 2_000_000_000
    assert {g for g, _n in tracks} == {f"rank {r} (node0, tgid {1000 + r})" for r in range(4)}
    names = {n for _g, n in tracks}
    assert names == {"steps", "cuda tid 1000", "cuda tid 1001", "cuda tid 1002",
                     "cuda tid 1003", "nccl tid 1000", "nccl tid 1001", "nccl tid 1002",
                     "nccl tid 1003"} | {f"rank {r} {t}" for r in range(4) for t in DEVICE_TRACKS}
    assert all(t.max_depth == 1 for (_g, n), t in tracks.items() if n != "steps")
    # device slices: the recorded device times, exactly; collectives with their NCCL args
    r1 = "rank 1 (node0, tgid 1001)"
    (k0, k1) = tracks[(r1, "rank 1 GPU stream 7")].slices[:2]
    assert (k0.name, k1.name) == ("flash_attn_fwd_kernel", "layernorm_fwd_kernel")
    assert k0.end - k0.ts == int(400_000 * KERNEL_FRACTION) and k0.end <= k1.ts
    assert k0.args == {}
    ar = tracks[(r1, f"rank 1 GPU NCCL comm {HASH} channel 1")].slices
    assert [s.name for s in ar[:4]] == ["AllReduce #0", "AllReduce #1", "AllReduce #2",
                                        "AllReduce #3"]
    assert ar[5].args == {"op": "AllReduce", "coll_seq": 5, "comm_hash": HASH,
                          "bytes": 100 << 20, "channel": 1}
    assert all(s.end - s.ts == 1_500_000 for s in ar)
    send = tracks[(r1, f"rank 1 GPU NCCL comm {HASH} channel 0")].slices[0]
    assert (send.name, send.args["peer"], send.end - send.ts) == ("Send peer 2", 2, 300_000)
    copies = tracks[(r1, "rank 1 GPU stream 7 memcpy/memset")].slices
    assert [s.name for s in copies[:2]] == ["memset", "memcpy"]
    assert copies[1].args == {"bytes": 1 << 20}
    nccl = tracks[("rank 0 (node0, tgid 1000)", "nccl tid 1000")].slices
    assert nccl[0].name == "allreduce #0" and nccl[0].args["comm"] == "comm0"
    assert nccl[0].args["bytes"] == 100 << 20 and nccl[0].args["call"] == "ncclAllReduce"
    launch = tracks[("rank 0 (node0, tgid 1000)", "cuda tid 1000")].instants[0]
    assert launch[1] == "cudaLaunchKernel" and launch[2] == {"kernel": "flash_attn_fwd_kernel"}
    size = os.path.getsize(out)
    n = seen["instants"] + seen["slices"] + sum(dev.values()) + \
        sum(len(t.slices) for (_g, nm), t in tracks.items() if nm == "steps")
    assert 1e6 < size < 2e6  # ~0.8 MB of host calls, ~0.9 MB of 17,440 device slices
    assert re.fullmatch(rf"argus: wrote {n} trace events to {re.escape(str(out))} "
                        rf"\({size / 1e6:.1f} MB, perfetto, \d+\.\d s\)\n", err), err


def test_the_same_recording_as_chrome_json_nests_and_keeps_entry_only_calls_instant(job,
                                                                                    tmp_path):
    out = tmp_path / "t.json"
    err = _export(job, out)  # auto: .json is chrome
    assert ", chrome, " in err
    obj = json.loads(out.read_text())
    tracks = read_chrome(obj)
    check_tracks(tracks, max_depth=3)
    rec = load_recording(job)
    origin = obj["metadata"]["origin_wall_ns"]
    dev = check_kernels(tracks, [rec], to_ns=lambda us: round(us * 1000) + origin)
    assert _device_counts(dev) == {r: DEVICE_TRACKS for r in range(4)}
    device = [e for e in obj["traceEvents"] if e.get("cat") == "gpu"]
    assert len(device) == rec.kernels.height and {e["ph"] for e in device} == {"X"}
    ev = rec.events
    entry_only = ev.filter(pl.col("dur_ns").is_null() & ~pl.col("in_flight")).height
    assert sum(len(t.instants) for t in tracks.values()) == entry_only
    flights = [s for t in tracks.values() for s in t.slices if s.args.get("in_flight")]
    assert [s.name for s in flights] == ["cudaStreamSynchronize"]
    # no complete event ends at the recording end but the one in flight
    last = max(s.end for t in tracks.values() for s in t.slices)
    assert [s.name for t in tracks.values() for s in t.slices if s.end == last] \
        == ["cudaStreamSynchronize"]


def test_the_checkers_fail_on_overlap_and_depth():
    bad = {"traceEvents": [
        {"ph": "X", "name": "a", "pid": 0, "tid": 1, "ts": 0.0, "dur": 10.0},
        {"ph": "X", "name": "b", "pid": 0, "tid": 1, "ts": 5.0, "dur": 10.0}]}
    with pytest.raises(AssertionError, match="partial overlap"):
        read_chrome(bad)
    deep = {"traceEvents": [{"ph": "X", "name": str(i), "pid": 0, "tid": 1, "ts": float(i),
                             "dur": 100.0 - 2 * i} for i in range(4)]}
    tracks = read_chrome(deep)
    check_tracks(tracks, max_depth=4)
    with pytest.raises(AssertionError, match="deeper than 3"):
        check_tracks(tracks, max_depth=3)


def _rows(rows):
    base = {"tgid": 7, "tid": 7, "rank": 0, "channel": "cuda", "in_flight": False}
    return coerce(pl.DataFrame([{**base, **r} for r in rows]), EVENTS_SCHEMA, "events")


def test_a_partial_overlap_is_cut_at_the_enclosing_end_and_flagged():
    # b starts inside a and ends after it; c nests in b; d entry-only
    ev = _rows([{"ts_ns": 1000, "dur_ns": 1000, "name": "cudaMemcpy"},
                {"ts_ns": 1500, "dur_ns": 1000, "name": "cudaStreamSynchronize"},
                {"ts_ns": 1600, "dur_ns": 100, "name": "cudaFree"},
                {"ts_ns": 1700, "dur_ns": None, "name": "cudaLaunchKernel"}])
    sc = scenarios.simulate(ranks=1, steps=2)
    m = dict(sc.recordings[0].manifest, ranks=[{"rank": 0, "tgid": 7}], ended_ns=10_000)
    trace = build_trace([Recording(m, ev, sc.recordings[0].stacks)], {"findings": []})
    (part,) = list(trace.parts())
    calls = part.events.filter(pl.col("cat") == "cuda")
    wall = m["clock"]["mono_to_wall_ns"]
    got = [(r["name"], r["ts_ns"] - wall, None if r["end_ns"] is None else r["end_ns"] - wall,
            r["clipped"]) for r in calls.iter_rows(named=True)]
    assert got == [("cudaMemcpy", 1000, 2000, False),
                   ("cudaStreamSynchronize", 1500, 2000, True),
                   ("cudaFree", 1600, 1700, False),
                   ("cudaLaunchKernel", 1700, None, False)]
    assert part.clipped == 1 and max(part.max_depth.values()) == 3


def test_nest_cuts_only_partial_overlaps_per_track():
    ev = pl.DataFrame({"track": [1, 1, 1, 2, 2], "ts_ns": [0, 0, 5, 0, 3],
                       "end_ns": [10, 4, 20, 4, None], "clipped": [False] * 5},
                      schema_overrides={"end_ns": pl.Int64})
    out, depth, n = nest(ev)
    assert out["end_ns"].to_list() == [10, 4, 10, 4, None]
    assert out["clipped"].to_list() == [False, False, True, False, False]
    assert (depth, n) == ({1: 2, 2: 1}, 1)


def test_hang_scenario_keeps_its_in_flight_calls_and_findings():
    sc = scenarios.simulate(steps=5, hang=(2, 4), hang_tail_s=12.0)
    obj = json.loads(json.dumps(chrome_trace(sc.recordings)))
    tracks = read_chrome(obj)
    check_tracks(tracks)
    flights = {s.name for t in tracks.values() for s in t.slices if s.args.get("in_flight")}
    want = sc.recordings[0].events.filter(pl.col("in_flight"))["name"].cast(pl.Utf8)
    assert flights and flights <= set(want.to_list()) | {f"allreduce #{i}" for i in range(99)}
    assert sum(bool(s.args.get("in_flight")) for t in tracks.values() for s in t.slices) \
        == sc.recordings[0].events["in_flight"].sum()


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_plain_lines_only_for_large_exports_at_most_once_a_second():
    clock = _Clock()
    s = io.StringIO()
    p = ExportProgress(s, clock=clock)
    p.large(PROGRESS_MIN_EVENTS - 1)
    clock.t = 5.0
    p.phase("diagnosing")
    p(1, 4, 1000)
    p.done("x.pftrace", 2_500_000, 1000, "perfetto")
    assert s.getvalue() == "argus: wrote 1000 trace events to x.pftrace (2.5 MB, perfetto, 5.0 s)\n"
    s = io.StringIO()
    p = ExportProgress(s, clock=clock)
    p.large(4_000_000)
    clock.t = 6.5
    p.phase("aligning the timeline")
    clock.t = 7.0
    p(1, 4, 50_000)  # 0.5 s after the last line: none
    clock.t = 7.6
    p(2, 4, 1_200_000)
    p.done("x.json", None, 4_000_000, "chrome")
    assert s.getvalue().splitlines() == [
        "export: aligning the timeline, 1.5 s",
        "export: rank 2/4, 1.2 M events, 2.6 s",
        "argus: wrote 4000000 trace events to x.json (chrome, 2.6 s)",
    ]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_a_bar_that_leaves_only_the_closing_line():
    s = _Tty()
    p = ExportProgress(s)
    p.phase("reading and diagnosing")
    p.large(10)
    p(1, 1, 10)
    p.close()
    p.done("t.pftrace", 10, 10, "perfetto")
    assert s.getvalue().endswith("argus: wrote 10 trace events to t.pftrace (10 B, perfetto, "
                                 + s.getvalue().rsplit(", ", 1)[1])


def test_trace_processor_sees_the_same_slices(job, tmp_path):
    """SQL over the export with a real trace_processor (ARGUS_TRACE_PROCESSOR names it)."""
    bin_path = os.environ.get("ARGUS_TRACE_PROCESSOR")
    if not bin_path:
        pytest.skip("ARGUS_TRACE_PROCESSOR is not set: no trace_processor binary to query "
                    "(it cannot be downloaded here)")
    from perfetto.trace_processor import TraceProcessor, TraceProcessorConfig

    out = tmp_path / "t.pftrace"
    _export(job, out)
    tracks = read_perfetto(out)
    tp = TraceProcessor(trace=str(out), config=TraceProcessorConfig(bin_path=bin_path))
    try:
        (row,) = list(tp.query("select count(*) as n, max(depth) as d from slice"))
        n_slices = sum(len(t.slices) + len(t.instants) for t in tracks.values())
        assert row.n == n_slices
        assert row.d <= 2  # trace_processor's depth counts from 0
        flights = list(tp.query("select s.dur as dur from slice s join args a using (arg_set_id) "
                                "where a.key = 'debug.in_flight'"))
        assert [f.dur for f in flights] == [2_000_000_000]
    finally:
        tp.close()


def test_without_the_perfetto_package_the_export_says_what_to_do(job, tmp_path, monkeypatch):
    import sys

    from argus.errors import ArgusError

    monkeypatch.delitem(sys.modules, "argus.present.perfetto", raising=False)
    monkeypatch.setitem(sys.modules, "perfetto.trace_builder.proto_builder", None)
    out = tmp_path / "t.pftrace"
    res = CliRunner().invoke(export_cmd.command, [str(job), "-o", str(out)])
    assert isinstance(res.exception, ArgusError), res.exception
    assert "pip install perfetto" in res.exception.remedy and not out.exists()
    assert not list(tmp_path.iterdir())


def test_the_device_checker_fails_on_a_wrong_duration_or_a_missing_record(job, tmp_path):
    out = tmp_path / "t.pftrace"
    _export(job, out)
    tracks = read_perfetto(out)
    rec = load_recording(job)
    longer = rec.kernels.with_columns(
        pl.when(pl.int_range(pl.len()) == 10).then(pl.col("dur_ns") + 1)
        .otherwise(pl.col("dur_ns")).alias("dur_ns"))
    with pytest.raises(AssertionError, match="is not"):
        check_kernels(tracks, [Recording(rec.manifest, rec.events, rec.stacks, kernels=longer)])
    extra = pl.concat([rec.kernels, rec.kernels.slice(0, 1)])
    with pytest.raises(AssertionError, match="slices, "):
        check_kernels(tracks, [Recording(rec.manifest, rec.events, rec.stacks, kernels=extra)])


def test_a_rank_on_two_devices_names_the_device_in_its_stream_tracks():
    sc = scenarios.simulate(ranks=1, steps=2)
    r0 = sc.recordings[0]
    tgid = r0.manifest["ranks"][0]["tgid"]
    t0 = int(r0.events["ts_ns"].min())
    kn = coerce(pl.DataFrame([
        {"ts_ns": t0 + 10, "dur_ns": 5, "kind": "kernel", "name": "k", "device": 0, "stream": 7},
        {"ts_ns": t0 + 12, "dur_ns": 5, "kind": "kernel", "name": "k", "device": 1, "stream": 7},
        {"ts_ns": t0 + 30, "dur_ns": 4, "kind": "memset", "name": "", "device": 1, "stream": 7,
         "bytes": 64},
    ]).with_columns(pl.lit(tgid).alias("tgid")), KERNELS_SCHEMA, "kernels")
    trace = build_trace([Recording(r0.manifest, r0.events, r0.stacks, kernels=kn)],
                        {"findings": []})
    (part,) = list(trace.parts())
    dev = [t for t in part.tracks if " GPU " in t.name]
    assert [t.name for t in dev] == ["rank 0 GPU 0 stream 7", "rank 0 GPU 1 stream 7",
                                    "rank 0 GPU 1 stream 7 memcpy/memset"]
    assert [t.tid for t in dev] == list(range(dev[0].tid, dev[0].tid + 3))
    rows = part.events.filter(pl.col("cat") == "gpu").sort("track")
    wall = r0.manifest["clock"]["mono_to_wall_ns"]
    assert [(r["name"], r["ts_ns"] - wall - t0, r["end_ns"] - r["ts_ns"], r["bytes"])
            for r in rows.iter_rows(named=True)] == [("k", 10, 5, None), ("k", 12, 5, None),
                                                     ("memset", 30, 4, 64)]
