"""Assembly of the `argus.report/1` object from one or several recordings (one per node).

`diagnose` builds the detectors' inputs from raw events: timeline -> collectives matched
across ranks -> steps -> clock alignment of the nodes -> per-step metrics, CPU stacks, NVML
samples, host context, pipeline stages. `argus.analyze.summary.diagnose_summaries` builds
the same inputs from per-rank-per-step summaries. Both hand them (an `Evidence`) to
`assemble_report`, the one place that runs the detectors (anomalous windows -> stragglers
and the slow pipeline stage -> collective stalls -> hangs -> CPU hotspots -> GPU throttling
-> host context), sorts the findings and builds the report object: a detector added there
runs on both paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from argus import __version__
from argus.analyze import anomaly, gpu, hang, hotspot, pipeline, stall, straggler
from argus.analyze import host as host_context
from argus.analyze.align import estimate_offsets
from argus.analyze.matching import align_seq, collectives, with_lateness
from argus.analyze.steps import detect_steps, realign_by_steps, step_metrics
from argus.analyze.timeline import (
    build_pystacks,
    build_stacks,
    build_timeline,
    recording_end_ns,
    shift_hosts,
)
from argus.recording.io import Recording

SCHEMA = "argus.report/1"
DEFAULT_HANG_AFTER_S = 10.0
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
KIND_ORDER = {
    "collective_hang": 0,
    "straggler": 1,
    "gpu_throttle": 1.5,  # right after the straggler it explains
    "cpu_contention": 1.6,  # host context (host.parquet) that explains a straggler
    "oom_kill": 1.7,
    "tcp_retransmits": 1.8,
    "block_io_stall": 1.9,
    "collective_stall": 2,
    "cpu_hotspot": 3,
    "anomalous_window": 4,
}


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


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x / 1e6, 3)


def _quantiles(steps: pl.DataFrame) -> dict[int, dict[str, Any]]:
    """Per rank: complete steps and step_time_ms p50/p90/max (nearest rank, half to even)."""
    if steps.height == 0:
        return {}
    out = {}
    g = steps.group_by("rank").agg(pl.col("step_time_ns").sort())
    for r, vals in g.rows():
        v = np.asarray(vals, dtype=np.float64)
        n = len(v)

        def idx(q: float, n: int = n) -> int:
            return min(n - 1, int(np.round(q * (n - 1))))

        out[int(r)] = {
            "steps": n,
            "step_time_ms": {"p50": _ms(v[idx(0.5)]), "p90": _ms(v[idx(0.9)]),
                             "max": _ms(float(v[-1]))},
        }
    return out


def _ranks(ev: Evidence) -> list[dict[str, Any]]:
    """The ranks table: the manifests' ranks, then the ranks seen in the data."""
    seen: dict[int, dict[str, Any]] = {}
    for man, host in ev.manifests:
        for r in man.get("ranks") or []:
            if isinstance(r, dict) and r.get("rank") is not None:
                seen[int(r["rank"])] = {"rank": int(r["rank"]), "tgid": r.get("tgid"),
                                        "host": r.get("host") or host}
    if ev.seen.height:
        for rank, tgid, host in ev.seen.select("rank", "tgid", "host").rows():
            if rank is not None:
                seen.setdefault(rank, {"rank": rank, "tgid": tgid, "host": host})
    q = _quantiles(ev.steps)
    empty = {"steps": 0, "step_time_ms": {"p50": None, "p90": None, "max": None}}
    return [{**seen[r], **q.get(r, empty)} for r in sorted(seen)]


def _drops(manifests: Sequence[tuple[dict[str, Any], str]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for man, _host in manifests:
        for k, v in (man.get("drops") or {}).items():
            if isinstance(v, int):
                total[k] = total.get(k, 0) + v
    return total


def sort_findings(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most important first: severity (critical first), then kind (KIND_ORDER), then score."""
    return sorted(
        findings,
        key=lambda f: (
            SEVERITY_ORDER.get(f["severity"], 3),
            KIND_ORDER.get(f["kind"], 9),
            -(f.get("score") or 0),
        ),
    )


def assemble_report(ev: Evidence, hang_after_s: float = DEFAULT_HANG_AFTER_S) -> dict[str, Any]:
    """Run every detector on `ev` (see module doc for the order) and build the argus.report/1
    object. A healthy job yields no warning/critical findings."""
    metrics, steps = ev.metrics, ev.steps
    offsets = ev.alignment["offsets_ns"]
    step_ns = anomaly.typical_step_ns(metrics)

    windows = anomaly.detect_windows(metrics)
    # a window that CPU contention on the node explains is the node's, not the job's: info
    # below 2x, and no scope for stragglers or stalls (which read warning windows only)
    job_ranks = metrics["rank"].unique().to_list() if metrics.height else []
    host_context.explain_windows(ev.host, windows, ev.manifests, offsets, job_ranks, metrics)
    stragglers = straggler.detect_stragglers(metrics, windows, step_ns,
                                             pipeline=bool(ev.stages), stages=ev.stages,
                                             sync_every=anomaly.sync_period(
                                                 anomaly.step_series(metrics)))
    host_context.explain_stragglers(ev.host, stragglers, metrics, ev.manifests, offsets)
    stragglers = pipeline.detect_slow_stage(ev.recordings, ev.stages, metrics, offsets,
                                            stragglers, step_ns)
    anomaly.settle(windows, stragglers)
    stalls = stall.detect_stalls(metrics, windows, stragglers,
                                 ev.collectives() if windows else pl.DataFrame())
    hangs = ev.hangs(hang_after_s, step_ns or None)
    hotspots = (hotspot.detect_hotspots(ev.cpu_stacks(windows), windows, stragglers)
                if windows or stragglers else [])
    gpu_ranks = gpu.analyse(ev.recordings, steps, offsets)  # NVML samples (gpu.parquet)
    throttles = gpu.detect_throttle(gpu_ranks, steps, stragglers)
    gpu.cite_in_stragglers(stragglers, gpu_ranks, throttles)
    host_findings = host_context.detect(ev.host, steps, stragglers, step_ns, ev.manifests,
                                        offsets)

    findings = sort_findings(
        hangs + stragglers + throttles + host_findings + stalls + hotspots + windows
    )
    det = ev.detection
    detected = bool(det.get("detected"))
    return {
        "schema": SCHEMA,
        "argus_version": __version__,
        **ev.extra,
        "recordings": ev.recording_info,
        "ranks": _ranks(ev),
        "steps": {
            "detected": detected,
            "count": steps["step"].n_unique() if steps.height else 0,
            "step_time_ms_p50": _ms(step_ns) if detected else None,
            "method": det.get("method"),
            "collectives_per_step": det.get("period") if det.get("method") != "sync" else None,
            "comm": det.get("comm"),
        },
        "clock_alignment": {
            "reference": ev.alignment["reference"],
            "offsets_ns": offsets,
            "residual_ns": ev.alignment["residual_ns"],
            "pairs": ev.alignment["pairs"],
            "method": ev.alignment["method"],
        },
        "drops": _drops(ev.manifests),
        "findings": findings,
    }


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


def diagnose(
    recordings: Sequence[Recording], hang_after_s: float = DEFAULT_HANG_AFTER_S
) -> dict[str, Any]:
    """The diagnosis of one job from its recordings (one per node): an argus.report/1 dict.

    Builds the `Evidence` from the raw events (see module doc) and `assemble_report`s it."""
    recordings = list(recordings)
    tl = build_timeline(recordings)
    coll = align_seq(collectives(tl))
    coll, det = realign_by_steps(tl, coll, detect_steps(tl, coll))
    alignment = estimate_offsets(det.steps, coll)
    offsets = alignment["offsets_ns"]
    if any(offsets.values()):
        tl = shift_hosts(tl, offsets, ["t_ns", "end_ns"])
        coll = shift_hosts(coll, offsets, ["t_ns", "end_ns"])
        steps = shift_hosts(det.steps, offsets, ["start_ns", "end_ns", "first_coll_ns",
                                                 "last_coll_ns"])
    else:
        steps = det.steps
    coll = with_lateness(coll)
    stacks = build_stacks(recordings, offsets)
    metrics = step_metrics(tl, coll, steps)

    def hangs(after_s: float, step_ns: float | None) -> list[dict[str, Any]]:
        ends: dict[str, int] = {}
        for rec in recordings:
            e = recording_end_ns(rec)
            if e is not None:
                ends[rec.host] = max(ends.get(rec.host, e), e) + offsets.get(rec.host, 0)
        return hang.detect_hangs(tl, coll, stacks, ends, after_s, step_ns,
                                 build_pystacks(recordings))

    ev = Evidence(
        recordings=recordings,
        manifests=[(rec.manifest, rec.host) for rec in recordings],
        recording_info=[recording_info(rec) for rec in recordings],
        steps=steps,
        metrics=metrics,
        detection={"detected": det.detected, "method": det.method, "period": det.period,
                   "comm": det.comm},
        alignment=alignment,
        seen=tl.filter(pl.col("rank").is_not_null()).unique("rank", keep="first")
        .select("rank", "tgid", "host") if tl.height else pl.DataFrame(),
        stages=pipeline.stages(coll),
        host=host_context.context(recordings),
        collectives=lambda: coll,
        hangs=hangs,
        cpu_stacks=lambda _windows: stacks.filter(
            pl.col("state").is_null() | (pl.col("state") != "off_cpu")),
    )
    return assemble_report(ev, hang_after_s)
