"""`argus report` over the daemon's segments: one node's consecutive segments merged into one
run, several nodes' daemon directories into one job (step ids and clocks aligned).

The segments are cut from real recordings' summaries (tests/data, the simulator traced by
attach) and from the two-node synthetic scenario, laid out exactly as `argus daemon` writes
them (OUTPUT/jobs/<job>/<wall ns>/manifest.json + summaries/); the merged report must equal
the report of the whole."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import scenarios
from test_analyze_scenarios import SCENARIOS

from argus.analyze.compress import build_summaries
from argus.analyze.diagnosis import diagnose
from argus.analyze.merge import align_step_ids, merge_nodes, step_shift
from argus.cli import main
from argus.errors import RecordingInvalid, UsageError
from argus.recording.io import load_recording
from argus.recording.segments import JOBS, expand_dirs
from argus.recording.summaries import Summaries, load_summaries, write_summaries

pytestmark = pytest.mark.unit
DATA = Path(__file__).resolve().parents[1] / "data"


def _cut(summ: Summaries, bounds: list[int]) -> list[Summaries]:
    """Segments of `summ` holding steps [b_i, b_i+1) (the last one: to the end); every segment
    keeps the whole tail, as the daemon's tail is the state at the segment's end."""
    edges = [*bounds, None]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = pl.col("step") >= lo
        if hi is not None:
            sel &= pl.col("step") < hi
        steps = summ.steps.filter(sel)
        out.append(Summaries(meta=dict(summ.meta), steps=steps, stack_dict=summ.stack_dict,
                             tail=summ.tail, manifest=dict(summ.manifest),
                             gpu=summ.gpu))
    return out


def _write_segments(out: Path, job: str, segs: list[Summaries], run: str | None = None,
                    first: int = 0) -> list[Path]:
    paths = []
    for i, s in enumerate(segs):
        end = int(s.steps["end_ns"].max()) if s.steps.height else i
        d = out / JOBS / job / str(end)
        write_summaries(d, s)
        man = dict(s.manifest or s.meta.get("manifest") or {}, started_ns=1000 + first + i)
        if run is not None:
            man["daemon_run"] = run
        (d / "manifest.json").write_text(json.dumps(man, default=str))
        paths.append(d)
    return paths


def _report(capsys, *args: str) -> dict:
    assert main(["report", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _same(a: dict, b: dict) -> None:
    assert a["findings"] == b["findings"]
    assert a["steps"] == b["steps"]
    assert a["ranks"] == b["ranks"]
    assert a["clock_alignment"] == b["clock_alignment"]


@pytest.mark.parametrize(("name", "hang_after"), [("sim_straggler", 10.0), ("sim_hang", 2.0),
                                                  ("sim_host_stall", 10.0)])
def test_one_nodes_segments_give_the_report_of_the_whole(name, hang_after, tmp_path, capsys):
    whole = build_summaries([load_recording(DATA / name)])
    n = whole.steps["step"].n_unique()
    assert n >= 15
    segs = _cut(whole, [0, n // 3, n // 3 + 1, 2 * n // 3])  # one segment of a single step
    paths = _write_segments(tmp_path / "out", "torchelastic-x", segs)
    expect = diagnose([whole], hang_after_s=hang_after)
    assert any(f["severity"] != "info" for f in expect["findings"])
    ha = ["--hang-after", str(hang_after)]
    for arg in (tmp_path / "out", tmp_path / "out" / JOBS / "torchelastic-x"):
        got = _report(capsys, str(arg), *ha)
        _same(got, expect)
        assert len(got["recordings"]) == 4
    # the segments named one by one, in any order: the same
    _same(_report(capsys, *[str(p) for p in reversed(paths)], *ha), expect)
    # a single segment is its own steps only (here: one step)
    one = _report(capsys, str(paths[1]), *ha)
    assert one["steps"]["count"] == 1


def test_two_nodes_daemon_dirs_align_step_ids_and_clocks(tmp_path, capsys):
    recs = scenarios.simulate(**SCENARIOS["two_nodes"]).recordings
    n0, n1 = (build_summaries([r]) for r in recs)
    assert (n0.host, n1.host) == ("node0", "node1")
    expect = diagnose([n0, n1])
    assert expect["clock_alignment"]["offsets_ns"]["node1"] != 0
    # node1's daemon numbered the same steps from 100 (it saw other steps first)
    n1_shifted = Summaries(meta=n1.meta, steps=n1.steps.with_columns(pl.col("step") + 100),
                           stack_dict=n1.stack_dict, tail=n1.tail,
                           manifest=n1.manifest)
    assert step_shift(n0, n1_shifted) == -100
    _write_segments(tmp_path / "node0", "slurm-7", _cut(n0, [0, 7, 12]))
    _write_segments(tmp_path / "node1", "slurm-7", _cut(n1_shifted, [100, 110]))
    _write_segments(tmp_path / "node1", "slurm-8", _cut(n1, [0]))  # another job on node1
    got = _report(capsys, str(tmp_path / "node0"), str(tmp_path / "node1"))
    _same(got, expect)
    assert [r["host"] for r in got["recordings"]] == ["node0"] * 3 + ["node1"] * 2


def test_a_node_traced_later_gets_the_reference_ids(tmp_path):
    recs = scenarios.simulate(**SCENARIOS["two_nodes"]).recordings
    n0, n1 = (build_summaries([r]) for r in recs)
    late = n1.steps.filter(pl.col("step") >= 5).with_columns(pl.col("step") - 5)  # ids from 0
    n1_late = Summaries(meta=n1.meta, steps=late, stack_dict=n1.stack_dict, tail=n1.tail,
                        manifest=n1.manifest)
    a, b = align_step_ids([n0, n1_late])
    assert a is n0
    assert b.steps.select("rank", "step").rows() == n1.steps.filter(pl.col("step") >= 5).select(
        "rank", "step").rows()
    # merge_nodes groups by host: the node0 segments in any order are one node
    s0, s1 = _cut(n0, [0, 10])
    merged = merge_nodes([s1, n1_late, s0])
    assert [m.host for m in merged] == ["node0", "node1"]
    assert merged[0].steps.select("rank", "step").rows() == n0.steps.select("rank", "step").rows()


def test_merge_keeps_each_ranks_latest_tail(tmp_path):
    whole = build_summaries([load_recording(DATA / "sim_hang")])
    a, b = _cut(whole, [0, 10])
    b = Summaries(meta=b.meta, steps=b.steps, stack_dict=b.stack_dict,
                  tail=whole.tail.filter(pl.col("rank") != 1), manifest=b.manifest)
    (m,) = merge_nodes([a, b])
    assert m.tail["rank"].to_list() == whole.tail["rank"].to_list()
    assert m.tail.filter(pl.col("rank") == 1).rows() == whole.tail.filter(
        pl.col("rank") == 1).rows()


def test_which_directories_report_accepts(tmp_path, capsys):
    whole = build_summaries([load_recording(DATA / "sim_straggler")])
    _write_segments(tmp_path / "out", "job-a", _cut(whole, [0]))
    _write_segments(tmp_path / "out", "job-b", _cut(whole, [0, 5]))
    with pytest.raises(UsageError, match="several jobs"):
        expand_dirs([tmp_path / "out"])
    assert main(["report", str(tmp_path / "out")]) == 2
    assert "job-a, job-b" in capsys.readouterr().err
    assert len(expand_dirs([tmp_path / "out" / JOBS / "job-b"])) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordingInvalid, match="no argus recording"):
        expand_dirs([tmp_path / "empty"])
    assert main(["report", str(tmp_path / "empty")]) == 1
    # a recording directory is still itself
    assert expand_dirs([DATA / "sim_straggler"]) == [DATA / "sim_straggler"]
    assert load_summaries(expand_dirs([tmp_path / "out" / JOBS / "job-a"])[0]).steps.height == (
        whole.steps.height)


def test_a_restarted_daemons_segments_are_numbered_on(tmp_path, capsys):
    """The daemon restarted mid-job: its second run numbers the job's steps from 0 again, in
    the same job directory; the steps it missed meanwhile are counted from the gap."""
    whole = build_summaries([load_recording(DATA / "sim_straggler")])
    kept = whole.steps.filter(~pl.col("step").is_between(15, 17))
    gap = Summaries(meta=whole.meta, steps=kept, stack_dict=whole.stack_dict, tail=whole.tail,
                    manifest=whole.manifest)
    first, second = _cut(gap, [0, 18])
    second.steps = second.steps.with_columns(pl.col("step") - 18)  # the new run's own ids
    _write_segments(tmp_path / "out", "torchelastic-x", _cut(first, [0, 7]), run="run-a")
    _write_segments(tmp_path / "out", "torchelastic-x", _cut(second, [0, 9]), run="run-b",
                    first=10)
    (merged,) = merge_nodes([load_summaries(p) for p in expand_dirs([tmp_path / "out"])])
    assert merged.steps.select("rank", "step", "start_ns").sort("rank", "step").rows() == (
        kept.select("rank", "step", "start_ns").sort("rank", "step").rows())
    _same(_report(capsys, str(tmp_path / "out")), diagnose([gap]))


def test_a_parent_of_several_attach_recordings_is_refused_not_merged(tmp_path):
    # two `argus attach` recordings (their summaries) side by side: two jobs, never one
    for name in ("sim_straggler", "sim_host_stall"):
        write_summaries(tmp_path / name, build_summaries([load_recording(DATA / name)]))
    with pytest.raises(UsageError, match=r"holds 2 recordings that are not the segments of "
                                         r"one daemon job \(sim_host_stall, sim_straggler\)"):
        expand_dirs([tmp_path])
    assert main(["report", str(tmp_path)]) == 2
    # each one named alone, or a parent holding just one, is read as before
    assert expand_dirs([tmp_path / "sim_straggler"]) == [tmp_path / "sim_straggler"]
    alone = tmp_path / "one"
    alone.mkdir()
    (tmp_path / "sim_straggler").rename(alone / "sim_straggler")
    assert expand_dirs([alone]) == [alone / "sim_straggler"]
