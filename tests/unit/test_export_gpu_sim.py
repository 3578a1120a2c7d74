"""The export's device tracks on real agent records: a 2-rank simulated job started with
`argus gpu-env`'s variables, its rings read as the collector will (enabled before the job
steps), exported in both formats and read back."""

from __future__ import annotations

import json

import polars as pl
import pytest
from helpers.trace_check import check_kernels, read_chrome, read_perfetto
from test_gpu_agent import gpu_env_from_cli, run_enabled_job

from argus.present.chrome import dump_chrome
from argus.present.perfetto import dump_perfetto
from argus.present.trace_export import build_trace
from argus.recording.io import Recording, coerce
from argus.recording.schema import FORMAT, KERNELS_SCHEMA, empty_events, empty_stacks

pytestmark = pytest.mark.unit


def kernel_rows(frame: pl.DataFrame, rank: int) -> pl.DataFrame:
    """Agent records (gpu_agent.RECORD_SCHEMA) -> KERNELS_SCHEMA rows, as the test's stand-in
    for the collector's conversion: the simulator's device clock is CLOCK_MONOTONIC, so
    device times are node times as they are; NCCL records have no stream or correlation,
    CUPTI records no communicator fields."""
    nccl = pl.col("kind").cast(pl.Utf8).is_in(["coll", "p2p"])
    return coerce(frame.select(
        pl.col("ts_start_ns").cast(pl.Int64).alias("ts_ns"),
        pl.col("dur_ns"),
        pl.col("tgid"),
        pl.lit(rank, pl.Int32).alias("rank"),
        pl.col("kind").cast(pl.Utf8),
        pl.when(nccl).then(pl.col("op")).otherwise(pl.col("name")).alias("name"),
        pl.col("device").cast(pl.Int32),
        pl.when(~nccl).then(pl.col("stream").cast(pl.Int64)).alias("stream"),
        pl.when(~nccl).then(pl.col("correlation").cast(pl.Int64)).alias("correlation"),
        pl.when(nccl).then(pl.col("comm_hash")).alias("comm_hash"),
        pl.when(nccl).then(pl.col("coll_seq").cast(pl.Int64)).alias("coll_seq"),
        pl.when(nccl).then(pl.col("channel").cast(pl.Int32)).alias("channel"),
        pl.col("bytes").cast(pl.Int64),
        pl.when(pl.col("kind").cast(pl.Utf8) == "p2p").then(pl.col("peer")).alias("peer"),
    ), KERNELS_SCHEMA, "kernels")


def test_a_sim_jobs_agent_records_export_as_device_tracks(tmp_path, monkeypatch, capsys):
    truth, frames, _rings = run_enabled_job(tmp_path, monkeypatch, gpu_env_from_cli(capsys),
                                            steps=5)
    kn = pl.concat([kernel_rows(f, rank) for rank, f in frames.items()])
    ends = int(kn.select(pl.col("ts_ns") + pl.col("dur_ns")).max().item())
    manifest = {"format": FORMAT, "host": "sim", "clock": {"mono_to_wall_ns": 0},
                "ended_ns": ends + 1_000_000,
                "ranks": [{"rank": r["rank"], "tgid": r["tgid"]} for r in truth["ranks"]]}
    rec = Recording(manifest, empty_events(), empty_stacks(), kernels=kn)
    trace = build_trace([rec], {"findings": []})
    pf, js = tmp_path / "t.pftrace", tmp_path / "t.json"
    with open(pf, "wb") as fh:
        dump_perfetto(trace, fh)
    with open(js, "w") as fh:
        dump_chrome(trace, fh)
    obj = json.loads(js.read_text())
    origin = obj["metadata"]["origin_wall_ns"]
    for tracks, to_ns in ((read_perfetto(pf), lambda t: t),
                          (read_chrome(obj), lambda us: round(us * 1000) + origin)):
        got = check_kernels(tracks, [rec], to_ns=to_ns)
        for rt in truth["ranks"]:
            rank, g = rt["rank"], rt["gpu"]
            mine = {name.split(" ", 2)[2]: n for (r, name), n in got.items() if r == rank}
            streams = {k: n for k, n in mine.items() if k.startswith("GPU stream")
                       and not k.endswith("memcpy/memset")}
            copies = {k: n for k, n in mine.items() if k.endswith("memcpy/memset")}
            nccl = {k: n for k, n in mine.items() if k.startswith("GPU NCCL")}
            # every simulated kernel on its stream (the compute stream; NCCL's kernels on the
            # communication stream), each copy, and one NCCL kernel-channel record per
            # collective (the stand-in uses one channel); check_kernels: none overlapping
            assert sorted(streams.values()) == sorted([g["kernels"], g["nccl_ops"]])
            assert g["kernels"] == 5 * 25 and g["nccl_ops"] == 5 * 2
            assert sum(copies.values()) == g["copies"] + g["memsets"]
            w = g["comms"]["world"]
            assert nccl == {f"GPU NCCL comm 0x{w['hash']:016x} channel 0":
                            w["seq_end"] - w["seq_from"]}
