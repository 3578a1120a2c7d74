"""The GPU counter channel: NVML (pynvml, the nvidia-ml-py distribution) sampled per device.

    sampler = GpuSampler(interval_s=1.0)
    if sampler.open(): sampler.start()          # a daemon thread; never blocks tracing
    ...
    gpu_manifest, frame, joins = sampler.finish(manifest["ranks"])

Every `interval_s` one pass reads, for each device NVML reports: SM / memory clocks (and
their maxima), utilisation, power and its enforced limit, temperature, the clocks event
(throttle) reasons, memory used/total, volatile ECC totals, retired pages, remapped rows,
PCIe throughput and the NVLink data counters. Every call is guarded: NotSupported /
FunctionNotFound turn that field null on that device for the rest of the session and are
recorded once in the manifest (`gpu.unsupported`); another error nulls the field in that
sample and is counted (`gpu.errors`). No pynvml, no library, no driver or no device is one
line, `{"available": false, "reason": ...}`, never a failure.

Devices are joined to ranks at the end (`join_devices`): NVML's compute-process list when a
rank is on exactly one device, else the CUDA ordinal the rank selected (its `cudaSetDevice`
argument, else LOCAL_RANK) mapped through its CUDA_VISIBLE_DEVICES (indices or GPU-UUID
prefixes); the PCI bus id and UUID identify the device in the recording.

Which library: pynvml loads `libnvidia-ml.so.1` by name (the driver's). `ARGUS_NVML_LIB`
names another file to load instead (the simulator's stand-in, `build/stubs/libnvidia-ml.so.1`,
used by `argus demo` and the tests); argus never loads a library from its own tree unasked.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import polars as pl

from argus.recording import schema
from argus.recording.gpu import decode_reasons

NVML_LIB_ENV = "ARGUS_NVML_LIB"
DEFAULT_INTERVAL_S = 1.0
PROCESS_SCAN_EVERY = 5  # passes between reads of the per-device compute-process lists

# NVML return codes meaning "this device / driver cannot do that": the field is null for good.
NOT_SUPPORTED = 3
FUNCTION_NOT_FOUND = 13
_UNSUPPORTED = (NOT_SUPPORTED, FUNCTION_NOT_FOUND)
_UINT_MAX = 0xFFFFFFFF
_FI_NVLINK_TX, _FI_NVLINK_RX = 138, 139  # NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX (KiB)
_REASON_FUNCTIONS = (
    "nvmlDeviceGetCurrentClocksEventReasons",  # NVML >= 12.5
    "nvmlDeviceGetCurrentClocksThrottleReasons",
)


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _reason(err: BaseException) -> str:
    return (str(err).strip() or type(err).__name__).rstrip(".")


def load_pynvml(env: Mapping[str, str] | None = None) -> Any:
    """Import pynvml and, when `ARGUS_NVML_LIB` is set, make it use that library file.

    pynvml has no path option: it CDLLs "libnvidia-ml.so.1" into its module global `nvmlLib`
    on first init unless one is already there, so the override is loaded into that global
    (under pynvml's own lock). Raises ImportError / OSError when unavailable.
    """
    env = os.environ if env is None else env
    import pynvml

    path = env.get(NVML_LIB_ENV)
    if path:
        lock = getattr(pynvml, "libLoadLock", None)
        if lock is not None:
            lock.acquire()
        try:
            current = getattr(pynvml, "nvmlLib", None)
            if current is None or getattr(current, "_name", None) != path:
                if current is not None and getattr(pynvml, "_nvmlLib_refcount", 0):
                    raise OSError(f"another libnvidia-ml is in use here ({current._name})")
                pynvml.nvmlLib = ctypes.CDLL(path)
                cache = getattr(pynvml, "_nvmlGetFunctionPointer_cache", None)
                if isinstance(cache, dict):
                    cache.clear()
        finally:
            if lock is not None:
                lock.release()
    return pynvml


def probe_nvml(env: Mapping[str, str] | None = None, nvml: Any = None) -> dict[str, Any]:
    """Initialise NVML once: {"driver", "devices", "library"}; raises when NVML is unusable."""
    nv = nvml if nvml is not None else load_pynvml(env)
    nv.nvmlInit()
    try:
        driver = _text(nv.nvmlSystemGetDriverVersion())
        count = int(nv.nvmlDeviceGetCount())
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    env = os.environ if env is None else env
    return {
        "driver": driver,
        "devices": count,
        "library": env.get(NVML_LIB_ENV) or "libnvidia-ml.so.1",
    }


# ---------------------------------------------------------------------------------------------
# The join


def parse_visible_devices(value: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: None when unset; entries up to the first invalid
    one (CUDA ignores the rest); "" or an invalid first entry means no device."""
    if value is None:
        return None
    out: list[str] = []
    for raw in value.split(","):
        item = raw.strip()
        if item.isdigit() or (item.startswith("-") and item[1:].isdigit()):
            if int(item) < 0:
                break
            out.append(str(int(item)))
        elif item.startswith(("GPU-", "MIG-")):
            out.append(item)
        else:
            break
    return out


def join_devices(
    ranks: list[dict[str, Any]],
    devices: list[dict[str, Any]],
    processes: Mapping[int, set[int]] | None = None,
) -> dict[int, dict[str, Any]]:
    """Which NVML device each traced process uses: {tgid: {"device", "bus_id", "uuid", "via"}}
    or {tgid: {"device": None, "reason"}}.

    1. NVML's compute-process list, when it shows the process on exactly one device;
    2. else the CUDA ordinal: the `cudaSetDevice` argument seen in the trace (`cuda_device`),
       else LOCAL_RANK, else 0 when CUDA_VISIBLE_DEVICES names a single device; mapped
       through CUDA_VISIBLE_DEVICES (an index, or a GPU-UUID prefix) when set.
    Caveat: an index in CUDA_VISIBLE_DEVICES follows CUDA's ordering, which equals NVML's (PCI
    bus order) only with CUDA_DEVICE_ORDER=PCI_BUS_ID or identical GPUs (the usual node).
    """
    by_index = {int(d["index"]): d for d in devices}
    processes = processes or {}
    out: dict[int, dict[str, Any]] = {}

    def found(tgid: int, idx: int, via: list[str]) -> None:
        d = by_index[idx]
        out[tgid] = {"device": idx, "bus_id": d.get("bus_id"), "uuid": d.get("uuid"), "via": via}

    for r in ranks:
        tgid = r.get("tgid")
        if tgid is None:
            continue
        tgid = int(tgid)
        seen = sorted(processes.get(tgid, ()))
        if len(seen) == 1 and seen[0] in by_index:
            found(tgid, seen[0], ["nvml_processes"])
            continue
        env = r.get("env") or {}
        visible = parse_visible_devices(env.get("CUDA_VISIBLE_DEVICES"))
        via: list[str] = []
        if r.get("cuda_device") is not None:
            ordinal, via = int(r["cuda_device"]), ["cudaSetDevice"]
        elif r.get("local_rank") is not None:
            ordinal, via = int(r["local_rank"]), ["LOCAL_RANK"]
        elif visible is not None and len(visible) == 1:
            ordinal, via = 0, []
        else:
            why = "no cudaSetDevice call, LOCAL_RANK or single visible device"
            out[tgid] = {"device": None, "reason": why}
            continue
        if visible is not None:
            via.append("CUDA_VISIBLE_DEVICES")
            if ordinal < 0 or ordinal >= len(visible):
                why = (
                    f"CUDA ordinal {ordinal} is not in CUDA_VISIBLE_DEVICES ({len(visible)} usable)"
                )
                out[tgid] = {"device": None, "reason": why}
                continue
            entry = visible[ordinal]
            if entry.isdigit():
                idx = int(entry)
            else:
                match = [
                    i for i, d in by_index.items() if str(d.get("uuid") or "").startswith(entry)
                ]
                if len(match) != 1:
                    why = f"CUDA_VISIBLE_DEVICES entry {entry} matches {len(match)} NVML device(s)"
                    out[tgid] = {"device": None, "reason": why}
                    continue
                idx = match[0]
        else:
            idx = ordinal
        if idx not in by_index:
            out[tgid] = {"device": None, "reason": f"NVML has no device {idx}"}
            continue
        found(tgid, idx, via)
    return out


# ---------------------------------------------------------------------------------------------
# Sampling


class GpuSampler:
    """NVML sampled in a daemon thread (see the module doc). `nvml` injects a pynvml-like
    module (tests); `env` is where ARGUS_NVML_LIB is read."""

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        nvml: Any = None,
        env: Mapping[str, str] | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ):
        self.interval_s = float(interval_s)
        self.env = os.environ if env is None else env
        self._nv = nvml
        self._clock = clock_ns
        self.available = False
        self.reason: str | None = None
        self.driver: str | None = None
        self.devices: list[dict[str, Any]] = []
        self._handles: dict[int, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.unsupported: dict[str, dict[str, Any]] = {}
        self._off: dict[int, set[str]] = {}
        self.errors: dict[str, dict[str, Any]] = {}
        self.processes: dict[int, set[int]] = {}
        self.passes = 0
        self._pass_ns: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- setup -------------------------------------------------------------------------------
    def open(self) -> bool:
        """Initialise NVML and read each device's static facts. False (with `reason`) when
        NVML is absent or sees no device; never raises."""
        try:
            nv = self._nv if self._nv is not None else load_pynvml(self.env)
            self._nv = nv
            nv.nvmlInit()
        except Exception as err:  # noqa: BLE001 - ImportError, OSError, NVMLError_*...
            self.reason = self._absent_reason(err)
            return False
        try:
            self.driver = _text(nv.nvmlSystemGetDriverVersion())
        except Exception:  # noqa: BLE001
            self.driver = None
        try:
            count = int(nv.nvmlDeviceGetCount())
        except Exception as err:  # noqa: BLE001
            self.reason = f"NVML cannot count devices ({_reason(err)})"
            self._shutdown()
            return False
        for i in range(count):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
            except Exception as err:  # noqa: BLE001 - a lost GPU must not hide the others
                self._error("handle", i, err)
                continue
            self._handles[i] = h
            self.devices.append(self._static(i, h))
        if not self._handles:
            self.reason = (
                "NVML sees no GPU" if count == 0 else "no GPU could be opened through NVML"
            )
            self._shutdown()
            return False
        self.available = True
        return True

    def _absent_reason(self, err: BaseException) -> str:
        if isinstance(err, ImportError):
            return "pynvml (nvidia-ml-py) is not installed"
        text = _reason(err)
        lib = self.env.get(NVML_LIB_ENV)
        if (
            getattr(err, "value", None) == 9
            or "Library Not Found" in text
            or isinstance(err, OSError)
        ):
            where = lib or "libnvidia-ml.so.1"
            return f"no NVML library ({where}: {text}); no NVIDIA driver on this machine"
        if getattr(err, "value", None) == 12 or "Driver Not Loaded" in text:
            return "the NVIDIA driver is not loaded"
        return f"NVML failed to initialise ({text})"

    def _call(self, idx: int, field: str, fn: Callable[[], Any]) -> Any:
        """Run one guarded NVML call for a field of device idx; None when it fails."""
        if field in self._off.get(idx, ()):
            return None
        try:
            return fn()
        except Exception as err:  # noqa: BLE001
            self._failed(idx, field, err)
            return None

    def _failed(self, idx: int, field: str, err: BaseException) -> None:
        if getattr(err, "value", None) in _UNSUPPORTED:
            self._off.setdefault(idx, set()).add(field)
            u = self.unsupported.setdefault(field, {"reason": _reason(err), "devices": []})
            if idx not in u["devices"]:
                u["devices"].append(idx)
        else:
            self._error(field, idx, err)

    def _error(self, field: str, idx: int, err: BaseException) -> None:
        e = self.errors.setdefault(field, {"count": 0, "last": "", "devices": []})
        e["count"] += 1
        e["last"] = _reason(err)
        if idx not in e["devices"]:
            e["devices"].append(idx)

    def _static(self, i: int, h: Any) -> dict[str, Any]:
        nv = self._nv
        pci = self._call(i, "bus_id", lambda: nv.nvmlDeviceGetPciInfo(h))
        mem = self._call(i, "mem_total_bytes", lambda: nv.nvmlDeviceGetMemoryInfo(h))
        limit = self._call(i, "power_limit_w", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
        name = self._call(i, "name", lambda: nv.nvmlDeviceGetName(h))
        uuid = self._call(i, "uuid", lambda: nv.nvmlDeviceGetUUID(h))
        return {
            "index": i,
            "name": _text(name) if name is not None else None,
            "uuid": _text(uuid) if uuid is not None else None,
            "bus_id": _text(pci.busId) if pci is not None else None,
            "sm_clock_max_mhz": self._call(
                i, "sm_clock_max_mhz", lambda: nv.nvmlDeviceGetMaxClockInfo(h, 1)
            ),
            "mem_clock_max_mhz": self._call(
                i, "mem_clock_max_mhz", lambda: nv.nvmlDeviceGetMaxClockInfo(h, 2)
            ),
            "power_limit_w": round(limit / 1000.0, 3) if limit is not None else None,
            "mem_total_bytes": int(mem.total) if mem is not None else None,
        }

    # -- one pass ---------------------------------------------------------------------------
    def _reasons(self, i: int, h: Any) -> int | None:
        """Clocks event reasons (NVML >= 12.5 name), else the older throttle-reasons call."""
        if "throttle_reasons" in self._off.get(i, ()):
            return None
        last: BaseException = _NotFound()
        for fn_name in _REASON_FUNCTIONS:
            fn = getattr(self._nv, fn_name, None)
            if fn is None:
                continue
            try:
                return int(fn(h))
            except Exception as err:  # noqa: BLE001
                last = err
                if getattr(err, "value", None) != FUNCTION_NOT_FOUND:
                    break
        self._failed(i, "throttle_reasons", last)
        return None

    def sample_device(self, i: int, h: Any, static: dict[str, Any]) -> dict[str, Any]:
        """One row of GPU_SCHEMA for device i (rank/tgid filled by the join)."""
        nv = self._nv
        ts = self._clock()
        c = self._call
        util = c(i, "util_gpu_pct", lambda: nv.nvmlDeviceGetUtilizationRates(h))
        power = c(i, "power_w", lambda: nv.nvmlDeviceGetPowerUsage(h))
        mem = c(i, "mem_used_bytes", lambda: nv.nvmlDeviceGetMemoryInfo(h))
        reasons = self._reasons(i, h)

        def ecc(kind: int) -> int:
            return int(nv.nvmlDeviceGetTotalEccErrors(h, kind, 0))  # volatile counter

        def retired() -> int:
            return sum(len(nv.nvmlDeviceGetRetiredPages(h, cause)) for cause in (0, 1))

        remap = c(i, "remapped_rows", lambda: nv.nvmlDeviceGetRemappedRows(h))
        fields = [(_FI_NVLINK_TX, _UINT_MAX), (_FI_NVLINK_RX, _UINT_MAX)]
        nvlink = c(i, "nvlink", lambda: nv.nvmlDeviceGetFieldValues(h, fields))
        link = [None, None]
        if nvlink is not None:
            for k, fv in enumerate(list(nvlink)[:2]):
                if int(getattr(fv, "nvmlReturn", 0)) == 0:
                    link[k] = int(fv.value.ullVal) * 1024
        pcie_tx = c(i, "pcie_tx_bytes_per_s", lambda: nv.nvmlDeviceGetPcieThroughput(h, 0))
        pcie_rx = c(i, "pcie_rx_bytes_per_s", lambda: nv.nvmlDeviceGetPcieThroughput(h, 1))
        return {
            "ts_ns": ts,
            "device": i,
            "bus_id": static.get("bus_id"),
            "sm_clock_mhz": c(i, "sm_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, 1)),
            "sm_clock_max_mhz": static.get("sm_clock_max_mhz"),
            "mem_clock_mhz": c(i, "mem_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, 2)),
            "mem_clock_max_mhz": static.get("mem_clock_max_mhz"),
            "util_gpu_pct": int(util.gpu) if util is not None else None,
            "util_mem_pct": int(util.memory) if util is not None else None,
            "power_w": round(power / 1000.0, 3) if power is not None else None,
            "power_limit_w": static.get("power_limit_w"),
            "temp_c": c(i, "temp_c", lambda: nv.nvmlDeviceGetTemperature(h, 0)),
            "throttle_reasons": reasons,
            "throttle": decode_reasons(reasons),
            "mem_used_bytes": int(mem.used) if mem is not None else None,
            "mem_total_bytes": int(mem.total) if mem is not None else static.get("mem_total_bytes"),
            "ecc_corrected": c(i, "ecc_corrected", lambda: ecc(0)),
            "ecc_uncorrected": c(i, "ecc_uncorrected", lambda: ecc(1)),
            "retired_pages": c(i, "retired_pages", retired),
            "remapped_rows": int(remap[0]) + int(remap[1]) if remap is not None else None,
            "remap_pending": bool(remap[2]) if remap is not None else None,
            "pcie_tx_bytes_per_s": int(pcie_tx) * 1024 if pcie_tx is not None else None,
            "pcie_rx_bytes_per_s": int(pcie_rx) * 1024 if pcie_rx is not None else None,
            "nvlink_tx_bytes": link[0],
            "nvlink_rx_bytes": link[1],
        }

    def _scan_processes(self) -> None:
        """Which processes have a CUDA context on which device (the join's first source)."""
        nv = self._nv
        for i, h in self._handles.items():
            if "processes" in self._off.get(i, ()):
                continue
            try:
                procs = nv.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception as err:  # noqa: BLE001 - any failure: the join falls back to CUDA
                self._off.setdefault(i, set()).add("processes")
                u = self.unsupported.setdefault(
                    "processes", {"reason": _reason(err), "devices": []}
                )
                u["devices"].append(i)
                continue
            for p in procs or ():
                pid = getattr(p, "pid", None)
                if pid is not None:
                    self.processes.setdefault(int(pid), set()).add(i)

    def sample_once(self) -> None:
        """One pass over every device (appends rows)."""
        t0 = time.monotonic_ns()
        statics = {d["index"]: d for d in self.devices}
        rows = [self.sample_device(i, h, statics[i]) for i, h in self._handles.items()]
        if self.passes % PROCESS_SCAN_EVERY == 0:
            self._scan_processes()
        with self._lock:
            self.rows.extend(rows)
            self.passes += 1
            self._pass_ns.append(time.monotonic_ns() - t0)

    # -- thread -----------------------------------------------------------------------------
    def start(self) -> None:
        """Open NVML and sample in a daemon thread (nvmlInit can take a second on a GPU node
        without persistence mode: it never delays attaching). Without NVML the thread ends
        and `finish` reports why."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="argus-nvml", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if not self.available and not self.open():
            return
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception as err:  # noqa: BLE001 - the channel must never take tracing down
                self._error("pass", -1, err)
            next_t += self.interval_s
            delay = next_t - time.monotonic()
            if delay < 0:  # a slow pass: skip the missed ticks instead of bursting
                next_t = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
            self._thread = None

    def _shutdown(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass

    # -- long-running use (argus daemon) -------------------------------------------------------
    @property
    def library(self) -> str:
        return self.env.get(NVML_LIB_ENV) or "libnvidia-ml.so.1"

    def take(self) -> list[dict[str, Any]]:
        """The samples taken since the last take (they leave the sampler: a daemon's memory
        does not grow with time); rank/tgid are joined by `assign_ranks`."""
        with self._lock:
            rows, self.rows = self.rows, []
            del self._pass_ns[:-1000]
        return rows

    def rows_since(self, start: int) -> tuple[list[dict[str, Any]], int]:
        """(the samples after the first `start`, the count now): a session writing its
        recording in parts reads the new ones without taking them (`finish` joins them all)."""
        with self._lock:
            return self.rows[start:], len(self.rows)

    def close(self) -> None:
        """After stop(): release NVML (a sampler that was never finish()ed)."""
        if self.available:
            self._shutdown()
            self.available = False

    # -- end --------------------------------------------------------------------------------
    def finish(
        self, ranks: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], pl.DataFrame, dict[int, dict]]:
        """Stop, take a last pass, join devices to ranks; (manifest["gpu"], gpu frame, joins)."""
        self.stop()
        if not self.available:
            return disabled(self.reason or "NVML was not opened"), schema.empty_gpu(), {}
        if self.passes == 0:
            try:
                self.sample_once()
            except Exception as err:  # noqa: BLE001
                self._error("pass", -1, err)
        try:
            self._scan_processes()
        except Exception as err:  # noqa: BLE001
            self._error("processes", -1, err)
        self._shutdown()
        joins = join_devices(ranks, self.devices, self.processes)
        rank_of = {int(r["tgid"]): r.get("rank") for r in ranks if r.get("tgid") is not None}
        with self._lock:
            rows = list(self.rows)
            pass_ns = sorted(self._pass_ns)
        frame = _frame(rows, joins, rank_of)
        devices = []
        for d in self.devices:
            users = [(rank_of.get(t), t) for t, j in joins.items() if j.get("device") == d["index"]]
            devices.append({**d, "ranks": sorted(r for r, _ in users if r is not None),
                            "tgids": sorted(t for _, t in users)})
        manifest = {
            "available": True,
            "library": self.env.get(NVML_LIB_ENV) or "libnvidia-ml.so.1",
            "driver": self.driver,
            "interval_s": self.interval_s,
            "devices": devices,
            "unsupported": self.unsupported,
            "errors": self.errors,
            "passes": self.passes,
            "samples": len(rows),
            "pass_ms": {
                "p50": round(pass_ns[len(pass_ns) // 2] / 1e6, 3) if pass_ns else None,
                "max": round(pass_ns[-1] / 1e6, 3) if pass_ns else None,
            },
        }
        return manifest, frame, joins


def _frame(rows: list[dict[str, Any]], joins: Mapping[int, dict[str, Any]],
           rank_of: Mapping[int, int | None]) -> pl.DataFrame:
    """GPU_SCHEMA rows with rank/tgid: each device's lowest rank among the processes joined
    to it (a device shared by several ranks is attributed to one)."""
    by_dev: dict[int, tuple[int | None, int]] = {}
    order = sorted(joins, key=lambda t: (rank_of.get(t) is None, rank_of.get(t) or 0, t))
    for tgid in order:
        j = joins[tgid]
        if j.get("device") is not None and j["device"] not in by_dev:
            by_dev[j["device"]] = (rank_of.get(tgid), tgid)
    rows = [dict(row) for row in rows]
    for row in rows:
        row["rank"], row["tgid"] = by_dev.get(row["device"], (None, None))
    return pl.DataFrame(rows, schema=schema.GPU_SCHEMA) if rows else schema.empty_gpu()


def assign_ranks(rows: list[dict[str, Any]], ranks: list[dict[str, Any]],
                 devices: list[dict[str, Any]],
                 processes: Mapping[int, set[int]] | None = None) -> pl.DataFrame:
    """Samples (`GpuSampler.take`) as a GPU_SCHEMA frame joined to `ranks` (manifest-like
    dicts: tgid, rank, local_rank, env, cuda_device) as `finish` joins them; rows of devices
    no given rank uses keep rank/tgid null."""
    joins = join_devices(ranks, devices, processes)
    rank_of = {int(r["tgid"]): r.get("rank") for r in ranks if r.get("tgid") is not None}
    return _frame(rows, joins, rank_of)


class _NotFound(Exception):
    value = FUNCTION_NOT_FOUND

    def __str__(self) -> str:
        return "Function Not Found"


def disabled(reason: str) -> dict[str, Any]:
    """The manifest entry of a session whose GPU channel did not run."""
    return {"available": False, "reason": reason}
