"""`argus doctor` on this real machine, and on a real process that loads the real libcudart."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.reallibs import LIBCUDART_VERSION, real_libcudart  # noqa: E402

from argus import doctor  # noqa: E402
from argus.doctor import Status  # noqa: E402

pytestmark = pytest.mark.bpf

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable

TARGET = """
import ctypes, sys, time
ctypes.CDLL(sys.argv[1])
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the bpf tier needs root (bcc loads BPF programs)")


@pytest.fixture
def cudart_process() -> Iterator[tuple[int, Path]]:
    lib = real_libcudart()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "SECRET_TOKEN": "hunter2-live",
    }
    proc = subprocess.Popen(
        [PYTHON, "-c", TARGET, str(lib)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc.pid, lib
    finally:
        proc.kill()
        proc.wait()


def test_this_machine_can_trace() -> None:
    checks = doctor.run_checks()
    failed = [(c.name, c.detail) for c in checks if c.status == Status.FAIL]
    assert failed == []
    by = {c.name: c for c in checks}
    assert by["bcc"].status == Status.PASS  # headers + verifier really work
    assert by["privileges"].status == Status.PASS
    assert doctor.exit_code(checks) == 0


def test_real_libcudart_process_is_reported(cudart_process: tuple[int, Path]) -> None:
    tgid, lib = cudart_process
    report = doctor.run_doctor(tgid)
    by = {c.name: c for c in report.checks}
    assert by[f"process {tgid}"].status == Status.PASS
    assert by[f"libraries {tgid}"].status == Status.PASS
    assert f"libcudart {LIBCUDART_VERSION} ({lib.resolve()})" in by[f"libraries {tgid}"].detail
    assert by[f"rank {tgid}"].detail == "rank 3, local rank 1, world size 4 (from RANK)"
    (info,) = report.processes
    (cudart,) = [x for x in info["libraries"] if x["name"] == "libcudart"]  # type: ignore[union-attr]
    assert cudart["path"] == str(lib.resolve())
    assert cudart["soname"] == "libcudart.so.12"
    assert int(str(cudart["base"]), 16) > 0
    assert "hunter2" not in repr(report.to_json_obj())
    # the process is Python (ctypes loads the library): its CPU samples get Python frames
    py = by[f"python {tgid}"]
    assert py.status == Status.PASS and py.detail.startswith("CPython 3."), py
    assert info["python_frames"]["ok"] is True  # type: ignore[index]
    assert report.ok


def _argus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-c", "from argus.cli import run; run()", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_cli_missing_pid_exits_1_one_sentence() -> None:
    res = _argus("doctor", "-p", "999999")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stderr.strip() == "argus cannot trace: no process with PID 999999."


def test_cli_bad_pid_exits_2() -> None:
    res = _argus("doctor", "-p", "notanumber")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "Invalid value for '-p'" in res.stderr
