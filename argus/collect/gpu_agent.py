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

import numpy as np
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
# CUPTI_ActivityMemcpyKind (cupti_activity.h)
COPY_KINDS = {1: "HtoD", 2: "DtoH", 3: "HtoA", 4: "AtoH", 5: "AtoA", 6: "AtoD", 7: "DtoA",
              8: "DtoD", 9: "HtoH", 10: "PtoP"}
OPS = {0: "", 1: "AllReduce", 2: "AllGather", 3: "ReduceScatter", 4: "Broadcast", 5: "Reduce",
       6: "Send", 7: "Recv", 8: "AllToAll"}

# (name, struct format, offset): the C header's fields, in order
HEADER_FIELDS = (
    ("magic", "Q", 0), ("version", "I", 8), ("hdr_bytes", "I", 12), ("rec_bytes", "I", 16),
    ("capacity", "I", 20), ("tgid", "i", 24), ("loaded", "I", 28), ("enabled", "I", 32),
    ("active", "I", 36), ("nccl_version", "I", 40), ("nccl_comms", "I", 44),
    ("head", "Q", 48), ("tail", "Q", 56), ("written", "Q", 64), ("dropped", "Q", 72),
    ("cupti_dropped", "Q", 80), ("enables", "Q", 88), ("created_ns", "Q", 96),
    ("clock_offset_ns", "q", 104), ("clock_source", "I", 112), ("clock_error_ns", "I", 116),
)
# header.clock_source: how clock_offset_ns (CLOCK_MONOTONIC - device time) was measured
CLOCK_SOURCES = {0: "none", 1: "cupti", 2: "realtime"}
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
# the same record as a numpy dtype: `read_batch` copies whole runs of slots at once
RECORD_DTYPE = np.dtype({"names": [n for n, _, _ in RECORD_FIELDS],
                         "formats": ["<" + f.replace("s", "S") if f.endswith("s") else "<" + f
                                     for _, f, _ in RECORD_FIELDS],
                         "offsets": [o for _, _, o in RECORD_FIELDS], "itemsize": REC_BYTES})

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
    "op": pl.Utf8,               # NCCL function (coll/p2p), copy kind (memcpy), else ""
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


def owned_file(tgid: int, proc_root: str = "/proc") -> Path | None:
    """The agent file of process `tgid` when that process maps it itself (the same inode in
    /proc/PID/maps): not a stale file of a dead process that had the same pid. None when
    there is none (no agent, CUDA/NCCL not initialised yet, or not readable)."""
    path = shm_path(tgid)
    try:
        ino = os.stat(path).st_ino
        text = Path(proc_root, str(tgid), "maps").read_text()
    except OSError:
        return None
    name = str(path)
    for line in text.splitlines():
        if name in line:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[4].isdigit() and int(fields[4]) == ino:
                return path
    return None


def bit_names(bits: int) -> list[str]:
    """LOADED_* / ACTIVE_* bits as names, in order (the two sets share their values)."""
    return [name for name, bit in (("nccl", LOADED_NCCL), ("cupti", LOADED_CUPTI)) if bits & bit]


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
        self._slots: np.ndarray | None = None  # a view of the ring (read_batch)

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

    def read_batch(self, limit: int | None = None) -> np.ndarray:
        """Consume the published records (in ring order), at most `limit` (default: one
        ring's worth), as one RECORD_DTYPE array: the slots' `seq` words are read first and
        the run of published ones copied after them (x86 keeps loads in order: a slot whose
        seq says published holds its record), then released (seq = position + capacity)
        and `tail` advanced, as `read_raw` does one record at a time."""
        cap = self.capacity
        n = cap if limit is None else max(0, min(limit, cap))
        tail = self.header("tail")
        if self._slots is None:
            self._slots = np.frombuffer(self._mm, RECORD_DTYPE, count=cap, offset=HDR_BYTES)
        slots = self._slots
        pos = tail + np.arange(n, dtype=np.uint64)
        idx = (pos & np.uint64(self._mask)).astype(np.intp)
        seq = slots["seq"][idx]
        ok = seq == pos + np.uint64(1)
        got = n if ok.all() else int(np.argmin(ok))
        if not got:
            return np.empty(0, RECORD_DTYPE)
        out = slots[idx[:got]]  # a copy
        slots["seq"][idx[:got]] = pos[:got] + np.uint64(cap)
        self._set("tail", tail + got)
        return out

    def read(self, limit: int | None = None) -> pl.DataFrame:
        """Drain the ring into a frame with RECORD_SCHEMA (through `read_batch`, the
        collector's reader; `read_raw` / `records_frame` stay as its record-by-record
        reference, which the unit tests compare it with)."""
        return batch_frame(self.read_batch(limit), self.tgid)

    def close(self) -> None:
        self._slots = None  # the view holds the mapping's buffer
        self._mm.close()

    def __enter__(self) -> GpuAgentRing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _op_name(kind: int, op: int) -> str:
    """The record's `op` word as text: the NCCL function of a coll/p2p record, CUPTI's copy
    kind of a memcpy record ("" when unknown), else ""."""
    if kind in (4, 5):
        return OPS.get(op, "")
    if kind == 2:
        return COPY_KINDS.get(op, "")
    return ""


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
        cols["op"].append(_op_name(kind, op))
        cols["bytes"].append(nbytes)
        cols["channel"].append(channel)
        cols["peer"].append(peer)
    return pl.DataFrame(cols, schema=RECORD_SCHEMA)


def _texts(codes: np.ndarray, table) -> pl.Series:
    """Decode a column of repeated values through their distinct values only."""
    uniq, inv = np.unique(codes, return_inverse=True)
    return pl.Series([table(u) for u in uniq.tolist()], dtype=pl.Utf8).gather(inv.ravel())


def batch_frame(batch: np.ndarray, tgid: int) -> pl.DataFrame:
    """A `read_batch` array -> a RECORD_SCHEMA frame, column by column (the same values as
    `records_frame` of the same records, without a Python step per record)."""
    kind, op = batch["kind"].astype(np.int64), batch["op"].astype(np.int64)
    t0 = batch["ts_start_ns"]
    t1 = batch["ts_end_ns"]
    cols = {
        "tgid": pl.Series(np.full(len(batch), tgid, np.int32)),
        "kind": _texts(kind, lambda k: KINDS.get(k, str(k))),
        "ts_start_ns": pl.Series(t0), "ts_end_ns": pl.Series(t1),
        "dur_ns": pl.Series(t1.astype(np.int64) - t0.astype(np.int64)),
        "stream": pl.Series(batch["stream"]), "correlation": pl.Series(batch["correlation"]),
        "device": pl.Series(batch["device"]),
        "name": _texts(batch["name"], lambda b: b.split(b"\0", 1)[0].decode("utf-8", "replace")),
        "comm_hash": pl.Series(batch["comm_hash"]), "coll_seq": pl.Series(batch["coll_seq"]),
        "op": _texts(kind * 256 + op, lambda c: _op_name(c >> 8, c & 0xFF)),
        "bytes": pl.Series(batch["bytes"]), "channel": pl.Series(batch["channel"]),
        "peer": pl.Series(batch["peer"]),
    }
    return pl.DataFrame(cols).cast(RECORD_SCHEMA)  # type: ignore[arg-type]


def kernel_rows(frame: pl.DataFrame, rank: int | None, offset_ns: int = 0) -> pl.DataFrame:
    """RECORD_SCHEMA rows of one process -> KERNELS_SCHEMA rows (argus.recording.schema):
    times moved to the node's CLOCK_MONOTONIC by `offset_ns` (the ring header's
    clock_offset_ns: CLOCK_MONOTONIC - device time), `rank` filled; per kind only the
    columns that mean something there (NCCL columns on coll/p2p, CUPTI's stream and
    correlation on kernel/memcpy/memset, bytes but on kernels, peer on p2p), the rest null.
    `name`: the kernel's name, the NCCL function of coll/p2p, "memcpy[ <copy kind>]", or
    "memset"."""
    if not frame.height:
        return schema.empty_kernels()
    kind = pl.col("kind").cast(pl.Utf8)
    nccl = kind.is_in(["coll", "p2p"])
    memcpy_name = pl.when(pl.col("op") != "").then(pl.lit("memcpy ") + pl.col("op")) \
        .otherwise(pl.lit("memcpy"))
    out = frame.select(
        ts_ns=pl.col("ts_start_ns").cast(pl.Int64) + offset_ns,
        dur_ns=pl.col("dur_ns").cast(pl.Int64),
        tgid=pl.col("tgid").cast(pl.Int32),
        rank=pl.lit(rank, dtype=pl.Int32),
        kind=kind,
        name=pl.when(nccl).then(pl.when(pl.col("op") != "").then(pl.col("op"))
                                .otherwise(pl.col("name")))
        .when(kind == "memcpy").then(memcpy_name)
        .when(kind == "memset").then(pl.lit("memset"))
        .otherwise(pl.col("name")),
        device=pl.col("device").cast(pl.Int32),
        stream=pl.when(nccl).then(None).otherwise(pl.col("stream")).cast(pl.Int64),
        correlation=pl.when(nccl).then(None).otherwise(pl.col("correlation")).cast(pl.Int64),
        comm_hash=pl.when(nccl).then(pl.col("comm_hash")).cast(pl.UInt64),
        coll_seq=pl.when(nccl).then(pl.col("coll_seq")).cast(pl.Int64),
        channel=pl.when(nccl).then(pl.col("channel")).cast(pl.Int32),
        bytes=pl.when(kind == "kernel").then(None).otherwise(pl.col("bytes")).cast(pl.Int64),
        peer=pl.when(kind == "p2p").then(pl.col("peer")).cast(pl.Int32),
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
    "ACTIVE_CUPTI", "ACTIVE_NCCL", "CLOCK_SOURCES", "Drops", "GpuAgentRing", "HEADER_FIELDS",
    "LOADED_CUPTI", "LOADED_NCCL", "RECORD_DTYPE", "RECORD_FIELDS", "RECORD_SCHEMA",
    "agent_files", "agent_library", "batch_frame", "bit_names", "gpu_env", "kernel_rows",
    "owned_file", "records_frame", "remove_stale", "shm_path",
]
