"""Which process group a c10d call is on: its name, the rank's place and the group's size,
read from the live process's `c10d::Backend` object.

Every c10d probe captures the backend's `this` (ProcessGroupGloo and ProcessGroupNCCL derive
from `c10d::Backend` first, so the pointer is the Backend's). Without this, a group is named
by first use on each rank (`pg0`, ...), and a job with two tensor-parallel groups {0,1} and
{2,3} has `pg0` on all four ranks: matched as one group, arrival lateness compares ranks that
never meet (measured: the host straggler of a 2 TP x 2 DP job was not found).

Layout (torch 2.x `torch/csrc/distributed/c10d/Backend.hpp`, checked on 2.13 CPU): the
Backend begins with its vtable pointer and `intrusive_ptr_target`'s two 32-bit counts, then

    +16 const int rank_     the rank's place in the group
    +20 const int size_     the group's size
    +24 DebugLevel          (an int: 0 off, 1 info, 2 detail)
    +32 std::string pg_uid_ the group's name, set by torch.distributed from the name it gives
                            the group ("0" for the world, then "1", "2", ... in the order
                            every rank calls new_group, or a hash of the members' ranks):
                            the same on every member

libstdc++'s std::string is {char *data; size_t size; char local[16] or size_t capacity}.
Every field is validated before use (0 <= rank < size <= MAX_SIZE, debug level 0-2, name 1-64
printable bytes); a layout that fails is not used, and the group keeps its first-use name.
Nothing of the object is written. It is read at the group's first call since attach by the
BPF program (`struct argus_group_rec` on the calls ring: `from_record`), while the process
runs; `read_group` (its /proc/PID/mem, once per group) is the fallback when that read
faulted. A ring drained late (a nice-10 tracer on a busy machine) may come after a short
job's rank exited, when its memory can no longer be read (seen: `pg0` for the world group).
"""

from __future__ import annotations

import ctypes as ct
import os
import string
import struct
from dataclasses import dataclass

from argus.collect import abi

RANK_OFF = 16
NAME_OFF = abi.C10D_NAME_OFF  # 32; the BPF program reads the head and the name bytes too
MAX_SIZE = 1 << 20
MAX_NAME = abi.C10D_NAME_LEN  # 64
_PRINTABLE = frozenset(string.printable.encode()) - frozenset(b"\t\n\r\x0b\x0c")


@dataclass(frozen=True)
class Group:
    name: str  # pg_uid_: the same on every member
    rank: int  # the rank's place in the group
    size: int


def parse(head: bytes, name_bytes: bytes | None) -> Group | None:
    """A Group from the first 64 bytes of a Backend and the bytes its pg_uid_ points at (None:
    not read), or None when a field is out of range."""
    if len(head) < NAME_OFF + 16:
        return None
    rank, size, debug = struct.unpack_from("<iii", head, RANK_OFF)
    _, n = struct.unpack_from("<QQ", head, NAME_OFF)
    if not (0 <= rank < size <= MAX_SIZE and 0 <= debug <= 2 and 0 < n <= MAX_NAME):
        return None
    if name_bytes is None or len(name_bytes) != n or not set(name_bytes) <= _PRINTABLE:
        return None
    return Group(name_bytes.decode("ascii"), rank, size)


def from_record(blob: bytes) -> tuple[int, int, Group | None]:
    """(tgid, backend address, its Group or None) of a `struct argus_group_rec`."""
    rec = abi.GroupRec.from_buffer_copy(blob[: ct.sizeof(abi.GroupRec)])
    n = min(int(rec.name_len), MAX_NAME)
    name = bytes(rec.name[:n]) if n else None
    return int(rec.tgid), int(rec.backend), parse(bytes(rec.head), name)


def read_group(tgid: int, this: int, proc_root: str = "/proc") -> Group | None:
    """The process group of a c10d backend object at `this` in process `tgid` (module doc), or
    None when it cannot be read or does not look like a Backend."""
    if this <= 0 or this >= 1 << 47:
        return None
    try:
        fd = os.open(f"{proc_root}/{tgid}/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        head = os.pread(fd, NAME_OFF + 32, this)
        if len(head) < NAME_OFF + 16:
            return None
        ptr, n = struct.unpack_from("<QQ", head, NAME_OFF)
        name = None
        if 0 < n <= MAX_NAME and 0 < ptr < 1 << 47:
            # a short name lives in the object itself (ptr == this + NAME_OFF + 16)
            name = os.pread(fd, n, ptr)
        return parse(head, name)
    except OSError:
        return None
    finally:
        os.close(fd)
