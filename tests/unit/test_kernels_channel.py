"""The kernels channel without root: the ring's batch reader and the record -> row
conversion on a synthetic ring, then the channel and `argus doctor -p` over a real
simulated job with the GPU agent (the agent needs no BPF)."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import time
from types import SimpleNamespace

import polars as pl
import pytest
from sim_helpers import BUILD, build_standins

from argus import doctor
from argus.collect import gpu_agent as ga
from argus.collect.channels.kernels import KernelsChannel
from argus.collect.targets import Target
from argus.collect.tracer import TraceOptions
from argus.recording import schema
from argus.sim.launcher import SimConfig, start_job

pytestmark = pytest.mark.unit

_HDR = {n: (struct.Struct("<" + f), o) for n, f, o in ga.HEADER_FIELDS}
_REC = struct.Struct("<" + "".join(f for _, f, _ in ga.RECORD_FIELDS))


def synthetic_ring(tmp_path, cap: int, records: list[tuple], tail: int = 0,
                   published: int | None = None) -> ga.GpuAgentRing:
    """A ring file as the agent leaves it: positions tail.. hold `records` (RECORD_FIELDS
    order without seq), the first `published` of them published (seq = position + 1)."""
    path = tmp_path / f"ring-{cap}-{tail}-{len(records)}"
    size = ga.HDR_BYTES + cap * ga.REC_BYTES
    with open(path, "wb") as f:
        f.truncate(size)
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, size)
    os.close(fd)
    for name, value in {"magic": ga.MAGIC, "version": ga.VERSION, "hdr_bytes": ga.HDR_BYTES,
                        "rec_bytes": ga.REC_BYTES, "capacity": cap, "tgid": 4242,
                        "head": tail + len(records), "tail": tail}.items():
        s, off = _HDR[name]
        s.pack_into(mm, off, value)
    for i in range(cap):  # a free slot's seq: the next position that lands in it
        struct.pack_into("<Q", mm, ga.HDR_BYTES + i * ga.REC_BYTES, tail + (i - tail) % cap)
    n = len(records) if published is None else published
    for j, r in enumerate(records):
        pos = tail + j
        off = ga.HDR_BYTES + (pos % cap) * ga.REC_BYTES
        _REC.pack_into(mm, off, pos + 1 if j < n else pos, *r)
    return ga.GpuAgentRing(4242, path, mm)


def kernel(i: int) -> tuple:
    # kind, channel, op, flags, device, stream, correlation, t0, t1, comm, seq, bytes, peer,
    # reserved, name
    return (1, 0, 0, 0, 3, 7, 100 + i, 10_000 + 100 * i, 10_050 + 100 * i, 0, 0, 0, -1, 0,
            b"gemm_a" if i % 2 else b"softmax")


RECORDS = [kernel(i) for i in range(9)] + [
    (2, 0, 1, 0, 3, 7, 300, 20_000, 20_400, 0, 0, 4096, -1, 0, b""),           # memcpy HtoD
    (3, 0, 0, 0, 3, 8, 301, 21_000, 21_100, 0, 0, 512, -1, 0, b""),            # memset
    (4, 2, 1, 0, 0, 0, 0, 30_000, 31_000, 0xABCDEF0123, 17, 8192, -1, 0, b"AllReduce"),
    (5, 1, 6, 0, 0, 0, 0, 40_000, 40_500, 0xABCDEF0123, 0, 64, 3, 0, b"Send"),
]


def test_read_batch_is_read_raw_across_the_wrap_and_stops_at_an_unpublished_slot(tmp_path):
    # 13 records from position 21 of a 16-slot ring: slots 5..15 then 0..1; the 12th unpublished
    a = synthetic_ring(tmp_path, 16, RECORDS, tail=21, published=11)
    b = synthetic_ring(tmp_path / "..", 16, RECORDS, tail=21, published=11)
    raw = b.read_raw()
    first = a.read_batch(limit=4)
    rest = a.read_batch()
    assert len(first) == 4 and len(rest) == 7 and len(raw) == 11
    assert a.header("tail") == b.header("tail") == 32
    got = ga.batch_frame(first, 4242).vstack(ga.batch_frame(rest, 4242))
    assert got.equals(ga.records_frame(raw, 4242))
    assert len(a.read_batch()) == 0  # nothing published after the gap
    a.close()
    b.close()
    # released slots carry the next lap's position (position + capacity), as read_raw's do
    seqs = [slot_seqs(r.path) for r in (a, b)]
    assert seqs[0] == seqs[1]
    assert [seqs[0][p % 16] for p in range(21, 32)] == [p + 16 for p in range(21, 32)]
    assert seqs[0][32 % 16] == 32  # the gap: claimed, never published


def slot_seqs(path) -> list[int]:
    data = path.read_bytes()
    return [struct.unpack_from("<Q", data, ga.HDR_BYTES + i * ga.REC_BYTES)[0]
            for i in range((len(data) - ga.HDR_BYTES) // ga.REC_BYTES)]


def test_kernel_rows_convert_each_kind_with_the_clock_offset(tmp_path):
    ring = synthetic_ring(tmp_path, 16, RECORDS)
    rows = ga.kernel_rows(ga.batch_frame(ring.read_batch(), 4242), rank=5, offset_ns=-7_000)
    ring.close()
    assert rows.schema == pl.Schema(schema.KERNELS_SCHEMA)
    assert dict(rows.group_by("kind").len().iter_rows()) == {
        "kernel": 9, "memcpy": 1, "memset": 1, "coll": 1, "p2p": 1}
    by = {k: rows.filter(pl.col("kind") == k).row(0, named=True) for k in ga.KINDS.values()}
    assert by["kernel"] == {"ts_ns": 3_000, "dur_ns": 50, "tgid": 4242, "rank": 5,
                            "kind": "kernel", "name": "softmax", "device": 3, "stream": 7,
                            "correlation": 100, "comm_hash": None, "coll_seq": None,
                            "channel": None, "bytes": None, "peer": None}
    assert by["memcpy"] == {"ts_ns": 13_000, "dur_ns": 400, "tgid": 4242, "rank": 5,
                                 "kind": "memcpy", "name": "memcpy HtoD", "device": 3,
                                 "stream": 7, "correlation": 300, "comm_hash": None,
                                 "coll_seq": None, "channel": None, "bytes": 4096, "peer": None}
    assert by["memset"]["name"] == "memset" and by["memset"]["bytes"] == 512
    assert by["coll"] == {"ts_ns": 23_000, "dur_ns": 1_000, "tgid": 4242, "rank": 5,
                          "kind": "coll", "name": "AllReduce", "device": 0, "stream": None,
                          "correlation": None, "comm_hash": 0xABCDEF0123, "coll_seq": 17,
                          "channel": 2, "bytes": 8192, "peer": None}
    assert by["p2p"]["name"] == "Send" and by["p2p"]["peer"] == 3
    assert by["p2p"]["coll_seq"] == 0 and by["p2p"]["channel"] == 1
    assert rows.filter(pl.col("kind") == "kernel")["name"].to_list() == [
        "softmax", "gemm_a"] * 4 + ["softmax"]
    assert ga.kernel_rows(ga.batch_frame(ring_empty(tmp_path), 1), 0).equals(
        schema.empty_kernels())


def ring_empty(tmp_path):
    r = synthetic_ring(tmp_path / "..", 16, [], tail=3)
    out = r.read_batch()
    r.close()
    return out


# ------------------------------------------------------------------ over a simulated job
@pytest.fixture(scope="module")
def agent_env():
    build_standins()
    return ga.gpu_env(BUILD)


def fake_tracer(pids, ranks):
    targets = {p: Target(tgid=p, traced=True, rank=r) for p, r in zip(pids, ranks, strict=True)}
    return SimpleNamespace(opts=TraceOptions(), targets=targets,
                           ctx=SimpleNamespace(rank_of=dict(zip(pids, ranks, strict=True))))


def test_the_channel_over_a_job_rows_manifest_dormant_again(tmp_path, monkeypatch, agent_env):
    for k, v in agent_env.items():
        monkeypatch.setenv(k, v)
    go = tmp_path / "go"
    job = start_job(SimConfig(ranks=2, steps=4, wait_go=str(go), wait_at="step", step_ms=8.0,
                              kernels_per_step=24, buckets=2, quiet=True, build_dir=str(BUILD),
                              timeout_s=120))
    try:
        pids = job.wait_ready(60)
        mine = [ga.GpuAgentRing.open(p, timeout=10) for p in pids]  # the test's own view
        # doctor: loaded as both, dormant
        for p in pids:
            chk = doctor._gpu_agent_check(p, "/proc", info := {})
            assert chk.status == doctor.Status.PASS, chk.detail
            assert chk.detail == ("GPU agent loaded as NCCL profiler plugin (v5) and CUPTI "
                                  "subscriber, dormant: device kernel times will be recorded")
            assert info["gpu_agent"]["loaded"] == ["nccl", "cupti"]
        tr = fake_tracer(pids, [0, 1])
        ch = KernelsChannel(tr)
        assert ch.on
        for t in tr.targets.values():
            ch.on_traced(t)
        assert all(r.header("enabled") == 1 for r in mine)
        assert all(r.wait_active(ga.ACTIVE_NCCL | ga.ACTIVE_CUPTI, 10) for r in mine)
        assert "an argus session reads it" in doctor._gpu_agent_check(pids[0], "/proc", {}).detail
        go.touch()
        while True:  # drain as the session loop does, until the job ends
            ch.poll(time.monotonic())
            try:
                assert job.wait(0.05) == 0
                break
            except subprocess.TimeoutExpired:
                pass
        for t in tr.targets.values():
            t.exited = True
            ch.on_gone(t)
        ch.finish()
        truth = job.truth()
    finally:
        job.close()
    rows = ch.take()
    assert rows is not None and ch.take().height == 0  # taken once
    part = ch.manifest()["kernels"]
    assert part["enabled"] is True and set(part["agents"]) == {str(p) for p in pids}
    for rt in truth["ranks"]:
        g, w = rt["gpu"], rt["gpu"]["comms"]["world"]
        df = rows.filter(pl.col("tgid") == rt["tgid"])
        n = g["kernels"] + g["nccl_ops"] + g["copies"] + (w["seq_end"] - w["seq_from"])
        assert df.height == n and (df["rank"] == rt["rank"]).all()
        a = part["agents"][str(rt["tgid"])]
        assert {k: a[k] for k in ("rank", "loaded", "active", "records", "dropped",
                                  "cupti_dropped", "nccl_version")} == {
            "rank": rt["rank"], "loaded": ["nccl", "cupti"], "active": ["nccl", "cupti"],
            "records": n, "dropped": 0, "cupti_dropped": 0, "nccl_version": 5}
    assert [(r.header("enabled"), r.active) for r in mine] == [(0, 0), (0, 0)]
    for r in mine:
        r.close()


def test_no_agent_is_loaded_empty_and_no_rows(tmp_path, monkeypatch):
    for k in ("NCCL_PROFILER_PLUGIN", "CUDA_INJECTION64_PATH"):
        monkeypatch.delenv(k, raising=False)
    tr = fake_tracer([os.getpid()], [0])  # this process: no agent file
    ch = KernelsChannel(tr)
    ch.on_traced(tr.targets[os.getpid()])
    ch.poll(float("inf"))
    ch.finish()
    assert ch.take() is None
    assert ch.manifest() == {"kernels": {"enabled": True, "agents": {str(os.getpid()): {
        "rank": 0, "loaded": [], "active": [], "records": 0, "dropped": 0, "cupti_dropped": 0,
        "nccl_version": None}}}}
    off = KernelsChannel(SimpleNamespace(**{**vars(tr), "opts": TraceOptions(channels=("cuda",))}))
    assert not off.on and off.manifest() == {"kernels": {"enabled": False, "agents": {}}}
