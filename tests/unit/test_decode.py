"""Decoding call records into events rows: pure, no root (records built with the ctypes mirror)."""

import ctypes as ct

import numpy as np
import pytest

from argus.collect import abi
from argus.collect.decode import DecodeContext, ProbeRef, decode_records
from argus.collect.specs import load_specs

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def refs():
    out, by_name = {}, {}
    for lib in load_specs():
        for spec in lib.probes:
            for sym in spec.symbols:
                pid = len(out)
                out[pid] = ProbeRef(spec, sym)
                by_name[sym] = pid
    return out, by_name


def record(probe_id, tgid=100, tid=100, ts=1000, dur=50, args=(), uid=0, out=0, seq=-1, ret=0,
           text=None):
    call = abi.Call(type=abi.REC_CALL_STR if text else abi.REC_CALL, probe_id=probe_id, tgid=tgid,
                    tid=tid, ts_ns=ts, dur_ns=dur, uid_hash=uid, out=out, seq=seq, ret=ret)
    for i, a in enumerate(args):
        call.args[i] = a
    if text is None:
        return bytes(call)
    return bytes(abi.CallStr(call=call, str=text.encode()))


def test_dtype_layout_matches_the_ctypes_mirror():
    assert np.dtype(abi.Call).itemsize == ct.sizeof(abi.Call) == 144  # 4 u32, 2 u64, 10 args, 4 u64


def test_comm_init_names_the_communicator_on_every_rank(refs):
    probes, ids = refs
    ctx = DecodeContext(probes, rank_of={100: 0, 200: 1})
    uid = 0x1234_5678_9ABC_DEF0
    blobs = [
        # ncclCommInitRank(comm*, nranks=2, <uid on the stack>, rank): out = the new handle
        record(ids["ncclCommInitRank"], tgid=100, args=(0x7000, 2, 0), uid=uid, out=0xAAA0),
        record(ids["ncclCommInitRank"], tgid=200, args=(0x7100, 2, 1), uid=uid, out=0xBBB0),
        # ncclAllReduce(send, recv, count, dtype=bfloat16(9), op=sum(0), comm, stream on stack)
        record(ids["ncclAllReduce"], tgid=100, args=(1, 2, 1000, 9, 0, 0xAAA0, 0x55), seq=0),
        record(ids["ncclAllReduce"], tgid=200, args=(1, 2, 1000, 9, 0, 0xBBB0, 0x66), seq=0),
    ]
    ev = decode_records(blobs, ctx)
    ar = ev.filter(ev["name"] == "ncclAllReduce").sort("tgid")
    assert ar["comm"].to_list() == [f"{uid:016x}"] * 2
    assert ar["comm_rank"].to_list() == [0, 1]
    assert ar["comm_nranks"].to_list() == [2, 2]
    assert ar["dtype"].to_list() == ["bfloat16"] * 2
    assert ar["bytes"].to_list() == [2000, 2000]
    assert ar["redop"].to_list() == ["sum"] * 2
    assert ar["stream"].to_list() == [0x55, 0x66]
    assert ar["seq"].to_list() == [0, 0]
    assert ar["op"].to_list() == ["allreduce"] * 2
    assert ar["rank"].to_list() == [0, 1]


def test_split_communicators_get_the_same_id_across_ranks(refs):
    probes, ids = refs
    ctx = DecodeContext(probes)
    blobs = []
    for tgid, handle, new in ((100, 0xA, 0xA1), (200, 0xB, 0xB1)):
        blobs.append(record(ids["ncclCommInitRank"], tgid=tgid, args=(0, 2, 0), uid=7, out=handle))
        blobs.append(record(ids["ncclCommSplit"], tgid=tgid, args=(handle, 3, 0, 0x9000), out=new))
        blobs.append(record(ids["ncclSend"], tgid=tgid, args=(0, 10, 7, 1, new, 0), seq=0))
    ev = decode_records(blobs, ctx)
    sends = ev.filter(ev["name"] == "ncclSend")
    assert sends["comm"].to_list() == ["0000000000000007/split0.c3"] * 2
    assert sends["peer"].to_list() == [1, 1]
    assert sends["bytes"].to_list() == [40, 40]  # float32


def test_unknown_communicators_are_named_by_first_use(refs):
    probes, ids = refs
    ctx = DecodeContext(probes)
    blobs = [record(ids["ncclAllReduce"], args=(0, 0, 1, 7, 0, h, 0, 0), seq=0)
             for h in (0xC, 0xD, 0xC)]
    ev = decode_records(blobs, ctx)
    assert ev["comm"].to_list() == ["anon0", "anon1", "anon0"]


def test_kernel_names_and_driver_handles(refs):
    probes, ids = refs
    names = {(100, 0x401000): "flash_attn_fwd_kernel"}
    ctx = DecodeContext(probes, kernel_name=lambda tgid, addr: names.get((tgid, addr)))
    blobs = [
        record(ids["cudaLaunchKernel"], args=(0x401000, 0, 0, 0, 0, 0, 0, 0x42)),
        record(ids["cuModuleGetFunction"], args=(0x8000, 0x1, 0x2000), out=0xF00,
               text="ampere_sgemm"),
        record(ids["cuLaunchKernel"], args=(0xF00,)),
        record(ids["cudaLaunchKernel"], args=(0x999,)),
    ]
    ev = decode_records(blobs, ctx)
    assert ev["kernel"].to_list() == ["flash_attn_fwd_kernel", "ampere_sgemm", "ampere_sgemm", None]
    launch = ev.row(0, named=True)
    assert launch["stream"] == 0x42 and launch["dur_ns"] is None  # entry-only probe


def test_return_codes_and_durations(refs):
    probes, ids = refs
    rec = record(ids["cudaMemcpy"], dur=12345, args=(0, 0, 4096, 2), ret=(1 << 32) - 1)
    ev = decode_records([rec], DecodeContext(probes))
    row = ev.row(0, named=True)
    assert (row["dur_ns"], row["bytes"], row["memcpy_kind"], row["ret"]) == (12345, 4096, 2, -1)


def test_work_probes_are_timed_by_their_completion_call():
    from argus.collect.decode import pair_completions, rows_to_frame

    work, done = "AsyncWork::execute", "AsyncWork::finishWorkGloo"
    rows = [
        {"ts_ns": 100, "tgid": 1, "tid": 7, "name": work, "in_flight": False},
        {"ts_ns": 130, "tgid": 1, "tid": 8, "name": "other", "in_flight": False},
        {"ts_ns": 150, "tgid": 1, "tid": 7, "name": done, "in_flight": False},
        {"ts_ns": 200, "tgid": 1, "tid": 7, "name": work, "in_flight": False},
        {"ts_ns": 260, "tgid": 1, "tid": 7, "name": "AsyncWork::finishWorkGlooError",
         "in_flight": False},
        {"ts_ns": 300, "tgid": 2, "tid": 9, "name": work, "in_flight": False},  # never finished
    ]
    ev = pair_completions(rows_to_frame(rows), {work}, {done, "AsyncWork::finishWorkGlooError"})
    got = ev.filter(ev["name"] == work).select("ts_ns", "dur_ns", "in_flight").rows()
    assert got == [(100, 50, False), (200, 60, False), (300, None, True)]
    assert ev.height == 6


def test_cpp_symbols_get_no_return_probes():
    from argus.collect.specs import parse_spec
    from argus.errors import SpecInvalid

    text = """
[library]
family = "torch"
channel = "torch"
files = ["libtorch_cpu.so*"]

[[probe]]
symbol = "_ZN5torch8autograd6Engine7executeEv"
kind = "autograd"
exit = true
"""
    with pytest.raises(SpecInvalid, match="no return probes on C\\+\\+ functions"):
        parse_spec(text, "t.toml")


def test_free_gets_the_size_of_its_malloc(refs):
    probes, ids = refs
    blobs = [
        record(ids["cudaMalloc"], args=(0x7FF0, 4096), out=0xD000),
        record(ids["cudaFree"], args=(0xD000,)),
        record(ids["cudaFree"], args=(0xE000,)),  # allocated before attach: size unknown
    ]
    ev = decode_records(blobs, DecodeContext(probes))
    assert ev["bytes"].to_list() == [4096, 4096, None]


def test_bulk_decode_equals_the_per_record_decode(refs):
    """Launch/sync/copy records are decoded in bulk (numpy): the frame must be the one
    decoding every record alone gives, row for row, mixed with every other probe's records
    (communicator bookkeeping in record order, strings, unknown probe ids, negative codes)."""
    from argus.collect.decode import _bulk_ok, decode_call, rows_to_frame

    probes, ids = refs
    rng = np.random.default_rng(3)
    names = {(100, 0x401000): "gemm", (200, 0x401000): "gemm_b", (100, 0x402000): "softmax"}
    stubs = [0x401000, 0x402000, 0x999]

    def ctx():
        return DecodeContext(probes, rank_of={100: 0, 200: None},
                             kernel_name=lambda tgid, addr: names.get((tgid, addr)))

    blobs = []
    for _ in range(3000):
        pid = int(rng.integers(0, len(probes) + 2))  # a couple of unknown ids too
        args = [int(x) for x in rng.integers(0, 1 << 40, 10)]
        args[0] = stubs[int(rng.integers(0, 3))]
        text = "kern" if rng.random() < 0.05 else None
        blobs.append(record(pid, tgid=int(rng.choice([100, 200])), tid=int(rng.integers(1, 9)),
                            ts=int(rng.integers(0, 1 << 50)), dur=int(rng.integers(0, 1 << 30)),
                            args=args, out=int(rng.integers(0, 1 << 20)),
                            seq=int(rng.integers(-1, 5)), ret=int(rng.integers(0, 1 << 32)),
                            text=text))
    assert sum(_bulk_ok(probes[ids[s]]) for s in ("cudaLaunchKernel", "cudaMemcpy",
                                                   "cudaStreamSynchronize")) == 3
    ref_ctx = ctx()
    rows = []
    for b in blobs:
        if b[:4] == b"\x02\x00\x00\x00":
            rec = np.frombuffer(b, dtype=np.dtype(abi.CallStr))[0]
            row = decode_call(rec["call"], bytes(rec["str"]).split(b"\0", 1)[0].decode(), ref_ctx,
                              in_flight=False)
        else:
            row = decode_call(np.frombuffer(b, dtype=np.dtype(abi.Call))[0], None, ref_ctx,
                              in_flight=False)
        if row is not None:
            rows.append(row)
    expect = rows_to_frame(rows)
    got = decode_records(blobs, ctx())
    assert got.height == expect.height > 2000
    assert got.schema == expect.schema
    assert got.to_dicts() == expect.to_dicts()
    assert decode_records([], ctx()).height == 0
