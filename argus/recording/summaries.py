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
- `host-<ts_ns>.parquet`     the host context (`HOST_SUMMARY_SCHEMA`: `host.parquet`'s rows,
  already one row per (interval, kind, tgid, detail), with `rank` filled from the manifest
  and the recording's `host`); absent without the host channel.
- `meta.json`                `{"format": "argus.summaries/1", "steps": {method, period,
  comm}, "recordings": [...], "drops": {...}, "ranks": [...], "partition_s", "bytes"}`.

Times are host wall ns (`mono_to_wall`) BEFORE clock alignment: several nodes' summaries are
aligned again at diagnosis time, exactly as raw recordings are. Distributions are stored as
peaks: a list of `{ns, n}` (peak location and the number of values in its basin), see
`argus.analyze.summary.peaks`.
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

FORMAT = "argus.summaries/1"
DIR = "summaries"
META = "meta.json"
STACK_DICT = "stacks.parquet"
TAIL = "tail.parquet"
DEFAULT_PARTITION_S = 3600

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
             "count": pl.UInt32}  # fmt: skip
        )
    ),
    "stacks_dropped": pl.UInt32,  # samples beyond the top-K stacks of an interval
}

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
                   "count": pl.UInt32})  # fmt: skip
    ),
    "step_comm": pl.Utf8,  # the communicator whose collectives delimit its steps
    "p2p": pl.Boolean,  # it made send/recv calls (a pipeline job)
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

    @property
    def host(self) -> str:
        return str(self.manifest.get("host") or self.meta.get("host") or "?")


def _empty(s: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=s)


def has_summaries(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / DIR / META).exists()


def has_events(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / schema.EVENTS).exists()


def _write(path: Path, writer) -> int:
    tmp = path.parent / f".{path.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    os.chmod(tmp, 0o600)
    writer(tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path.stat().st_size


def write_summaries(
    directory: str | os.PathLike[str], summ: Summaries, partition_s: float = DEFAULT_PARTITION_S
) -> Path:
    """Write `summ` into `directory/summaries/` (0700 folder, 0600 files); returns the folder.

    Existing part files are replaced (a recording is summarised once, at its end)."""
    out = Path(directory) / DIR
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        for old in out.glob("*.parquet"):
            old.unlink()
        sizes: dict[str, int] = {}
        steps = summ.steps.select([pl.col(c).cast(t) for c, t in STEP_SCHEMA.items()])
        width = int(partition_s * 1e9)
        if steps.height:
            steps = steps.with_columns((pl.col("start_ns") // width * width).alias("_part"))
            for (part,), df in steps.sort(["_part", "step", "rank"]).group_by(
                "_part", maintain_order=True
            ):
                p = out / f"part-{int(part)}.parquet"
                part_df = df.drop("_part")
                sizes[p.name] = _write(p, part_df.write_parquet)
        else:
            p = out / "part-0.parquet"
            sizes[p.name] = _write(p, lambda t: _empty(STEP_SCHEMA).write_parquet(t))
        sd = summ.stack_dict.select([pl.col(c).cast(t) for c, t in STACK_DICT_SCHEMA.items()])
        sizes[STACK_DICT] = _write(out / STACK_DICT, lambda t: sd.write_parquet(t))
        # columns a writer does not know (an older caller) are written as nulls
        tl = summ.tail.select([pl.col(c).cast(t) if c in summ.tail.columns
                               else pl.lit(None, t).alias(c) for c, t in TAIL_SCHEMA.items()])
        sizes[TAIL] = _write(out / TAIL, lambda t: tl.write_parquet(t))
        if summ.gpu.height:
            g0 = int(summ.gpu["ts_ns"].min())
            p = out / f"gpu-{g0}.parquet"
            sizes[p.name] = _write(p, lambda t: summ.gpu.write_parquet(t))
        if summ.host_ctx.height:
            hc = summ.host_ctx.select([pl.col(c).cast(t) for c, t in HOST_SUMMARY_SCHEMA.items()])
            p = out / f"host-{int(hc['ts_ns'].min())}.parquet"
            sizes[p.name] = _write(p, lambda t: hc.write_parquet(t))
        meta = dict(summ.meta, format=FORMAT, partition_s=partition_s)
        meta["bytes"] = sizes
        _write(out / META, lambda t: t.write_text(json.dumps(meta, indent=1, default=str)))
    except OSError as err:
        raise OutputNotWritable(f"Cannot write the summaries in {out}: {err}.") from err
    return out


def summary_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes of everything under `directory/summaries/` (meta, parts, dictionary, tail, gpu)."""
    return sum(f.stat().st_size for f in (Path(directory) / DIR).iterdir() if f.is_file())


def load_summaries(directory: str | os.PathLike[str]) -> Summaries:
    """Read `directory/summaries/` (and `directory/manifest.json` when present)."""
    path = Path(directory)
    sdir = path / DIR
    mpath = sdir / META
    if not mpath.exists():
        raise RecordingInvalid(f"{path} has no {DIR}/{META}, so it holds no argus summaries.")
    try:
        meta = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordingInvalid(f"{mpath} is not valid JSON ({err}).") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RecordingInvalid(f"{mpath} does not declare format {FORMAT}.")
    manifest: dict[str, Any] = {}
    if (path / schema.MANIFEST).exists():
        try:
            manifest = json.loads((path / schema.MANIFEST).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RecordingInvalid(f"{path / schema.MANIFEST} is not valid JSON ({err}).") from err
    manifest = manifest or dict(meta.get("manifest") or {})

    def read(files: list[Path], target: dict[str, pl.DataType]) -> pl.DataFrame:
        frames = []
        for f in files:
            try:
                frames.append(pl.read_parquet(f))
            except Exception as err:  # truncated / corrupt
                raise RecordingInvalid(
                    f"{f} is not a readable parquet file ({type(err).__name__})."
                ) from err
        if not frames:
            return _empty(target)
        df = pl.concat(frames, how="vertical_relaxed")
        return df.select([pl.col(c).cast(t) if c in df.columns else pl.lit(None, t).alias(c)
                          for c, t in target.items()])  # fmt: skip

    steps = read(sorted(sdir.glob("part-*.parquet")), STEP_SCHEMA)
    sd = read([sdir / STACK_DICT] if (sdir / STACK_DICT).exists() else [], STACK_DICT_SCHEMA)
    tail = read([sdir / TAIL] if (sdir / TAIL).exists() else [], TAIL_SCHEMA)
    gfiles = sorted(sdir.glob("gpu-*.parquet"))
    gpu = read(gfiles, schema.GPU_SCHEMA) if gfiles else schema.empty_gpu()
    hc = read(sorted(sdir.glob("host-*.parquet")), HOST_SUMMARY_SCHEMA)
    return Summaries(meta=meta, steps=steps, stack_dict=sd, tail=tail, manifest=manifest,
                     gpu=gpu, path=path, host_ctx=hc)  # fmt: skip
