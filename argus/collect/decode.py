"""Ring-buffer records -> rows of events.parquet (argus.recording.schema.EVENTS_SCHEMA).

Pure: everything about the live processes it needs (which probe id is which spec, address
-> kernel name, communicator handles) comes in through `DecodeContext`, so it is unit-tested
without root. Records are decoded in bulk with numpy structured arrays (the dtype is built
from the ctypes mirror, so it cannot drift from bpf/argus.h either).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from argus.collect import abi
from argus.collect.c10d import Group
from argus.collect.specs import ProbeSpec
from argus.recording import schema

CALL_DTYPE = np.dtype(abi.Call)
CALL_STR_DTYPE = np.dtype(abi.CallStr)

# nccl.h: ncclDataType_t and ncclRedOp_t.
NCCL_DTYPES = {
    0: ("int8", 1), 1: ("uint8", 1), 2: ("int32", 4), 3: ("uint32", 4), 4: ("int64", 8),
    5: ("uint64", 8), 6: ("float16", 2), 7: ("float32", 4), 8: ("float64", 8),
    9: ("bfloat16", 2), 10: ("float8e4m3", 1), 11: ("float8e5m2", 1),
}
NCCL_REDOPS = {0: "sum", 1: "prod", 2: "max", 3: "min", 4: "avg"}


@dataclass(frozen=True)
class ProbeRef:
    """What a probe id stands for: the spec and the symbol (a variant keeps its own name)."""

    spec: ProbeSpec
    symbol: str

    @property
    def name(self) -> str:
        return self.spec.name if self.symbol == self.spec.symbol else self.symbol


@dataclass
class DecodeContext:
    """Per-session state the decoder reads and updates.

    - probes: probe id -> ProbeRef
    - rank_of: tgid -> global rank (None when unknown)
    - kernel_name: (tgid, host stub address) -> kernel name (resolved by the tracer)
    - comm_ids: (tgid, communicator handle) -> communicator id, the same on every rank
    - comm_info: (tgid, handle) -> (comm_rank, comm_nranks)
    - pg_group: (tgid, c10d backend address) -> its process group (`c10d.read_group`), None
      when unreadable
    - handle_names: (tgid, CUfunction handle) -> kernel name (from cuModuleGetFunction)
    - devices: tgid -> CUDA ordinal of the last `cudaSetDevice` (joins ranks to GPUs)
    """

    probes: dict[int, ProbeRef]
    rank_of: dict[int, int | None] = field(default_factory=dict)
    kernel_name: Callable[[int, int], str | None] = lambda tgid, addr: None
    comm_ids: dict[tuple[int, int], str] = field(default_factory=dict)
    comm_info: dict[tuple[int, int], tuple[int | None, int | None]] = field(default_factory=dict)
    handle_names: dict[tuple[int, int], str] = field(default_factory=dict)
    alloc_bytes: dict[tuple[int, int], int] = field(default_factory=dict)  # cudaMalloc'd ptrs
    devices: dict[int, int] = field(default_factory=dict)  # tgid -> last cudaSetDevice argument
    _first_use: dict[tuple[int, str], int] = field(default_factory=dict)
    _splits: dict[tuple[int, str], int] = field(default_factory=dict)
    _buckets: dict[tuple[int, int], int] = field(default_factory=dict)  # (tgid, Bucket*) -> n
    on_comm_init: Callable[[int, str, int | None, int | None], None] | None = None
    pg_group: Callable[[int, int], Group | None] | None = None

    def comm_id(self, tgid: int, handle: int, kind: str) -> str:
        """The id of a communicator handle. A c10d process group whose backend object reads
        (`pg_group`) is `pg:NAME`, torch's name for the group (the same on every member),
        with its rank and size in comm_info; any other handle never seen being made gets a
        per-process ordinal by first use (`anon0`, ..., or `pg0`, ... for c10d groups)."""
        key = (tgid, handle)
        cid = self.comm_ids.get(key)
        if cid is None and kind.startswith("pg_") and self.pg_group is not None:
            self.name_group(tgid, handle, self.pg_group(tgid, handle))
            cid = self.comm_ids.get(key)
        if cid is None:
            prefix = "pg" if kind.startswith("pg_") else "anon"
            n = self._first_use.get((tgid, prefix), 0)
            self._first_use[(tgid, prefix)] = n + 1
            cid = f"{prefix}{n}"
            self.comm_ids[key] = cid
        return cid

    def name_group(self, tgid: int, handle: int, group: Group | None) -> None:
        """Name a c10d group `pg:NAME` from what was read of its Backend (by the BPF
        program at its first call, `argus_group_rec`, or `pg_group`), unless the handle
        already has an id."""
        key = (tgid, handle)
        if group is not None and key not in self.comm_ids:
            self.comm_ids[key] = f"pg:{group.name}"
            self.comm_info[key] = (group.rank, group.size)

    def split_ordinal(self, tgid: int, parent: str) -> int:
        """The how-manyth split of communicator `parent` in process tgid this is (0, 1, ...)."""
        n = self._splits.get((tgid, parent), 0)
        self._splits[(tgid, parent)] = n + 1
        return n

    def bucket_index(self, tgid: int, bucket: int) -> int:
        """A DDP gradient bucket's number in its process, by first call (the same every
        step)."""
        key = (tgid, bucket)
        if key not in self._buckets:
            self._buckets[key] = sum(1 for t, _p in self._buckets if t == tgid)
        return self._buckets[key]


def _split_id(parent: str, color: int, ordinal: int) -> str:
    return f"{parent}/split{ordinal}.c{color}"


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


# Probes whose records decode without reading or updating DecodeContext state in record
# order (no communicator, module, allocation or device bookkeeping): launches, syncs,
# copies. Their records are decoded in bulk, column by column (`_bulk`).
_SIDE_EFFECT_KINDS = frozenset({"comm_init", "comm_split", "module", "malloc", "free", "device"})
_BULK_FIELDS = frozenset({"kernel", "stream", "bytes", "memcpy_kind"})
_REC_CALL = abi.REC_CALL.to_bytes(4, "little")


def _bulk_ok(ref: ProbeRef) -> bool:
    return ref.spec.kind not in _SIDE_EFFECT_KINDS and set(ref.spec.args) <= _BULK_FIELDS


def decode_records(blobs: list[bytes], ctx: DecodeContext) -> pl.DataFrame:
    """Decode call records (struct argus_call / argus_call_str bytes) into an events frame,
    one row per record, in record order.

    Communicator-making calls update ctx (handle -> id) in record order, so calls on a
    communicator decoded later in the same batch are named. Records of probes that touch no
    such state (`_bulk_ok`: kernel launches, syncs, copies: nearly all of a busy rank's
    records) are decoded in bulk with numpy (`_bulk`): the same rows as `decode_call` gives
    them, at a fraction of the per-record cost.
    """
    size = CALL_DTYPE.itemsize
    bulk_ids = np.fromiter((pid for pid, ref in ctx.probes.items() if _bulk_ok(ref)),
                           dtype=np.int64)
    plain = [i for i, b in enumerate(blobs) if len(b) == size and b[:4] == _REC_CALL]
    arr = np.frombuffer(b"".join([blobs[i] for i in plain]), dtype=CALL_DTYPE)
    keep = np.isin(arr["probe_id"].astype(np.int64), bulk_ids)
    bulk_idx = np.asarray(plain, dtype=np.int64)[keep]
    rest = np.ones(len(blobs), dtype=bool)
    rest[bulk_idx] = False
    rows: list[dict] = []
    slow_idx: list[int] = []
    for i in np.flatnonzero(rest).tolist():
        blob = blobs[i]
        if len(blob) >= CALL_STR_DTYPE.itemsize and blob[:4] == b"\x02\x00\x00\x00":
            rec = np.frombuffer(blob[: CALL_STR_DTYPE.itemsize], dtype=CALL_STR_DTYPE)[0]
            call = rec["call"]
            text = bytes(rec["str"]).split(b"\0", 1)[0].decode("utf-8", "replace")
        else:
            call = np.frombuffer(blob[: CALL_DTYPE.itemsize], dtype=CALL_DTYPE)[0]
            text = None
        row = decode_call(call, text, ctx, in_flight=False)
        if row is not None:
            rows.append(row)
            slow_idx.append(i)
    if not len(bulk_idx):
        return rows_to_frame(rows)
    bulk = _bulk(arr[keep], ctx).with_columns(pl.Series("_i", bulk_idx, dtype=pl.Int64))
    if not rows:
        return bulk.drop("_i")
    slow = rows_to_frame(rows).with_columns(pl.Series("_i", slow_idx, dtype=pl.Int64))
    return pl.concat([bulk, slow]).sort("_i").drop("_i")


def _bulk(arr: np.ndarray, ctx: DecodeContext) -> pl.DataFrame:
    """`decode_call` of plain call records of `_bulk_ok` probes, column by column."""
    n = len(arr)
    pids = arr["probe_id"]
    uniq, inv = np.unique(pids, return_inverse=True)
    refs = [ctx.probes[int(p)] for p in uniq]

    def per_probe(values, dtype):
        return pl.Series(values, dtype=dtype).gather(pl.Series(inv, dtype=pl.UInt32))

    exit_ = np.array([r.spec.exit for r in refs], dtype=bool)[inv]
    tgid = arr["tgid"].astype(np.int64)
    cols: dict[str, pl.Series] = {
        "ts_ns": pl.Series(arr["ts_ns"].astype(np.int64)),
        "dur_ns": pl.Series(np.where(exit_, arr["dur_ns"].astype(np.int64), 0)).set(
            pl.Series(~exit_), None),
        "in_flight": pl.Series(np.zeros(n, dtype=bool)),
        "tgid": pl.Series(tgid),
        "tid": pl.Series(arr["tid"].astype(np.int64)),
        "channel": per_probe([r.spec.channel for r in refs], pl.Utf8),
        "name": per_probe([r.name for r in refs], pl.Utf8),
        "op": per_probe([r.spec.op for r in refs], pl.Utf8),
    }
    ret = arr["ret"].astype(np.uint64) & 0xFFFFFFFF
    ret = np.where(ret & 0x80000000, ret.astype(np.int64) - (1 << 32), ret.astype(np.int64))
    cols["ret"] = pl.Series(ret).set(pl.Series(~exit_), None)
    seq = arr["seq"].astype(np.int64)
    cols["seq"] = pl.Series(seq).set(pl.Series(seq < 0), None)
    ut = np.unique(tgid)
    cols["rank"] = pl.Series(tgid).replace_strict(
        ut, [ctx.rank_of.get(int(t)) for t in ut], return_dtype=pl.Int64)

    def field(name: str) -> tuple[np.ndarray, np.ndarray]:
        """(has the field, its raw u64 value) per record."""
        slot = np.array([r.spec.args.get(name, -1) for r in refs])[inv]
        has = slot >= 0
        vals = arr["args"][np.arange(n), np.where(has, slot, 0)]
        return has, vals

    has, v = field("stream")
    cols["stream"] = pl.Series(v, dtype=pl.UInt64).set(pl.Series(~has), None)
    has, v = field("bytes")
    cols["bytes"] = pl.Series(v.astype(np.int64)).set(pl.Series(~has), None)
    has, v = field("memcpy_kind")
    cols["memcpy_kind"] = pl.Series((v & 0x7F).astype(np.int64)).set(pl.Series(~has), None)
    has, v = field("kernel")
    keys = pl.DataFrame({"t": tgid, "a": pl.Series(v, dtype=pl.UInt64), "has": has})
    uniq_keys = keys.filter("has").unique(["t", "a"])  # one name lookup per (tgid, stub)
    names = uniq_keys.with_columns(pl.Series(
        "kernel", [ctx.kernel_name(t, a) for t, a in uniq_keys.select("t", "a").rows()],
        dtype=pl.Utf8))
    cols["kernel"] = keys.join(names, on=["t", "a", "has"], how="left",
                               maintain_order="left")["kernel"]
    out = []
    for name, dtype in schema.EVENTS_SCHEMA.items():
        s_ = cols.get(name)
        if s_ is None:
            s_ = pl.Series(name, [None] * n, dtype=pl.Utf8 if dtype == pl.Categorical else dtype)
        out.append(s_.alias(name).cast(dtype))
    return pl.DataFrame(out)


def rows_to_frame(rows: list[dict]) -> pl.DataFrame:
    """Rows (dicts with any subset of the events columns) -> a frame of EVENTS_SCHEMA."""
    if not rows:
        return schema.empty_events()
    series = []
    for name, dtype in schema.EVENTS_SCHEMA.items():
        values = [r.get(name) for r in rows]
        # Categoricals are built from strings, then cast.
        s = pl.Series(name, values, dtype=pl.Utf8 if dtype == pl.Categorical else dtype)
        series.append(s.cast(dtype) if dtype == pl.Categorical else s)
    return pl.DataFrame(series)


def decode_call(call, text: str | None, ctx: DecodeContext, in_flight: bool) -> dict | None:
    """One record (a numpy void of CALL_DTYPE, or a ctypes Frame-like) -> an events row:
    the columns every call has (`_base_row`), those its captured arguments give
    (`_argument_columns`), then what its kind adds or updates in ctx (`_KIND_DECODERS`;
    any other call on a communicator gets the communicator's id: `_comm_columns`)."""
    ref = ctx.probes.get(int(call["probe_id"]))
    if ref is None:
        return None
    spec = ref.spec
    args = [int(a) for a in call["args"]]
    a = {name: args[slot] for name, slot in spec.args.items()}
    row = _base_row(call, ref, ctx, in_flight)
    _argument_columns(row, a, ctx)
    out = int(call["out"]) if "out" in call.dtype.names else 0
    kind_decoder = _KIND_DECODERS.get(spec.kind)
    call_ = _Call(row["tgid"], spec, a, out, int(call["uid_hash"]), text, in_flight)
    if kind_decoder is None or not kind_decoder(row, call_, ctx):
        _comm_columns(row, call_, ctx)
    return row


@dataclass(frozen=True)
class _Call:
    """What the kind decoders read of one record."""

    tgid: int
    spec: ProbeSpec
    args: dict[str, int]  # captured argument name -> raw value
    out: int  # the value the call wrote through its output pointer (0: none)
    uid_hash: int
    text: str | None  # the captured string (argus_call_str), if any
    in_flight: bool


def _base_row(call, ref: ProbeRef, ctx: DecodeContext, in_flight: bool) -> dict:
    """The columns of every call: times, process, probe, return value, sequence number."""
    spec = ref.spec
    tgid = int(call["tgid"])
    done = not in_flight and spec.exit
    row: dict = {
        "ts_ns": int(call["ts_ns"]),
        "dur_ns": int(call["dur_ns"]) if done else None,
        "in_flight": in_flight,
        "tgid": tgid,
        "tid": int(call["tid"]),
        "rank": ctx.rank_of.get(tgid),
        "channel": spec.channel,
        "name": ref.name,
        "op": spec.op,
        "ret": _signed32(int(call["ret"])) if done else None,
    }
    seq = int(call["seq"])
    if seq >= 0:
        row["seq"] = seq
    return row


def _argument_columns(row: dict, a: dict[str, int], ctx: DecodeContext) -> None:
    """Columns straight from captured arguments: stream, kernel, bytes, copy kind, NCCL
    count / datatype (-> bytes) / reduction, peer or root."""
    tgid = row["tgid"]
    if "stream" in a:
        row["stream"] = a["stream"]
    if "kernel" in a:
        row["kernel"] = ctx.kernel_name(tgid, a["kernel"])
    if "kernel_handle" in a:
        row["kernel"] = ctx.handle_names.get((tgid, a["kernel_handle"]))
    if "bytes" in a:
        row["bytes"] = a["bytes"]
    if "memcpy_kind" in a:
        row["memcpy_kind"] = a["memcpy_kind"] & 0x7F
    if "count" in a:
        row["count"] = a["count"]
        dt = NCCL_DTYPES.get(a.get("dtype", -1) & 0xFFFFFFFF) if "dtype" in a else None
        if dt is not None:
            row["dtype"] = dt[0]
            row["bytes"] = a["count"] * dt[1]
    if "redop" in a:
        op = a["redop"] & 0xFFFFFFFF
        row["redop"] = NCCL_REDOPS.get(op, f"op{op}")
    if "peer" in a:
        row["peer"] = _signed32(a["peer"])
    if "root" in a:
        row["peer"] = _signed32(a["root"])


# Each kind decoder returns False when the record is not its case (in flight, or without
# the argument it needs): the record is then decoded as a call on a communicator.
def _comm_init(row: dict, c: _Call, ctx: DecodeContext) -> bool:
    """ncclCommInitRank & co: the new communicator's id (the ncclUniqueId's hash, the same
    on every rank), its rank and size; tells ctx.on_comm_init (a rank learnt here)."""
    if c.in_flight:
        return False
    a = c.args
    rank = _signed32(a["rank"]) if "rank" in a else None
    nranks = _signed32(a["nranks"]) if "nranks" in a else None
    cid = f"{c.uid_hash:016x}" if "uid" in c.spec.args else f"t{c.tgid}c{c.out:x}"
    ctx.comm_ids[(c.tgid, c.out)] = cid
    ctx.comm_info[(c.tgid, c.out)] = (rank, nranks)
    row.update(comm=cid, comm_rank=rank, comm_nranks=nranks)
    if ctx.on_comm_init is not None:
        ctx.on_comm_init(c.tgid, cid, rank, nranks)
    return True


def _comm_split(row: dict, c: _Call, ctx: DecodeContext) -> bool:
    """ncclCommSplit: the child is named after its parent, the split's ordinal and color."""
    if c.in_flight:
        return False
    parent = ctx.comm_id(c.tgid, c.args["parent_comm"], c.spec.kind)
    ordinal = ctx.split_ordinal(c.tgid, parent)
    color = _signed32(c.args.get("color", 0))
    cid = _split_id(parent, color, ordinal)
    if color >= 0 and c.out:  # NCCL_SPLIT_NOCOLOR (-1) makes no communicator
        ctx.comm_ids[(c.tgid, c.out)] = cid
    row.update(comm=cid)
    return True


def _module(row: dict, c: _Call, ctx: DecodeContext) -> bool:
    """cuModuleGetFunction: the CUfunction handle's kernel name (later launches by handle)."""
    if c.in_flight:
        return False
    if c.text:
        ctx.handle_names[(c.tgid, c.out)] = c.text
    row["kernel"] = c.text
    return True


def _malloc(row: dict, c: _Call, ctx: DecodeContext) -> bool:
    """cudaMalloc: the size of each pointer it returned (for the cudaFree of it)."""
    if c.in_flight:
        return False
    if c.out and row.get("ret") == 0:
        ctx.alloc_bytes[(c.tgid, c.out)] = c.args.get("bytes", 0)
    return True


def _free(row: dict, c: _Call, ctx: DecodeContext) -> bool:
    """cudaFree gets a pointer: its size is what the cudaMalloc that returned it asked for."""
    if "ptr" not in c.args:
        return False
    row["bytes"] = ctx.alloc_bytes.pop((c.tgid, c.args["ptr"]), None)
    return True


def _ddp_bucket(row: dict, c: _Call, ctx: DecodeContext) -> bool:
    """A DDP gradient bucket, numbered per process by first call (the same every step)."""
    if "ptr" not in c.args:
        return False
    row["seq"] = ctx.bucket_index(c.tgid, c.args["ptr"])
    return True


def _device(row: dict, c: _Call, ctx: DecodeContext) -> bool:
    """cudaSetDevice: the process's CUDA ordinal (joins ranks to GPUs)."""
    if "device" not in c.args:
        return False
    ctx.devices[c.tgid] = _signed32(c.args["device"])
    return True


def _comm_columns(row: dict, c: _Call, ctx: DecodeContext) -> None:
    """A call on a communicator (collective, p2p, c10d group method): its id, rank, size."""
    if "comm" not in c.args:
        return
    handle = c.args["comm"]
    row["comm"] = ctx.comm_id(c.tgid, handle, c.spec.kind)
    info = ctx.comm_info.get((c.tgid, handle))
    if info is not None:
        row["comm_rank"], row["comm_nranks"] = info


_KIND_DECODERS: dict[str, Callable[[dict, _Call, DecodeContext], bool]] = {
    "comm_init": _comm_init,
    "comm_split": _comm_split,
    "module": _module,
    "malloc": _malloc,
    "free": _free,
    "ddp_bucket": _ddp_bucket,
    "device": _device,
}


def pair_completions(events: pl.DataFrame, work: set[str], done: set[str]) -> pl.DataFrame:
    """Durations for entry-only work probes from the completion call that follows them.

    C++ functions get no return probes (an exception unwinding through a uretprobe's
    trampoline aborts the process), so e.g. gloo's AsyncWork::execute is timed by the
    finishWorkGloo / finishWorkGlooError call the same thread makes when the collective is
    done: per (tgid, tid), a `work` row followed by a `done` row gets dur_ns = done - entry;
    a `work` row with no completion after it is in flight (blocked when the recording
    ended).
    """
    if events.height == 0 or not work:
        return events
    names = pl.col("name").cast(pl.Utf8)
    ev = events.with_row_index("_i")
    marks = (
        ev.filter(names.is_in(list(work | done)))
        .select("_i", "tgid", "tid", "ts_ns", names.is_in(list(done)).alias("_done"))
        .sort("tgid", "tid", "ts_ns")
        .with_columns(
            pl.col("ts_ns").shift(-1).over("tgid", "tid").alias("_next_ts"),
            pl.col("_done").shift(-1).over("tgid", "tid").alias("_next_done"),
        )
        .filter(~pl.col("_done"))
        .select(
            "_i",
            pl.when(pl.col("_next_done").fill_null(False))
            .then(pl.col("_next_ts") - pl.col("ts_ns"))
            .otherwise(None)
            .alias("_dur"),
            pl.col("_next_ts").is_null().alias("_open"),
        )
    )
    out = ev.join(marks, on="_i", how="left").with_columns(
        pl.coalesce("_dur", "dur_ns").alias("dur_ns"),
        (pl.col("in_flight") | pl.col("_open").fill_null(False)).alias("in_flight"),
    )
    return out.drop("_i", "_dur", "_open")
