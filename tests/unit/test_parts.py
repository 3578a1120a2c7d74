"""A recording written in parts (argus.recording.parts): what a killed session leaves is
read back exactly once per row, and the merge at the end equals the parts."""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from argus.errors import RecordingInvalid
from argus.recording import schema
from argus.recording.parts import PARTS, UNFINISHED, PartWriter, has_parts, load_parts

pytestmark = pytest.mark.unit


def _manifest(i: int, ranks: list[dict]) -> dict:
    return {"format": schema.FORMAT, "host": "n1", "clock": {"mono_to_wall_ns": 7},
            "started_ns": 1000 + i, "ended_ns": 2000 + i, "end_reason": "recording",
            "channels": {"cuda": True, "host": True}, "ranks": ranks,
            "counts": {"ring_records": 10 * (i + 1)}}


def _events(i: int, in_flight: bool = False, rank: int | None = None) -> pl.DataFrame:
    """Three calls of part i (ts 100*i + 0/1/2) on tgid 41, and one in flight at its end."""
    rows = [{"ts_ns": 100 * i + k, "dur_ns": 5, "in_flight": False, "tgid": 41, "tid": 41,
             "rank": rank, "channel": "cuda", "name": "cudaLaunchKernel"} for k in range(3)]
    if in_flight:
        rows.append({"ts_ns": 100 * i + 50, "dur_ns": None, "in_flight": True, "tgid": 41,
                     "tid": 42, "rank": rank, "channel": "nccl", "name": "ncclAllReduce"})
    return pl.DataFrame(rows, schema_overrides={"rank": pl.Int32, "tgid": pl.Int32,
                                                "tid": pl.Int32, "dur_ns": pl.Int64})


def _host(i: int) -> pl.DataFrame:
    return pl.DataFrame({"ts_ns": [100 * i], "interval_ns": [100], "tgid": [41],
                         "kind": ["cpu_contention"], "detail": ["hog"], "count": [1],
                         "total_ns": [9]})


def _write(writer: PartWriter, n: int, ranks: list[dict]) -> None:
    for i in range(n):
        writer.write(_manifest(i, ranks), _events(i, in_flight=True), schema.empty_stacks(),
                     host=_host(i))


def test_a_killed_session_is_read_from_its_parts_once_per_row(tmp_path):
    # rank unknown while the parts were written; the last manifest knows it
    w = PartWriter(tmp_path, compact_every=4)
    _write(w, 9, [])
    w.write(_manifest(9, [{"tgid": 41, "rank": 3}]), _events(9, in_flight=True),
            schema.empty_stacks(), host=_host(9))
    names = sorted(p.name for p in (tmp_path / PARTS).iterdir())
    # parts 0-3 and 4-7 compacted; 8 and 9 on their own
    assert names == ["000000-000003", "000004-000007", "000008-000008", "000009-000009"]
    assert has_parts(tmp_path)
    assert (tmp_path / PARTS).stat().st_mode & 0o777 == 0o700
    rec = load_parts(tmp_path)
    assert rec.manifest["end_reason"] == UNFINISHED and rec.manifest["parts"] == 4
    calls = rec.events.filter(~pl.col("in_flight"))
    assert calls["ts_ns"].to_list() == [100 * i + k for i in range(10) for k in range(3)]
    # the in-flight snapshot of the last part only (earlier ones completed or were stale)
    assert rec.events.filter(pl.col("in_flight"))["ts_ns"].to_list() == [950]
    assert set(rec.events["rank"].to_list()) == {3}  # re-resolved from the last manifest
    assert rec.host_ctx["ts_ns"].to_list() == [100 * i for i in range(10)]
    assert rec.manifest["started_ns"] == 1000  # the first part's start
    assert rec.manifest["counts"]["events"] == {"cuda": 30, "nccl": 1}
    assert rec.manifest["counts"]["ring_records"] == 100


def test_an_incomplete_last_part_is_skipped_and_covered_parts_are_not_read_twice(tmp_path):
    w = PartWriter(tmp_path, compact_every=100)
    _write(w, 5, [])
    parts = tmp_path / PARTS
    # killed between the compacted part and the removal of the parts it replaces
    shutil.copytree(parts / "000000-000000", parts / "000000-000002")
    # and while writing part 5: its manifest.json (written last) is missing
    shutil.copytree(parts / "000004-000004", parts / "000005-000005")
    (parts / "000005-000005" / schema.MANIFEST).unlink()
    rec = load_parts(tmp_path)
    # 000000-000002 covers parts 0..2 but holds only part 0's rows (it is a copy): the reader
    # trusts the range; parts 1 and 2 are not read again
    assert sorted(set(rec.events.filter(~pl.col("in_flight"))["ts_ns"].to_list())) == [
        0, 1, 2, 300, 301, 302, 400, 401, 402]
    assert rec.manifest["parts"] == 3


def test_finish_merges_every_part_into_the_recording_and_removes_the_parts(tmp_path):
    w = PartWriter(tmp_path, compact_every=3)
    _write(w, 7, [{"tgid": 41, "rank": 0}])
    final = dict(_manifest(7, [{"tgid": 41, "rank": 0}]), end_reason="duration")
    rec = w.finish(final)
    assert not (tmp_path / PARTS).exists() and not has_parts(tmp_path)
    from argus.recording.io import load_recording

    back = load_recording(tmp_path)
    assert back.manifest["end_reason"] == "duration"
    assert back.events.filter(~pl.col("in_flight")).height == 21
    assert back.events.filter(pl.col("in_flight"))["ts_ns"].to_list() == [650]
    assert back.events.select("ts_ns", "in_flight").equals(rec.events.select("ts_ns", "in_flight"))
    assert back.host_ctx.height == 7
    assert (tmp_path / schema.MANIFEST).stat().st_mode & 0o777 == 0o600


def test_no_complete_part_is_one_sentence(tmp_path):
    (tmp_path / PARTS / "000000-000000").mkdir(parents=True)
    with pytest.raises(RecordingInvalid, match="holds no complete recording part"):
        load_parts(tmp_path)
