"""Assembly of the `argus.report/1` object from the detectors' `Evidence`.

`assemble_report(evidence)` is the one place that runs the detectors (anomalous windows ->
stragglers and the slow pipeline stage -> collective stalls -> hangs -> CPU hotspots -> GPU
throttling -> host context), sorts the findings and builds the report object; the Evidence
comes from raw recordings or from summaries (`argus.analyze.evidence`), so a detector added
here runs on both paths. The entry point over either is `argus.analyze.diagnosis.diagnose`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from argus import __version__
from argus.analyze import (
    DEFAULT_HANG_AFTER_S,
    anomaly,
    gpu,
    host_context,
    host_windows,
    hotspot,
    kernels,
    pipeline,
    stall,
    straggler,
)
from argus.analyze.evidence import Evidence

SCHEMA = "argus.report/1"
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
    host_windows.explain_windows(ev.host, windows, ev.manifests, offsets, job_ranks, metrics)
    stragglers = straggler.detect_stragglers(metrics, windows, step_ns,
                                             pipeline=bool(ev.stages), stages=ev.stages,
                                             sync_every=anomaly.sync_period(
                                                 anomaly.step_series(metrics)))
    host_windows.explain_stragglers(ev.host, stragglers, metrics, ev.manifests, offsets)
    stragglers = pipeline.detect_slow_stage(ev.recordings, ev.stages, metrics, offsets,
                                            stragglers, step_ns)
    kernels.cite_in_stragglers(stragglers, ev.kernel_families, metrics)  # device times
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

