"""The daemon's segments: where they are, and one node's consecutive segments as one run.

`argus daemon` writes each job's summaries as consecutive segments,
`OUTPUT/jobs/<job>/<wall ns>/` (manifest.json + summaries/, `argus.recording.summaries`),
with step ids continuous across the segments of one job on one node. `expand_dirs` finds
the segments named by `argus report` arguments (an output directory, a job directory, a
segment or recording); `merge_segments` concatenates one node's segments into one
`Summaries` (`argus.analyze.merge` then aligns several nodes' step ids and clocks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from argus.errors import RecordingInvalid, UsageError
from argus.recording import schema
from argus.recording.summaries import TAIL_SCHEMA, Summaries, has_events, has_summaries

JOBS = "jobs"


def is_segment(directory: str | os.PathLike[str]) -> bool:
    """A directory `argus report` reads as one unit: a recording or a summaries folder."""
    return has_summaries(directory) or has_events(directory)


def _children_segments(d: Path) -> list[Path]:
    subs = [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]
    segs = [p for p in subs if has_summaries(p)]
    return sorted(segs, key=lambda p: (int(p.name) if p.name.isdigit() else 0, p.name))


def _daemon_job(segment: Path) -> str | None:
    """The daemon job a segment belongs to (its manifest's `job`, written with a
    `daemon_run`); None for anything else (an `argus attach` recording)."""
    try:
        manifest = json.loads((segment / schema.MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not manifest.get("daemon_run"):
        return None
    job = manifest.get("job")
    return job if isinstance(job, str) else None


def job_dirs(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """The jobs of a daemon output directory (`DIR/jobs/<job>/`): {job key: path}."""
    root = Path(directory) / JOBS
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and _children_segments(p)}


def expand_dirs(dirs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The recordings / segments named by `argus report` arguments, oldest segment first.

    Each argument is a recording or segment directory (itself), a job directory of the
    daemon (its segments), or a daemon output directory: its job when it holds one, else the
    job that every given output directory holds (several nodes' daemons), else a UsageError
    naming the jobs. A folder of segments must hold one daemon job's (a `jobs/<job>/` folder,
    or segments whose manifests name one job): several recordings of `argus attach` (or of
    different jobs) in one parent are a UsageError, never one job. A
    directory that is none of these is a RecordingInvalid."""
    out: list[Path] = []
    outputs: list[tuple[Path, dict[str, Path]]] = []
    for raw in dirs:
        d = Path(raw)
        if is_segment(d):
            out.append(d)
        elif not d.is_dir():
            raise RecordingInvalid(f"{d} is not a directory.")
        elif (jobs := job_dirs(d)) or (d / JOBS).is_dir():
            outputs.append((d, jobs))
        elif segs := _children_segments(d):
            jobs = {_daemon_job(p) for p in segs}
            one_job = d.parent.name == JOBS or (None not in jobs and len(jobs) == 1)
            if len(segs) > 1 and not one_job:
                names = ", ".join(p.name for p in segs[:4]) + (", ..." if len(segs) > 4 else "")
                raise UsageError(
                    f"{d} holds {len(segs)} recordings that are not the segments of one daemon "
                    f"job ({names}): argus does not merge them into one job.",
                    remedy=f"Name one (argus report {d}/<recording>), or the nodes of one job "
                    f"explicitly (argus report NODE1_DIR NODE2_DIR).",
                )
            out.extend(segs)
        else:
            raise RecordingInvalid(
                f"{d} holds no argus recording, summaries, daemon segments or jobs/ folder."
            )
    if outputs:
        common = set.intersection(*(set(j) for _d, j in outputs))
        for d, jobs in outputs:
            if not jobs:
                raise RecordingInvalid(f"{d}/{JOBS} holds no job segments yet.")
            pick = next(iter(jobs)) if len(jobs) == 1 else (
                next(iter(common)) if len(common) == 1 else None)
            if pick is None or pick not in jobs:
                names = ", ".join(sorted(jobs))
                raise UsageError(
                    f"{d} holds several jobs ({names}).",
                    remedy=f"Name one: argus report {d}/{JOBS}/<job> (one per node).",
                )
            out.extend(_children_segments(jobs[pick]))
    return out


def merge_segments(segments: Sequence[Summaries]) -> Summaries:
    """One node's consecutive segments of one job as one `Summaries`.

    Steps are concatenated (a (rank, step) written twice is kept once: the first), step ids
    are kept as written (the daemon numbers them continuously per job); the stack
    dictionaries are united; the tail keeps, per rank, the row of the latest segment that
    has the rank (a rank that exited earlier keeps its last known state); NVML samples are
    concatenated; the manifest is the latest one with every segment's ranks, the earliest
    start and the latest end; meta lists every segment's recording entry."""
    segs = sorted(segments, key=lambda s: (s.manifest.get("started_ns") or 0,
                                           int(s.steps["start_ns"].min() or 0)
                                           if s.steps.height else 0))
    if len(segs) == 1:
        return segs[0]
    steps = pl.concat([s.steps for s in segs], how="vertical_relaxed")
    steps = steps.unique(["rank", "step"], keep="first", maintain_order=True).sort(["step", "rank"])
    sd = pl.concat([s.stack_dict for s in segs], how="vertical_relaxed").unique(
        "stack_id", keep="first", maintain_order=True)
    tails = [s.tail for s in reversed(segs) if s.tail.height]
    tail = (pl.concat(tails, how="vertical_relaxed").unique("rank", keep="first",
                                                            maintain_order=True).sort("rank")
            if tails else pl.DataFrame(schema=TAIL_SCHEMA))
    gpus = [s.gpu for s in segs if s.gpu.height]
    gpu = pl.concat(gpus, how="vertical_relaxed").unique(maintain_order=True) if gpus else (
        schema.empty_gpu())
    last = segs[-1]
    ranks: dict = {}
    for s in segs:
        for r in (s.manifest or {}).get("ranks") or []:
            if isinstance(r, dict):
                ranks[(r.get("rank"), r.get("tgid"))] = r
    manifest = dict(last.manifest or {})
    if manifest:
        manifest["ranks"] = list(ranks.values())
        starts = [s.manifest.get("started_ns") for s in segs if s.manifest.get("started_ns")]
        if starts:
            manifest["started_ns"] = min(starts)
        manifest["segments"] = len(segs)
    ends: dict[str, int] = {}
    for s in segs:
        for h, e in (s.meta.get("ends_ns") or {}).items():
            ends[h] = max(ends.get(h, e), e)
    meta = dict(last.meta, ends_ns=ends,
                recordings=[r for s in segs for r in s.meta.get("recordings") or []])
    if meta.get("manifest"):
        meta["manifest"] = dict(meta["manifest"], ranks=list(ranks.values()))
    extra = {}
    if "host_ctx" in Summaries.__dataclass_fields__:  # host context summaries (newer format)
        hcs = [s.host_ctx for s in segs if s.host_ctx.height]
        if hcs:
            extra["host_ctx"] = pl.concat(hcs, how="vertical_relaxed").unique(maintain_order=True)
    kns = [s.kernels for s in segs if s.kernels.height]
    if kns:
        extra["kernels"] = pl.concat(kns, how="vertical_relaxed").unique(
            ["rank", "step", "cls", "family"], keep="first", maintain_order=True)
    return Summaries(meta=meta, steps=steps, stack_dict=sd, tail=tail, manifest=manifest,
                     gpu=gpu, path=last.path, **extra)
