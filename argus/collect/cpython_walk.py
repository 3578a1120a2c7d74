"""Python frames in CPU samples: find a process's interpreter, check its layout, name frames.

The BPF side (bpf/cpu_stacks.bpf.c) walks the sampled thread's frame chain and records code
object addresses; this module does everything around that walk:

1. Find the interpreter (`find_interpreter`): the mapped `libpython3.X.so` (pyenv, most
   images) or the executable itself (Debian's `/usr/bin/python3.11` links libpython
   statically, non-PIE). pyelftools finds `_PyRuntime`, `PyCode_Type` and `PyUnicode_Type`
   in its symbol tables; the load base comes from /proc/PID/maps. The version comes from
   `_Py_DebugOffsets` (3.13+: the start of `_PyRuntime` carries every offset, used as is),
   the exported `Py_Version` (3.11+), else the file name (`python3.10`, `libpython3.10`).
2. Pick the layout of that minor version (`LAYOUTS`: CPython keeps these structures fixed
   within a minor release, so no per-build table) and VALIDATE it against the live process
   through /proc/PID/mem (`validate`): the interpreter head is set, every thread state on
   its list points back at that interpreter, their thread ids are threads of the process,
   and the code object of a current frame has type `PyCode_Type`. A layout that fails any
   check is refused with the reason (the process keeps its native stacks only); nothing
   unvalidated reaches the kernel. 3.10 has no `native_thread_id`: the thread state keeps
   `pthread_self()` (glibc's `struct pthread`), whose `tid` offset is found here by looking
   for the threads' kernel ids in those structs, and BPF reads it from there.
3. Name code objects (`CodeReader`): `co_qualname` (3.11+, else `co_name`), `co_filename`,
   `co_firstlineno`, read through /proc/PID/mem once per code address and cached.
4. Merge (`merge_frames`) the Python frames into the native stack at the interpreter's eval
   frames: each C-level `_PyEval_EvalFrameDefault` runs the Python frames up to and including
   the next "entry" frame (3.10: every frame; 3.11: `is_entry`; 3.12+: the frame above a
   C-stack shim frame). Python frames get the module "py:FILE:FIRSTLINE"
   (argus/analyze/hotspot.py). Frames left over when the native unwind found fewer eval
   frames (an interpreter built without frame pointers) go after the last native frame.

Lines are the function's first line (`co_firstlineno`): the current line needs the
instruction pointer and the line table, which are not read per sample.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from argus.collect import abi
from argus.collect.symbols import elf_file, host_path

EVAL_FUNCTIONS = frozenset({"_PyEval_EvalFrameDefault"})
PY_MODULE = "py:"
GLIBC_PTHREAD_TID = 0x2D0  # struct pthread.tid in glibc 2.28+ x86-64 (preferred when ambiguous)
RETRY_S = 1.0
MAX_TRIES = 20


class LayoutRefused(Exception):
    """The interpreter of a process cannot be read safely; the message says why."""

    def __init__(self, msg: str, transient: bool = False):
        super().__init__(msg)
        self.transient = transient


class NotPython(LayoutRefused):
    """No mapped file of the process defines _PyRuntime: not a CPython process."""


@dataclass(frozen=True)
class Layout:
    """Byte offsets of one CPython minor version (x86-64)."""

    version: tuple[int, int]
    interp_head: int  # _PyRuntime -> interpreters.head
    threads_head: int  # PyInterpreterState -> threads.head (3.10: tstate_head)
    ts_tid: int  # PyThreadState -> native_thread_id, or thread_id (pthread_t) when pthread
    ts_frame: int  # PyThreadState -> frame (3.10) / cframe (3.11, 3.12) / current_frame
    frame_code: int
    frame_prev: int
    co_filename: int
    co_name: int
    co_firstlineno: int
    ascii_data: int  # sizeof(PyASCIIObject)
    compact_data: int  # sizeof(PyCompactUnicodeObject)
    ts_next: int = 8
    ts_interp: int = 16
    pthread: bool = False
    cframe_frame: int | None = None  # _PyCFrame -> current_frame
    frame_entry: int | None = None  # is_entry byte (3.11)
    frame_owner: int | None = None  # owner byte; 3 = FRAME_OWNED_BY_CSTACK (3.12+)
    all_entry: bool = False  # 3.10: one C eval call per Python frame
    co_qualname: int | None = None
    source: str = "table"  # "table" or "_Py_DebugOffsets"

    @property
    def flags(self) -> int:
        f = abi.PY_CFRAME if self.cframe_frame is not None else 0
        f |= abi.PY_PTHREAD if self.pthread else 0
        f |= abi.PY_IS_ENTRY if self.frame_entry is not None else 0
        f |= abi.PY_OWNER if self.frame_owner is not None else 0
        return f | (abi.PY_ALL_ENTRY if self.all_entry else 0)


# Measured on the pyenv 3.10.13 / 3.11.7 / 3.12.1 builds and Debian's 3.11.2 (docs/stacks.md)
# and equal to offsetof() over each version's internal headers.
LAYOUTS = {
    (3, 10): Layout((3, 10), interp_head=32, threads_head=8, ts_tid=176, pthread=True,
                    ts_frame=24, frame_code=32, frame_prev=24, all_entry=True,
                    co_filename=104, co_name=112, co_firstlineno=40, ascii_data=48,
                    compact_data=72),
    (3, 11): Layout((3, 11), interp_head=40, threads_head=16, ts_tid=160, ts_frame=56,
                    cframe_frame=8, frame_code=32, frame_prev=48, frame_entry=68,
                    co_filename=112, co_name=120, co_qualname=128, co_firstlineno=72,
                    ascii_data=48, compact_data=72),
    (3, 12): Layout((3, 12), interp_head=40, threads_head=72, ts_tid=144, ts_frame=56,
                    cframe_frame=0, frame_code=0, frame_prev=8, frame_owner=70,
                    co_filename=112, co_name=120, co_qualname=128, co_firstlineno=68,
                    ascii_data=40, compact_data=56),
}

# _Py_DebugOffsets (3.13+): u64 fields after the 8-byte cookie "xdebugpy", in order.
_DEBUG_FIELDS = (
    "version free_threaded "
    "rt_size rt_finalizing rt_interpreters_head "
    "is_size is_id is_next is_threads_head is_gc is_imports_modules is_sysdict is_builtins "
    "is_ceval_gil is_gil_rs is_gil_rs_enabled is_gil_rs_locked is_gil_rs_holder "
    "ts_size ts_prev ts_next ts_interp ts_current_frame ts_thread_id ts_native_thread_id "
    "ts_datastack_chunk ts_status "
    "fr_size fr_previous fr_executable fr_instr_ptr fr_localsplus fr_owner "
    "co_size co_filename co_name co_qualname co_linetable co_firstlineno co_argcount "
    "co_localsplusnames co_localspluskinds co_code_adaptive "
    "ob_size ob_type tp_size tp_name tp_repr tp_flags tu_size tu_ob_item tu_ob_size "
    "li_size li_ob_item li_ob_size di_size di_ma_keys di_ma_values fl_size fl_ob_fval "
    "lo_size lo_lv_tag lo_ob_digit by_size by_ob_size by_ob_sval "
    "un_size un_state un_length un_asciiobject_size"
).split()
DEBUG_COOKIE = b"xdebugpy"


def layout_from_debug_offsets(blob: bytes) -> Layout | None:
    """The layout that a 3.13+ `_Py_DebugOffsets` (the first bytes of `_PyRuntime`) states;
    None when blob does not start with its cookie."""
    need = 8 + 8 * len(_DEBUG_FIELDS)
    if not blob.startswith(DEBUG_COOKIE) or len(blob) < need:
        return None
    d = dict(zip(_DEBUG_FIELDS, struct.unpack_from(f"<{len(_DEBUG_FIELDS)}Q", blob, 8),
                 strict=True))
    hexv = d["version"]
    if d["free_threaded"]:
        return None  # a free-threaded build: other object layouts, not supported
    asc = d["un_asciiobject_size"]
    return Layout(
        ((hexv >> 24) & 0xFF, (hexv >> 16) & 0xFF), interp_head=d["rt_interpreters_head"],
        threads_head=d["is_threads_head"], ts_tid=d["ts_native_thread_id"],
        ts_frame=d["ts_current_frame"], ts_next=d["ts_next"], ts_interp=d["ts_interp"],
        frame_code=d["fr_executable"], frame_prev=d["fr_previous"], frame_owner=d["fr_owner"],
        co_filename=d["co_filename"], co_name=d["co_name"], co_qualname=d["co_qualname"],
        co_firstlineno=d["co_firstlineno"], ascii_data=asc, compact_data=asc + 16,
        source="_Py_DebugOffsets",
    )


@dataclass
class Interpreter:
    """Where one process's CPython lives."""

    path: str  # the file defining _PyRuntime, as the process sees it
    version: tuple[int, int] | None
    runtime: int  # runtime address of _PyRuntime
    code_type: int  # runtime address of PyCode_Type
    unicode_type: int  # runtime address of PyUnicode_Type


_NAME_VERSION = re.compile(r"python(3)\.(\d+)")


def find_interpreter(tgid: int, maps, proc_root: str = "/proc", exe: str | None = None
                     ) -> Interpreter:
    """The CPython of process tgid from its mappings (procfs.Mapping list): a mapped
    libpython3.X first, else the file of the executable. Raises LayoutRefused."""
    by_path: dict[str, list] = {}
    for m in maps:
        by_path.setdefault(m.path, []).append(m)
    libs = [p for p in by_path if re.search(r"libpython3\.\d+", os.path.basename(p))]
    rest = [p for p in by_path if p not in libs and (exe is None or p == exe)]
    for path in libs + rest:
        elf = elf_file(host_path(tgid, path, proc_root)) or elf_file(path)
        if elf is None:
            continue
        rt = elf.symbol("_PyRuntime")
        if rt is None:
            continue
        base = elf.load_base(by_path[path])
        if base is None:
            raise LayoutRefused(f"{path} defines _PyRuntime but its load address is unknown")
        code_t, uni_t = elf.symbol("PyCode_Type"), elf.symbol("PyUnicode_Type")
        if code_t is None or uni_t is None:
            raise LayoutRefused(f"{path} does not export PyCode_Type / PyUnicode_Type")
        version = None
        pyv = elf.symbol("Py_Version", scan=False)  # const PY_VERSION_HEX, exported (3.11+)
        if pyv is not None:
            raw = elf.read(pyv.vaddr, 4)
            if len(raw) == 4:
                hexv = int.from_bytes(raw, "little")
                version = ((hexv >> 24) & 0xFF, (hexv >> 16) & 0xFF)
        if version is None:
            names = [os.path.basename(path), elf.soname or ""]
            for name in names:
                mm = _NAME_VERSION.search(name)
                if mm:
                    version = (int(mm.group(1)), int(mm.group(2)))
                    break
        return Interpreter(path, version, base + rt.vaddr, base + code_t.vaddr,
                           base + uni_t.vaddr)
    raise NotPython("no CPython found (no mapped file defines _PyRuntime)")


class Memory:
    """Reads of another process's memory through /proc/PID/mem (root or ptrace access)."""

    def __init__(self, tgid: int, proc_root: str = "/proc"):
        self.tgid = tgid
        self.fd = os.open(f"{proc_root}/{tgid}/mem", os.O_RDONLY)

    def read(self, addr: int, n: int) -> bytes:
        if addr <= 0 or addr >= 1 << 48:
            raise OSError(f"bad address {addr:#x}")
        data = os.pread(self.fd, n, addr)
        if len(data) != n:
            raise OSError(f"short read at {addr:#x}")
        return data

    def u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def u32(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 4), "little")

    def u8(self, addr: int) -> int:
        return self.read(addr, 1)[0]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Validated:
    layout: Layout
    threads: dict[int, int]  # tid -> PyThreadState address
    pthread_tid: int = 0  # offset of tid in struct pthread (layout.pthread)
    frames_checked: int = 0


def _thread_states(mem: Memory, lay: Layout, runtime: int) -> tuple[int, list[int]]:
    interp = mem.u64(runtime + lay.interp_head)
    if not interp:
        raise LayoutRefused("the interpreter is not initialized yet (no interpreter head)",
                            transient=True)
    out, ts = [], mem.u64(interp + lay.threads_head)
    while ts and len(out) < 256:
        if mem.u64(ts + lay.ts_interp) != interp:
            raise LayoutRefused(f"thread state {ts:#x} does not point back at interpreter "
                                f"{interp:#x}: the layout does not fit")
        out.append(ts)
        ts = mem.u64(ts + lay.ts_next)
    if not out:
        raise LayoutRefused("the interpreter lists no thread state: the layout does not fit")
    return interp, out


def _pthread_tid_offset(mem: Memory, pthreads: list[int], tids: set[int]) -> int:
    """The offset of `tid` in glibc's struct pthread: the one where every thread state's
    pthread_t holds a distinct thread id of the process."""
    common: set[int] | None = None
    for pt in pthreads:
        if not pt:
            continue
        blob = mem.read(pt, 0x800)
        hits = {o for o in range(0, 0x800, 4)
                if int.from_bytes(blob[o:o + 4], "little") in tids}
        common = hits if common is None else common & hits
    if not common:
        raise LayoutRefused("no thread id found in the threads' struct pthread (not glibc?): "
                            "the layout does not fit")
    return GLIBC_PTHREAD_TID if GLIBC_PTHREAD_TID in common else min(common)


def thread_map(mem: Memory, lay: Layout, runtime: int, pthread_tid: int = 0) -> dict[int, int]:
    """tid -> PyThreadState address of every thread state of the interpreter (a layout
    already validated); thread states not yet bound to a thread are left out."""
    _, states = _thread_states(mem, lay, runtime)
    out = {}
    for ts in states:
        tid = mem.u64(ts + lay.ts_tid)
        if lay.pthread:
            tid = mem.u32(tid + pthread_tid) if tid else 0
        if tid and tid < 1 << 32:
            out[tid] = ts
    return out


def validate(mem: Memory, interp: Interpreter, lay: Layout, tids: set[int]) -> Validated:
    """Check `lay` against the live process (see the module doc); LayoutRefused if wrong."""
    try:
        return _validate(mem, interp, lay, tids)
    except OSError as e:
        if not os.path.exists(f"/proc/{mem.tgid}/mem"):
            raise
        v = ".".join(map(str, lay.version))
        raise LayoutRefused(f"following the Python {v} layout read unmapped memory ({e}): "
                            "the layout does not fit") from e


def _validate(mem: Memory, interp: Interpreter, lay: Layout, tids: set[int]) -> Validated:
    _, states = _thread_states(mem, lay, interp.runtime)
    raw = [mem.u64(ts + lay.ts_tid) for ts in states]
    pthread_tid = 0
    if lay.pthread:
        pthread_tid = _pthread_tid_offset(mem, raw, tids)
        ids = [mem.u32(p + pthread_tid) if p else 0 for p in raw]
    else:
        ids = raw
    threads = {}
    for ts, tid in zip(states, ids, strict=True):
        if tid and tid not in tids:
            raise LayoutRefused(f"thread state {ts:#x} names thread {tid}, which is not a thread "
                                f"of process {mem.tgid}: the layout does not fit")
        if tid:
            threads[tid] = ts
    if not threads:
        raise LayoutRefused("no thread state names a thread of the process", transient=True)
    checked = 0
    for ts in states:
        f = mem.u64(ts + lay.ts_frame)
        if f and lay.cframe_frame is not None:
            f = mem.u64(f + lay.cframe_frame)
        for _ in range(8):
            if not f:
                break
            if lay.frame_owner is not None and mem.u8(f + lay.frame_owner) == 3:
                f = mem.u64(f + lay.frame_prev)
                continue
            code = mem.u64(f + lay.frame_code)
            if mem.u64(code + 8) != interp.code_type:
                raise LayoutRefused(f"a frame's code object at {code:#x} is not a code object "
                                    f"(type {mem.u64(code + 8):#x}): the layout does not "
                                    "fit")
            checked += 1
            f = mem.u64(f + lay.frame_prev)
    if not checked:
        raise LayoutRefused("no Python frame to check the layout against yet", transient=True)
    return Validated(lay, threads, pthread_tid, checked)


def choose_layout(mem: Memory, interp: Interpreter) -> Layout:
    """_Py_DebugOffsets when the runtime starts with it (3.13+), else the version's row."""
    try:
        dbg = layout_from_debug_offsets(mem.read(interp.runtime, 8 + 8 * len(_DEBUG_FIELDS)))
    except OSError:
        dbg = None
    if dbg is not None:
        return dbg
    if interp.version is None:
        raise LayoutRefused(f"the Python version of {interp.path} is unknown")
    lay = LAYOUTS.get(interp.version)
    if lay is None:
        v = ".".join(map(str, interp.version))
        raise LayoutRefused(f"Python {v} is not supported (3.10, 3.11, 3.12, 3.13+)")
    return lay


def walk(mem: Memory, lay: Layout, tstate: int, depth: int = abi.PY_DEPTH
         ) -> list[tuple[int, bool]]:
    """[(code address, is_entry)] of one thread, innermost first: what the BPF walk records
    (same rules, read through /proc/PID/mem; for tests and checks)."""
    out: list[tuple[int, bool]] = []
    f = mem.u64(tstate + lay.ts_frame)
    if f and lay.cframe_frame is not None:
        f = mem.u64(f + lay.cframe_frame)
    for _ in range(2 * depth):
        if not f:
            break
        if lay.frame_owner is not None and mem.u8(f + lay.frame_owner) == 3:
            if out:
                out[-1] = (out[-1][0], True)
            f = mem.u64(f + lay.frame_prev)
            continue
        if len(out) >= depth:
            break
        entry = lay.all_entry or (lay.frame_entry is not None and mem.u8(f + lay.frame_entry) != 0)
        out.append((mem.u64(f + lay.frame_code), entry))
        f = mem.u64(f + lay.frame_prev)
    return out


def bpf_config(interp: Interpreter, v: Validated) -> abi.PyProc:
    lay = v.layout
    return abi.PyProc(
        runtime=interp.runtime, version=(lay.version[0] << 8) | lay.version[1], flags=lay.flags,
        interp_head=lay.interp_head, threads_head=lay.threads_head, ts_next=lay.ts_next,
        ts_tid=lay.ts_tid, ts_frame=lay.ts_frame, cframe_frame=lay.cframe_frame or 0,
        frame_code=lay.frame_code, frame_prev=lay.frame_prev, frame_entry=lay.frame_entry or 0,
        frame_owner=lay.frame_owner or 0, pthread_tid=v.pthread_tid, pad=0,
    )


@dataclass(frozen=True)
class Code:
    name: str
    file: str
    firstlineno: int


class CodeReader:
    """Names code objects of one process (cached per address)."""

    def __init__(self, mem: Memory, interp: Interpreter, lay: Layout):
        self.mem, self.interp, self.lay = mem, interp, lay
        self.cache: dict[int, Code | None] = {}

    def _str(self, addr: int) -> str:
        m, lay = self.mem, self.lay
        head = m.read(addr, 40)
        if int.from_bytes(head[8:16], "little") != self.interp.unicode_type:
            raise OSError("not a str")
        length = min(int.from_bytes(head[16:24], "little"), 4096)
        state = int.from_bytes(head[32:36], "little")
        kind, compact, ascii_ = (state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1
        if compact and ascii_:
            return m.read(addr + lay.ascii_data, length).decode("ascii", "replace")
        data = addr + lay.compact_data if compact else m.u64(addr + lay.compact_data)
        raw = m.read(data, length * kind) if length else b""
        codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}.get(kind)
        if codec is None:
            raise OSError("bad str kind")
        return raw.decode(codec, "replace")

    def code(self, addr: int) -> Code | None:
        if addr in self.cache:
            return self.cache[addr]
        lay, m = self.lay, self.mem
        try:
            if m.u64(addr + 8) != self.interp.code_type:
                raise OSError("not a code object")
            name_off = lay.co_qualname if lay.co_qualname is not None else lay.co_name
            out = Code(self._str(m.u64(addr + name_off)), self._str(m.u64(addr + lay.co_filename)),
                       m.u32(addr + lay.co_firstlineno))
        except OSError:
            out = None  # freed, or the process is gone: not cached as final
            return None
        self.cache[addr] = out
        return out


def py_frame(code: Code | None, addr: int) -> tuple[str, str]:
    """(function, module) of one Python frame as stacks.parquet has it."""
    if code is None:
        return f"[python code {addr:#x}]", f"{PY_MODULE}?:0"
    return code.name, f"{PY_MODULE}{code.file}:{code.firstlineno}"


def merge_frames(functions: list[str], modules: list[str], py: list[tuple[str, str, bool]]
                 ) -> tuple[list[str], list[str]]:
    """Native frames (leaf first) with the Python frames `py` [(function, module, is_entry)]
    (innermost first) put in place of the interpreter's eval frames (see the module doc)."""
    if not py:
        return functions, modules
    fo: list[str] = []
    mo: list[str] = []
    i = 0
    for fn, mod in zip(functions, modules, strict=False):
        if fn in EVAL_FUNCTIONS and i < len(py):
            while i < len(py):
                pf, pm, entry = py[i]
                fo.append(pf)
                mo.append(pm)
                i += 1
                if entry:
                    break
            continue
        fo.append(fn)
        mo.append(mod)
    for pf, pm, _ in py[i:]:
        fo.append(pf)
        mo.append(pm)
    return fo, mo


def describe(tgid: int, maps, proc_root: str = "/proc", exe: str | None = None) -> dict:
    """Find and validate the interpreter of a live process without BPF (tests, doctor):
    {"python", "layout", "interpreter", "threads", "frames_checked"}; raises LayoutRefused."""
    interp = find_interpreter(tgid, maps, proc_root, exe)
    mem = Memory(tgid, proc_root)
    try:
        lay = choose_layout(mem, interp)
        tids = {int(t) for t in os.listdir(f"{proc_root}/{tgid}/task")}
        v = validate(mem, interp, lay, tids)
    finally:
        mem.close()
    return {"python": ".".join(map(str, lay.version)), "layout": lay.source,
            "interpreter": interp.path, "threads": v.threads, "frames_checked": v.frames_checked,
            "pthread_tid": v.pthread_tid, "config": bpf_config(interp, v)}

