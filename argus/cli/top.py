"""`argus top`: a live view of the ranks of running jobs, one row per rank.

`argus top PID...` reads through `AttachReader` (below): it composes collecting (one
Tracer over the given processes) with the incremental analysis the daemon runs
(`argus.analyze.incremental`) and the live state (`argus.present.live`); `argus top
--daemon` and `--recording` read through `argus.present.top`'s readers.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import click

from argus.errors import UsageError

SCAN_S = 1.0  # how often the tracer's new targets (ranks of a watched launcher) join a job
WINDOW_S = 30.0  # the recent window each diagnosis reads
HANG_AFTER_S = 10.0  # as `argus daemon`'s default
GRACE_S = 300.0  # a finished job's last view stays this long (as `argus daemon`'s default)
SETTLE_S = 2.0  # a new job's ranks traced together this long before its first build


@click.command(
    "top",
    epilog="""\b
Examples:
  argus top --daemon                       # every job the local `argus daemon` traces
  argus top --daemon http://127.0.0.1:9464 # a daemon on another loopback port
  argus top 4242 4243                      # attach to two ranks (or a launcher) itself
  argus top --recording ./argus-run1       # a recorded directory (post-mortem)
  # keys: s = next sort column, r = reverse, q = quit
""",
)
@click.argument("pids", nargs=-1, type=int)
@click.option(
    "--daemon",
    "daemon_url",
    is_flag=False,
    flag_value="http://127.0.0.1:9464",
    default=None,
    metavar="[URL]",
    help="Read a running daemon (default http://127.0.0.1:9464).",
)
@click.option(
    "--recording",
    "recordings",
    multiple=True,
    metavar="DIR",
    help="Show a recorded directory instead (repeatable).",
)
@click.option(
    "-i",
    "--interval",
    type=float,
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Refresh period.",
)
def command(pids, daemon_url, recordings, interval) -> int:
    """Live view: step time, compute vs wait, arrival lateness, last collective and seq,
    hottest CPU frame per rank; stragglers in red, hangs highlighted."""
    from argus.present.top import DaemonReader, RecordingReader, run_top

    if sum(bool(x) for x in (pids, daemon_url, recordings)) != 1:
        raise UsageError("give PIDs, --daemon [URL] or --recording DIR (exactly one).")
    if interval <= 0:
        raise UsageError("-i/--interval must be positive.")
    if daemon_url:
        reader = DaemonReader(daemon_url)
    elif recordings:
        reader = RecordingReader(recordings)
    else:
        reader = _starting(list(pids), interval)
    return run_top(reader, refresh_s=interval)


def _starting(pids: list[int], interval: float) -> AttachReader:
    """The AttachReader, with a "starting" screen at once while its probes compile and are
    placed (seconds on a real torch job): a spinner on a terminal, one stderr line else."""
    from rich.console import Console

    text = (f"argus top: starting: compiling the BPF programs and placing probes in "
            f"{len(pids)} process(es) ...")
    console = Console()
    if not console.is_terminal:
        click.echo(text, err=True)
        return AttachReader(pids, interval_s=max(1.0, interval))
    with console.status(text):
        return AttachReader(pids, interval_s=max(1.0, interval))


@dataclass
class _Job:
    key: str
    tgids: set[int] = field(default_factory=set)
    win: Any = None  # argus.analyze.incremental.JobWindow
    view: dict[str, Any] | None = None
    ended_mono: float | None = None


class AttachReader:
    """The reader of `argus top PID...`: one Tracer over the given processes (a launcher's
    ranks included, as they start), grouped into jobs (`job_key`, as the daemon groups
    them), each job analysed every `interval_s` on its recent window as the daemon does
    (`JobWindow`: new steps only, the diagnosis of the last WINDOW_S) in a background
    thread; nothing is written to disk. `read()` is the last `argus.live/1` state."""

    def __init__(self, pids: list[int], interval_s: float = 1.0, trace=None):
        from argus.collect.nvml import GpuSampler
        from argus.collect.session import check_kernel_features, yield_to_the_job
        from argus.collect.tracer import TraceOptions, Tracer
        from argus.present.live import node_state

        self.interval_s = interval_s
        self.host = socket.gethostname()
        self.jobs: dict[str, _Job] = {}
        self.errors: list[str] = []
        self.run_id = f"{self.host}-{os.getpid()}-{time.time_ns()}"
        self._state: dict[str, Any] = node_state(self.host, [], time.time_ns(), targets=0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        opts = trace or TraceOptions()
        # the live view shows no device times: the jobs' GPU agents stay dormant
        opts = dataclasses.replace(opts, channels=tuple(c for c in opts.channels
                                                        if c != "kernels"))
        check_kernel_features()  # errors (no such PID, no permission) raise here, in the caller
        self.tracer = Tracer(opts)
        self.tracer.start(self.tracer.plan(list(pids)))
        self.gpu = GpuSampler(opts.gpu_interval_s) if opts.gpu_interval_s else None
        if self.gpu is not None:
            self.gpu.start()  # its own thread; no NVML = no samples
        yield_to_the_job()
        self._thread = threading.Thread(target=self._run, name="argus-top-attach", daemon=True)
        self._thread.start()

    def read(self) -> dict[str, Any]:
        with self._lock:
            return self._state

    def close(self) -> None:
        """Stop at once: no last analysis (nobody reads it); the probes are released by a
        background holder process (`BpfSession.close(background=True)`)."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        last_scan, last_flush = 0.0, time.monotonic()
        tr = self.tracer
        try:
            while not self._stop.is_set():
                tr.poll(0.1)
                now = time.monotonic()
                if now - last_scan >= SCAN_S:
                    last_scan = now
                    self._join_new_targets()
                if now - last_flush >= self.interval_s:
                    last_flush = now
                    self._flush()
        finally:
            quit_ = self._stop.is_set()  # close(): no last drain; else an error: a clean finish
            try:
                if not quit_:
                    tr.finish("error")
            finally:
                if tr.session is not None:
                    # detaches every probe (perf-event fds); on quit a holder process pays
                    # the kernel's removal of each (~0.2 s per uprobe) after this one exits
                    tr.session.close(wait=not quit_, background=quit_)
            if self.gpu is not None:
                self.gpu.stop()
                self.gpu.close()

    def _error(self, msg: str) -> None:
        self.errors = (self.errors + [msg])[-20:]

    def _join_new_targets(self) -> None:
        from argus.analyze.incremental import JobWindow
        from argus.collect.identity import job_key

        known = {t for j in self.jobs.values() for t in j.tgids}
        for t in list(self.tracer.targets.values()):
            if t.traced and not t.exited and t.tgid not in known:
                key = job_key(t.tgid, t.env, self.tracer.opts.proc_root)
                job = self.jobs.get(key)
                if job is None:
                    job = self.jobs[key] = _Job(key, win=JobWindow())
                job.tgids.add(t.tgid)
                job.win.joined_ns = time.monotonic_ns()
                job.ended_mono = None

    def _flush(self) -> None:
        import polars as pl

        from argus import __version__
        from argus.present.live import node_state

        t0 = time.monotonic()
        tr = self.tracer
        try:
            events, inflight, stacks, host = tr.drain()
        except Exception as e:
            self._error(f"drain failed: {e}")
            return
        gpu_rows = self.gpu.take() if self.gpu is not None else []
        now_ns, now = time.monotonic_ns(), time.monotonic()
        views = []
        for key, job in list(self.jobs.items()):
            sel = pl.col("tgid").is_in(sorted(job.tgids))
            try:
                ev = events.filter(sel)
                job.win.add_rows(ev, stacks.filter(sel), host.filter(sel), now_ns,
                                 self.interval_s)
                seen = tr.targets_view
                alive = [t for t in job.tgids if t in seen and not seen[t].exited]
                if not alive and job.ended_mono is None:
                    job.ended_mono = now
                if job.ended_mono is not None and now - job.ended_mono > GRACE_S:
                    del self.jobs[key]
                    continue
                if job.ended_mono is not None and job.view is not None and not ev.height:
                    views.append(job.view)  # ended, nothing new: keep the last view
                    continue
                if job.win.settling(now_ns, max(SETTLE_S, 2 * self.interval_s)):
                    continue
                job.view = self._analyse(job, inflight.filter(sel), gpu_rows, now_ns)
                views.append(job.view)
            except Exception as e:
                self._error(f"job {key}: analysis failed: {type(e).__name__}: {e}")
                try:
                    job.win.cut(now_ns, WINDOW_S, tr.mono_to_wall_ns)
                except Exception:  # noqa: BLE001
                    pass
                if job.view is not None:
                    views.append(job.view)
        tr.forget_exited()
        gpu_state = None
        if self.gpu is not None:
            gpu_state = {"available": self.gpu.available, "reason": self.gpu.reason,
                         "devices": len(self.gpu.devices), "passes": self.gpu.passes}
        state = node_state(
            self.host, views, time.time_ns(),
            targets=sum(1 for t in tr.targets_view.values() if t.traced and not t.exited),
            drops=tr.drops(), errors=list(self.errors), version=__version__,
            flush_s=round(time.monotonic() - t0, 3), gpu=gpu_state)
        with self._lock:
            self._state = state

    def _analyse(self, job: _Job, inflight, gpu_rows: list[dict[str, Any]],
                 now_ns: int) -> dict[str, Any]:
        """One interval of one job, as the daemon's (argus.daemon.service) without the
        segment on disk."""
        import polars as pl

        from argus.analyze.diagnosis import diagnose
        from argus.analyze.incremental import window_manifest
        from argus.collect.channels import SWITCHES
        from argus.collect.nvml import assign_ranks
        from argus.present.live import job_view
        from argus.recording import schema
        from argus.recording.io import Recording

        tr, win = self.tracer, job.win
        ranks = []
        for tgid in sorted(job.tgids):
            t = tr.targets_view.get(tgid)
            if t is not None and t.traced:
                ranks.append({"rank": t.rank, "local_rank": t.local_rank,
                              "world_size": t.world_size, "tgid": tgid, "host": self.host,
                              "exe": t.exe, "env": t.env, "exited": t.exited,
                              "libraries": t.libraries, "cuda_device": tr.cuda_device(tgid)})
        gpu, gpu_new = None, schema.empty_gpu()
        if self.gpu is not None:
            gpu = ({"available": True, "library": self.gpu.library, "driver": self.gpu.driver,
                    "interval_s": self.gpu.interval_s, "devices": self.gpu.devices}
                   if self.gpu.available else
                   {"available": False, "reason": self.gpu.reason or "NVML not opened yet"})
            if gpu_rows:
                gpu_new = assign_ranks(gpu_rows, ranks, self.gpu.devices, self.gpu.processes)
                gpu_new = gpu_new.filter(pl.col("tgid").is_not_null())
        manifest = window_manifest(job.key, self.host, ranks, win.started_ns or now_ns, now_ns,
                                   tr.mono_to_wall_ns,
                                   {c: c in tr.opts.channels for c in SWITCHES},
                                   tr.opts.sample_hz, gpu, self.run_id, os.uname().release)
        ev = win.events
        if inflight.height:
            ev = pl.concat([ev, inflight], how="vertical_relaxed")
        rec = Recording(manifest=manifest, events=ev.sort("ts_ns"), stacks=win.stacks,
                        host_ctx=win.host)
        exited = {t for t in job.tgids if t not in tr.targets_view or tr.targets_view[t].exited}
        build = win.update(rec, gpu_new, now_ns, WINDOW_S, final=exited == job.tgids)
        win.cut(now_ns, WINDOW_S, tr.mono_to_wall_ns)
        diag = win.summaries(manifest, build)
        report = diagnose([diag], hang_after_s=HANG_AFTER_S)
        return job_view(job.key, rec, diag, report, {t: tr.probes_of(t) for t in job.tgids},
                        exited)
