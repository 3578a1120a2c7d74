"""GPU throttling from the NVML samples (`gpu.parquet`): the compute straggler the host cannot see.

Metric, per sample of a rank's device (samples joined to ranks by the collector): the SM
clock against a reference, the median SM clock of the other ranks' devices sampled within
half a sampling interval (busy ones only), or, for a lone rank, the device's maximum SM
clock. A sample is busy unless NVML says GpuIdle; only samples inside the rank's detected
steps count when steps were detected.

Detector: a sample is throttled when busy and its clock is at least `MIN_DROP` (10 %) below
the reference; against the maximum clock (no peers) it must also carry a slowdown reason
(anything but GpuIdle: power cap, thermal, HW slowdown...), since boost clocks legitimately
float below the maximum. A rank is flagged (`gpu_throttle`) with at least `MIN_SAMPLES`
throttled samples; the episode runs from its first to its last throttled sample (each
standing for the half sampling interval around it) and is mapped onto the rank's steps.
Kernel time scales with 1/clock for compute-bound work, so the expected slowdown is
reference/clock. Severity: warning; critical when a critical straggler finding on the same
rank is what it explains.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from statistics import median
from typing import Any

import polars as pl

from argus.recording.clock import mono_to_wall
from argus.recording.gpu import IDLE, is_slowdown
from argus.recording.io import Recording

MIN_DROP = 0.10
MIN_SAMPLES = 2
DEFAULT_INTERVAL_S = 1.0


def gpu_samples(recordings: Sequence[Recording], offsets_ns: dict[str, int] | None = None):
    """The NVML samples of every recording joined to a rank, on the timeline's clock
    (`t_ns`: wall ns plus the host's alignment offset), with `host`; sorted by t_ns."""
    frames = []
    offsets_ns = offsets_ns or {}
    for rec in recordings:
        g = getattr(rec, "gpu", None)
        if g is None or g.height == 0:
            continue
        g = g.filter(pl.col("rank").is_not_null() & pl.col("sm_clock_mhz").is_not_null())
        if g.height == 0:
            continue
        off = offsets_ns.get(rec.host, 0)
        frames.append(
            g.with_columns(
                pl.lit(rec.host, dtype=pl.Utf8).alias("host"),
                (mono_to_wall(pl.col("ts_ns"), rec.manifest) + off).alias("t_ns"),
            )
        )
    if not frames:
        return None
    return pl.concat(frames, how="vertical_relaxed").sort("t_ns")


def _interval_ns(recordings: Sequence[Recording]) -> int:
    vals = []
    for rec in recordings:
        gpu = rec.manifest.get("gpu")
        if isinstance(gpu, dict) and isinstance(gpu.get("interval_s"), (int, float)):
            vals.append(float(gpu["interval_s"]))
    return int((max(vals) if vals else DEFAULT_INTERVAL_S) * 1e9)


def _busy(row: dict[str, Any]) -> bool:
    reasons = row.get("throttle_reasons")
    if reasons is not None:
        return not (int(reasons) & IDLE)
    util = row.get("util_gpu_pct")
    return util is None or util > 0


def _rank_samples(g: pl.DataFrame, steps: pl.DataFrame | None) -> dict[int, list[dict]]:
    """Busy samples per rank, inside the rank's steps when steps are known."""
    spans: dict[int, tuple[int, int]] = {}
    if steps is not None and steps.height:
        for rank, lo, hi in (
            steps.group_by("rank").agg(pl.col("start_ns").min(), pl.col("end_ns").max()).rows()
        ):
            spans[int(rank)] = (int(lo), int(hi))
    out: dict[int, list[dict]] = {}
    for row in g.iter_rows(named=True):
        r = int(row["rank"])
        span = spans.get(r)
        if span is not None and not span[0] <= row["t_ns"] <= span[1]:
            continue
        if _busy(row):
            out.setdefault(r, []).append(row)
    return out


def _reference(per_rank: dict[int, list[dict]], rank: int, t: int, tol: int) -> float | None:
    """Median SM clock of the other ranks' busy samples nearest to t (within tol)."""
    peers = []
    for r, rows in per_rank.items():
        if r == rank or not rows:
            continue
        ts = [x["t_ns"] for x in rows]
        i = bisect_left(ts, t)
        best = None
        for j in (i - 1, i):
            if 0 <= j < len(rows) and abs(ts[j] - t) <= tol:
                if best is None or abs(ts[j] - t) < abs(ts[best] - t):
                    best = j
        if best is not None:
            peers.append(rows[best]["sm_clock_mhz"])
    return float(median(peers)) if peers else None


def _steps_between(steps: pl.DataFrame | None, rank: int, lo: int, hi: int) -> list[int]:
    if steps is None or steps.height == 0:
        return []
    sel = steps.filter(
        (pl.col("rank") == rank) & (pl.col("end_ns") >= lo) & (pl.col("start_ns") <= hi)
    )
    return sorted(sel["step"].to_list())


def _med(vals: list[Any]) -> float | None:
    vals = [v for v in vals if v is not None]
    return round(float(median(vals)), 1) if vals else None


def analyse(
    recordings: Sequence[Recording],
    steps: pl.DataFrame | None = None,
    offsets_ns: dict[str, int] | None = None,
) -> dict[int, dict[str, Any]]:
    """Per rank with NVML samples: the throttle metric (see module doc). {rank: {...}}."""
    g = gpu_samples(recordings, offsets_ns)
    if g is None:
        return {}
    interval = _interval_ns(recordings)
    tol = interval // 2 + 1
    per_rank = _rank_samples(g, steps)
    starts = [
        mono_to_wall(int(rec.manifest["started_ns"]), rec.manifest)
        + (offsets_ns or {}).get(rec.host, 0)
        for rec in recordings
        if isinstance(rec.manifest.get("started_ns"), int)
    ]
    t0 = min(starts) if starts else int(g["t_ns"].min())
    out: dict[int, dict[str, Any]] = {}
    for rank, rows in sorted(per_rank.items()):
        throttled, refs, others_all = [], [], []
        for row in rows:
            ref = _reference(per_rank, rank, row["t_ns"], tol)
            vs = "other_ranks"
            if ref is not None:
                others_all.append(ref)
            else:
                ref, vs = row.get("sm_clock_max_mhz"), "max_clock"
            if not ref:
                continue
            low = row["sm_clock_mhz"] <= (1.0 - MIN_DROP) * ref
            if low and (vs == "other_ranks" or is_slowdown(row.get("throttle_reasons"))):
                throttled.append(row)
                refs.append((ref, vs))
        info: dict[str, Any] = {
            "rank": rank,
            "device": rows[0]["device"],
            "bus_id": rows[0]["bus_id"],
            "host": rows[0]["host"],
            "busy_samples": len(rows),
            "sm_clock_mhz": _med([x["sm_clock_mhz"] for x in rows]),
            "others_mhz": _med(others_all),
            "max_mhz": rows[0].get("sm_clock_max_mhz"),
            "reasons": _reason_counts(rows),
            "throttled": throttled,
            "refs": refs,
            "t0": t0,
            "tol": tol,
        }
        out[rank] = info
    return out


def _reason_counts(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        for name in row.get("throttle") or []:
            if name != "GpuIdle":
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def detect_throttle(
    per_rank: dict[int, dict[str, Any]],
    steps: pl.DataFrame | None = None,
    stragglers: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """`gpu_throttle` findings from `analyse`'s output (see module doc), strongest first."""
    strag = {f["rank"]: f for f in stragglers if f.get("kind") == "straggler"}
    out = []
    for rank, info in per_rank.items():
        rows = info["throttled"]
        if len(rows) < MIN_SAMPLES:
            continue
        # A sample stands for the half interval around it.
        lo, hi = rows[0]["t_ns"] - info["tol"], rows[-1]["t_ns"] + info["tol"]
        clock = float(median(x["sm_clock_mhz"] for x in rows))
        ref = float(median(r for r, _ in info["refs"]))
        vs = "other_ranks" if any(v == "other_ranks" for _, v in info["refs"]) else "max_clock"
        drop = 1.0 - clock / ref
        reasons = _reason_counts(rows)
        with_reason = sum(1 for x in rows if is_slowdown(x.get("throttle_reasons")))
        in_steps = _steps_between(steps, rank, lo, hi)
        s = strag.get(rank)
        explains = s is not None and s.get("cause") == "gpu"
        severity = "critical" if explains and s.get("severity") == "critical" else "warning"
        others = "the other ranks" if vs == "other_ranks" else "its maximum"
        why = f", {'/'.join(reasons)}" if reasons else ", no throttle reason reported"
        where = (
            f"steps {in_steps[0]}-{in_steps[-1]}"
            if in_steps
            else f"{(lo - info['t0']) / 1e9:.1f}-{(hi - info['t0']) / 1e9:.1f} s"
        )
        summary = (
            f"Rank {rank}'s GPU {info['device']} ({info['bus_id']}) ran its SM clock at "
            f"{clock:.0f} MHz vs {ref:.0f} MHz on {others} ({-drop:.0%}{why}) in {where}: "
            f"its kernels take about {ref / clock:.2f}x as long"
            + (", which explains its straggling." if explains else ".")
        )
        out.append(
            {
                "kind": "gpu_throttle",
                "severity": severity,
                "summary": summary,
                "rank": rank,
                "device": info["device"],
                "bus_id": info["bus_id"],
                "host": info["host"],
                "score": round(drop / MIN_DROP, 2),
                "start_step": in_steps[0] if in_steps else None,
                "end_step": in_steps[-1] if in_steps else None,
                "evidence": {
                    "sm_clock_mhz": {
                        "rank": round(clock, 1),
                        "reference": round(ref, 1),
                        "reference_is": vs,
                        "max": info["max_mhz"],
                    },
                    "clock_drop": round(drop, 3),
                    "expected_slowdown": round(ref / clock, 3),
                    "reasons": list(reasons),
                    "reason_samples": with_reason,
                    "throttled_samples": len(rows),
                    "busy_samples": info["busy_samples"],
                    "steps": len(in_steps),
                    "from_s": round((lo - info["t0"]) / 1e9, 3),
                    "to_s": round((hi - info["t0"]) / 1e9, 3),
                    "power_w": _med([x.get("power_w") for x in rows]),
                    "temp_c": _med([x.get("temp_c") for x in rows]),
                    "explains_straggler": explains,
                },
            }
        )
    return sorted(out, key=lambda f: -f["score"])


def nvml_evidence(
    per_rank: dict[int, dict[str, Any]], throttles: Sequence[dict[str, Any]], rank: int
) -> dict[str, Any] | None:
    """What NVML says about a rank (for the straggler finding's `evidence["nvml"]`)."""
    info = per_rank.get(rank)
    if info is None:
        return None
    t = next((f for f in throttles if f["rank"] == rank), None)
    ev: dict[str, Any] = {
        "device": info["device"],
        "bus_id": info["bus_id"],
        "throttled": t is not None,
        "sm_clock_mhz": {
            "rank": info["sm_clock_mhz"],
            "others": info["others_mhz"],
            "max": info["max_mhz"],
        },
        "reasons": list(info["reasons"]),
        "busy_samples": info["busy_samples"],
    }
    if t is not None:
        ev["throttle"] = {
            k: t["evidence"][k]
            for k in ("sm_clock_mhz", "clock_drop", "expected_slowdown", "reasons")
        }
        ev["throttle"].update(start_step=t["start_step"], end_step=t["end_step"])
    return ev


def cite_in_stragglers(
    stragglers: list[dict[str, Any]],
    per_rank: dict[int, dict[str, Any]],
    throttles: Sequence[dict[str, Any]],
) -> None:
    """Add `evidence["nvml"]` to every straggler with NVML samples; when its GPU throttled,
    say so in the summary too (in place)."""
    for f in stragglers:
        ev = nvml_evidence(per_rank, throttles, f["rank"])
        if ev is None:
            continue
        f.setdefault("evidence", {})["nvml"] = ev
        if ev["throttled"] and f.get("cause") == "gpu":
            th = ev["throttle"]
            why = f" ({'/'.join(th['reasons'])})" if th["reasons"] else ""
            f["summary"] = (
                f"{f['summary'].rstrip('.')}; NVML shows its GPU clock throttled to "
                f"{th['sm_clock_mhz']['rank']:.0f} MHz vs {th['sm_clock_mhz']['reference']:.0f}"
                f" MHz{why}."
            )
