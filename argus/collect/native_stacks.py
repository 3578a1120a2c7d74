"""Native (C/C++) user stacks of a process's threads, on demand: `argus stacks` for ranks that
are not Python (py-spy reads only CPython), so they show more than the kernel function they
sleep in.

Per thread, in turn: PTRACE_SEIZE + PTRACE_INTERRUPT stop it (only that thread, for the
microseconds of the walk), PTRACE_GETREGS gives its rip/rbp, and the frame-pointer chain is
followed through /proc/TGID/mem: each frame is (saved rbp, return address), kept while the
return address lies in an executable mapping of a file and the frame pointer grows towards
the stack's base; then PTRACE_DETACH lets it run on (a thread stopped inside a system call
resumes it: the kernel restarts it). Code built without frame pointers yields its first
frame (where the thread is now) and stops there: the walk never guesses. Addresses are
named with the same symbolizer as the CPU samples (`argus.collect.symbolize`).

x86-64 only (user_regs_struct layout); needs root or CAP_SYS_PTRACE, and refuses a process
that a debugger (or py-spy) already traces.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from argus.collect import procfs
from argus.collect.symbolize import Symbolizer

PTRACE_GETREGS = 12
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
__WALL = 0x40000000
MAX_FRAMES = 64
# user_regs_struct (x86-64): r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi
# orig_rax rip cs eflags rsp ss fs_base gs_base ds es fs gs
_REGS = 27
_RBP, _RIP, _RSP = 4, 16, 19

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


class NativeUnavailable(Exception):
    """The native stack of a thread could not be read (the reason)."""


def _ptrace(req: int, tid: int, addr: int = 0, data=None) -> int:
    r = _libc.ptrace(req, tid, ctypes.c_void_p(addr), data)
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def thread_regs(tid: int) -> tuple[int, int, int]:
    """(rip, rbp, rsp) of a stopped-for-the-occasion thread; it runs on afterwards."""
    if platform.machine() != "x86_64":
        raise NativeUnavailable(f"native stacks are read on x86-64 only ({platform.machine()})")
    try:
        _ptrace(PTRACE_SEIZE, tid)
    except OSError as e:
        why = ("another tracer (a debugger) holds it" if e.errno == errno.EPERM
               and _traced_by(tid) else e.strerror)
        raise NativeUnavailable(f"cannot stop thread {tid}: {why}") from e
    try:
        _ptrace(PTRACE_INTERRUPT, tid)
        os.waitpid(tid, __WALL)
        regs = (ctypes.c_ulong * _REGS)()
        _ptrace(PTRACE_GETREGS, tid, 0, ctypes.byref(regs))
        return regs[_RIP], regs[_RBP], regs[_RSP]
    except OSError as e:
        raise NativeUnavailable(f"cannot read thread {tid}'s registers: {e.strerror}") from e
    finally:
        try:
            _ptrace(PTRACE_DETACH, tid)
        except OSError:
            pass  # exited meanwhile


def _traced_by(tid: int) -> bool:
    try:
        with open(f"/proc/{tid}/status") as f:
            line = next(ln for ln in f if ln.startswith("TracerPid:"))
        return int(line.split()[1]) != 0
    except (OSError, StopIteration, ValueError):
        return False


def walk(mem, rip: int, rbp: int, rsp: int, executable) -> list[int]:
    """The return addresses of the frame-pointer chain from (rip, rbp): `mem(addr, n)` reads
    the process's memory (raises OSError where nothing is mapped), `executable(addr)` says
    whether an address is code of a mapped file. Stops at the first frame that breaks a
    rule (see the module doc)."""
    pcs = [rip]
    fp = rbp
    while len(pcs) < MAX_FRAMES and fp and fp >= rsp and fp % 8 == 0:
        try:
            next_fp, ret = struct.unpack("<QQ", mem(fp, 16))
        except (OSError, struct.error):
            break
        if not executable(ret):
            break
        pcs.append(ret)
        if next_fp <= fp:
            break
        fp = next_fp
    return pcs


def native_frames(tgid: int, tids: list[int], proc_root: str = "/proc") -> dict[int, list[dict]]:
    """{tid: frames} (innermost first, {"function", "module", "kind": "native"}) of the
    threads whose stack could be read; a thread that could not be stopped is left out."""
    maps = procfs.parse_maps(procfs.read_proc(tgid, "maps", proc_root).decode(errors="replace"))
    code = [(m.start, m.end) for m in maps if "x" in m.perms]
    sym = Symbolizer(lambda _t: maps, proc_root)

    def executable(addr: int) -> bool:
        return any(a <= addr < b for a, b in code)

    out: dict[int, list[dict]] = {}
    try:
        fd = os.open(os.path.join(proc_root, str(tgid), "mem"), os.O_RDONLY)
    except OSError as e:
        raise NativeUnavailable(f"cannot read process {tgid}'s memory: {e.strerror}") from e
    try:
        for tid in tids:
            try:
                rip, rbp, rsp = thread_regs(tid)
            except NativeUnavailable:
                continue
            pcs = walk(lambda a, n: os.pread(fd, n, a), rip, rbp, rsp, executable)
            frames = []
            for i, pc in enumerate(pcs):
                # a return address points after its call: name the call's own instruction
                function, module = sym.frame(tgid, pc if i == 0 else pc - 1)
                frames.append({"function": function, "file": None, "line": None,
                               "kind": "native", "module": module})
            out[tid] = frames
    finally:
        os.close(fd)
    return out
