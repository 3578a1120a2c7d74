"""The GPU channel end to end: the simulator's throttle fault, read through its libnvidia-ml
stand-in by the real pynvml during `argus attach`, recorded in gpu.parquet and diagnosed."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from argus.analyze.diagnosis import diagnose
from argus.collect.session import run_session
from argus.collect.tracer import TraceOptions
from argus.recording import schema
from argus.recording.io import load_recording
from argus.sim.launcher import SimConfig, find_build_dir, start_job

pytestmark = pytest.mark.bpf

STUB = find_build_dir() / "stubs" / "libnvidia-ml.so.1"


def _record(tmp: Path, faults: list[str], nvml_lib: str, steps: int = 40, interval=0.2):
    """Run a 3-rank job (own NVML node namespace), attach to its launcher, load the recording."""
    node = f"gputest-{os.getpid()}-{tmp.name}"
    saved = {k: os.environ.get(k) for k in ("ARGUS_SIM_NODE", "ARGUS_NVML_LIB")}
    os.environ["ARGUS_SIM_NODE"] = node
    os.environ["ARGUS_NVML_LIB"] = nvml_lib
    go = tmp / "go"
    cfg = SimConfig(ranks=3, steps=steps, faults=faults, wait_go=str(go), quiet=True, node=node,
                    truth=str(tmp / "truth.json"))
    job = start_job(cfg)
    try:
        job.wait_ready()
        result = run_session([job.launcher_pid], tmp / "rec", TraceOptions(gpu_interval_s=interval),
                             duration_s=60, on_started=lambda tracer: go.touch())
        assert job.wait(timeout=30) == 0
    finally:
        if job.proc.poll() is None:
            job.terminate()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return load_recording(result.path)


@pytest.fixture(scope="module")
def throttled(tmp_path_factory):
    if not STUB.exists():
        pytest.skip("the simulator is not built (make setup)")
    return _record(tmp_path_factory.mktemp("throttle"), ["throttle:rank=1,mhz=1200"], str(STUB))


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    if not STUB.exists():
        pytest.skip("the simulator is not built (make setup)")
    return _record(tmp_path_factory.mktemp("healthy"), [], str(STUB))


def _busy(rec, rank):
    g = rec.gpu.filter((pl.col("rank") == rank) & ((pl.col("throttle_reasons") & 1) == 0))
    assert g.height >= 5, (rank, g.height)
    return g


def test_devices_joined_to_ranks_by_cudasetdevice(throttled):
    gpu = throttled.manifest["gpu"]
    assert gpu["available"] is True and gpu["library"] == str(STUB)
    assert gpu["driver"] == "550.54.15" and gpu["errors"] == {}
    assert throttled.manifest["channels"]["gpu"] is True
    for r in throttled.manifest["ranks"]:
        assert r["cuda_device"] == r["local_rank"] == r["rank"]
        assert r["gpu"]["device"] == r["rank"] and r["gpu"]["via"] == ["cudaSetDevice"]
        assert r["gpu"]["bus_id"] == f"00000000:{0x18 + r['rank']:02X}:00.0"
    devices = {d["index"]: d for d in gpu["devices"]}
    assert [devices[i]["ranks"] for i in range(4)] == [[0], [1], [2], []]
    # What the stand-in does not back is null, recorded once, never an error.
    assert {
        "ecc_corrected",
        "retired_pages",
        "remapped_rows",
        "nvlink",
        "pcie_tx_bytes_per_s",
    } <= set(gpu["unsupported"])
    assert throttled.gpu["ecc_corrected"].null_count() == throttled.gpu.height


def test_gpu_parquet_shows_rank_1_clock_drop_and_reason(throttled):
    assert (throttled.path / schema.GPU).exists()
    r1 = _busy(throttled, 1)
    assert set(r1["sm_clock_mhz"].to_list()) == {1200}
    assert all(t == ["SwThermalSlowdown"] for t in r1["throttle"].to_list())
    assert set(r1["throttle_reasons"].to_list()) == {0x20}
    for rank in (0, 2):
        g = _busy(throttled, rank)
        assert set(g["sm_clock_mhz"].to_list()) == {1980}
        assert set(g["throttle_reasons"].to_list()) == {0}
    assert set(r1["sm_clock_max_mhz"].to_list()) == {1980}
    assert set(r1["power_limit_w"].to_list()) == {700.0}


def test_diagnosis_reports_gpu_throttle_on_rank_1_citing_the_clock_drop(throttled):
    report = diagnose([throttled])
    found = [f for f in report["findings"] if f["kind"] == "gpu_throttle"]
    assert [f["rank"] for f in found] == [1]
    f = found[0]
    assert f["severity"] in ("warning", "critical") and f["device"] == 1
    assert f["bus_id"] == "00000000:19:00.0"
    ev = f["evidence"]
    assert ev["sm_clock_mhz"] == {"rank": 1200.0, "reference": 1980.0,
                                  "reference_is": "other_ranks", "max": 1980}
    assert ev["clock_drop"] == 0.394 and ev["expected_slowdown"] == 1.65
    assert ev["reasons"] == ["SwThermalSlowdown"]
    assert ev["reason_samples"] == ev["throttled_samples"] >= 5
    assert "1200 MHz vs 1980 MHz" in f["summary"] and "SwThermalSlowdown" in f["summary"]
    steps = report["steps"]["count"]
    assert f["start_step"] <= 2 and f["end_step"] >= steps - 3  # throttled from step 0 to the end
    # The straggler finding on rank 1 cites the NVML evidence.
    strag = [s for s in report["findings"] if s["kind"] == "straggler" and s["rank"] == 1]
    assert strag and strag[0]["cause"] == "gpu"
    nv = strag[0]["evidence"]["nvml"]
    assert nv["throttled"] is True and nv["device"] == 1
    assert (
        nv["throttle"]["sm_clock_mhz"]["rank"] == 1200.0 and nv["throttle"]["clock_drop"] == 0.394
    )
    assert ev["explains_straggler"] is True
    assert not [s for s in report["findings"] if s["kind"] == "straggler" and s["rank"] != 1]


def test_healthy_job_has_no_gpu_throttle(healthy):
    for rank in (0, 1, 2):
        g = _busy(healthy, rank)
        assert set(g["sm_clock_mhz"].to_list()) == {1980}
        assert set(g["throttle_reasons"].to_list()) == {0}
    report = diagnose([healthy])
    assert not [f for f in report["findings"] if f["kind"] in ("gpu_throttle", "straggler")]


def test_absent_nvml_library_is_one_manifest_line(tmp_path):
    rec = _record(tmp_path, [], str(tmp_path / "no-such" / "libnvidia-ml.so.1"), steps=8)
    gpu = rec.manifest["gpu"]
    assert gpu["available"] is False
    assert gpu["reason"].startswith(f"no NVML library ({tmp_path}/no-such/libnvidia-ml.so.1: ")
    assert rec.manifest["channels"]["gpu"] is False
    assert not (rec.path / schema.GPU).exists() and rec.gpu.height == 0
    assert rec.events.height > 0  # the rest of the recording is whole
    assert not [f for f in diagnose([rec])["findings"] if f["kind"] == "gpu_throttle"]
