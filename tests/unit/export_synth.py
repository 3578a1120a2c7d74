"""A synthetic recording with the shape that broke `argus export`: entry-only launches.

`synth(ranks, seconds, launch_rate)` plays each rank's main thread through 50 ms steps:
launches at `launch_rate` per second (cudaLaunchKernel, every 7th a cuLaunchKernel, every
5th followed by cudaEventRecord + cudaStreamWaitEvent, every 97th by cudaFree), all
recorded at entry only (`dur_ns` null, `in_flight` false), in the first 80 % of the step;
three ncclAllReduce calls with durations on the same thread (channel nccl); a cudaMemcpy
read-back and an end-of-step cudaStreamSynchronize, both with durations. With `hang_rank`
that rank's last synchronize never returns (`in_flight` true, the recording ends 2 s later).
Built with numpy so a 4-rank x 21 s x 20,000 launches/s recording takes seconds.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scenarios import WALL0, _manifest

from argus.recording.io import Recording, coerce
from argus.recording.schema import EVENTS_SCHEMA, STACKS_SCHEMA

MS = 1_000_000
STEP_NS = 50 * MS
KERNELS = ["flash_attn_fwd_kernel", "layernorm_fwd_kernel", "matmul_bwd_kernel",
           "gelu_bwd_kernel", "fused_adam_kernel"]


def _rank_events(rank: int, steps: int, launch_rate: float, hang: bool) -> pl.DataFrame:
    tgid = 1000 + rank
    per_step = max(1, int(launch_rate * STEP_NS / 1e9))
    cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                         ("ts_ns", "dur_ns", "name", "channel", "kernel", "op")}

    def add(ts, dur, name, channel, kernel=None, op=None):
        n = len(ts)
        cols["ts_ns"].append(np.asarray(ts, dtype=np.int64))
        cols["dur_ns"].append(np.full(n, -1, np.int64) if dur is None
                              else np.broadcast_to(np.asarray(dur, np.int64), (n,)))
        cols["name"].append(np.broadcast_to(np.asarray(name, dtype=object), (n,)))
        cols["channel"].append(np.full(n, channel, dtype=object))
        cols["kernel"].append(np.broadcast_to(np.asarray(kernel, dtype=object), (n,)))
        cols["op"].append(np.full(n, op, dtype=object))

    base = 1_000 * MS + rank * 37_000  # a little skew between ranks
    starts = base + np.arange(steps, dtype=np.int64) * STEP_NS
    i = np.arange(per_step)
    gap = int(0.8 * STEP_NS / per_step)
    lts = (starts[:, None] + i[None, :] * gap).ravel()
    idx = np.tile(i, steps)
    names = np.where(idx % 7 == 3, "cuLaunchKernel", "cudaLaunchKernel").astype(object)
    kern = np.asarray(KERNELS, dtype=object)[idx % len(KERNELS)]
    add(lts, None, names, "cuda", kern)
    ev = lts[idx % 5 == 0]
    add(ev + gap // 3, None, "cudaEventRecord", "cuda")
    add(ev + 2 * gap // 3, None, "cudaStreamWaitEvent", "cuda")
    add(lts[idx % 97 == 50] + gap // 2, None, "cudaFree", "cuda")
    for b in range(3):  # allreduce of three buckets while the backward launches run
        add(starts + int((0.4 + 0.12 * b) * STEP_NS), 2 * MS, "ncclAllReduce", "nccl",
            op="allreduce")
    add(starts + int(0.82 * STEP_NS), 1 * MS, "cudaMemcpy", "cuda")
    sync = starts + int(0.85 * STEP_NS)
    add(sync, int(0.14 * STEP_NS), "cudaStreamSynchronize", "cuda")
    n = sum(len(a) for a in cols["ts_ns"])
    dur = np.concatenate(cols["dur_ns"])
    in_flight = np.zeros(n, dtype=bool)
    if hang:  # the last synchronize never returns
        last = n - 1
        dur[last] = -1
        in_flight[last] = True
    df = pl.DataFrame({
        "ts_ns": np.concatenate(cols["ts_ns"]),
        "dur_ns": pl.Series(dur).replace(-1, None),
        "in_flight": in_flight,
        "name": np.concatenate(cols["name"]).astype(str),
        "channel": np.concatenate(cols["channel"]).astype(str),
        "kernel": pl.Series(np.concatenate(cols["kernel"]).tolist(), dtype=pl.Utf8),
        "op": pl.Series(np.concatenate(cols["op"]).tolist(), dtype=pl.Utf8),
    }).with_columns(
        pl.lit(tgid, pl.Int32).alias("tgid"), pl.lit(tgid, pl.Int32).alias("tid"),
        pl.lit(rank, pl.Int32).alias("rank"),
    )
    coll = pl.col("channel") == "nccl"
    df = df.sort("ts_ns").with_columns(
        pl.when(coll).then(pl.lit("comm0")).alias("comm"),
        pl.when(coll).then(pl.int_range(pl.len()).over(coll) - 0).alias("seq"),
        pl.when(coll).then(pl.lit(100 << 20)).alias("bytes"),
        pl.when(pl.col("name") == "cudaMemcpy").then(pl.lit(2)).alias("memcpy_kind"),
    )
    return df


def synth(ranks: int = 4, seconds: float = 2.0, launch_rate: float = 2000.0,
          hang_rank: int | None = None) -> list[Recording]:
    """One node's recording of `ranks` ranks over `seconds` (see the module doc)."""
    steps = max(1, int(seconds * 1e9 / STEP_NS))
    frames = [_rank_events(r, steps, launch_rate, r == hang_rank) for r in range(ranks)]
    ev = pl.concat(frames, how="diagonal_relaxed").sort("ts_ns")
    end = int(ev["ts_ns"].max()) + (2_000 * MS if hang_rank is not None else STEP_NS)
    m = _manifest("node0", list(range(ranks)), 0, 0, 900 * MS, end, ranks,
                  "duration" if hang_rank is None else "interrupted")
    m["clock"] = {"mono_to_wall_ns": WALL0}
    stacks = coerce(pl.DataFrame(), STACKS_SCHEMA, "stacks")
    return [Recording(m, coerce(ev, EVENTS_SCHEMA, "events"), stacks)]
