"""Python stacks of real processes: `argus stacks` on the Debian and pyenv interpreters and on
a process that is not Python, and the hang finding of a real torchrun DDP (gloo) job whose
rank 1 is stuck in a named Python function (tests/bpf/ddp_train.py --hang-rank).

Root is needed to read another process's memory (py-spy); assertions are on function names,
files and line numbers, never on timings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_torch_ddp import SCRIPT, Job  # tests/ is on the path (pyproject pythonpath)

from argus.analyze.diagnosis import diagnose
from argus.cli import main
from argus.collect.pyspy_dumps import dump_process, find_py_spy, innermost_python
from argus.collect.session import run_session
from argus.collect.tracer import TraceOptions
from argus.recording.io import load_recording

pytestmark = pytest.mark.bpf

TARGET = '''
import sys, threading, time
def parked_in_named_function():
    time.sleep(3600)
def spin_in_named_function():
    while True:
        pass
threading.Thread(target=spin_in_named_function, name="spinner", daemon=True).start()
print("ready", flush=True)
parked_in_named_function()
'''
DEBIAN = "/usr/bin/python3.11"
PYENV = "/root/.pyenv/versions/3.11.7/bin/python3.11"
PYENV_310 = "/root/.pyenv/versions/3.10.13/bin/python3.10"
PYENV_312 = "/root/.pyenv/versions/3.12.1/bin/python3.12"


def _wait_asleep(pid: int, timeout: float = 30.0) -> None:
    """Until the process's main thread sleeps in the kernel in time.sleep (nanosleep; select
    before Python 3.11), i.e. it has reached the call the test looks for (a spinner holding
    the GIL can delay it on a busy box)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            if "nanosleep" in wchan or "poll_schedule_timeout" in wchan:
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never went to sleep")


def _line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


@pytest.fixture(autouse=True)
def _need_py_spy():
    if find_py_spy() is None:
        pytest.skip("py-spy is not installed: `make setup` (pip install py-spy)")


@pytest.mark.parametrize("python", [DEBIAN, PYENV, PYENV_310, PYENV_312])
def test_stacks_of_a_python_process(tmp_path, python, capsys):
    if not Path(python).exists():
        pytest.skip(f"{python} is not on this machine")
    src = tmp_path / "target.py"
    src.write_text(TARGET)
    proc = subprocess.Popen([python, str(src)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        _wait_asleep(proc.pid)  # the main thread is parked in its named function
        assert main(["stacks", str(proc.pid), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        [p] = out["processes"]
        assert p["tgid"] == proc.pid and p["python"] and p["note"] is None
        by_name = {t["thread"]: t for t in p["threads"]}
        main_t, spin = by_name["MainThread"], by_name["spinner"]
        assert main_t["tid"] == proc.pid
        top = innermost_python(main_t["frames"])
        assert top["function"] == "parked_in_named_function"
        assert top["file"] == str(src) and top["line"] == _line_of(TARGET, "time.sleep(3600)")
        # the sleeping thread is blocked in the kernel, the spinner is on CPU
        assert main_t["state"] == "idle" and main_t["wchan"]
        top = innermost_python(spin["frames"])
        assert top["function"] == "spin_in_named_function"
        assert top["line"] in (_line_of(TARGET, "while True"), _line_of(TARGET, "pass"))
        # native frames merged (the sleep happens in libc below the Python frame)
        kinds = [f["kind"] for f in main_t["frames"]]
        assert "native" in kinds and kinds.index("native") < kinds.index("python")
        # the text form names the function with file:line too
        assert main(["stacks", str(proc.pid), "--no-native"]) == 0
        text = capsys.readouterr().out
        assert f"parked_in_named_function (target.py:{_line_of(TARGET, 'time.sleep')})" in text
    finally:
        proc.kill()
        proc.wait()


def test_stacks_of_a_native_process(capsys):
    proc = subprocess.Popen([shutil.which("sleep") or "/bin/sleep", "300"])
    try:
        _wait_asleep(proc.pid)
        d = dump_process(proc.pid)
        assert not d.python and "not a Python process" in d.note
        [t] = d.threads
        assert t.tid == proc.pid and t.thread == "sleep" and t.state == "sleeping"
        assert t.wchan and "sleep" in t.wchan  # hrtimer_nanosleep / do_nanosleep
        assert main(["stacks", str(proc.pid)]) == 0
        assert "not a Python process" in capsys.readouterr().out
    finally:
        proc.kill()
        proc.wait()


def test_hung_ddp_rank_is_named_with_its_python_function(tmp_path, capsys):
    job = Job(tmp_path, 2, 30, "--compute-ms", "20", "--hang-rank", "1", "--hang-step", "5")
    hung = job.truth_dir / "hung.1"
    seen: dict[str, float] = {}

    def stop() -> bool:  # 13 s after rank 1 got stuck: past the 10 s hang threshold
        if "t" not in seen and hung.exists():
            seen["t"] = time.monotonic()
        return "t" in seen and time.monotonic() - seen["t"] > 13

    try:
        job.wait_ready()
        result = run_session(
            [job.proc.pid], tmp_path / "rec", TraceOptions(), duration_s=150,
            on_started=lambda tracer: job.go.touch(), should_stop=stop,
        )
        assert hung.exists(), (tmp_path / "torchrun.log").read_text()[-2000:]
        # on demand, through the launcher PID: both ranks, rank 1 in the named function
        assert main(["stacks", str(job.proc.pid), "--json", "--no-native"]) == 0
        live = json.loads(capsys.readouterr().out)
    finally:
        job.close()
    line = _line_of(SCRIPT.read_text(), "time.sleep(3600)")
    assert sorted(p["rank"] for p in live["processes"]) == [0, 1]
    r1 = next(p for p in live["processes"] if p["rank"] == 1)
    main1 = next(t for t in r1["threads"] if t["tid"] == r1["tgid"])
    assert innermost_python(main1["frames"])["function"] == "stuck_in_data_loading"

    rec = load_recording(result.path)
    assert rec.manifest["pystacks"]["taken"], rec.manifest.get("pystacks")
    assert set(rec.pystacks["rank"].to_list()) == {0, 1}
    report = diagnose([rec])
    [h] = [f for f in report["findings"] if f["kind"] == "collective_hang"]
    assert h["missing_ranks"] == [1] and h["waiting_ranks"] == [0], h
    [m] = h["missing_python_stacks"]
    assert (m["rank"], m["function"], m["line"]) == (1, "stuck_in_data_loading", line)
    assert m["file"] == str(SCRIPT)
    assert f"stuck_in_data_loading (ddp_train.py:{line})" in h["summary"]
    w = h["waiting_python_stack"]
    assert w["rank"] == 0 and w["function"] != "stuck_in_data_loading"


def test_native_ranks_show_their_own_frames_and_run_on(tmp_path):
    # a C rank (the simulator's, built with frame pointers): argus stacks --native walks
    # its frames (run_step called from main), each thread stopped only for its walk; the
    # job then completes every step as planned
    from argus.sim.launcher import SimConfig, start_job

    job = start_job(SimConfig(ranks=2, steps=300, truth=str(tmp_path / "t.json"), quiet=True))
    try:
        ranks = job.wait_ready()
        deadline, frames = time.monotonic() + 30, []
        while time.monotonic() < deadline:
            d = dump_process(ranks[0], native=True)
            main_thread = next(t for t in d.threads if t.tid == ranks[0])
            frames = [f["function"] for f in main_thread.frames if f["kind"] == "native"]
            if "run_step" in frames:
                break
        assert "run_step" in frames and frames.index("run_step") < frames.index("main"), frames
        assert main_thread.frames[-1]["kind"] == "kernel" or main_thread.state == "running"
        assert job.wait(120) == 0
    finally:
        job.close()
    assert [r["steps_completed"] for r in job.truth()["ranks"]] == [300, 300]
