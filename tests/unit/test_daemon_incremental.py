"""The daemon's incremental analysis on recorded data, no root: a recording's rows are fed to
the daemon's per-job analysis in 0.5 s drains, as `Tracer.drain()` would deliver them.

Checks: the segments it writes hold exactly the summaries of the whole recording (every
column, the step ids continuous from 0), `argus report` over them gives the whole
recording's diagnosis, each interval re-reads only the raw rows from the start of each
rank's 8th-last summarised step (the work of an interval does not grow with the window),
and the diagnosis window keeps at most `window_s` of steps."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from argus.analyze.compress import build_summaries
from argus.analyze.diagnosis import diagnose
from argus.analyze.incremental import OVERLAP_STEPS
from argus.cli import main
from argus.daemon.service import Daemon, DaemonOptions, _Job
from argus.recording import schema
from argus.recording.io import load_recording

pytestmark = pytest.mark.unit
DATA = Path(__file__).resolve().parents[1] / "data"
DRAIN_NS = 500_000_000


def _fake_tracer(rec):
    """What the daemon's analysis reads of its Tracer, from a recording's manifest."""
    m = rec.manifest
    targets = {
        r["tgid"]: SimpleNamespace(traced=True, exited=False, rank=r["rank"],
                                   local_rank=r.get("local_rank"), world_size=r.get("world_size"),
                                   env=r.get("env") or {}, exe=r.get("exe"), libraries=[])
        for r in m["ranks"]
    }
    return SimpleNamespace(
        targets_view=targets, cuda_device=lambda _t: None, probes_of=lambda _t: 7,
        mono_to_wall_ns=m["clock"]["mono_to_wall_ns"],
        opts=SimpleNamespace(sample_hz=49, channels=("cuda", "nccl", "torch", "cpu", "host")),
        kernels=SimpleNamespace(take=lambda: None,
                                manifest=lambda: {"kernels": {"enabled": False, "agents": {}}}),
    )


def _replay(rec, out: Path, window_s: float = 60.0):
    """Feed the recording to a Daemon's job analysis drain by drain; returns (daemon, job,
    per-interval checks of the rows kept)."""
    d = Daemon(DaemonOptions(output=out, metrics_addr=None,
                             overrides={"interval_s": 0.5, "window_s": window_s}))
    d.tracer = _fake_tracer(rec)
    job = _Job("torchelastic-test", tgids=set(d.tracer.targets_view))
    t0 = int(rec.events["ts_ns"].min())
    t1 = int(rec.manifest["ended_ns"])  # the daemon drains until the recording's end
    # calls still in flight at the end: the tracer reports them at every drain after entry
    done = rec.events.filter(~pl.col("in_flight").fill_null(False))
    infl = rec.events.filter(pl.col("in_flight").fill_null(False))
    kept = []
    for a in range(t0, t1 + 1, DRAIN_NS):
        b = min(a + DRAIN_NS, t1 + 1)
        if b > t1:  # the last drain, at the recording's end: the job has exited
            for t in d.tracer.targets_view.values():
                t.exited = True
        sel = (pl.col("ts_ns") >= a) & (pl.col("ts_ns") < b)
        # a call's record reaches user space when it returns: drained by its end
        end = pl.col("ts_ns") + pl.col("dur_ns").fill_null(0)
        job.win.add_rows(done.filter((end >= a) & (end < b)), rec.stacks.filter(sel),
                         rec.host_ctx.filter(sel), b, d.config.interval_s)
        job.view = d._analyse(job, infl.filter(pl.col("ts_ns") < b), schema.empty_gpu(),
                              min(b, t1))
        if job.win.steps.height and job.win.events.height:
            per_rank = job.win.steps.sort("start_ns").group_by("rank").agg(
                pl.col("start_ns").tail(OVERLAP_STEPS).first())
            first = per_rank["start_ns"].min()
            kept.append((int(job.win.events["ts_ns"].min()), first - d.tracer.mono_to_wall_ns))
    return d, job, kept


@pytest.mark.parametrize(("name", "hang_after"), [("sim_straggler", 10.0), ("sim_hang", 2.0),
                                                  ("sim_host_stall", 10.0)])
def test_incremental_segments_are_the_whole_recordings_summaries(name, hang_after, tmp_path,
                                                                 capsys):
    rec = load_recording(DATA / name)
    whole = build_summaries([rec])
    d, job, kept = _replay(rec, tmp_path / "out")
    segs = sorted((tmp_path / "out" / "jobs" / job.key).iterdir(), key=lambda p: int(p.name))
    assert len(segs) >= 2 and job.segments == len(segs)  # rotated: several segments
    assert main(["report", str(tmp_path / "out"), "--json", "--hang-after", str(hang_after)]) == 0
    report = json.loads(capsys.readouterr().out)
    expect = diagnose([whole], hang_after_s=hang_after)
    assert report["findings"] == expect["findings"]
    assert report["steps"] == expect["steps"] and report["ranks"] == expect["ranks"]
    # the merged segments are the whole recording's summaries, ids included
    from argus.analyze.merge import merge_nodes
    from argus.recording.segments import expand_dirs
    from argus.recording.summaries import load_summaries

    (merged,) = merge_nodes([load_summaries(p) for p in expand_dirs([tmp_path / "out"])])
    order = ["rank", "start_ns"]
    got, want = merged.steps.sort(order), whole.steps.sort(order)
    assert got.drop("stacks").equals(want.drop("stacks"))
    assert merged.steps["step"].min() == 0
    # CPU samples: the same, except those after a rank's last step, which a recording gives
    # to that step and the daemon to the next step, which never came (the job ended)
    last = pl.col("step") == pl.col("step").max().over("rank")
    def entries(frame):  # a step's list of stack entries, in a canonical order
        return [sorted(v or [], key=lambda e: (e["t_off_ns"], e["stack_id"]))
                for v in frame["stacks"].to_list()]

    assert entries(got.filter(~last)) == entries(want.filter(~last))
    for g, w in zip(entries(got.filter(last)), entries(want.filter(last)), strict=True):
        assert all(x in w for x in g)
    # every interval re-read only the raw rows from each rank's 8th-last summarised step on
    assert kept and all(first_kept >= cut for first_kept, cut in kept)
    # the live view: the diagnosis of the window, the same stragglers as the whole
    stragglers = sorted(f["rank"] for f in expect["findings"] if f["kind"] == "straggler"
                        and f["severity"] != "info")
    assert sorted(r["rank"] for r in job.view["ranks"] if r["straggler"]) == stragglers
    assert {r["rank"] for r in job.view["ranks"]} == {r["rank"] for r in expect["ranks"]}


def test_the_diagnosis_window_keeps_window_s_of_steps(tmp_path):
    rec = load_recording(DATA / "sim_straggler")
    d, job, _kept = _replay(rec, tmp_path / "out", window_s=2.0)
    span = int(job.win.steps["end_ns"].max()) - int(job.win.steps["end_ns"].min())
    assert span <= 2_000_000_000
    whole = build_summaries([rec])
    newest = int(whole.steps["end_ns"].max())
    assert job.win.steps.height == whole.steps.filter(
        pl.col("end_ns") >= newest - 2_000_000_000).height
    # the segments still hold every step
    written = sum(pl.read_parquet(p).height for p in (tmp_path / "out").rglob("part-*.parquet"))
    assert written == whole.steps.height
