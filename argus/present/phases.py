"""What a long command is doing, on stderr: one line per phase ("argus: compiling ..."),
or, where stderr is a terminal, a rich spinner that says it (and leaves each phase's line
behind once the next one starts). Machine formats on stdout are never touched.

`say(text)` starts a phase; `tick(text)` updates the running one (a live count: on a
terminal at every call, otherwise at most one line per `every_s`); `close()` ends.
"""

from __future__ import annotations

import sys
import time
from typing import IO


class Phases:
    def __init__(self, stream: IO[str] | None = None, every_s: float = 30.0,
                 prefix: str = "argus: ", clock=time.monotonic, plain: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # plain False: nothing but the terminal's spinner (commands whose stderr stays quiet
        # in scripts, e.g. `argus report --json`)
        self.plain = plain
        self.every_s = every_s
        self.prefix = prefix
        self.clock = clock
        self._status = None
        self._last_tick = None

    def _console(self):
        from rich.console import Console

        return Console(file=self.stream, highlight=False)

    def say(self, text: str) -> None:
        """A new phase: its line (plain), or the spinner's text (terminal)."""
        self._last_tick = None
        if not self.tty:
            if self.plain:
                print(f"{self.prefix}{text}", file=self.stream, flush=True)
            return
        if self._status is None:
            self._status = self._console().status(f"{self.prefix}{text}")
            self._status.start()
        else:
            self._status.update(f"{self.prefix}{text}")

    def tick(self, text: str) -> None:
        """The running phase's live count."""
        now = self.clock()
        if self.tty:
            self.say(text)
            return
        if self.plain and (self._last_tick is None or now - self._last_tick >= self.every_s):
            print(f"{self.prefix}{text}", file=self.stream, flush=True)
            self._last_tick = now

    def echo(self, line: str) -> None:
        """A line that stays (above the spinner on a terminal)."""
        if self._status is not None:
            self._status.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
