"""The one diagnosis entry point (`argus.analyze.diagnosis`): recordings or summaries, one
object or a list, directories."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from argus.analyze.compress import build_summaries
from argus.analyze.diagnosis import diagnose, diagnose_dirs
from argus.analyze.evidence import align_recordings, from_recordings
from argus.recording.io import load_recording
from argus.recording.summaries import write_summaries

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def rec():
    return load_recording(DATA / "sim_straggler")


@pytest.fixture(scope="module")
def summ(rec):
    return build_summaries([rec])


def _serious(r: dict) -> list[tuple]:
    return [(f["kind"], f.get("rank")) for f in r["findings"] if f["severity"] != "info"]


def test_recordings_and_summaries_give_the_same_findings(rec, summ):
    raw, from_s = diagnose([rec]), diagnose([summ])
    assert "source" not in raw and from_s["source"] == "summaries"
    assert _serious(raw) == _serious(from_s) == [("straggler", 2)]
    assert from_s["findings"] == raw["findings"]


def test_one_object_is_a_list_of_one(rec, summ):
    assert diagnose(rec, hang_after_s=2.0) == diagnose([rec], hang_after_s=2.0)
    assert diagnose(summ) == diagnose([summ])


def test_mixed_sources_and_summary_options_on_recordings_are_refused(rec, summ):
    with pytest.raises(TypeError, match="not both"):
        diagnose([rec, summ])
    with pytest.raises(TypeError, match="summaries only"):
        diagnose([rec], upto_step=3)
    with pytest.raises(TypeError, match="summaries only"):
        diagnose([rec], with_tail=False)


def test_upto_step_keeps_the_first_steps(summ):
    r = diagnose([summ], upto_step=9)
    assert r["steps"]["count"] == 10 and {x["steps"] for x in r["ranks"]} == {10}


def test_one_object_or_a_list_give_the_same_report(rec, summ):
    assert diagnose(rec) == diagnose([rec])
    assert diagnose(summ, hang_after_s=2.0) == diagnose([summ], hang_after_s=2.0)
    assert diagnose([summ])["source"] == "summaries"
    assert "source" not in diagnose([])  # an empty list: no recordings


def test_the_opening_is_what_the_evidence_reads(rec):
    run = align_recordings([rec])
    ev = from_recordings([rec])
    assert run.metrics.equals(ev.metrics) and run.steps.equals(ev.steps)
    assert run.offsets == ev.alignment["offsets_ns"] == {"vm": 0}
    assert run.detection.method == ev.detection["method"]


def test_diagnose_dirs_picks_events_or_summaries(rec, tmp_path):
    d = tmp_path / "rec"
    shutil.copytree(DATA / "sim_straggler", d)
    raw = diagnose_dirs([d])
    assert "source" not in raw and _serious(raw) == [("straggler", 2)]
    built = diagnose_dirs([d], from_summaries=True)  # no summaries yet: built from events
    assert built["source"] == "summaries" and built["findings"] == raw["findings"]
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(d / "manifest.json", only / "manifest.json")
    write_summaries(only, build_summaries([load_recording(d)]))
    got = diagnose_dirs([only])  # summaries and no events: from the summaries
    assert got["source"] == "summaries" and _serious(got) == [("straggler", 2)]
