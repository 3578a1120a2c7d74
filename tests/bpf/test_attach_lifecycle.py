"""`argus attach` when its target ends while argus is starting (before the exit tracepoint is
attached): the attach must end at once, saying so, never trace a zombie forever.

The exit is injected deterministically: the BPF compile (the slow part of the start-up) is
wrapped so that the target ends first; the test process is the launcher's parent and does
not reap it until the end, so the launcher stays a zombie (/proc/PID exists) meanwhile.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from argus.cli import main
from argus.collect import bcc_adapter, procfs
from argus.sim.launcher import SimConfig, start_job

pytestmark = pytest.mark.bpf


def _wait_state(tgid: int, states: tuple[str | None, ...], timeout: float = 20.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = procfs.state(tgid)
        if st in states:
            return st
        time.sleep(0.02)
    raise AssertionError(f"process {tgid} never reached state {states} (now {procfs.state(tgid)})")


def _end_during_start(monkeypatch, end) -> dict:
    """Run `end()` when argus compiles its BPF programs, i.e. after it checked the targets
    and before any tracepoint exists. Returns {"compiled": monotonic time the compile
    ended} once it has run."""
    real = bcc_adapter.BpfSession.__init__
    seen: dict = {}

    def init(self, *a, **kw):
        if end is not None:
            end()
        real(self, *a, **kw)
        seen["compiled"] = time.monotonic()

    monkeypatch.setattr(bcc_adapter.BpfSession, "__init__", init)
    return seen


def test_a_launcher_that_becomes_a_zombie_during_start_up_ends_the_attach(
        tmp_path, capsys, monkeypatch):
    job = start_job(SimConfig(ranks=2, steps=1000, wait_go=str(tmp_path / "go"), quiet=True))
    try:
        ranks = job.wait_ready()
        launcher = job.launcher_pid

        def end():
            os.kill(launcher, signal.SIGTERM)  # the launcher stops its ranks and exits
            _wait_state(launcher, ("Z",))  # not reaped: this process never waits for it
            for r in ranks:
                _wait_state(r, (None, "Z"))

        seen = _end_during_start(monkeypatch, end)
        rc = main(["attach", str(launcher), "-o", str(tmp_path / "rec"), "--no-cpu"])
        after_compile = time.monotonic() - seen["compiled"]
        assert procfs.state(launcher) == "Z"  # still a zombie: only the state said it was gone
    finally:
        job.close()
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"argus: process {launcher} exited while argus was starting" in err.splitlines()
    assert "no probe" not in err and "Traceback" not in err
    assert not (tmp_path / "rec").exists()  # nothing recorded: no empty directory left behind
    assert after_compile < 10, after_compile  # it used to trace the zombie until killed


def test_a_rank_that_exits_during_start_up_is_reported_as_exited(tmp_path, capsys, monkeypatch):
    job = start_job(SimConfig(ranks=2, steps=1000, wait_go=str(tmp_path / "go"), quiet=True))
    try:
        ranks = job.wait_ready()

        def end():
            os.kill(ranks[0], signal.SIGKILL)
            _wait_state(ranks[0], (None, "Z"))

        _end_during_start(monkeypatch, end)
        rc = main(["attach", str(ranks[0]), "-o", str(tmp_path / "rec"), "--no-cpu"])
    finally:
        job.close()
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"argus: process {ranks[0]} exited while argus was starting" in err.splitlines()
    assert "no probe" not in err


def test_an_already_zombie_target_is_refused_before_anything_loads(tmp_path, capsys,
                                                                   monkeypatch):
    job = start_job(SimConfig(ranks=2, steps=1000, wait_go=str(tmp_path / "go"), quiet=True))
    try:
        job.wait_ready()
        os.kill(job.launcher_pid, signal.SIGTERM)
        _wait_state(job.launcher_pid, ("Z",))
        seen = _end_during_start(monkeypatch, None)
        rc = main(["attach", str(job.launcher_pid), "-o", str(tmp_path / "rec")])
    finally:
        job.close()
    err = capsys.readouterr().err
    assert rc == 1, err
    assert (f"argus: process {job.launcher_pid} has exited (a zombie its parent has not "
            "reaped yet)") in err.splitlines()
    assert seen == {}  # refused by the target check, before the BPF compile
