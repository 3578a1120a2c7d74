"""Python stacks without root: py-spy's JSON parsed, /proc threads read from a fake /proc,
pystacks.parquet written and read back (older recordings without it still load), and the
hang finding naming the missing rank's Python function from a recorded hang."""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest

from argus.analyze.diagnosis import diagnose
from argus.analyze.hang import python_stack
from argus.cli import main
from argus.collect import pyspy_dumps
from argus.recording import schema
from argus.recording.io import load_recording, write_recording

pytestmark = pytest.mark.unit

DUMP = [  # py-spy 0.4 `dump --json --native`, trimmed
    {"pid": 100, "thread_id": 1, "thread_name": "MainThread", "os_thread_id": 100,
     "active": False, "owns_gil": False, "frames": [
         {"name": "clock_nanosleep", "filename": "/usr/lib/x86_64-linux-gnu/libc.so.6",
          "module": "/usr/lib/x86_64-linux-gnu/libc.so.6", "line": 0},
         {"name": "stuck_in_data_loading", "filename": "/job/train.py", "module": None,
          "line": 47},
         {"name": "main", "filename": "/job/train.py", "module": None, "line": 120},
         {"name": "0x7f66f2a4f24a", "filename": "/usr/lib/x86_64-linux-gnu/libc.so.6",
          "module": "/usr/lib/x86_64-linux-gnu/libc.so.6", "line": 0}]},
    {"pid": 100, "thread_id": 2, "thread_name": "loader", "os_thread_id": 102,
     "active": True, "owns_gil": True, "frames": [
         {"name": "decode", "filename": "/job/data.py", "module": None, "line": 9}]},
]


def test_parse_dump_normalises_frames():
    threads = pyspy_dumps.parse_dump(json.dumps(DUMP), 100)
    main_t, loader = threads
    assert (main_t.tid, main_t.thread, main_t.state, main_t.owns_gil) == (
        100, "MainThread", "idle", False)
    assert [f["kind"] for f in main_t.frames] == ["native", "python", "python", "native"]
    assert main_t.frames[0]["line"] is None  # py-spy's 0 = unknown
    top = pyspy_dumps.innermost_python(main_t.frames)
    assert pyspy_dumps.where(top) == "stuck_in_data_loading (train.py:47)"
    assert (loader.state, loader.owns_gil) == ("running", True)


def _fake_proc(root, tgid, threads):
    for tid, name, letter, wchan in threads:
        d = root / str(tgid) / "task" / str(tid)
        d.mkdir(parents=True)
        (d / "stat").write_text(f"{tid} ({name}) {letter} 1 1 1 0 -1 0")
        (d / "comm").write_text(name + "\n")
        (d / "wchan").write_text(wchan)


def test_proc_threads_name_state_and_wchan(tmp_path):
    _fake_proc(tmp_path, 7, [(7, "a b)", "S", "futex_wait_queue"), (9, "worker", "R", "0")])
    t = pyspy_dumps.proc_threads(7, str(tmp_path))
    assert [(x.tid, x.thread, x.state, x.wchan) for x in t] == [
        (7, "a b)", "sleeping", "futex_wait_queue"), (9, "worker", "running", None)]
    assert t[0].frames[0]["function"] == "futex_wait_queue" and t[1].frames == []


def test_missing_py_spy_is_one_sentence_with_a_remedy(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(pyspy_dumps, "find_py_spy", lambda: None)
    import os

    assert main(["stacks", str(os.getpid())]) == 1
    err = capsys.readouterr().err
    assert "py-spy is not installed" in err and "pip install py-spy" in err
    assert "Traceback" not in err


def test_missing_pid_is_a_target_error(capsys):
    assert main(["stacks", "999999999"]) == 1
    assert "no process with PID 999999999" in capsys.readouterr().err


def test_blocked_tgids_needs_an_old_in_flight_call():
    ev = pl.DataFrame({"ts_ns": [1_000, 9_000_000_000, 2_000], "tgid": [1, 2, 3],
                       "in_flight": [True, True, False]})
    assert pyspy_dumps.blocked_tgids(ev, 10_000_000_000, after_s=5.0) == [1]
    assert pyspy_dumps.blocked_tgids(ev, 10_000_000_000, after_s=20.0) == []


def _dumps(tgids_ranks):
    out = []
    for tgid, rank in tgids_ranks:
        threads = pyspy_dumps.parse_dump(json.dumps(DUMP), tgid)
        for t in threads:
            t.tgid = tgid
        threads[0].tid = tgid
        if rank != 3:  # waiting ranks sit in the backward's allreduce
            threads[0].frames[1] = {"function": "backward", "file": "/torch/_tensor.py",
                                    "line": 625, "kind": "python", "module": None}
        out.append(pyspy_dumps.ProcessStacks(tgid=tgid, rank=rank, comm="python3",
                                          python=True, threads=threads, ts_ns=5))
    return out


def test_recorded_hang_names_the_missing_ranks_python_function(tmp_path):
    rec_dir = tmp_path / "rec"
    shutil.copytree("tests/data/sim_hang", rec_dir)
    old = load_recording(rec_dir)  # an older recording: no pystacks.parquet
    assert old.pystacks.height == 0 and old.pystacks.columns == list(schema.PYSTACKS_SCHEMA)
    ranks = [(r["tgid"], r["rank"]) for r in old.manifest["ranks"]]
    frame = pyspy_dumps.to_frame(_dumps(ranks))
    out = tmp_path / "rec2"
    write_recording(out, old.manifest, old.events, old.stacks, pystacks=frame)
    rec = load_recording(out)
    assert rec.pystacks.height == 2 * len(ranks)
    assert python_stack(rec.pystacks, 3)["where"] == "stuck_in_data_loading (train.py:47)"
    (h,) = [f for f in diagnose([rec], hang_after_s=2.0)["findings"]
            if f["kind"] == "collective_hang"]
    (m,) = h["missing_python_stacks"]
    assert (m["rank"], m["function"], m["file"], m["line"], m["thread"]) == (
        3, "stuck_in_data_loading", "/job/train.py", 47, "MainThread")
    assert m["frames"] == ["stuck_in_data_loading (train.py:47)", "main (train.py:120)"]
    w = h["waiting_python_stack"]
    assert (w["rank"], w["where"]) == (0, "backward (_tensor.py:625)")
    assert "rank 3 is stuck in Python stuck_in_data_loading (train.py:47)" in h["summary"]
    # without the dump the finding is what it was
    (h0,) = [f for f in diagnose([old], hang_after_s=2.0)["findings"]
             if f["kind"] == "collective_hang"]
    assert h0["missing_python_stacks"] == [] and h0["waiting_python_stack"] is None
    assert "rank 3 is in cpu_busy" in h0["summary"]


def test_hotspot_attribution_prefers_the_innermost_python_frame():
    from argus.analyze.hotspot import attribute, own_frames

    fns = ["do_syscall_64", "_PyEval_EvalFrameDefault", "burn", "_PyEval_EvalFrameDefault",
           "main", "_start"]
    mods = ["[kernel]", "/usr/bin/python3.11", "py:/job/train.py:12", "/usr/bin/python3.11",
            "py:/job/train.py:40", "/usr/bin/python3.11"]
    assert attribute(fns, mods) == "burn (train.py:12)"
    assert own_frames(fns, mods) == ["burn (train.py:12)", "main (train.py:40)"]
    # no Python frames: as before (the leaf-most frame outside a shared library)
    assert attribute(["_PyEval_EvalFrameDefault", "x"], ["/usr/bin/python3.11", None]) == (
        "_PyEval_EvalFrameDefault"
    )
    # waiting in the CUDA API stays unattributed even under Python frames
    assert attribute(["cudaStreamSynchronize", "step"], ["libcudart.so.12",
                                                         "py:/job/train.py:3"]) is None
