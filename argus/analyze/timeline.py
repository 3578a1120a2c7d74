"""Events of one or several recordings as one long frame on a common clock.

Columns: every `schema.EVENTS_SCHEMA` column (names as strings), plus `host`, `t_ns` (wall ns,
via `clock.mono_to_wall`, plus the host's alignment offset), `end_ns` (`t_ns + dur_ns`, null
while in flight) and `kind`: `collective`, `readback` (blocking device-to-host copy: the host
waits for its own GPU work), `sync` (stream/device/event synchronize: waits for everything
enqueued, collectives included), `launch`, `ddp_bucket` (DDP's reducer launching a gradient
bucket's allreduce), `exit`, or `other`.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from argus.recording import schema
from argus.recording.clock import mono_to_wall
from argus.recording.io import Recording

SYNC_NAMES = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cuStreamSynchronize",
    "cuCtxSynchronize",
    "cuEventSynchronize",
)
READBACK_NAMES = ("cudaMemcpy", "cuMemcpyDtoH", "cuMemcpyDtoH_v2", "cudaMemcpyAsync")
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cuGraphLaunch")
BUCKET_NAMES = ("c10d::Reducer::all_reduce_bucket",)
# Recognised collective words in c10d method names (`c10d::ProcessGroupGloo::allreduce`).
TORCH_OPS = (
    "allreduce",
    "allgather",
    "reduce_scatter",
    "reducescatter",
    "broadcast",
    "alltoall",
    "barrier",
    "reduce",
    "send",
    "recv",
    "gather",
    "scatter",
)
MEMCPY_D2H = 2

_STR_COLS = ("channel", "name", "op", "redop", "dtype")


def _torch_op(name: str | None) -> str | None:
    if not name:
        return None
    tail = name.rsplit("::", 1)[-1].strip("_").lower()
    for op in TORCH_OPS:
        if tail.startswith(op) or tail.endswith(op):
            return "reducescatter" if op == "reduce_scatter" else op
    return None


def recording_end_ns(rec: Recording) -> int | None:
    """Wall ns at which the recording ended (manifest `ended_ns`, else the last event)."""
    ended = rec.manifest.get("ended_ns")
    if isinstance(ended, int):
        return int(mono_to_wall(ended, rec.manifest))
    if rec.events.height:
        last = (
            rec.events.select(
                pl.max_horizontal(pl.col("ts_ns"), pl.col("ts_ns") + pl.col("dur_ns").fill_null(0))
            )
            .max()
            .item()
        )
        return int(mono_to_wall(int(last), rec.manifest))
    return None


def build_timeline(
    recordings: Sequence[Recording], offsets_ns: dict[str, int] | None = None
) -> pl.DataFrame:
    """Concatenate the events of all recordings, converted to wall time, sorted by `t_ns`.

    `offsets_ns` (from `align.estimate_offsets`) is added per host to correct clock skew.
    Events without a rank get the rank the manifest gives their tgid, else stay null.
    """
    frames = []
    offsets_ns = offsets_ns or {}
    for rec in recordings:
        ev = rec.events
        if ev.height == 0:
            continue
        tgid_rank = {
            int(r["tgid"]): int(r["rank"])
            for r in rec.manifest.get("ranks") or []
            if isinstance(r, dict) and r.get("tgid") is not None and r.get("rank") is not None
        }
        ev = ev.with_columns([pl.col(c).cast(pl.Utf8) for c in _STR_COLS])
        if tgid_rank:
            ev = ev.with_columns(
                pl.coalesce(
                    pl.col("rank"),
                    pl.col("tgid").replace_strict(tgid_rank, default=None, return_dtype=pl.Int32),
                ).alias("rank")
            )
        off = offsets_ns.get(rec.host, 0)
        ev = ev.with_columns(
            pl.lit(rec.host, dtype=pl.Utf8).alias("host"),
            (mono_to_wall(pl.col("ts_ns"), rec.manifest) + off).alias("t_ns"),
        )
        frames.append(ev)
    if not frames:
        base = schema.empty_events().with_columns([pl.col(c).cast(pl.Utf8) for c in _STR_COLS])
        frames = [
            base.with_columns(pl.lit(None, pl.Utf8).alias("host"), pl.col("ts_ns").alias("t_ns"))
        ]
    tl = pl.concat(frames, how="vertical_relaxed")
    tl = tl.with_columns(
        pl.col("in_flight").fill_null(False),
        (pl.col("t_ns") + pl.col("dur_ns")).alias("end_ns"),
        pl.col("op").fill_null(
            pl.when(pl.col("channel") == "torch")
            .then(pl.col("name").map_elements(_torch_op, return_dtype=pl.Utf8))
            .otherwise(None)
        ),
    )
    is_coll = pl.col("op").is_not_null() & pl.col("channel").is_in(["nccl", "torch"])
    kind = (
        pl.when(is_coll)
        .then(pl.lit("collective"))
        .when(pl.col("name").is_in(SYNC_NAMES))
        .then(pl.lit("sync"))
        .when(pl.col("name").is_in(READBACK_NAMES) & (pl.col("memcpy_kind") == MEMCPY_D2H))
        .then(pl.lit("readback"))
        .when(pl.col("name").is_in(LAUNCH_NAMES))
        .then(pl.lit("launch"))
        .when(pl.col("name").is_in(BUCKET_NAMES))
        .then(pl.lit("ddp_bucket"))
        .when((pl.col("channel") == "proc") & (pl.col("name") == "exit"))
        .then(pl.lit("exit"))
        .otherwise(pl.lit("other"))
    )
    return tl.with_columns(kind.alias("kind")).sort("t_ns", maintain_order=True)


def shift_hosts(df: pl.DataFrame, offsets_ns: dict[str, int], cols: Sequence[str]) -> pl.DataFrame:
    """Add each host's clock offset to the time columns `cols` of a frame with a `host` column."""
    if not offsets_ns or df.height == 0 or not any(offsets_ns.values()):
        return df
    off = pl.col("host").replace_strict(offsets_ns, default=0, return_dtype=pl.Int64)
    return df.with_columns([(pl.col(c) + off).alias(c) for c in cols if c in df.columns])


def build_pystacks(recordings: Sequence[Recording]) -> pl.DataFrame | None:
    """The end-of-session Python stacks of all recordings (`pystacks.parquet`), or None when
    none has any."""
    pys = [r.pystacks for r in recordings
           if getattr(r, "pystacks", None) is not None and r.pystacks.height]
    return pl.concat(pys, how="vertical_relaxed") if pys else None


def fill_ranks(df: pl.DataFrame, manifest: dict) -> pl.DataFrame:
    """`rank` filled from the manifest's ranks by tgid where the rows have none."""
    tgid_rank = {
        int(r["tgid"]): int(r["rank"])
        for r in manifest.get("ranks") or []
        if isinstance(r, dict) and r.get("tgid") is not None and r.get("rank") is not None
    }
    if not tgid_rank:
        return df
    return df.with_columns(pl.coalesce(
        pl.col("rank"),
        pl.col("tgid").replace_strict(tgid_rank, default=None, return_dtype=pl.Int32),
    ).alias("rank"))


def build_stacks(
    recordings: Sequence[Recording], offsets_ns: dict[str, int] | None = None
) -> pl.DataFrame:
    """CPU stack samples of all recordings with `host`, `t_ns` (aligned wall time of the
    interval's middle) and `rank` filled from the manifest by tgid where null."""
    offsets_ns = offsets_ns or {}
    frames = []
    for rec in recordings:
        st = rec.stacks
        if st.height == 0:
            continue
        st = fill_ranks(st, rec.manifest)
        mid = pl.col("ts_ns") + pl.col("interval_ns").fill_null(0) // 2
        frames.append(
            st.with_columns(
                pl.lit(rec.host, dtype=pl.Utf8).alias("host"),
                (mono_to_wall(mid, rec.manifest) + offsets_ns.get(rec.host, 0)).alias("t_ns"),
            )
        )
    if not frames:
        return schema.empty_stacks().with_columns(
            pl.lit(None, pl.Utf8).alias("host"), pl.col("ts_ns").alias("t_ns")
        )
    return pl.concat(frames, how="vertical_relaxed").sort("t_ns")


def build_kernels(
    recordings: Sequence[Recording], offsets_ns: dict[str, int] | None = None
) -> pl.DataFrame:
    """Device activity (`kernels.parquet`, the GPU agent's records) of all recordings with
    `host`, `t_ns` (aligned wall ns of the device start, the same clock as `build_timeline`'s
    `t_ns`) and `rank` filled from the manifest by tgid where null; sorted by `t_ns`."""
    offsets_ns = offsets_ns or {}
    frames = []
    for rec in recordings:
        kn = getattr(rec, "kernels", None)
        if kn is None or kn.height == 0:
            continue
        kn = fill_ranks(kn, rec.manifest)
        frames.append(
            kn.with_columns(
                pl.lit(rec.host, dtype=pl.Utf8).alias("host"),
                (mono_to_wall(pl.col("ts_ns"), rec.manifest) + offsets_ns.get(rec.host, 0))
                .alias("t_ns"),
            )
        )
    if not frames:
        return schema.empty_kernels().with_columns(
            pl.lit(None, pl.Utf8).alias("host"), pl.col("ts_ns").alias("t_ns")
        )
    return pl.concat(frames, how="vertical_relaxed").sort("t_ns", maintain_order=True)
