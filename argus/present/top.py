"""`argus top`: the live view, one row per rank, refreshed about every second.

It reads through a small reader interface, `Reader.read() -> argus.live/1 state` (see
`argus.present.live`): `DaemonReader` (GET /state of a running `argus daemon`),
`RecordingReader` (recordings on disk: tests, post-mortem), and the attach-backed reader
of `argus top PID...` (`argus.cli.top.AttachReader`). `render(state, ...)` is a
pure function of the state, the sort order and the clock, so it is tested at a fixed
terminal size with recorded data and a frozen clock.

Keys: `s` next sort column, `r` reverse, `q` (or Ctrl-C) quit.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from argus.present.live import job_view, node_state

SORTS = ("rank", "step", "wait", "late", "score")
_SORT_KEY = {"rank": "rank", "step": "step_time_ms", "wait": "wait_ms", "late": "lateness_ms",
             "score": "straggler_score"}


class Reader(Protocol):
    def read(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class DaemonReader:
    """The state of a running daemon, from its loopback HTTP endpoint."""

    def __init__(self, url: str = "http://127.0.0.1:9464/state", timeout_s: float = 2.0):
        self.url = url if url.endswith("/state") else url.rstrip("/") + "/state"
        self.timeout_s = timeout_s

    def read(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url, timeout=self.timeout_s) as r:  # noqa: S310 (loopback)
            return json.loads(r.read())

    def close(self) -> None:
        pass


class RecordingReader:
    """A fixed state built from recordings on disk (one job per directory)."""

    def __init__(self, dirs: Sequence[str | os.PathLike[str]], now_ns: int | None = None):
        from argus.analyze.compress import build_summaries
        from argus.analyze.diagnosis import diagnose
        from argus.recording.io import load_recording

        jobs = []
        host = "?"
        for d in dirs:
            rec = load_recording(d)
            host = rec.host
            jobs.append(job_view(Path(d).name, rec, build_summaries([rec]), diagnose([rec])))
        self.state = node_state(host, jobs, now_ns if now_ns is not None else time.time_ns())

    def read(self) -> dict[str, Any]:
        return self.state

    def close(self) -> None:
        pass


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(state: dict[str, Any], sort: str = "rank", reverse: bool = False,
           now_ns: int | None = None, error: str | None = None) -> Group:
    """The view of one state: a header line, then per job a line and a table of ranks.
    Stragglers are red, hung ranks bold white on red."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    age = max(0.0, (now_ns - int(state.get("now_ns") or now_ns)) / 1e9)
    jobs = state.get("jobs") or []
    head = Text(f"argus top  host {state.get('host', '?')}  jobs {len(jobs)}  "
                f"updated {age:.0f} s ago  sort {sort}{' (rev)' if reverse else ''}  "
                "[s]ort [r]everse [q]uit", style="bold")
    parts: list[Any] = [head]
    if error:
        parts.append(Text(f"cannot read the state: {error}", style="bold red"))
    if not jobs:
        parts.append(Text("no training process traced yet"))
    key = _SORT_KEY[sort]
    for job in jobs:
        steps = job.get("steps") or {}
        flags = [
            f for f in job.get("findings") or [] if f.get("severity") in ("warning", "critical")
        ]
        line = Text(f"job {job.get('job')}: {len(job.get('ranks') or [])} ranks, "
                    f"step p50 {_fmt(steps.get('step_time_ms_p50'))} ms")
        if job.get("analysed") is False:  # the daemon traces it, its first analysis to come
            line.append("  (traced, not analysed yet)", style="dim")
        for f in flags[:2]:
            line.append(
                f"\n  {f['severity'].upper()}: {f.get('summary', '')}",
                style="bold red" if f["severity"] == "critical" else "yellow",
            )
        parts.append(line)
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col, just in (("rank", "right"), ("pid", "right"), ("step ms", "right"),
                          ("compute", "right"), ("wait", "right"), ("late ms", "right"),
                          ("last coll", "left"), ("seq", "right"), ("hot frame", "left"),
                          ("flag", "left")):
            table.add_column(col, justify=just, no_wrap=True, overflow="ellipsis")
        rows = sorted(job.get("ranks") or [], key=lambda r: (r.get(key) is None,
                      r.get(key) if r.get(key) is not None else 0, r.get("rank")),
                      reverse=reverse)
        for r in rows:
            if r.get("hang"):
                flag, style = f"HANG {r.get('hang_waited_s') or 0:.1f}s", "bold white on red"
            elif r.get("straggler"):
                flag, style = f"STRAGGLER {r.get('straggler_score', 0):.1f}", "red"
            elif r.get("exited"):
                flag, style = "exited", "dim"
            else:
                flag, style = "", ""
            table.add_row(str(r.get("rank")), str(r.get("tgid") or "-"),
                          _fmt(r.get("step_time_ms")), _fmt(r.get("compute_ms")),
                          _fmt(r.get("wait_ms")),
                          _fmt(r.get("lateness_ms")), r.get("last_collective") or "-",
                          str(r.get("last_seq") if r.get("last_seq") is not None else "-"),
                          r.get("hot_frame") or "-", flag, style=style)
        parts.append(table)
    return Group(*parts)


class _Keys:
    """Single key presses from a terminal (cbreak mode), none when stdin is not a tty."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin
        self.old = None
        if self.stream.isatty():
            import termios
            import tty

            self.old = termios.tcgetattr(self.stream.fileno())
            tty.setcbreak(self.stream.fileno())

    def get(self, timeout_s: float) -> str | None:
        if self.old is None:
            time.sleep(timeout_s)
            return None
        r, _, _ = select.select([self.stream], [], [], timeout_s)
        return os.read(self.stream.fileno(), 1).decode(errors="ignore") if r else None

    def close(self) -> None:
        if self.old is not None:
            import termios

            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self.old)


def run_top(reader: Reader, refresh_s: float = 1.0, console: Console | None = None,
            iterations: int | None = None, clock: Callable[[], int] = time.time_ns,
            keys: _Keys | None = None) -> int:
    """Refresh the view from `reader` every `refresh_s` until `q` (or `iterations`)."""
    from rich.live import Live

    console = console or Console()
    keys = keys or _Keys()
    sort_i, reverse, n = 0, False, 0
    state: dict[str, Any] = node_state("?", [], clock())
    try:
        with Live(console=console, auto_refresh=False, screen=console.is_terminal) as live:
            while iterations is None or n < iterations:
                err = None
                try:
                    state = reader.read()
                except Exception as e:  # the daemon restarting: keep the last state
                    err = str(e)
                live.update(render(state, SORTS[sort_i], reverse, clock(), err), refresh=True)
                n += 1
                deadline = time.monotonic() + refresh_s
                while (left := deadline - time.monotonic()) > 0:
                    k = keys.get(left)
                    if k in ("q", "Q", "\x03"):
                        return 0
                    if k == "s":
                        sort_i = (sort_i + 1) % len(SORTS)
                    elif k == "r":
                        reverse = not reverse
                    if k in ("s", "r"):
                        live.update(render(state, SORTS[sort_i], reverse, clock(), err),
                                    refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        keys.close()
        reader.close()
    return 0
