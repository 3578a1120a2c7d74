"""`argus top` once in a real terminal (tmux) against the simulator: the live screen shows
the straggler, keys sort and quit; quitting detaches every probe and the job runs on."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers.breakpoints import anonymous_text_kb, breakpoints

from argus.sim.launcher import SimConfig, find_build_dir, start_job

pytestmark = pytest.mark.bpf
REPO = Path(__file__).resolve().parents[2]


def _tmux(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", *args], capture_output=True, text=True)


def _screen(session: str) -> str:
    return _tmux("capture-pane", "-p", "-t", session).stdout


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.5)
    return False


def _cmdline(p: Path) -> str:
    try:
        return p.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _holders(launcher: int) -> list[str]:
    return [p.name for p in Path("/proc").iterdir() if p.name.isdigit()
            and _cmdline(p).endswith(f"top {launcher}")]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make setup)")
def test_top_in_tmux_shows_the_straggler_and_quits_on_q(tmp_path):
    src = find_build_dir()
    for d in ("sim", "stubs"):  # a private copy: no other test's uprobes on its inodes
        shutil.copytree(src / d, tmp_path / "build" / d, symlinks=True)
    stubs = tmp_path / "build" / "stubs"
    job = start_job(SimConfig(ranks=3, steps=3000, faults=["straggler:rank=1,factor=1.6"],
                              build_dir=str(tmp_path / "build"), quiet=True))
    session = f"argus-top-{job.launcher_pid}"
    try:
        ranks = job.wait_ready()
        # The size comes from the tmux pane, not from variables pytest may have set.
        argus = REPO / ".venv" / "bin" / "argus"
        cmd = f"env -u COLUMNS -u LINES {argus} top {job.launcher_pid}"
        started = _tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "30", cmd)
        assert started.returncode == 0, started.stderr

        def straggler_row() -> bool:
            rows = [ln.split() for ln in _screen(session).splitlines()]
            row = next((r for r in rows if len(r) > 2 and r[0] == "1" and r[1] == str(ranks[1])),
                       None)
            return row is not None and "STRAGGLER" in row

        assert _wait(straggler_row, 90), _screen(session)
        assert all(breakpoints(r, stubs) for r in ranks)  # probes in place
        screen = _screen(session)
        assert "sort rank" in screen.splitlines()[0]
        for rank, tgid in ((0, ranks[0]), (2, ranks[2])):  # only rank 1 is flagged
            row = next(ln for ln in screen.splitlines() if ln.split()[:2] == [str(rank), str(tgid)])
            assert "STRAGGLER" not in row
        _tmux("send-keys", "-t", session, "s")
        assert _wait(lambda: "sort step" in _screen(session).splitlines()[0], 10), _screen(session)
        _tmux("send-keys", "-t", session, "q")
        assert _wait(lambda: _tmux("has-session", "-t", session).returncode != 0, 60)
        # quitting skipped the last analysis, not the teardown: the probes are released by
        # a background holder process once argus has exited (the kernel takes ~0.2 s per
        # uprobe); then no breakpoint is left in the ranks' text and the job goes on
        _wait(lambda: not any(breakpoints(r, stubs) for r in ranks), 120)
        left = {r: breakpoints(r, stubs) for r in ranks}
        assert left == {r: [] for r in ranks}, (
            left, {r: anonymous_text_kb(r, stubs) for r in ranks}, _holders(job.launcher_pid))
        assert job.proc.poll() is None
        assert _holders(job.launcher_pid) == []  # the holder has exited too
    finally:
        _tmux("kill-session", "-t", session)
        job.close()
