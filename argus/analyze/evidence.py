"""What the detectors read (`Evidence`), built from raw recordings or from summaries.

Both start from one opening, `align_recordings`: timeline -> collectives matched across ranks
(`matching.align_seq`; numbered as a daemon's earlier builds did with `seq_shifts`) -> steps
(`steps.detect_steps`, realigned by steps) -> the nodes' clock offsets (`align`) -> the
timeline, collectives and steps shifted onto the aligned clock -> arrival lateness -> CPU
stacks -> per-step metrics: an `AlignedRun`.

- `from_recordings(recordings)`: the Evidence of raw recordings (one per node): the
  `AlignedRun` itself, its collectives, stacks and hang inputs read as the detectors need.
- `from_summaries(summaries)`: the same Evidence rebuilt from per-rank-per-step summaries
  alone (`compress.build_summaries` keeps the `AlignedRun` per rank per step): steps and
  metrics as stored, clocks aligned again on the step ends, collectives and stacks rebuilt
  from their peaks and ids, the hang detector's inputs from the per-rank tail.

`report.assemble_report(evidence)` runs the detectors; `diagnosis.diagnose` picks the path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from argus.analyze import hang, host_context, kernels, pipeline
from argus.analyze.align import estimate_offsets
from argus.analyze.matching import align_seq, collectives, with_lateness
from argus.analyze.steps import (
    STEP_COLUMNS,
    StepDetection,
    detect_steps,
    realign_by_steps,
    step_metrics,
)
from argus.analyze.timeline import (
    build_pystacks,
    build_stacks,
    build_timeline,
    recording_end_ns,
    shift_hosts,
)
from argus.recording import schema
from argus.recording.io import Recording
from argus.recording.summaries import STEP_SCHEMA, Summaries

STEP_TIME_COLS = ["start_ns", "end_ns", "first_coll_ns", "last_coll_ns"]  # shifted per host
HOST_METRIC_COLS = ("compute_wait_ns", "sync_wait_ns", "coll_wait_ns", "p2p_wait_ns",
                    "lateness_ns", "host_gap_ns")  # what summaries keep per step
METRIC_COLS = (*HOST_METRIC_COLS, *kernels.KERNEL_METRICS)
BLOCKED_COLS = ("ts_ns", "tid", "thread", "blocked_ns", "functions", "modules")  # a tail's
# hang_context "blocked" rows: a rank's latest off-CPU stacks


@dataclass
class Evidence:
    """What the detectors read, on the aligned clock, from raw events or from summaries.

    The callables build the costly inputs only when a detector needs them: `collectives()`
    (comm, op, t_ns, dur_ns, bytes: stall attribution, read only with anomalous windows),
    `hangs(hang_after_s, step_ns)` (the hang findings), `cpu_stacks(windows)` (on-CPU stack
    rows: rank, t_ns, interval_ns, functions, modules, count; read only with windows or
    stragglers)."""

    recordings: list[Recording]  # manifests and NVML samples (events may be empty)
    manifests: list[tuple[dict[str, Any], str]]  # (manifest, host) per recording: ranks, drops
    recording_info: list[dict[str, Any]]  # the report's `recordings` entries
    steps: pl.DataFrame  # complete steps, steps.STEP_COLUMNS
    metrics: pl.DataFrame  # STEP_COLUMNS + the step metrics (steps.step_metrics)
    detection: dict[str, Any]  # detected, method, period, comm
    alignment: dict[str, Any]  # align.estimate_offsets
    seen: pl.DataFrame  # rank, tgid, host of the ranks seen in the data (first wins)
    stages: list[list[int]]  # pipeline stages (pipeline.stages), [] when not a pipeline
    host: host_context.HostContext
    collectives: Callable[[], pl.DataFrame]
    hangs: Callable[[float, float | None], list[dict[str, Any]]]
    cpu_stacks: Callable[[list[dict[str, Any]]], pl.DataFrame]
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys (e.g. "source")
    # per (rank, step, kernel family) device time (kernels.FAMILY_SCHEMA); empty: no agent
    kernel_families: pl.DataFrame = field(default_factory=kernels.empty_families)


# ----------------------------------------------------------------------------- the opening


@dataclass
class AlignedRun:
    """The opening's result (module doc): every frame on the aligned clock but `detection`."""

    timeline: pl.DataFrame  # timeline.build_timeline
    collectives: pl.DataFrame  # matched (gseq), with lateness_ns (matching.with_lateness)
    detection: StepDetection  # the steps as detected, on each host's own clock
    steps: pl.DataFrame  # detection.steps, shifted
    alignment: dict[str, Any]  # align.estimate_offsets
    stacks: pl.DataFrame  # timeline.build_stacks
    metrics: pl.DataFrame  # steps.step_metrics + kernels.KERNEL_METRICS
    kernel_families: pl.DataFrame = field(default_factory=kernels.empty_families)

    @property
    def offsets(self) -> dict[str, int]:
        """What to add to each host's wall times (`alignment["offsets_ns"]`)."""
        return self.alignment["offsets_ns"]


def _known_shifts(coll: pl.DataFrame, shifts: dict[tuple[int, str], int]) -> pl.DataFrame:
    """`gseq` of the collectives whose (tgid, comm) has a known shift: `seq + shift`; the
    other ranks of such a comm move by the build's offset to that numbering (the mode over
    the known rows), so every rank of the comm is in the caller's numbering."""
    if not shifts or coll.height == 0:
        return coll
    known = pl.DataFrame(
        [(t, c, d) for (t, c), d in shifts.items()],
        schema={"tgid": coll.schema["tgid"], "comm": pl.Utf8, "_k": pl.Int64}, orient="row",
    )
    c = coll.join(known, on=["tgid", "comm"], how="left")
    offs = (c.filter(pl.col("_k").is_not_null())
            .group_by("comm").agg((pl.col("seq") + pl.col("_k") - pl.col("gseq"))
                                  .mode().min().alias("_o")))
    c = c.join(offs, on="comm", how="left").with_columns(
        pl.when(pl.col("_k").is_not_null()).then(pl.col("seq") + pl.col("_k"))
        .otherwise(pl.col("gseq") + pl.col("_o").fill_null(0)).alias("gseq")
    )
    return c.drop("_k", "_o").sort(["rank", "comm", "gseq"])


def align_recordings(recordings: Sequence[Recording],
                     seq_shifts: dict[tuple[int, str], int] | None = None) -> AlignedRun:
    """The opening both diagnosis paths share (module doc). `seq_shifts` ((tgid, comm) ->
    gseq - seq) numbers those collectives as a daemon's earlier builds did instead of
    aligning them again (`compress.build_summaries`)."""
    recordings = list(recordings)
    tl = build_timeline(recordings)
    coll = align_seq(collectives(tl))
    if seq_shifts:
        coll = _known_shifts(coll, seq_shifts)
    coll, det = realign_by_steps(tl, coll, detect_steps(tl, coll))
    alignment = estimate_offsets(det.steps, coll)
    offsets = alignment["offsets_ns"]
    steps = det.steps
    if any(offsets.values()):
        tl = shift_hosts(tl, offsets, ["t_ns", "end_ns"])
        coll = shift_hosts(coll, offsets, ["t_ns", "end_ns"])
        steps = shift_hosts(steps, offsets, STEP_TIME_COLS)
    coll = with_lateness(coll)
    stacks = build_stacks(recordings, offsets)
    km, families = kernels.step_kernels(kernels.device_records(recordings, offsets), steps)
    metrics = kernels.with_kernel_metrics(step_metrics(tl, coll, steps), km)
    return AlignedRun(timeline=tl, collectives=coll, detection=det, steps=steps,
                      alignment=alignment, stacks=stacks, metrics=metrics,
                      kernel_families=families)


# ----------------------------------------------------------------------------- recordings


def recording_info(rec: Recording) -> dict[str, Any]:
    """The report's `recordings` entry of one raw recording."""
    return {
        "path": str(rec.path) if rec.path else None,
        "host": rec.host,
        "format": rec.manifest.get("format"),
        "duration_s": rec.manifest.get("duration_s"),
        "end_reason": rec.manifest.get("end_reason"),
        "events": rec.events.height,
        "stack_rows": rec.stacks.height,
    }


def recording_ends(recordings: Sequence[Recording]) -> dict[str, int]:
    """Per host: the end of its recordings (the latest), on its own clock."""
    ends: dict[str, int] = {}
    for rec in recordings:
        e = recording_end_ns(rec)
        if e is not None:
            ends[rec.host] = max(ends.get(rec.host, e), e)
    return ends


def from_recordings(recordings: Sequence[Recording]) -> Evidence:
    """The Evidence of raw recordings (one per node): the `AlignedRun` (module doc), the
    stages of a pipeline, the host context; the collectives, on-CPU stacks and hang inputs
    read only when a detector asks."""
    recordings = list(recordings)
    run = align_recordings(recordings)
    tl, coll, stacks, offsets, det = (run.timeline, run.collectives, run.stacks, run.offsets,
                                      run.detection)

    def hangs(after_s: float, step_ns: float | None) -> list[dict[str, Any]]:
        ends: dict[str, int] = {}
        for rec in recordings:
            e = recording_end_ns(rec)
            if e is not None:
                ends[rec.host] = max(ends.get(rec.host, e), e) + offsets.get(rec.host, 0)
        return hang.detect_hangs(tl, coll, stacks, ends, after_s, step_ns,
                                 build_pystacks(recordings))

    return Evidence(
        recordings=recordings,
        manifests=[(rec.manifest, rec.host) for rec in recordings],
        recording_info=[recording_info(rec) for rec in recordings],
        steps=run.steps,
        metrics=run.metrics,
        detection={"detected": det.detected, "method": det.method, "period": det.period,
                   "comm": det.comm},
        alignment=run.alignment,
        seen=tl.filter(pl.col("rank").is_not_null()).unique("rank", keep="first")
        .select("rank", "tgid", "host") if tl.height else pl.DataFrame(),
        stages=pipeline.stages(coll),
        host=host_context.context(recordings),
        collectives=lambda: coll,
        hangs=hangs,
        cpu_stacks=lambda _windows: stacks.filter(
            pl.col("state").is_null() | (pl.col("state") != "off_cpu")),
        kernel_families=run.kernel_families,
    )


# ----------------------------------------------------------------------------- summaries


def _coll_frame(steps: pl.DataFrame) -> pl.DataFrame:
    """Collective rows rebuilt from the per-step peaks (one row per value in each peak) with
    what the stall detector reads: comm, op, t_ns (the step's first collective), dur_ns,
    bytes."""
    c = steps.select("rank", "host", pl.coalesce("first_coll_ns", "start_ns").alias("t_ns"),
                     "colls").explode("colls").drop_nulls("colls").unnest("colls")
    if c.height == 0:
        return pl.DataFrame(schema={"comm": pl.Utf8, "op": pl.Utf8, "t_ns": pl.Int64,
                                    "dur_ns": pl.Int64, "bytes": pl.Int64})
    c = c.with_columns((pl.col("bytes") / pl.col("n").cast(pl.Float64)).alias("b1")).drop("n")
    c = c.explode("dur").drop_nulls("dur").unnest("dur")
    return c.select(
        "rank", "host", "comm", "op", "t_ns",
        pl.col("ns").cast(pl.Int64).alias("dur_ns"),
        pl.col("b1").cast(pl.Int64).alias("bytes"),
        pl.int_ranges(0, pl.col("n")).alias("_r"),
    ).explode("_r").drop("_r")


def _stack_frame(steps: pl.DataFrame, stack_dict: pl.DataFrame) -> pl.DataFrame:
    s = steps.select("rank", "host", "start_ns", "stacks").explode("stacks").drop_nulls(
        "stacks").unnest("stacks")
    if s.height == 0:
        return schema.empty_stacks().with_columns(pl.lit(None, pl.Utf8).alias("host"),
                                                  pl.col("ts_ns").alias("t_ns"))
    s = s.with_columns((pl.col("start_ns") + pl.col("t_off_ns")).alias("t_ns"))
    s = s.with_columns(pl.col("t_ns").alias("ts_ns"), pl.col("count").cast(pl.Int64))
    return s.join(stack_dict, on="stack_id", how="left").sort("t_ns")


def _merge_stacks(st: pl.DataFrame, windows: list[dict[str, Any]]) -> pl.DataFrame:
    """Merge the stack rows that detect_hotspots cannot tell apart (same rank, same stack,
    same membership in every window, computed as it does): its profiles are sums of counts,
    so the findings are unchanged and its per-row loop runs over far fewer rows."""
    if st.height == 0:
        return st
    half = pl.col("interval_ns").fill_null(0) // 2
    member = [
        (((pl.col("t_ns") - half) <= w["end_ns"]) & ((pl.col("t_ns") + half) >= w["start_ns"]))
        .cast(pl.Int8).alias(f"_w{i}")
        for i, w in enumerate(windows)
    ]
    st = st.with_columns(member)
    keys = ["rank", "stack_id", *[f"_w{i}" for i in range(len(windows))]]
    other = [c for c in st.columns if c not in keys and c != "count"]
    merged = st.group_by(keys).agg(pl.col("count").sum(), *[pl.col(c).first() for c in other])
    return merged.drop([k for k in keys if k.startswith("_w")]).sort("t_ns")


def _hang_inputs(summs: Sequence[Summaries], offsets: dict[str, int]):
    tails = [s.tail for s in summs if s.tail.height]
    if not tails:
        return None
    t = pl.concat(tails, how="vertical_relaxed")
    t = shift_hosts(t, offsets, ["last_call_ns"])
    off = pl.col("host").replace_strict(offsets, default=0, return_dtype=pl.Int64) if any(
        offsets.values()) else pl.lit(0, pl.Int64)
    base = t.select("rank", "host", "tgid")
    infl = (
        t.select("rank", "host", "tgid", "in_flight").explode("in_flight").drop_nulls("in_flight")
        .unnest("in_flight").with_columns(pl.col("t_ns") + off, pl.lit(True).alias("in_flight"))
    )
    lastc = t.filter(pl.col("last_call").is_not_null()).select(
        "rank", "host", "tgid", pl.col("last_call").alias("name"), pl.lit("other").alias("kind"),
        pl.col("last_call_ns").alias("t_ns"), pl.lit(False).alias("in_flight"),
    )
    exits = t.filter(pl.col("exited")).select(
        "rank", "host", "tgid", pl.lit("exit").alias("name"), pl.lit("exit").alias("kind"),
        pl.col("last_call_ns").alias("t_ns"), pl.lit(False).alias("in_flight"),
    )
    cols = {"rank": pl.Int32, "host": pl.Utf8, "tgid": pl.Int32, "name": pl.Utf8,
            "kind": pl.Utf8, "t_ns": pl.Int64, "in_flight": pl.Boolean}
    tl = pl.concat([f.select([pl.col(c).cast(d) for c, d in cols.items()])
                    for f in (infl, lastc, exits)]).sort("t_ns")
    del base
    coll = t.select("rank", "host", "comms").explode("comms").drop_nulls("comms").unnest("comms")
    sd = pl.concat([s.stack_dict for s in summs]).unique("stack_id")
    st = t.select("rank", "latest_stacks").explode("latest_stacks").drop_nulls(
        "latest_stacks").unnest("latest_stacks")
    st = st.with_columns(pl.col("count").cast(pl.Int64)).join(sd, on="stack_id", how="left")
    blocked, python = [], []
    for rank, tgid, text in t.select("rank", "tgid", "hang_context").drop_nulls(
            "hang_context").rows():
        c = json.loads(text)
        blocked += [{**b, "rank": rank, "tgid": tgid, "state": "off_cpu"}
                    for b in c.get("blocked") or []]
        python += [{**p, "rank": rank, "tgid": tgid} for p in c.get("python") or []]
    if blocked:
        types = {c: schema.STACKS_SCHEMA[c] for c in ("rank", "tgid", "state", *BLOCKED_COLS)}
        st = pl.concat([st.with_columns(pl.lit(None, pl.Utf8).alias("state")),
                        pl.DataFrame(blocked, schema=types)], how="diagonal_relaxed")
    py = pl.DataFrame(python, schema=schema.PYSTACKS_SCHEMA) if python else None
    return tl, coll, st, py


def _manifests(summs: Sequence[Summaries]) -> list[tuple[dict[str, Any], str]]:
    """(manifest, host) of every recording the summaries were built from."""
    out = []
    for s in summs:
        out.append((s.manifest or s.meta.get("manifest") or {}, s.host))
        for man in s.meta.get("extra_manifests") or []:
            out.append((man, str(man.get("host") or s.host)))
    return out


def _host_context(summs: Sequence[Summaries], manifests) -> host_context.HostContext:
    rows = [s.host_ctx for s in summs if s.host_ctx.height]
    own: dict[int, set[str]] = {}
    for s in summs:
        if s.tail.height:
            for rank, threads in s.tail.select("rank", "threads").rows():
                if threads:
                    own.setdefault(int(rank), set()).update(threads)
    rank_of_tgid, host_of_rank = host_context.rank_maps(manifests)
    durations = [float(r.get("duration_s") or 0) for s in summs
                 for r in s.meta.get("recordings") or []]
    return host_context.HostContext(
        rows=pl.concat(rows, how="vertical_relaxed") if rows else pl.DataFrame(),
        own_threads=own, rank_of_tgid=rank_of_tgid, host_of_rank=host_of_rank,
        seconds=max(durations) if durations else 0.0,
    )


def _stages(summs: Sequence[Summaries]) -> list[list[int]]:
    tails = [s.tail.select("rank", "step_comm", "p2p", "stage") for s in summs if s.tail.height]
    if not tails:
        return []
    t = pl.concat(tails).with_columns(pl.col("stage").fill_null(pl.col("step_comm")))
    if not t["p2p"].fill_null(False).any():
        return []
    return pipeline.stages_of(dict(t.drop_nulls("stage").select("rank", "stage").rows()))


def from_summaries(
    summs: Sequence[Summaries],
    upto_step: int | None = None,
    with_tail: bool = True,
) -> Evidence:
    """The Evidence of summaries alone (one per node, module doc): what `from_recordings`
    gives for the recordings they were built from, so the same report comes out.

    `upto_step` keeps the steps <= it (a live diagnosis replayed step by step); `with_tail`
    False ignores the end-of-recording tail (what a live view has not seen yet)."""
    summs = list(summs)
    steps = pl.concat([s.steps for s in summs], how="vertical_relaxed") if summs else (
        pl.DataFrame(schema=STEP_SCHEMA))
    # summaries made before a column existed (written ones are read with every column)
    steps = steps.with_columns([pl.lit(None, t).alias(c) for c, t in STEP_SCHEMA.items()
                                if c not in steps.columns])
    if upto_step is not None:
        steps = steps.filter(pl.col("step") <= upto_step)
    alignment = estimate_offsets(steps.select(list(STEP_COLUMNS)), pl.DataFrame(
        schema={"host": pl.Utf8}))
    offsets = alignment["offsets_ns"]
    for s in summs:
        offsets.setdefault(s.host, 0)
    steps = shift_hosts(steps, offsets, STEP_TIME_COLS)

    def hangs(after_s: float, step_ns: float | None) -> list[dict[str, Any]]:
        inputs = _hang_inputs(summs, offsets) if with_tail else None
        if inputs is None:
            return []
        tl, hcoll, hstacks, pystacks = inputs
        ends: dict[str, int] = {}
        for s in summs:
            for h, e in (s.meta.get("ends_ns") or {}).items():
                ends[h] = max(ends.get(h, e), e) + offsets.get(h, 0)
        return hang.detect_hangs(tl, hcoll, hstacks, ends, after_s, step_ns, pystacks)

    def cpu_stacks(windows: list[dict[str, Any]]) -> pl.DataFrame:
        sd = pl.concat([s.stack_dict for s in summs]).unique("stack_id")
        return _merge_stacks(_stack_frame(steps, sd), windows)

    manifests = _manifests(summs)
    recs = [Recording(manifest=s.manifest or (s.meta.get("manifest") or {}),
                      events=schema.empty_events(), stacks=schema.empty_stacks(), path=s.path,
                      gpu=s.gpu) for s in summs]
    det = (summs[0].meta if summs else {}).get("steps") or {}
    kn = [s.kernels for s in summs if s.kernels.height]
    fam = (pl.concat(kn, how="vertical_relaxed")
           .with_columns(pl.lit(None, pl.List(pl.Int64)).alias("durs"))
           .select([pl.col(c).cast(t) for c, t in kernels.FAMILY_SCHEMA.items()])
           if kn else kernels.empty_families())
    if upto_step is not None:
        fam = fam.filter(pl.col("step") <= upto_step)
    tails = [s.tail.select("rank", "tgid", "host") for s in summs if s.tail.height]
    seen = pl.concat(tails + [steps.select("rank", "tgid", "host")], how="vertical_relaxed")
    return Evidence(
        recordings=recs,
        manifests=manifests,
        recording_info=[r for s in summs for r in s.meta.get("recordings") or []],
        steps=steps.select(list(STEP_COLUMNS)),
        metrics=kernels.with_kernel_metrics(steps.select(*STEP_COLUMNS, *HOST_METRIC_COLS),
                                            kernels.metrics_of(fam)),
        detection={"detected": steps.height > 0, "method": det.get("method"),
                   "period": det.get("period"), "comm": det.get("comm")},
        alignment=alignment,
        seen=seen.unique("rank", keep="first", maintain_order=True),
        stages=_stages(summs),
        host=_host_context(summs, manifests),
        collectives=lambda: _coll_frame(steps),
        hangs=hangs,
        cpu_stacks=cpu_stacks,
        extra={"source": "summaries"},
        kernel_families=fam,
    )
