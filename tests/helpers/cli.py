"""`argus` run as a user runs it: a separate process, its stderr read line by line.

    cli = ArgusProcess(["attach", str(pid), "-o", str(out)])
    cli.wait_for("argus: tracing")      # probes are live: release the job now
    rc = cli.wait(60)                   # exit code; cli.out / cli.err hold the output

A job is released only once argus says it traces it (never before: its first steps would
be missed, or the whole job when argus starts slowly on a busy machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ARGUS = str(Path(sys.executable).with_name("argus"))


class ArgusProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([ARGUS, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.err_lines: list[str] = []
        self.out_parts: list[str] = []
        self.lines_at: list[float] = []  # monotonic time each stderr line arrived
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            with self._cv:
                self.err_lines.append(line.rstrip("\n"))
                self.lines_at.append(time.monotonic())
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def _read_out(self) -> None:
        for chunk in self.proc.stdout:
            self.out_parts.append(chunk)

    def wait_for(self, text: str, timeout: float = 120.0) -> float:
        """Block until a stderr line contains `text`; returns when it arrived (monotonic).
        Fails when argus exits first or the bound passes."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line, at in zip(self.err_lines, self.lines_at, strict=True):
                    if text in line:
                        return at
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None
                                 and not self._threads[0].is_alive()):
                    raise AssertionError(f"argus never printed {text!r}:\n{self.err}")
                self._cv.wait(min(left, 0.5))

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 120.0) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def err(self) -> str:
        return "\n".join(self.err_lines)

    @property
    def out(self) -> str:
        return "".join(self.out_parts)
