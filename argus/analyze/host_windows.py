"""Host context over time: the anomalous windows and the short stragglers that the nodes'
CPUs explain (contention on every rank, steal time, one rank's long runnable waits), marked
in place from the `host_context.HostContext` of the job (see each function).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median
from typing import Any

import polars as pl

from argus.analyze.anomaly import WARN_RUN_STEPS, WARN_SLOWDOWN
from argus.analyze.host_context import (
    EXPLAIN_SHARE,
    HostContext,
    clock_shifts,
    overlap_ns,
    slot_waits,
    waits_in,
    waits_over,
)


def explain_windows(
    ctx: HostContext,
    windows: list[dict[str, Any]],
    manifests: Sequence[tuple[dict[str, Any], str]],
    offsets_ns: dict[str, int],
    job_ranks: Sequence[int],
    metrics: pl.DataFrame | None = None,
) -> None:
    """Mark anomalous windows that CPU contention on the nodes explains (in place).

    Metric, per rank: its threads' runnable wait per ns of wall time (cpu_contention rows,
    own threads excluded; a row's wait is spread evenly over its interval, and every
    interval its node reported counts as observed time), inside the window and outside every
    warning window; growth per step = (inside - outside) x the window's median step time. A
    window is explained when the lower-quartile growth over the job's ranks (so nearly every
    rank, not one straggler) is >= EXPLAIN_SHARE of the window's excess over the baseline:
    it gets `cause` "cpu_contention", `competitor` (the comm with the most runnable time in
    the window), `competitors` (the top 3, runnable ms per rank per step while each ran),
    `runnable_growth_ms` (median over ranks) and, below 2x, severity `info`
    (the job is healthy; its node is busy). Host rows are on each node's monotonic clock and
    are moved to the windows' aligned wall clock with the manifests' clock offsets.
    A short window that one rank's long runnable waits explain is the node's too
    (`_explain_by_long_waits`; `metrics` says which rank arrived late).
    """
    warn = [w for w in windows if w["severity"] != "info"]
    h = ctx.rows
    if not warn or h.height == 0:
        return
    shift = clock_shifts(manifests, offsets_ns)
    _explain_by_every_rank(ctx, warn, shift, job_ranks)
    _explain_by_steal(ctx, [w for w in warn if "cause" not in w], shift, job_ranks)
    _explain_by_long_waits(ctx, [w for w in warn if "cause" not in w], shift, metrics)


def _explain_by_every_rank(ctx: HostContext, warn: list[dict[str, Any]], shift: dict[str, int],
                           job_ranks: Sequence[int]) -> None:
    """explain_windows' first rule: the runnable wait of (nearly) every rank grew. The
    waits are the 10 ms slots (cpu_wait) where a node recorded them, else its 1 s
    intervals (cpu_contention, older recordings); the observed time is the intervals'."""
    intervals, rows = _contention_rows(ctx, shift)
    # every rank of the job on a node that recorded host context; one without rows had no
    # runnable wait at all (growth 0)
    ranks = sorted(int(r) for r in job_ranks if ctx.host_of_rank.get(int(r)) in intervals)
    if len(ranks) < 2:
        return
    rate_out = _rates_outside(ctx, ranks, intervals, rows,
                              [(w["start_ns"], w["end_ns"]) for w in warn])
    for w in warn:
        step_ns = w["window_step_time_ms"] * 1e6
        excess = step_ns - w["baseline_step_time_ms"] * 1e6
        if w["end_ns"] <= w["start_ns"] or excess <= 0:
            continue
        grown = _growth_in(ctx, w, ranks, intervals, rows, rate_out)
        if grown is None:
            continue
        growth, by_comm = grown
        if growth[(len(growth) - 1) // 4] < EXPLAIN_SHARE * excess:
            continue
        _mark_contended(w, by_comm, median(growth), len(ranks))


def _contention_rows(ctx: HostContext, shift: dict[str, int]):
    """(per host: the intervals it reported, on the aligned clock; the ranks' runnable waits
    as (rank, competitor, t0, t1, runnable ns), own threads excluded): the 10 ms slots of a
    node that recorded them, else its cpu_contention intervals."""
    cpu = ctx.rows.filter(
        (pl.col("kind") == "cpu_contention") & pl.col("interval_ns").gt(0)
        & pl.col("host").is_in(sorted(shift))
    ) if ctx.rows.height else ctx.rows
    intervals: dict[str, set[tuple[int, int]]] = {}
    rows = []
    if cpu.height == 0:
        return intervals, rows
    for rank, detail, t0, iv, tot, hst in cpu.select(
        "rank", "detail", "ts_ns", "interval_ns", "total_ns", "host"
    ).rows():
        a = t0 + shift[hst]
        intervals.setdefault(hst, set()).add((a, a + iv))
        if rank is not None and detail not in ctx.own_threads.get(int(rank), set()):
            rows.append((int(rank), detail, a, a + iv, float(tot)))
    fine = slot_waits(ctx, shift)
    if fine:
        fine_hosts = {ctx.host_of_rank.get(r[0]) for r in fine}
        rows = [r for r in rows if ctx.host_of_rank.get(r[0]) not in fine_hosts] + fine
    return intervals, rows


def _spread(t0: int, t1: int, a: int, b: int, tot: float) -> float:
    """The part of `tot`, spread evenly over [t0, t1), that falls in [a, b)."""
    return tot * overlap_ns(t0, t1, a, b) / (t1 - t0)


def _rates_outside(ctx: HostContext, ranks: list[int], intervals, rows,
                   spans: list[tuple[int, int]]) -> dict[int, float]:
    """Per rank: its runnable wait per ns of observed time outside every warning window."""
    out_time = {
        hst: sum((b - a) - sum(overlap_ns(a, b, x, y) for x, y in spans) for a, b in ivs)
        for hst, ivs in intervals.items()
    }
    out_wait = dict.fromkeys(ranks, 0.0)
    for rank, _d, t0, t1, tot in rows:
        if rank in out_wait:
            out_wait[rank] += tot - sum(_spread(t0, t1, x, y, tot) for x, y in spans)
    return {r: out_wait[r] / t if (t := out_time[ctx.host_of_rank[r]]) > 0 else 0.0
            for r in ranks}


def _growth_in(ctx: HostContext, w: dict[str, Any], ranks: list[int], intervals, rows,
               rate_out: dict[int, float]):
    """(each rank's runnable growth per step in window `w`, sorted; runnable ns per
    competitor in it), or None when a node's host context does not cover the window or
    nothing waited in it."""
    a, b = w["start_ns"], w["end_ns"]
    in_time = {hst: sum(overlap_ns(x, y, a, b) for x, y in ivs) for hst, ivs in intervals.items()}
    in_wait = dict.fromkeys(ranks, 0.0)
    by_comm: dict[str, float] = {}
    for rank, detail, t0, t1, tot in rows:
        share = _spread(t0, t1, a, b, tot) if rank in in_wait else 0.0
        if share > 0:
            in_wait[rank] += share
            by_comm[detail] = by_comm.get(detail, 0.0) + share
    if not by_comm or any(in_time[ctx.host_of_rank[r]] <= 0 for r in ranks):
        return None
    step_ns = w["window_step_time_ms"] * 1e6
    growth = sorted((in_wait[r] / in_time[ctx.host_of_rank[r]] - rate_out[r]) * step_ns
                    for r in ranks)
    return growth, by_comm


def _mark_contended(w: dict[str, Any], by_comm: dict[str, float], grew: float,
                    n_ranks: int) -> None:
    """Window `w` is the node's: every rank waited `grew` ns more per step runnable."""
    comms = sorted(by_comm, key=lambda c: (-by_comm[c], c))
    top = comms[0]
    per_step = max(1, int(w.get("steps") or 1)) * n_ranks
    w["cause"] = "cpu_contention"
    w["competitor"] = top
    w["competitors"] = [
        {"comm": c, "wait_ms_per_step": round(by_comm[c] / per_step / 1e6, 3)}
        for c in comms[:3]
    ]
    w["runnable_growth_ms"] = round(grew / 1e6, 3)
    if w["slowdown"] < WARN_SLOWDOWN:
        w["severity"] = "info"
    w["summary"] = w["summary"].rstrip(".") + (
        f": every rank waited {grew / 1e6:.1f} ms more per step runnable while "
        f"'{top}' ran on their CPUs (CPU contention on the node, not the job)."
    )


def _explain_by_steal(ctx: HostContext, warn: list[dict[str, Any]], shift: dict[str, int],
                      job_ranks: Sequence[int]) -> None:
    """explain_windows' second rule: the hypervisor took the nodes' CPUs (steal time, the
    cpu_steal rows: /proc/stat per host interval, spread evenly over it). A VM's tasks then
    run slower while they seem to run, without waiting runnable. Per node of the job, its
    stolen share of CPU time inside the window (f_in) and outside every warning window
    (f_out); a step of CPU work that took the baseline B would take B (1 - f_out) / (1 - f_in).
    Explained when that growth, on the node where it is least, is >= EXPLAIN_SHARE of the
    window's excess: `cause` "cpu_steal", `steal_pct` {window, outside} (the job's nodes'
    lowest window share and their highest outside), and below 2x, `info`."""
    hosts = sorted({ctx.host_of_rank.get(int(r)) for r in job_ranks} - {None})
    per_host = _steal_rows(ctx, shift) if hosts else {}
    if not per_host or any(h not in per_host for h in hosts):
        return  # a node of the job without steal rows: nothing to say for the job
    spans = [(w["start_ns"], w["end_ns"]) for w in warn]

    def off_windows(t0: int, t1: int) -> int:
        return (t1 - t0) - sum(overlap_ns(t0, t1, x, y) for x, y in spans)

    outside = {h: _stolen_share(per_host[h], off_windows) for h in hosts}
    for w in warn:
        a, b = w["start_ns"], w["end_ns"]
        base = w["baseline_step_time_ms"] * 1e6
        excess = w["window_step_time_ms"] * 1e6 - base
        if b <= a or excess <= 0 or base <= 0:
            continue

        def in_window(t0: int, t1: int, a: int = a, b: int = b) -> int:
            return overlap_ns(t0, t1, a, b)

        inside = {h: _stolen_share(per_host[h], in_window) for h in hosts}
        if any(inside[h] is None or outside[h] is None for h in hosts):
            continue  # the window (or the rest) is not covered by a node's intervals
        growth = min(base * ((1 - outside[h]) / max(1e-9, 1 - inside[h]) - 1) for h in hosts)
        if growth >= EXPLAIN_SHARE * excess:
            _mark_stolen(w, min(inside.values()), max(outside.values()))


def _steal_rows(ctx: HostContext, shift: dict[str, int]):
    """Per host: its cpu_steal intervals on the aligned clock, (t0, t1, CPU ns, stolen ns)."""
    if ctx.rows.height == 0:
        return {}
    steal = ctx.rows.filter((pl.col("kind") == "cpu_steal") & pl.col("interval_ns").gt(0)
                            & pl.col("count").gt(0) & pl.col("host").is_in(sorted(shift)))
    per_host: dict[str, list[tuple[int, int, float, float]]] = {}
    for t0, iv, cpu, stolen, hst in steal.select("ts_ns", "interval_ns", "count", "total_ns",
                                                 "host").rows():
        a = t0 + shift[hst]
        per_host.setdefault(hst, []).append((a, a + iv, float(cpu), float(stolen)))
    return per_host


def _stolen_share(rows, covered) -> float | None:
    """Stolen / all CPU time of `rows` over the part of each interval `covered` gives."""
    cpu = stolen = 0.0
    for t0, t1, c, st in rows:
        ov = covered(t0, t1)
        if ov > 0:
            cpu += c * ov / (t1 - t0)
            stolen += st * ov / (t1 - t0)
    return stolen / cpu if cpu > 0 else None


def _mark_stolen(w: dict[str, Any], f_in: float, f_out: float) -> None:
    """Window `w` is the host machine's: the hypervisor took f_in of the CPU time (f_out
    outside the warning windows)."""
    w["cause"] = "cpu_steal"
    w["steal_pct"] = {"window": round(100 * f_in, 1), "outside": round(100 * f_out, 1)}
    if w["slowdown"] < WARN_SLOWDOWN:
        w["severity"] = "info"
    w["summary"] = w["summary"].rstrip(".") + (
        f": the hypervisor took {100 * f_in:.0f}% of the node's CPU time (steal) against "
        f"{100 * f_out:.0f}% outside, so the ranks ran slower while they seemed to run "
        f"(a busy host machine, not the job).")


def _explain_by_long_waits(ctx: HostContext, windows: list[dict[str, Any]],
                           shift: dict[str, int], metrics: pl.DataFrame | None) -> None:
    """A short window (fewer than WARN_RUN_STEPS steps) that one rank's runnable waits
    explain: that rank's cpu_wait rows (its waits summed per 10 ms slot, behind each
    competitor; own threads excluded) inside the window, per step, are >= EXPLAIN_SHARE of
    the window's excess, and the window without them (its step time minus them) would be
    below the warning slowdown. The rank is the one that arrived latest in the window (the
    median `lateness_ns`; ranks that wait in a collective are not the cause), or the one
    that waited most when lateness is not known. Such a window is a hiccup of the node (a
    busy CPU delayed one rank for a step or two): severity `info`, `cause`
    "cpu_contention", `rank`, `competitor`, `runnable_ms_per_step`. A longer window stays a
    warning (a rank delayed step after step is a straggler, and the cpu_contention finding
    names what took its CPU)."""
    short = [w for w in windows if int(w.get("steps") or 0) < WARN_RUN_STEPS]
    rows = slot_waits(ctx, shift) if short else []
    if not rows:
        return
    for w in short:
        a, b = w["start_ns"], w["end_ns"]
        n = max(1, int(w.get("steps") or 1))
        base = w["baseline_step_time_ms"] * 1e6
        step_ns = w["window_step_time_ms"] * 1e6
        excess = step_ns - base
        if b <= a or excess <= 0 or base <= 0:
            continue
        per_rank = waits_in(rows, a, b)
        if not per_rank:
            continue
        rank = _latest_rank(metrics, w) if metrics is not None else None
        if rank is None:
            rank = max(per_rank, key=lambda r: (sum(per_rank[r].values()), -r))
        if rank not in per_rank:
            continue  # the late rank did not wait for its CPU
        waited = sum(per_rank[rank].values()) / n
        if waited < EXPLAIN_SHARE * excess or (step_ns - waited) / base >= WARN_SLOWDOWN:
            continue
        top = max(per_rank[rank], key=lambda c: (per_rank[rank][c], c))
        w.update(cause="cpu_contention", rank=rank, competitor=top, severity="info",
                 runnable_ms_per_step=round(waited / 1e6, 3))
        w["summary"] = w["summary"].rstrip(".") + (
            f": rank {rank} waited {waited / 1e6:.1f} ms per step runnable while '{top}' ran "
            f"on its CPU (a busy node delayed it; the job itself is not slower)."
        )


def explain_stragglers(ctx: HostContext, stragglers: list[dict[str, Any]],
                       metrics: pl.DataFrame, manifests: Sequence[tuple[dict[str, Any], str]],
                       offsets_ns: dict[str, int]) -> None:
    """Demote (in place) a host-side straggler of a short scope (fewer than
    WARN_RUN_STEPS steps) that its own runnable waits explain: inside its steps (their span
    on the aligned clock) it waited runnable >= EXPLAIN_SHARE of its excess per step, and
    without those waits its excess would be below one baseline step (it would not have
    doubled a step by itself). A 400 ms JIT compile that also waited 800 ms for a busy CPU
    stays a straggler; a rank a busy node delayed 80 ms in one step becomes `info`, with
    `evidence["runnable_ms_per_step"]` and the competitor in its summary."""
    cand = [f for f in stragglers if f.get("cause") == "host" and f.get("start_step") is not None
            and f["end_step"] - f["start_step"] + 1 < WARN_RUN_STEPS]
    if not cand or metrics.height == 0:
        return
    rows = slot_waits(ctx, clock_shifts(manifests, offsets_ns))
    if not rows:
        return
    for f in cand:
        m = metrics.filter((pl.col("rank") == f["rank"])
                           & pl.col("step").is_between(f["start_step"], f["end_step"]))
        mine = waits_over(rows, m, f["rank"]) if m.height else None
        if not mine:
            continue
        waited = sum(mine.values()) / m.height
        excess = float(f["evidence"].get("excess_ms") or 0) * 1e6
        base = float(m["step_time_ns"].median()) - excess
        if excess <= 0 or waited < EXPLAIN_SHARE * excess or excess - waited >= max(base, 0.0):
            continue
        top = max(mine, key=lambda c: (mine[c], c))
        f["severity"] = "info"
        f["evidence"]["runnable_ms_per_step"] = round(waited / 1e6, 3)
        f["evidence"]["competitor"] = top
        f["summary"] = f["summary"].rstrip(".") + (
            f"; it waited {waited / 1e6:.1f} ms per step runnable while '{top}' ran on its CPU "
            f"(a busy node delayed it)."
        )


def _latest_rank(metrics: pl.DataFrame, w: dict[str, Any]) -> int | None:
    """The rank with the highest median arrival lateness over the window's steps."""
    if metrics.height == 0 or "lateness_ns" not in metrics.columns:
        return None
    m = metrics.filter(pl.col("step").is_between(w["start_step"], w["end_step"])
                       & pl.col("lateness_ns").is_not_null())
    if m.height == 0:
        return None
    late = m.group_by("rank").agg(pl.col("lateness_ns").median()).sort(
        ["lateness_ns", "rank"], descending=[True, False])
    return int(late["rank"][0])
