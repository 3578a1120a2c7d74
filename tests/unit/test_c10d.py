"""c10d process groups read from the live process (argus/collect/c10d.py): a Backend-shaped
object built in this process is read back through /proc/self/mem, out-of-range fields are
refused, and the decoder names groups by what was read."""

from __future__ import annotations

import ctypes as ct
import os
import struct

import pytest

from argus.collect import abi, c10d
from argus.collect.c10d import Group
from argus.collect.decode import DecodeContext, ProbeRef, decode_records
from argus.collect.specs import load_specs

pytestmark = pytest.mark.unit

GLOO_ALLREDUCE = ("_ZN4c10d16ProcessGroupGloo9allreduceERSt6vectorIN2at6TensorESaIS3_EERKNS_16"
                  "AllreduceOptionsE")


def _call(probe_id: int, tgid: int, this: int) -> bytes:
    call = abi.Call(type=abi.REC_CALL, probe_id=probe_id, tgid=tgid, tid=tgid, ts_ns=1000,
                    seq=0)
    call.args[1] = this  # comm = reg2 (rdi is the returned intrusive_ptr's slot)
    return bytes(call)


def _probes() -> tuple[dict[int, ProbeRef], dict[str, int]]:
    """Every probe of the shipped specs, numbered: (probe id -> ref, symbol -> probe id)."""
    probes, ids = {}, {}
    for lib in load_specs():
        for spec in lib.probes:
            for sym in spec.symbols:
                ids[sym] = len(probes)
                probes[len(probes)] = ProbeRef(spec, sym)
    return probes, ids


def _backend(rank: int, size: int, name: bytes, debug: int = 0, long_name=None):
    """A c10d::Backend's first 64 bytes as torch 2.x lays them out (module doc): vtable,
    counts, rank_, size_, DebugLevel, then pg_uid_ (a libstdc++ std::string)."""
    buf = ct.create_string_buffer(64)
    base = ct.addressof(buf)
    struct.pack_into("<QII", buf, 0, 0xDEAD0000, 1, 1)
    struct.pack_into("<iii", buf, 16, rank, size, debug)
    if long_name is None:  # short string: the characters live in the object (SSO)
        struct.pack_into("<QQ", buf, 32, base + 48, len(name))
        buf[48 : 48 + len(name)] = name
    else:
        struct.pack_into("<QQQ", buf, 32, ct.addressof(long_name), len(name), 40)
    return buf


def test_a_backend_object_is_read_through_proc_mem():
    obj = _backend(1, 2, b"3")
    assert c10d.read_group(os.getpid(), ct.addressof(obj)) == Group("3", 1, 2)
    # a hashed group name (torch's use_hashed_name: 40 hex digits) is a heap string
    hashed = ct.create_string_buffer(b"a3f1" * 10)
    obj = _backend(0, 4, b"a3f1" * 10, long_name=hashed)
    assert c10d.read_group(os.getpid(), ct.addressof(obj)) == Group("a3f1" * 10, 0, 4)


@pytest.mark.parametrize("rank,size,debug,name", [
    (2, 2, 0, b"1"),        # rank outside the group
    (-1, 4, 0, b"1"),
    (0, 0, 0, b"1"),
    (0, 1 << 21, 0, b"1"),  # no group is that large
    (0, 2, 7, b"1"),        # not a DebugLevel
    (0, 2, 0, b""),         # torch always names a group
    (0, 2, 0, b"\x01\x02"),  # not text
])
def test_what_does_not_look_like_a_backend_is_refused(rank, size, debug, name):
    obj = _backend(rank, size, name, debug)
    assert c10d.read_group(os.getpid(), ct.addressof(obj)) is None


def test_unreadable_memory_and_gone_processes_give_none():
    assert c10d.read_group(os.getpid(), 0x10) is None  # unmapped
    assert c10d.read_group(os.getpid(), 0) is None
    assert c10d.read_group(2**22 + 12345, 0x7F0000000000) is None  # no such process


def test_the_decoder_names_groups_by_their_torch_name_on_every_rank():
    """Two TP groups {0,1} (torch's "1") and {2,3} ("2"): the first group each rank uses is
    its TP group, so by first use both were `pg0`; read, they are told apart and every
    call carries the rank's place and the group's size. A group that cannot be read keeps
    the first-use name."""
    probes, ids = _probes()
    groups = {(100, 0xA0): Group("1", 0, 2), (101, 0xB0): Group("1", 1, 2),
              (102, 0xC0): Group("2", 0, 2), (103, 0xD0): Group("2", 1, 2)}
    ctx = DecodeContext(probes, pg_group=lambda tgid, this: groups.get((tgid, this)))
    calls = [(100, 0xA0), (101, 0xB0), (102, 0xC0), (103, 0xD0), (103, 0xE0)]
    blobs = [_call(ids[GLOO_ALLREDUCE], t, h) for t, h in calls]
    ev = decode_records(blobs, ctx)
    assert ev.select("tgid", "comm", "comm_rank", "comm_nranks").rows() == [
        (100, "pg:1", 0, 2), (101, "pg:1", 1, 2), (102, "pg:2", 0, 2), (103, "pg:2", 1, 2),
        (103, "pg0", None, None)]


def _group_rec(tgid: int, obj, name_len: int | None = None) -> bytes:
    """The `argus_group_rec` the BPF program writes at a group's first call: the Backend's
    first 48 bytes and the bytes its pg_uid_ points at."""
    rec = abi.GroupRec(type=abi.REC_GROUP, tgid=tgid, backend=ct.addressof(obj))
    head = bytes(obj)[: abi.C10D_HEAD]
    ct.memmove(rec.head, head, abi.C10D_HEAD)
    ptr, n = struct.unpack_from("<QQ", head, abi.C10D_NAME_OFF)
    rec.name_len = n if name_len is None else name_len
    ct.memmove(rec.name, ptr, min(rec.name_len, abi.C10D_NAME_LEN))
    return bytes(rec)


def test_a_group_read_at_its_first_call_names_it_after_the_process_is_gone():
    """The ring is drained after the rank exited (a busy machine): its memory can no longer
    be read (`pg_group` answers None), and the group is named from the BPF program's read
    (`argus_group_rec`); a record whose name read faulted leaves the first-use name."""
    probes, ids = _probes()
    world, hashed_buf = _backend(1, 4, b"0"), ct.create_string_buffer(b"9c" * 20)
    hashed = _backend(0, 2, b"9c" * 20, long_name=hashed_buf)
    assert c10d.from_record(_group_rec(100, world)) == (100, ct.addressof(world),
                                                        Group("0", 1, 4))
    assert c10d.from_record(_group_rec(100, hashed))[2] == Group("9c" * 20, 0, 2)
    assert c10d.from_record(_group_rec(101, world, name_len=0))[2] is None
    ctx = DecodeContext(probes, pg_group=lambda tgid, this: None)  # the ranks are gone
    for blob in (_group_rec(100, world), _group_rec(100, hashed),
                 _group_rec(101, world, name_len=0)):
        ctx.name_group(*c10d.from_record(blob))
    calls = [(100, ct.addressof(world)), (100, ct.addressof(hashed)), (101, ct.addressof(world))]
    ev = decode_records([_call(ids[GLOO_ALLREDUCE], t, h) for t, h in calls], ctx)
    assert ev.select("tgid", "comm", "comm_rank", "comm_nranks").rows() == [
        (100, "pg:0", 1, 4), (100, "pg:9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c", 0, 2),
        (101, "pg0", None, None)]


def test_c10d_probes_ask_the_bpf_program_to_read_their_group():
    flags = {spec.kind: spec.flags for lib in load_specs() for spec in lib.probes
             if "comm" in spec.args}
    assert flags["pg_collective"] & abi.PF_GROUP and flags["pg_p2p"] & abi.PF_GROUP
    assert not flags["collective"] & abi.PF_GROUP  # an ncclComm_t is not a Backend
