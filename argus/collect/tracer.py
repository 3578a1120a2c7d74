"""The live tracing session: targets -> one BPF program set -> a recording.

    tracer = Tracer(TraceOptions(...)); tracer.start(tracer.plan([tgid, ...]))
    while ...: tracer.poll(0.1)
    recording = tracer.finish(end_reason)     # manifest dict, events frame, stacks frame

Discovery: each target PID is a rank (it maps a library a probe spec names) or a launcher
(its descendants are watched; forks are followed in kernel so ranks that start later are
never missed). Watched processes are checked for newly mapped libraries (ranks that load
CUDA/NCCL late, torch's dlopen) every `rescan_s`: the size of their executable mappings
(/proc/PID/status, the same cost for any number of libraries), their /proc/PID/maps only
when it moved (or every MAPS_BACKSTOP_S). Per traced process and probed library,
each spec symbol is resolved from the file the process actually maps (through its
/proc/PID/root) and placed (endbr64 skipped); its (tgid, address) goes into the in-kernel
probe table, which is the filter; the uprobe itself is attached once per library file and
shared by every rank mapping it (see `_acquire_uprobe`).
"""

from __future__ import annotations

import ctypes as ct
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from argus import __version__, resources
from argus.collect import abi, c10d, procfs
from argus.collect.bcc_adapter import BpfSession, warm_kernel_symbols
from argus.collect.decode import (
    DecodeContext,
    ProbeRef,
    decode_call,
    decode_records,
    pair_completions,
    rows_to_frame,
)
from argus.collect.pyframes import PythonStacks
from argus.collect.specs import CHANNELS, LibrarySpec, load_specs
from argus.collect.symbols import demangle, elf_file, runtime_address, short_name
from argus.errors import NotATrainingProcess, PermissionDenied, TargetNotFound
from argus.recording import schema

BPF_DIR = resources.bpf_dir()
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
HOT_RESCAN_S = 3.0
WARM_TIMEOUT_S = 5.0  # the symbol warm-up never holds the tracing line back longer
MAPS_BACKSTOP_S = 10.0  # maps re-read even when the executable mappings' size did not move
CALL_ARGS_OFF = abi.Call.args.offset  # where struct argus_call's args begin (32)


@dataclass
class TraceOptions:
    channels: tuple[str, ...] = ("cuda", "nccl", "torch", "cpu", "host")
    sample_hz: int = 49
    stack_interval_s: float = 1.0
    rescan_s: float = 0.5
    ringbuf_mb: int = 8
    proc_root: str = "/proc"
    gpu_interval_s: float | None = 1.0  # NVML sampling period (argus.collect.nvml); None = off


@dataclass
class _Attached:
    """Probes placed in one process for one library file."""

    path: str
    host_path: str
    uprobes: list[tuple] = field(default_factory=list)  # keys of shared uprobes held
    keys: list[abi.ProbeKey] = field(default_factory=list)  # probe-table entries


@dataclass
class _Target:
    tgid: int
    launcher: bool = False
    traced: bool = False
    exited: bool = False
    rank: int | None = None
    local_rank: int | None = None
    world_size: int | None = None
    env: dict = field(default_factory=dict)
    exe: str | None = None
    libraries: list[dict] = field(default_factory=list)
    attached: dict[str, _Attached] = field(default_factory=dict)  # library path -> probes
    maps: list[procfs.Mapping] = field(default_factory=list)
    maps_text: str | None = None  # /proc/TGID/maps at the last full scan
    scanned_ns: int = 0  # monotonic time of the last scan that read the maps
    code: tuple[int, int] | None = None  # procfs.mapped_code as of that scan
    rank_launcher: bool = False  # maps PyTorch but only starts ranks (torchrun): never probed
    worker_of: int | None = None  # a rank's worker (DataLoader, same RANK): never probed


# torchrun imports torch, so it maps libtorch_cpu like its ranks: recognised by name.
LAUNCHER_NAMES = ("torchrun",)
LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch")


def _is_rank_launcher(tgid: int, proc_root: str) -> bool:
    """A process that starts ranks without being one: no rank in its own environment, and
    its command line is torchrun (or python -m torch.distributed.run/launch), or one of its
    children has a rank in its environment (the launcher set RANK for it)."""
    try:
        if procfs.rank_identity(tgid, proc_root)["rank"] is not None:
            return False
        argv = procfs.cmdline(tgid, proc_root)
        if any(os.path.basename(a) in LAUNCHER_NAMES for a in argv[:2]):
            return True
        for i, a in enumerate(argv[:-1]):
            if a == "-m" and argv[i + 1] in LAUNCHER_MODULES:
                return True
        return any(
            procfs.rank_identity(c, proc_root)["rank"] is not None
            for c in procfs.children(tgid, proc_root)
        )
    except (TargetNotFound, OSError):
        return False


def _check_privileges() -> None:
    if os.geteuid() == 0:
        return
    try:
        text = Path("/proc/self/status").read_text()
        cap_eff = int(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("CapEff")), 16)
    except (OSError, StopIteration, ValueError):
        cap_eff = 0
    if not ((cap_eff >> 39) & 1 and (cap_eff >> 38) & 1) and not (cap_eff >> 21) & 1:
        raise PermissionDenied("tracing needs root or the CAP_BPF and CAP_PERFMON capabilities")


def _fork_child_offset() -> int | None:
    for base in TRACEFS:
        fmt = Path(base) / "events/sched/sched_process_fork/format"
        try:
            for line in fmt.read_text().splitlines():
                if "child_pid;" in line:
                    return int(line.split("offset:")[1].split(";")[0])
        except (OSError, IndexError, ValueError):
            continue
    return None


def _tp_fields(event: str) -> dict[str, tuple[int, int]] | None:
    """{field: (offset, size)} of tracepoint `event` ("sched/sched_switch") from tracefs's
    format file of the running kernel; None when the tracepoint (or tracefs) is absent."""
    for base in TRACEFS:
        fmt = Path(base) / "events" / event / "format"
        try:
            text = fmt.read_text()
        except OSError:
            continue
        out = {}
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("field:") or "offset:" not in line:
                continue
            try:
                decl = line.split("field:", 1)[1].split(";", 1)[0]
                name = decl.split()[-1].split("[", 1)[0]
                off = int(line.split("offset:")[1].split(";")[0])
                size = int(line.split("size:")[1].split(";")[0])
            except (IndexError, ValueError):
                continue
            out[name] = (off, size)
        return out
    return None


# Host channel (host.bpf.c): tracepoint -> (program, {-D name: (field, which of offset/size)}).
HOST_TRACEPOINTS = {
    "sched:sched_switch": ("argus_host_switch", {
        "ARGUS_TP_SS_PREV_STATE_OFF": ("prev_state", 0), "ARGUS_TP_SS_PREV_STATE_SIZE": ("prev_state", 1),
        "ARGUS_TP_SS_NEXT_COMM_OFF": ("next_comm", 0), "ARGUS_TP_SS_NEXT_PID_OFF": ("next_pid", 0)}),
    "sched:sched_wakeup": ("argus_host_wakeup", {
        "ARGUS_TP_WK_PID_OFF": ("pid", 0), "ARGUS_TP_WK_CPU_OFF": ("target_cpu", 0)}),
    "tcp:tcp_retransmit_skb": ("argus_host_tcp_retrans", {
        "ARGUS_TP_TCP_DPORT_OFF": ("dport", 0), "ARGUS_TP_TCP_FAMILY_OFF": ("family", 0),
        "ARGUS_TP_TCP_DADDR_OFF": ("daddr", 0)}),
    "oom:mark_victim": ("argus_host_oom", {
        "ARGUS_TP_OOM_PID_OFF": ("pid", 0), "ARGUS_TP_OOM_COMM_OFF": ("comm", 0)}),
    "block:block_rq_issue": ("argus_host_blk_issue", {
        "ARGUS_TP_BLK_DEV_OFF": ("dev", 0), "ARGUS_TP_BLK_SECTOR_OFF": ("sector", 0)}),
    "block:block_rq_complete": ("argus_host_blk_complete", {
        "ARGUS_TP_BLKC_DEV_OFF": ("dev", 0), "ARGUS_TP_BLKC_SECTOR_OFF": ("sector", 0)}),
}


def host_tracepoint_plan() -> tuple[list[str], dict[str, str]]:
    """(-D cflags with the field offsets of the running kernel, {tracepoint: "ok" | why
    it is skipped}). A tracepoint this kernel lacks, or one missing a field, is skipped."""
    cflags: list[str] = []
    status: dict[str, str] = {}
    for tp, (_fn, defines) in HOST_TRACEPOINTS.items():
        fields = _tp_fields(tp.replace(":", "/"))
        if fields is None:
            status[tp] = "skipped: not in this kernel (or tracefs is not mounted)"
            continue
        missing = sorted({f for f, _ in defines.values() if f not in fields})
        if missing:
            status[tp] = f"skipped: the format file has no field {', '.join(missing)}"
            continue
        cflags += [f"-D{d}={fields[f][i]}" for d, (f, i) in defines.items()]
        status[tp] = "ok"
    if status.get("block:block_rq_issue") != "ok" or status.get("block:block_rq_complete") != "ok":
        for tp in ("block:block_rq_issue", "block:block_rq_complete"):
            if status.get(tp) == "ok":
                status[tp] = "skipped: needs both block_rq_issue and block_rq_complete"
    return cflags, status


def _thread_state(tgid: int, tid: int, proc_root: str) -> str | None:
    """The state letter of /proc/TGID/task/TID/stat (R, S, D, ...); None if gone."""
    try:
        text = Path(proc_root, str(tgid), "task", str(tid), "stat").read_text()
        return text.rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _host_detail(kind: int, detail: int, comm: bytes) -> str:
    if kind == abi.HOST_TCP:
        daddr = detail & 0xFFFFFFFF
        port = detail >> 32
        addr = socket.inet_ntoa(daddr.to_bytes(4, "little")) if daddr else "?"
        return f"{addr}:{port}"
    if kind == abi.HOST_BLOCK:
        return f"{detail >> 20}:{detail & 0xFFFFF}"
    return comm.decode("utf-8", "replace")


class Tracer:
    """One tracing session over a set of target processes."""

    def __init__(self, opts: TraceOptions | None = None):
        self.opts = opts or TraceOptions()
        probe_channels = tuple(c for c in self.opts.channels if c in CHANNELS)
        self.specs: list[LibrarySpec] = load_specs(channels=probe_channels) if probe_channels else []
        self.probe_refs: dict[int, ProbeRef] = {}
        self._probe_id: dict[tuple[str, str], int] = {}
        for lib in self.specs:
            for spec in lib.probes:
                for sym in spec.symbols:
                    pid = len(self.probe_refs)
                    self.probe_refs[pid] = ProbeRef(spec, sym)
                    self._probe_id[(lib.family, sym)] = pid
        self.targets: dict[int, _Target] = {}
        self.blobs: list[bytes] = []
        self._ring_total = 0  # ring records already drained (drain() empties self.blobs)
        # entry-only work calls (gloo) not completed at the last drain: paired in the next
        self._open_work: pl.DataFrame | None = None
        self.proc_events: list[dict] = []
        self.stack_rows: list[dict] = []
        self.probe_status: dict[tuple, dict] = {}
        self._uprobes: dict[tuple, list] = {}  # (dev, inode, vaddr, ret) -> [path, refs]
        self._sym_cache: dict[tuple[int, int], tuple[str, str | None]] = {}
        self.ctx = DecodeContext(self.probe_refs, kernel_name=self._kernel_name)
        self.ctx.on_comm_init = self._on_comm_init
        self.ctx.pg_group = lambda tgid, this: c10d.read_group(tgid, this, self.opts.proc_root)
        self._pg_slots: dict[int, tuple[int | None, str]] = {}  # probe id -> (comm slot, kind)
        self.session: BpfSession | None = None
        self._last_rescan = 0.0
        # tgid -> monotonic deadline: processes that just forked or exec'd are rescanned on
        # every poll (their libraries appear within milliseconds of exec) until then.
        self._hot: dict[int, float] = {}
        self._last_stacks = 0.0
        self._stack_buf = 0
        self.pystacks: PythonStacks | None = None  # Python frames in CPU samples (pyframes.py)
        self.host_rows: list[dict] = []
        self.host_status: dict[str, str] = {}
        self._host_prev: dict[tuple, tuple[int, int]] = {}
        self._last_host = 0.0
        self._last_host_ns = 0
        self._cpu_prev: tuple[int, int] | None = None  # the node's CPU time, steal (/proc/stat)
        self.started_ns = 0
        self.traced_ns: int | None = None  # the targets' probes placed (argus.collect.session)
        self.host = socket.gethostname()

    # -- start ---------------------------------------------------------------------------
    def plan(self, tgids: list[int]) -> list[tuple[int, bool]]:
        """Check the targets and privileges; [(tgid, is_launcher)]. Loads nothing."""
        for tgid in tgids:
            procfs.process_state(tgid, self.opts.proc_root)  # raises TargetNotFound
            if tgid == os.getpid():
                raise NotATrainingProcess(f"process {tgid} is this argus process itself")
        _check_privileges()
        plan: list[tuple[int, bool]] = []
        for tgid in tgids:
            libs = procfs.mapped_libraries(tgid, self.opts.proc_root)
            launcher = _is_rank_launcher(tgid, self.opts.proc_root)
            if procfs.is_training_process(libs) and not launcher:
                plan.append((tgid, False))
            elif launcher or procfs.children(tgid, self.opts.proc_root):
                plan.append((tgid, True))
            else:
                name = procfs.comm(tgid, self.opts.proc_root)
                raise NotATrainingProcess(
                    f"process {tgid} ({name}) maps no CUDA, NCCL or PyTorch library and has "
                    "no child processes: nothing to probe"
                )
        return plan

    def start(self, plan: list[tuple[int, bool]]) -> None:
        """Load the BPF program set and attach to every planned target."""
        warm = None
        if "cpu" in self.opts.channels or "host" in self.opts.channels:
            warm = threading.Thread(target=self._warm_symbols, args=(plan,), daemon=True,
                                    name="argus-warm-symbols")
            warm.start()
        cflags = [f"-I{BPF_DIR}", "-DARGUS_BPF", f"-DARGUS_CALL_PAGES={self._ring_pages()}"]
        off = _fork_child_offset()
        if off is not None:
            cflags.append(f"-DARGUS_TP_FORK_CHILD_PID_OFF={off}")
        sources = ["argus.bpf.c", "proc.bpf.c"]
        if self.specs:
            sources.append("calls.bpf.c")
        if "cpu" in self.opts.channels:
            sources.append("cpu_stacks.bpf.c")
        if "host" in self.opts.channels:
            host_cflags, self.host_status = host_tracepoint_plan()
            cflags += host_cflags
            sources.append("host.bpf.c")
        self.session = BpfSession([str(BPF_DIR / f) for f in sources], cflags)
        s = self.session
        if "cpu" in self.opts.channels:
            self.pystacks = PythonStacks(s, self.opts.proc_root)
        s.attach_tracepoint("sched:sched_process_fork", "argus_on_fork")
        s.attach_tracepoint("sched:sched_process_exec", "argus_on_exec")
        s.attach_tracepoint("sched:sched_process_exit", "argus_on_exit")
        s.open_ring_buffer("proc_events", self._on_proc)
        for tp, st in self.host_status.items():
            if st == "ok":
                try:
                    s.attach_tracepoint(tp, HOST_TRACEPOINTS[tp][0])
                    self.host_status[tp] = "attached"
                except Exception as e:  # ProbeAttachFailed: never fatal for host context
                    self.host_status[tp] = f"failed: {e}"
        if self.specs:
            s.open_ring_buffer("calls", self._on_call)
        self.started_ns = time.monotonic_ns()
        self._mono_to_wall = time.time_ns() - time.monotonic_ns()
        for tgid, launcher in plan:
            self._watch(tgid, launcher=launcher)
            if launcher:
                for child in procfs.descendants(tgid, self.opts.proc_root):
                    if child != os.getpid():  # never trace argus itself (attached via a shell)
                        self._watch(child, launcher=True)
        # Exits before the targets were in the watched map fired no tracepoint: this one
        # check closes that window (a zombie counts as gone: its /proc entry stays).
        for t in list(self.targets.values()):
            if not procfs.alive(t.tgid, self.opts.proc_root):
                self._mark_exited(t)
        if warm is not None:
            warm.join(WARM_TIMEOUT_S)
        if "cpu" in self.opts.channels:
            s.attach_cpu_clock("argus_cpu_sample", self.opts.sample_hz)
        self._last_rescan = self._last_stacks = self._last_host = time.monotonic()
        self._last_host_ns = time.monotonic_ns()
        self._cpu_prev = procfs.cpu_times(self.opts.proc_root)

    def _warm_symbols(self, plan: list[tuple[int, bool]]) -> None:
        """While the BPF programs compile (in C, the GIL released): load the kernel's symbols
        and the function tables of every file the planned processes map executable, which
        the first stack drain would otherwise build while the job is traced (0.2-0.4 s of
        a core, 1.3-1.5x slower steps for 3-6 steps of a 4-rank job on 2 vCPUs: the false
        alarms of 1 in 10 healthy tp_dp runs)."""
        warm_kernel_symbols()
        tgids = [t for t, _launcher in plan]
        for t, launcher in plan:
            if launcher:
                tgids += procfs.descendants(t, self.opts.proc_root)
        seen: set[str] = set()
        for tgid in tgids:
            try:
                text = (Path(self.opts.proc_root) / str(tgid) / "maps").read_text()
            except OSError:
                continue
            for m in procfs.parse_maps(text):
                if "x" not in m.perms or not m.path.startswith("/") or m.path in seen:
                    continue
                seen.add(m.path)
                elf = elf_file(procfs.host_path(tgid, m.path, self.opts.proc_root))
                if elf is not None:
                    try:
                        elf.function_at(0)
                    except OSError:
                        pass

    def _ring_pages(self) -> int:
        pages = max(1, self.opts.ringbuf_mb * 1024 * 1024 // 4096)
        return 1 << (pages.bit_length() - 1)  # a power of two

    # -- targets ---------------------------------------------------------------------------
    def _watch(self, tgid: int, launcher: bool) -> None:
        if tgid in self.targets:
            return
        t = _Target(tgid=tgid, launcher=launcher)
        self.targets[tgid] = t
        flags = abi.W_DESCEND if launcher else 0
        self._set_watched(tgid, flags)
        self._scan(t)

    def _set_watched(self, tgid: int, flags: int) -> None:
        table = self.session.table("watched")
        table[ct.c_uint32(tgid)] = ct.c_uint32(flags)

    def _scan(self, t: _Target, code: tuple[int, int] | None = None) -> None:
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
            self._py_ensure(t)
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
            self._py_ensure(t)
            return
        if t.launcher and not t.traced and procfs.is_training_process(libs):
            t.rank_launcher = t.rank_launcher or _is_rank_launcher(t.tgid, self.opts.proc_root)
        if t.rank_launcher:
            t.libraries = [lib.to_dict() for lib in libs]
            return  # its ranks are watched through it; it is not probed itself
        if t.launcher and not t.traced and t.worker_of is None:
            t.worker_of = procfs.worker_of(t.tgid, self.opts.proc_root)
        if t.worker_of is not None:
            return  # a worker of a rank (forked with its RANK): not a second rank
        for lib in new:
            specs = self._specs_for(lib)
            t.attached[lib.path] = _Attached(lib.path, lib.host_path)
            if specs:
                self._attach_library(t, lib, specs)
        probed = [lib for lib in libs if t.attached.get(lib.path) and t.attached[lib.path].uprobes]
        if (probed or procfs.is_training_process(libs)) and not t.traced:
            t.traced = True
            ident = procfs.rank_identity(t.tgid, self.opts.proc_root)
            if t.rank is None:
                t.rank = ident["rank"]
            t.local_rank, t.world_size = ident["local_rank"], ident["world_size"]
            t.env = ident["env"]
            t.exe = procfs.exe(t.tgid, self.opts.proc_root)
            self.ctx.rank_of[t.tgid] = t.rank
            flags = abi.W_TRACE | (abi.W_DESCEND if t.launcher else 0)
            self._set_watched(t.tgid, flags)
        t.libraries = [lib.to_dict() for lib in libs]
        self._py_ensure(t)

    def _py_ensure(self, t: _Target) -> None:
        """A traced process that runs CPython gets Python frames in its CPU samples."""
        if self.pystacks is not None and t.traced and not t.exited:
            self.pystacks.ensure(t.tgid, t.maps, t.exe)

    def _specs_for(self, lib: procfs.MappedLibrary) -> list[LibrarySpec]:
        name = os.path.basename(lib.path)
        out = [spec for spec in self.specs if spec.matches_file(name)]
        markers = tuple(spec.static_marker for spec in self.specs
                        if spec.static_marker and spec not in out)
        if markers and lib.name.startswith("libtorch"):
            elf = elf_file(lib.host_path)
            found = elf.defined_of(markers) if elf is not None else set()
            # a static copy of the runtime inside another .so
            out += [spec for spec in self.specs if spec.static_marker in found
                    and spec not in out]
        return out

    def _acquire_uprobe(self, path: str, vaddr: int, ret: bool) -> tuple:
        """Attach (once per file, node-wide) the generic program at vaddr of the file at path.

        Uprobes live on the file (inode), not the process: one attachment serves every rank
        that maps this library, including ranks that start later, whose calls are recorded
        from the moment their probe-table entries exist (the in-kernel filter). Processes
        argus does not trace pay only the trap and one hash lookup while argus is attached.
        Reference-counted by traced processes; released when the last one exits.
        """
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, vaddr, ret)
        entry = self._uprobes.get(key)
        if entry is None:
            fn = "argus_call_return" if ret else "argus_call_entry"
            self.session.attach_uprobe(path, vaddr, fn, -1, ret=ret)
            entry = self._uprobes[key] = [path, 0]
        entry[1] += 1
        return key

    def _release_uprobe(self, key: tuple) -> None:
        entry = self._uprobes.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._uprobes[key]
            self.session.detach_uprobe(entry[0], key[2], -1, ret=key[3], background=True)

    def _attach_library(self, t: _Target, lib: procfs.MappedLibrary, specs: list[LibrarySpec]):
        elf = elf_file(lib.host_path)
        table = self.session.table("probes")
        for libspec in specs:
            for spec in libspec.probes:
                for sym in spec.symbols:
                    key = (libspec.channel, lib.path, sym)
                    status = self.probe_status.setdefault(
                        key,
                        {
                            "channel": libspec.channel,
                            "library": lib.path,
                            "symbol": sym,
                            "name": spec.name if sym == spec.symbol else sym,
                            "kind": "entry+exit" if spec.exit else "entry",
                            "status": "missing",
                            "reason": "",
                            "tgids": [],
                        },
                    )
                    found = elf.lookup(sym) if elf is not None else None
                    if found is None:
                        status["reason"] = "symbol not in this library"
                        continue
                    place = elf.placement(found)
                    addr = runtime_address(lib.mappings, place.file_offset) if place else None
                    if addr is None:
                        status.update(status="failed", reason="address not in the process's mappings")
                        continue
                    probe_id = self._probe_id[(libspec.family, sym)]
                    pkey = abi.ProbeKey(tgid=t.tgid, pad=0, addr=addr)
                    # The table entry first: from here on this process's calls are recorded.
                    table[pkey] = spec.probe_info(probe_id)
                    held = []
                    try:
                        held.append(self._acquire_uprobe(lib.host_path, place.vaddr, False))
                        if spec.exit:
                            held.append(self._acquire_uprobe(lib.host_path, place.vaddr, True))
                    except Exception as e:  # ProbeAttachFailed, OSError
                        # Never leave an entry probe whose return half is missing.
                        for k in held:
                            self._release_uprobe(k)
                        del table[pkey]
                        half = "return probe: " if held else ""
                        status.update(status="failed", reason=f"{half}{e}")
                        continue
                    t.attached[lib.path].uprobes.extend(held)
                    t.attached[lib.path].keys.append(pkey)
                    status.update(
                        status="attached",
                        reason="" if place.emulated else f"first instruction {place.first_insn} is single-stepped (slow)",
                        placement={"skipped": place.skipped, "first_insn": place.first_insn,
                                   "emulated": place.emulated},
                    )
                    status["tgids"].append(t.tgid)

    def _detach_target(self, t: _Target) -> None:
        if self.pystacks is not None:
            self.pystacks.forget(t.tgid)
        table = self.session.table("probes")
        for att in t.attached.values():
            for key in att.uprobes:
                self._release_uprobe(key)
            att.uprobes.clear()
            for pkey in att.keys:
                try:
                    del table[pkey]
                except KeyError:
                    pass
            att.keys.clear()

    def _on_comm_init(self, tgid: int, cid: str, rank: int | None, nranks: int | None) -> None:
        t = self.targets.get(tgid)
        if t is None or rank is None:
            return
        # The rank in the largest communicator is the global rank when the environment
        # did not say (MPI-style launchers without RANK).
        if t.rank is None or (t.world_size is None and nranks and nranks >= (t.world_size or 0)):
            if t.rank is None:
                t.rank = rank
                t.world_size = nranks
                self.ctx.rank_of[tgid] = rank

    # -- event intake --------------------------------------------------------------------
    def _on_call(self, _ctx, data, size) -> None:
        blob = ct.string_at(data, size)
        self.blobs.append(blob)
        if len(self._pg_slots) != len(self.probe_refs):
            self._pg_slots = {pid: (r.spec.args.get("comm"), r.spec.kind)
                              for pid, r in self.probe_refs.items()}
        slot, kind = self._pg_slots.get(int.from_bytes(blob[4:8], "little"), (None, ""))
        if slot is not None and kind.startswith("pg_"):
            # name a c10d group while its process is alive (read from its memory, once per
            # group: `c10d.read_group`); decoding comes later, maybe after the rank exited
            tgid = int.from_bytes(blob[8:12], "little")
            off = CALL_ARGS_OFF + 8 * slot
            self.ctx.comm_id(tgid, int.from_bytes(blob[off : off + 8], "little"), kind)

    def _on_proc(self, _ctx, data, size) -> None:
        e = ct.cast(data, ct.POINTER(abi.ProcEvent)).contents
        self.proc_events.append(
            {"what": int(e.what), "ts_ns": int(e.ts_ns), "tgid": int(e.tgid), "child": int(e.child),
             "comm": e.comm.decode("utf-8", "replace")}
        )

    def _handle_proc_events(self, start: int) -> None:
        for ev in self.proc_events[start:]:
            if ev["what"] == abi.PROC_FORK:
                child = ev["child"]
                try:
                    info = procfs.process_state(child, self.opts.proc_root)
                except TargetNotFound:
                    continue
                if info.tgid == child and child not in self.targets and child != os.getpid():
                    # A new process (not a thread) of a watched parent.
                    status = Path(self.opts.proc_root, str(child), "status")
                    try:
                        tgid_line = next(ln for ln in status.read_text().splitlines() if ln.startswith("Tgid:"))
                        if int(tgid_line.split()[1]) != child:
                            continue
                    except (OSError, StopIteration, ValueError):
                        continue
                    self._watch(child, launcher=True)
                    self._hot[child] = time.monotonic() + HOT_RESCAN_S
            elif ev["what"] == abi.PROC_EXEC:
                t = self.targets.get(ev["tgid"])
                if t is not None and t.scanned_ns < ev["ts_ns"]:
                    # A new image: old addresses are gone. (A scan after the exec already
                    # saw the new image: nothing to redo.)
                    self._detach_target(t)
                    t.attached.clear()
                    t.traced = False
                    t.rank_launcher = False
                    t.maps_text = None
                    self._scan(t)
                    self._hot[t.tgid] = time.monotonic() + HOT_RESCAN_S
            elif ev["what"] == abi.PROC_EXIT:
                t = self.targets.get(ev["tgid"])
                if t is not None:
                    self._mark_exited(t)

    def _mark_exited(self, t: _Target) -> None:
        """The one way a target ends: its shared uprobes are released and its probe-table
        entries removed, however its exit was noticed (tracepoint or a rescan)."""
        if not t.exited:
            t.exited = True
            self._detach_target(t)

    def poll(self, timeout_s: float = 0.1) -> None:
        """Wait up to `timeout_s` (10 ms while a process just started) for ring-buffer
        records, drain them, follow process lifecycle, rescan, aggregate CPU stacks."""
        n = len(self.proc_events)
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
            backstop = time.monotonic_ns() - int(MAPS_BACKSTOP_S * 1e9)
            for t in list(self.targets.values()):
                if not t.exited:
                    code = procfs.mapped_code(t.tgid, self.opts.proc_root)
                    if code is None:  # gone, or a zombie
                        self._mark_exited(t)
                    elif code != t.code or t.scanned_ns < backstop:
                        self._scan(t, code)
                    else:  # no library loaded or unloaded: its maps are as last read
                        self._py_ensure(t)
        if "cpu" in self.opts.channels and now - self._last_stacks >= self.opts.stack_interval_s:
            self._drain_stacks(now)
        if "host" in self.opts.channels and now - self._last_host >= self.opts.stack_interval_s:
            self._drain_host(now)

    def all_exited(self) -> bool:
        return bool(self.targets) and all(t.exited for t in self.targets.values())

    # -- node-wide service (argus daemon): targets added while running, incremental drain ---
    def add_target(self, tgid: int) -> bool:
        """Trace one more process while running (a rank found by `argus daemon`'s scan).
        False when it is argus itself, already watched, or gone."""
        if tgid in self.targets or tgid == os.getpid():
            return False
        try:
            procfs.process_state(tgid, self.opts.proc_root)
        except TargetNotFound:
            return False
        self._watch(tgid, launcher=False)
        self._hot[tgid] = time.monotonic() + HOT_RESCAN_S
        return True

    def probes_of(self, tgid: int) -> int:
        """Probe-table entries (symbols probed) in one traced process."""
        t = self.targets.get(tgid)
        return sum(len(a.keys) for a in t.attached.values()) if t else 0

    @property
    def mono_to_wall_ns(self) -> int:
        return self._mono_to_wall

    def drops(self) -> dict[str, int]:
        return self._drops()

    def drain(self) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        """What was recorded since the last drain, without stopping: (events that are final,
        calls in flight now, new stack rows, new host rows). In flight: the kernel's
        in-flight calls and the entry-only work calls whose completion has not been seen
        yet; those are paired with their completion by a later drain (or `finish`), so a
        collective that spans a drain is one row with its duration. Drained rows leave
        memory; `finish` then returns only what came after."""
        n = len(self.proc_events)
        self.session.consume()
        self._handle_proc_events(n)
        for t in self.targets.values():
            if t.rank is not None:
                self.ctx.rank_of[t.tgid] = t.rank
        blobs, self.blobs = self.blobs, []
        self._ring_total += len(blobs)
        procs, self.proc_events = self.proc_events, []
        stack_rows, self.stack_rows = self.stack_rows, []
        host_rows, self.host_rows = self.host_rows, []
        events, still_open = self._paired(decode_records(blobs, self.ctx), procs)
        self._open_work = still_open
        inflight = self._inflight_rows() if self.specs else schema.empty_events()
        if still_open.height:
            inflight = pl.concat([inflight, still_open.with_columns(pl.lit(True).alias("in_flight"))],
                                 how="vertical_relaxed")
        stacks = pl.DataFrame(stack_rows, schema=schema.STACKS_SCHEMA) if stack_rows else (
            schema.empty_stacks())
        host = pl.DataFrame([{**r, "rank": self.ctx.rank_of.get(r["tgid"])} for r in host_rows],
                            schema=schema.HOST_SCHEMA) if host_rows else schema.empty_host()
        return events, inflight, stacks, host

    def _proc_rows(self, procs: list[dict]) -> pl.DataFrame:
        """Lifecycle rows (fork of a traced process, exec, exit) of the proc ring buffer."""
        names = {abi.PROC_FORK: "fork", abi.PROC_EXEC: "exec", abi.PROC_EXIT: "exit"}
        return rows_to_frame([
            {"ts_ns": e["ts_ns"], "tgid": e["tgid"] if e["what"] != abi.PROC_FORK else e["child"],
             "tid": e["tgid"], "rank": self.ctx.rank_of.get(e["tgid"]), "channel": "proc",
             "name": names[e["what"]], "in_flight": False}
            for e in procs
            if e["what"] != abi.PROC_FORK or e["child"] in self.targets
        ])

    def _paired(self, decoded: pl.DataFrame, procs: list[dict],
                extra: pl.DataFrame | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(events sorted by time with entry-only work calls paired to their completions,
        the work calls with no completion yet: in flight). The work calls still open at the
        previous drain join this pairing."""
        frames = [f for f in (decoded, self._open_work, extra, self._proc_rows(procs))
                  if f is not None and f.height]
        self._open_work = None
        events = pl.concat(frames, how="vertical_relaxed").sort("ts_ns") if frames else (
            schema.empty_events())
        work = {r.name for r in self.probe_refs.values() if r.spec.kind == "pg_work"}
        done = {r.name for r in self.probe_refs.values() if r.spec.kind == "pg_work_done"}
        events = pair_completions(events, work, done)
        if not work or not events.height:
            return events, schema.empty_events()
        still = (pl.col("name").cast(pl.Utf8).is_in(list(work)) & pl.col("in_flight")
                 & pl.col("dur_ns").is_null())
        return events.filter(~still), events.filter(still).with_columns(
            pl.lit(False).alias("in_flight"))

    def forget_exited(self) -> list[int]:
        """Drop the state of processes that had already exited at the previous call (their
        last stacks are symbolized by now): a long-running tracer does not grow with every
        job that came and went. Returns the tgids forgotten."""
        gone = [tgid for tgid in getattr(self, "_exited_before", ()) if tgid in self.targets
                and self.targets[tgid].exited]
        for tgid in gone:
            del self.targets[tgid]
            self._hot.pop(tgid, None)
            self.ctx.rank_of.pop(tgid, None)
            self.ctx.devices.pop(tgid, None)
            if self.pystacks is not None:
                self.pystacks.drop(tgid)
        if gone:
            drop = set(gone)
            self._sym_cache = {k: v for k, v in self._sym_cache.items() if k[0] not in drop}
            self._host_prev = {k: v for k, v in self._host_prev.items() if k[1] not in drop}
        self._exited_before = {t.tgid for t in self.targets.values() if t.exited}
        return gone

    # -- CPU stacks ------------------------------------------------------------------------
    def _drain_stacks(self, now: float, final: bool = False) -> None:
        s = self.session
        old = self._stack_buf
        if not final:
            self._stack_buf ^= 1
            s.table("stack_buf")[ct.c_int(0)] = ct.c_uint32(self._stack_buf)
            time.sleep(0.002)  # samples already past the flag check finish in microseconds
        stacks = s.table(f"stacks{old}")
        if self.pystacks is not None:
            self.pystacks.take(old)
        interval_ns = int(self.opts.stack_interval_s * 1e9)
        ts_ns = time.monotonic_ns() - interval_ns
        for key, value in s.items(f"stack_counts{old}", delete=True):
            tgid = int(key.tgid)
            functions: list[str] = []
            modules: list[str] = []
            if key.kernel_stack_id >= 0:
                for addr in stacks.walk(key.kernel_stack_id):
                    functions.append(s.ksym(addr))
                    modules.append("[kernel]")
            if key.user_stack_id >= 0:
                for addr in stacks.walk(key.user_stack_id):
                    mod, fn = self._symbolize(tgid, addr)
                    functions.append(fn or mod)
                    modules.append(mod.split("+", 1)[0])
            if key.py_stack_id and self.pystacks is not None:
                functions, modules = self.pystacks.merge(tgid, int(key.py_stack_id), functions,
                                                         modules)
            self.stack_rows.append(
                {
                    "ts_ns": ts_ns,
                    "interval_ns": interval_ns,
                    "tgid": tgid,
                    "tid": int(key.tid),
                    "rank": self.ctx.rank_of.get(tgid),
                    "thread": key.comm.decode("utf-8", "replace"),
                    "count": int(value),
                    "functions": functions,
                    "modules": modules,
                    "state": "on_cpu",
                    "blocked_ns": None,
                }
            )
        stacks.clear()
        self._last_stacks = now

    # -- host context (host.bpf.c) ------------------------------------------------------------
    def _drain_host(self, now: float) -> None:
        """host_counts deltas since the last drain -> host rows; each traced thread blocked
        now -> one off-CPU stack row (its latest blocking stack and for how long)."""
        s = self.session
        now_ns = time.monotonic_ns()
        start_ns, interval_ns = self._last_host_ns, max(0, now_ns - self._last_host_ns)
        waits = []
        for key, val in s.items("host_counts"):
            k = (int(key.kind), int(key.tgid), int(key.detail), bytes(key.comm))
            count, total = int(val.count), int(val.total_ns)
            if k[0] == abi.HOST_CPU_WAIT:  # the waits that began in one slot, then gone
                self.host_rows.append({
                    "ts_ns": k[2], "interval_ns": max(abi.WAIT_BUCKET_NS, total), "tgid": k[1],
                    "kind": "cpu_wait", "detail": _host_detail(k[0], k[2], k[3]),
                    "count": count, "total_ns": total,
                })
                waits.append(key)
                continue
            pc, pt = self._host_prev.get(k, (0, 0))
            self._host_prev[k] = (count, total)
            if count <= pc:
                continue
            kind = abi.HOST_KINDS.get(k[0])
            if kind is None:
                continue
            oom = k[0] == abi.HOST_OOM
            self.host_rows.append({
                "ts_ns": k[2] if oom else start_ns,
                "interval_ns": 0 if oom else interval_ns,
                "tgid": k[1], "kind": kind, "detail": _host_detail(k[0], k[2], k[3]),
                "count": count - pc, "total_ns": total - pt,
            })
        s.delete_keys("host_counts", waits)
        gone = []
        for tid_key, e in s.items("offcpu"):
            tid, tgid = int(tid_key), int(e.tgid)
            state = _thread_state(tgid, tid, self.opts.proc_root)
            if state is None:
                gone.append(tid_key)  # the thread is gone
                continue
            if state in ("R",):  # running again since it last blocked
                continue
            functions, modules = self._offcpu_frames(tgid, e)
            self.stack_rows.append({
                "ts_ns": start_ns, "interval_ns": interval_ns, "tgid": tgid, "tid": tid,
                "rank": self.ctx.rank_of.get(tgid), "thread": e.comm.decode("utf-8", "replace"),
                "count": 0, "functions": functions, "modules": modules,
                "state": "off_cpu", "blocked_ns": max(0, now_ns - int(e.ts_ns)),
            })
        s.delete_keys("offcpu", gone)
        cpu = procfs.cpu_times(self.opts.proc_root)
        if cpu is not None and self._cpu_prev is not None and cpu[0] > self._cpu_prev[0]:
            self.host_rows.append({
                "ts_ns": start_ns, "interval_ns": interval_ns, "tgid": 0, "kind": "cpu_steal",
                "detail": "node", "count": cpu[0] - self._cpu_prev[0],
                "total_ns": max(0, cpu[1] - self._cpu_prev[1]),
            })
        self._cpu_prev = cpu
        self._last_host_ns = now_ns
        self._last_host = now

    def _offcpu_frames(self, tgid: int, e: abi.OffCpu) -> tuple[list[str], list[str]]:
        """Kernel frames, then user frames (leaf first), as on-CPU rows have them. When the
        user leaf is in a shared library (a frameless libc wrapper such as pause or a futex
        wait), its caller's return address is not on the frame-pointer chain: the first
        word at the user sp that lands in a function of the program (not a .so) and is not
        already the next frame is inserted after the leaf."""
        s = self.session
        functions: list[str] = []
        modules: list[str] = []
        for addr in list(e.kernel)[: max(0, e.kernel_len) // 8]:
            if addr:
                functions.append(s.ksym(addr))
                modules.append("[kernel]")
        user: list[tuple[str, str]] = []
        for addr in list(e.user)[: max(0, e.user_len) // 8]:
            if addr:
                mod, fn = self._symbolize(tgid, addr)
                user.append((fn or mod, mod.split("+", 1)[0]))
        if user and ".so" in user[0][1] and e.scan_len > 0:
            for word in list(e.scan)[: e.scan_len // 8]:
                mod, fn = self._symbolize(tgid, word)
                if fn and ".so" not in mod and mod != "[unknown]":
                    if len(user) < 2 or user[1][0] != fn:
                        user.insert(1, (fn, mod))
                    break
        for fn, mod in user:
            functions.append(fn)
            modules.append(mod)
        return functions, modules

    def host_frame(self) -> pl.DataFrame:
        rows = [{**r, "rank": self.ctx.rank_of.get(r["tgid"])} for r in self.host_rows]
        return pl.DataFrame(rows, schema=schema.HOST_SCHEMA) if rows else schema.empty_host()

    # -- symbols ------------------------------------------------------------------------------
    def _symbolize(self, tgid: int, addr: int) -> tuple[str, str | None]:
        """(module basename, function) of a user address, from the process's mappings as last
        scanned and the ELF files on disk: works after the process has exited. An address
        with no symbol is named "module+0xFILEOFFSET"; the function is None."""
        key = (tgid, addr)
        hit = self._sym_cache.get(key)
        if hit is not None:
            return hit
        module, name = "[unknown]", None
        t = self.targets.get(tgid)
        for m in t.maps if t else ():
            if m.start <= addr < m.end:
                module = os.path.basename(m.path)
                elf = elf_file(procfs.host_path(tgid, m.path, self.opts.proc_root))
                if elf is None:
                    elf = elf_file(m.path)
                if elf is not None:
                    vaddr = elf.offset_to_vaddr(addr - m.start + m.offset)
                    try:
                        fn = elf.function_at(vaddr) if vaddr is not None else None
                    except OSError:  # /proc/PID/root/... is gone once the process exited
                        other = elf_file(m.path)
                        try:
                            fn = other.function_at(vaddr) if other and vaddr is not None else None
                        except OSError:
                            fn = None
                    name = short_name(demangle(fn)) if fn else None
                if name is None:
                    module = f"{module}+{addr - m.start + m.offset:#x}"
                break
        self._sym_cache[key] = (module, name)
        return module, name

    def _kernel_name(self, tgid: int, addr: int) -> str | None:
        return self._symbolize(tgid, addr)[1]

    # -- finish ----------------------------------------------------------------------------
    def finish(self, end_reason: str, close: bool = True
               ) -> tuple[dict, pl.DataFrame, pl.DataFrame]:
        """Stop, drain everything still in the kernel; return the recording parts (what came
        after the last `drain`). `close`: detach every probe and free the BPF object here
        (about 0.23 s per uprobe); else the probes are made inert (the filter maps emptied)
        and the caller closes the session (`BpfSession.close(background=True)`)."""
        s = self.session
        ended_ns = time.monotonic_ns()
        n = len(self.proc_events)
        s.consume()
        self._handle_proc_events(n)
        if "cpu" in self.opts.channels:
            self._drain_stacks(time.monotonic(), final=False)
            self._drain_stacks(time.monotonic(), final=True)
        if "host" in self.opts.channels:
            self._drain_host(time.monotonic())
        # Re-resolve ranks now known from communicator init for rows decoded below.
        for t in self.targets.values():
            self.ctx.rank_of[t.tgid] = t.rank
        events, still_open = self._paired(decode_records(self.blobs, self.ctx),
                                          self.proc_events, self._inflight_rows())
        if still_open.height:  # a work call that never completed: blocked at the end
            events = pl.concat([events, still_open.with_columns(pl.lit(True).alias("in_flight"))],
                               how="vertical_relaxed").sort("ts_ns")
        stacks = pl.DataFrame(self.stack_rows, schema=schema.STACKS_SCHEMA) if self.stack_rows else schema.empty_stacks()
        manifest = self.manifest(end_reason, ended_ns, events, stacks)
        if close:
            for t in self.targets.values():
                if not t.exited:
                    self._detach_target(t)
            s.close()
        else:
            for name in ("probes", "watched"):
                s.table(name).clear()
        return manifest, events, stacks

    def manifest(self, end_reason: str, ended_ns: int, events: pl.DataFrame,
                 stacks: pl.DataFrame) -> dict:
        """The recording's manifest as of now: targets, probes, drops and exact call counts
        so far; `counts` of the given rows (a part's own; `merge_parts` sums a session's)."""
        python_stacks = self.pystacks.manifest() if self.pystacks is not None else None
        return {
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
            "sample_hz": self.opts.sample_hz if "cpu" in self.opts.channels else 0,
            "channels": {c: c in self.opts.channels for c in ("cuda", "nccl", "torch", "cpu", "host")},
            "host_context": {"enabled": "host" in self.opts.channels,
                             "tracepoints": dict(self.host_status)},
            "ranks": [
                {
                    "rank": t.rank,
                    "local_rank": t.local_rank,
                    "world_size": t.world_size,
                    "tgid": t.tgid,
                    "host": self.host,
                    "exe": t.exe,
                    "env": t.env,
                    "cuda_device": self.ctx.devices.get(t.tgid),  # last cudaSetDevice ordinal
                    "exited": t.exited,
                    "libraries": t.libraries,
                }
                for t in sorted(self.targets.values(), key=lambda t: (t.rank is None, t.rank, t.tgid))
                if t.traced
            ],
            "launchers": [t.tgid for t in self.targets.values() if t.launcher and not t.traced],
            "probes": sorted(self.probe_status.values(), key=lambda p: (p["channel"], p["symbol"])),
            "drops": self._drops(),
            "python_stacks": python_stacks,
            "call_counts": self._call_counts(),
            "counts": {
                "events": {
                    str(k): int(v)
                    for k, v in events.group_by("channel").len().iter_rows()
                }
                if events.height
                else {},
                "stack_samples": int(stacks["count"].sum()) if stacks.height else 0,
                "ring_records": self._ring_total + len(self.blobs),  # since the start
            },
        }

    def _inflight_rows(self) -> pl.DataFrame:
        rows = []
        for tid_key, st in self.session.table("inflight").items():
            for i in range(min(int(st.depth), abi.MAX_DEPTH)):
                f = st.frames[i]
                call = _FrameView(f, int(st.tgid), int(tid_key.value))
                row = decode_call(call, None, self.ctx, in_flight=True)
                if row is not None:
                    rows.append(row)
        return rows_to_frame(rows)

    def _call_counts(self) -> dict:
        """{tgid: {probe name: calls entered}}, exact, from the in-kernel counts map."""
        out: dict[str, dict[str, int]] = {}
        if not self.specs:
            return out
        for key, value in self.session.table("call_counts").items():
            ref = self.probe_refs.get(int(key.probe_id))
            if ref is None:
                continue
            per = out.setdefault(str(int(key.tgid)), {})
            per[ref.name] = per.get(ref.name, 0) + int(value.value)
        return out

    def _drops(self) -> dict[str, int]:
        table = self.session.table("drops")
        return {name: int(table[ct.c_int(i)].value) for i, name in enumerate(abi.DROP_NAMES)}


class _FrameView:
    """Make an in-flight argus_frame look like a call record to decode_call."""

    def __init__(self, f: abi.Frame, tgid: int, tid: int):
        self._v = {
            "probe_id": f.probe_id,
            "tgid": tgid,
            "tid": tid,
            "ts_ns": f.ts_ns,
            "dur_ns": 0,
            "args": list(f.args),
            "uid_hash": f.uid_hash,
            "out": 0,
            "seq": f.seq,
            "ret": 0,
        }

    class _D:
        names = ("probe_id", "tgid", "tid", "ts_ns", "dur_ns", "args", "uid_hash", "out", "seq", "ret")

    dtype = _D()

    def __getitem__(self, k):
        return self._v[k]
