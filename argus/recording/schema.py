"""The recording format, `argus.recording/1`: what `argus attach` writes and every analyzer reads.

A recording is a directory:

- `manifest.json`   self-description (see `MANIFEST_KEYS`)
- `events.parquet`  one long frame of traced calls, all ranks (see `EVENTS_SCHEMA`)
- `stacks.parquet`  CPU samples aggregated per interval (see `STACKS_SCHEMA`)
- `gpu.parquet`     NVML samples per device, joined to ranks (see `GPU_SCHEMA`); optional
- `host.parquet`    host context per interval: CPU contention, TCP retransmits, OOM kills,
                    block I/O latency (see `HOST_SCHEMA`); optional (channel `host`)
- `pystacks.parquet` Python + native stacks of every thread of every rank, dumped once when
                    the session ended with ranks blocked (see `PYSTACKS_SCHEMA`); optional
- `kernels.parquet` device-side activity from argus's GPU agent (kernels, copies, NCCL
                    collective kernels with device start/end; see `KERNELS_SCHEMA`); optional
                    (channel `kernels`, only ranks that loaded the agent: docs/gpu.md)

Times are node CLOCK_MONOTONIC nanoseconds (`ts_ns`); `manifest["clock"]["mono_to_wall_ns"]`
converts them to wall time (`argus.recording.clock.mono_to_wall`). Several recordings of one job
(one per node) are analysed together; their clocks are aligned by the analyzers.

A call still in flight when the recording ended (a rank blocked in a collective or a sync) is a
row with `dur_ns` null and `in_flight` true: that is how hangs are seen.
"""

from __future__ import annotations

import polars as pl

FORMAT = "argus.recording/1"
MANIFEST = "manifest.json"
EVENTS = "events.parquet"
STACKS = "stacks.parquet"
GPU = "gpu.parquet"
HOST = "host.parquet"
PYSTACKS = "pystacks.parquet"
KERNELS = "kernels.parquet"

# Channels of events.parquet.
CHANNELS = ("cuda", "nccl", "torch", "proc")

EVENTS_SCHEMA: dict[str, pl.DataType] = {
    "ts_ns": pl.Int64,  # call entry, node monotonic ns
    "dur_ns": pl.Int64,  # entry -> return; null for entry-only probes and in-flight calls
    "in_flight": pl.Boolean,  # entered, not returned when the recording ended
    "tgid": pl.Int32,
    "tid": pl.Int32,
    "rank": pl.Int32,  # global rank (RANK env or NCCL world comm); null when unknown
    "channel": pl.Categorical,  # cuda | nccl | torch | proc
    "name": pl.Categorical,  # probed function: cudaLaunchKernel, ncclAllReduce, c10d method...
    "kernel": pl.Utf8,  # launches: kernel name resolved from the host stub address
    "stream": pl.UInt64,  # CUDA stream handle (0 = legacy default stream)
    "bytes": pl.Int64,  # memcpy bytes, malloc size, collective payload (count * dtype size)
    "memcpy_kind": pl.Int8,  # cudaMemcpyKind for memcpy calls
    # collectives: allreduce|allgather|reducescatter|broadcast|reduce|send|recv|...
    "op": pl.Categorical,
    "redop": pl.Categorical,  # NCCL reduce op: sum|prod|max|min|avg
    "dtype": pl.Categorical,  # NCCL datatype: float32, bfloat16, ...
    "count": pl.Int64,  # collective element count
    "comm": pl.Utf8,  # communicator id, the same string on every rank of that communicator
    "comm_rank": pl.Int32,
    "comm_nranks": pl.Int32,
    # per-(tgid, comm) sequence number of collectives since attach (0-based); a DDP bucket
    # event (c10d::Reducer::all_reduce_bucket): the bucket's ordinal in its process
    "seq": pl.Int64,
    "peer": pl.Int32,  # send/recv peer rank in the communicator
    "ret": pl.Int32,  # return code where captured (cudaError_t / ncclResult_t)
}

STACKS_SCHEMA: dict[str, pl.DataType] = {
    "ts_ns": pl.Int64,  # start of the aggregation interval, node monotonic ns
    "interval_ns": pl.Int64,
    "tgid": pl.Int32,
    "tid": pl.Int32,
    "rank": pl.Int32,
    "thread": pl.Utf8,  # thread name (comm)
    "count": pl.Int64,  # samples with exactly this stack in this interval
    "functions": pl.List(pl.Utf8),  # leaf first; kernel frames first, then user frames
    "modules": pl.List(pl.Utf8),  # same length; "[kernel]" for kernel frames
    # "on_cpu" (null in older recordings): sampled stacks. "off_cpu" (channel host): the
    # thread's latest blocking stack, one row per interval while it stays blocked; count 0
    # (not a sample), blocked_ns = how long it had been blocked at the end of the interval.
    "state": pl.Utf8,
    "blocked_ns": pl.Int64,
}

# NVML samples, one row per (sampling pass, device); null = not supported / failed (see
# manifest["gpu"]["unsupported"]). Static values (max clocks, limits) repeat on every row.
GPU_SCHEMA: dict[str, pl.DataType] = {
    "ts_ns": pl.Int64,  # when the device was read, node monotonic ns
    "device": pl.Int32,  # NVML device index
    "bus_id": pl.Utf8,  # PCI bus id, e.g. 00000000:18:00.0
    "rank": pl.Int32,  # the rank joined to the device (manifest ranks[].gpu); null if none
    "tgid": pl.Int32,
    "sm_clock_mhz": pl.Int32,
    "sm_clock_max_mhz": pl.Int32,
    "mem_clock_mhz": pl.Int32,
    "mem_clock_max_mhz": pl.Int32,
    "util_gpu_pct": pl.Int32,  # NVML utilisation over its last sample period
    "util_mem_pct": pl.Int32,
    "power_w": pl.Float64,
    "power_limit_w": pl.Float64,  # enforced limit
    "temp_c": pl.Int32,
    "throttle_reasons": pl.UInt64,  # clocks event / throttle reasons bitmask
    "throttle": pl.List(pl.Utf8),  # the same, decoded (argus.recording.gpu.REASON_BITS)
    "mem_used_bytes": pl.Int64,
    "mem_total_bytes": pl.Int64,
    "ecc_corrected": pl.Int64,  # volatile ECC error totals
    "ecc_uncorrected": pl.Int64,
    "retired_pages": pl.Int64,  # both causes
    "remapped_rows": pl.Int64,  # correctable + uncorrectable
    "remap_pending": pl.Boolean,
    "pcie_tx_bytes_per_s": pl.Int64,
    "pcie_rx_bytes_per_s": pl.Int64,
    "nvlink_tx_bytes": pl.Int64,  # cumulative counters, all links
    "nvlink_rx_bytes": pl.Int64,
}

# Host context (channel `host`), one row per (interval, kind, tgid, detail) with activity.
# cpu_wait: the runnable waits of a traced process that began in one 10 ms slot (ts_ns),
# behind one competitor (detail): interval_ns = max(10 ms, total_ns), the span they cover;
# cpu_contention sums the same waits per 1 s interval. cpu_steal (tgid 0, detail "node"):
# per interval the node's CPU time stolen by the hypervisor (/proc/stat), of all of it.
# on_cpu: per interval a traced process's time on a CPU (measured at the switches; detail
# "cpu-clock" when the analysis estimated it from the samples of older recordings).
HOST_KINDS = ("cpu_contention", "tcp_retransmit", "oom_kill", "block_io", "cpu_wait",
              "cpu_steal", "on_cpu")
HOST_SCHEMA: dict[str, pl.DataType] = {
    "ts_ns": pl.Int64,  # start of the interval (oom_kill: the kill itself), node monotonic ns
    "interval_ns": pl.Int64,
    # cpu_contention/tcp_retransmit: traced process (0 = node-wide); oom_kill: victim
    "tgid": pl.Int32,
    "rank": pl.Int32,  # rank of tgid when it is a traced process
    "kind": pl.Utf8,  # HOST_KINDS
    "detail": pl.Utf8,  # competitor comm | "addr:port" | victim comm | device "major:minor"
    "count": pl.Int64,  # preemptions | retransmits | 1 | completed requests | cpu_steal: the
    # node's CPU time in the interval (ns, all CPUs)
    "total_ns": pl.Int64,  # runnable wait | 0 | 0 | summed request latency | stolen ns
}

# Python + native stacks (argus.collect.pyspy_dumps, py-spy), one row per thread of a traced rank,
# taken once at the end of a session that ended with calls in flight for long (a hang).
PYSTACKS_SCHEMA: dict[str, pl.DataType] = {
    "ts_ns": pl.Int64,  # when the dump was taken, node monotonic ns
    "tgid": pl.Int32,
    "tid": pl.Int32,
    "rank": pl.Int32,
    "thread": pl.Utf8,  # thread name (py-spy's Python name, else comm)
    "state": pl.Utf8,  # running | idle (py-spy) | sleeping | disk-wait | ... (/proc)
    "wchan": pl.Utf8,  # kernel function the thread sleeps in, when it sleeps
    "functions": pl.List(pl.Utf8),  # innermost first
    "files": pl.List(pl.Utf8),  # same length; null for frames without a file
    "lines": pl.List(pl.Int32),  # same length; null where unknown
    "kinds": pl.List(pl.Utf8),  # same length: python | native | kernel
}

# Device activity (channel `kernels`: argus's GPU agent, cuda_probes/agent/), one row per
# record of a rank's agent ring: a CUPTI kernel/memcpy/memset activity record, or one NCCL
# profiler kernel-channel record of a collective (coll) or point-to-point op (p2p). Device
# times are converted to node CLOCK_MONOTONIC ns, the clock of every other file.
KERNEL_KINDS = ("kernel", "memcpy", "memset", "coll", "p2p")
KERNELS_SCHEMA: dict[str, pl.DataType] = {
    "ts_ns": pl.Int64,  # device start, node monotonic ns
    "dur_ns": pl.Int64,  # device end - start
    "tgid": pl.Int32,
    "rank": pl.Int32,
    "kind": pl.Utf8,  # KERNEL_KINDS
    "name": pl.Utf8,  # kernel name (<= 31 bytes, as the agent keeps it); coll/p2p: NCCL op
    "device": pl.Int32,  # CUDA device ordinal
    "stream": pl.Int64,  # CUDA stream id (CUPTI's); coll/p2p: null
    "correlation": pl.Int64,  # CUPTI correlation id (the launch); coll/p2p: null
    "comm_hash": pl.UInt64,  # coll/p2p: NCCL's communicator hash, equal on its ranks
    "coll_seq": pl.Int64,  # coll/p2p: NCCL's sequence number on that communicator
    "channel": pl.Int32,  # coll/p2p: NCCL channel of this kernel-channel record
    "bytes": pl.Int64,  # memcpy/memset/coll/p2p payload bytes
    "peer": pl.Int32,  # p2p: peer rank in the communicator
}

# What every real recording keeps and the analyzers rely on (`argus.recording.io` rejects a
# file that breaks it): per file, the columns whose values lie in [low, high) when not null
# (summaries keep sample counts as UInt32; a call moves less than 256 TiB, so that sums over
# a step cannot overflow), and the list columns that run in parallel (one entry per frame).
VALUE_RANGES: dict[str, dict[str, tuple[int, int]]] = {
    EVENTS: {"bytes": (0, 2**48)},
    STACKS: {"count": (0, 2**32)},
}
SAME_LENGTH: dict[str, tuple[str, ...]] = {PYSTACKS: ("functions", "files", "lines", "kinds")}

# Top-level keys every manifest.json has.
MANIFEST_KEYS = (
    "format",  # FORMAT
    "argus_version",
    "host",  # hostname
    "kernel",  # uname -r
    "clock",  # {"mono_to_wall_ns": int}: wall_ns = ts_ns + mono_to_wall_ns
    "started_ns",  # monotonic ns: the ring buffer open (events may start here)
    "traced_ns",  # the targets' probes placed, the "tracing" line: -d counts from here
    "ended_ns",
    "duration_s",
    "end_reason",  # duration | interrupt | sigterm | targets_exited
    "sample_hz",  # CPU sampling frequency, 0 when the cpu channel is off
    "channels",  # {"cuda": bool, "nccl": bool, "torch": bool, "cpu": bool}
    # [{"rank", "local_rank", "world_size", "tgid", "host", "exe", "env",
    #   "libraries": [{"name", "path", "version"}]}]
    "ranks",
    # [{"channel", "library", "symbol", "kind": "entry"|"exit",
    #   "status": "attached"|"failed"|"missing", "reason", "tgids"}]
    "probes",
    "drops",  # {"events_ringbuf": int, "stack_walk_failed": int, "stack_map_full": int, ...}
    "counts",  # {"events": {channel: int}, "stack_samples": int}
)
# Optional: "files": {name: {"bytes": int, "sha256": hex}}, the parquet files written with the
# manifest (`argus.recording.io.write_recording`); the loader checks them before decoding
FILES = "files"
# Optional: "gpu": {"available": bool, "reason"?, "devices", "unsupported", ...} (docs/gpu.md)
# Optional: "pystacks": {"taken": bool, "reason": str, "notes": {tgid: str}} (docs/stacks.md)
# Optional: "kernels": {"enabled": bool, "agents": {"<tgid>": {"rank", "loaded": ["nccl",
# "cupti"] (what the process's agent was loaded as; [] = no agent), "active": [...] (what it
# switched on for this session), "records", "dropped", "cupti_dropped", "nccl_version"}}}
# (channel `kernels`, docs/gpu.md)
# Optional: "host_context": {"enabled": bool, "tracepoints": {name: "attached" | reason}}
# (docs/attach.md)


def empty_events() -> pl.DataFrame:
    return pl.DataFrame(schema=EVENTS_SCHEMA)


def empty_stacks() -> pl.DataFrame:
    return pl.DataFrame(schema=STACKS_SCHEMA)


def empty_gpu() -> pl.DataFrame:
    return pl.DataFrame(schema=GPU_SCHEMA)


def empty_host() -> pl.DataFrame:
    return pl.DataFrame(schema=HOST_SCHEMA)


def empty_kernels() -> pl.DataFrame:
    return pl.DataFrame(schema=KERNELS_SCHEMA)


def empty_pystacks() -> pl.DataFrame:
    return pl.DataFrame(schema=PYSTACKS_SCHEMA)
