"""`argus attach` end to end through the CLI: recording, summaries, diagnosis, JSON."""

from __future__ import annotations

import json

import pytest

from argus.cli import main
from argus.sim.launcher import SimConfig, start_job

pytestmark = pytest.mark.bpf


def _findings(report):
    return sorted((f["kind"], f.get("rank")) for f in report["findings"]
                  if f["severity"] in ("warning", "critical"))  # fmt: skip


def test_attach_writes_recording_and_summaries_and_prints_the_report(tmp_path, capsys):
    go = tmp_path / "go"
    job = start_job(SimConfig(ranks=3, steps=30, faults=["straggler:rank=1,factor=1.6"],
                              wait_go=str(go), truth=str(tmp_path / "truth.json")))
    try:
        job.wait_ready()
        # The go file appears as soon as attach has started: the CLI has no hook, so a
        # watcher thread would race it; releasing now only costs the first steps.
        go.touch()
        out = tmp_path / "rec"
        rc = main(["attach", str(job.launcher_pid), "-o", str(out), "--json", "--no-cpu"])
        job.wait(60)
    finally:
        if job.proc.poll() is None:
            job.terminate()
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)  # exactly one JSON object on stdout
    assert report["schema"] == "argus.report/1"
    assert "argus: tracing" in captured.err and "recorded" in captured.err
    assert (out / "manifest.json").stat().st_mode & 0o777 == 0o600
    assert (out.stat().st_mode & 0o777) == 0o700
    assert any((out / "summaries").iterdir())
    # The summaries alone give the same serious findings as the raw events.
    assert main(["report", str(out), "--json", "--from-summaries"]) == 0
    from_summaries = json.loads(capsys.readouterr().out)
    assert _findings(from_summaries) == _findings(report)
    assert ("straggler", 1) in _findings(report)
