"""The node-wide service: discover ranks, trace them through ONE Tracer, and every interval
write per-job summaries, diagnose the recent window and publish the live state.

    d = Daemon(DaemonOptions(output=Path("/var/lib/argus"), metrics_addr=("127.0.0.1", 9464)))
    d.run()          # until SIGTERM / SIGINT (clean: last drain, segments written, detach)

Loop (single thread; the HTTP server answers from its own threads with the last state):
- every `poll` (0.1 s): the tracer drains its ring buffers and follows process lifecycle
  (exits detach there);
- every `SCAN_S` (1 s): /proc is scanned for new processes (`discovery.Scanner`); each new
  rank is added to the tracer and to its job (`discovery.job_key`);
- every `interval_s`: `Tracer.drain()` -> rows split by job -> each job keeps the last
  `window_s` of rows; from that window: `build_summaries` (the per-rank-per-step summaries),
  `diagnose` (the argus.report/1 of the window), `job_view` (the live state). The steps not
  written before go to `OUTPUT/jobs/<job>/<wall ns>/` (manifest.json + summaries/, readable
  by `argus report`); the oldest segments are removed above `max_disk_mb`.
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from argus import __version__
from argus.analyze.report import diagnose
from argus.analyze.summary import build_summaries
from argus.collect.session import check_kernel_features
from argus.collect.tracer import TraceOptions, Tracer
from argus.daemon.config import DaemonConfig, load_config
from argus.daemon.discovery import Found, Scanner, job_key
from argus.present.live import job_view, node_state
from argus.present.metrics import LiveCollector
from argus.recording import schema
from argus.recording.io import Recording
from argus.recording.summaries import Summaries, write_summaries

log = logging.getLogger("argus.daemon")
SCAN_S = 1.0
JOBS_DIR = "jobs"


@dataclass
class DaemonOptions:
    output: Path
    metrics_addr: tuple[str, int] | None = ("127.0.0.1", 9464)
    config_path: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # CLI flags over the file
    trace: TraceOptions = field(default_factory=lambda: TraceOptions(gpu_interval_s=None))
    pids: list[int] | None = None  # fixed targets (argus top PID...): no node-wide scan


@dataclass
class _Job:
    key: str
    tgids: set[int] = field(default_factory=set)
    chunks: list[tuple[int, pl.DataFrame, pl.DataFrame, pl.DataFrame]] = field(default_factory=list)
    watermark: dict[int, int] = field(default_factory=dict)  # rank -> last step start written
    view: dict[str, Any] | None = None
    ended_mono: float | None = None
    segments: int = 0


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

    # -- state shared with the HTTP threads ----------------------------------------------
    def state(self) -> dict[str, Any]:
        with self._lock:
            return self._state

    def stop(self, reason: str = "requested") -> None:
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
                self.tracer.finish(self._stop or "error")  # detaches every probe
            finally:
                if self.tracer.session is not None:
                    self.tracer.session.close()
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
            job.ended_mono = None
            self.job_of[f.tgid] = f.job
            added.append(f.tgid)
            log.info("argus daemon: tracing %d (%s, rank %s) in job %s", f.tgid, f.comm,
                     f.rank, f.job)  # fmt: skip
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
        """Drain the tracer, then per job: window, summaries, diagnosis, segment, state."""
        tr = self.tracer
        try:
            events, inflight, stacks, host = tr.drain()
        except Exception as e:
            self._error(f"drain failed: {e}")
            return
        now_ns = time.monotonic_ns()
        now = time.monotonic()
        keep_ns = int(self.config.window_s * 1e9)
        views = []
        for key, job in list(self.jobs.items()):
            tg = sorted(job.tgids)
            try:
                sel = pl.col("tgid").is_in(tg)
                job.chunks.append((now_ns, events.filter(sel), stacks.filter(sel),
                                   host.filter(sel)))  # fmt: skip
                job.chunks = [c for c in job.chunks if c[0] >= now_ns - keep_ns]
                alive = [t for t in tg if t in tr.targets and not tr.targets[t].exited]
                if not alive and job.ended_mono is None:
                    job.ended_mono = now
                if job.ended_mono is not None and now - job.ended_mono > self.config.job_grace_s:
                    self._forget(job)
                    continue
                if job.ended_mono is not None and job.view is not None and not any(
                        c[1].height for c in job.chunks[-1:]):  # fmt: skip
                    views.append(job.view)  # ended, nothing new: keep the last view
                    continue
                job.view = self._analyse(job, inflight.filter(sel), now_ns)
                views.append(job.view)
            except Exception as e:
                self._error(f"job {key}: analysis failed: {type(e).__name__}: {e}")
                if job.view is not None:
                    views.append(job.view)
        tr.forget_exited()
        with self._lock:
            self._state = node_state(
                self.host, views, time.time_ns(),
                targets=sum(1 for t in tr.targets.values() if t.traced and not t.exited),
                uprobes=len(tr._uprobes), drops=tr.drops(), errors=list(self.errors),
                version=__version__)  # fmt: skip
        try:
            self._enforce_budget()
        except OSError as e:
            self._error(f"disk budget: {e}")

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
                          "exited": t.exited, "libraries": t.libraries})  # fmt: skip
        return {
            "format": schema.FORMAT, "argus_version": __version__, "host": self.host,
            "kernel": os.uname().release, "clock": {"mono_to_wall_ns": tr.mono_to_wall_ns},
            "started_ns": start_ns, "ended_ns": end_ns,
            "duration_s": round((end_ns - start_ns) / 1e9, 3), "end_reason": "daemon_window",
            "sample_hz": tr.opts.sample_hz if "cpu" in tr.opts.channels else 0,
            "channels": {c: c in tr.opts.channels for c in ("cuda", "nccl", "torch", "cpu", "host")},
            "ranks": ranks, "probes": [], "drops": {}, "job": job.key,
        }  # fmt: skip

    def _analyse(self, job: _Job, inflight: pl.DataFrame, now_ns: int) -> dict[str, Any]:
        def cat(i: int, empty) -> pl.DataFrame:
            frames = [c[i] for c in job.chunks if c[i].height]
            return pl.concat(frames, how="vertical_relaxed") if frames else empty()

        ev = cat(1, schema.empty_events)
        if inflight.height:
            ev = pl.concat([ev, inflight], how="vertical_relaxed")
        start_ns = job.chunks[0][0] - int(self.config.interval_s * 1e9) if job.chunks else now_ns
        manifest = self._manifest(job, start_ns, now_ns)
        rec = Recording(
            manifest=manifest,
            events=ev.sort("ts_ns"),
            stacks=cat(2, schema.empty_stacks),
            host_ctx=cat(3, schema.empty_host),
        )
        summ = build_summaries([rec])
        report = diagnose([rec], hang_after_s=self.config.hang_after_s)
        tr = self.tracer
        exited = {t for t in job.tgids if t not in tr.targets or tr.targets[t].exited}
        view = job_view(job.key, rec, summ, report, {t: tr.probes_of(t) for t in job.tgids},
                        exited)  # fmt: skip
        view["segments"] = job.segments
        self._write_segment(job, summ, manifest)
        view["segments"] = job.segments
        return view

    def _write_segment(self, job: _Job, summ: Summaries, manifest: dict[str, Any]) -> None:
        """The steps of the window not written before -> OUTPUT/jobs/<job>/<wall ns>/."""
        steps = summ.steps
        if not steps.height:
            return
        wm = job.watermark
        new = steps.filter(pl.col("start_ns") > pl.col("rank").replace_strict(
            wm, default=-1, return_dtype=pl.Int64))  # fmt: skip
        if not new.height:
            return
        for rank, last in new.group_by("rank").agg(pl.col("start_ns").max()).rows():
            wm[rank] = max(wm.get(rank, -1), int(last))
        wall = int(new["end_ns"].max())
        seg = self.opts.output / JOBS_DIR / job.key / str(wall)
        seg.mkdir(mode=0o700, parents=True, exist_ok=True)
        used = set(new.explode("stacks")["stacks"].struct.field("stack_id").drop_nulls()
                   .to_list()) if "stacks" in new.columns else set()  # fmt: skip
        sd = summ.stack_dict.filter(pl.col("stack_id").is_in(sorted(used))) if used else (
            summ.stack_dict.head(0))  # fmt: skip
        out = Summaries(meta=dict(summ.meta, job=job.key), steps=new, stack_dict=sd,
                        tail=summ.tail, manifest=manifest)  # fmt: skip
        write_summaries(seg, out)
        tmp = seg / ".manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
        os.chmod(tmp, 0o600)
        os.replace(tmp, seg / "manifest.json")
        job.segments += 1

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
                                                      "window_s": 30.0}))  # fmt: skip
        self.daemon.start()  # errors (no such PID, no permission) raise here, in the caller
        self._thread = threading.Thread(target=self.daemon.run, kwargs={"install_signals": False},
                                        name="argus-top-attach", daemon=True)  # fmt: skip
        self._thread.start()

    def read(self) -> dict[str, Any]:
        return self.daemon.state()

    def close(self) -> None:
        self.daemon.stop("requested")
        self._thread.join(timeout=30)
        if self._tmp is not None:
            self._tmp.cleanup()
