"""The compress stage: per-rank-per-step summaries built from raw events (docs/scaling.md).

`build_summaries(recordings)` runs the opening every diagnosis shares
(`evidence.align_recordings`: timeline, matched collectives, steps, clock alignment,
lateness, step metrics) and keeps, per (rank, step), the step boundaries, the exact step
metrics every detector reads, per-channel counts, the distributions of launch gaps, wait
durations and per-(comm, op) collective durations and arrival offsets as peaks (`peaks`),
per GPU kernel family (where the recording has the GPU agent's kernels) its count, exact
device time and durations as peaks, and the top CPU stacks by id; per rank a tail record
for the hang detector. The storage format is `argus.recording.summaries`; the diagnosis of
summaries alone is `diagnosis.diagnose(summaries)` (`evidence.from_summaries` rebuilds what
the detectors read, the per-step loops that are quadratic in ranks vectorised: 10,000 ranks
in seconds).

Why peaks by kernel density estimation: the values a step produces (launch gaps, waits) are
multi-modal (short gaps inside a burst of launches, long ones across a phase change) and span
orders of magnitude; a Gaussian KDE on log(value) finds the modes without the bin-edge
artefacts of a histogram and with a handful of numbers per distribution. Each peak keeps its
location (median of the values in its basin) and how many values fell in it. Distributions
of <= `MAX_PEAKS` values are stored exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import polars as pl

from argus import __version__
from argus.analyze import hang, host_context, hotspot, pipeline
from argus.analyze import steps as steps_mod
from argus.analyze.evidence import (
    BLOCKED_COLS,
    STEP_TIME_COLS,
    align_recordings,
    recording_ends,
    recording_info,
)
from argus.analyze.timeline import build_pystacks, shift_hosts
from argus.recording import schema
from argus.recording.io import Recording
from argus.recording.summaries import (
    HOST_SUMMARY_SCHEMA,
    KERNEL_SUMMARY_SCHEMA,
    STACK_DICT_SCHEMA,
    STEP_SCHEMA,
    TAIL_SCHEMA,
    Summaries,
)

MAX_PEAKS = 4
TOP_STACKS = 16  # stacks kept per (rank, sampling interval)
TAIL_SEQS = 8  # collectives kept per (rank, comm) in the tail


# ----------------------------------------------------------------------------- peaks


def peaks(values: Sequence[float | None], log: bool = True, max_peaks: int = MAX_PEAKS) -> list:
    """Distribution peaks `[{"ns", "n"}]` of `values` (see module doc), sorted by location."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return []
    uniq, counts = np.unique(x, return_counts=True)
    if uniq.size <= max_peaks:
        return [{"ns": float(u), "n": int(c)} for u, c in zip(uniq, counts, strict=True)]
    y = np.log(np.maximum(x, 1.0)) if log else x
    sd = float(y.std())
    span = float(y.max() - y.min())
    floor = 0.02 if log else max(span / 200.0, 1.0)
    bw = max(1.06 * sd * x.size ** -0.2, floor)
    grid = np.linspace(y.min() - 2 * bw, y.max() + 2 * bw, 192)
    dens = np.zeros_like(grid)
    for chunk in np.array_split(y, max(1, y.size // 4096 + 1)):
        dens += np.exp(-0.5 * ((grid[:, None] - chunk[None, :]) / bw) ** 2).sum(axis=1)
    inner = (dens[1:-1] > dens[:-2]) & (dens[1:-1] >= dens[2:])
    tops = np.nonzero(inner)[0] + 1
    if tops.size == 0:
        tops = np.array([int(np.argmax(dens))])
    pairs = zip(tops[:-1], tops[1:], strict=True)
    cuts = np.array([grid[a + int(np.argmin(dens[a : b + 1]))] for a, b in pairs])
    basin = np.searchsorted(cuts, y) if cuts.size else np.zeros(y.size, dtype=int)
    out = []
    for b in np.unique(basin):
        sel = x[basin == b]
        out.append({"ns": float(np.median(sel)), "n": int(sel.size)})
    out.sort(key=lambda p: -p["n"])
    return sorted(out[:max_peaks], key=lambda p: p["ns"])


def _peaks_col(df: pl.DataFrame, col: str, log: bool) -> list:
    return [peaks(v or [], log=log) for v in df[col].to_list()]


def stack_id(functions: Sequence[str] | None, modules: Sequence[str] | None) -> int:
    """A stable 63-bit id of one stack (functions and modules, leaf first)."""
    h = hashlib.blake2b(digest_size=8)
    for f, m in zip(functions or [], list(modules or []) + [None] * len(functions or []),
                    strict=False):
        h.update(f"{f}\x00{m}\x01".encode())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


OTHER_ID = stack_id([hotspot.OTHER], [None])  # the attributed samples of dropped stacks


# ----------------------------------------------------------------------------- build


def _assign(df: pl.DataFrame, keys: pl.DataFrame) -> pl.DataFrame:
    """Rows of `df` (rank, t_ns) with the step they fall in (as steps.step_metrics does)."""
    df = df.filter(pl.col("rank").is_not_null()).sort("t_ns")
    j = df.join_asof(keys, left_on="t_ns", right_on="start_ns", by="rank", strategy="backward",
                     check_sortedness=False)
    return j.filter(pl.col("step").is_not_null() & (pl.col("t_ns") < pl.col("end_ns")))


def build_summaries(recordings: Sequence[Recording],
                    seq_shifts: dict[tuple[int, str], int] | None = None) -> Summaries:
    """Summaries of the recordings of one job (usually one node's recording), see module doc.

    `seq_shifts` ((tgid, comm) -> gseq - seq, the daemon's numbering of a job's collectives
    from its earlier builds) numbers those collectives as before instead of aligning them
    again, so that tails (and steps) of consecutive builds over a moving window agree; the
    shifts this build used are then in `meta["seq_shifts"]` (`[tgid, comm, shift, n]`, NCCL
    collectives only: their `seq` is the tracer's per-process counter, stable across builds,
    where a c10d call's is its index in this build)."""
    recordings = list(recordings)
    run = align_recordings(recordings, seq_shifts)
    tl, coll, steps, det = run.timeline, run.collectives, run.steps, run.detection
    offsets, stacks, metrics = run.offsets, run.stacks, run.metrics
    keys = steps.select("rank", "step", "start_ns", "end_ns").sort("start_ns")
    tgids = dict(tl.filter(pl.col("rank").is_not_null()).unique("rank", keep="first")
                 .select("rank", "tgid").rows())

    # counts and distributions per (rank, step)
    ev = _assign(tl.select("rank", "t_ns", "dur_ns", "kind", "channel"), keys)
    launch_gap = (
        tl.filter((pl.col("kind") == "launch") & pl.col("rank").is_not_null())
        .sort("t_ns")
        .with_columns(pl.col("t_ns").diff().over("rank").alias("gap"))
        .select("rank", "t_ns", "gap")
    )
    gaps = _assign(launch_gap, keys).group_by(["rank", "step"]).agg(pl.col("gap").drop_nulls())
    per = ev.group_by(["rank", "step"]).agg(
        (pl.col("channel") == "cuda").sum().cast(pl.UInt32).alias("n_cuda"),
        (pl.col("channel") == "nccl").sum().cast(pl.UInt32).alias("n_nccl"),
        (pl.col("channel") == "torch").sum().cast(pl.UInt32).alias("n_torch"),
        (pl.col("kind") == "launch").sum().cast(pl.UInt32).alias("n_launch"),
        pl.col("kind").is_in(["sync", "readback"]).sum().cast(pl.UInt32).alias("n_wait"),
        pl.col("dur_ns").filter(pl.col("kind").is_in(["sync", "readback"])).drop_nulls()
        .alias("waits"),
    )
    per = per.join(gaps, on=["rank", "step"], how="left")
    per = per.with_columns(
        pl.Series("launch_gap", _peaks_col(per, "gap", True), dtype=STEP_SCHEMA["launch_gap"]),
        pl.Series("wait_dur", _peaks_col(per, "waits", True), dtype=STEP_SCHEMA["wait_dur"]),
    ).drop("gap", "waits")

    # collectives per (rank, step, comm, op)
    if coll.height:
        ca = _assign(coll.select("rank", "t_ns", "comm", "op", "bytes", "dur_ns", "lateness_ns"),
                     keys)
        cg = ca.group_by(["rank", "step", "comm", "op"], maintain_order=True).agg(
            pl.len().cast(pl.UInt32).alias("n"),
            pl.col("bytes").sum().cast(pl.Int64),
            pl.col("dur_ns").drop_nulls(),
            pl.col("lateness_ns").drop_nulls(),
        )
        cg = cg.with_columns(
            pl.Series("dur", _peaks_col(cg, "dur_ns", True), dtype=STEP_SCHEMA["wait_dur"]),
            pl.Series("arrival", _peaks_col(cg, "lateness_ns", False),
                      dtype=STEP_SCHEMA["wait_dur"]),
        )
        cg = cg.group_by(["rank", "step"]).agg(
            pl.struct("comm", "op", "n", "bytes", "dur", "arrival").alias("colls")
        )
        per = per.join(cg, on=["rank", "step"], how="left")

    # CPU stacks: ids, top-K per (rank, interval), attached to the step of the interval middle
    st = stacks.filter(pl.col("rank").is_not_null())
    if "state" in st.columns:  # the hotspot detector reads on-CPU samples only
        st = st.filter(pl.col("state").is_null() | (pl.col("state") != "off_cpu"))
    dict_rows: dict[int, tuple] = {}
    if st.height:
        ids = []
        for fns, mods in st.select("functions", "modules").rows():
            sid = stack_id(fns, mods)
            dict_rows.setdefault(sid, (sid, list(fns or []), list(mods or [])))
            ids.append(sid)
        st = st.with_columns(pl.Series("stack_id", ids, dtype=pl.Int64))
        st = st.group_by(["rank", "ts_ns", "t_ns", "interval_ns", "stack_id"]).agg(
            pl.col("count").sum()
        ).sort(["rank", "ts_ns", "stack_id"])  # ties in the top-K: by stack id, every run
        st = st.with_columns(
            pl.col("count").rank("ordinal", descending=True).over(["rank", "ts_ns"]).alias("_k")
        )
        dropped = st.filter(pl.col("_k") > TOP_STACKS)
        st = st.filter(pl.col("_k") <= TOP_STACKS).drop("_k")
        # the dropped stacks' attributed samples stay, as one `hotspot.OTHER` stack per
        # interval: a hot spot's share is of all attributed samples (dropping the tail of a
        # torch rank's ~170 stacks raised a straggler's burn loop from 17 % to 29 %)
        charged = {sid for sid, fns, mods in dict_rows.values()
                   if hotspot.attribute(fns, mods) is not None}
        other = (dropped.filter(pl.col("stack_id").is_in(list(charged)))
                 .group_by(["rank", "ts_ns", "t_ns", "interval_ns"]).agg(pl.col("count").sum())
                 .with_columns(pl.lit(OTHER_ID, pl.Int64).alias("stack_id")))
        if other.height:
            dict_rows[OTHER_ID] = (OTHER_ID, [hotspot.OTHER], [None])
            st = pl.concat([st, other.select(st.columns)])
        st = st.sort("t_ns")
    stacks_by_step = None
    if st.height and keys.height:
        k2 = keys.select("rank", "step", "start_ns").sort("start_ns")
        back = st.join_asof(k2, left_on="t_ns", right_on="start_ns", by="rank",
                            strategy="backward", check_sortedness=False)
        fwd = st.join_asof(k2, left_on="t_ns", right_on="start_ns", by="rank",
                           strategy="forward", check_sortedness=False)
        sj = back.with_columns(
            pl.col("step").fill_null(fwd["step"]), pl.col("start_ns").fill_null(fwd["start_ns"])
        ).filter(pl.col("step").is_not_null())
        stacks_by_step = sj.group_by(["rank", "step"]).agg(
            pl.struct(
                (pl.col("t_ns") - pl.col("start_ns")).alias("t_off_ns"),
                "interval_ns", "stack_id", pl.col("count").cast(pl.UInt32),
            ).alias("stacks")
        )
        drop_by_step = (
            dropped.join_asof(k2, left_on="t_ns", right_on="start_ns", by="rank",
                              strategy="nearest", check_sortedness=False)
            .group_by(["rank", "step"])
            .agg(pl.col("count").sum().cast(pl.UInt32).alias("stacks_dropped"))
        ) if st.height and dropped.height else None
        per = per.join(stacks_by_step, on=["rank", "step"], how="left")
        if drop_by_step is not None:
            per = per.join(drop_by_step, on=["rank", "step"], how="left")

    out = metrics.join(per, on=["rank", "step"], how="left")
    # back to unaligned host wall time (diagnosis aligns again, as for raw recordings)
    neg = {h: -o for h, o in offsets.items()}
    out = shift_hosts(out, neg, STEP_TIME_COLS)
    out = out.with_columns(
        pl.col("rank").replace_strict(tgids, default=None, return_dtype=pl.Int32).alias("tgid")
    )
    out = out.select([pl.col(c).cast(t) if c in out.columns else pl.lit(None, t).alias(c)
                      for c, t in STEP_SCHEMA.items()]).sort(["step", "rank"])

    hctx = host_context.context(recordings)
    tail = _with_rank_context(
        _tail(tl, coll, stacks, offsets, dict_rows, build_pystacks(recordings)), coll, hctx)
    stack_dict = pl.DataFrame(list(dict_rows.values()), schema=STACK_DICT_SCHEMA, orient="row")
    ends = recording_ends(recordings)
    meta = {
        "argus_version": __version__,
        "host": recordings[0].host if recordings else None,
        "steps": {"method": det.method, "period": det.period, "comm": det.comm},
        "ends_ns": ends,
        "recordings": [recording_info(rec) for rec in recordings],
        "manifest": {k: v for rec in recordings[:1] for k, v in rec.manifest.items()
                     if k in ("format", "host", "clock", "ranks", "drops", "gpu")},
        "extra_manifests": [
            {k: v for k, v in rec.manifest.items() if k in ("host", "clock", "ranks", "drops")}
            for rec in recordings[1:]
        ],
    }
    if seq_shifts is not None:
        used = coll.filter(pl.col("channel") == "nccl").group_by(["tgid", "comm"]).agg(
            (pl.col("gseq") - pl.col("seq")).first().alias("d"), pl.len().alias("n"))
        meta["seq_shifts"] = [[int(t), str(c), int(d), int(n)] for t, c, d, n in
                              used.sort(["tgid", "comm"]).rows()]
    gpu_frames = [rec.gpu for rec in recordings if getattr(rec, "gpu", None) is not None
                  and rec.gpu.height]
    g = pl.concat(gpu_frames, how="vertical_relaxed") if gpu_frames else schema.empty_gpu()
    man = recordings[0].manifest if recordings else {}
    hrows = hctx.rows.select([pl.col(c).cast(t) for c, t in HOST_SUMMARY_SCHEMA.items()]) if (
        hctx.rows.height) else pl.DataFrame(schema=HOST_SUMMARY_SCHEMA)
    # GPU kernel families (device time, argus.analyze.kernels): exact sums, durations as peaks
    fam = run.kernel_families
    kn = (fam.with_columns(
        pl.Series("dur", _peaks_col(fam, "durs", True), dtype=KERNEL_SUMMARY_SCHEMA["dur"]),
        pl.col("rank").replace_strict(hosts_of(out), default=None, return_dtype=pl.Utf8)
        .alias("host"))
        .select([pl.col(c).cast(t) for c, t in KERNEL_SUMMARY_SCHEMA.items()])
        if fam.height else pl.DataFrame(schema=KERNEL_SUMMARY_SCHEMA))
    return Summaries(meta=meta, steps=out, stack_dict=stack_dict, tail=tail, manifest=man, gpu=g,
                     host_ctx=hrows, kernels=kn)


def hosts_of(steps: pl.DataFrame) -> dict[int, str]:
    """rank -> host of the summaries' step rows."""
    return dict(steps.filter(pl.col("host").is_not_null()).unique("rank", keep="first")
                .select("rank", "host").rows())


def _with_rank_context(tail: pl.DataFrame, coll: pl.DataFrame, hctx) -> pl.DataFrame:
    """The tail plus what the whole recording says per rank: `step_comm` and `p2p` (the
    pipeline stages, `pipeline.stages`), and `threads`: its own thread names that the host
    context names as competitors (`host.contention` leaves them out)."""
    if tail.height == 0:
        return tail
    comm = steps_mod.step_comms(coll) if coll.height else {}
    stage = pipeline.stage_keys(coll) if coll.height else {}
    p2p = (dict(coll.group_by("rank").agg(pl.col("op").is_in(steps_mod.P2P_OPS).any()).rows())
           if coll.height else {})
    named: dict[int, set[str]] = {}
    h = hctx.rows
    if h.height:
        for rank, detail in (h.filter((pl.col("kind") == "cpu_contention")
                                      & pl.col("rank").is_not_null())
                             .select("rank", "detail").unique().rows()):
            named.setdefault(int(rank), set()).add(detail)
    ranks = tail["rank"].to_list()
    threads = [sorted(hctx.own_threads.get(r, set()) & named.get(r, set())) or None
               for r in ranks]
    return tail.with_columns(
        pl.Series("step_comm", [comm.get(r) for r in ranks], dtype=pl.Utf8),
        pl.Series("p2p", [bool(p2p.get(r, False)) for r in ranks], dtype=pl.Boolean),
        pl.Series("stage", [stage.get(r) for r in ranks], dtype=pl.Utf8),
        pl.Series("threads", threads, dtype=pl.List(pl.Utf8)),
    )


def _tail(tl, coll, stacks, offsets, dict_rows, pystacks=None) -> pl.DataFrame:
    """One row per rank: what detect_hangs needs at the end of the recording (unaligned)."""
    ranked = tl.filter(pl.col("rank").is_not_null())
    if ranked.height == 0:
        return pl.DataFrame(schema=TAIL_SCHEMA)
    neg = {h: -o for h, o in offsets.items()}
    ranked = shift_hosts(ranked, neg, ["t_ns"])
    first = ranked.unique("rank", keep="first").select("rank", "host", "tgid")
    exited = ranked.filter(pl.col("kind") == "exit").select("rank").unique()
    last = (
        ranked.filter(pl.col("kind") != "exit").sort("t_ns").group_by("rank")
        .agg(pl.col("name").last().alias("last_call"), pl.col("t_ns").last().alias("last_call_ns"))
    )
    infl = ranked.filter(pl.col("in_flight")).group_by("rank").agg(
        pl.struct("name", "kind", "t_ns").alias("in_flight")
    )
    out = (
        first.join(last, on="rank", how="left")
        .join(infl, on="rank", how="left")
        .with_columns(pl.col("rank").is_in(exited["rank"].implode()).alias("exited"))
    )
    if coll.height:
        cc = (
            coll.sort("gseq").group_by(["rank", "comm"]).tail(TAIL_SEQS)
            .group_by("rank").agg(pl.struct("comm", "gseq", "op", "bytes").alias("comms"))
        )
        out = out.join(cc, on="rank", how="left")
    st = stacks.filter(pl.col("rank").is_not_null())
    ctx: dict[int, dict[str, list]] = {}
    if "state" in st.columns:
        off = st.filter(pl.col("state") == "off_cpu")
        st = st.filter(pl.col("state").is_null() | (pl.col("state") != "off_cpu"))
        off = off.filter(pl.col("ts_ns") == pl.col("ts_ns").max().over("rank"))
        for row in off.select("rank", *BLOCKED_COLS).rows(named=True):
            ctx.setdefault(row.pop("rank"), {}).setdefault("blocked", []).append(row)
    if pystacks is not None and pystacks.height:
        cols = [c for c in schema.PYSTACKS_SCHEMA if c not in ("rank", "tgid")]
        for row in pystacks.filter(pl.col("rank").is_not_null()).select(
                "rank", *cols).rows(named=True):
            ctx.setdefault(row.pop("rank"), {}).setdefault("python", []).append(row)
    if ctx:
        out = out.join(pl.DataFrame({"rank": list(ctx), "hang_context": [
            json.dumps(v, separators=(",", ":")) for v in ctx.values()]},
            schema={"rank": pl.Int32, "hang_context": pl.Utf8}), on="rank", how="left")
    if st.height:
        last_ts = st.select("rank", "ts_ns").unique().sort("ts_ns").group_by("rank").tail(
            hang.LATEST_INTERVALS
        )
        rec = st.join(last_ts, on=["rank", "ts_ns"])
        ids = []
        for fns, mods in rec.select("functions", "modules").rows():
            sid = stack_id(fns, mods)
            dict_rows.setdefault(sid, (sid, list(fns or []), list(mods or [])))
            ids.append(sid)
        rec = rec.with_columns(pl.Series("stack_id", ids, dtype=pl.Int64)).group_by(
            ["rank", "ts_ns", "interval_ns", "stack_id"]).agg(pl.col("count").sum())
        out = out.join(
            rec.group_by("rank").agg(
                pl.struct("ts_ns", "interval_ns", "stack_id", pl.col("count").cast(pl.UInt32))
                .alias("latest_stacks")),
            on="rank", how="left",
        )
    return out.select([pl.col(c).cast(t) if c in out.columns else pl.lit(None, t).alias(c)
                       for c, t in TAIL_SCHEMA.items()]).sort("rank")
