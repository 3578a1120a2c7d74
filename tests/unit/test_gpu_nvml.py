"""The NVML channel without a GPU: a fake pynvml module, the join, reason decoding, absence."""

from __future__ import annotations

import json
from types import SimpleNamespace

import polars as pl
import pytest

from argus.collect import nvml
from argus.collect.nvml import GpuSampler, join_devices, parse_visible_devices
from argus.recording import schema
from argus.recording.gpu import decode_reasons, is_slowdown
from argus.recording.io import load_recording, write_recording

pytestmark = pytest.mark.unit


class FakeNVMLError(Exception):
    def __init__(self, value: int, text: str):
        super().__init__(text)
        self.value = value


NOT_SUPPORTED = FakeNVMLError(3, "Not Supported")
NOT_FOUND = FakeNVMLError(13, "Function Not Found")


class FakeNvml:
    """A pynvml-shaped module: `clocks[i]`, `reasons[i]`; `unsupported` names methods raising
    NotSupported; `missing` names methods raising FunctionNotFound; `fail_init` an error."""

    def __init__(self, n=2, clocks=None, reasons=None, unsupported=(), missing=(), fail_init=None):
        self.n = n
        self.clocks = clocks or [1980] * n
        self.reasons = reasons or [0] * n
        self.unsupported = set(unsupported)
        self.missing = set(missing)
        self.fail_init = fail_init
        self.calls: dict[str, int] = {}
        self.shutdowns = 0

    def __getattr__(self, name):
        raise AttributeError(name)

    def _hit(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.unsupported:
            raise NOT_SUPPORTED
        if name in self.missing:
            raise NOT_FOUND

    def nvmlInit(self):
        if self.fail_init is not None:
            raise self.fail_init

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return b"550.54.15"

    def nvmlDeviceGetCount(self):
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return "NVIDIA H100"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h:08x}-aaaa"

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=f"00000000:{0x18 + h:02X}:00.0".encode())

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return 1980 if kind == 1 else 2619

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700000

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 << 30, used=(10 + h) << 30)

    def nvmlDeviceGetClockInfo(self, h, kind):
        self._hit("nvmlDeviceGetClockInfo")
        return self.clocks[h] if kind == 1 else 2619

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=95, memory=40)

    def nvmlDeviceGetPowerUsage(self, h):
        self._hit("nvmlDeviceGetPowerUsage")
        return 450500

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 70

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        self._hit("nvmlDeviceGetCurrentClocksEventReasons")
        return self.reasons[h]

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        self._hit("nvmlDeviceGetCurrentClocksThrottleReasons")
        return self.reasons[h]

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        self._hit("nvmlDeviceGetTotalEccErrors")
        return 2 if kind == 0 else 0

    def nvmlDeviceGetRetiredPages(self, h, cause):
        self._hit("nvmlDeviceGetRetiredPages")
        return [0x1000] if cause == 0 else []

    def nvmlDeviceGetRemappedRows(self, h):
        self._hit("nvmlDeviceGetRemappedRows")
        return (1, 0, 0, 0)

    def nvmlDeviceGetPcieThroughput(self, h, counter):
        self._hit("nvmlDeviceGetPcieThroughput")
        return 1000 if counter == 0 else 2000

    def nvmlDeviceGetFieldValues(self, h, fields):
        self._hit("nvmlDeviceGetFieldValues")
        return [SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(ullVal=5)) for _ in fields]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        self._hit("nvmlDeviceGetComputeRunningProcesses")
        return []


def _sampler(fake, passes=3) -> GpuSampler:
    ticks = iter(range(1_000, 1_000_000_000, 1_000))
    s = GpuSampler(interval_s=1.0, nvml=fake, env={}, clock_ns=lambda: next(ticks))
    assert s.open(), s.reason
    for _ in range(passes):
        s.sample_once()
    return s


RANKS = [
    {"rank": 0, "tgid": 100, "local_rank": 0, "env": {}, "cuda_device": None},
    {"rank": 1, "tgid": 101, "local_rank": 1, "env": {}, "cuda_device": None},
]


# -- decoding -----------------------------------------------------------------------------------


def test_decode_reasons_names_every_bit_and_unknown_ones():
    assert decode_reasons(None) is None
    assert decode_reasons(0) == []
    assert decode_reasons(0x20) == ["SwThermalSlowdown"]
    assert decode_reasons(0x1 | 0x4 | 0x80) == ["GpuIdle", "SwPowerCap", "HwPowerBrakeSlowdown"]
    assert decode_reasons(0x8 | 0x400) == ["HwSlowdown", "bit0x400"]
    assert not is_slowdown(0x1) and not is_slowdown(0) and not is_slowdown(None)
    assert is_slowdown(0x21) and is_slowdown(0x4)


# -- the join -----------------------------------------------------------------------------------

DEVICES = [{"index": i, "uuid": f"GPU-{i:08x}-aaaa", "bus_id": f"00000000:{0x18 + i:02X}:00.0"}
           for i in range(4)]


def test_parse_visible_devices_follows_cuda_rules():
    assert parse_visible_devices(None) is None
    assert parse_visible_devices("") == []
    assert parse_visible_devices("2, 3") == ["2", "3"]
    assert parse_visible_devices("1,foo,2") == ["1"]  # CUDA stops at the first invalid entry
    assert parse_visible_devices("-1,2") == []
    assert parse_visible_devices("GPU-0000,3") == ["GPU-0000", "3"]


def test_join_prefers_cudasetdevice_then_local_rank_through_visible_devices():
    ranks = [
        {"tgid": 1, "rank": 0, "local_rank": 0, "cuda_device": 1, "env": {}},
        {"tgid": 2, "rank": 1, "local_rank": 1, "env": {"CUDA_VISIBLE_DEVICES": "3,2"}},
        {
            "tgid": 3,
            "rank": 2,
            "local_rank": 5,
            "env": {"CUDA_VISIBLE_DEVICES": "2"},
            "cuda_device": 0,
        },
        {"tgid": 4, "rank": 3, "env": {"CUDA_VISIBLE_DEVICES": "GPU-00000002"}},
        {"tgid": 5, "rank": 4, "local_rank": 2, "env": {"CUDA_VISIBLE_DEVICES": "0,1"}},
        {"tgid": 6, "rank": 5, "env": {}},
        {"tgid": 7, "rank": 6, "local_rank": 9, "env": {}},
    ]
    j = join_devices(ranks, DEVICES)
    assert j[1] == {"device": 1, "bus_id": "00000000:19:00.0", "uuid": "GPU-00000001-aaaa",
                    "via": ["cudaSetDevice"]}
    assert (j[2]["device"], j[2]["via"]) == (2, ["LOCAL_RANK", "CUDA_VISIBLE_DEVICES"])
    assert (j[3]["device"], j[3]["via"]) == (2, ["cudaSetDevice", "CUDA_VISIBLE_DEVICES"])
    assert (j[4]["device"], j[4]["via"]) == (2, ["CUDA_VISIBLE_DEVICES"])  # a UUID prefix
    why = "CUDA ordinal 2 is not in CUDA_VISIBLE_DEVICES (2 usable)"
    assert j[5] == {"device": None, "reason": why}
    assert j[6]["device"] is None and "LOCAL_RANK" in j[6]["reason"]
    assert j[7] == {"device": None, "reason": "NVML has no device 9"}


def test_join_uses_nvml_process_list_only_when_unambiguous():
    ranks = [{"tgid": 1, "rank": 0, "local_rank": 0, "env": {}},
             {"tgid": 2, "rank": 1, "local_rank": 1, "env": {}}]
    # tgid 2 also has a stray context on device 0 (the classic torch rank-on-GPU0 bug).
    j = join_devices(ranks, DEVICES, processes={1: {3}, 2: {0, 1}})
    assert (j[1]["device"], j[1]["via"]) == (3, ["nvml_processes"])
    assert (j[2]["device"], j[2]["via"]) == (1, ["LOCAL_RANK"])


# -- sampling -----------------------------------------------------------------------------------


def test_samples_every_field_and_joins_rows_to_ranks():
    fake = FakeNvml(n=3, clocks=[1980, 1200, 345], reasons=[0, 0x20, 0x1])
    s = _sampler(fake, passes=2)
    gpu, frame, joins = s.finish(RANKS)
    assert frame.schema == pl.Schema(schema.GPU_SCHEMA)
    assert frame.height == 6 and s.passes == 2  # finish takes no extra pass after sampling
    r1 = frame.filter(pl.col("device") == 1).row(0, named=True)
    assert r1["rank"] == 1 and r1["tgid"] == 101 and r1["bus_id"] == "00000000:19:00.0"
    assert (r1["sm_clock_mhz"], r1["sm_clock_max_mhz"], r1["mem_clock_mhz"]) == (1200, 1980, 2619)
    assert r1["throttle_reasons"] == 0x20 and r1["throttle"] == ["SwThermalSlowdown"]
    assert (r1["power_w"], r1["power_limit_w"], r1["temp_c"]) == (450.5, 700.0, 70)
    assert (r1["util_gpu_pct"], r1["util_mem_pct"]) == (95, 40)
    assert (r1["mem_used_bytes"], r1["mem_total_bytes"]) == (11 << 30, 80 << 30)
    assert (r1["ecc_corrected"], r1["ecc_uncorrected"], r1["retired_pages"]) == (2, 0, 1)
    assert (r1["remapped_rows"], r1["remap_pending"]) == (1, False)
    assert (r1["pcie_tx_bytes_per_s"], r1["pcie_rx_bytes_per_s"]) == (1000 * 1024, 2000 * 1024)
    assert (r1["nvlink_tx_bytes"], r1["nvlink_rx_bytes"]) == (5 * 1024, 5 * 1024)
    d2 = frame.filter(pl.col("device") == 2)
    assert d2["rank"].null_count() == 2  # no rank uses device 2
    assert gpu["available"] is True and gpu["driver"] == "550.54.15"
    assert [d["ranks"] for d in gpu["devices"]] == [[0], [1], []]
    assert gpu["devices"][1]["bus_id"] == "00000000:19:00.0"
    assert gpu["unsupported"] == {} and gpu["errors"] == {} and gpu["samples"] == 6
    assert joins[101]["device"] == 1
    assert fake.shutdowns == 1


def test_not_supported_fields_are_null_recorded_once_and_not_retried():
    fake = FakeNvml(n=2, unsupported={"nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetPowerUsage"},
                    missing={"nvmlDeviceGetRemappedRows", "nvmlDeviceGetFieldValues"})
    s = _sampler(fake, passes=4)
    gpu, frame, _ = s.finish(RANKS)
    for col in ("ecc_corrected", "ecc_uncorrected", "power_w", "remapped_rows", "nvlink_tx_bytes"):
        assert frame[col].null_count() == frame.height == 8, col
    assert frame["sm_clock_mhz"].null_count() == 0 and frame["retired_pages"].to_list() == [1] * 8
    assert gpu["unsupported"] == {
        "power_w": {"reason": "Not Supported", "devices": [0, 1]},
        "ecc_corrected": {"reason": "Not Supported", "devices": [0, 1]},
        "ecc_uncorrected": {"reason": "Not Supported", "devices": [0, 1]},
        "remapped_rows": {"reason": "Function Not Found", "devices": [0, 1]},
        "nvlink": {"reason": "Function Not Found", "devices": [0, 1]},
    }
    # Each unsupported call was made once per device, not once per pass.
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 2
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] == 2 * 2  # two fields
    assert fake.calls["nvmlDeviceGetClockInfo"] == 4 * 2 * 2
    assert gpu["errors"] == {}


def test_throttle_reasons_fall_back_to_the_older_call():
    fake = FakeNvml(n=1, reasons=[0x4], missing={"nvmlDeviceGetCurrentClocksEventReasons"})
    gpu, frame, _ = _sampler(fake, passes=1).finish(RANKS[:1])
    assert frame["throttle"].to_list() == [["SwPowerCap"]]
    assert "throttle_reasons" not in gpu["unsupported"]
    both = FakeNvml(n=1, missing={"nvmlDeviceGetCurrentClocksEventReasons",
                                  "nvmlDeviceGetCurrentClocksThrottleReasons"})
    gpu, frame, _ = _sampler(both, passes=1).finish(RANKS[:1])
    assert frame["throttle_reasons"].to_list() == [None] and frame["throttle"].to_list() == [None]
    assert gpu["unsupported"]["throttle_reasons"] == {
        "reason": "Function Not Found",
        "devices": [0],
    }


def test_other_errors_null_the_sample_and_are_counted():
    fake = FakeNvml(n=1)
    s = _sampler(fake, passes=1)
    fake.unsupported.clear()

    def lost(h, kind):
        raise FakeNVMLError(15, "GPU is lost")

    fake.nvmlDeviceGetClockInfo = lost
    s.sample_once()
    gpu, frame, _ = s.finish(RANKS[:1])
    assert frame["sm_clock_mhz"].to_list() == [1980, None]
    assert gpu["errors"]["sm_clock_mhz"] == {"count": 1, "last": "GPU is lost", "devices": [0]}


# -- absence ------------------------------------------------------------------------------------


def test_no_pynvml_module_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pynvml(name, *a, **k):
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    s = GpuSampler(env={})
    assert s.open() is False
    gpu, frame, joins = s.finish(RANKS)
    assert gpu == {"available": False, "reason": "pynvml (nvidia-ml-py) is not installed"}
    assert frame.height == 0 and frame.schema == pl.Schema(schema.GPU_SCHEMA) and joins == {}


def test_no_library_is_one_line():
    fake = FakeNvml(fail_init=FakeNVMLError(9, "NVML Shared Library Not Found"))
    s = GpuSampler(nvml=fake, env={})
    s.start()  # the thread opens NVML, fails, ends
    gpu, frame, _ = s.finish(RANKS)
    assert gpu == {
        "available": False,
        "reason": "no NVML library (libnvidia-ml.so.1: NVML Shared Library Not Found); "
        "no NVIDIA driver on this machine",
    }
    assert frame.height == 0


def test_no_library_at_the_override_path_is_one_line(tmp_path):
    missing = tmp_path / "libnvidia-ml.so.1"
    s = GpuSampler(env={nvml.NVML_LIB_ENV: str(missing)})
    assert s.open() is False
    assert s.reason.startswith(f"no NVML library ({missing}: ")


def test_no_devices_and_driver_not_loaded_are_one_line():
    s = GpuSampler(nvml=FakeNvml(n=0), env={})
    assert s.open() is False
    assert s.finish(RANKS)[0] == {"available": False, "reason": "NVML sees no GPU"}
    s = GpuSampler(nvml=FakeNvml(fail_init=FakeNVMLError(12, "Driver Not Loaded")), env={})
    assert s.open() is False and s.reason == "the NVIDIA driver is not loaded"


def test_thread_samples_until_stopped():
    fake = FakeNvml(n=2)
    s = GpuSampler(interval_s=0.01, nvml=fake, env={})
    s.start()
    import time

    deadline = time.monotonic() + 10
    while s.passes < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    gpu, frame, _ = s.finish(RANKS)
    assert s.passes >= 3 and frame.height == 2 * s.passes
    assert gpu["passes"] == s.passes and gpu["pass_ms"]["max"] is not None


# -- the recording ------------------------------------------------------------------------------

MANIFEST = {"format": schema.FORMAT, "host": "h", "clock": {"mono_to_wall_ns": 0}}


def test_gpu_parquet_round_trips_and_is_optional(tmp_path):
    fake = FakeNvml(n=2, clocks=[1980, 1200], reasons=[0, 0x60])
    gpu, frame, _ = _sampler(fake, passes=2).finish(RANKS)
    write_recording(tmp_path / "a", {**MANIFEST, "gpu": gpu}, schema.empty_events(), gpu=frame)
    rec = load_recording(tmp_path / "a")
    assert (tmp_path / "a" / schema.GPU).stat().st_mode & 0o777 == 0o600
    assert rec.gpu.equals(frame)
    assert rec.gpu.filter(pl.col("rank") == 1)["throttle"].to_list() == [
        ["SwThermalSlowdown", "HwThermalSlowdown"]] * 2
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["gpu"]["available"] is True
    write_recording(tmp_path / "b", MANIFEST, schema.empty_events())
    assert not (tmp_path / "b" / schema.GPU).exists()
    rec = load_recording(tmp_path / "b")
    assert rec.gpu.height == 0 and rec.gpu.schema == pl.Schema(schema.GPU_SCHEMA)


def test_gpu_parquet_missing_required_column_is_invalid(tmp_path):
    from argus.errors import RecordingInvalid

    write_recording(tmp_path / "a", MANIFEST, schema.empty_events())
    pl.DataFrame({"ts_ns": [1]}).write_parquet(tmp_path / "a" / schema.GPU)
    with pytest.raises(RecordingInvalid, match="lacks the column"):
        load_recording(tmp_path / "a")


# -- doctor -------------------------------------------------------------------------------------


def test_doctor_nvml_absent_or_deviceless_is_one_warn_line(tmp_path, monkeypatch):
    from argus import doctor
    from argus.doctor import Status

    monkeypatch.setenv(nvml.NVML_LIB_ENV, str(tmp_path / "libnvidia-ml.so.1"))
    c = doctor.check_nvml()  # the default probe honours ARGUS_NVML_LIB: a missing file
    assert c.status == Status.WARN and c.detail.startswith("NVML not available: GPU counters off")
    assert "\n" not in c.detail
    c = doctor.check_nvml(lambda: "driver 550.54.15, 0 GPU(s)")
    assert c.status == Status.WARN
    assert c.detail == "NVML works but sees no GPU (driver 550.54.15, 0 GPU(s)): GPU counters off"
    assert doctor.check_nvml(lambda: "driver 550.54.15, 8 GPU(s)").status == Status.PASS


def test_probe_nvml_reads_driver_and_count():
    fake = FakeNvml(n=3)
    assert nvml.probe_nvml(env={}, nvml=fake) == {
        "driver": "550.54.15",
        "devices": 3,
        "library": "libnvidia-ml.so.1",
    }
    assert fake.shutdowns == 1


# -- diagnosis from samples ---------------------------------------------------------------------


def _recording(rows_per_rank: dict[int, list[tuple[int, int]]], interval_s=1.0):
    """A recording with only gpu samples: rank -> [(sm_clock_mhz, reasons)] one per second."""
    from argus.recording.io import Recording

    rows = []
    for rank, samples in rows_per_rank.items():
        for k, (mhz, reasons) in enumerate(samples):
            rows.append({"ts_ns": (k + 1) * 1_000_000_000, "device": rank, "rank": rank,
                         "tgid": 100 + rank, "bus_id": f"b{rank}", "sm_clock_mhz": mhz,
                         "sm_clock_max_mhz": 1980, "throttle_reasons": reasons,
                         "throttle": decode_reasons(reasons), "util_gpu_pct": 90,
                         "power_w": 300.0, "temp_c": 60})
    manifest = {**MANIFEST, "started_ns": 0, "gpu": {"available": True, "interval_s": interval_s}}
    return Recording(manifest, schema.empty_events(), schema.empty_stacks(), None,
                     pl.DataFrame(rows, schema=schema.GPU_SCHEMA))


def test_gpu_throttle_against_other_ranks_with_steps():
    from argus.analyze import gpu

    ok = [(1980, 0)] * 10
    slow = [(1980, 0)] * 3 + [(1000, 0x4)] * 4 + [(1980, 0)] * 3  # seconds 4-7 power-capped
    rec = _recording({0: ok, 1: slow, 2: ok})
    sec = 1_000_000_000
    steps = pl.DataFrame({"rank": [1] * 10, "step": list(range(10)),
                          "start_ns": [k * sec + sec // 2 for k in range(10)],
                          "end_ns": [k * sec + 14 * sec // 10 for k in range(10)]})
    per_rank = gpu.analyse([rec], None)
    found = gpu.detect_throttle(per_rank, steps)
    assert [f["rank"] for f in found] == [1]
    f = found[0]
    assert f["kind"] == "gpu_throttle" and f["severity"] == "warning" and f["device"] == 1
    ev = f["evidence"]
    assert ev["sm_clock_mhz"] == {"rank": 1000.0, "reference": 1980.0,
                                  "reference_is": "other_ranks", "max": 1980}
    assert ev["clock_drop"] == 0.495 and ev["expected_slowdown"] == 1.98
    assert ev["reasons"] == ["SwPowerCap"] and ev["throttled_samples"] == 4
    assert (ev["from_s"], ev["to_s"]) == (3.5, 7.5)
    # Samples at 4..7 s, each standing for +-0.5 s: the steps overlapping 3.5-7.5 s.
    assert (f["start_step"], f["end_step"], ev["steps"]) == (3, 7, 5)
    # A straggler on rank 1 gets the NVML evidence and the summary says why.
    strag = [{"kind": "straggler", "rank": 1, "cause": "gpu", "severity": "critical",
              "summary": "Rank 1 is the straggler.", "evidence": {}}]
    found = gpu.detect_throttle(per_rank, steps, strag)
    assert found[0]["severity"] == "critical" and found[0]["evidence"]["explains_straggler"]
    gpu.cite_in_stragglers(strag, per_rank, found)
    assert strag[0]["evidence"]["nvml"]["throttled"] is True
    assert strag[0]["evidence"]["nvml"]["throttle"]["clock_drop"] == 0.495
    assert strag[0]["summary"].endswith("throttled to 1000 MHz vs 1980 MHz (SwPowerCap).")


def test_no_gpu_throttle_when_every_gpu_runs_alike_or_idles():
    from argus.analyze import gpu

    # All power-capped alike: nothing distinguishes a rank.
    same = [(1500, 0x4)] * 6
    assert gpu.detect_throttle(gpu.analyse([_recording({0: same, 1: same})])) == []
    # An idle GPU (GpuIdle) at a low clock is not throttled.
    idle = [(1980, 0)] * 3 + [(345, 0x1)] * 3
    assert gpu.detect_throttle(gpu.analyse([_recording({0: [(1980, 0)] * 6, 1: idle})])) == []
    # A single sample is not enough.
    one = [(1980, 0)] * 5 + [(1000, 0x20)]
    assert gpu.detect_throttle(gpu.analyse([_recording({0: [(1980, 0)] * 6, 1: one})])) == []
    # No gpu.parquet at all.
    assert gpu.analyse([_recording({})]) == {}


def test_lone_rank_needs_a_slowdown_reason_against_its_max_clock():
    from argus.analyze import gpu

    assert gpu.detect_throttle(gpu.analyse([_recording({0: [(1600, 0)] * 5})])) == []
    found = gpu.detect_throttle(gpu.analyse([_recording({0: [(1200, 0x40)] * 5})]))
    assert [f["rank"] for f in found] == [0]
    assert found[0]["evidence"]["sm_clock_mhz"]["reference_is"] == "max_clock"
    assert found[0]["evidence"]["reasons"] == ["HwThermalSlowdown"]
    assert found[0]["start_step"] is None and "0.5-5.5 s" in found[0]["summary"]
