"""simulate -> attach -> export: the timeline of a real recorded 4-rank job, read back.

One hung job (rank 3 stops before its collectives from step 2, the others wait in them):
its Perfetto and Chrome exports must hold every recorded call once, no slice longer than
the call it represents, in-flight slices only for the calls the recording marks in flight,
and nesting depth <= 3 on every track.
"""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner
from helpers.trace_check import check_calls, check_tracks, read_chrome, read_perfetto

from argus.cli import export as export_cmd
from argus.collect.session import run_session
from argus.collect.tracer import TraceOptions
from argus.recording.io import load_recording
from argus.sim.launcher import SimConfig, start_job

pytestmark = pytest.mark.bpf


@pytest.fixture(scope="module")
def hung(tmp_path_factory):
    """Record the job until 8 s after argus attached (the hang comes at step 2, ~0.2 s in),
    then stop it. The job has no timeout of its own: bcc may compile for long on a loaded
    machine, and the ranks wait for the go file until argus is attached."""
    tmp = tmp_path_factory.mktemp("export")
    go = tmp / "go"
    cfg = SimConfig(ranks=4, steps=30, faults=["hang:rank=3,start=2"], wait_go=str(go),
                    truth=str(tmp / "truth.json"), quiet=True)
    job = start_job(cfg)
    try:
        job.wait_ready()
        result = run_session([job.launcher_pid], tmp / "rec", TraceOptions(), duration_s=8.0,
                             on_started=lambda tracer: go.touch())
    finally:
        if job.proc.poll() is None:
            job.terminate()
    return result.path, tmp


def _export(rec_dir, out, *extra):
    res = CliRunner().invoke(export_cmd.command, [str(rec_dir), "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    return res.stderr


def test_perfetto_export_of_a_real_hung_job_reads_back_nested_and_bounded(hung):
    rec_dir, tmp = hung
    out = tmp / "job.pftrace"
    err = _export(rec_dir, out)
    assert ", perfetto, " in err
    rec = load_recording(rec_dir)
    ev = rec.events.filter(pl.col("rank").is_not_null() & (pl.col("channel") != "proc"))
    tracks = read_perfetto(out)
    check_tracks(tracks, max_depth=3)
    seen = check_calls(tracks, [rec])
    entry_only = ev.filter(pl.col("dur_ns").is_null() & ~pl.col("in_flight")).height
    assert entry_only > 0  # cudaLaunchKernel & co. are recorded at entry only
    assert seen["instants"] == entry_only
    assert seen["slices"] == ev.height - entry_only
    assert seen["in_flight"] == ev["in_flight"].sum() > 0
    assert len({g for g, _n in tracks if g}) == 4


def test_chrome_export_of_the_same_job_has_no_partial_overlap(hung):
    rec_dir, tmp = hung
    out = tmp / "job.json"
    _export(rec_dir, out, "-f", "chrome")
    tracks = read_chrome(json.loads(out.read_text()))  # fails on a partial overlap
    check_tracks(tracks, max_depth=3)
    ev = load_recording(rec_dir).events
    n_flight = sum(bool(s.args.get("in_flight")) for t in tracks.values() for s in t.slices)
    assert n_flight == ev["in_flight"].sum() > 0
