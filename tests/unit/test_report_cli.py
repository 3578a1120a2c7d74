"""`argus report` / `argus export` commands and recording I/O errors."""

from __future__ import annotations

import json
import os
import stat

import polars as pl
import pytest
import scenarios
from click.testing import CliRunner

from argus.cli import export as export_cmd
from argus.cli import report as report_cmd
from argus.errors import RecordingInvalid
from argus.recording.io import load_recording, write_recording

pytestmark = pytest.mark.unit


def _write(tmp_path, **kw):
    dirs = []
    for i, rec in enumerate(scenarios.simulate(**kw).recordings):
        d = tmp_path / f"rec{i}"
        write_recording(d, rec.manifest, rec.events, rec.stacks)
        dirs.append(str(d))
    return dirs


def test_write_modes_and_roundtrip(tmp_path):
    (d,) = _write(tmp_path, steps=4)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for f in ("manifest.json", "events.parquet", "stacks.parquet"):
        assert stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) == 0o600
    rec = load_recording(d)
    assert rec.events.schema["channel"] == pl.Categorical
    assert rec.events.height > 0 and rec.stacks.height > 0


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("nodir", "does not exist"),
        ("nomanifest", "no manifest.json"),
        ("badjson", "not valid JSON"),
        ("format", "does not declare format"),
        ("version", "argus.recording/9"),
        ("truncated", "truncated or corrupt"),
        ("columns", "lacks the column"),
    ],
)
def test_invalid_recordings_raise_one_sentence(tmp_path, damage, needle):
    (d,) = _write(tmp_path, steps=3)
    m = os.path.join(d, "manifest.json")
    ev = os.path.join(d, "events.parquet")
    if damage == "nodir":
        d = str(tmp_path / "missing")
    elif damage == "nomanifest":
        os.remove(m)
    elif damage == "badjson":
        open(m, "w").write("{not json")
    elif damage in ("format", "version"):
        man = json.load(open(m))
        man["format"] = "something/1" if damage == "format" else "argus.recording/9"
        json.dump(man, open(m, "w"))
    elif damage == "truncated":
        data = open(ev, "rb").read()
        open(ev, "wb").write(data[: len(data) // 2])
    elif damage == "columns":
        pl.DataFrame({"ts_ns": [1]}).write_parquet(ev)
    with pytest.raises(RecordingInvalid) as err:
        load_recording(d)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_report_json_is_one_object(tmp_path):
    dirs = _write(tmp_path, gpu_slow={1: 1.5})
    res = CliRunner().invoke(report_cmd.command, [*dirs, "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)  # exactly one JSON document, nothing else
    assert obj["schema"] == "argus.report/1"
    assert [(f["kind"], f["rank"]) for f in obj["findings"]] == [("straggler", 1)]


def test_report_table_and_two_nodes(tmp_path):
    dirs = _write(tmp_path, hosts=2, clock_err_ns={1: 3_000_000})
    assert len(dirs) == 2
    res = CliRunner().invoke(report_cmd.command, dirs)
    assert res.exit_code == 0, res.output
    assert "20 complete steps" in res.stdout and "No findings" in res.stdout
    assert "clock offsets: node0 +0.000 ms, node1 -" in res.stdout


def test_report_hang_after_option(tmp_path):
    dirs = _write(tmp_path, hang=(1, 5), steps=8, hang_tail_s=8.0)
    quiet = json.loads(CliRunner().invoke(report_cmd.command, [*dirs, "--json"]).stdout)
    assert quiet["findings"] == []
    res = CliRunner().invoke(report_cmd.command, [*dirs, "--json", "--hang-after", "5"])
    hung = json.loads(res.stdout)
    assert [(f["kind"], f["missing_ranks"]) for f in hung["findings"]] == [("collective_hang", [1])]


def test_report_errors_are_typed(tmp_path):
    res = CliRunner().invoke(report_cmd.command, [str(tmp_path / "nope")])
    assert isinstance(res.exception, RecordingInvalid)
    res = CliRunner().invoke(report_cmd.command, [str(tmp_path), "--hang-after", "0"])
    assert getattr(res.exception, "exit_code", None) == 2


def test_help_has_examples():
    for cmd in (report_cmd.command, export_cmd.command):
        out = CliRunner().invoke(cmd, ["--help"]).output
        assert "Examples:" in out and "#" in out


DATA = os.path.join(os.path.dirname(__file__), "..", "data")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("synthetic_gpu_straggler", [("straggler", 1)]),
        ("synthetic_hang", [("collective_hang", None)]),
    ],
)
def test_stored_recordings(name, expected):
    res = CliRunner().invoke(report_cmd.command, [os.path.join(DATA, name), "--json"])
    obj = json.loads(res.stdout)
    assert [(f["kind"], f.get("rank")) for f in obj["findings"]] == expected
    if name == "synthetic_hang":
        assert obj["findings"][0]["missing_ranks"] == [2]
        assert obj["findings"][0]["waiting_ranks"] == [0, 1]
