"""GPU kernel time (the GPU agent's kernels.parquet) in the analysis: per-step device time,
the straggler cause `gpu` with kernel-family evidence, collective stalls judged on the GPU,
and the same findings from summaries (synthetic jobs, `scenarios.simulate(kernels=True)`)."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest
from scenarios import simulate

from argus.analyze import kernels, stall
from argus.analyze.compress import build_summaries
from argus.analyze.diagnosis import diagnose
from argus.analyze.evidence import align_recordings
from argus.collect import gpu_agent as ga
from argus.recording import schema
from argus.recording.summaries import load_summaries, summary_bytes, write_summaries

pytestmark = pytest.mark.unit

MS = 1e6


def _raw(kind, t0, t1, *, name=b"", op=0, stream=0, corr=0, comm=0, cseq=0, nbytes=0,
         channel=0, peer=-1, device=3):
    # RECORD_FIELDS order: seq kind channel op flags device stream correlation t0 t1 comm
    # coll_seq bytes peer reserved name
    return (1, kind, channel, op, 0, device, stream, corr, t0, t1, comm, cseq, nbytes, peer, 0,
            name.ljust(32, b"\0"))


def test_kernel_rows_turns_agent_records_into_kernels_rows():
    raw = [
        _raw(1, 1000, 1600, name=b"ampere_sgemm_128x64_nn", stream=7, corr=11),
        _raw(2, 2000, 2300, name=b"", stream=0, corr=12, nbytes=4096),
        _raw(4, 3000, 9000, op=1, comm=0xABCDEF, cseq=41, nbytes=1 << 20, channel=2),
        _raw(5, 9500, 9900, op=6, comm=0xABCDEF, cseq=42, nbytes=512, peer=1),
    ]
    rows = ga.kernel_rows(ga.records_frame(raw, 4242), rank=5, offset_ns=-500)
    assert rows.schema == pl.Schema(schema.KERNELS_SCHEMA)
    assert rows.to_dicts() == [
        {"ts_ns": 500, "dur_ns": 600, "tgid": 4242, "rank": 5, "kind": "kernel",
         "name": "ampere_sgemm_128x64_nn", "device": 3, "stream": 7, "correlation": 11,
         "comm_hash": None, "coll_seq": None, "channel": None, "bytes": None, "peer": None},
        {"ts_ns": 1500, "dur_ns": 300, "tgid": 4242, "rank": 5, "kind": "memcpy", "name": "memcpy",
         "device": 3, "stream": 0, "correlation": 12, "comm_hash": None, "coll_seq": None,
         "channel": None, "bytes": 4096, "peer": None},
        {"ts_ns": 2500, "dur_ns": 6000, "tgid": 4242, "rank": 5, "kind": "coll",
         "name": "AllReduce", "device": 3, "stream": None, "correlation": None,
         "comm_hash": 0xABCDEF, "coll_seq": 41, "channel": 2, "bytes": 1 << 20, "peer": None},
        {"ts_ns": 9000, "dur_ns": 400, "tgid": 4242, "rank": 5, "kind": "p2p", "name": "Send",
         "device": 3, "stream": None, "correlation": None, "comm_hash": 0xABCDEF,
         "coll_seq": 42, "channel": 0, "bytes": 512, "peer": 1},
    ]
    assert ga.kernel_rows(ga.records_frame([], 1), rank=0).height == 0


def test_device_time_per_step_counts_each_kernel_and_collective_once():
    sc = simulate(steps=12, kernels=True)
    run = align_recordings(sc.recordings)
    m = run.metrics
    assert m.height == 4 * 12 and m["gpu_compute_ns"].null_count() == 0
    # per step: 6 forward (20 ms), 12 backward (3 x 12 ms), 3 optimizer (4 ms) = 60 ms +-2 %
    assert m["gpu_compute_ns"].is_between(0.98 * 60 * MS, 1.02 * 60 * MS).all()
    # a read-back memcpy of 2 us per step, and one more every 10 steps
    assert sorted(set(m["gpu_copy_ns"].to_list())) == [2000, 4000]
    # (the simulated step 10's logging read-back: the first complete step is step id 0)
    assert m.filter(pl.col("gpu_copy_ns") == 4000)["step"].unique().to_list() == [9]
    fam = run.kernel_families
    n = dict(fam.group_by("family").agg(pl.col("n").unique()).rows())
    assert n == {"fwd_gemm": [3], "fwd_softmax": [3], "bwd_gemm": [6], "bwd_softmax": [6],
                 "adam_step": [3], "AllReduce": [3], "memcpy": n["memcpy"]}
    # a collective's two channel records are one operation: from the rank's GPU reaching it
    # to its end, never more than the step
    coll = fam.filter(pl.col("family") == "AllReduce")
    assert (coll["ns"] < m["step_time_ns"].min()).all() and (coll["ns"] > 0).all()
    # healthy: no finding
    assert [f for f in diagnose(sc.recordings)["findings"] if f["severity"] != "info"] == []


def _no_host_view(**kw):
    """A GPU straggler the host cannot see (no read-back mid-step): with and without the
    agent's records."""
    sc = simulate(steps=24, kernels=True, readback=False, **kw)
    bare = [dataclasses.replace(r, kernels=schema.empty_kernels()) for r in sc.recordings]
    return sc.recordings, bare


def test_a_gpu_straggler_the_host_cannot_see_is_found_from_device_time(tmp_path):
    recs, bare = _no_host_view(kernel_slow={2: {"bwd_gemm": 1.6}})
    # host-only: nothing names a rank (its host never waits for its own GPU)
    host_only = diagnose(bare)["findings"]
    assert [f for f in host_only if f["kind"] == "straggler"] == []
    assert [f for f in host_only if f["severity"] != "info"] == []
    rep = diagnose(recs)
    bad = [f for f in rep["findings"] if f["severity"] != "info"]
    assert [(f["kind"], f["rank"], f["cause"]) for f in bad] == [("straggler", 2, "gpu")]
    f = bad[0]
    ev = f["evidence"]
    assert ev["metric"] == "gpu_compute_ns" and ev["steps"] == 24
    k = ev["kernels"]
    # backward's bwd_gemm: 6 kernels of 3 ms per step, 1.6x on rank 2: +10.8 ms per step
    assert [x["name"] for x in k["families"]] == ["bwd_gemm"]
    fam = k["families"][0]
    assert fam["ratio"] == pytest.approx(1.6, abs=0.03)
    assert fam["excess_ms"] == pytest.approx(10.8, abs=0.4)
    assert fam["ms_per_step"]["others"] == pytest.approx(18.0, abs=0.4)
    assert fam["kernels_per_step"] == 6.0
    assert k["compute_ms"]["rank"] - k["compute_ms"]["others"] == pytest.approx(10.8, abs=0.4)
    assert ev["excess_ms"] == pytest.approx(10.8, abs=0.4)
    # it arrived last at the collectives: its collective kernels are the shortest
    assert k["last_arrival"] is True
    assert k["collective_ms"]["others"] - k["collective_ms"]["rank"] == pytest.approx(10.8,
                                                                                      abs=0.5)
    assert "device time" in f["summary"] and "bwd_gemm 1.60x (+10.8 ms)" in f["summary"]
    assert "it arrived last" in f["summary"]
    # the same finding from summaries, in memory and written out
    assert diagnose(build_summaries(recs))["findings"] == rep["findings"]
    write_summaries(tmp_path, build_summaries(recs))
    assert diagnose(load_summaries(tmp_path))["findings"] == rep["findings"]


def test_summaries_keep_each_kernel_familys_duration_peaks_within_1kb(tmp_path):
    recs, _ = _no_host_view(kernel_slow={2: {"bwd_gemm": 1.6}})
    summ = build_summaries(recs)
    rows = summ.kernels
    # per rank and step 5 compute kernel families and the allreduce; the logging read-back's
    # memcpy in 2 of the steps
    assert rows.height == 4 * 24 * 6 + 4 * 2
    bwd = (rows.filter(pl.col("family") == "bwd_gemm").select("rank", "dur").explode("dur")
           .unnest("dur"))
    # one peak per rank and step, at the kernel's duration: 3 ms, 4.8 ms on rank 2
    loc = bwd.group_by("rank").agg(pl.col("ns").median(), pl.col("n").unique())
    loc = {r: (ns, n) for r, ns, n in loc.rows()}
    assert loc[2][0] == pytest.approx(4.8e6, rel=0.03) and loc[2][1] == [6]
    assert all(loc[r][0] == pytest.approx(3.0e6, rel=0.03) for r in (0, 1, 3))
    write_summaries(tmp_path, summ)
    assert summary_bytes(tmp_path) / summ.steps.height <= 1024
    back = load_summaries(tmp_path).kernels
    assert back.sort("rank", "step", "family").equals(
        rows.sort("rank", "step", "family").select(back.columns))
    # without the agent: no kernels file at all
    bare = build_summaries([dataclasses.replace(r, kernels=schema.empty_kernels())
                            for r in recs])
    write_summaries(tmp_path / "bare", bare)
    assert not (tmp_path / "bare" / "summaries" / "kernels.parquet").exists()


def test_device_time_names_the_gpu_cause_once_per_rank():
    """A GPU straggler the host sees too (read-back) and a host stall on the same rank: one
    straggler finding for it, cause gpu from device time, no host-cause finding beside it."""
    sc = simulate(steps=24, kernels=True, gpu_slow={1: 1.3}, host_stall={1: (8, 11, 30.0)})
    rep = diagnose(sc.recordings)
    st = [f for f in rep["findings"] if f["kind"] == "straggler"]
    assert [(f["rank"], f["cause"], f["evidence"]["metric"]) for f in st] == [
        (1, "gpu", "gpu_compute_ns")]
    assert st[0]["start_step"] is None  # throughout, not a window
    fams = {x["name"]: x["ratio"] for x in st[0]["evidence"]["kernels"]["families"]}
    assert set(fams) == {"fwd_gemm", "fwd_softmax", "bwd_gemm", "bwd_softmax", "adam_step"}
    assert all(v == pytest.approx(1.3, abs=0.03) for v in fams.values())
    assert not [f for f in rep["findings"] if f.get("rank") == 1 and f.get("cause") == "host"]
    # without the agent the read-back wait names it (the host-side gpu cause)
    bare = [dataclasses.replace(r, kernels=schema.empty_kernels()) for r in sc.recordings]
    st0 = [f for f in diagnose(bare)["findings"] if f["kind"] == "straggler"]
    assert [(f["rank"], f["cause"], f["evidence"]["metric"]) for f in st0] == [
        (1, "gpu", "compute_wait_ns")]
    assert "kernels" not in st0[0]["evidence"]


def _stall(recs):
    st = [f for f in diagnose(recs)["findings"] if f["kind"] == "collective_stall"]
    assert len(st) == 1
    return st[0]


def test_a_link_stall_on_the_gpu_every_ranks_collective_kernels_grew():
    sc = simulate(steps=30, kernels=True, link_slow=(10, 16, 6.0))
    f = _stall(sc.recordings)
    dev = f["evidence"]["device"]
    grew = dev["collective_ms"]["window"] - dev["collective_ms"]["baseline"]
    assert grew == pytest.approx(f["evidence"]["wait_growth_ms"], rel=0.05)
    assert abs(dev["compute_ms"]["window"] - dev["compute_ms"]["baseline"]) < 1.0
    sc_ = dev["shortest_collectives"]
    assert sc_["others_ms"] - sc_["ms"] < 1.0 and "late_rank" not in dev
    assert "late_rank" not in f and "link or network degradation" in f["summary"]


def test_a_rank_whose_gpu_reaches_the_collective_last_is_named_by_device_time():
    """Rank 1's GPU is busy with work that is not its own (no kernel of it slower, its host
    on time): host-side every rank just waits longer, as on a slow link; the device times
    show rank 1's collective kernels the shortest: it arrived last."""
    sc = simulate(steps=30, kernels=True, gpu_busy={1: (10, 16, 40.0)})
    bare = [dataclasses.replace(r, kernels=schema.empty_kernels()) for r in sc.recordings]
    f0 = _stall(bare)
    assert "late_rank" not in f0 and "device" not in f0["evidence"]
    f = _stall(sc.recordings)
    dev = f["evidence"]["device"]
    assert f["late_rank"] == dev["late_rank"] == 1
    assert dev["shortest_collectives"]["rank"] == 1
    assert dev["shortest_collectives"]["others_ms"] - dev["shortest_collectives"]["ms"] == (
        pytest.approx(40.0, abs=1.5))
    assert "rank 1 arrived last" in f["summary"]
    assert [x["kind"] for x in diagnose(sc.recordings)["findings"]
            if x["severity"] != "info"] == ["collective_stall", "anomalous_window"]
    assert diagnose(build_summaries(sc.recordings))["findings"] == diagnose(
        sc.recordings)["findings"]


def test_no_stall_when_the_gpus_computed_longer():
    """Every rank's compute kernels 1.8x longer in a window (device time), the host waits at
    the end-of-step sync: without the agent a stall of the collectives, with it none."""
    sc = simulate(steps=30, kernels=True)
    m = align_recordings(sc.recordings).metrics
    # every rank's compute grows 30 ms per step in steps 10-16 while waits grow likewise
    slow = m.with_columns(
        pl.when(pl.col("step").is_between(10, 16))
        .then(pl.col("gpu_compute_ns") + 30_000_000).otherwise(pl.col("gpu_compute_ns"))
        .alias("gpu_compute_ns"),
        pl.when(pl.col("step").is_between(10, 16))
        .then(pl.col("sync_wait_ns") + 30_000_000).otherwise(pl.col("sync_wait_ns"))
        .alias("sync_wait_ns"),
        pl.when(pl.col("step").is_between(10, 16))
        .then(pl.col("step_time_ns") + 30_000_000).otherwise(pl.col("step_time_ns"))
        .alias("step_time_ns"))
    w = [{"start_step": 10, "end_step": 16, "severity": "warning",
          "start_ns": 0, "end_ns": 0}]
    assert len(stall.detect_stalls(slow.drop(kernels.KERNEL_METRICS), w, [],
                                   pl.DataFrame())) == 1
    assert stall.detect_stalls(slow, w, [], pl.DataFrame()) == []
