"""The cpu channel (bpf/cpu_stacks.bpf.c): perf_event cpu-clock sampling of the traced
processes, user + kernel stacks (and Python frames) aggregated in kernel maps.

Two halves (stacks0/1, stack_counts0/1, py_stacks0/1) and a flag (stack_buf): the drain
flips the flag, then reads and clears the half the samples no longer go to, so no sample is
lost or counted twice. Each (tgid, tid, stacks) key becomes one stack row per drain
(`state` "on_cpu"). `PythonStacks` configures, per traced CPython process, where the
kernel's frame walk finds its interpreter (validated first: argus.collect.cpython_walk) and
names the code objects the walk recorded.
"""

from __future__ import annotations

import ctypes as ct
import os
import time
from dataclasses import dataclass

from argus.collect import abi
from argus.collect.channels.base import Channel
from argus.collect.cpython_walk import (
    CodeReader,
    Interpreter,
    LayoutRefused,
    Memory,
    NotPython,
    bpf_config,
    choose_layout,
    find_interpreter,
    merge_frames,
    py_frame,
    thread_map,
    validate,
)

RETRY_S = 1.0  # a Python process still starting up is tried again after this long
MAX_TRIES = 20
SAMPLE_PROGRAM = "argus_cpu_sample"


class CpuChannel(Channel):
    name = "cpu"
    switches = {"cpu": "Do not sample CPU stacks."}
    sources = ("cpu_stacks.bpf.c",)
    symbolizes = True

    def __init__(self, tracer):
        super().__init__(tracer)
        self.pystacks: PythonStacks | None = None  # Python frames in CPU samples
        self._buf = 0  # the half the samples go to
        self._last = 0.0

    def attach(self, session) -> None:
        self.pystacks = PythonStacks(session, self.tracer.opts.proc_root)

    def start(self) -> None:
        self.tracer.session.attach_cpu_clock(SAMPLE_PROGRAM, self.tracer.opts.sample_hz)
        self._last = time.monotonic()

    def poll(self, now: float) -> None:
        if now - self._last >= self.tracer.opts.stack_interval_s:
            self.drain(now)

    def finish(self) -> None:
        self.drain(time.monotonic(), final=False)
        self.drain(time.monotonic(), final=True)

    def on_traced(self, t) -> None:
        """A traced process that runs CPython gets Python frames in its CPU samples."""
        if self.pystacks is not None and not t.exited:
            self.pystacks.ensure(t.tgid, t.maps, t.exe)

    def on_gone(self, t) -> None:
        if self.pystacks is not None:
            self.pystacks.forget(t.tgid)

    def forget(self, tgids: set[int]) -> None:
        if self.pystacks is not None:
            for tgid in tgids:
                self.pystacks.drop(tgid)

    def drain(self, now: float, final: bool = False) -> None:
        """The half of the stack maps the samples do not go to -> stack rows (the flag is
        flipped first unless `final`: the last drain reads the half still in use)."""
        tr = self.tracer
        s = tr.session
        old = self._buf
        if not final:
            self._buf ^= 1
            s.table("stack_buf")[ct.c_int(0)] = ct.c_uint32(self._buf)
            time.sleep(0.002)  # samples already past the flag check finish in microseconds
        # the counts first: a sample writes its stacks before its count, so every key read
        # here finds its frames in what is read next (the final drain reads a live half)
        counts = s.items(f"stack_counts{old}", delete=True)
        stacks = dict(s.items(f"stacks{old}", delete=True))
        if self.pystacks is not None:
            self.pystacks.take(old)
        interval_ns = int(tr.opts.stack_interval_s * 1e9)
        ts_ns = time.monotonic_ns() - interval_ns
        for key, value in counts:
            tgid = int(key.tgid)
            functions: list[str] = []
            modules: list[str] = []
            for addr in _frames(stacks, key.kernel_stack_id):
                functions.append(s.ksym(addr))
                modules.append("[kernel]")
            for addr in _frames(stacks, key.user_stack_id):
                fn, mod = tr.symbolizer.frame(tgid, addr)
                functions.append(fn)
                modules.append(mod)
            if key.py_stack_id and self.pystacks is not None:
                functions, modules = self.pystacks.merge(tgid, int(key.py_stack_id), functions,
                                                         modules)
            tr.stack_rows.append(
                {
                    "ts_ns": ts_ns,
                    "interval_ns": interval_ns,
                    "tgid": tgid,
                    "tid": int(key.tid),
                    "rank": tr.ctx.rank_of.get(tgid),
                    "thread": key.comm.decode("utf-8", "replace"),
                    "count": int(value),
                    "functions": functions,
                    "modules": modules,
                    "state": "on_cpu",
                    "blocked_ns": None,
                }
            )
        self._last = now

    def manifest(self) -> dict:
        on = self.on
        return {
            "sample_hz": self.tracer.opts.sample_hz if on else 0,
            "python_stacks": self.pystacks.manifest() if self.pystacks is not None else None,
        }


def _frames(stacks: dict, key: int) -> list[int]:
    """The addresses of stacks[key], innermost first ([] for key 0 or a key not read)."""
    st = stacks.get(key) if key else None
    if st is None:
        return []
    return list(st.ip[: min(int(st.len) // 8, abi.NATIVE_DEPTH)])


@dataclass
class PythonProcess:
    """What the cpu channel knows of one traced process's interpreter."""


    tgid: int
    status: str = "pending"  # pending | attached | refused | not_python
    note: str = ""
    tries: int = 0
    last_try: float = 0.0
    interp: Interpreter | None = None
    reader: CodeReader | None = None
    version: str | None = None
    layout_source: str | None = None
    detached: bool = False  # its py_procs entry was removed (exit, exec)
    pthread_tid: int = 0


class PythonStacks:
    """Per tracing session: configures py_procs for traced Python processes and turns the
    recorded Python stacks into frames."""

    def __init__(self, session, proc_root: str = "/proc"):
        self.session = session
        self.proc_root = proc_root
        self.procs: dict[int, PythonProcess] = {}
        self._stacks: dict[int, tuple[tuple[int, ...], bool]] = {}

    def ensure(self, tgid: int, maps, exe: str | None = None) -> None:
        """Configure tgid's interpreter once (retried while it is still starting up)."""
        p = self.procs.setdefault(tgid, PythonProcess(tgid))
        if p.detached:  # traced again after an exec: a new image, a new interpreter
            self.drop(tgid)
            p = self.procs[tgid] = PythonProcess(tgid)
        now = time.monotonic()
        if p.status != "pending" or now - p.last_try < RETRY_S:
            return
        p.tries += 1
        p.last_try = now
        mem = None
        try:
            interp = find_interpreter(tgid, maps, self.proc_root, exe)
            mem = Memory(tgid, self.proc_root)
            lay = choose_layout(mem, interp)
            tids = {int(t) for t in os.listdir(f"{self.proc_root}/{tgid}/task")}
            v = validate(mem, interp, lay, tids)
        except LayoutRefused as e:
            if mem is not None:
                mem.close()
            p.note = str(e)
            if isinstance(e, NotPython):
                p.status = "not_python"
            elif not e.transient or p.tries >= MAX_TRIES:
                p.status = "refused"
            return
        except OSError as e:
            if mem is not None:
                mem.close()
            p.status, p.note = "refused", f"cannot read the process's memory: {e}"
            return
        self.session.table("py_procs")[ct.c_uint32(tgid)] = bpf_config(interp, v)
        p.status, p.note, p.interp = "attached", "", interp
        p.reader = CodeReader(mem, interp, v.layout)
        p.pthread_tid = v.pthread_tid
        self._seed_threads(v.threads)
        p.version = ".".join(map(str, v.layout.version))
        p.layout_source = v.layout.source

    def forget(self, tgid: int) -> None:
        """The process exited or exec'd: its entry leaves the kernel (names stay cached)."""
        p = self.procs.get(tgid)
        if p is None:
            return
        try:
            del self.session.table("py_procs")[ct.c_uint32(tgid)]
        except (KeyError, Exception):  # noqa: BLE001 - not configured or already gone
            pass
        if p.status == "pending":
            del self.procs[tgid]
        else:
            p.detached = True  # names stay readable for the samples still to drain

    def drop(self, tgid: int) -> None:
        p = self.procs.pop(tgid, None)
        if p is not None and p.reader is not None:
            p.reader.mem.close()

    def _seed_threads(self, threads: dict[int, int]) -> None:
        table = self.session.table("py_tstates")
        for tid, ts in threads.items():
            table[ct.c_uint32(tid)] = ct.c_uint64(ts)

    def refresh_threads(self) -> None:
        """Tell the kernel where every thread's PyThreadState is (py_tstates), from the
        interpreter's thread list read through /proc/PID/mem: the BPF walk then finds a
        thread with one confirming read, whatever the number of threads (its own search
        covers only the ARGUS_PY_THREADS newest thread states). Called at each drain."""
        for p in self.procs.values():
            if p.status != "attached" or p.detached or p.reader is None:
                continue
            try:
                threads = thread_map(p.reader.mem, p.reader.lay, p.interp.runtime, p.pthread_tid)
            except (OSError, LayoutRefused):
                continue  # exiting; the BPF search still works
            self._seed_threads(threads)

    def take(self, buf: int) -> None:
        """Read and clear py_stacks<buf> (the half user space drains)."""
        self.refresh_threads()
        table = self.session.table(f"py_stacks{buf}")
        self._stacks = {}
        for k, st in table.items():
            n = min(int(st.depth), abi.PY_DEPTH)
            self._stacks[int(k.value)] = (tuple(int(c) for c in st.code[:n]), bool(st.truncated))
        table.clear()

    def merge(self, tgid: int, py_stack_id: int, functions: list[str], modules: list[str]
              ) -> tuple[list[str], list[str]]:
        if not py_stack_id:
            return functions, modules
        hit = self._stacks.get(py_stack_id)
        p = self.procs.get(tgid)
        if hit is None or p is None or p.reader is None:
            return functions, modules
        py = []
        for word in hit[0]:
            addr = word & ~abi.PY_CODE_ENTRY
            fn, mod = py_frame(p.reader.code(addr), addr)
            py.append((fn, mod, bool(word & abi.PY_CODE_ENTRY)))
        return merge_frames(functions, modules, py)

    def manifest(self) -> dict:
        stats = {}
        try:
            table = self.session.table("py_stats")
            stats = {n: int(table[ct.c_int(i)].value) for i, n in enumerate(abi.PY_STAT_NAMES)}
        except Exception:  # noqa: BLE001 - the cpu channel is off
            pass
        return {
            "samples": stats,
            "line": "first line of the function (co_firstlineno)",
            "processes": {
                str(p.tgid): {"status": p.status, "note": p.note, "python": p.version,
                              "layout": p.layout_source,
                              "interpreter": p.interp.path if p.interp else None}
                for p in self.procs.values()
            },
        }
