"""Current Python + native stacks of every thread of a process, on demand (`argus stacks`)
and at the end of an `argus attach` session that ends with ranks blocked (hang evidence).

Why py-spy (a dependency, `py-spy` on PyPI, MIT, the de-facto tool operators already run by
hand for exactly this): a one-shot dump of every thread's Python frames, including threads
that are blocked off-CPU, needs the interpreter's thread list, frame chain and code objects
of every CPython version a training image may use (3.8 .. 3.13), read from another process's
memory. py-spy does that from the outside (process_vm_readv, no code injected, no restart),
pauses the target only for the few milliseconds of the read, and keeps its offsets current
with every CPython release; reimplementing it would be a second, less tested copy. The always-on
CPU sampler (bpf/cpu_stacks.bpf.c) is a different problem (in-kernel, at sample time).

Only the py-spy binary installed with argus (next to the running interpreter, i.e. in the
venv's bin) or found on PATH is executed; nothing taken from a recording or a config is run.
Its arguments are fixed here; only the PID varies.

Threads py-spy does not report (a native thread of a Python process, or every thread of a
process that is not Python) are listed from /proc/TGID/task/*: name, state and the kernel
function the thread sleeps in (wchan), so "blocked in futex_wait" still shows.

Frames are normalised to {"function", "file", "line", "kind": "python"|"native", "module"},
innermost first (py-spy's order).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from argus.collect import identity, procfs
from argus.collect.native_stacks import NativeUnavailable, native_frames
from argus.errors import ArgusError, PermissionDenied, TargetNotFound

PY_SPY = "py-spy"
DUMP_TIMEOUT_S = 20.0


class PySpyMissing(ArgusError):
    """The py-spy binary is not installed."""

    default_remedy = (
        "Install it into argus's environment: `pip install py-spy` (argus depends on it; "
        "`make setup` installs it)."
    )


@dataclass
class ThreadStack:
    tgid: int
    tid: int
    thread: str
    state: str  # "running" | "idle" (py-spy: holds no CPU) | a /proc state letter word
    owns_gil: bool | None = None
    wchan: str | None = None  # kernel function the thread sleeps in (native threads)
    frames: list[dict[str, Any]] = field(default_factory=list)  # innermost first
    source: str = "py-spy"  # "py-spy" | "procfs"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tgid": self.tgid,
            "tid": self.tid,
            "thread": self.thread,
            "state": self.state,
            "owns_gil": self.owns_gil,
            "wchan": self.wchan,
            "source": self.source,
            "frames": self.frames,
        }


@dataclass
class ProcessStacks:
    tgid: int
    rank: int | None
    comm: str
    python: bool  # py-spy read the interpreter
    threads: list[ThreadStack]
    note: str | None = None  # why there are no Python frames, when there are none
    ts_ns: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tgid": self.tgid,
            "rank": self.rank,
            "comm": self.comm,
            "python": self.python,
            "note": self.note,
            "ts_ns": self.ts_ns,
            "threads": [t.to_dict() for t in self.threads],
        }


def find_py_spy() -> str | None:
    """The py-spy binary next to the running interpreter (the venv's bin), else on PATH."""
    local = Path(sys.executable).with_name(PY_SPY)
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(PY_SPY)


def _frame(f: dict[str, Any]) -> dict[str, Any]:
    module = f.get("module")
    name = str(f.get("name") or "?")
    native = bool(module) or name.startswith("0x")
    line = f.get("line")
    return {
        "function": name,
        "file": f.get("filename"),
        "line": int(line) if isinstance(line, int) and line > 0 else None,
        "kind": "native" if native else "python",
        "module": module,
    }


def parse_dump(text: str, tgid: int) -> list[ThreadStack]:
    """py-spy `dump --json` output -> ThreadStack per thread (frames innermost first)."""
    out = []
    for t in json.loads(text):
        out.append(
            ThreadStack(
                tgid=int(t.get("pid") or tgid),
                tid=int(t.get("os_thread_id") or 0),
                thread=str(t.get("thread_name") or ""),
                state="running" if t.get("active") else "idle",
                owns_gil=t.get("owns_gil"),
                frames=[_frame(f) for f in t.get("frames") or []],
            )
        )
    return out


_STATES = {"R": "running", "S": "sleeping", "D": "disk-wait", "T": "stopped", "t": "traced",
           "Z": "zombie", "X": "dead", "I": "idle"}


def proc_threads(tgid: int, proc_root: str = "/proc") -> list[ThreadStack]:
    """Every thread of TGID from /proc: name, state, wchan (no user frames)."""
    base = Path(proc_root) / str(tgid) / "task"
    try:
        tids = sorted(int(d) for d in os.listdir(base) if d.isdigit())
    except FileNotFoundError as err:
        raise TargetNotFound(f"process {tgid} does not exist (or has exited)") from err
    out = []
    for tid in tids:
        d = base / str(tid)
        try:
            stat = (d / "stat").read_text()
            name = (d / "comm").read_text().strip()
        except OSError:
            continue  # exited meanwhile
        letter = stat[stat.rfind(")") + 2 :].split(" ", 1)[0]
        try:
            wchan = (d / "wchan").read_text().strip() or None
        except OSError:
            wchan = None
        if wchan == "0":
            wchan = None
        frames = [{"function": wchan, "file": None, "line": None, "kind": "kernel",
                   "module": "[kernel]"}] if wchan else []
        out.append(ThreadStack(tgid=tgid, tid=tid, thread=name,
                               state=_STATES.get(letter, letter), wchan=wchan,
                               frames=frames, source="procfs"))
    return out


def _py_spy_error(stderr: str) -> str:
    """The first `Error:` line of py-spy's stderr (its backtrace is noise to a user)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith("Error:")), lines[0] if lines else "")
    return first.removeprefix("Error:").strip() or "no output"


def dump_process(
    tgid: int,
    native: bool = False,
    rank: int | None = None,
    timeout_s: float = DUMP_TIMEOUT_S,
    py_spy: str | None = None,
    proc_root: str = "/proc",
) -> ProcessStacks:
    """The current stack of every thread of TGID (see module doc).

    Python processes: py-spy's dump (with `native`, native frames merged at the eval loop;
    if the native unwind fails the dump is retried Python-only). Threads py-spy does not
    list come from /proc. A process that is not Python: /proc threads and a note. Raises
    TargetNotFound (no such process), PermissionDenied, PySpyMissing.
    """
    comm = procfs.comm(tgid, proc_root) if Path(proc_root, str(tgid)).exists() else None
    if comm is None:
        raise TargetNotFound(f"process {tgid} does not exist (or has exited)")
    ts_ns = time.monotonic_ns()
    base = proc_threads(tgid, proc_root)
    exe = py_spy or find_py_spy()
    if exe is None:
        raise PySpyMissing("py-spy is not installed, so Python stacks cannot be read")
    threads: list[ThreadStack] = []
    note = None
    attempts = [True, False] if native else [False]
    for nat in attempts:
        cmd = [exe, "dump", "--pid", str(tgid), "--json"] + (["--native"] if nat else [])
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                 env={**os.environ, "RUST_BACKTRACE": "0"})
        except subprocess.TimeoutExpired:
            note = f"py-spy did not answer within {timeout_s:.0f} s"
            continue
        if res.returncode == 0 and res.stdout.strip():
            threads = parse_dump(res.stdout, tgid)
            note = None if nat == native else "native frames could not be unwound"
            break
        err = _py_spy_error(res.stderr)
        low = err.lower()
        if "permission" in low or "operation not permitted" in low:
            raise PermissionDenied(
                f"reading process {tgid}'s memory was refused ({err})",
                remedy="Run as root, or with CAP_SYS_PTRACE (check kernel.yama.ptrace_scope).",
            )
        if "python version" in low or "python interpreter" in low or "not a python" in low:
            note = "not a Python process (no CPython interpreter found): native threads only"
            break
        if not Path(proc_root, str(tgid)).exists():
            raise TargetNotFound(f"process {tgid} exited while its stacks were read")
        note = f"py-spy failed: {err}"
    seen = {t.tid for t in threads}
    by_tid = {t.tid: t for t in base}
    for t in threads:  # the kernel's view of a Python thread too: where it sleeps
        b = by_tid.get(t.tid)
        if b is not None:
            t.wchan = b.wchan
    rest = [t for t in base if t.tid not in seen]
    if native and rest:
        note = _with_native(tgid, rest, proc_root, note)
    threads += rest
    threads.sort(key=lambda t: (t.tid != tgid, t.tid))
    return ProcessStacks(tgid=tgid, rank=rank, comm=comm, python=bool(seen), threads=threads,
                         note=note, ts_ns=ts_ns)


def _with_native(tgid: int, threads: list[ThreadStack], proc_root: str,
                 note: str | None) -> str | None:
    """Native frames (argus.collect.native_stacks) for the threads py-spy did not list,
    before the kernel function each sleeps in; the note says when they could not be read."""
    try:
        got = native_frames(tgid, [t.tid for t in threads], proc_root)
    except NativeUnavailable as e:
        return f"{note}; {e}" if note else str(e)
    for t in threads:
        if got.get(t.tid):
            t.frames = got[t.tid] + t.frames
    return note


def expand_targets(pids: list[int], proc_root: str = "/proc") -> list[tuple[int, int | None]]:
    """PIDs -> [(tgid, rank)]: a launcher (its descendants carry RANK, it does not) expands
    to those ranks; any other PID is itself. Missing PIDs raise TargetNotFound."""
    out: list[tuple[int, int | None]] = []
    for pid in pids:
        procfs.process_state(pid, proc_root)
        own = identity.rank_identity(pid, proc_root)["rank"]
        ranks = []
        if own is None:
            for d in procfs.descendants(pid, proc_root):
                try:
                    r = identity.rank_identity(d, proc_root)["rank"]
                except (TargetNotFound, OSError):
                    continue
                if r is not None:
                    ranks.append((d, int(r)))
        if ranks:
            out += sorted(ranks, key=lambda x: x[1])
        else:
            out.append((pid, int(own) if own is not None else None))
    seen: set[int] = set()
    return [(t, r) for t, r in out if not (t in seen or seen.add(t))]


def innermost_python(frames: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The innermost Python frame of a thread's stack, or None."""
    return next((f for f in frames if f.get("kind") == "python"), None)


def where(frame: dict[str, Any] | None) -> str | None:
    """"function (file:line)" for a frame."""
    if not frame:
        return None
    file = os.path.basename(frame.get("file") or "?")
    line = frame.get("line")
    return f"{frame['function']} ({file}:{line})" if line else f"{frame['function']} ({file})"


# ---------------------------------------------------------------------------------------------
# Hang evidence at the end of `argus attach`

HANG_CAPTURE_AFTER_S = 5.0  # an in-flight call this old at the end makes the session dump


def blocked_tgids(events, end_ns: int, after_s: float = HANG_CAPTURE_AFTER_S) -> list[int]:
    """Processes with a call still in flight that was entered >= after_s before end_ns."""
    import polars as pl

    if events is None or events.height == 0 or "in_flight" not in events.columns:
        return []
    old = events.filter(
        pl.col("in_flight").fill_null(False) & (pl.col("ts_ns") <= end_ns - int(after_s * 1e9))
    )
    return sorted(set(old["tgid"].drop_nulls().to_list()))


def to_frame(dumps: list[ProcessStacks]):
    """ProcessStacks -> a frame of `schema.PYSTACKS_SCHEMA` (one row per thread)."""
    import polars as pl

    from argus.recording.schema import PYSTACKS_SCHEMA

    rows = []
    for d in dumps:
        for t in d.threads:
            rows.append({
                "ts_ns": d.ts_ns, "tgid": t.tgid, "tid": t.tid, "rank": d.rank,
                "thread": t.thread, "state": t.state, "wchan": t.wchan,
                "functions": [f["function"] for f in t.frames],
                "files": [f.get("file") for f in t.frames],
                "lines": [f.get("line") for f in t.frames],
                "kinds": [f.get("kind") for f in t.frames],
            })
    return pl.DataFrame(rows, schema=PYSTACKS_SCHEMA) if rows else pl.DataFrame(
        schema=PYSTACKS_SCHEMA
    )


def capture_ranks(ranks: list[dict[str, Any]], native: bool = False) -> tuple[Any, dict]:
    """Dump every live rank of a manifest's `ranks` list; (frame, manifest["pystacks"]).

    Never raises for one rank: a rank that exited or could not be read is a note."""
    dumps, notes = [], {}
    exe = find_py_spy()
    if exe is None:
        return to_frame([]), {"taken": False, "reason": "py-spy is not installed"}
    for r in ranks:
        tgid = r.get("tgid")
        if not tgid:
            continue
        try:
            d = dump_process(int(tgid), native=native, rank=r.get("rank"), py_spy=exe)
        except ArgusError as err:
            notes[str(tgid)] = str(err)
            continue
        if d.note:
            notes[str(tgid)] = d.note
        dumps.append(d)
    meta = {"taken": True, "reason": "calls in flight at the end of the session",
            "processes": len(dumps), "notes": notes}
    return to_frame(dumps), meta
