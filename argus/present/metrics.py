"""Prometheus exposition of the live state (`argus.present.live`), for `argus daemon`.

Label sets are bounded: per rank {job_id, rank, host}; node-wide {host} (drops also by
`kind`, one of the fixed drop counters). No kernel, function or collective names. The
label is `job_id`, not `job`: Prometheus sets `job` itself (the scrape job) and would
rename ours to `exported_job`.

Series end with what they describe: a job the state marks `ended` (every rank exited;
its view stays in /state for the daemon's `job_grace_s`) has no series at all, so its
straggler score, hang flags and step times leave /metrics at the next scrape (Prometheus
then marks them stale and no alert on them fires or stays firing). A rank that exited
while its job runs on keeps only `argus_rank_up` = 0 (1 while traced): alert on that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# (metric, help, state key, scale to base units)
RANK_GAUGES = (
    ("argus_step_time_seconds", "Median step time over the rank's last steps.", "step_time_ms",
     1e-3),
    ("argus_compute_seconds", "Median time per step not spent waiting (GPU waits, collectives).",
     "compute_ms", 1e-3),
    ("argus_collective_wait_seconds", "Median time per step inside collective calls.",
     "coll_wait_ms", 1e-3),
    ("argus_wait_seconds", "Median time per step waiting (collectives and GPU synchronisation).",
     "wait_ms", 1e-3),
    ("argus_arrival_lateness_seconds",
     "Median per step of how late the rank enters collectives vs the median rank.", "lateness_ms",
     1e-3),
    ("argus_straggler_score", "Straggler score of the diagnosis (0 when not flagged).",
     "straggler_score", 1.0),
    ("argus_hang", "1 when the rank waits in (or never arrived at) a hung collective.", "hang",
     1.0),
    ("argus_hang_waited_seconds", "How long the rank has waited in the hung collective.",
     "hang_waited_s", 1.0),
    ("argus_probes_attached", "Probe-table entries (symbols probed) in the rank's process.",
     "probes", 1.0),
    ("argus_steps", "Complete steps of the rank in the diagnosis window.", "steps", 1.0),
)
RANK_UP = ("argus_rank_up", "1 while the rank is traced, 0 once it exited while its job runs "
           "on (a finished job has no series).")


class LiveCollector(Collector):
    """Yields the metric families of the current state, read through `get_state()` at each
    scrape: series of finished jobs disappear with them."""

    def __init__(self, get_state: Callable[[], dict[str, Any]]):
        self.get_state = get_state

    def collect(self) -> Iterator:
        state = self.get_state() or {}
        host = str(state.get("host") or "")
        fams = {name: GaugeMetricFamily(name, doc, labels=["job_id", "rank", "host"])
                for name, doc in (*((n, d) for n, d, _k, _s in RANK_GAUGES), RANK_UP)}
        jobs = [j for j in state.get("jobs") or [] if not j.get("ended")]
        for job in jobs:
            for r in job.get("ranks") or []:
                labels = [str(job.get("job")), str(r.get("rank")), str(r.get("host") or host)]
                fams[RANK_UP[0]].add_metric(labels, 0.0 if r.get("exited") else 1.0)
                if r.get("exited"):
                    continue
                for name, _doc, key, scale in RANK_GAUGES:
                    v = r.get(key)
                    if v is None:
                        continue
                    fams[name].add_metric(labels, float(v) * scale)
        yield from fams.values()
        g = GaugeMetricFamily("argus_jobs", "Jobs traced on this node (running: a rank traced).",
                              labels=["host"])
        g.add_metric([host], len(jobs))
        yield g
        g = GaugeMetricFamily("argus_targets", "Processes traced on this node.", labels=["host"])
        g.add_metric([host], float(state.get("targets") or 0))
        yield g
        g = GaugeMetricFamily("argus_uprobes", "Uprobes the daemon holds (node-wide, shared by "
                              "ranks mapping the same library).", labels=["host"])
        g.add_metric([host], float(state.get("uprobes") or 0))
        yield g
        if state.get("flush_s") is not None:  # a daemon falling behind shows here first
            g = GaugeMetricFamily("argus_analysis_seconds", "How long the last interval's drain "
                                  "and analysis took (all jobs).", labels=["host"])
            g.add_metric([host], float(state["flush_s"]))
            yield g
        c = CounterMetricFamily("argus_drops", "Events lost in BPF, by kind (node-wide).",
                                labels=["host", "kind"])
        for kind, v in sorted((state.get("drops") or {}).items()):
            c.add_metric([host, str(kind)], float(v))
        yield c
