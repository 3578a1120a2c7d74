"""A synthetic recording with the shape that broke `argus export`: entry-only launches.

`synth(ranks, seconds, launch_rate)` plays each rank's main thread through 50 ms steps:
launches at `launch_rate` per second (cudaLaunchKernel, every 7th a cuLaunchKernel, every
5th followed by cudaEventRecord + cudaStreamWaitEvent, every 97th by cudaFree), all
recorded at entry only (`dur_ns` null, `in_flight` false), in the first 80 % of the step;
three ncclAllReduce calls with durations on the same thread (channel nccl); a cudaMemcpy
read-back and an end-of-step cudaStreamSynchronize, both with durations. With `hang_rank`
that rank's last synchronize never returns (`in_flight` true, the recording ends 2 s later).
With `kernels`, each rank also has the GPU agent's device records (`kernels.parquet`, see
`_rank_kernels`). Built with numpy so a 4-rank x 21 s x 20,000 launches/s recording takes seconds.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scenarios import WALL0, _manifest

from argus.recording.io import Recording, coerce
from argus.recording.schema import EVENTS_SCHEMA, KERNELS_SCHEMA, STACKS_SCHEMA

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


COMM_HASH = 0xC0FFEE0123456789  # > 2**63: the hash is unsigned
COMPUTE_STREAM, SIDE_STREAM = 7, 13
KERNEL_FRACTION = 0.6  # a kernel runs this share of the launch gap
NCCL_CHANNELS = 2


def _rank_kernels(ev: pl.DataFrame, rank: int, ranks: int) -> pl.DataFrame:
    """The device records a rank's agent would publish for its calls in `ev`: per launch a
    kernel (cudaLaunchKernel on stream 7, cuLaunchKernel on stream 13) starting 5 us after
    it, or when the stream's previous kernel ends, and running KERNEL_FRACTION of the
    launch gap; per cudaMemcpy a memcpy (stream 7, 1 MiB, half the call); per step a memset
    (stream 7, 4 KiB, 20 us, just before the memcpy); per ncclAllReduce one coll record per
    channel (0 and 1, 100 us after the call, 1.5 ms, NCCL op "AllReduce", coll_seq the call's
    seq); per step a p2p "Send" to the next rank at 30 % of the step (channel 0, 300 us)."""
    tgid = 1000 + rank
    launches = ev.filter(pl.col("name").is_in(["cudaLaunchKernel", "cuLaunchKernel"]))
    ts = launches["ts_ns"].to_numpy()
    gap = int(np.median(np.diff(ts))) if len(ts) > 1 else 1000
    dur = max(1, int(gap * KERNEL_FRACTION))
    rows = []
    for name, stream in (("cudaLaunchKernel", COMPUTE_STREAM), ("cuLaunchKernel", SIDE_STREAM)):
        sel = launches.filter(pl.col("name") == name)
        t = sel["ts_ns"].to_numpy() + 5_000
        start = np.empty_like(t)
        free = 0
        for i, x in enumerate(t.tolist()):  # serialised on the stream
            start[i] = max(x, free)
            free = start[i] + dur
        rows.append(pl.DataFrame({
            "ts_ns": start, "dur_ns": np.full(len(t), dur, np.int64),
            "kind": "kernel", "name": sel["kernel"], "stream": stream,
            "correlation": np.arange(len(t), dtype=np.int64) + 1 + stream * 10_000_000,
        }))
    cp = ev.filter(pl.col("name") == "cudaMemcpy")
    rows.append(pl.DataFrame({
        "ts_ns": cp["ts_ns"] + 10_000, "dur_ns": cp["dur_ns"] // 2, "kind": "memcpy",
        "name": "", "stream": COMPUTE_STREAM, "bytes": 1 << 20}))
    rows.append(pl.DataFrame({
        "ts_ns": cp["ts_ns"] - 30_000, "dur_ns": 20_000, "kind": "memset", "name": "",
        "stream": COMPUTE_STREAM, "bytes": 4096}))
    ar = ev.filter(pl.col("name") == "ncclAllReduce")
    for ch in range(NCCL_CHANNELS):
        rows.append(pl.DataFrame({
            "ts_ns": ar["ts_ns"] + 100_000, "dur_ns": 1_500_000, "kind": "coll",
            "name": "AllReduce", "coll_seq": ar["seq"], "channel": ch,
            "bytes": ar["bytes"]}))
    steps = ev.filter(pl.col("name") == "cudaStreamSynchronize")["ts_ns"].to_numpy() \
        - int(0.85 * STEP_NS)
    rows.append(pl.DataFrame({
        "ts_ns": steps + int(0.3 * STEP_NS), "dur_ns": 300_000, "kind": "p2p", "name": "Send",
        "coll_seq": 0, "channel": 0, "bytes": 1 << 16, "peer": (rank + 1) % ranks}))
    kn = pl.concat(rows, how="diagonal_relaxed").with_columns(
        pl.lit(tgid, pl.Int32).alias("tgid"), pl.lit(rank, pl.Int32).alias("rank"),
        pl.lit(0, pl.Int32).alias("device"),
        pl.when(pl.col("kind").is_in(["coll", "p2p"])).then(pl.lit(COMM_HASH, pl.UInt64))
        .alias("comm_hash"),
    )
    return coerce(kn, KERNELS_SCHEMA, "kernels").sort("ts_ns")


def synth(ranks: int = 4, seconds: float = 2.0, launch_rate: float = 2000.0,
          hang_rank: int | None = None, kernels: bool = False) -> list[Recording]:
    """One node's recording of `ranks` ranks over `seconds` (see the module doc)."""
    steps = max(1, int(seconds * 1e9 / STEP_NS))
    frames = [_rank_events(r, steps, launch_rate, r == hang_rank) for r in range(ranks)]
    kn = (pl.concat([_rank_kernels(f, r, ranks) for r, f in enumerate(frames)])
          if kernels else None)
    ev = pl.concat(frames, how="diagonal_relaxed").sort("ts_ns")
    end = int(ev["ts_ns"].max()) + (2_000 * MS if hang_rank is not None else STEP_NS)
    m = _manifest("node0", list(range(ranks)), 0, 0, 900 * MS, end, ranks,
                  "duration" if hang_rank is None else "interrupted")
    m["clock"] = {"mono_to_wall_ns": WALL0}
    stacks = coerce(pl.DataFrame(), STACKS_SCHEMA, "stacks")
    rec = Recording(m, coerce(ev, EVENTS_SCHEMA, "events"), stacks)
    if kn is not None:
        rec.kernels = kn
    return [rec]
