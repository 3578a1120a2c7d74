"""argus attach: bad input is one sentence and the right exit code, before anything attaches."""

import os
import subprocess
import sys

import pytest

from argus.cli import main

pytestmark = pytest.mark.unit


def test_missing_pid_is_one_sentence_exit_1(capsys, tmp_path):
    out = tmp_path / "rec"
    assert main(["attach", "999999", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "argus: no process with PID 999999"
    assert "Traceback" not in err
    assert not out.exists()  # nothing created for a bad target


def test_process_without_training_libraries_is_refused(capsys, tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert main(["attach", str(p.pid), "-o", str(tmp_path / "rec")]) == 1
    finally:
        p.kill()
        p.wait()
    err = capsys.readouterr().err
    assert f"process {p.pid}" in err and "nothing to probe" in err


def test_attaching_to_argus_itself_is_refused(capsys, tmp_path):
    assert main(["attach", str(os.getpid()), "-o", str(tmp_path / "rec")]) == 1
    assert "this argus process itself" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["attach"], ["attach", "abc"], ["attach", "1", "-d", "0"], ["attach", "1", "-F", "0"],
     ["attach", "1", "--no-cuda", "--no-nccl", "--no-torch", "--no-cpu"]],
)
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("argus, version ")
