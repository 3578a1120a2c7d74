"""User-space reader of argus's GPU agent (cuda_probes/agent/libargus_gpu_agent.so).

A job started with `argus gpu-env`'s variables loads the agent as NCCL's profiler plugin and
as a CUDA injection library (CUPTI subscriber). Each process then has one shared file,
/dev/shm/argus-gpu-<tgid>: a header (version, `enabled`, what the agent switched on, ring
positions, drop counters) and a bounded ring of fixed-size records (layout:
cuda_probes/agent/argus_gpu_ring.h, mirrored here once in HEADER_FIELDS / RECORD_FIELDS).

`GpuAgentRing.open(tgid)` maps it; `enable()` sets `enabled` (the agent switches NCCL's event
mask and CUPTI's activity kinds on within ~100 ms and acknowledges in `active`); `read()`
drains the ring into a polars frame with RECORD_SCHEMA; `drops()` returns the counters.
No BPF and no root needed (the file is 0600: the job's user or root).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from argus import resources
from argus.errors import ArgusError, TargetNotFound
from argus.recording import schema

SHM_DIR = Path("/dev/shm")
MAGIC = 0x3155504753524741  # "ARGSGPU1"
VERSION = 1
HDR_BYTES = 256
REC_BYTES = 104
NAME_LEN = 32

LOADED_NCCL, LOADED_CUPTI = 0x1, 0x2
ACTIVE_NCCL, ACTIVE_CUPTI = 0x1, 0x2

KINDS = {1: "kernel", 2: "memcpy", 3: "memset", 4: "coll", 5: "p2p"}
OPS = {0: "", 1: "AllReduce", 2: "AllGather", 3: "ReduceScatter", 4: "Broadcast", 5: "Reduce",
       6: "Send", 7: "Recv", 8: "AllToAll"}

# (name, struct format, offset): the C header's fields, in order
HEADER_FIELDS = (
    ("magic", "Q", 0), ("version", "I", 8), ("hdr_bytes", "I", 12), ("rec_bytes", "I", 16),
    ("capacity", "I", 20), ("tgid", "i", 24), ("loaded", "I", 28), ("enabled", "I", 32),
    ("active", "I", 36), ("nccl_version", "I", 40), ("nccl_comms", "I", 44),
    ("head", "Q", 48), ("tail", "Q", 56), ("written", "Q", 64), ("dropped", "Q", 72),
    ("cupti_dropped", "Q", 80), ("enables", "Q", 88), ("created_ns", "Q", 96),
)
RECORD_FIELDS = (
    ("seq", "Q", 0), ("kind", "H", 8), ("channel", "H", 10), ("op", "B", 12),
    ("flags", "B", 13), ("device", "H", 14), ("stream", "I", 16), ("correlation", "I", 20),
    ("ts_start_ns", "Q", 24), ("ts_end_ns", "Q", 32), ("comm_hash", "Q", 40),
    ("coll_seq", "Q", 48), ("bytes", "Q", 56), ("peer", "i", 64), ("reserved", "I", 68),
    ("name", f"{NAME_LEN}s", 72),
)
_HDR = {n: (struct.Struct("<" + f), off) for n, f, off in HEADER_FIELDS}
_REC = struct.Struct("<" + "".join(f for _, f, _ in RECORD_FIELDS))
assert _REC.size == REC_BYTES

RECORD_SCHEMA = {
    "tgid": pl.Int32,
    "kind": pl.Categorical,      # kernel | memcpy | memset | coll | p2p
    "ts_start_ns": pl.UInt64,    # device clock
    "ts_end_ns": pl.UInt64,
    "dur_ns": pl.Int64,
    "stream": pl.UInt32,
    "correlation": pl.UInt32,
    "device": pl.UInt16,
    "name": pl.Utf8,             # kernel name (truncated to 31 bytes) or NCCL function
    "comm_hash": pl.UInt64,
    "coll_seq": pl.UInt64,
    "op": pl.Utf8,               # NCCL function for coll/p2p, else ""
    "bytes": pl.UInt64,
    "channel": pl.UInt16,
    "peer": pl.Int32,
}

_FUTEX_WAKE = 1
_SYS_FUTEX = 202  # x86-64


def shm_path(tgid: int) -> Path:
    """The agent's shared file of process `tgid`."""
    return SHM_DIR / f"argus-gpu-{tgid}"


def _alive(tgid: int) -> bool:
    try:
        os.kill(tgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def agent_files() -> dict[int, Path]:
    """Every agent file on this node, by the tgid in its name (alive or not)."""
    out = {}
    for p in SHM_DIR.glob("argus-gpu-*"):
        suffix = p.name.rsplit("-", 1)[-1]
        if suffix.isdigit():
            out[int(suffix)] = p
    return out


def remove_stale() -> list[int]:
    """Remove the files of processes that are gone (a crash or SIGKILL skips the agent's own
    cleanup); returns their tgids."""
    gone = []
    for tgid, p in agent_files().items():
        if not _alive(tgid):
            try:
                p.unlink()
                gone.append(tgid)
            except OSError:
                pass
    return gone


@dataclass(frozen=True)
class Drops:
    ring_full: int      # records the agent could not publish: the ring was full
    cupti: int          # records CUPTI dropped (no buffer available)
    written: int        # records published so far


class GpuAgentRing:
    """One process's agent file, mapped read-write (the reader sets `enabled`, consumes the
    ring and advances `tail`)."""

    def __init__(self, tgid: int, path: Path, mm: mmap.mmap):
        self.tgid = tgid
        self.path = path
        self._mm = mm
        self.capacity = self.header("capacity")
        self._mask = self.capacity - 1

    @classmethod
    def open(cls, tgid: int, timeout: float = 0.0) -> GpuAgentRing:
        """Map /dev/shm/argus-gpu-<tgid>, waiting up to `timeout` s for the agent to make it.
        Raises TargetNotFound when there is none (the job was not started with
        `argus gpu-env`, or CUDA/NCCL has not initialised yet), ArgusError when its layout
        is not this version's."""
        path = shm_path(tgid)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(path, os.O_RDWR)
                break
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise TargetNotFound(
                        f"process {tgid} has no GPU agent file ({path})",
                        "start the job with the variables of `argus gpu-env` "
                        "(eval \"$(argus gpu-env)\"); the agent loads at CUDA/NCCL init.") from None
                time.sleep(0.01)
            except PermissionError as err:
                raise ArgusError(f"cannot open {path}: {err.strerror}",
                                 "run argus as the job's user or as root.") from None
        try:
            size = os.fstat(fd).st_size
            while size < HDR_BYTES and time.monotonic() < deadline:
                time.sleep(0.01)
                size = os.fstat(fd).st_size
            if size < HDR_BYTES:
                raise ArgusError(f"{path} is too small to be a GPU agent file",
                                 "remove it; the agent makes a new one at the next start.")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        while True:  # the agent stores the magic last
            magic = struct.unpack_from("<Q", mm, 0)[0]
            if magic == MAGIC or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        version, hdr, rec = struct.unpack_from("<III", mm, 8)
        if magic != MAGIC or version != VERSION or hdr != HDR_BYTES or rec != REC_BYTES:
            mm.close()
            raise ArgusError(f"{path} is not a version-{VERSION} GPU agent file",
                             "use the agent built with this argus (`make setup`).")
        return cls(tgid, path, mm)

    # ------------------------------------------------------------------ header
    def header(self, name: str) -> int:
        s, off = _HDR[name]
        return s.unpack_from(self._mm, off)[0]

    def _set(self, name: str, value: int) -> None:
        s, off = _HDR[name]
        s.pack_into(self._mm, off, value)

    @property
    def loaded(self) -> int:
        """ARGUS_GPU_LOADED_* bits: NCCL called the plugin's init, CUPTI callbacks registered."""
        return self.header("loaded")

    @property
    def active(self) -> int:
        return self.header("active")

    def enable(self, on: bool = True) -> None:
        """Ask the agent to switch on (or off); it acknowledges in `active`."""
        self._set("enabled", 1 if on else 0)
        _futex_wake(self._mm, _HDR["enabled"][1])

    def disable(self) -> None:
        self.enable(False)

    def wait_active(self, want: int, timeout: float = 5.0) -> bool:
        """Wait until every bit of `want` is in `active` (want=0: until it is 0)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            a = self.active
            if (a & want) == want and (want or a == 0):
                return True
            time.sleep(0.005)
        return False

    def drops(self) -> Drops:
        return Drops(self.header("dropped"), self.header("cupti_dropped"),
                     self.header("written"))

    # ------------------------------------------------------------------ records
    def read_raw(self, limit: int | None = None) -> list[tuple]:
        """Consume the published records (in ring order), at most `limit`."""
        mm, cap = self._mm, self.capacity
        tail = self.header("tail")
        out = []
        while limit is None or len(out) < limit:
            off = HDR_BYTES + (tail & self._mask) * REC_BYTES
            seq = struct.unpack_from("<Q", mm, off)[0]
            if seq != tail + 1:
                break
            out.append(_REC.unpack_from(mm, off))
            struct.pack_into("<Q", mm, off, tail + cap)
            tail += 1
            self._set("tail", tail)
        return out

    def read(self, limit: int | None = None) -> pl.DataFrame:
        """Drain the ring into a frame with RECORD_SCHEMA."""
        return records_frame(self.read_raw(limit), self.tgid)

    def close(self) -> None:
        self._mm.close()

    def __enter__(self) -> GpuAgentRing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def records_frame(raw: list[tuple], tgid: int) -> pl.DataFrame:
    """Raw record tuples (RECORD_FIELDS order) -> a RECORD_SCHEMA frame."""
    cols: dict[str, list] = {k: [] for k in RECORD_SCHEMA}
    for r in raw:
        (_seq, kind, channel, op, _flags, device, stream, corr, t0, t1, comm, cseq, nbytes,
         peer, _res, name) = r
        cols["tgid"].append(tgid)
        cols["kind"].append(KINDS.get(kind, str(kind)))
        cols["ts_start_ns"].append(t0)
        cols["ts_end_ns"].append(t1)
        cols["dur_ns"].append(t1 - t0)
        cols["stream"].append(stream)
        cols["correlation"].append(corr)
        cols["device"].append(device)
        cols["name"].append(name.split(b"\0", 1)[0].decode("utf-8", "replace"))
        cols["comm_hash"].append(comm)
        cols["coll_seq"].append(cseq)
        cols["op"].append(OPS.get(op, "") if kind in (4, 5) else "")
        cols["bytes"].append(nbytes)
        cols["channel"].append(channel)
        cols["peer"].append(peer)
    return pl.DataFrame(cols, schema=RECORD_SCHEMA)


def kernel_rows(frame: pl.DataFrame, rank: int | None, offset_ns: int = 0) -> pl.DataFrame:
    """A RECORD_SCHEMA frame of one process (`GpuAgentRing.read`) -> kernels.parquet rows
    (`schema.KERNELS_SCHEMA`): device times plus `offset_ns` (the device clock -> node
    CLOCK_MONOTONIC; 0 where they are one clock, as in the simulator), `rank` on every row.
    A coll/p2p row (an NCCL kernel-channel record) is named by its NCCL function and keeps
    comm_hash, coll_seq and channel, no stream or correlation; kernel/memcpy/memset rows keep
    stream and correlation, no NCCL fields; `bytes` for all but kernels, `peer` for p2p."""
    if frame.height == 0:
        return pl.DataFrame(schema=schema.KERNELS_SCHEMA)
    kind = pl.col("kind").cast(pl.Utf8)
    nccl = kind.is_in(["coll", "p2p"])
    out = frame.select(
        (pl.col("ts_start_ns").cast(pl.Int64) + offset_ns).alias("ts_ns"),
        (pl.col("ts_end_ns").cast(pl.Int64) - pl.col("ts_start_ns").cast(pl.Int64))
        .alias("dur_ns"),
        pl.col("tgid").cast(pl.Int32),
        pl.lit(rank, pl.Int32).alias("rank"),
        kind.alias("kind"),
        pl.when(nccl).then(pl.col("op")).otherwise(pl.col("name")).alias("name"),
        pl.col("device").cast(pl.Int32),
        pl.when(nccl).then(None).otherwise(pl.col("stream").cast(pl.Int64)).alias("stream"),
        pl.when(nccl).then(None).otherwise(pl.col("correlation").cast(pl.Int64))
        .alias("correlation"),
        pl.when(nccl).then(pl.col("comm_hash")).alias("comm_hash"),
        pl.when(nccl).then(pl.col("coll_seq").cast(pl.Int64)).alias("coll_seq"),
        pl.when(nccl).then(pl.col("channel").cast(pl.Int32)).alias("channel"),
        pl.when(kind != "kernel").then(pl.col("bytes").cast(pl.Int64)).alias("bytes"),
        pl.when(kind == "p2p").then(pl.col("peer")).alias("peer"),
    )
    return out.select([pl.col(c).cast(t) for c, t in schema.KERNELS_SCHEMA.items()])


def _futex_wake(mm: mmap.mmap, offset: int) -> None:
    """Wake the agent's watcher sleeping on the word at `offset` (best effort: it also
    re-reads the word every 100 ms)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = (ctypes.c_char * len(mm)).from_buffer(mm)
        try:
            addr = ctypes.addressof(buf) + offset
            libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(addr),
                         ctypes.c_int(_FUTEX_WAKE), ctypes.c_int(1 << 30), None, None,
                         ctypes.c_int(0))
        finally:
            del buf
    except (OSError, TypeError, ValueError, BufferError):
        pass


# ---------------------------------------------------------------------- the library
AGENT_SONAME = "libargus_gpu_agent.so"


def agent_library(build_dir: str | os.PathLike | None = None) -> Path:
    """The agent's absolute path: ARGUS_GPU_AGENT, else <build>/agent/ (ARGUS_BUILD_DIR or
    the repository's build/). Raises ArgusError when it is not built."""
    env = os.environ.get("ARGUS_GPU_AGENT")
    if env and build_dir is None:
        p = Path(env).resolve()
    else:
        env_build = os.environ.get("ARGUS_BUILD_DIR")
        build = Path(build_dir or env_build or resources.sim_build_dir())
        p = (build / "agent" / AGENT_SONAME).resolve()
    if not p.is_file():
        raise ArgusError(f"the GPU agent is not built ({p} is missing)",
                         "run `make setup` (or `make standins`), or set ARGUS_GPU_AGENT.")
    return p


def gpu_env(build_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """The variables that start a job with the dormant agent (NCCL profiler plugin + CUDA
    injection / CUPTI subscriber)."""
    lib = str(agent_library(build_dir))
    return {"NCCL_PROFILER_PLUGIN": lib, "CUDA_INJECTION64_PATH": lib}


__all__ = [
    "ACTIVE_CUPTI", "ACTIVE_NCCL", "Drops", "GpuAgentRing", "HEADER_FIELDS", "LOADED_CUPTI",
    "LOADED_NCCL", "RECORD_FIELDS", "RECORD_SCHEMA", "agent_files", "agent_library", "gpu_env",
    "kernel_rows", "records_frame", "remove_stale", "shm_path",
]
