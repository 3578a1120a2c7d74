"""Chrome trace export: valid Trace Event Format, nesting, names."""

from __future__ import annotations

import json

import pytest
import scenarios
from click.testing import CliRunner

from argus.cli import export as export_cmd
from argus.present.chrome import chrome_trace
from argus.recording.io import write_recording

pytestmark = pytest.mark.unit

REQUIRED = {"X": {"name", "ph", "ts", "dur", "pid", "tid"}, "i": {"name", "ph", "ts", "pid", "s"},
            "M": {"name", "ph", "pid", "args"}}


def _check(trace):
    assert trace["displayTimeUnit"] == "ms"
    evs = trace["traceEvents"]
    for e in evs:
        assert REQUIRED[e["ph"]] <= set(e), e
        if e["ph"] in "Xi":
            assert e["ts"] >= 0
        if e["ph"] == "X":
            assert e["dur"] >= 0
    # complete events on one track nest properly (no partial overlap) and are ts-ordered
    tracks = {}
    for e in evs:
        if e["ph"] == "X":
            tracks.setdefault((e["pid"], e["tid"]), []).append(e)
    for evs_t in tracks.values():
        ts = [e["ts"] for e in evs_t]
        assert ts == sorted(ts)
        stack = []
        for e in evs_t:
            end = e["ts"] + e["dur"]
            while stack and stack[-1] <= e["ts"] + 1e-3:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-3, e
            stack.append(end)
    return evs


def test_trace_structure_and_names():
    sc = scenarios.simulate(steps=5, hang=(2, 4), hang_tail_s=12.0)
    trace = json.loads(json.dumps(chrome_trace(sc.recordings)))
    evs = _check(trace)
    names = {e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {f"rank {r} (node0, tgid {1000 + r})" for r in range(4)}
    colls = [e for e in evs if e["ph"] == "X" and e.get("cat") == "nccl"]
    assert colls and all(e["name"].startswith("allreduce #") for e in colls)
    assert {"comm", "seq", "bytes"} <= set(colls[0]["args"])
    steps = [e for e in evs if e.get("cat") == "step"]
    assert len([e for e in steps if e["pid"] == 0]) == 3  # 5 planted steps, hang in the 5th
    inst = [e for e in evs if e["ph"] == "i" and e["s"] == "g"]
    assert [e["name"] for e in inst] == ["collective_hang (critical)"]
    assert any(e.get("args", {}).get("in_flight") for e in evs if e["ph"] == "X")


def test_export_command_writes_loadable_json(tmp_path):
    rec = scenarios.simulate(steps=4).recordings[0]
    d = tmp_path / "rec"
    write_recording(d, rec.manifest, rec.events, rec.stacks)
    out = tmp_path / "trace.json"
    res = CliRunner().invoke(export_cmd.command, [str(d), "-f", "chrome", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    _check(json.loads(out.read_text()))
