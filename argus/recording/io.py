"""Read and write a recording directory (`argus.recording/1`, see `schema`).

`write_recording` creates the directory 0700 and every file 0600 (recordings hold command
lines and stacks of production jobs). `load_recording` validates the format and version, the
manifest keys and the parquet columns, coerces the columns to the schema (missing optional
columns become nulls) and raises `RecordingInvalid` with one sentence on any defect.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from argus.errors import OutputNotWritable, RecordingInvalid
from argus.recording import schema

# Columns an events / stacks file must have; the others may be absent (filled with nulls).
REQUIRED_EVENT_COLUMNS = ("ts_ns", "tgid", "channel", "name")
REQUIRED_STACK_COLUMNS = ("ts_ns", "tgid", "count", "functions")
REQUIRED_GPU_COLUMNS = ("ts_ns", "device")
REQUIRED_HOST_COLUMNS = ("ts_ns", "kind", "count")
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
    host_ctx: pl.DataFrame = field(default_factory=schema.empty_host)  # host.parquet; empty if absent
    # pystacks.parquet (Python stacks dumped at the end of a hung session); empty if absent
    pystacks: pl.DataFrame = field(default_factory=schema.empty_pystacks)

    @property
    def host(self) -> str:
        return str(self.manifest.get("host") or "?")


def coerce(df: pl.DataFrame, target: dict[str, pl.DataType], what: str) -> pl.DataFrame:
    """Return `df` with exactly the columns of `target`, in order, cast to its types.

    Missing columns are added as nulls; extra columns are dropped; a column that cannot be
    cast raises RecordingInvalid naming it.
    """
    cols = []
    for name, dtype in target.items():
        if name in df.columns:
            col = pl.col(name)
            src = df.schema[name]
            if src != dtype:
                if dtype == pl.Categorical and src != pl.Utf8:
                    col = col.cast(pl.Utf8)
                col = col.cast(dtype, strict=False) if dtype != pl.Categorical else col.cast(dtype)
            cols.append(col.alias(name))
        else:
            cols.append(pl.lit(None, dtype=dtype).alias(name))
    try:
        out = df.select(cols) if df.width else pl.DataFrame(schema=target)
        if out.height == 0 and df.height:
            raise RecordingInvalid(f"{what} lost its rows while coercing the columns.")
        return out
    except pl.exceptions.PolarsError as err:
        raise RecordingInvalid(f"{what} has a column of the wrong type ({err}).") from err


def write_recording(
    directory: str | os.PathLike[str],
    manifest: dict[str, Any],
    events: pl.DataFrame,
    stacks: pl.DataFrame | None = None,
    gpu: pl.DataFrame | None = None,
    host: pl.DataFrame | None = None,
    pystacks: pl.DataFrame | None = None,
) -> Path:
    """Write `manifest.json`, `events.parquet`, `stacks.parquet` (and `gpu.parquet` when
    `gpu` is given, `host.parquet` when `host` is given) into `directory`.

    The directory is created with mode 0700 and the files 0600; frames are coerced to the
    schema first, so what is written always reads back. Returns the directory path.
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
    try:
        for name, writer in (
            (schema.EVENTS, lambda p: ev.write_parquet(p)),
            (schema.STACKS, lambda p: st.write_parquet(p)),
            *([(schema.GPU, lambda p: gp.write_parquet(p))] if gp is not None else []),
            *([(schema.HOST, lambda p: hc.write_parquet(p))] if hc is not None else []),
            *([(schema.PYSTACKS, lambda p: ps.write_parquet(p))] if ps is not None else []),
            (schema.MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2, default=str))),
        ):
            target = path / name
            tmp = path / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            os.chmod(tmp, 0o600)
            writer(tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
    except OSError as err:
        raise OutputNotWritable(f"Cannot write the recording in {path}: {err}.") from err
    return path


def _read_parquet(p: Path, what: str) -> pl.DataFrame:
    try:
        return pl.read_parquet(p)
    except FileNotFoundError as err:
        raise RecordingInvalid(f"The recording has no {p.name} ({p}).") from err
    except Exception as err:  # polars raises several types for truncated files
        raise RecordingInvalid(
            f"{p} is not a readable parquet file (truncated or corrupt: {type(err).__name__})."
        ) from err


def load_recording(directory: str | os.PathLike[str]) -> Recording:
    """Load and validate a recording directory.

    Checks, in order: the directory exists; manifest.json exists, is a JSON object with
    `format == "argus.recording/1"` and the keys analysis needs; events.parquet reads and has
    the required columns; stacks.parquet reads when present (it may be absent when the CPU
    channel was off), and gpu.parquet likewise (absent without NVML: an empty frame), and
    host.parquet (absent when the host channel was off: an empty frame).
    Columns are coerced to `schema.EVENTS_SCHEMA` / `STACKS_SCHEMA` / `GPU_SCHEMA`.
    """
    path = Path(directory)
    if not path.exists():
        raise RecordingInvalid(f"The recording directory {path} does not exist.")
    if not path.is_dir():
        raise RecordingInvalid(f"{path} is not a directory.")
    mpath = path / schema.MANIFEST
    if not mpath.exists():
        raise RecordingInvalid(f"{path} has no {schema.MANIFEST}, so it is not an argus recording.")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordingInvalid(f"{mpath} is not valid JSON ({err}).") from err
    if not isinstance(manifest, dict):
        raise RecordingInvalid(f"{mpath} is not a JSON object.")
    fmt = manifest.get("format")
    if fmt != schema.FORMAT:
        family = str(fmt).split("/")[0] if fmt else None
        if family == schema.FORMAT.split("/")[0]:
            raise RecordingInvalid(
                f"{path} is recording format {fmt}, this argus reads {schema.FORMAT}.",
                "Analyse it with the argus version that wrote it.",
            )
        raise RecordingInvalid(f"{mpath} does not declare format {schema.FORMAT} (found {fmt!r}).")
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise RecordingInvalid(f"{mpath} lacks the key(s) {', '.join(missing)}.")
    clock = manifest.get("clock")
    if not isinstance(clock, dict) or not isinstance(clock.get("mono_to_wall_ns"), int):
        raise RecordingInvalid(f"{mpath} has no integer clock.mono_to_wall_ns.")
    events = _read_parquet(path / schema.EVENTS, "events")
    absent = [c for c in REQUIRED_EVENT_COLUMNS if c not in events.columns]
    if absent:
        raise RecordingInvalid(f"{path / schema.EVENTS} lacks the column(s) {', '.join(absent)}.")
    events = coerce(events, schema.EVENTS_SCHEMA, str(path / schema.EVENTS))
    spath = path / schema.STACKS
    if spath.exists():
        stacks = _read_parquet(spath, "stacks")
        absent = [c for c in REQUIRED_STACK_COLUMNS if c not in stacks.columns]
        if absent:
            raise RecordingInvalid(f"{spath} lacks the column(s) {', '.join(absent)}.")
        stacks = coerce(stacks, schema.STACKS_SCHEMA, str(spath))
    else:
        stacks = schema.empty_stacks()
    gpath = path / schema.GPU
    if gpath.exists():  # optional: absent when the GPU channel was off or NVML absent
        gpu = _read_parquet(gpath, "gpu")
        absent = [c for c in REQUIRED_GPU_COLUMNS if c not in gpu.columns]
        if absent:
            raise RecordingInvalid(f"{gpath} lacks the column(s) {', '.join(absent)}.")
        gpu = coerce(gpu, schema.GPU_SCHEMA, str(gpath))
    else:
        gpu = schema.empty_gpu()
    hpath = path / schema.HOST
    if hpath.exists():  # optional: absent when the host channel was off
        host = _read_parquet(hpath, "host")
        absent = [c for c in REQUIRED_HOST_COLUMNS if c not in host.columns]
        if absent:
            raise RecordingInvalid(f"{hpath} lacks the column(s) {', '.join(absent)}.")
        host = coerce(host, schema.HOST_SCHEMA, str(hpath))
    else:
        host = schema.empty_host()
    ppath = path / schema.PYSTACKS
    if ppath.exists():  # optional: only a session that ended with ranks blocked has it
        pystacks = coerce(_read_parquet(ppath, "pystacks"), schema.PYSTACKS_SCHEMA, str(ppath))
    else:
        pystacks = schema.empty_pystacks()
    return Recording(manifest=manifest, events=events, stacks=stacks, path=path, gpu=gpu,
                     host_ctx=host, pystacks=pystacks)  # fmt: skip
