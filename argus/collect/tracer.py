"""The live tracing session: targets -> one BPF program set -> a recording.

    tracer = Tracer(TraceOptions(...)); tracer.start(tracer.plan([tgid, ...]))
    while ...: tracer.poll(0.1)
    recording = tracer.finish(end_reason)     # manifest dict, events frame, stacks frame

`Tracer` keeps the session loop only (plan, start, poll, drain, finish) and composes the
rest: the channels (argus.collect.channels: proc, calls, cpu, host, kernels; each its BPF files,
attach, drain and manifest part), the targets and their rules (argus.collect.targets), the
shared uprobes (argus.collect.uprobes), symbolisation (argus.collect.symbolize) and the
pre-flight checks (argus.collect.features, the same as `argus doctor`).

Discovery: each target PID is a rank (it maps a library a probe spec names) or a launcher
(its descendants are watched; forks are followed in kernel so ranks that start later are
never missed). Watched processes are checked for newly mapped libraries (ranks that load
CUDA/NCCL late, torch's dlopen) every `rescan_s`: the size of their executable mappings
(/proc/PID/status, the same cost for any number of libraries), their /proc/PID/maps only
when it moved (or every MAPS_BACKSTOP_S); new libraries are probed by the calls channel.
"""

from __future__ import annotations

import ctypes as ct
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import polars as pl

from argus import __version__, resources
from argus.collect import abi, c10d, features, identity, procfs, targets
from argus.collect.bcc_adapter import BpfSession
from argus.collect.channels import (
    SWITCHES,
    TRACER_CHANNELS,
    CallsChannel,
    Channel,
    CpuChannel,
    HostChannel,
    KernelsChannel,
    ProcChannel,
    check_switches,
)
from argus.collect.decode import DecodeContext
from argus.collect.symbolize import Symbolizer
from argus.collect.targets import Target
from argus.collect.uprobes import SharedUprobes
from argus.errors import TargetNotFound
from argus.recording import schema

BPF_DIR = resources.bpf_dir()
HOT_RESCAN_S = 3.0
WARM_TIMEOUT_S = 5.0  # the symbol warm-up never holds the tracing line back longer
MAPS_BACKSTOP_S = 10.0  # maps re-read even when the executable mappings' size did not move
# The manifest's keys in the order they are written (the channels' parts among them).
MANIFEST_KEYS = ("format", "argus_version", "host", "kernel", "clock", "started_ns",
                 "traced_ns", "ended_ns", "duration_s", "end_reason", "sample_hz", "channels",
                 "host_context", "kernels", "ranks", "launchers", "probes", "drops",
                 "python_stacks", "call_counts", "counts")


@dataclass
class TraceOptions:
    # the switches of argus.collect.channels.SWITCHES: cuda, nccl, torch, cpu, host, kernels
    channels: tuple[str, ...] = field(default_factory=lambda: tuple(SWITCHES))
    sample_hz: int = 49
    stack_interval_s: float = 1.0
    rescan_s: float = 0.5
    ringbuf_mb: int = 8
    proc_root: str = "/proc"
    gpu_interval_s: float | None = 1.0  # NVML sampling period (argus.collect.nvml); None = off


class Tracer:
    """One tracing session over a set of target processes."""

    def __init__(self, opts: TraceOptions | None = None):
        self.opts = opts or TraceOptions()
        check_switches(self.opts.channels, need_primary=False)
        self.targets: dict[int, Target] = {}
        self.stack_rows: list[dict] = []  # on-CPU (cpu) and off-CPU (host) stack rows
        self.session: BpfSession | None = None
        self.uprobes: SharedUprobes | None = None
        self.symbolizer = Symbolizer(self._maps_of, self.opts.proc_root)
        self.proc = ProcChannel(self)
        self.calls = CallsChannel(self)
        self.cpu = CpuChannel(self)
        self.host_context = HostChannel(self)
        self.kernels = KernelsChannel(self)
        self.channels: dict[str, Channel] = {self.proc.name: self.proc, self.calls.name: self.calls,
                                             self.cpu.name: self.cpu,
                                             self.host_context.name: self.host_context,
                                             self.kernels.name: self.kernels}
        assert tuple(self.channels) == tuple(c.name for c in TRACER_CHANNELS)
        self.active = [ch for ch in self.channels.values() if ch.on]
        self.ctx = DecodeContext(self.calls.probe_refs, kernel_name=self.symbolizer.kernel_name)
        self.ctx.on_comm_init = self._on_comm_init
        self.ctx.pg_group = lambda tgid, this: c10d.read_group(tgid, this, self.opts.proc_root)
        self._last_rescan = 0.0
        # tgid -> monotonic deadline: processes that just forked or exec'd are rescanned on
        # every poll (their libraries appear within milliseconds of exec) until then.
        self._hot: dict[int, float] = {}
        self._exited_before: set[int] = set()
        self._mono_to_wall = 0
        self.started_ns = 0
        self.traced_ns: int | None = None  # the targets' probes placed (argus.collect.session)
        self.host = socket.gethostname()

    # -- what others read ----------------------------------------------------------------
    @property
    def specs(self):
        return self.calls.specs

    @property
    def probe_status(self) -> dict[tuple, dict]:
        return self.calls.probe_status

    @property
    def probe_refs(self):
        return self.calls.probe_refs

    @property
    def targets_view(self) -> MappingProxyType:
        """The watched processes, tgid -> Target, read-only (ranks: `t.traced`)."""
        return MappingProxyType(self.targets)

    @property
    def uprobe_count(self) -> int:
        """Uprobes attached now (each shared by every traced process mapping its file)."""
        return len(self.uprobes) if self.uprobes is not None else 0

    def cuda_device(self, tgid: int) -> int | None:
        """The CUDA ordinal a traced process last passed to cudaSetDevice (None: unseen)."""
        return self.ctx.devices.get(tgid)

    def probes_of(self, tgid: int) -> int:
        """Probe-table entries (symbols probed) in one traced process."""
        t = self.targets.get(tgid)
        return t.probe_count() if t else 0

    @property
    def records_seen(self) -> int:
        """Call records read from the ring buffer since start (the live count)."""
        return self.calls.ring_total + len(self.calls.blobs)

    def attached_count(self) -> int:
        """(process, probe) pairs attached so far."""
        return self.calls.attached_count()

    @property
    def mono_to_wall_ns(self) -> int:
        return self._mono_to_wall

    def all_exited(self) -> bool:
        return bool(self.targets) and all(t.exited for t in self.targets.values())

    def _maps_of(self, tgid: int) -> list[procfs.Mapping]:
        t = self.targets.get(tgid)
        return t.maps if t else []

    # -- start ---------------------------------------------------------------------------
    def plan(self, tgids: list[int]) -> list[tuple[int, bool]]:
        """Check the targets and privileges; [(tgid, is_launcher)]. Loads nothing."""
        targets.check_exist(tgids, self.opts.proc_root)
        features.require_privileges()
        return targets.plan_targets(tgids, self.opts.proc_root)

    def start(self, plan: list[tuple[int, bool]]) -> None:
        """Load the BPF program set and attach to every planned target."""
        warm, markers = None, self.calls.on
        stacks = any(ch.symbolizes for ch in self.active)
        if markers or stacks:
            warm = threading.Thread(target=self._warm_symbols, args=(plan, markers, stacks),
                                    daemon=True, name="argus-warm-symbols")
            warm.start()
        cflags = [f"-I{BPF_DIR}", "-DARGUS_BPF"]
        sources = ["argus.bpf.c"]  # the maps every family shares
        for ch in self.active:
            cflags += ch.cflags()
            sources += ch.sources
        self.session = BpfSession([str(BPF_DIR / f) for f in sources], cflags)
        self.uprobes = SharedUprobes(self.session)
        for ch in self.active:
            ch.attach(self.session)
        self.started_ns = time.monotonic_ns()
        self._mono_to_wall = time.time_ns() - time.monotonic_ns()
        for tgid, launcher in plan:
            self._watch(tgid, launcher=launcher)
            if launcher:
                for child in procfs.descendants(tgid, self.opts.proc_root):
                    if not targets.is_argus(child):  # never trace argus (attached via a shell)
                        self._watch(child, launcher=True)
        # Exits before the targets were in the watched map fired no tracepoint: this one
        # check closes that window (a zombie counts as gone: its /proc entry stays).
        for t in list(self.targets.values()):
            if not procfs.alive(t.tgid, self.opts.proc_root):
                self._mark_exited(t)
        if warm is not None:
            warm.join(WARM_TIMEOUT_S)
        for ch in self.active:
            ch.start()
        self._last_rescan = time.monotonic()

    def _warm_symbols(self, plan: list[tuple[int, bool]], markers: bool, stacks: bool) -> None:
        """While the programs compile: what the first scan of each target asks of its
        libraries (markers: the static-runtime markers of libtorch, 0.05-0.2 s on the first
        rank), then the symbolizer's tables (stacks: argus.collect.symbolize.Symbolizer.warm)."""
        tgids = [t for t, _launcher in plan]
        for t, launcher in plan:
            if launcher:
                tgids += procfs.descendants(t, self.opts.proc_root)
        if markers:
            seen: set[str] = set()
            for tgid in tgids:
                try:
                    libs = procfs.mapped_libraries(tgid, self.opts.proc_root)
                except (TargetNotFound, OSError):
                    continue
                for lib in libs:
                    if lib.path not in seen:
                        seen.add(lib.path)
                        self.calls.specs_for(lib)
        if stacks:
            self.symbolizer.warm(tgids)

    # -- targets ---------------------------------------------------------------------------
    def _watch(self, tgid: int, launcher: bool) -> None:
        if tgid in self.targets:
            return
        t = Target(tgid=tgid, launcher=launcher)
        self.targets[tgid] = t
        self._set_watched(tgid, abi.W_DESCEND if launcher else 0)
        self._scan(t)

    def _set_watched(self, tgid: int, flags: int) -> None:
        self.session.table("watched")[ct.c_uint32(tgid)] = ct.c_uint32(flags)

    def _scan(self, t: Target, code: tuple[int, int] | None = None) -> None:
        """Attach to libraries t maps that are not probed yet; mark it traced if any.
        `code`: procfs.mapped_code read just before, by a caller that checked it."""
        if t.exited:
            return
        if code is None:  # read before the maps: a load between the two is seen next check
            code = procfs.mapped_code(t.tgid, self.opts.proc_root)
        try:
            text = (Path(self.opts.proc_root) / str(t.tgid) / "maps").read_text()
        except OSError:
            return
        t.code = code
        if text == t.maps_text and (t.traced or t.worker_of is not None or t.rank_launcher):
            # nothing mapped or unmapped since the last scan: nothing to probe or forget
            t.scanned_ns = time.monotonic_ns()
            self._on_traced(t)
            return
        try:
            libs = procfs.mapped_libraries(t.tgid, self.opts.proc_root, maps_text=text)
        except (TargetNotFound, OSError):
            return
        t.maps_text = text
        t.maps = procfs.parse_maps(text)
        t.scanned_ns = time.monotonic_ns()
        new = [lib for lib in libs if lib.path not in t.attached]
        if not new and t.traced:
            self._on_traced(t)
            return
        if t.launcher and not t.traced and procfs.is_training_process(libs):
            t.rank_launcher = t.rank_launcher or targets.is_rank_launcher(t.tgid,
                                                                          self.opts.proc_root)
        if t.rank_launcher:
            t.libraries = [lib.to_dict() for lib in libs]
            return  # its ranks are watched through it; it is not probed itself
        if t.launcher and not t.traced and t.worker_of is None:
            t.worker_of = identity.worker_of(t.tgid, self.opts.proc_root)
        if t.worker_of is not None:
            return  # a worker of a rank (forked with its RANK): not a second rank
        for lib in new:
            specs = self.calls.specs_for(lib)
            t.attached[lib.path] = targets.Attached(lib.path, lib.host_path)
            if specs:
                self.calls.attach_library(t, lib, specs)
        probed = [lib for lib in libs if t.attached.get(lib.path) and t.attached[lib.path].uprobes]
        if (probed or procfs.is_training_process(libs)) and not t.traced:
            t.traced = True
            t.identify(self.opts.proc_root)
            self.ctx.rank_of[t.tgid] = t.rank
            self._set_watched(t.tgid, abi.W_TRACE | (abi.W_DESCEND if t.launcher else 0))
        t.libraries = [lib.to_dict() for lib in libs]
        self._on_traced(t)

    def _on_traced(self, t: Target) -> None:
        if t.traced and not t.exited:
            for ch in self.active:
                ch.on_traced(t)

    def _detach_target(self, t: Target) -> None:
        for ch in self.active:
            ch.on_gone(t)

    def _on_comm_init(self, tgid: int, cid: str, rank: int | None, nranks: int | None) -> None:
        t = self.targets.get(tgid)
        if t is not None and t.comm_init(rank, nranks):
            self.ctx.rank_of[tgid] = rank

    def _mark_exited(self, t: Target) -> None:
        """The one way a target ends: its shared uprobes are released and its probe-table
        entries removed, however its exit was noticed (tracepoint or a rescan)."""
        if not t.exited:
            t.exited = True
            self._detach_target(t)

    # -- the loop --------------------------------------------------------------------------
    def _handle_proc_events(self, start: int) -> None:
        for ev in self.proc.events[start:]:
            if ev["what"] == abi.PROC_FORK:
                child = ev["child"]
                if child not in self.targets and targets.new_process(child, self.opts.proc_root):
                    # A new process (not a thread) of a watched parent.
                    self._watch(child, launcher=True)
                    self._hot[child] = time.monotonic() + HOT_RESCAN_S
            elif ev["what"] == abi.PROC_EXEC:
                t = self.targets.get(ev["tgid"])
                if t is not None and t.scanned_ns < ev["ts_ns"]:
                    # A new image: old addresses are gone. (A scan after the exec already
                    # saw the new image: nothing to redo.)
                    self._detach_target(t)
                    t.new_image()
                    self._scan(t)
                    self._hot[t.tgid] = time.monotonic() + HOT_RESCAN_S
            elif ev["what"] == abi.PROC_EXIT:
                t = self.targets.get(ev["tgid"])
                if t is not None:
                    self._mark_exited(t)

    def poll(self, timeout_s: float = 0.1) -> None:
        """Wait up to `timeout_s` (10 ms while a process just started) for ring-buffer
        records, drain them, follow process lifecycle, rescan, let the channels drain."""
        n = len(self.proc.events)
        # Call records wake this up only for a communicator's first call (calls.bpf.c's
        # argus_wakeup); the rest are read when the timeout ends. A wakeup per record (a
        # return from epoll and a pass of this loop each) took argus from 1.15 to 1.37 % of a
        # core per rank on a 4-rank torch job.
        self.session.poll(int((0.01 if self._hot else timeout_s) * 1000))
        self._handle_proc_events(n)
        now = time.monotonic()
        for tgid, until in list(self._hot.items()):
            t = self.targets.get(tgid)
            if t is None or t.exited or now > until:
                del self._hot[tgid]
            else:
                self._scan(t)
        if now - self._last_rescan >= self.opts.rescan_s:
            self._last_rescan = now
            self._rescan()
        for ch in self.active:
            ch.poll(now)

    def _rescan(self) -> None:
        backstop = time.monotonic_ns() - int(MAPS_BACKSTOP_S * 1e9)
        for t in list(self.targets.values()):
            if not t.exited:
                code = procfs.mapped_code(t.tgid, self.opts.proc_root)
                if code is None:  # gone, or a zombie
                    self._mark_exited(t)
                elif code != t.code or t.scanned_ns < backstop:
                    self._scan(t, code)
                else:  # no library loaded or unloaded: its maps are as last read
                    self._on_traced(t)

    # -- node-wide service (argus daemon): targets added while running, incremental drain ---
    def add_target(self, tgid: int) -> bool:
        """Trace one more process while running (a rank found by `argus daemon`'s scan).
        False when it is argus itself, already watched, or gone."""
        if tgid in self.targets or targets.is_argus(tgid):
            return False
        try:
            procfs.process_state(tgid, self.opts.proc_root)
        except TargetNotFound:
            return False
        self._watch(tgid, launcher=False)
        self._hot[tgid] = time.monotonic() + HOT_RESCAN_S
        return True

    def drops(self) -> dict[str, int]:
        table = self.session.table("drops")
        return {name: int(table[ct.c_int(i)].value) for i, name in enumerate(abi.DROP_NAMES)}

    def _consume(self) -> None:
        """Read every ring buffer now; follow the lifecycle events; ranks as known now."""
        n = len(self.proc.events)
        self.session.consume()
        self._handle_proc_events(n)

    def drain(self) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        """What was recorded since the last drain, without stopping: (events that are final,
        calls in flight now, new stack rows, new host rows). In flight: the kernel's
        in-flight calls and the entry-only work calls whose completion has not been seen
        yet; those are paired with their completion by a later drain (or `finish`), so a
        collective that spans a drain is one row with its duration. Drained rows leave
        memory; `finish` then returns only what came after."""
        self._consume()
        for t in self.targets.values():
            if t.rank is not None:
                self.ctx.rank_of[t.tgid] = t.rank
        blobs = self.calls.take()
        procs = self.proc.take()
        stack_rows, self.stack_rows = self.stack_rows, []
        host = self.host_context.take()
        events, still_open = self.calls.paired([self.calls.decode(blobs),
                                                self.proc.rows(procs)])
        self.calls.keep_open(still_open)
        inflight = self.calls.inflight_rows()
        if still_open.height:
            inflight = pl.concat([inflight, still_open.with_columns(in_flight=pl.lit(True))],
                                 how="vertical_relaxed")
        return events, inflight, stacks_frame(stack_rows), host

    def forget_exited(self) -> list[int]:
        """Drop the state of processes that had already exited at the previous call (their
        last stacks are symbolized by now): a long-running tracer does not grow with every
        job that came and went. Returns the tgids forgotten."""
        gone = [tgid for tgid in self._exited_before if tgid in self.targets
                and self.targets[tgid].exited]
        for tgid in gone:
            del self.targets[tgid]
            self._hot.pop(tgid, None)
            self.ctx.rank_of.pop(tgid, None)
            self.ctx.devices.pop(tgid, None)
        if gone:
            drop = set(gone)
            self.symbolizer.forget(drop)
            for ch in self.channels.values():
                ch.forget(drop)
        self._exited_before = {t.tgid for t in self.targets.values() if t.exited}
        return gone

    # -- finish ----------------------------------------------------------------------------
    def host_frame(self) -> pl.DataFrame:
        """The host rows not drained yet (ranks as known now)."""
        return self.host_context.frame()

    def finish(self, end_reason: str, close: bool = True
               ) -> tuple[dict, pl.DataFrame, pl.DataFrame]:
        """Stop, drain everything still in the kernel; return the recording parts (what came
        after the last `drain`). `close`: detach every probe and free the BPF object here
        (about 0.23 s per uprobe); else the probes are made inert (the filter maps emptied)
        and the caller closes the session (`BpfSession.close(background=True)`)."""
        s = self.session
        ended_ns = time.monotonic_ns()
        self._consume()
        for ch in self.active:
            ch.finish()
        # Re-resolve ranks now known from communicator init for rows decoded below.
        for t in self.targets.values():
            self.ctx.rank_of[t.tgid] = t.rank
        events, still_open = self.calls.paired([self.calls.decode(self.calls.blobs),
                                                self.calls.inflight_rows(),
                                                self.proc.rows(self.proc.events)])
        if still_open.height:  # a work call that never completed: blocked at the end
            events = pl.concat([events, still_open.with_columns(in_flight=pl.lit(True))],
                               how="vertical_relaxed").sort("ts_ns")
        stacks = stacks_frame(self.stack_rows)
        manifest = self.manifest(end_reason, ended_ns, events, stacks)
        if close:
            for t in self.targets.values():
                if not t.exited:
                    self._detach_target(t)
            s.close()
        else:
            for name in ("probes", "watched") if self.calls.on else ("watched",):
                s.table(name).clear()
        return manifest, events, stacks

    def manifest(self, end_reason: str, ended_ns: int, events: pl.DataFrame,
                 stacks: pl.DataFrame) -> dict:
        """The recording's manifest as of now: targets, probes, drops and exact call counts
        so far; `counts` of the given rows (a part's own; `merge_parts` sums a session's)."""
        traced = sorted((t for t in self.targets.values() if t.traced), key=targets.rank_order)
        m = {
            "format": schema.FORMAT,
            "argus_version": __version__,
            "host": self.host,
            "kernel": os.uname().release,
            "clock": {"mono_to_wall_ns": self._mono_to_wall},
            "started_ns": self.started_ns,
            "traced_ns": self.traced_ns,
            "ended_ns": ended_ns,
            "duration_s": round((ended_ns - self.started_ns) / 1e9, 3),
            "end_reason": end_reason,
            "channels": {c: c in self.opts.channels for c in SWITCHES},
            "ranks": [t.describe(self.host, self.cuda_device(t.tgid)) for t in traced],
            "launchers": [t.tgid for t in self.targets.values() if t.launcher and not t.traced],
            "drops": self.drops(),
            "counts": {
                "events": {
                    str(k): int(v)
                    for k, v in events.group_by("channel").len().iter_rows()
                }
                if events.height
                else {},
                "stack_samples": int(stacks["count"].sum()) if stacks.height else 0,
                "ring_records": self.records_seen,  # since start
            },
        }
        for ch in self.channels.values():
            m.update(ch.manifest())
        return {k: m[k] for k in MANIFEST_KEYS if k in m} | {
            k: v for k, v in m.items() if k not in MANIFEST_KEYS}


def stacks_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=schema.STACKS_SCHEMA) if rows else schema.empty_stacks()
