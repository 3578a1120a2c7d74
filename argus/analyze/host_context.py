"""Host context: what else on a rank's node explains its slowness (`host.parquet`).

This module: the per-rank metric, the host-context findings (`detect`) and the clock and
10-ms-slot helpers both use; the anomalous windows and short stragglers that the nodes' CPUs
explain are in `host_windows` (issue 15 split the former `analyze/host.py`, a name that
read as `Recording.host`, the hostname; that module now only re-exports both).

Metric, per rank (its tgid's rows, the whole recording): the runnable wait of its threads
(switched out while still runnable, until they ran again), per competitor comm, divided by
the rank's step count (per second when no steps were found). Competitors that are threads of
the rank itself are left out (a process contending with itself is not host context).

Runnable wait is judged against the rank's own CPU demand (`cpu_demand`): on a busy node
every rank's CPU work is stretched alike, so a rank doing 5x the others' CPU work waits ~5x as
long runnable without anything taking its CPU. The others' median wait is scaled by the rank's
on-CPU time x their wait per on-CPU ns, over their median wait (>= 1). On-CPU time: the
`on_cpu` rows host.bpf.c measures at the switches (switch in -> out, per process), or for
older recordings an estimate from the cpu channel's cpu-clock samples (rows derived here,
detail "cpu-clock", judged at Poisson bounds); 1 without either. A hog on ONE rank's CPU
makes it wait far more per ns of its own work, and is still blamed.

Detectors:
- `cpu_contention`: a host-side straggler rank (cause `host`: it arrives late) whose runnable
  wait per step exceeds `cpu_demand` x the median of the other ranks' by >= max(25% of its
  straggler excess, 0.5 ms): warning (critical when the straggler is) when that explains
  >= 50% of the excess, naming the competitor that took most of it, and the straggler cites
  it under `evidence["host"]`; below 50%, info (its own work is the cause). Any other rank
  (no straggler, or a GPU-side one, whose excess CPU time cannot explain) waiting >= 10% of
  the step time runnable beyond that gives an `info` finding (a healthy job stays free of
  warnings).
- `oom_kill`: an OOM victim that is a traced rank: critical; any other victim on the node:
  info.
- `tcp_retransmits`: retransmits in a traced rank's context, or node-wide on a straggler's
  node: warning when the rank is a straggler and retransmitted at least once per two of its
  straggler steps (TCP_MIN_FRACTION), else info.
- `block_io_stall`: a device whose mean request latency is >= 50 ms over >= 5 requests:
  info (warning when a straggler is on that node).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import polars as pl

from argus.errors import RecordingInvalid
from argus.recording.clock import mono_to_wall_offset
from argus.recording.io import Recording

MIN_SHARE_OF_EXCESS = 0.25
MIN_WAIT_NS = 500_000
INFO_SHARE_OF_STEP = 0.10
BLOCK_SLOW_NS = 50_000_000
BLOCK_MIN_REQUESTS = 5
TCP_MIN_FRACTION = 0.5  # a straggler's retransmits per straggler step, for a warning
DEMAND_Z = 1.0  # sampling noise allowed for in cpu_demand (sigma of a Poisson count)
EXPLAIN_SHARE = 0.5  # a window explained by contention: its runnable growth / its excess


@dataclass
class HostContext:
    """What the host-context detectors read, from recordings (`context`) or from summaries
    (`argus.analyze.compress`, which stores exactly these): the host.parquet rows with `host`
    and `rank` filled, each rank's own thread names (never competitors), which rank a
    (host, tgid) is and which host a rank runs on (the manifests), and the recording's
    duration (the per-second unit when no steps were found)."""

    rows: pl.DataFrame = field(default_factory=pl.DataFrame)
    own_threads: dict[int, set[str]] = field(default_factory=dict)
    rank_of_tgid: dict[tuple[str, int], int] = field(default_factory=dict)
    host_of_rank: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    # slot_waits' rows per clock shift: three explainers read them in one report
    _slots: dict[tuple, list] = field(default_factory=dict, repr=False, compare=False)


def rank_maps(manifests: Sequence[tuple[dict[str, Any], str]]):
    """(host, tgid) -> rank and rank -> host from (manifest, host of its recording) pairs."""
    rank_of_tgid: dict[tuple[str, int], int] = {}
    host_of_rank: dict[int, str] = {}
    for man, host in manifests:
        for r in man.get("ranks") or []:
            if isinstance(r, dict) and r.get("tgid") is not None and r.get("rank") is not None:
                rank_of_tgid[(host, int(r["tgid"]))] = int(r["rank"])
                host_of_rank[int(r["rank"])] = r.get("host") or host
    return rank_of_tgid, host_of_rank


def context(recordings: Sequence[Recording]) -> HostContext:
    """The HostContext of raw recordings."""
    rank_of_tgid, host_of_rank = rank_maps([(r.manifest, r.host) for r in recordings])
    durations = [float(r.manifest.get("duration_s") or 0) for r in recordings]
    return HostContext(rows=_frame(recordings), own_threads=_own_threads(recordings),
                       rank_of_tgid=rank_of_tgid, host_of_rank=host_of_rank,
                       seconds=max(durations) if durations else 0.0)


def _frame(recordings: Sequence[Recording]) -> pl.DataFrame:
    """host.parquet rows of every recording with `host` and `rank` filled by tgid."""
    frames = []
    for rec in recordings:
        h = getattr(rec, "host_ctx", None)
        if h is None or h.height == 0:
            continue
        on = None if h.filter(pl.col("kind") == "on_cpu").height else _on_cpu_rows(rec)
        if on is not None:
            h = pl.concat([h, on], how="vertical_relaxed")
        tgid_rank = {
            int(r["tgid"]): int(r["rank"])
            for r in rec.manifest.get("ranks") or []
            if isinstance(r, dict) and r.get("tgid") is not None and r.get("rank") is not None
        }
        h = h.with_columns(
            pl.coalesce(
                pl.col("rank"),
                pl.col("tgid").replace_strict(tgid_rank, default=None, return_dtype=pl.Int32),
            ).alias("rank"),
            pl.lit(rec.host, dtype=pl.Utf8).alias("host"),
        )
        frames.append(h)
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames, how="vertical_relaxed")


def _on_cpu_rows(rec: Recording) -> pl.DataFrame | None:
    """For a recording whose host.parquet has no `on_cpu` rows (host.bpf.c measures them
    since 2026-12-06): rows of kind `on_cpu`, detail "cpu-clock", estimated from its cpu-clock
    samples (kept in summaries like the measured ones): per sampling interval and tgid,
    `count` samples and `total_ns` = count / sample_hz."""
    st, hz = rec.stacks, float(rec.manifest.get("sample_hz") or 0)
    if hz <= 0 or st.height == 0:
        return None
    on = st.filter(pl.col("state").is_null() | (pl.col("state") == "on_cpu"))
    if on.height == 0:
        return None
    return (
        on.group_by("ts_ns", "interval_ns", "tgid")
        .agg(pl.col("rank").first(), pl.col("count").sum())
        .with_columns(pl.lit("on_cpu").alias("kind"), pl.lit("cpu-clock").alias("detail"),
                      (pl.col("count") * (1e9 / hz)).cast(pl.Int64).alias("total_ns"))
        .select(list(rec.host_ctx.columns))
        .cast(dict(rec.host_ctx.schema))
        .sort("ts_ns", "tgid")
    )


def _own_threads(recordings: Sequence[Recording]) -> dict[int, set[str]]:
    """rank -> thread names seen in its own stacks (not competitors)."""
    out: dict[int, set[str]] = {}
    for rec in recordings:
        st = rec.stacks
        if st.height == 0 or "thread" not in st.columns:
            continue
        for rank, thread in st.select("rank", "thread").unique().drop_nulls().rows():
            out.setdefault(int(rank), set()).add(str(thread))
    return out


def contention(
    source: Sequence[Recording] | HostContext, steps: pl.DataFrame | None = None
) -> dict[int, dict[str, Any]]:
    """Per rank: runnable wait per step (or per second) in total and per competitor comm."""
    ctx = source if isinstance(source, HostContext) else context(source)
    h = ctx.rows
    if h.height == 0:
        return {}
    cpu = h.filter((pl.col("kind") == "cpu_contention") & pl.col("rank").is_not_null())
    if cpu.height == 0:
        return {}
    own = ctx.own_threads
    n_steps: dict[int, int] = {}
    if steps is not None and steps.height:
        n_steps = dict(steps.group_by("rank").len().rows())
    seconds = ctx.seconds
    on = h.filter((pl.col("kind") == "on_cpu") & pl.col("rank").is_not_null())
    # per rank: (on-CPU ns, samples: None where measured at the switches)
    on_cpu = {r: (t, n if sampled else None) for r, t, n, sampled in on.group_by("rank").agg(
        pl.col("total_ns").sum(), pl.col("count").sum(),
        (pl.col("detail") == "cpu-clock").all()).rows()} if on.height else {}
    out: dict[int, dict[str, Any]] = {}
    for (rank,), g in cpu.group_by("rank"):
        rank = int(rank)
        per = (
            g.filter(~pl.col("detail").is_in(sorted(own.get(rank, set()))))
            .group_by("detail")
            .agg(pl.col("total_ns").sum(), pl.col("count").sum())
            .sort(["total_ns", "detail"], descending=[True, False])
        )
        n = n_steps.get(rank) or 0
        div = n if n else max(seconds, 1e-9)
        unit = "step" if n else "s"
        out[rank] = {
            "unit": unit,
            "wait_ns": float(per["total_ns"].sum()) / div if per.height else 0.0,
            "competitors": [
                {"comm": c, "wait_ms": round(t / div / 1e6, 3), "preemptions": int(k)}
                for c, t, k in per.head(5).rows()
            ],
            "tgid": int(g["tgid"][0]),
            "host": g["host"][0],
            # None: no cpu-clock samples in the recording (cpu channel off)
            "on_cpu_ns": float(on_cpu.get(rank, (0, 0))[0]) / div if on_cpu else None,
            "on_cpu_samples": on_cpu.get(rank, (0, 0))[1],
        }
    return out


def cpu_demand(cont: dict[int, dict[str, Any]], rank: int) -> float:
    """How many times the other ranks' median runnable wait `rank`'s own CPU work makes it
    wait on this node (>= 1): its on-CPU time x the others' median runnable wait per on-CPU
    ns, over the others' median wait. On a node where every rank's CPU work is stretched
    alike, a rank doing 5x the others' CPU work waits ~5x as long runnable; only what it
    waits beyond that is CPU taken from it. On-CPU time measured at the switches is exact;
    estimated from cpu-clock samples (older recordings: a few per rank in a short job) the
    rank's is taken at its lower bound and the others' at their upper (Poisson, DEMAND_Z
    sigma), so sampling noise never lowers the wait a competitor is blamed for. 1 without
    on-CPU rows."""
    mine = _on_cpu_bound(cont[rank], -DEMAND_Z)
    others = [o for r, o in cont.items() if r != rank]
    rates = [o["wait_ns"] / c for o in others
             if (c := _on_cpu_bound(o, DEMAND_Z)) is not None and c > 0]
    base = median(o["wait_ns"] for o in others) if others else 0.0
    if not mine or not rates or base <= 0:
        return 1.0
    return max(1.0, mine * median(rates) / base)


def _on_cpu_bound(c: dict[str, Any], z: float) -> float | None:
    """A rank's on-CPU ns per unit, or its bound z sigma up (z > 0: one sample more) or down
    when it was counted in samples; None without on-CPU rows."""
    ns, n = c.get("on_cpu_ns"), c.get("on_cpu_samples")
    if ns is None or n is None or z == 0:
        return ns
    per = ns / n if n else 0.0
    if z < 0:
        return max(0.0, n + z * n**0.5) * per
    return (n + z * n**0.5 + 1) * per if n else None


def _scoped_waits(ctx: HostContext, stragglers: list[dict[str, Any]], steps: pl.DataFrame | None,
                  shift: dict[str, int] | None) -> dict[int, tuple[float, float, int]]:
    """Per rank with a window-scoped host-side straggler finding: (its runnable wait per
    step inside the finding's steps, the other ranks' median over theirs, the steps), from
    the 10-ms cpu_wait slots. A hog that takes a rank's CPU in some steps only is what
    makes it late in those steps: the whole recording's average dilutes it."""
    cand = [f for f in stragglers if f.get("cause") == "host" and f.get("start_step") is not None]
    if not cand or steps is None or steps.height == 0 or not shift:
        return {}
    rows = slot_waits(ctx, shift)
    if not rows:
        return {}
    out = {}
    for f in cand:
        m = steps.filter(pl.col("step").is_between(f["start_step"], f["end_step"]))
        per: dict[int, float] = {}
        for (rank,), g in m.group_by("rank"):
            per[int(rank)] = sum(waits_over(rows, g, int(rank)).values()) / g.height
        others = [w for r, w in per.items() if r != f["rank"]]
        if f["rank"] in per and others:
            out[f["rank"]] = (per[f["rank"]], median(others),
                              f["end_step"] - f["start_step"] + 1)
    return out


def _cpu_findings(cont, stragglers, step_ns, scoped=None) -> list[dict[str, Any]]:
    findings = []
    strag = {f["rank"]: f for f in stragglers}
    for rank, c in sorted(cont.items()):
        others = [o["wait_ns"] for r, o in cont.items() if r != rank]
        base = median(others) if others else 0.0
        demand = cpu_demand(cont, rank)
        extra = c["wait_ns"] - demand * base
        top = c["competitors"][0] if c["competitors"] else None
        if top is None:
            continue
        ev = {
            "wait_ms_per_" + c["unit"]: round(c["wait_ns"] / 1e6, 3),
            "others_ms_per_" + c["unit"]: round(base / 1e6, 3),
            "competitors": c["competitors"],
            "host": c["host"],
        }
        if demand > 1.0:
            ev["cpu_demand"] = round(demand, 2)
        f = strag.get(rank)
        # Only a host-side straggler's excess (late arrival, in ms per step) can be explained
        # by CPU taken from its threads; a GPU-side one (its own GPU work is slower, or its
        # pipeline stage's GPU is busier) is judged like a rank that is no straggler.
        if f is not None and (f.get("cause") != "host" or not f["evidence"].get("excess_ms")):
            f = None
        if f is not None and (scoped or {}).get(rank) is not None:
            # a window-scoped straggler: its CPU is judged in its own steps (`_scoped_waits`)
            mine, theirs, n = scoped[rank]
            extra = max(extra, mine - demand * theirs)
            ev["in_straggler_steps"] = {"wait_ms_per_step": round(mine / 1e6, 3),
                                        "others_ms_per_step": round(theirs / 1e6, 3),
                                        "steps": n}
        if f is not None:
            excess_ns = float(f["evidence"]["excess_ms"]) * 1e6
            if extra < max(MIN_SHARE_OF_EXCESS * excess_ns, MIN_WAIT_NS):
                continue
            explains = min(1.0, extra / excess_ns) if excess_ns else None
            # the cause when it explains most of the excess; a share of it otherwise (a rank
            # busy on its CPU is preempted more on a busy node: it waits more, but its own
            # work is what makes it late)
            severity = ("info" if explains is not None and explains < EXPLAIN_SHARE
                        else "critical" if f["severity"] == "critical" else "warning")
        elif step_ns and c["unit"] == "step" and extra >= max(INFO_SHARE_OF_STEP * step_ns,
                                                              MIN_WAIT_NS):
            severity, explains = "info", None
        else:
            continue
        per = c["unit"]
        findings.append(
            {
                "kind": "cpu_contention",
                "severity": severity,
                "summary": (
                    f"Rank {rank}'s threads waited {c['wait_ns'] / 1e6:.1f} ms per {per} "
                    f"runnable (others {base / 1e6:.1f} ms"
                    + (f"; {demand:.1f}x that for its own CPU work" if demand > 1.0 else "")
                    + f") while '{top['comm']}' ran on "
                    f"their CPU ({top['wait_ms']:.1f} ms per {per}) on host {c['host']}"
                    + (f"; in its straggler steps {scope['wait_ms_per_step']:.1f} ms per step "
                       f"(others {scope['others_ms_per_step']:.1f} ms)."
                       if (scope := ev.get("in_straggler_steps")) else ".")
                ),
                "rank": rank,
                "tgid": c["tgid"],
                "host": c["host"],
                "competitor": top["comm"],
                "score": round(extra / 1e6, 3),
                "explains_fraction_of_excess": round(explains, 3) if explains is not None else None,
                "evidence": ev,
            }
        )
    return findings


def _other_findings(h: pl.DataFrame, stragglers, rank_of_tgid) -> list[dict[str, Any]]:
    findings: list[dict[str, Any]] = []
    strag_ranks = {f["rank"] for f in stragglers}
    # a straggler's steps: a pipeline stage's evidence counts blocks of steps instead
    strag_steps = {f["rank"]: int(ev.get("steps") or ev.get("blocks", 0) * ev.get("block_steps", 1))
                   for f in stragglers for ev in [f.get("evidence", {})]}
    strag_hosts = {h_ for f in stragglers for h_ in [f.get("_host")] if h_}
    oom = h.filter(pl.col("kind") == "oom_kill")
    for ts, tgid, detail, host, rank in oom.select("ts_ns", "tgid", "detail", "host",
                                                   "rank").rows():
        rank = rank if rank is not None else rank_of_tgid.get((host, tgid))
        who = f"rank {rank} (tgid {tgid}, {detail})" if rank is not None else f"{detail} ({tgid})"
        findings.append(
            {
                "kind": "oom_kill",
                "severity": "critical" if rank is not None else "info",
                "summary": f"The kernel OOM killer killed {who} on host {host}.",
                "rank": rank,
                "tgid": tgid,
                "comm": detail,
                "host": host,
                "ts_ns": ts,
            }
        )
    tcp = h.filter(pl.col("kind") == "tcp_retransmit")
    if tcp.height:
        for (host,), g in tcp.group_by("host"):
            total = int(g["count"].sum())
            by_rank = (g.filter(pl.col("rank").is_not_null()).group_by("rank")
                       .agg(pl.col("count").sum()))
            ranks = {int(r): int(n) for r, n in by_rank.rows()}
            # A warning only when the straggler's own process retransmits, in at least half
            # as many as its straggler steps: node-wide counts come from every process on
            # the node (package mirrors, other jobs) and explain nothing about a rank by
            # themselves, and a straggler's excess is a median over its steps, which
            # retransmits in fewer of its steps cannot make (gloo over loopback on a busy
            # 2-vCPU node: 1-8 retransmits per rank in 80-100 steps, on every rank alike).
            hit = sorted(r for r in set(ranks) & strag_ranks
                         if ranks[r] >= TCP_MIN_FRACTION * strag_steps.get(r, 0))
            peers = g.group_by("detail").agg(pl.col("count").sum()).sort(
                ["count", "detail"], descending=[True, False])
            findings.append(
                {
                    "kind": "tcp_retransmits",
                    "severity": "warning" if hit else "info",
                    "summary": (
                        f"{total} TCP retransmit(s) on host {host}"
                        + (f", {sum(ranks.values())} in rank(s) {sorted(ranks)}" if ranks else "")
                        + (f"; straggler rank(s) {hit} use this node's network" if hit else "")
                        + "."
                    ),
                    "host": host,
                    "rank": hit[0] if hit else None,
                    "count": total,
                    "per_rank": ranks,
                    "peers": [{"peer": p, "count": int(n)} for p, n in peers.head(5).rows()],
                }
            )
    blk = h.filter(pl.col("kind") == "block_io")
    if blk.height:
        per = blk.group_by("host", "detail").agg(pl.col("count").sum(), pl.col("total_ns").sum())
        for host, dev, n, tot in per.rows():
            if n < BLOCK_MIN_REQUESTS or tot / n < BLOCK_SLOW_NS:
                continue
            findings.append(
                {
                    "kind": "block_io_stall",
                    "severity": "warning" if host in strag_hosts else "info",
                    "summary": (f"Block device {dev} on host {host}: {n} requests took "
                                f"{tot / n / 1e6:.1f} ms on average."),
                    "host": host,
                    "device": dev,
                    "requests": int(n),
                    "mean_latency_ms": round(tot / n / 1e6, 3),
                }
            )
    return findings


def detect(
    source: Sequence[Recording] | HostContext,
    steps: pl.DataFrame | None,
    stragglers: list[dict[str, Any]],
    step_ns: float,
    manifests: Sequence[tuple[dict[str, Any], str]] | None = None,
    offsets_ns: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Host-context findings (see module doc); cites them in `stragglers` (evidence `host`).
    `source`: raw recordings or their HostContext (e.g. rebuilt from summaries); with
    `manifests` and `offsets_ns` (the clocks), a window-scoped straggler's CPU contention is
    measured in its own steps."""
    ctx = source if isinstance(source, HostContext) else context(source)
    h = ctx.rows
    if h.height == 0:
        return []
    for f in stragglers:
        f["_host"] = ctx.host_of_rank.get(f["rank"])
    cont = contention(ctx, steps)
    shift = clock_shifts(manifests, offsets_ns or {}) if manifests else None
    findings = _cpu_findings(cont, stragglers, step_ns,
                             _scoped_waits(ctx, stragglers, steps, shift))
    findings += _other_findings(h, stragglers, ctx.rank_of_tgid)
    for f in stragglers:
        f.pop("_host", None)
        mine = [x for x in findings if x.get("rank") == f["rank"] and x["severity"] != "info"]
        if not mine:
            continue
        f["evidence"]["host"] = [
            {k: x.get(k) for k in ("kind", "summary", "competitor", "count", "comm")
             if x.get(k) is not None}
            for x in mine
        ]
        cpu = next((x for x in mine if x["kind"] == "cpu_contention"), None)
        if cpu is not None:
            f["summary"] = f["summary"].rstrip(".") + (
                f"; host: '{cpu['competitor']}' took its CPU (see cpu_contention)."
            )
    return findings


def clock_shifts(manifests: Sequence[tuple[dict[str, Any], str]],
            offsets_ns: dict[str, int]) -> dict[str, int]:
    """Per host: monotonic -> aligned wall clock (mono_to_wall + the alignment offset)."""
    out: dict[str, int] = {}
    for man, host in manifests:
        try:
            out.setdefault(host, mono_to_wall_offset(man) + int(offsets_ns.get(host, 0)))
        except RecordingInvalid:
            continue
    return out


def overlap_ns(a0: int, a1: int, b0: int, b1: int) -> int:
    """How long [a0, a1) and [b0, b1) overlap (ns)."""
    return max(0, min(a1, b1) - max(a0, b0))


def slot_waits(ctx: HostContext, shift: dict[str, int]) -> list[tuple[int, str, int, int, float]]:
    """cpu_wait rows of the ranks on the aligned clock: (rank, competitor, t0, t1, runnable
    ns), own threads excluded; a row's wait is spread evenly over [t0, t1)."""
    key = tuple(sorted(shift.items()))
    if key in ctx._slots:
        return ctx._slots[key]
    h = ctx.rows
    if h.height == 0:
        return []
    waits = h.filter((pl.col("kind") == "cpu_wait") & pl.col("rank").is_not_null()
                     & pl.col("host").is_in(sorted(shift)) & pl.col("interval_ns").gt(0))
    rows = []
    for rank, detail, t0, iv, tot, hst in waits.select("rank", "detail", "ts_ns", "interval_ns",
                                                       "total_ns", "host").rows():
        if detail not in ctx.own_threads.get(int(rank), set()):
            a = t0 + shift[hst]
            rows.append((int(rank), detail, a, a + int(iv), float(tot)))
    ctx._slots[key] = rows
    return rows


def waits_in(rows, a: int, b: int, rank: int | None = None) -> dict[int, dict[str, float]]:
    """Per rank (only `rank` when given), per competitor: runnable ns inside [a, b)."""
    out: dict[int, dict[str, float]] = {}
    for r, detail, t0, t1, tot in rows:
        ov = overlap_ns(t0, t1, a, b)
        if ov and (rank is None or r == rank):
            comm = out.setdefault(r, {})
            comm[detail] = comm.get(detail, 0.0) + tot * ov / (t1 - t0)
    return out


def waits_over(rows, steps: pl.DataFrame, rank: int) -> dict[str, float]:
    """`rank`'s runnable ns per competitor over the span of `steps` (rows of that rank: the
    first start to the last end)."""
    a, b = int(steps["start_ns"].min()), int(steps["end_ns"].max())
    return waits_in(rows, a, b, rank).get(rank, {})
