"""The node-wide service: discover ranks, trace them through ONE Tracer, and every interval
write per-job summaries, diagnose the recent window and publish the live state.

    d = Daemon(DaemonOptions(output=Path("/var/lib/argus"), metrics_addr=("127.0.0.1", 9464)))
    d.run()          # until SIGTERM / SIGINT (clean: last drain, segments written, detach)

Loop (single thread; the HTTP server answers from its own threads with the last state):
- every `poll` (0.1 s): the tracer drains its ring buffers and follows process lifecycle
  (exits detach there);
- every `SCAN_S` (1 s): /proc is scanned for new processes (`discovery.Scanner`); each new
  rank is added to the tracer and to its job (`discovery.job_key`);
- every `interval_s`: `Tracer.drain()` -> rows split by job -> incremental analysis per
  job (`_analyse`): `build_summaries` runs on the rows since the start of the job's last
  `OVERLAP_STEPS` summarised steps only (the new steps plus a fixed overlap, whose
  (rank, start_ns) pairs anchor each rank's new ids to its own previous ones,
  `_assign_ids`; the job's collectives keep one numbering from build to build,
  `_Job.seq_shifts`); the new
  steps join the job's summaries, kept for the last `window_s` (at most `MAX_DIAG_STEPS`
  steps); `diagnose_summaries` runs on those (the same detectors as `argus report`, on
  per-step rows: no raw event is re-read), `job_view` makes the live state. The new steps
  go to `OUTPUT/jobs/<job>/<wall ns>/` (manifest.json + summaries/, step ids continuous
  across a job's segments, so `argus report OUTPUT` merges them); the oldest segments are
  removed above `max_disk_mb`. So the work of an interval grows with the steps it brought,
  not with the window (docs/daemon.md has the measured /state staleness).
- NVML (when `TraceOptions.gpu_interval_s` is set and a library answers): one
  `GpuSampler` thread for the node; every interval its new samples are joined to the ranks
  of each job (`nvml.assign_ranks`) and kept with the job's summaries (gpu_throttle).
A failure while handling one job (or one target) is logged and never stops the daemon.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from argus import __version__
from argus.analyze.hang import LATEST_INTERVALS
from argus.analyze.summary import TAIL_SEQS, build_summaries, diagnose_summaries
from argus.collect.nvml import GpuSampler, assign_ranks
from argus.collect.session import check_kernel_features, yield_to_the_job
from argus.collect.tracer import TraceOptions, Tracer
from argus.daemon.config import DaemonConfig, load_config
from argus.daemon.discovery import Found, Scanner, job_key
from argus.present.live import job_view, node_state
from argus.present.metrics import LiveCollector
from argus.recording import schema
from argus.recording.io import Recording
from argus.recording.summaries import (
    STACK_DICT_SCHEMA,
    STEP_SCHEMA,
    TAIL_SCHEMA,
    Summaries,
    write_summaries,
)

log = logging.getLogger("argus.daemon")
SCAN_S = 1.0
JOBS_DIR = "jobs"
OVERLAP_STEPS = 8  # summarised steps re-read by the next build (boundaries + id mapping)
MAX_DIAG_STEPS = 2000  # steps of a job the diagnosis reads at most (besides window_s)
SETTLE_S = 2.0  # a new job's ranks traced together this long before its first build
LEARN_SEQS = 8  # collectives of a (tgid, comm) in one build before its numbering is kept
# Tests only: milliseconds flush() sleeps before it drains (a daemon descheduled on a busy
# node, reproduced on purpose); 0 or unset in production. Read at start-up.
DELAY_ENV = "ARGUS_DAEMON_TEST_DRAIN_DELAY_MS"


@dataclass
class DaemonOptions:
    output: Path
    metrics_addr: tuple[str, int] | None = ("127.0.0.1", 9464)
    config_path: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # CLI flags over the file
    trace: TraceOptions = field(default_factory=TraceOptions)  # NVML on (1 s) when present
    pids: list[int] | None = None  # fixed targets (argus top PID...): no node-wide scan


def _empty(s: dict) -> pl.DataFrame:
    return pl.DataFrame(schema=s)


@dataclass
class _Job:
    """One job's state between intervals (see the module doc)."""

    key: str
    tgids: set[int] = field(default_factory=set)
    # raw rows not yet behind the overlap: events, stacks, host context (monotonic ts_ns)
    events: pl.DataFrame = field(default_factory=schema.empty_events)
    stacks: pl.DataFrame = field(default_factory=schema.empty_stacks)
    host: pl.DataFrame = field(default_factory=schema.empty_host)
    # the summaries the diagnosis reads: continuous step ids, the last window_s
    steps: pl.DataFrame = field(default_factory=lambda: _empty(STEP_SCHEMA))
    stack_dict: pl.DataFrame = field(default_factory=lambda: _empty(STACK_DICT_SCHEMA))
    tail: pl.DataFrame = field(default_factory=lambda: _empty(TAIL_SCHEMA))
    gpu: pl.DataFrame = field(default_factory=schema.empty_gpu)
    meta: dict[str, Any] = field(default_factory=dict)
    watermark: dict[int, int] = field(default_factory=dict)  # rank -> last step start written
    next_id: int = 0  # the job's next step id
    started_ns: int | None = None  # monotonic ns of the first rows
    view: dict[str, Any] | None = None
    ended_mono: float | None = None
    segments: int = 0
    last_seg: dict[str, Any] | None = None  # the last segment written: path, steps, gpu, host
    host_wm: int = -1  # the newest host-context row written (ts_ns)
    joined_ns: int | None = None  # monotonic ns when its latest rank was added
    # (tgid, comm) -> gseq - seq: the job's numbering of its NCCL collectives, kept from build
    # to build (the tracer's seq counts per process since attach), so every build's tails and
    # steps number collectives alike whatever its window holds
    seq_shifts: dict[tuple[int, str], int] = field(default_factory=dict)


class Daemon:
    def __init__(self, opts: DaemonOptions):
        self.opts = opts
        self.config: DaemonConfig = load_config(opts.config_path, **opts.overrides)
        self.scanner = Scanner(self.config, opts.trace.proc_root)
        self.tracer: Tracer | None = None
        self.jobs: dict[str, _Job] = {}
        self.job_of: dict[int, str] = {}
        self.host = socket.gethostname()
        self._state: dict[str, Any] = node_state(self.host, [], time.time_ns(), targets=0)
        self._lock = threading.Lock()
        self._stop: str | None = None
        self._reload = False
        self._http: ThreadingHTTPServer | None = None
        self.registry = CollectorRegistry()
        self.registry.register(LiveCollector(self.state))
        self.errors: list[str] = []
        self.gpu: GpuSampler | None = None
        self.flush_s: float | None = None
        self.run_id = f"{self.host}-{os.getpid()}-{time.time_ns()}"
        self._final_flush = True
        self.drain_delay_s = _env_ms(DELAY_ENV) / 1000.0

    # -- state shared with the HTTP threads ----------------------------------------------
    def state(self) -> dict[str, Any]:
        with self._lock:
            return self._state

    def stop(self, reason: str = "requested", flush: bool = True) -> None:
        """End run() at its next poll. flush=False is argus top's quit: no last analysis
        (nothing will read it) and the probes are released by a background holder process
        (`_hand_off_probes`) instead of in this one, which can then exit at once."""
        self._final_flush = self._final_flush and flush
        self._stop = reason

    def request_reload(self) -> None:
        self._reload = True

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        check_kernel_features()
        out = self.opts.output
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        if self.opts.metrics_addr is not None:
            self._http = _serve(self, *self.opts.metrics_addr)
        self.tracer = Tracer(self.opts.trace)
        self.tracer.start(self.tracer.plan(self.opts.pids) if self.opts.pids else [])
        if self.opts.trace.gpu_interval_s:
            self.gpu = GpuSampler(self.opts.trace.gpu_interval_s)
            self.gpu.start()  # its own thread; no NVML = no samples, a line in /state
        yield_to_the_job()  # the node's jobs come first (argus.collect.session)

    @property
    def metrics_port(self) -> int | None:
        return self._http.server_address[1] if self._http else None

    def run(self, install_signals: bool = True) -> str:
        """Run until stop(); returns the stop reason. Everything is flushed on the way out."""
        if install_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.stop("sigterm"))
            signal.signal(signal.SIGINT, lambda *_: self.stop("interrupt"))
            signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        if self.tracer is None:
            self.start()
        last_scan = 0.0
        last_flush = time.monotonic()
        try:
            while self._stop is None:
                self.tracer.poll(0.1)
                now = time.monotonic()
                if self._reload:
                    self._do_reload()
                if now - last_scan >= SCAN_S:
                    last_scan = now
                    self.discover()
                if now - last_flush >= self.config.interval_s:
                    last_flush = now
                    self.flush()
            signal.signal(signal.SIGINT, signal.SIG_IGN) if install_signals else None
            if self._final_flush:
                self.flush()
        finally:
            try:
                if self._final_flush:
                    self.tracer.finish(self._stop or "error")  # drains, detaches every probe
            finally:
                if self.tracer.session is not None:
                    if not self._final_flush:
                        _hand_off_probes()
                    # detaches every probe (perf-event fds)
                    self.tracer.session.close(wait=self._final_flush)
                if self.gpu is not None:
                    self.gpu.stop()
                    self.gpu.close()
                if self._http is not None:
                    self._http.shutdown()
                    self._http.server_close()
        return self._stop or "error"

    def _do_reload(self) -> None:
        self._reload = False
        try:
            self.config = load_config(self.opts.config_path, **self.opts.overrides)
        except Exception as e:  # a bad file keeps the old config
            self._error(f"config reload failed, keeping the previous config: {e}")
            return
        self.scanner.config = self.config
        self.scanner.reset()
        log.warning("argus daemon: configuration reloaded from %s", self.opts.config_path)

    def _error(self, msg: str) -> None:
        log.warning("argus daemon: %s", msg)
        self.errors = (self.errors + [msg])[-20:]

    # -- discovery -----------------------------------------------------------------------
    def discover(self) -> list[int]:
        added = []
        found = self.scanner.scan() if self.opts.pids is None else self._fixed()
        for f in found:
            if f.tgid in self.job_of:
                continue
            try:
                if f.tgid not in self.tracer.targets and not self.tracer.add_target(f.tgid):
                    continue
            except Exception as e:  # a misbehaving target never stops the daemon
                self._error(f"cannot trace process {f.tgid} ({f.comm}): {e}")
                continue
            job = self.jobs.get(f.job)
            if job is None:
                job = self.jobs[f.job] = _Job(f.job)
            job.tgids.add(f.tgid)
            job.joined_ns = time.monotonic_ns()
            job.ended_mono = None
            self.job_of[f.tgid] = f.job
            added.append(f.tgid)
            log.info("argus daemon: tracing %d (%s, rank %s) in job %s", f.tgid, f.comm,
                     f.rank, f.job)
        return added

    def _fixed(self) -> list[Found]:
        """With fixed targets: the traced processes (ranks of a watched launcher included)
        not yet in a job."""
        out = []
        for t in list(self.tracer.targets.values()):
            if t.traced and not t.exited and t.tgid not in self.job_of:
                key = job_key(t.tgid, t.env, self.opts.trace.proc_root)
                out.append(Found(t.tgid, "", t.exe, key, t.rank))
        return out

    # -- the interval --------------------------------------------------------------------
    def flush(self) -> None:
        """Drain the tracer (and NVML), then per job: new summaries, diagnosis, segment,
        live state."""
        t0 = time.monotonic()
        tr = self.tracer
        if self.drain_delay_s > 0:  # tests only (DELAY_ENV): a late drain, on purpose
            time.sleep(self.drain_delay_s)
        try:
            events, inflight, stacks, host = tr.drain()
        except Exception as e:
            self._error(f"drain failed: {e}")
            return
        gpu_rows = self.gpu.take() if self.gpu is not None else []
        now_ns = time.monotonic_ns()
        now = time.monotonic()
        views = []
        for key, job in list(self.jobs.items()):
            tg = sorted(job.tgids)
            try:
                sel = pl.col("tgid").is_in(tg)
                ev = events.filter(sel)
                self._add_rows(job, ev, stacks.filter(sel), host.filter(sel), now_ns)
                alive = [t for t in tg if t in tr.targets and not tr.targets[t].exited]
                if not alive and job.ended_mono is None:
                    job.ended_mono = now
                if job.ended_mono is not None and now - job.ended_mono > self.config.job_grace_s:
                    self._forget(job)
                    continue
                if job.ended_mono is not None and job.view is not None and not ev.height:
                    views.append(job.view)  # ended, nothing new: keep the last view
                    continue
                if self._settling(job, now_ns):
                    continue
                job.view = self._analyse(job, inflight.filter(sel), self._job_gpu(job, gpu_rows),
                                         now_ns)
                views.append(job.view)
            except Exception as e:
                self._error(f"job {key}: analysis failed: {type(e).__name__}: {e}")
                try:
                    self._cut(job, now_ns)  # the raw rows stay bounded all the same
                except Exception:  # noqa: BLE001
                    pass
                if job.view is not None:
                    views.append(job.view)
        tr.forget_exited()
        self.flush_s = round(time.monotonic() - t0, 3)
        gpu_state = None
        if self.gpu is not None:
            gpu_state = {"available": self.gpu.available, "reason": self.gpu.reason,
                         "devices": len(self.gpu.devices), "passes": self.gpu.passes}
        with self._lock:
            self._state = node_state(
                self.host, views, time.time_ns(),
                targets=sum(1 for t in tr.targets.values() if t.traced and not t.exited),
                uprobes=len(tr._uprobes), drops=tr.drops(), errors=list(self.errors),
                version=__version__, flush_s=self.flush_s, gpu=gpu_state)
        try:
            self._enforce_budget()
        except OSError as e:
            self._error(f"disk budget: {e}")

    def _settling(self, job: _Job, now_ns: int) -> bool:
        """Before a job's first steps: wait until all its ranks found so far have been
        traced together for SETTLE_S (or two intervals), and drop the rows from before the
        last one joined. Ranks are attached one scan after another, each with its own
        collective counters: a first build over a short, staggered start matches their
        collectives on too few pairs and numbers their steps inconsistently."""
        if job.steps.height or job.joined_ns is None:
            return False
        if now_ns - job.joined_ns < int(max(SETTLE_S, 2 * self.config.interval_s) * 1e9):
            return True
        keep = pl.col("ts_ns") >= job.joined_ns
        job.events = job.events.filter(keep)
        job.host = job.host.filter(keep)
        job.stacks = job.stacks.filter(
            pl.col("ts_ns") + pl.col("interval_ns").fill_null(0) >= job.joined_ns)
        job.started_ns = max(job.started_ns or job.joined_ns, job.joined_ns)
        return False

    def _add_rows(self, job: _Job, ev, st, hc, now_ns: int) -> None:
        if job.started_ns is None:
            job.started_ns = now_ns - int(self.config.interval_s * 1e9)
        for name, new in (("events", ev), ("stacks", st), ("host", hc)):
            if new.height:
                old = getattr(job, name)
                setattr(job, name, pl.concat([old, new], how="vertical_relaxed")
                        if old.height else new)

    def _job_gpu(self, job: _Job, rows: list[dict[str, Any]]) -> pl.DataFrame:
        """The new NVML samples of the devices this job's ranks use (rank/tgid filled)."""
        if not rows or self.gpu is None:
            return schema.empty_gpu()
        tr = self.tracer
        ranks = []
        for tgid in sorted(job.tgids):
            t = tr.targets.get(tgid)
            if t is not None and t.traced:
                ranks.append({"tgid": tgid, "rank": t.rank, "local_rank": t.local_rank,
                              "env": t.env, "cuda_device": tr.ctx.devices.get(tgid)})
        frame = assign_ranks(rows, ranks, self.gpu.devices, self.gpu.processes)
        return frame.filter(pl.col("tgid").is_not_null())

    def _forget(self, job: _Job) -> None:
        for t in job.tgids:
            self.job_of.pop(t, None)
        del self.jobs[job.key]

    def _manifest(self, job: _Job, start_ns: int, end_ns: int) -> dict[str, Any]:
        tr = self.tracer
        ranks = []
        for tgid in sorted(job.tgids):
            t = tr.targets.get(tgid)
            if t is None or not t.traced:
                continue
            ranks.append({"rank": t.rank, "local_rank": t.local_rank, "world_size": t.world_size,
                          "tgid": tgid, "host": self.host, "exe": t.exe, "env": t.env,
                          "exited": t.exited, "libraries": t.libraries,
                          "cuda_device": tr.ctx.devices.get(tgid)})
        gpu = None
        if self.gpu is not None:
            gpu = ({"available": True, "library": self.gpu.library, "driver": self.gpu.driver,
                    "interval_s": self.gpu.interval_s, "devices": self.gpu.devices}
                   if self.gpu.available else
                   {"available": False,
                    "reason": self.gpu.reason or "NVML not opened yet"})
        return {
            "format": schema.FORMAT, "argus_version": __version__, "host": self.host,
            "kernel": os.uname().release, "clock": {"mono_to_wall_ns": tr.mono_to_wall_ns},
            "started_ns": start_ns, "ended_ns": end_ns,
            "duration_s": round((end_ns - start_ns) / 1e9, 3), "end_reason": "daemon_window",
            "sample_hz": tr.opts.sample_hz if "cpu" in tr.opts.channels else 0,
            "channels": {**{c: c in tr.opts.channels for c in ("cuda", "nccl", "torch", "cpu",
                                                                "host")},
                         "gpu": bool(gpu and gpu.get("available"))},
            "ranks": ranks, "probes": [], "drops": {}, "job": job.key,
            "daemon_run": self.run_id,  # segments of one daemon run number steps on
            **({"gpu": gpu} if gpu is not None else {}),
        }

    def _new_steps(self, job: _Job, steps: pl.DataFrame, final: bool = False) -> pl.DataFrame:
        """The build's steps not summarised before, with the job's continuous step ids
        (`_assign_ids`: from each rank's own ids and the steps' times, never from the
        build's numbering). `final`: every rank has exited (the last step keeps the CPU
        samples after it, as at the end of a recording)."""
        wm = job.watermark
        new = steps.filter(pl.col("start_ns") > pl.col("rank").replace_strict(
            wm, default=-1, return_dtype=pl.Int64))
        if not new.height:
            return new
        new = _assign_ids(job.steps, steps, new, job.next_id)
        new = new.filter(pl.col("step") >= 0)
        # CPU samples after a rank's last complete step are the next step's (build_summaries
        # gives them to the nearest step): it gets them in the next build
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
        for rank, last in new.group_by("rank").agg(pl.col("start_ns").max()).rows():
            wm[rank] = max(wm.get(rank, -1), int(last))
        if new.height:
            job.next_id = max(job.next_id, int(new["step"].max()) + 1)
        return new

    def _cut(self, job: _Job, now_ns: int) -> None:
        """Keep the raw rows from the start of each rank's OVERLAP_STEPS-th last summarised
        step (the next build re-reads them: boundaries and id mapping), at most window_s."""
        floor = now_ns - int(self.config.window_s * 1e9)
        cut = floor
        if job.steps.height:
            starts = (job.steps.sort("start_ns").group_by("rank")
                      .agg(pl.col("start_ns").tail(OVERLAP_STEPS).first())["start_ns"])
            cut = max(floor, int(starts.min()) - self.tracer.mono_to_wall_ns)
        keep = pl.col("ts_ns") >= cut
        job.events = job.events.filter(keep)
        job.host = job.host.filter(keep)
        # stack rows: the intervals reaching past the cut, and each rank's latest ones (the
        # hang detector's latest stacks, as at the end of a recording)
        st = job.stacks
        if st.height:
            latest = pl.col("ts_ns").rank("dense", descending=True).over("tgid") <= (
                LATEST_INTERVALS)
            job.stacks = st.filter((pl.col("ts_ns") + pl.col("interval_ns").fill_null(0) >= cut)
                                   | latest)
        job.started_ns = max(job.started_ns or cut, cut)

    def _analyse(self, job: _Job, inflight: pl.DataFrame, gpu_new: pl.DataFrame,
                 now_ns: int) -> dict[str, Any]:
        ev = job.events
        if inflight.height:
            ev = pl.concat([ev, inflight], how="vertical_relaxed")
        manifest = self._manifest(job, job.started_ns or now_ns, now_ns)
        rec = Recording(manifest=manifest, events=ev.sort("ts_ns"), stacks=job.stacks,
                        host_ctx=job.host)
        t0 = time.perf_counter()
        summ = build_summaries([rec], seq_shifts=job.seq_shifts)
        t1 = time.perf_counter()
        renumbered = set()  # processes whose numbering this build corrected (by the steps)
        for tgid, comm, shift, n in summ.meta.pop("seq_shifts", []):
            old = job.seq_shifts.get((tgid, comm))
            if old is not None or n >= LEARN_SEQS:
                job.seq_shifts[(tgid, comm)] = shift
            if old is not None and old != shift:
                renumbered.add(tgid)
        tr = self.tracer
        final = all(t not in tr.targets or tr.targets[t].exited for t in job.tgids)
        new = self._new_steps(job, summ.steps, final)
        # the job's summaries: the window's steps, each rank's latest tail, their stacks
        steps = pl.concat([job.steps, new.select(job.steps.columns)], how="vertical_relaxed")
        if steps.height:
            newest = int(steps["end_ns"].max())
            steps = steps.filter((pl.col("end_ns") >= newest - int(self.config.window_s * 1e9))
                                 & (pl.col("step") > int(steps["step"].max()) - MAX_DIAG_STEPS))
        job.steps = steps
        job.tail = _merge_tail(summ.tail, job.tail, renumbered)
        job.meta = summ.meta
        if gpu_new.height:
            job.gpu = (pl.concat([job.gpu, gpu_new], how="vertical_relaxed") if job.gpu.height
                       else gpu_new)
        if job.gpu.height:
            job.gpu = job.gpu.filter(pl.col("ts_ns") >= now_ns - int(self.config.window_s * 1e9))
        used = _stack_ids(job.steps) | _stack_ids(job.tail)
        sd = pl.concat([summ.stack_dict, job.stack_dict], how="vertical_relaxed")
        job.stack_dict = sd.unique("stack_id", keep="first").filter(
            pl.col("stack_id").is_in(sorted(used)))
        self._write_segment(job, new, summ, gpu_new, manifest)
        self._cut(job, now_ns)
        extra = {}
        if hasattr(summ, "host_ctx"):  # host-context summaries (when the format has them)
            extra["host_ctx"] = summ.host_ctx
        diag = Summaries(meta=summ.meta, steps=job.steps, stack_dict=job.stack_dict,
                         tail=job.tail, manifest=manifest, gpu=job.gpu, **extra)
        t2 = time.perf_counter()
        report = diagnose_summaries([diag], hang_after_s=self.config.hang_after_s)
        t3 = time.perf_counter()
        exited = {t for t in job.tgids if t not in tr.targets or tr.targets[t].exited}
        view = job_view(job.key, rec, diag, report, {t: tr.probes_of(t) for t in job.tgids},
                        exited)
        view["segments"] = job.segments
        # what the interval cost: rows re-read, steps summarised and diagnosed, seconds
        view["analysis"] = {"raw_events": ev.height, "new_steps": new.height,
                            "window_steps": job.steps.height,
                            "summaries_s": round(t1 - t0, 3), "diagnosis_s": round(t3 - t2, 3)}
        return view

    def _write_segment(self, job: _Job, new: pl.DataFrame, summ: Summaries,
                       gpu_new: pl.DataFrame, manifest: dict[str, Any]) -> None:
        """The new steps (continuous ids) -> OUTPUT/jobs/<job>/<wall ns>/. An interval
        without new steps (a hang, the end of a job) rewrites the job's last segment with
        the current tail, end time, NVML and host rows, so the hang detector reading the
        disk sees the job's latest state."""
        host_new = getattr(summ, "host_ctx", None)
        if host_new is not None and host_new.height:
            host_new = host_new.filter(pl.col("ts_ns") > job.host_wm)
            if host_new.height:
                job.host_wm = int(host_new["ts_ns"].max())
        if new.height:
            wall = int(new["end_ns"].max())
            seg = self.opts.output / JOBS_DIR / job.key / str(wall)
            job.last_seg = {"path": seg, "steps": new, "gpu": gpu_new, "host": host_new}
            job.segments += 1
        elif job.last_seg is not None and job.last_seg["path"].exists():
            last = job.last_seg
            seg = last["path"]
            for k, v in (("gpu", gpu_new), ("host", host_new)):
                if v is not None and v.height:
                    last[k] = (pl.concat([last[k], v], how="vertical_relaxed")
                               if last[k] is not None and last[k].height else v)
        else:
            return
        last = job.last_seg
        seg.mkdir(mode=0o700, parents=True, exist_ok=True)
        used = _stack_ids(last["steps"]) | _stack_ids(job.tail)
        sd = job.stack_dict.filter(pl.col("stack_id").is_in(sorted(used)))
        extra = {"host_ctx": last["host"]} if last["host"] is not None else {}
        out = Summaries(meta=dict(summ.meta, job=job.key), steps=last["steps"], stack_dict=sd,
                        tail=job.tail, manifest=manifest, gpu=last["gpu"], **extra)
        write_summaries(seg, out)
        tmp = seg / ".manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
        os.chmod(tmp, 0o600)
        os.replace(tmp, seg / "manifest.json")

    def _enforce_budget(self) -> None:
        """Remove the oldest segments (any job) while the total exceeds max_disk_mb; the
        newest segment is always kept."""
        root = self.opts.output / JOBS_DIR
        if not root.exists():
            return
        segs = []
        for jd in root.iterdir():
            if jd.is_dir():
                for sd in jd.iterdir():
                    if sd.is_dir():
                        size = sum(f.stat().st_size for f in sd.rglob("*") if f.is_file())
                        segs.append((sd.stat().st_mtime_ns, sd, size))
        segs.sort()
        total = sum(s[2] for s in segs)
        budget = self.config.max_disk_mb * 1024 * 1024
        for _m, sd, size in segs[:-1]:
            if total <= budget:
                break
            shutil.rmtree(sd, ignore_errors=True)
            total -= size
        for jd in root.iterdir():
            if jd.is_dir() and not any(jd.iterdir()):
                jd.rmdir()


_HOLDER_PIPES: list[int] = []


def _hand_off_probes() -> None:
    """Let a child process release the probes, so that this one can exit at once.

    Removing a uprobe costs the kernel a synchronisation per probe (measured here: about
    0.23 s each, 15 s for the 64 uprobes of a 3-rank simulated job, whether the fds are
    closed by bcc's cleanup or by the process exit). The child inherits every fd (each perf
    event and BPF object gets a second reference), becomes its own session with its stdio
    on /dev/null (a closing terminal does not signal it), and blocks until this process is
    gone (the pipe's write end closes with it), then exits: its exit drops the last
    references, and the kernel detaches every probe then. This process closes its own
    references meanwhile (fast: not the last ones) and exits without waiting. The child
    runs no Python beyond os calls (forked from a threaded process)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(w)
            os.read(r, 1)  # EOF when the parent has exited
        finally:
            os._exit(0)
    os.close(r)
    _HOLDER_PIPES.append(w)  # open until this process exits


def _assign_ids(done: pl.DataFrame, steps: pl.DataFrame, new: pl.DataFrame,
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


def _env_ms(name: str) -> float:
    """A non-negative number of milliseconds from the environment (0 when unset or bad)."""
    try:
        v = float(os.environ.get(name) or 0)
    except ValueError:
        return 0.0
    return v if v > 0 and v == v and v < 3_600_000 else 0.0


def _merge_tail(new: pl.DataFrame, old: pl.DataFrame,
                renumbered: set[int] = frozenset()) -> pl.DataFrame:
    """The job's tail after a build: each rank's row of the build (what it does now), else
    its previous row (a rank whose raw rows all aged out, e.g. hung for longer than the
    window). A rank's collectives (`comms`) are the union of the previous row's and the
    build's (same process: one numbering, `_Job.seq_shifts`; not for a process in
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


def _stack_ids(frame: pl.DataFrame) -> set[int]:
    """Stack ids a steps frame (`stacks`) or a tail (`latest_stacks`) refers to."""
    col = "stacks" if "stacks" in frame.columns else "latest_stacks"
    if not frame.height or col not in frame.columns:
        return set()
    ids = frame.select(pl.col(col).explode().struct.field("stack_id")).to_series()
    return set(ids.drop_nulls().to_list())


class _Handler(BaseHTTPRequestHandler):
    daemon_ref: Daemon

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype = generate_latest(self.daemon_ref.registry), CONTENT_TYPE_LATEST
        elif path == "/state":
            body = json.dumps(self.daemon_ref.state(), default=str).encode()
            ctype = "application/json"
        elif path in ("/", "/healthz"):
            body, ctype = b"argus daemon: /metrics (Prometheus), /state (JSON)\n", "text/plain"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):  # no access log on stderr
        pass


def _serve(daemon: Daemon, addr: str, port: int) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"daemon_ref": daemon})
    httpd = ThreadingHTTPServer((addr, port), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="argus-metrics", daemon=True).start()
    return httpd


class AttachReader:
    """The reader of `argus top PID...`: a Daemon over fixed targets (no scan, no HTTP, its
    summaries in a temporary directory) running in a background thread."""

    def __init__(self, pids: list[int], interval_s: float = 1.0, output: Path | None = None):
        import tempfile

        self._tmp = None if output else tempfile.TemporaryDirectory(prefix="argus-top-")
        out = output or Path(self._tmp.name)
        self.daemon = Daemon(DaemonOptions(output=out, metrics_addr=None, pids=list(pids),
                                           overrides={"interval_s": interval_s,
                                                      "window_s": 30.0}))
        self.daemon.start()  # errors (no such PID, no permission) raise here, in the caller
        self._thread = threading.Thread(target=self.daemon.run, kwargs={"install_signals": False},
                                        name="argus-top-attach", daemon=True)
        self._thread.start()

    def read(self) -> dict[str, Any]:
        return self.daemon.state()

    def close(self) -> None:
        """Stop at once: no last analysis (nobody reads it); the probes are released by a
        background holder process when this one exits (`_hand_off_probes`)."""
        self.daemon.stop("requested", flush=False)
        self._thread.join(timeout=30)
        if self._tmp is not None:
            self._tmp.cleanup()
