"""Read and write a recording directory (`argus.recording/1`, see `schema`).

`write_recording` creates the directory 0700 and every file 0600 (recordings hold command
lines and stacks of production jobs). `load_recording` validates the format and version, the
manifest keys and their types (`check_manifest`), the parquet columns and their types
(`coerce`: a column whose type cannot hold the schema's is an error, never nulls), coerces the
columns to the schema (missing optional columns become nulls) and raises `RecordingInvalid`
with one sentence on any defect, so that the analysis never sees malformed input.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from argus.errors import OutputNotWritable, RecordingDamaged, RecordingInvalid
from argus.recording import schema

# Columns an events / stacks file must have; the others may be absent (filled with nulls).
REQUIRED_EVENT_COLUMNS = ("ts_ns", "tgid", "channel", "name")
REQUIRED_STACK_COLUMNS = ("ts_ns", "tgid", "count", "functions")
REQUIRED_GPU_COLUMNS = ("ts_ns", "device")
REQUIRED_HOST_COLUMNS = ("ts_ns", "tgid", "kind", "count")
REQUIRED_PYSTACK_COLUMNS = ("tgid", "functions", "files", "lines", "kinds")
REQUIRED_KERNEL_COLUMNS = ("ts_ns", "dur_ns", "tgid", "kind")
# Manifest keys without which nothing can be analysed.
REQUIRED_MANIFEST_KEYS = ("format", "host", "clock")


@dataclass
class Recording:
    """One recording directory loaded in memory: the manifest and two long frames."""

    manifest: dict[str, Any]
    events: pl.DataFrame
    stacks: pl.DataFrame
    path: Path | None = field(default=None)
    gpu: pl.DataFrame = field(default_factory=schema.empty_gpu)  # gpu.parquet; empty if absent
    # host.parquet; empty if absent
    host_ctx: pl.DataFrame = field(default_factory=schema.empty_host)
    # pystacks.parquet (Python stacks dumped at the end of a hung session); empty if absent
    pystacks: pl.DataFrame = field(default_factory=schema.empty_pystacks)
    # kernels.parquet (device activity from the GPU agent); empty if absent
    kernels: pl.DataFrame = field(default_factory=schema.empty_kernels)

    @property
    def host(self) -> str:
        return str(self.manifest.get("host") or "?")


def _holds(src: pl.DataType, dst: pl.DataType) -> bool:
    """Can a column of type `src` be cast to `dst` without inventing values? Integers into
    integers, numbers into floats, text into text, booleans into booleans, lists and structs
    field by field; an all-null column into anything."""
    if src == pl.Null:
        return True
    if dst in (pl.Utf8, pl.Categorical):
        return src in (pl.Utf8, pl.Categorical) or isinstance(src, pl.Enum)
    if dst.is_integer():
        return src.is_integer()
    if dst.is_float():
        return src.is_numeric()
    if isinstance(dst, pl.List):
        return isinstance(src, pl.List) and _holds(src.inner, dst.inner)
    if isinstance(dst, pl.Struct):
        have = {f.name: f.dtype for f in src.fields} if isinstance(src, pl.Struct) else None
        return have is not None and all(
            f.name in have and _holds(have[f.name], f.dtype) for f in dst.fields
        )
    return src == dst


def coerce(
    df: pl.DataFrame,
    target: dict[str, pl.DataType],
    what: str,
    required: tuple[str, ...] = (),
    ranges: dict[str, tuple[int, int]] | None = None,
    same_length: tuple[str, ...] = (),
    strict: bool = False,
) -> pl.DataFrame:
    """Return `df` with exactly the columns of `target`, in order, cast to its types.

    Missing columns are added as nulls; extra columns are dropped; a column that cannot be
    cast raises RecordingInvalid naming it. `strict` (what the loaders use on files): a column
    whose type cannot hold the target type (text where numbers go, a number where a list
    goes, see `_holds`) or a value that does not fit (an integer out of range) is an error
    instead of a null. A null in one of the `required` columns, a value outside its `ranges`
    entry [low, high) or lists of `same_length` columns of different lengths in one row raise
    RecordingInvalid naming the column.
    """
    cols = []
    for name, dtype in target.items():
        if name in df.columns:
            src = df.schema[name]
            if strict and not _holds(src, dtype):
                raise RecordingDamaged(f"{what} has a column {name} of type {src}, not {dtype}.")
            col = pl.col(name)
            if src != dtype:
                if dtype == pl.Categorical and src != pl.Utf8:
                    col = col.cast(pl.Utf8)
                col = col.cast(dtype, strict=strict or dtype == pl.Categorical)
            cols.append(col.alias(name))
        else:
            cols.append(pl.lit(None, dtype=dtype).alias(name))
    try:
        out = df.select(cols) if df.width else pl.DataFrame(schema=target)
    except pl.exceptions.PolarsError as err:
        if not strict:
            raise RecordingDamaged(f"{what} has a column of the wrong type ({err}).") from err
        raise RecordingDamaged(
            f"{what} has a value that does not fit its column type ({type(err).__name__})."
        ) from err
    if out.height == 0 and df.height:
        raise RecordingDamaged(f"{what} lost its rows while coercing the columns.")
    for name in required:
        if n := out[name].null_count():
            raise RecordingDamaged(f"{what} has {n} row(s) without a {name}.")
    for name, (low, high) in (ranges or {}).items():
        col = out[name]
        if n := col.is_between(low, high, closed="left").not_().sum():
            raise RecordingDamaged(
                f"{what} has {n} row(s) with a {name} outside [{low}, {high}) "
                f"(e.g. {col.filter(~col.is_between(low, high, closed='left'))[0]})."
            )
    if same_length and out.height:
        lens = [pl.col(c).list.len() for c in same_length]
        if n := out.select((pl.min_horizontal(lens) != pl.max_horizontal(lens)).sum()).item():
            raise RecordingDamaged(
                f"{what} has {n} row(s) whose {', '.join(same_length)} differ in length."
            )
    return out


def parquet_bytes(df: pl.DataFrame) -> bytes:
    """`df` as a parquet file, in memory: written to disk by Python (`replace_file`), so that
    a full disk is an OSError that says so, not a polars error about thrift."""
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def file_digest(data: bytes) -> dict[str, Any]:
    """What a manifest (`files`) or meta.json records of a file it vouches for."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def replace_file(target: Path, data: bytes) -> None:
    """Write `data` to `target` (0600) through a temporary `.<name>.tmp` renamed over it: a
    reader sees the old file or the new one, never half of one; a failure leaves no .tmp."""
    tmp = target.parent / f".{target.name}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_recording(
    directory: str | os.PathLike[str],
    manifest: dict[str, Any],
    events: pl.DataFrame,
    stacks: pl.DataFrame | None = None,
    gpu: pl.DataFrame | None = None,
    host: pl.DataFrame | None = None,
    pystacks: pl.DataFrame | None = None,
    kernels: pl.DataFrame | None = None,
) -> Path:
    """Write `manifest.json`, `events.parquet`, `stacks.parquet` (and each optional file
    whose frame is given: `gpu.parquet`, `host.parquet`, `pystacks.parquet`,
    `kernels.parquet`) into `directory`.

    The directory is created with mode 0700 and the files 0600; frames are coerced to the
    schema first, so what is written always reads back. Each file is written to a temporary
    name and renamed into place; the manifest, last, records each parquet file's size and
    SHA-256 (`files`), which `load_recording` checks before decoding. Returns the path.
    """
    path = Path(directory)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as err:
        raise OutputNotWritable(f"Cannot create the recording directory {path}: {err}.") from err
    manifest = dict(manifest)
    manifest.setdefault("format", schema.FORMAT)
    ev = coerce(events, schema.EVENTS_SCHEMA, "events")
    st = stacks if stacks is not None else schema.empty_stacks()
    st = coerce(st, schema.STACKS_SCHEMA, "stacks")
    gp = coerce(gpu, schema.GPU_SCHEMA, "gpu") if gpu is not None else None
    hc = coerce(host, schema.HOST_SCHEMA, "host") if host is not None else None
    ps = coerce(pystacks, schema.PYSTACKS_SCHEMA, "pystacks") if pystacks is not None else None
    kn = coerce(kernels, schema.KERNELS_SCHEMA, "kernels") if kernels is not None else None
    files: dict[str, dict[str, Any]] = {}
    try:
        for name, df in ((schema.EVENTS, ev), (schema.STACKS, st), (schema.GPU, gp),
                         (schema.HOST, hc), (schema.PYSTACKS, ps), (schema.KERNELS, kn)):
            if df is not None:
                data = parquet_bytes(df)
                files[name] = file_digest(data)
                replace_file(path / name, data)
        manifest[schema.FILES] = files  # written last: it vouches for the files above
        replace_file(path / schema.MANIFEST, json.dumps(manifest, indent=2, default=str).encode())
    except OSError as err:
        raise OutputNotWritable(f"Cannot write the recording in {path}: {err}.") from err
    return path


@contextmanager
def _rust_panics_quiet():
    """Send fd 2 to a temporary file while polars decodes: on some corrupt files it panics,
    and Rust prints the panic (and a backtrace) on fd 2 before Python sees the exception.
    What was written is passed on unless the decoding failed (then our one sentence says it)."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all: nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not failed and tmp.tell():
                tmp.seek(0)
                os.write(2, tmp.read())


def read_parquet(
    p: Path,
    expect: dict[str, Any] | None = None,
    target: dict[str, pl.DataType] | None = None,
    required: tuple[str, ...] = (),
) -> pl.DataFrame:
    """`p` as a frame, else a RecordingInvalid: missing, a folder, truncated or corrupt
    (whatever polars raises, a Rust panic included).

    `expect` is what the writer recorded of the file (`file_digest`: `bytes`, and `sha256`
    when known). A file that does not match it is not decoded: a damaged page header can
    make polars abort the whole process (an allocation of exabytes) where no exception
    handler runs. Only its footer is read, to name the defect when it shows there (not
    parquet, a `required` column absent, a column whose type cannot hold `target`'s), else
    the mismatch itself is the error. Files without a record (recordings of older versions)
    are decoded as they are."""
    try:
        data = p.read_bytes()
    except FileNotFoundError as err:
        raise RecordingInvalid(f"The recording has no {p.name} ({p}).") from err
    except OSError as err:
        raise RecordingDamaged(f"{p} cannot be read ({err.strerror}).") from err
    size, sha = (expect or {}).get("bytes"), (expect or {}).get("sha256")
    if expect is None:
        mismatch = None
    elif len(data) != size:
        mismatch = f"it has {len(data)} bytes, its writer recorded {size}"
    elif sha is not None and hashlib.sha256(data).hexdigest() != sha:
        mismatch = "its content differs from what its writer recorded (SHA-256)"
    else:
        mismatch = None
    try:
        with _rust_panics_quiet():
            if mismatch is not None:
                found = pl.read_parquet_schema(io.BytesIO(data))
            else:
                return pl.read_parquet(io.BytesIO(data))
    except (Exception, pl.exceptions.PanicException) as err:
        raise RecordingDamaged(
            f"{p} is not a readable parquet file (truncated or corrupt: {type(err).__name__})."
        ) from err
    absent = [c for c in required if c not in found]
    if absent:
        raise RecordingDamaged(f"{p} lacks the column(s) {', '.join(absent)}.")
    for name, dtype in (target or {}).items():
        if name in found and not _holds(found[name], dtype):
            raise RecordingDamaged(f"{p} has a column {name} of type {found[name]}, not {dtype}.")
    raise RecordingDamaged(f"{p} is damaged: {mismatch}.")


I64 = 2**63
I32 = 2**31


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What each value of a manifest may be, by kind: (test, what the error says it must be).
_KINDS: dict[str, tuple[Any, str]] = {
    "text": (lambda v: isinstance(v, str), "a string"),
    "ns": (lambda v: _int(v) and -I64 <= v < I64, "a 64-bit integer (ns)"),
    "id": (lambda v: _int(v) and 0 <= v < I32, "a non-negative 32-bit integer"),
    "count": (lambda v: _int(v) and 0 <= v < I64, "a non-negative integer"),
    "number": (lambda v: (_int(v) or isinstance(v, float)) and 0 <= v < I64
               and math.isfinite(v), "a finite non-negative number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
}
# The manifest keys analysis reads and their kinds; None is allowed wherever a key is optional.
MANIFEST_KINDS = {
    "format": "text", "host": "text", "clock": "dict", "started_ns": "ns", "ended_ns": "ns",
    "traced_ns": "ns",
    "duration_s": "number", "end_reason": "text", "sample_hz": "number", "channels": "dict",
    "ranks": "list", "probes": "list", "drops": "dict", "counts": "dict", "gpu": "dict",
    "pystacks": "dict", "host_context": "dict", "files": "dict",
}
RANK_KINDS = {"rank": "id", "local_rank": "id", "world_size": "id", "tgid": "id", "host": "text",
              "exe": "text", "env": "dict", "libraries": "list", "exited": "bool",
              "cuda_device": "id"}


def check_value(v, kind: str, where: str, key: str) -> None:
    """Nothing when `v` is None or of `kind` (`_KINDS`), else a RecordingDamaged naming
    `where` and `key`."""
    test, must = _KINDS[kind]
    if v is not None and not test(v):
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        raise RecordingDamaged(f"{where}: {key} is {shown}, not {must}.")


def check_manifest(manifest: Any, where: str | os.PathLike[str], required=()) -> dict[str, Any]:
    """`manifest` if it is a JSON object whose known keys have their kinds, else a
    RecordingInvalid naming the key: `MANIFEST_KINDS` at the top (None allowed), each
    `ranks[]` entry an object with `RANK_KINDS`, `clock.mono_to_wall_ns` a 64-bit integer (a
    boolean is not one), `drops` and `gpu.interval_s` numbers; the `required` keys present."""
    if not isinstance(manifest, dict):
        raise RecordingDamaged(f"{where} is not a JSON object.")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise RecordingDamaged(f"{where} lacks the key(s) {', '.join(missing)}.")
    for key, kind in MANIFEST_KINDS.items():
        check_value(manifest.get(key), kind, str(where), key)
    clock = manifest.get("clock")
    if clock is not None or "clock" in required:
        ns = clock.get("mono_to_wall_ns") if isinstance(clock, dict) else None
        if not _KINDS["ns"][0](ns):
            raise RecordingDamaged(f"{where} has no integer clock.mono_to_wall_ns.")
    for i, rank in enumerate(manifest.get("ranks") or []):
        if not isinstance(rank, dict):
            raise RecordingDamaged(f"{where}: ranks[{i}] is not an object.")
        for key, kind in RANK_KINDS.items():
            check_value(rank.get(key), kind, str(where), f"ranks[{i}].{key}")
    for name, v in (manifest.get("drops") or {}).items():
        check_value(v, "count", str(where), f"drops.{name}")
    for name, rec in (manifest.get(schema.FILES) or {}).items():
        if not isinstance(rec, dict) or rec.get("bytes") is None:
            raise RecordingDamaged(f"{where}: {schema.FILES}.{name} is not an object with bytes.")
        check_value(rec.get("bytes"), "count", str(where), f"{schema.FILES}.{name}.bytes")
        check_value(rec.get("sha256"), "text", str(where), f"{schema.FILES}.{name}.sha256")
    if isinstance(manifest.get("gpu"), dict):
        check_value(manifest["gpu"].get("interval_s"), "number", str(where), "gpu.interval_s")
    return manifest


def load_recording(directory: str | os.PathLike[str]) -> Recording:
    """Load and validate a recording directory.

    Checks, in order: the directory exists; manifest.json exists, is UTF-8 JSON, an object
    with `format == "argus.recording/1"` and the keys analysis needs, of their kinds
    (`check_manifest`); events.parquet reads and has the required columns; stacks.parquet
    reads when present (it may be absent when the CPU channel was off), and gpu.parquet
    likewise (absent without NVML: an empty frame), and host.parquet (absent when the host
    channel was off: an empty frame), and pystacks.parquet. Columns are coerced to
    `schema.EVENTS_SCHEMA` / `STACKS_SCHEMA` / `GPU_SCHEMA` / `HOST_SCHEMA` /
    `PYSTACKS_SCHEMA`; the required columns must have a value in every row.
    A directory without manifest.json whose parts/ holds the parts of a session that
    stopped early (SIGKILL, OOM) is read from them (`argus.recording.parts.load_parts`).
    """
    path = Path(directory)
    if not path.exists():
        raise RecordingInvalid(f"The recording directory {path} does not exist.")
    if not path.is_dir():
        raise RecordingInvalid(f"{path} is not a directory.")
    mpath = path / schema.MANIFEST
    if not mpath.exists():
        from argus.recording import parts  # parts builds on this module

        if parts.has_parts(path):  # a session that stopped before merging its parts
            return parts.load_parts(path)
        raise RecordingInvalid(f"{path} has no {schema.MANIFEST}, so it is not an argus recording.")
    manifest = read_json(mpath)
    if not isinstance(manifest, dict):
        raise RecordingDamaged(f"{mpath} is not a JSON object.")
    fmt = manifest.get("format")
    if fmt != schema.FORMAT:
        family = str(fmt).split("/")[0] if fmt else None
        if family == schema.FORMAT.split("/")[0]:
            raise RecordingInvalid(
                f"{path} is recording format {_short(fmt)}, this argus reads {schema.FORMAT}.",
                "Analyse it with the argus version that wrote it.",
            )
        raise RecordingInvalid(
            f"{mpath} does not declare format {schema.FORMAT} (found {_short(fmt)})."
        )
    check_manifest(manifest, mpath, REQUIRED_MANIFEST_KEYS)
    frames = {}
    for name, target, req in (
        (schema.EVENTS, schema.EVENTS_SCHEMA, REQUIRED_EVENT_COLUMNS),
        (schema.STACKS, schema.STACKS_SCHEMA, REQUIRED_STACK_COLUMNS),
        (schema.GPU, schema.GPU_SCHEMA, REQUIRED_GPU_COLUMNS),
        (schema.HOST, schema.HOST_SCHEMA, REQUIRED_HOST_COLUMNS),
        (schema.PYSTACKS, schema.PYSTACKS_SCHEMA, REQUIRED_PYSTACK_COLUMNS),
        (schema.KERNELS, schema.KERNELS_SCHEMA, REQUIRED_KERNEL_COLUMNS),
    ):
        p = path / name
        # events.parquet is required; the others are optional (channel off, no NVML, no
        # hang at the end): an empty frame
        if name != schema.EVENTS and not p.exists():
            frames[name] = pl.DataFrame(schema=target)
            continue
        df = read_parquet(p, (manifest.get(schema.FILES) or {}).get(name), target, req)
        absent = [c for c in req if c not in df.columns]
        if absent:
            raise RecordingDamaged(f"{p} lacks the column(s) {', '.join(absent)}.")
        frames[name] = coerce(df, target, str(p), req, schema.VALUE_RANGES.get(name),
                              schema.SAME_LENGTH.get(name, ()), strict=True)
    return Recording(manifest=manifest, events=frames[schema.EVENTS],
                     stacks=frames[schema.STACKS], path=path, gpu=frames[schema.GPU],
                     host_ctx=frames[schema.HOST], pystacks=frames[schema.PYSTACKS],
                     kernels=frames[schema.KERNELS])


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def read_json(p: Path) -> Any:
    """The JSON document in `p`, else a RecordingInvalid (unreadable, not UTF-8, not JSON)."""
    try:
        return json.loads(p.read_bytes().decode())
    except OSError as err:
        raise RecordingDamaged(f"{p} cannot be read ({err.strerror}).") from err
    except UnicodeDecodeError as err:
        raise RecordingDamaged(f"{p} is not UTF-8 text (byte {err.start} is invalid).") from err
    except json.JSONDecodeError as err:
        raise RecordingDamaged(f"{p} is not valid JSON ({err}).") from err
    except RecursionError as err:
        raise RecordingDamaged(f"{p} is nested too deeply to be an argus file.") from err
