"""The node-wide service: discover ranks, trace them through ONE Tracer, and every interval
write per-job summaries, diagnose the recent window and publish the live state.

    d = Daemon(DaemonOptions(output=Path("/var/lib/argus"), metrics_addr=("127.0.0.1", 9464)))
    d.run()          # until SIGTERM / SIGINT (clean: last drain, segments written, detach)

Loop (single thread; the HTTP server, `argus.present.http`, answers from its own threads
with the last state):
- every `poll` (0.1 s): the tracer drains its ring buffers and follows process lifecycle
  (exits detach there);
- every `SCAN_S` (1 s): /proc is scanned for new processes (`discovery.Scanner`); each new
  rank is added to the tracer and to its job (`identity.job_key`);
- every `interval_s`: `Tracer.drain()` -> rows split by job -> incremental analysis per
  job (`argus.analyze.incremental.JobWindow`): `build_summaries` runs on the rows since the
  start of the job's last `OVERLAP_STEPS` summarised steps only (the new steps plus a fixed
  overlap, whose (rank, start_ns) pairs anchor each rank's new ids to its own previous
  ones, `assign_ids`; the job's collectives keep one numbering from build to build,
  `JobWindow.seq_shifts`); the new steps join the job's summaries, kept for the last
  `window_s` (at most `MAX_DIAG_STEPS` steps); `analyze.diagnosis.diagnose` runs on those (the
  same detectors as `argus report`, on per-step rows: no raw event is re-read), `job_view`
  makes the live state. The new steps
  go to `OUTPUT/jobs/<job>/<wall ns>/` (manifest.json + summaries/, step ids continuous
  across a job's segments, so `argus report OUTPUT` merges them); the oldest segments are
  removed above `max_disk_mb`. So the work of an interval grows with the steps it brought,
  not with the window (docs/daemon.md has the measured /state staleness).
- NVML (when `TraceOptions.gpu_interval_s` is set and a library answers): one
  `GpuSampler` thread for the node; every interval its new samples are joined to the ranks
  of each job (`nvml.assign_ranks`) and kept with the job's summaries (gpu_throttle).
- GPU agent (channel `kernels`, jobs started with `argus gpu-env`): the Tracer enables each
  rank's agent and drains it; every interval its rows join the job's raw rows
  (`JobWindow.kernels`, cut with the events) and the Recording each build reads, so what
  the summaries make of device times reaches the segments (no raw kernels.parquet there:
  segments keep summaries only). The agents go dormant again at the tracer's finish.
A failure while handling one job (or one target) is logged and never stops the daemon.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
from prometheus_client import CollectorRegistry

from argus import __version__
from argus.analyze.diagnosis import diagnose
from argus.analyze.incremental import (
    JobWindow,
    newer_rows,
    segment_summaries,
    window_manifest,
)
from argus.collect import procfs
from argus.collect.channels import SWITCHES
from argus.collect.nvml import GpuSampler, assign_ranks
from argus.collect.session import check_kernel_features, yield_to_the_job
from argus.collect.tracer import TraceOptions, Tracer
from argus.daemon.config import DaemonConfig, load_config
from argus.daemon.discovery import Scanner
from argus.present.http import serve
from argus.present.live import job_view, node_state, pending_view
from argus.present.metrics import LiveCollector
from argus.recording import schema
from argus.recording.io import Recording
from argus.recording.summaries import write_summaries

log = logging.getLogger("argus.daemon")
SCAN_S = 1.0
JOBS_DIR = "jobs"
SETTLE_S = 2.0  # a new job's ranks traced together this long before its first build
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


@dataclass
class _Job:
    """One job's state between intervals: its analysis (`win`, argus.analyze.incremental)
    and what the daemon keeps of it (processes, live view, lifecycle, segments)."""

    key: str
    tgids: set[int] = field(default_factory=set)
    win: JobWindow = field(default_factory=JobWindow)
    view: dict[str, Any] | None = None
    ended_mono: float | None = None
    segments: int = 0
    last_seg: dict[str, Any] | None = None  # the last segment written: path, steps, gpu, host
    host_wm: int = -1  # the newest host-context row written (ts_ns)


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
        self.drain_delay_s = _env_ms(DELAY_ENV) / 1000.0

    # -- state shared with the HTTP threads ----------------------------------------------
    def state(self) -> dict[str, Any]:
        """The last interval's state, its ranks checked against /proc now (`_exits_now`): a
        rank gone since is `exited`, a job whose ranks all are is `ended`, and its series
        leave /metrics at the next scrape however long the interval's analysis takes (a
        nice-10 daemon beside a CPU hog per core: 12.8 s per flush; the series stayed 21 s)."""
        with self._lock:
            st = self._state
        return _exits_now(st, self.opts.trace.proc_root)

    def stop(self, reason: str = "requested") -> None:
        """End run() at its next poll (a last drain and analysis, then detach)."""
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
            self._http = serve(*self.opts.metrics_addr, self.registry, self.state)
        self.tracer = Tracer(self.opts.trace)
        self.tracer.start([])  # targets come from the scans
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
            self.flush()
        finally:
            try:
                self.tracer.finish(self._stop or "error")  # drains, detaches every probe
            finally:
                if self.tracer.session is not None:
                    self.tracer.session.close(wait=True)  # detaches every probe (perf-event fds)
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
        for f in self.scanner.scan():
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
            job.win.joined_ns = time.monotonic_ns()
            job.ended_mono = None
            self.job_of[f.tgid] = f.job
            added.append(f.tgid)
            log.info("argus daemon: tracing %d (%s, rank %s) in job %s", f.tgid, f.comm,
                     f.rank, f.job)
        return added

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
        kernels = tr.kernels.take()  # GPU agent rows (None: no agent or --no-kernels)
        now_ns = time.monotonic_ns()
        now = time.monotonic()
        views = []
        for key, job in list(self.jobs.items()):
            tg = sorted(job.tgids)
            try:
                sel = pl.col("tgid").is_in(tg)
                ev = events.filter(sel)
                job.win.add_rows(ev, stacks.filter(sel), host.filter(sel), now_ns,
                                 self.config.interval_s,
                                 kernels.filter(sel) if kernels is not None else None)
                alive = [t for t in tg if t in tr.targets_view and not tr.targets_view[t].exited]
                if not alive and job.ended_mono is None:
                    job.ended_mono = now
                if job.ended_mono is not None and now - job.ended_mono > self.config.job_grace_s:
                    self._forget(job)
                    continue
                if job.ended_mono is not None and job.view is not None and not ev.height:
                    views.append(_as_of(job.view, tg, tr.targets_view))  # ended: the last view
                    continue
                if job.win.settling(now_ns, max(SETTLE_S, 2 * self.config.interval_s)):
                    views.append(self._pending(job, tg))  # traced, shown before analysed
                    continue
                job.view = self._analyse(job, inflight.filter(sel), self._job_gpu(job, gpu_rows),
                                         now_ns)
                views.append(_as_of(job.view, tg, tr.targets_view))
            except Exception as e:
                self._error(f"job {key}: analysis failed: {type(e).__name__}: {e}")
                try:
                    # the raw rows stay bounded all the same
                    job.win.cut(now_ns, self.config.window_s, tr.mono_to_wall_ns)
                except Exception:  # noqa: BLE001
                    pass
                views.append(_as_of(job.view, tg, tr.targets_view) if job.view is not None
                             else self._pending(job, tg))
        tr.forget_exited()
        self.flush_s = round(time.monotonic() - t0, 3)
        gpu_state = None
        if self.gpu is not None:
            gpu_state = {"available": self.gpu.available, "reason": self.gpu.reason,
                         "devices": len(self.gpu.devices), "passes": self.gpu.passes}
        with self._lock:
            self._state = node_state(
                self.host, views, time.time_ns(),
                targets=sum(1 for t in tr.targets_view.values() if t.traced and not t.exited),
                uprobes=tr.uprobe_count, drops=tr.drops(), errors=list(self.errors),
                version=__version__, flush_s=self.flush_s, gpu=gpu_state)
        try:
            self._enforce_budget()
        except OSError as e:
            self._error(f"disk budget: {e}")

    def _pending(self, job: _Job, tgids: list[int]) -> dict[str, Any]:
        """The view of a job not analysed yet (`live.pending_view`): its traced ranks."""
        tr = self.tracer
        ranks = [{"rank": t.rank, "tgid": tgid, "probes": tr.probes_of(tgid)}
                 for tgid in tgids if (t := tr.targets_view.get(tgid)) is not None and t.traced]
        return _as_of(pending_view(job.key, self.host, ranks), tgids, tr.targets_view)

    def _job_gpu(self, job: _Job, rows: list[dict[str, Any]]) -> pl.DataFrame:
        """The new NVML samples of the devices this job's ranks use (rank/tgid filled)."""
        if not rows or self.gpu is None:
            return schema.empty_gpu()
        tr = self.tracer
        ranks = []
        for tgid in sorted(job.tgids):
            t = tr.targets_view.get(tgid)
            if t is not None and t.traced:
                ranks.append({"tgid": tgid, "rank": t.rank, "local_rank": t.local_rank,
                              "env": t.env, "cuda_device": tr.cuda_device(tgid)})
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
            t = tr.targets_view.get(tgid)
            if t is None or not t.traced:
                continue
            ranks.append({"rank": t.rank, "local_rank": t.local_rank, "world_size": t.world_size,
                          "tgid": tgid, "host": self.host, "exe": t.exe, "env": t.env,
                          "exited": t.exited, "libraries": t.libraries,
                          "cuda_device": tr.cuda_device(tgid)})
        gpu = None
        if self.gpu is not None:
            gpu = ({"available": True, "library": self.gpu.library, "driver": self.gpu.driver,
                    "interval_s": self.gpu.interval_s, "devices": self.gpu.devices}
                   if self.gpu.available else
                   {"available": False,
                    "reason": self.gpu.reason or "NVML not opened yet"})
        m = window_manifest(job.key, self.host, ranks, start_ns, end_ns, tr.mono_to_wall_ns,
                            {c: c in tr.opts.channels for c in SWITCHES},
                            tr.opts.sample_hz, gpu, self.run_id,
                            os.uname().release)
        kn = tr.kernels.manifest()["kernels"]  # this job's ranks' GPU agents
        m["kernels"] = dict(kn, agents={t: a for t, a in kn["agents"].items()
                                        if int(t) in job.tgids})
        return m

    def _analyse(self, job: _Job, inflight: pl.DataFrame, gpu_new: pl.DataFrame,
                 now_ns: int) -> dict[str, Any]:
        """One interval of one job: build (argus.analyze.incremental), segment, cut,
        diagnosis of the window, live view."""
        win, tr = job.win, self.tracer
        ev = win.events
        if inflight.height:
            ev = pl.concat([ev, inflight], how="vertical_relaxed")
        manifest = self._manifest(job, win.started_ns or now_ns, now_ns)
        rec = Recording(manifest=manifest, events=ev.sort("ts_ns"), stacks=win.stacks,
                        host_ctx=win.host, kernels=win.kernels)
        final = all(t not in tr.targets_view or tr.targets_view[t].exited for t in job.tgids)
        build = win.update(rec, gpu_new, now_ns, self.config.window_s, final)
        self._write_segment(job, build.new, build.summ, gpu_new, manifest)
        win.cut(now_ns, self.config.window_s, tr.mono_to_wall_ns)
        diag = win.summaries(manifest, build)
        t2 = time.perf_counter()
        report = diagnose([diag], hang_after_s=self.config.hang_after_s)
        t3 = time.perf_counter()
        exited = {t for t in job.tgids if t not in tr.targets_view or tr.targets_view[t].exited}
        view = job_view(job.key, rec, diag, report, {t: tr.probes_of(t) for t in job.tgids},
                        exited)
        view["segments"] = job.segments
        # what the interval cost: rows re-read, steps summarised and diagnosed, seconds
        view["analysis"] = {"raw_events": build.raw_events, "new_steps": build.new.height,
                            "window_steps": win.steps.height,
                            "summaries_s": build.summaries_s, "diagnosis_s": round(t3 - t2, 3)}
        return view

    def _write_segment(self, job: _Job, new: pl.DataFrame, summ, gpu_new: pl.DataFrame,
                       manifest: dict[str, Any]) -> None:
        """The new steps (continuous ids) -> OUTPUT/jobs/<job>/<wall ns>/. An interval
        without new steps (a hang, the end of a job) rewrites the job's last segment with
        the current tail, end time, NVML and host rows, so the hang detector reading the
        disk sees the job's latest state."""
        host_new, job.host_wm = newer_rows(getattr(summ, "host_ctx", None), job.host_wm)
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
        write_summaries(seg, segment_summaries(job.key, last["steps"], job.win.tail,
                                               job.win.stack_dict, summ.meta, manifest,
                                               last["gpu"], last["host"]))
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


def _as_of(view: dict[str, Any], tgids: list[int], targets: dict) -> dict[str, Any]:
    """A job's view with its ranks' `exited` flags as the tracer knows them now and `ended`
    (every rank exited): an ended job's series leave /metrics at once
    (`argus.present.metrics`), its view stays in /state for `job_grace_s`."""
    gone = {t for t in tgids if t not in targets or targets[t].exited}
    ranks = [dict(r, exited=bool(r.get("exited")) or r.get("tgid") in gone)
             for r in view.get("ranks") or []]
    return {**view, "ranks": ranks, "ended": bool(tgids) and len(gone) == len(tgids)}


def _exits_now(state: dict[str, Any], proc_root: str) -> dict[str, Any]:
    """`state` with the ranks of running jobs that are gone from /proc now marked `exited`,
    the jobs whose ranks all are `ended`, and `targets` (traced processes not exited) less
    those ranks (a stat of /proc/TGID per rank, per request)."""
    jobs, n_gone = [], 0
    for j in state.get("jobs") or []:
        ranks = j.get("ranks") or []
        gone = {r["tgid"] for r in ranks if not j.get("ended") and not r.get("exited")
                and r.get("tgid") is not None and not procfs.alive(r["tgid"], proc_root)}
        if gone:
            n_gone += len(gone)
            ranks = [dict(r, exited=True) if r.get("tgid") in gone else r for r in ranks]
            j = {**j, "ranks": ranks, "ended": all(r.get("exited") for r in ranks)}
        jobs.append(j)
    if not n_gone:
        return state
    return {**state, "jobs": jobs, "targets": max(0, int(state.get("targets") or 0) - n_gone)}


def _env_ms(name: str) -> float:
    """A non-negative number of milliseconds from the environment (0 when unset or bad)."""
    try:
        v = float(os.environ.get(name) or 0)
    except ValueError:
        return 0.0
    return v if v > 0 and v == v and v < 3_600_000 else 0.0
