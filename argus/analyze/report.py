"""Assembly of the `argus.report/1` object from one or several recordings (one per node).

`diagnose` runs the whole pipeline: timeline -> collectives matched across ranks -> steps ->
clock alignment of the nodes -> per-step metrics -> anomalous windows -> stragglers ->
collective stalls -> hangs -> CPU hotspots, and returns a JSON-ready dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median
from typing import Any

import polars as pl

from argus import __version__
from argus.analyze import anomaly, gpu, hang, hotspot, pipeline, stall, straggler
from argus.analyze import host as host_context
from argus.analyze.align import estimate_offsets
from argus.analyze.matching import align_seq, collectives, with_lateness
from argus.analyze.steps import detect_steps, step_metrics
from argus.analyze.timeline import build_stacks, build_timeline, recording_end_ns, shift_hosts
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


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x / 1e6, 3)


def _quantile(vals: list[int], q: float) -> float | None:
    if not vals:
        return None
    v = sorted(vals)
    return float(v[min(len(v) - 1, int(round(q * (len(v) - 1))))])


def _drops(recordings: Sequence[Recording]) -> dict[str, int]:
    total: dict[str, int] = {}
    for rec in recordings:
        for k, v in (rec.manifest.get("drops") or {}).items():
            if isinstance(v, int):
                total[k] = total.get(k, 0) + v
    return total


def _ranks(recordings: Sequence[Recording], tl: pl.DataFrame, steps: pl.DataFrame) -> list:
    seen: dict[int, dict[str, Any]] = {}
    for rec in recordings:
        for r in rec.manifest.get("ranks") or []:
            if isinstance(r, dict) and r.get("rank") is not None:
                seen[int(r["rank"])] = {"rank": int(r["rank"]), "tgid": r.get("tgid"),
                                        "host": r.get("host") or rec.host}  # fmt: skip
    if tl.height:
        for rank, tgid, host in (
            tl.filter(pl.col("rank").is_not_null())
            .unique("rank", keep="first")
            .select("rank", "tgid", "host")
            .rows()
        ):
            seen.setdefault(rank, {"rank": rank, "tgid": tgid, "host": host})
    out = []
    for rank in sorted(seen):
        st = steps.filter(pl.col("rank") == rank)["step_time_ns"].to_list() if steps.height else []
        out.append(
            {
                **seen[rank],
                "steps": len(st),
                "step_time_ms": {
                    "p50": _ms(_quantile(st, 0.5)),
                    "p90": _ms(_quantile(st, 0.9)),
                    "max": _ms(max(st) if st else None),
                },
            }
        )
    return out


def diagnose(
    recordings: Sequence[Recording], hang_after_s: float = DEFAULT_HANG_AFTER_S
) -> dict[str, Any]:
    """The diagnosis of one job from its recordings (one per node): an argus.report/1 dict.

    Findings are sorted by severity (critical first), then kind (hang, straggler, stall,
    hotspot, window), then score. A healthy job yields no warning/critical findings.
    """
    recordings = list(recordings)
    tl = build_timeline(recordings)
    coll = align_seq(collectives(tl))
    det = detect_steps(tl, coll)
    alignment = estimate_offsets(det.steps, coll)
    offsets = alignment["offsets_ns"]
    if any(offsets.values()):
        tl = shift_hosts(tl, offsets, ["t_ns", "end_ns"])
        coll = shift_hosts(coll, offsets, ["t_ns", "end_ns"])
        steps = shift_hosts(det.steps, offsets, ["start_ns", "end_ns", "first_coll_ns",
                                                 "last_coll_ns"])  # fmt: skip
    else:
        steps = det.steps
    coll = with_lateness(coll)
    stacks = build_stacks(recordings, offsets)
    metrics = step_metrics(tl, coll, steps)
    per_step = anomaly.step_series(metrics)
    step_ns = float(median(per_step["step_time_ns"].to_list())) if per_step.height else 0.0

    windows = anomaly.detect_windows(metrics)
    stragglers = straggler.detect_stragglers(metrics, windows, step_ns)
    stragglers = pipeline.detect_slow_stage(recordings, coll, steps, offsets, stragglers)
    stalls = stall.detect_stalls(metrics, windows, stragglers, coll)
    ends = {}
    for rec in recordings:
        e = recording_end_ns(rec)
        if e is not None:
            ends[rec.host] = max(ends.get(rec.host, e), e) + offsets.get(rec.host, 0)
    pys = [r.pystacks for r in recordings if getattr(r, "pystacks", None) is not None
           and r.pystacks.height]  # fmt: skip
    pystacks = pl.concat(pys, how="vertical_relaxed") if pys else None
    hangs = hang.detect_hangs(tl, coll, stacks, ends, hang_after_s, step_ns or None, pystacks)
    on_cpu = stacks.filter(pl.col("state").is_null() | (pl.col("state") != "off_cpu"))
    hotspots = hotspot.detect_hotspots(on_cpu, windows, stragglers)

    gpu_ranks = gpu.analyse(recordings, steps, offsets)  # NVML samples (gpu.parquet)
    throttles = gpu.detect_throttle(gpu_ranks, steps, stragglers)
    gpu.cite_in_stragglers(stragglers, gpu_ranks, throttles)

    host_findings = host_context.detect(recordings, steps, stragglers, step_ns)

    findings = hangs + stragglers + throttles + host_findings + stalls + hotspots + windows
    findings.sort(
        key=lambda f: (
            SEVERITY_ORDER.get(f["severity"], 3),
            KIND_ORDER.get(f["kind"], 9),
            -(f.get("score") or 0),
        )
    )
    n_steps = steps["step"].n_unique() if steps.height else 0
    return {
        "schema": SCHEMA,
        "argus_version": __version__,
        "recordings": [
            {
                "path": str(rec.path) if rec.path else None,
                "host": rec.host,
                "format": rec.manifest.get("format"),
                "duration_s": rec.manifest.get("duration_s"),
                "end_reason": rec.manifest.get("end_reason"),
                "events": rec.events.height,
                "stack_rows": rec.stacks.height,
            }
            for rec in recordings
        ],
        "ranks": _ranks(recordings, tl, steps),
        "steps": {
            "detected": det.detected,
            "count": n_steps,
            "step_time_ms_p50": _ms(step_ns) if det.detected else None,
            "method": det.method,
            "collectives_per_step": det.period if det.method != "sync" else None,
            "comm": det.comm,
        },
        "clock_alignment": {
            "reference": alignment["reference"],
            "offsets_ns": offsets,
            "residual_ns": alignment["residual_ns"],
            "pairs": alignment["pairs"],
            "method": alignment["method"],
        },
        "drops": _drops(recordings),
        "findings": findings,
    }
