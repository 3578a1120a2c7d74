"""Per-rank-per-step summaries (`argus.summaries/1`): what the diagnosis needs, kept forever.

A recording directory may hold, next to (or, with `argus attach --summaries-only`, instead
of) `events.parquet` / `stacks.parquet` / `gpu.parquet`, a folder `summaries/`:

- `part-<start_ns>.parquet`  one row per (rank, step) (see `STEP_SCHEMA`); partitioned by
  time: each part holds the steps that started in one `partition_s` window (default one
  hour), `<start_ns>` being the window's start (host wall ns). Files are 0600.
- `stacks.parquet`           the stack dictionary of the recording (`STACK_DICT_SCHEMA`):
  `stack_id` -> functions/modules. Steps and the tail refer to stacks by id only.
- `tail.parquet`             one row per rank (`TAIL_SCHEMA`): what the hang detector needs
  at the end of a recording (calls in flight, last aligned seq per communicator with the
  ops of the last few seqs, exit, latest CPU stacks), and per rank what the whole recording
  says about it: the communicator that delimits its steps and whether it makes send/recv
  (pipeline stages), its own thread names that the host context names as competitors.
- `gpu-<start_ns>.parquet`   the NVML samples (`schema.GPU_SCHEMA`; already one row per
  device per second, i.e. a summary); absent without NVML.
- `kernels.parquet`          GPU kernel time (`KERNEL_SUMMARY_SCHEMA`: per (rank, step, kernel
  family) its count, device time and duration peaks, argus.analyze.kernels); absent without
  the GPU agent's records.
- `host-<ts_ns>.parquet`     the host context (`HOST_SUMMARY_SCHEMA`: `host.parquet`'s rows,
  already one row per (interval, kind, tgid, detail), with `rank` filled from the manifest
  and the recording's `host`); absent without the host channel.
- `meta.json`                `{"format": "argus.summaries/1", "steps": {method, period,
  comm}, "recordings": [...], "drops": {...}, "ranks": [...], "partition_s", "bytes"}`.

Times are host wall ns (`mono_to_wall`) BEFORE clock alignment: several nodes' summaries are
aligned again at diagnosis time, exactly as raw recordings are. Distributions are stored as
peaks: a list of `{ns, n}` (peak location and the number of values in its basin), see
`argus.analyze.compress.peaks`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from argus.errors import OutputNotWritable, RecordingDamaged, RecordingInvalid
from argus.recording import schema
from argus.recording.io import (
    REQUIRED_GPU_COLUMNS,
    REQUIRED_HOST_COLUMNS,
    check_manifest,
    check_value,
    coerce,
    file_digest,
    parquet_bytes,
    read_json,
    read_parquet,
)

FORMAT = "argus.summaries/1"
DIR = "summaries"
META = "meta.json"
STACK_DICT = "stacks.parquet"
TAIL = "tail.parquet"
DEFAULT_PARTITION_S = 3600
# partition_s bounds: a window of whole nanoseconds, and one whose ns fit in 64 bits.
MIN_PARTITION_S = 0.001
MAX_PARTITION_S = 10 * 365 * 24 * 3600

PEAKS = pl.List(pl.Struct({"ns": pl.Float32, "n": pl.UInt32}))

STEP_SCHEMA: dict[str, pl.DataType] = {
    "host": pl.Utf8,
    "rank": pl.Int32,
    "tgid": pl.Int32,
    "step": pl.Int64,
    "start_ns": pl.Int64,  # step boundaries, host wall ns (unaligned)
    "end_ns": pl.Int64,
    "step_time_ns": pl.Int64,
    "first_coll_ns": pl.Int64,
    "last_coll_ns": pl.Int64,
    # step metrics (argus.analyze.steps.step_metrics), exact
    "compute_wait_ns": pl.Int64,
    "sync_wait_ns": pl.Int64,
    "coll_wait_ns": pl.Int64,
    "p2p_wait_ns": pl.Int64,  # null in summaries written before it existed
    "lateness_ns": pl.Int64,
    "host_gap_ns": pl.Int64,
    # per-channel / per-kind call counts in the step
    "n_cuda": pl.UInt32,
    "n_nccl": pl.UInt32,
    "n_torch": pl.UInt32,
    "n_launch": pl.UInt32,
    "n_wait": pl.UInt32,
    # distributions as peaks
    "launch_gap": PEAKS,  # gaps between consecutive kernel launches of the rank
    "wait_dur": PEAKS,  # sync / blocking read-back durations
    "colls": pl.List(
        pl.Struct(
            {
                "comm": pl.Utf8,
                "op": pl.Utf8,
                "n": pl.UInt32,
                "bytes": pl.Int64,
                "dur": PEAKS,  # time inside the call
                "arrival": PEAKS,  # entry minus the median entry of the same collective (ns)
            }
        )
    ),
    # CPU samples of the sampling intervals whose middle falls in this step (or, before the
    # first / after the last step, the nearest step): interval start relative to start_ns
    "stacks": pl.List(
        pl.Struct(
            {"t_off_ns": pl.Int64, "interval_ns": pl.Int64, "stack_id": pl.Int64,
             "count": pl.UInt32}
        )
    ),
    "stacks_dropped": pl.UInt32,  # samples beyond the top-K stacks of an interval
}

# GPU kernel time (argus.analyze.kernels), one row per (rank, step, kernel family) with
# device time: class (compute | coll | copy), family, how many ran in the step, their device
# time (exact) and its distribution as peaks. A file of its own (absent without the GPU
# agent), so that summaries of jobs without it carry no empty columns.
KERNEL_SUMMARY_SCHEMA: dict[str, pl.DataType] = {
    "host": pl.Utf8,
    "rank": pl.Int32,
    "step": pl.Int64,
    "cls": pl.Utf8,
    "family": pl.Utf8,
    "n": pl.UInt32,
    "ns": pl.Int64,
    "dur": PEAKS,
}
KERNEL_SUMMARY = "kernels.parquet"
KERNEL_SUMMARY_REQUIRED = ("rank", "step", "cls", "family", "ns")

STACK_DICT_SCHEMA: dict[str, pl.DataType] = {
    "stack_id": pl.Int64,
    "functions": pl.List(pl.Utf8),
    "modules": pl.List(pl.Utf8),
}

TAIL_SCHEMA: dict[str, pl.DataType] = {
    "host": pl.Utf8,
    "rank": pl.Int32,
    "tgid": pl.Int32,
    "exited": pl.Boolean,
    "last_call": pl.Utf8,  # the last call entered (not the exit event)
    "last_call_ns": pl.Int64,
    "in_flight": pl.List(pl.Struct({"name": pl.Utf8, "kind": pl.Utf8, "t_ns": pl.Int64})),
    "comms": pl.List(
        pl.Struct(
            {"comm": pl.Utf8, "gseq": pl.Int64, "op": pl.Utf8, "bytes": pl.Int64}
        )  # the last TAIL_SEQS collectives of the rank per comm
    ),
    "latest_stacks": pl.List(
        pl.Struct({"ts_ns": pl.Int64, "interval_ns": pl.Int64, "stack_id": pl.Int64,
                   "count": pl.UInt32})
    ),
    # where a hung rank is, as `argus.analyze.hang` reads it from a raw recording: JSON
    # {"blocked": [...], "python": [...]}: the off-CPU stacks of its threads blocked at the
    # latest host interval (stacks.parquet rows: ts_ns, tid, thread, blocked_ns, functions,
    # modules) and its threads' Python stacks of the end-of-session dump (pystacks.parquet
    # rows but rank/tgid); null when it has neither. Text, not nested columns: those cost
    # ~5 KB of Parquet metadata per file even when empty.
    "hang_context": pl.Utf8,
    "step_comm": pl.Utf8,  # the communicator whose collectives delimit its steps
    "p2p": pl.Boolean,  # it made send/recv calls (a pipeline job)
    "stage": pl.Utf8,  # what its pipeline stage's ranks share (`pipeline.stage_keys`)
    # its own threads named as cpu_contention competitors in the host context (the host
    # detector leaves a rank's own threads out): only those, not every thread name
    "threads": pl.List(pl.Utf8),
}

HOST_SUMMARY_SCHEMA: dict[str, pl.DataType] = {**schema.HOST_SCHEMA, "host": pl.Utf8}


@dataclass
class Summaries:
    """The summaries of one recording (one node): steps, stack dictionary, tail, gpu, meta."""

    meta: dict[str, Any]
    steps: pl.DataFrame
    stack_dict: pl.DataFrame
    tail: pl.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)
    gpu: pl.DataFrame = field(default_factory=schema.empty_gpu)
    path: Path | None = None
    host_ctx: pl.DataFrame = field(default_factory=lambda: _empty(HOST_SUMMARY_SCHEMA))
    kernels: pl.DataFrame = field(default_factory=lambda: _empty(KERNEL_SUMMARY_SCHEMA))

    @property
    def host(self) -> str:
        return str(self.manifest.get("host") or self.meta.get("host") or "?")


def _empty(s: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=s)


def has_summaries(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / DIR / META).exists()


def has_events(directory: str | os.PathLike[str]) -> bool:
    """A raw recording: its events.parquet, or the parts of a session that stopped before
    merging them (argus.recording.parts)."""
    d = Path(directory)
    if (d / schema.EVENTS).exists():
        return True
    from argus.recording.parts import has_parts  # parts builds on io, which imports this

    return has_parts(d)


def _stage(path: Path, data: bytes, staged: list[tuple[Path, Path]], sha: dict[str, str]) -> int:
    """Write `data` to `.<name>.tmp` (0600) next to `path`, append (tmp, path) to `staged`,
    record its SHA-256 in `sha`; returns its size. A failure (an OSError: disk full, file too
    large) removes the temporary file. Written by Python, not polars, so that the error says
    what happened."""
    tmp = path.parent / f".{path.name}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o600)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    staged.append((tmp, path))
    sha[path.name] = file_digest(data)["sha256"]
    return len(data)


def write_summaries(
    directory: str | os.PathLike[str], summ: Summaries, partition_s: float = DEFAULT_PARTITION_S
) -> Path:
    """Write `summ` into `directory/summaries/` (0700 folder, 0600 files); returns the folder.

    meta.json records each parquet file's size (`bytes`) and SHA-256 (`sha256`), which
    `load_summaries` checks before decoding. Existing part files are replaced (a recording
    is summarised once, at its end). Nothing
    changes unless everything was written: each file goes to a temporary `.<name>.tmp`
    first; only when all are written are they renamed into place (meta.json last) and the
    part files of an earlier write that this one lacks removed. A failure (disk full, a file
    too large) removes the temporary files, and the folder when this call created it, and
    raises OutputNotWritable."""
    out = Path(directory) / DIR
    created = not out.exists()
    staged: list[tuple[Path, Path]] = []
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        sizes: dict[str, int] = {}
        sha: dict[str, str] = {}
        steps = summ.steps.select([pl.col(c).cast(t) for c, t in STEP_SCHEMA.items()])
        width = int(partition_s * 1e9)
        if steps.height:
            steps = steps.with_columns((pl.col("start_ns") // width * width).alias("_part"))
            for (part,), df in steps.sort(["_part", "step", "rank"]).group_by(
                "_part", maintain_order=True
            ):
                p = out / f"part-{int(part)}.parquet"
                part_df = df.drop("_part")
                sizes[p.name] = _stage(p, parquet_bytes(part_df), staged, sha)
        else:
            p = out / "part-0.parquet"
            sizes[p.name] = _stage(p, parquet_bytes(_empty(STEP_SCHEMA)), staged, sha)
        sd = summ.stack_dict.select([pl.col(c).cast(t) for c, t in STACK_DICT_SCHEMA.items()])
        sizes[STACK_DICT] = _stage(out / STACK_DICT, parquet_bytes(sd), staged, sha)
        # columns a writer does not know (an older caller) are written as nulls
        tl = summ.tail.select([pl.col(c).cast(t) if c in summ.tail.columns
                               else pl.lit(None, t).alias(c) for c, t in TAIL_SCHEMA.items()])
        sizes[TAIL] = _stage(out / TAIL, parquet_bytes(tl), staged, sha)
        if summ.gpu.height:
            g0 = int(summ.gpu["ts_ns"].min())
            p = out / f"gpu-{g0}.parquet"
            sizes[p.name] = _stage(p, parquet_bytes(summ.gpu), staged, sha)
        if summ.kernels.height:
            kn = summ.kernels.select([pl.col(c).cast(t) for c, t in
                                      KERNEL_SUMMARY_SCHEMA.items()]).sort("step", "rank")
            sizes[KERNEL_SUMMARY] = _stage(out / KERNEL_SUMMARY, parquet_bytes(kn), staged, sha)
        if summ.host_ctx.height:
            hc = summ.host_ctx.select([pl.col(c).cast(t) for c, t in HOST_SUMMARY_SCHEMA.items()])
            p = out / f"host-{int(hc['ts_ns'].min())}.parquet"
            sizes[p.name] = _stage(p, parquet_bytes(hc), staged, sha)
        meta = dict(summ.meta, format=FORMAT, partition_s=partition_s)
        meta["bytes"] = sizes
        meta["sha256"] = dict(sha)
        _stage(out / META, json.dumps(meta, indent=1, default=str).encode(), staged, sha)
        for tmp, target in staged[:-1]:
            os.replace(tmp, target)
        for old in out.glob("*.parquet"):
            if old.name not in sizes:
                old.unlink()
        os.replace(*staged[-1])
    except OSError as err:
        for tmp, _target in staged:
            tmp.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise OutputNotWritable(
            f"Cannot write the summaries in {out}: {err.strerror or err}."
        ) from err
    return out


def summary_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes of everything under `directory/summaries/` (meta, parts, dictionary, tail, gpu)."""
    return sum(f.stat().st_size for f in (Path(directory) / DIR).iterdir() if f.is_file())


# Columns a summaries file must have (with a value in every row); the others may be absent.
STEP_REQUIRED = ("host", "rank", "step", "start_ns", "end_ns", "step_time_ns")
STACK_DICT_REQUIRED = ("stack_id", "functions")
TAIL_REQUIRED = ("host", "rank")
HOST_SUMMARY_REQUIRED = ("host", *REQUIRED_HOST_COLUMNS)
# meta.json keys the analysis reads and their kinds (`argus.recording.io.check_manifest`'s).
META_KINDS = {"host": "text", "steps": "dict", "ends_ns": "dict", "recordings": "list",
              "manifest": "dict", "extra_manifests": "list", "partition_s": "number",
              "bytes": "dict", "sha256": "dict"}


def _check_meta(meta: Any, mpath: Path) -> dict[str, Any]:
    """`meta` if it is an `argus.summaries/1` object whose keys have their kinds: META_KINDS,
    `ends_ns` host -> ns, `recordings[]` objects with a number `duration_s`, `manifest` and
    `extra_manifests[]` manifests (`check_manifest`), `steps` with text `method` / `comm`."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RecordingInvalid(f"{mpath} does not declare format {FORMAT}.")
    for key, kind in META_KINDS.items():
        check_value(meta.get(key), kind, str(mpath), key)
    for h, e in (meta.get("ends_ns") or {}).items():
        check_value(e, "ns", str(mpath), f"ends_ns.{h}")
    for name, n in (meta.get("bytes") or {}).items():
        check_value(n, "count", str(mpath), f"bytes.{name}")
    for name, h in (meta.get("sha256") or {}).items():
        check_value(h, "text", str(mpath), f"sha256.{name}")
    for i, r in enumerate(meta.get("recordings") or []):
        if not isinstance(r, dict):
            raise RecordingDamaged(f"{mpath}: recordings[{i}] is not an object.")
        check_value(r.get("duration_s"), "number", str(mpath), f"recordings[{i}].duration_s")
    if meta.get("manifest") is not None:
        check_manifest(meta["manifest"], f"{mpath} (manifest)")
    for i, m in enumerate(meta.get("extra_manifests") or []):
        check_manifest(m, f"{mpath} (extra_manifests[{i}])")
    for key in ("method", "comm"):
        check_value((meta.get("steps") or {}).get(key), "text", str(mpath), f"steps.{key}")
    check_value((meta.get("steps") or {}).get("period"), "number", str(mpath), "steps.period")
    return meta


def load_summaries(directory: str | os.PathLike[str]) -> Summaries:
    """Read and validate `directory/summaries/` (and `directory/manifest.json` when present).

    Checks: meta.json is UTF-8 JSON of format `argus.summaries/1` with keys of their kinds
    (`_check_meta`); the manifest (the directory's, else meta's) passes `check_manifest`;
    every parquet file reads, has its required columns (`*_REQUIRED`, a value in every row)
    and columns that hold their schema's types (`io.coerce`); a RecordingInvalid naming the
    file and the defect otherwise."""
    path = Path(directory)
    sdir = path / DIR
    mpath = sdir / META
    if not mpath.exists():
        raise RecordingInvalid(f"{path} has no {DIR}/{META}, so it holds no argus summaries.")
    meta = _check_meta(read_json(mpath), mpath)
    manifest: dict[str, Any] = {}
    if (path / schema.MANIFEST).exists():
        manifest = check_manifest(read_json(path / schema.MANIFEST), path / schema.MANIFEST)
    manifest = manifest or dict(meta.get("manifest") or {})

    sizes, shas = meta.get("bytes") or {}, meta.get("sha256") or {}

    def read(files: list[Path], target: dict[str, pl.DataType], required=(), ranges=None):
        frames = []
        for f in files:
            size = sizes.get(f.name)  # what the writer recorded (older ones: the size only)
            expect = None if size is None else {"bytes": size, "sha256": shas.get(f.name)}
            df = read_parquet(f, expect, target, required)
            absent = [c for c in required if c not in df.columns]
            if absent:
                raise RecordingDamaged(f"{f} lacks the column(s) {', '.join(absent)}.")
            frames.append(coerce(df, target, str(f), required, ranges, strict=True))
        if not frames:
            return _empty(target)
        return pl.concat(frames, how="vertical")

    steps = read(sorted(sdir.glob("part-*.parquet")), STEP_SCHEMA, STEP_REQUIRED)
    sd = read([sdir / STACK_DICT] if (sdir / STACK_DICT).exists() else [], STACK_DICT_SCHEMA,
              STACK_DICT_REQUIRED)
    tail = read([sdir / TAIL] if (sdir / TAIL).exists() else [], TAIL_SCHEMA, TAIL_REQUIRED)
    gfiles = sorted(sdir.glob("gpu-*.parquet"))
    gpu = read(gfiles, schema.GPU_SCHEMA, REQUIRED_GPU_COLUMNS)
    hc = read(sorted(sdir.glob("host-*.parquet")), HOST_SUMMARY_SCHEMA, HOST_SUMMARY_REQUIRED,
              schema.VALUE_RANGES.get(schema.HOST))
    kn = read([sdir / KERNEL_SUMMARY] if (sdir / KERNEL_SUMMARY).exists() else [],
              KERNEL_SUMMARY_SCHEMA, KERNEL_SUMMARY_REQUIRED)
    return Summaries(meta=meta, steps=steps, stack_dict=sd, tail=tail, manifest=manifest,
                     gpu=gpu, path=path, host_ctx=hc, kernels=kn)
