"""Layout discovery and validation of CPython interpreters (argus/collect/cpython_walk.py).

No root and no BPF: each interpreter on this machine runs a child process that this test may
read (/proc/PID/mem of one's own child); the layout found from its binary must validate
against it, name the child's frames, and a wrong layout must be refused with a reason.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from argus.collect import abi, cpython_walk, procfs
from argus.collect.channels.cpu import PythonStacks

pytestmark = pytest.mark.unit

PYTHONS = {
    (3, 10): "/root/.pyenv/versions/3.10.13/bin/python3.10",
    (3, 11): "/root/.pyenv/versions/3.11.7/bin/python3.11",
    (3, 12): "/root/.pyenv/versions/3.12.1/bin/python3.12",
    (3, 13): "/root/.pyenv/versions/3.13.0/bin/python3.13",
    "debian": "/usr/bin/python3.11",
}
TARGET = """
import sys, threading, time
def parked_in_helper_thread():
    time.sleep(3600)
def nested_caller():
    return sorted([3, 1, 2], key=lambda v: (print("ready", flush=True), time.sleep(3600)))
threading.Thread(target=parked_in_helper_thread, name="helper", daemon=True).start()
time.sleep(0.2)
nested_caller()
"""


@pytest.fixture(params=list(PYTHONS), ids=lambda k: "-".join(map(str, k)) if k != "debian" else k)
def child(request, tmp_path):
    python = PYTHONS[request.param]
    if not Path(python).exists():
        pytest.skip(f"{python} is not on this machine")
    src = tmp_path / "target.py"
    src.write_text(TARGET)
    proc = subprocess.Popen([python, str(src)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05)
        maps = procfs.parse_maps(Path(f"/proc/{proc.pid}/maps").read_text())
        yield request.param, proc.pid, maps, python, src
    finally:
        proc.kill()
        proc.wait()


def _open(pid, maps, python):
    interp = cpython_walk.find_interpreter(pid, maps, exe=os.path.realpath(python))
    return interp, cpython_walk.Memory(pid)


def test_layout_is_found_from_the_binary_and_validates(child):
    which, pid, maps, python, src = child
    interp, mem = _open(pid, maps, python)
    try:
        if which == "debian":  # non-PIE, libpython linked in: _PyRuntime is in the executable
            assert interp.path == python and interp.version == (3, 11)
            assert interp.runtime < 1 << 32  # an absolute address, no load base
        else:
            assert os.path.basename(interp.path).startswith(f"libpython{which[0]}.{which[1]}")
            assert interp.version == which
        lay = cpython_walk.choose_layout(mem, interp)
        assert lay.source == ("_Py_DebugOffsets" if which == (3, 13) else "table")
        tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
        v = cpython_walk.validate(mem, interp, lay, tids)
        assert set(v.threads) == tids  # main + helper, each thread state names its thread
        assert v.pthread_tid == (cpython_walk.GLIBC_PTHREAD_TID if which == (3, 10) else 0)
        cfg = cpython_walk.bpf_config(interp, v)
        assert cfg.runtime == interp.runtime and bool(cfg.flags & abi.PY_PTHREAD) == lay.pthread
        # the main thread's frames, as the BPF walk records them, name the code
        reader = cpython_walk.CodeReader(mem, interp, lay)
        frames = cpython_walk.walk(mem, lay, v.threads[pid])
        names = [reader.code(addr) for addr, _ in frames]
        lines = TARGET.splitlines()
        first = {n: i for i, ln in enumerate(lines, 1) for n in ["nested_caller"]
                 if f"def {n}" in ln}
        py_names = [c.name for c in names]
        lam = "nested_caller.<locals>.<lambda>" if which != (3, 10) else "<lambda>"
        assert py_names == [lam, "nested_caller", "<module>"], py_names
        assert names[1].file == str(src) and names[1].firstlineno == first["nested_caller"]
        # sorted() is a C function between <lambda> and nested_caller: the lambda runs in a
        # C-level eval call of its own, so it is an entry frame on every version
        assert frames[0][1] is True
        assert frames[2][1] is True  # <module>: the outermost frame
        if which == (3, 10):
            assert all(e for _, e in frames)
        helper = cpython_walk.walk(mem, lay, next(ts for t, ts in v.threads.items() if t != pid))
        assert reader.code(helper[0][0]).name == "parked_in_helper_thread"
    finally:
        mem.close()


@pytest.mark.parametrize(
    "change, why",
    [
        ({"threads_head": 24}, ""),
        ({"ts_interp": 24}, "does not point back"),
        ({"ts_tid": 120}, ""),
        ({"frame_code": 40}, ""),
    ],
)
def test_a_wrong_layout_is_refused_with_the_reason(child, change, why):
    which, pid, maps, python, _ = child
    interp, mem = _open(pid, maps, python)
    try:
        lay = cpython_walk.choose_layout(mem, interp)
        wrong = dataclasses.replace(lay, **change)
        tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
        with pytest.raises(cpython_walk.LayoutRefused) as e:
            cpython_walk.validate(mem, interp, wrong, tids)
        assert "does not fit" in str(e.value) and why in str(e.value)
        assert not e.value.transient
    finally:
        mem.close()


def test_unsupported_version_is_refused():
    interp = cpython_walk.Interpreter("/x/libpython3.9.so", (3, 9), 0x1000, 0, 0)

    class NoMem:
        def read(self, addr, n):
            return b"\0" * n

    with pytest.raises(cpython_walk.LayoutRefused, match="Python 3.9 is not supported"):
        cpython_walk.choose_layout(NoMem(), interp)


def test_debug_offsets_blob_is_parsed():
    names = cpython_walk._DEBUG_FIELDS
    vals = dict.fromkeys(names, 0)
    vals.update(version=0x030D00F0, rt_interpreters_head=632, is_threads_head=7344,
                ts_native_thread_id=160, ts_current_frame=72, ts_next=8, ts_interp=16,
                fr_executable=0, fr_previous=8, fr_owner=70, co_filename=112, co_name=120,
                co_qualname=128, co_firstlineno=68, un_asciiobject_size=40)
    blob = cpython_walk.DEBUG_COOKIE + struct.pack(f"<{len(names)}Q", *(vals[n] for n in names))
    lay = cpython_walk.layout_from_debug_offsets(blob)
    assert lay.version == (3, 13) and lay.source == "_Py_DebugOffsets"
    assert (lay.interp_head, lay.threads_head, lay.ts_tid, lay.ts_frame) == (632, 7344, 160, 72)
    assert lay.cframe_frame is None and lay.frame_owner == 70 and lay.compact_data == 56
    assert lay.flags == abi.PY_OWNER
    assert cpython_walk.layout_from_debug_offsets(b"\0" * len(blob)) is None
    free = dict(vals, free_threaded=1)
    blob = cpython_walk.DEBUG_COOKIE + struct.pack(f"<{len(names)}Q", *(free[n] for n in names))
    assert cpython_walk.layout_from_debug_offsets(blob) is None


def test_table_rows_match_the_flags_the_bpf_walk_needs():
    assert cpython_walk.LAYOUTS[(3, 10)].flags == abi.PY_PTHREAD | abi.PY_ALL_ENTRY
    assert cpython_walk.LAYOUTS[(3, 11)].flags == abi.PY_CFRAME | abi.PY_IS_ENTRY
    assert cpython_walk.LAYOUTS[(3, 12)].flags == abi.PY_CFRAME | abi.PY_OWNER


def test_merge_puts_python_frames_at_the_eval_frames():
    native = ["leaf", "_PyEval_EvalFrameDefault", "PyObject_Call", "_PyEval_EvalFrameDefault",
              "main"]
    mods = ["libc.so.6", "python3.11", "python3.11", "python3.11", "python3.11"]
    py = [("inner", "py:/a.py:3", False), ("mid", "py:/a.py:9", True), ("top", "py:/a.py:1", True)]
    fns, ms = cpython_walk.merge_frames(native, mods, py)
    assert fns == ["leaf", "inner", "mid", "PyObject_Call", "top", "main"]
    assert ms == ["libc.so.6", "py:/a.py:3", "py:/a.py:9", "python3.11", "py:/a.py:1",
                  "python3.11"]
    # no eval frame in the native stack (no frame pointers): the Python frames follow it
    fns, _ = cpython_walk.merge_frames(["leaf", "[unknown]"], ["libc.so.6", "[unknown]"], py)
    assert fns == ["leaf", "[unknown]", "inner", "mid", "top"]
    assert cpython_walk.merge_frames(native, mods, []) == (native, mods)


def test_attach_summary_names_python_frames_and_refusals(tmp_path):
    from argus.cli.attach import summary_lines

    manifest = {"duration_s": 3.0, "end_reason": "duration", "ranks": [], "probes": [],
                "counts": {"events": {}, "stack_samples": 10}, "drops": {},
                "python_stacks": {"processes": {
                    "10": {"status": "attached", "python": "3.11", "note": ""},
                    "11": {"status": "refused", "python": None,
                           "note": "Python 3.9 is not supported (3.10, 3.11, 3.12, 3.13+)"},
                    "12": {"status": "not_python", "python": None, "note": "no CPython found"},
                }}}
    lines = summary_lines(manifest, tmp_path)
    assert "Python frames in CPU samples: 1 of 2 Python process(es) (Python 3.11)" in lines
    refused = "  no Python frames for 11: Python 3.9 is not supported (3.10, 3.11, 3.12, 3.13+)"
    assert refused in lines
    assert not any("for 12:" in ln for ln in lines)


class _FakeTable(dict):
    def __setitem__(self, k, v):
        super().__setitem__(k.value, v)

    def __delitem__(self, k):
        super().__delitem__(k.value)


class _FakeSession:
    def __init__(self):
        self.tables = {"py_procs": _FakeTable(), "py_tstates": _FakeTable()}

    def table(self, name):
        return self.tables[name]


def test_session_configures_forgets_and_reconfigures_after_exec(child):
    which, pid, maps, python, src = child
    sess = _FakeSession()
    ps = PythonStacks(sess)
    ps.ensure(pid, maps, os.path.realpath(python))
    st = ps.manifest()["processes"][str(pid)]
    assert st["status"] == "attached" and st["note"] == "", st
    cfg = sess.tables["py_procs"][pid]
    # every thread's PyThreadState is handed to the kernel (the BPF search is a fallback)
    assert set(sess.tables["py_tstates"]) == {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    sess.tables["py_tstates"].clear()
    ps.refresh_threads()
    assert pid in sess.tables["py_tstates"]
    assert cfg.runtime and cfg.frame_prev == cpython_walk.choose_layout(
        cpython_walk.Memory(pid), cpython_walk.find_interpreter(pid, maps, exe=python)).frame_prev
    # a traced process that exec's: its entry leaves the kernel, the next scan configures
    # the new image again
    ps.forget(pid)
    assert pid not in sess.tables["py_procs"]
    ps.ensure(pid, maps, os.path.realpath(python))
    assert pid in sess.tables["py_procs"]
    # a process that is not Python is "not_python", never "refused"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.05)
        smaps = procfs.parse_maps(Path(f"/proc/{sleeper.pid}/maps").read_text())
        ps.ensure(sleeper.pid, smaps, procfs.exe(sleeper.pid))
        assert ps.manifest()["processes"][str(sleeper.pid)]["status"] == "not_python"
    finally:
        sleeper.kill()
        sleeper.wait()
