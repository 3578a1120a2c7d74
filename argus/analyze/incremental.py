"""Incremental analysis of one job's live rows: summaries of the new steps only, interval
after interval, with step ids continuous across intervals (what `argus daemon` and the
attach-backed `argus top` run on each drain of the tracer).

A `JobWindow` holds one job's state between intervals. Per interval the composer
(`argus.daemon.service`, `argus.cli.top`) calls:
1. `add_rows` with the rows the drain brought (events, CPU stacks, host context);
2. `settling` before the job's first steps: its ranks are attached one scan after another,
   so the first build waits until they were traced together for a while;
3. `update(recording, ...)`: `build_summaries` over the raw rows kept (the new steps plus a
   fixed overlap of `OVERLAP_STEPS` summarised steps per rank), then
   - `learn_shifts`: the job's numbering of each (tgid, comm)'s NCCL collectives, kept from
     build to build (the tracer's `seq` counts per process since attach);
   - `new_steps`: the build's steps after each rank's watermark, with the job's ids
     (`assign_ids`: anchored on each rank's own previous ids through the overlap's
     (rank, start_ns) pairs, never the build's numbering);
   - `window_steps`: the job's summaries for the diagnosis, the last `window_s` (at most
     `MAX_DIAG_STEPS` steps); `merge_tail`: each rank's latest tail; the stack dictionary
     of what those refer to;
4. `cut`: the raw rows are kept from the start of each rank's `OVERLAP_STEPS`-th last
   summarised step on (at most `window_s`), so the work of an interval grows with the steps
   it brought, not with the window;
5. `summaries(manifest, build)`: the job's window as one `Summaries`, the input of
   `analyze.diagnosis.diagnose`.
The functions below the class are pure (polars frames in, frames out); the class only
keeps their results.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from argus import __version__
from argus.analyze.compress import TAIL_SEQS, build_summaries
from argus.analyze.hang import LATEST_INTERVALS
from argus.recording import schema
from argus.recording.io import Recording
from argus.recording.summaries import STACK_DICT_SCHEMA, STEP_SCHEMA, TAIL_SCHEMA, Summaries

OVERLAP_STEPS = 8  # summarised steps re-read by the next build (boundaries + id mapping)
MAX_DIAG_STEPS = 2000  # steps of a job the diagnosis reads at most (besides window_s)
LEARN_SEQS = 8  # collectives of a (tgid, comm) in one build before its numbering is kept


def _empty(s: dict) -> pl.DataFrame:
    return pl.DataFrame(schema=s)


@dataclass
class Build:
    """What one `JobWindow.update` produced: the build's summaries (`summ`), its new steps
    with the job's ids (`new`), the raw events it read and how long the build took."""

    summ: Summaries
    new: pl.DataFrame
    raw_events: int
    summaries_s: float


@dataclass
class JobWindow:
    """One job's incremental analysis state between intervals (see the module doc)."""

    # raw rows not yet behind the overlap: events, stacks, host context (monotonic ts_ns)
    events: pl.DataFrame = field(default_factory=schema.empty_events)
    stacks: pl.DataFrame = field(default_factory=schema.empty_stacks)
    host: pl.DataFrame = field(default_factory=schema.empty_host)
    kernels: pl.DataFrame = field(default_factory=schema.empty_kernels)  # GPU agent rows
    # the summaries the diagnosis reads: continuous step ids, the last window_s
    steps: pl.DataFrame = field(default_factory=lambda: _empty(STEP_SCHEMA))
    stack_dict: pl.DataFrame = field(default_factory=lambda: _empty(STACK_DICT_SCHEMA))
    tail: pl.DataFrame = field(default_factory=lambda: _empty(TAIL_SCHEMA))
    gpu: pl.DataFrame = field(default_factory=schema.empty_gpu)
    meta: dict[str, Any] = field(default_factory=dict)
    watermark: dict[int, int] = field(default_factory=dict)  # rank -> last step start written
    next_id: int = 0  # the job's next step id
    started_ns: int | None = None  # monotonic ns of the first rows
    joined_ns: int | None = None  # monotonic ns when its latest rank was added
    # (tgid, comm) -> gseq - seq: the job's numbering of its NCCL collectives, kept from build
    # to build (the tracer's seq counts per process since attach), so every build's tails and
    # steps number collectives alike whatever its window holds
    seq_shifts: dict[tuple[int, str], int] = field(default_factory=dict)

    def add_rows(self, ev: pl.DataFrame, st: pl.DataFrame, hc: pl.DataFrame, now_ns: int,
                 interval_s: float, kn: pl.DataFrame | None = None) -> None:
        """Append a drain's rows (events, stacks, host context, GPU agent kernels) to the
        raw rows kept."""
        if self.started_ns is None:
            self.started_ns = now_ns - int(interval_s * 1e9)
        for name, new in (("events", ev), ("stacks", st), ("host", hc), ("kernels", kn)):
            if new is not None and new.height:
                old = getattr(self, name)
                setattr(self, name, pl.concat([old, new], how="vertical_relaxed")
                        if old.height else new)

    def settling(self, now_ns: int, settle_s: float) -> bool:
        """Before a job's first steps: True until all its ranks found so far have been
        traced together for `settle_s`; then the rows from before the last one joined are
        dropped (`settle_rows`) and False. Ranks are attached one scan after another, each
        with its own collective counters: a first build over a short, staggered start
        matches their collectives on too few pairs and numbers their steps inconsistently."""
        if self.steps.height or self.joined_ns is None:
            return False
        if now_ns - self.joined_ns < int(settle_s * 1e9):
            return True
        self.events, self.stacks, self.host = settle_rows(self.events, self.stacks, self.host,
                                                          self.joined_ns)
        self.kernels = self.kernels.filter(pl.col("ts_ns") >= self.joined_ns)
        self.started_ns = max(self.started_ns or self.joined_ns, self.joined_ns)
        return False

    def update(self, rec: Recording, gpu_new: pl.DataFrame, now_ns: int, window_s: float,
               final: bool) -> Build:
        """One build over `rec` (the raw rows kept, in-flight calls included): the new
        steps, the window's steps, tail, NVML rows and stack dictionary (module doc, 3).
        `final`: every rank has exited."""
        t0 = time.perf_counter()
        summ = build_summaries([rec], seq_shifts=self.seq_shifts)
        summaries_s = round(time.perf_counter() - t0, 3)
        self.seq_shifts, renumbered = learn_shifts(self.seq_shifts,
                                                   summ.meta.pop("seq_shifts", []))
        new, self.watermark, self.next_id = new_steps(summ.steps, self.steps, self.watermark,
                                                      self.next_id, final)
        self.steps = window_steps(
            pl.concat([self.steps, new.select(self.steps.columns)], how="vertical_relaxed"),
            window_s)
        self.tail = merge_tail(summ.tail, self.tail, renumbered)
        self.meta = summ.meta
        if gpu_new.height:
            self.gpu = (pl.concat([self.gpu, gpu_new], how="vertical_relaxed") if self.gpu.height
                        else gpu_new)
        if self.gpu.height:
            self.gpu = self.gpu.filter(pl.col("ts_ns") >= now_ns - int(window_s * 1e9))
        used = stack_ids(self.steps) | stack_ids(self.tail)
        sd = pl.concat([summ.stack_dict, self.stack_dict], how="vertical_relaxed")
        self.stack_dict = sd.unique("stack_id", keep="first").filter(
            pl.col("stack_id").is_in(sorted(used)))
        return Build(summ=summ, new=new, raw_events=rec.events.height, summaries_s=summaries_s)

    def cut(self, now_ns: int, window_s: float, mono_to_wall_ns: int) -> None:
        """Drop the raw rows the next build does not re-read (`cut_rows`)."""
        self.events, self.stacks, self.host, cut = cut_rows(
            self.events, self.stacks, self.host, self.steps,
            now_ns - int(window_s * 1e9), mono_to_wall_ns)
        self.kernels = self.kernels.filter(pl.col("ts_ns") >= cut)  # the events' cut
        self.started_ns = max(self.started_ns or cut, cut)

    def summaries(self, manifest: dict[str, Any], build: Build) -> Summaries:
        """The job's window as the diagnosis reads it (its steps, tail, stacks, NVML)."""
        extra = {}
        if hasattr(build.summ, "host_ctx"):  # host-context summaries (when the format has them)
            extra["host_ctx"] = build.summ.host_ctx
        return Summaries(meta=build.summ.meta, steps=self.steps, stack_dict=self.stack_dict,
                         tail=self.tail, manifest=manifest, gpu=self.gpu, **extra)


def window_manifest(job: str, host: str, ranks: list[dict[str, Any]], start_ns: int,
                    end_ns: int, mono_to_wall_ns: int, channels: dict[str, bool],
                    sample_hz: int, gpu: dict[str, Any] | None, run_id: str,
                    kernel: str) -> dict[str, Any]:
    """The manifest of one interval's window of a live job (a daemon segment's
    manifest.json): `ranks` as the recording writer lists them, `channels` each switch of
    the tracer and whether it was on (the collector's list, as `argus attach` writes it),
    `gpu` the NVML state (None: no sampler), `run_id` the live run that numbers the steps
    (`daemon_run`)."""
    return {
        "format": schema.FORMAT, "argus_version": __version__, "host": host,
        "kernel": kernel, "clock": {"mono_to_wall_ns": mono_to_wall_ns},
        "started_ns": start_ns, "ended_ns": end_ns,
        "duration_s": round((end_ns - start_ns) / 1e9, 3), "end_reason": "daemon_window",
        "sample_hz": sample_hz if channels.get("cpu") else 0,
        "channels": {**channels,
                     "gpu": bool(gpu and gpu.get("available"))},
        "ranks": ranks, "probes": [], "drops": {}, "job": job,
        "daemon_run": run_id,  # segments of one daemon run number steps on
        **({"gpu": gpu} if gpu is not None else {}),
    }


def settle_rows(events: pl.DataFrame, stacks: pl.DataFrame, host: pl.DataFrame,
                since_ns: int) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """The raw rows from `since_ns` on (a stack interval reaching past it counts)."""
    keep = pl.col("ts_ns") >= since_ns
    return (events.filter(keep),
            stacks.filter(pl.col("ts_ns") + pl.col("interval_ns").fill_null(0) >= since_ns),
            host.filter(keep))


def learn_shifts(known: dict[tuple[int, str], int], found: list[tuple[int, str, int, int]],
                 learn_seqs: int = LEARN_SEQS) -> tuple[dict[tuple[int, str], int], set[int]]:
    """The job's collective numbering after a build: each (tgid, comm, shift, n) the build
    found (`summ.meta["seq_shifts"]`) replaces the known shift, and a new one is kept once
    it rests on at least `learn_seqs` collectives. Returns (shifts, the tgids whose known
    numbering the build corrected)."""
    shifts = dict(known)
    renumbered = set()
    for tgid, comm, shift, n in found:
        old = shifts.get((tgid, comm))
        if old is not None or n >= learn_seqs:
            shifts[(tgid, comm)] = shift
        if old is not None and old != shift:
            renumbered.add(tgid)
    return shifts, renumbered


def new_steps(steps: pl.DataFrame, done: pl.DataFrame, watermark: dict[int, int],
              next_id: int, final: bool = False) -> tuple[pl.DataFrame, dict[int, int], int]:
    """The build's `steps` not summarised before (start after the rank's `watermark`), with
    the job's continuous ids (`assign_ids` against the job's summaries `done`). A rank's
    last step of the build gives up the CPU samples after its end (build_summaries gives
    them to the nearest step: they are the next step's, in the next build) unless `final`
    (every rank has exited: the last step keeps them, as at the end of a recording).
    Returns (new steps, new watermark, next free id)."""
    wm = dict(watermark)
    new = steps.filter(pl.col("start_ns") > pl.col("rank").replace_strict(
        wm, default=-1, return_dtype=pl.Int64))
    if not new.height:
        return new, wm, next_id
    new = assign_ids(done, steps, new, next_id)
    new = new.filter(pl.col("step") >= 0)
    last = steps.group_by("rank").agg(pl.col("start_ns").max().alias("_last"))
    if final:
        last = last.with_columns(pl.lit(None, pl.Int64).alias("_last"))
    new = new.join(last, on="rank", how="left").with_row_index("_i")
    ex = new.filter(pl.col("start_ns") == pl.col("_last")).select(
        "_i", "step_time_ns", "stacks").explode("stacks")
    if ex.height:
        kept = ex.filter(pl.col("stacks").struct.field("t_off_ns") < pl.col("step_time_ns"))
        kept = kept.group_by("_i").agg(pl.col("stacks").alias("_kept"))
        new = new.join(kept, on="_i", how="left").with_columns(
            pl.when(pl.col("start_ns") == pl.col("_last")).then(pl.col("_kept"))
            .otherwise(pl.col("stacks")).alias("stacks")).drop("_kept")
    new = new.drop("_i", "_last")
    for rank, last_start in new.group_by("rank").agg(pl.col("start_ns").max()).rows():
        wm[rank] = max(wm.get(rank, -1), int(last_start))
    if new.height:
        next_id = max(next_id, int(new["step"].max()) + 1)
    return new, wm, next_id


def window_steps(steps: pl.DataFrame, window_s: float,
                 max_steps: int = MAX_DIAG_STEPS) -> pl.DataFrame:
    """The steps the diagnosis reads: those ending within `window_s` of the newest end,
    and among the newest `max_steps` step ids."""
    if not steps.height:
        return steps
    newest = int(steps["end_ns"].max())
    return steps.filter((pl.col("end_ns") >= newest - int(window_s * 1e9))
                        & (pl.col("step") > int(steps["step"].max()) - max_steps))


def cut_rows(events: pl.DataFrame, stacks: pl.DataFrame, host: pl.DataFrame,
             steps: pl.DataFrame, floor_ns: int, mono_to_wall_ns: int,
             overlap: int = OVERLAP_STEPS,
             ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, int]:
    """The raw rows the next build re-reads: from the start (wall ns in `steps`, monotonic
    in the rows) of each rank's `overlap`-th last summarised step on, never before
    `floor_ns` (now - window). Stack rows: the intervals reaching past the cut, plus each
    process's `LATEST_INTERVALS` latest (the hang detector's latest stacks, as at the end
    of a recording). Returns (events, stacks, host, the cut in monotonic ns)."""
    cut = floor_ns
    if steps.height:
        starts = (steps.sort("start_ns").group_by("rank")
                  .agg(pl.col("start_ns").tail(overlap).first())["start_ns"])
        cut = max(floor_ns, int(starts.min()) - mono_to_wall_ns)
    keep = pl.col("ts_ns") >= cut
    if stacks.height:
        latest = pl.col("ts_ns").rank("dense", descending=True).over("tgid") <= (
            LATEST_INTERVALS)
        stacks = stacks.filter((pl.col("ts_ns") + pl.col("interval_ns").fill_null(0) >= cut)
                               | latest)
    return events.filter(keep), stacks, host.filter(keep), cut


def assign_ids(done: pl.DataFrame, steps: pl.DataFrame, new: pl.DataFrame,
               next_id: int) -> pl.DataFrame:
    """The job's ids of a build's new steps (`new`, rows of the build's `steps`), given the
    job's summaries so far (`done`) and its next free id.

    A build's own ids are not used: they depend on how the build matched the ranks'
    collectives (dense over every rank's cycle starts: one rank matched a bucket off
    interleaves the cycle starts and the ids advance by 2 per step, seen as 52, 54 under
    CPU load) and on the step detector's numbering. Instead:
    - a rank with steps goes on from its own: from its latest step the build found again
      (same start_ns), else its last one; the next step is the next id, plus the steps that
      fit in a hole between them (a step the build could not close on this rank: the time
      from the previous end to this start over the rank's median step time, rounded);
    - a rank new to the job (or every rank, in a job's first build, after numbering the
      rank with the most steps from `next_id`) takes the id of the numbered step that
      starts nearest to each of its steps, within half the median step time (every rank's
      step ends at the same end-of-step wait, so one step starts at nearly the same time
      on every rank); its steps without such a neighbour go on from the previous one (or
      back from the next one) as above, and its ids only increase."""
    allsteps = pl.concat([done.select("step_time_ns"), steps.select("step_time_ns")])
    dt_all = float(allsteps["step_time_ns"].median() or 0) or 1.0
    half = dt_all / 2
    rows: dict[int, list[tuple[int, int]]] = {}
    for r, st, en in steps.sort("start_ns").select("rank", "start_ns", "end_ns").rows():
        rows.setdefault(r, []).append((st, en))
    dts = {r: float(dt or 0) or dt_all for r, dt in pl.concat([
        done.select("rank", "step_time_ns"), steps.select("rank", "step_time_ns")],
        how="vertical_relaxed").group_by("rank").agg(pl.col("step_time_ns").median()).rows()}
    prev = {r: (i, e) for r, i, e in done.sort("start_ns").group_by("rank").agg(
        pl.col("step").last(), pl.col("end_ns").last()).rows()}
    ids: dict[tuple[int, int], int] = {
        (r, st): i for r, st, i in done.join(steps.select("rank", "start_ns"),
                                             on=["rank", "start_ns"])
        .select("rank", "start_ns", "step").rows()}
    want = {(r, st) for r, st in new.select("rank", "start_ns").rows()}

    def after(prev_id: int, prev_end: int, start: int, r: int) -> int:
        return prev_id + 1 + max(0, round((start - prev_end) / dts[r]))

    for r in sorted(set(rows) & set(prev)):  # ranks with steps: go on from their own ids
        cur = prev[r]
        for st, en in rows[r]:
            if (r, st) in ids:
                cur = (ids[(r, st)], en)
            elif (r, st) in want:
                ids[(r, st)] = after(cur[0], cur[1], st, r)
                cur = (ids[(r, st)], en)
    rest = sorted(set(rows) - set(prev), key=lambda r: (-len(rows[r]), r))
    first_build = not done.height
    if first_build and rest:  # the rank with the most steps, numbered from 0 (shifted below)
        r0 = rest.pop(0)
        cur = None
        for st, en in rows[r0]:
            ids[(r0, st)] = 0 if cur is None else after(cur[0], cur[1], st, r0)
            cur = (ids[(r0, st)], en)
    if rest:
        ref = sorted((st, i) for (_r, st), i in ids.items())
        starts = [st for st, _i in ref]
        for r in rest:
            got: list[int | None] = []
            for st, _en in rows[r]:
                k = bisect.bisect_left(starts, st)
                near = [j for j in (k - 1, k) if 0 <= j < len(starts)]
                best = min(near, key=lambda j: abs(starts[j] - st)) if near else None
                got.append(ref[best][1] if best is not None and abs(starts[best] - st) <= half
                           else None)
            if all(g is None for g in got):  # nothing to match: after everything numbered
                top = max((i for i in ids.values()), default=next_id - 1)
                got[0] = top + 1
            lead = next(i for i, g in enumerate(got) if g is not None)
            for i in range(lead + 1, len(got)):  # forward: matched if it increases, else on
                (st, _en), (_pst, pen) = rows[r][i], rows[r][i - 1]
                on = after(got[i - 1], pen, st, r)
                if got[i] is None or got[i] <= got[i - 1]:
                    got[i] = on
            for i in range(lead - 1, -1, -1):  # back from the first matched step
                (st, en), (nst, _nen) = rows[r][i], rows[r][i + 1]
                got[i] = got[i + 1] - 1 - max(0, round((nst - en) / dts[r]))
            for (st, _en), g in zip(rows[r], got, strict=True):
                if (r, st) in want:
                    ids[(r, st)] = g
    if first_build and ids:
        base = next_id - min(ids.values())
        ids = {k: v + base for k, v in ids.items()}
    fixed = pl.DataFrame([(r, st, j) for (r, st), j in ids.items() if (r, st) in want],
                         schema={"rank": new.schema["rank"], "start_ns": pl.Int64,
                                 "_id": pl.Int64}, orient="row")
    return new.join(fixed, on=["rank", "start_ns"], how="left").with_columns(
        pl.col("_id").alias("step")).drop("_id").filter(pl.col("step").is_not_null())


def merge_tail(new: pl.DataFrame, old: pl.DataFrame,
               renumbered: set[int] = frozenset()) -> pl.DataFrame:
    """The job's tail after a build: each rank's row of the build (what it does now), else
    its previous row (a rank whose raw rows all aged out, e.g. hung for longer than the
    window). A rank's collectives (`comms`) are the union of the previous row's and the
    build's (same process: one numbering, `JobWindow.seq_shifts`; not for a process in
    `renumbered`, whose numbering the build just corrected), the last TAIL_SEQS per comm:
    a window that lost a rank's older rows does not make it look as if it never issued
    them (the hang detector's waiting/missing ranks come from these)."""
    if not old.height:
        return new.sort("rank") if new.height else new
    if not new.height:
        return old
    cols = new.columns
    same = new.select("rank", "tgid").join(old.select("rank", "tgid"), on=["rank", "tgid"])
    if renumbered:
        same = same.filter(~pl.col("tgid").is_in(sorted(renumbered)))
    both = pl.concat([
        new.join(same, on=["rank", "tgid"]).select("rank", "comms", pl.lit(0).alias("_o")),
        old.join(same, on=["rank", "tgid"]).select("rank", "comms", pl.lit(1).alias("_o")),
    ], how="vertical_relaxed").explode("comms").drop_nulls("comms")
    if both.height:
        both = both.with_columns(pl.col("comms").struct.field("comm").alias("_c"),
                                 pl.col("comms").struct.field("gseq").alias("_g"))
        merged = (both.sort("_o").unique(["rank", "_c", "_g"], keep="first")
                  .sort(["rank", "_c", "_g"]).group_by(["rank", "_c"], maintain_order=True)
                  .tail(TAIL_SEQS).group_by("rank", maintain_order=True)
                  .agg(pl.col("comms").alias("_comms")))
        new = new.join(merged, on="rank", how="left").with_columns(
            pl.coalesce("_comms", "comms").alias("comms")).drop("_comms")
    kept = old.join(new.select("rank"), on="rank", how="anti")
    return pl.concat([new.select(cols), kept.select(cols)], how="vertical_relaxed").sort("rank")


def stack_ids(frame: pl.DataFrame) -> set[int]:
    """Stack ids a steps frame (`stacks`) or a tail (`latest_stacks`) refers to."""
    col = "stacks" if "stacks" in frame.columns else "latest_stacks"
    if not frame.height or col not in frame.columns:
        return set()
    ids = frame.select(pl.col(col).explode().struct.field("stack_id")).to_series()
    return set(ids.drop_nulls().to_list())


def segment_summaries(job: str, steps: pl.DataFrame, tail: pl.DataFrame,
                      stack_dict: pl.DataFrame, meta: dict[str, Any],
                      manifest: dict[str, Any], gpu: pl.DataFrame | None,
                      host_ctx: pl.DataFrame | None) -> Summaries:
    """What a daemon segment holds: the given steps (continuous ids) with the job's current
    tail, the stack dictionary entries those two refer to, the NVML and host-context rows."""
    used = stack_ids(steps) | stack_ids(tail)
    sd = stack_dict.filter(pl.col("stack_id").is_in(sorted(used)))
    extra = {"host_ctx": host_ctx} if host_ctx is not None else {}
    return Summaries(meta=dict(meta, job=job), steps=steps, stack_dict=sd, tail=tail,
                     manifest=manifest, gpu=gpu, **extra)


def newer_rows(frame: pl.DataFrame | None, watermark_ns: int,
               ) -> tuple[pl.DataFrame | None, int]:
    """The rows of `frame` after `watermark_ns` (ts_ns) and the new watermark (host-context
    rows a segment has not written yet)."""
    if frame is None or not frame.height:
        return frame, watermark_ns
    frame = frame.filter(pl.col("ts_ns") > watermark_ns)
    if frame.height:
        watermark_ns = int(frame["ts_ns"].max())
    return frame, watermark_ns
