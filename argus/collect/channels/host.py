"""The host channel (bpf/host.bpf.c): what else the node did to the traced processes.

sched_switch / sched_wakeup (CPU contention: runnable-but-waiting time, off-CPU stacks of
threads blocked now), TCP retransmits, OOM kills and block I/O, counted per key in the
host_counts map; the field offsets of each tracepoint come from the running kernel's format
files (`host_tracepoint_plan`), so a tracepoint this kernel lacks is skipped, never fatal.
A drain turns host_counts deltas into host rows and each traced thread blocked now into
one "off_cpu" stack row (its latest blocking stack and for how long).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import polars as pl

from argus.collect import abi, features, procfs
from argus.collect.channels.base import Channel
from argus.recording import schema

# tracepoint -> (program, {-D name: (field, which of offset/size)}).
HOST_TRACEPOINTS = {
    "sched:sched_switch": ("argus_host_switch", {
        "ARGUS_TP_SS_PREV_STATE_OFF": ("prev_state", 0),
        "ARGUS_TP_SS_PREV_STATE_SIZE": ("prev_state", 1),
        "ARGUS_TP_SS_NEXT_COMM_OFF": ("next_comm", 0),
        "ARGUS_TP_SS_NEXT_PID_OFF": ("next_pid", 0)}),
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
BLOCK_PAIR = ("block:block_rq_issue", "block:block_rq_complete")


def host_tracepoint_plan() -> tuple[list[str], dict[str, str]]:
    """(-D cflags with the field offsets of the running kernel, {tracepoint: "ok" | why
    it is skipped}). A tracepoint this kernel lacks, or one missing a field, is skipped."""
    cflags: list[str] = []
    status: dict[str, str] = {}
    for tp, (_fn, defines) in HOST_TRACEPOINTS.items():
        fields = features.tracepoint_fields(tp.replace(":", "/"))
        if fields is None:
            status[tp] = "skipped: not in this kernel (or tracefs is not mounted)"
            continue
        missing = sorted({f for f, _ in defines.values() if f not in fields})
        if missing:
            status[tp] = f"skipped: the format file has no field {', '.join(missing)}"
            continue
        cflags += [f"-D{d}={fields[f][i]}" for d, (f, i) in defines.items()]
        status[tp] = "ok"
    if any(status.get(tp) != "ok" for tp in BLOCK_PAIR):
        for tp in BLOCK_PAIR:
            if status.get(tp) == "ok":
                status[tp] = "skipped: needs both block_rq_issue and block_rq_complete"
    return cflags, status


def thread_state(tgid: int, tid: int, proc_root: str) -> str | None:
    """The state letter of /proc/TGID/task/TID/stat (R, S, D, ...); None if gone."""
    try:
        text = Path(proc_root, str(tgid), "task", str(tid), "stat").read_text()
        return text.rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def host_detail(kind: int, detail: int, comm: bytes) -> str:
    """The `detail` column of a host row: address:port, major:minor, or a command name."""
    if kind == abi.HOST_TCP:
        daddr = detail & 0xFFFFFFFF
        port = detail >> 32
        addr = socket.inet_ntoa(daddr.to_bytes(4, "little")) if daddr else "?"
        return f"{addr}:{port}"
    if kind == abi.HOST_BLOCK:
        return f"{detail >> 20}:{detail & 0xFFFFF}"
    return comm.decode("utf-8", "replace")


class HostChannel(Channel):
    name = "host"
    switches = {"host": "Do not record host context (CPU contention, off-CPU stacks, TCP "
                        "retransmits, OOM kills, block I/O)."}
    context_only = True  # it explains the others' waits: alone it explains nothing
    sources = ("host.bpf.c",)
    symbolizes = True

    def __init__(self, tracer):
        super().__init__(tracer)
        self.rows: list[dict] = []  # not drained yet
        self.status: dict[str, str] = {}  # tracepoint -> attached | skipped: ... | failed: ...
        self._prev: dict[tuple, tuple[int, int]] = {}
        # tid -> ((stack_ns, site), (functions, modules)): a thread still blocked where the
        # last drain saw it (most of a rank's threads, most of the time: its gloo and
        # OpenMP workers) is not symbolised again every second
        self._frames: dict[int, tuple[tuple[int, int], tuple[list[str], list[str]]]] = {}
        self._last = 0.0
        self._last_ns = 0
        self._cpu_prev: tuple[int, int] | None = None  # the node's CPU time, steal (/proc/stat)

    def cflags(self) -> list[str]:
        cflags, self.status = host_tracepoint_plan()
        return cflags

    def attach(self, session) -> None:
        for tp, st in self.status.items():
            if st == "ok":
                try:
                    session.attach_tracepoint(tp, HOST_TRACEPOINTS[tp][0])
                    self.status[tp] = "attached"
                except Exception as e:  # ProbeAttachFailed: never fatal for host context
                    self.status[tp] = f"failed: {e}"

    def start(self) -> None:
        self._last = time.monotonic()
        self._last_ns = time.monotonic_ns()
        self._cpu_prev = procfs.cpu_times(self.tracer.opts.proc_root)

    def poll(self, now: float) -> None:
        if now - self._last >= self.tracer.opts.stack_interval_s:
            self.drain(now)

    def finish(self) -> None:
        self.drain(time.monotonic())

    def forget(self, tgids: set[int]) -> None:
        self._prev = {k: v for k, v in self._prev.items() if k[1] not in tgids}
        self._frames = {}  # (tids of other processes are named again at the next drain)

    def drain(self, now: float) -> None:
        """host_counts deltas since the last drain -> host rows; each traced thread blocked
        now -> one off-CPU stack row (its latest blocking stack and for how long)."""
        now_ns = time.monotonic_ns()
        start_ns, interval_ns = self._last_ns, max(0, now_ns - self._last_ns)
        self._count_rows(start_ns, interval_ns)
        self._offcpu_rows(start_ns, interval_ns, now_ns)
        cpu = procfs.cpu_times(self.tracer.opts.proc_root)
        if cpu is not None and self._cpu_prev is not None and cpu[0] > self._cpu_prev[0]:
            self.rows.append({
                "ts_ns": start_ns, "interval_ns": interval_ns, "tgid": 0, "kind": "cpu_steal",
                "detail": "node", "count": cpu[0] - self._cpu_prev[0],
                "total_ns": max(0, cpu[1] - self._cpu_prev[1]),
            })
        self._cpu_prev = cpu
        self._last_ns = now_ns
        self._last = now

    def _count_rows(self, start_ns: int, interval_ns: int) -> None:
        s = self.tracer.session
        waits = []
        for key, val in s.items("host_counts"):
            k = (int(key.kind), int(key.tgid), int(key.detail), bytes(key.comm))
            count, total = int(val.count), int(val.total_ns)
            if k[0] == abi.HOST_CPU_WAIT:  # the waits that began in one slot, then gone
                self.rows.append({
                    "ts_ns": k[2], "interval_ns": max(abi.WAIT_BUCKET_NS, total), "tgid": k[1],
                    "kind": "cpu_wait", "detail": host_detail(k[0], k[2], k[3]),
                    "count": count, "total_ns": total,
                })
                waits.append(key)
                continue
            pc, pt = self._prev.get(k, (0, 0))
            self._prev[k] = (count, total)
            if count <= pc:
                continue
            kind = abi.HOST_KINDS.get(k[0])
            if kind is None:
                continue
            oom = k[0] == abi.HOST_OOM
            self.rows.append({
                "ts_ns": k[2] if oom else start_ns,
                "interval_ns": 0 if oom else interval_ns,
                "tgid": k[1], "kind": kind, "detail": host_detail(k[0], k[2], k[3]),
                "count": count - pc, "total_ns": total - pt,
            })
        s.delete_keys("host_counts", waits)

    def _offcpu_rows(self, start_ns: int, interval_ns: int, now_ns: int) -> None:
        tr = self.tracer
        s = tr.session
        gone = []
        for tid_key, e in s.items("offcpu"):
            tid, tgid = int(tid_key), int(e.tgid)
            state = thread_state(tgid, tid, tr.opts.proc_root)
            if state is None:
                gone.append(tid_key)  # the thread is gone
                continue
            if state in ("R",):  # running again since it last blocked
                continue
            walked = (int(e.stack_ns), int(e.site))
            last = self._frames.get(tid)
            if last is not None and last[0] == walked:
                functions, modules = last[1]  # the same stacks as the last drain named
            else:
                functions, modules = self.offcpu_frames(tgid, e)
                self._frames[tid] = (walked, (functions, modules))
            tr.stack_rows.append({
                "ts_ns": start_ns, "interval_ns": interval_ns, "tgid": tgid, "tid": tid,
                "rank": tr.ctx.rank_of.get(tgid), "thread": e.comm.decode("utf-8", "replace"),
                "count": 0, "functions": functions, "modules": modules,
                "state": "off_cpu", "blocked_ns": max(0, now_ns - int(e.ts_ns)),
            })
        s.delete_keys("offcpu", gone)
        for tid_key in gone:
            self._frames.pop(int(tid_key), None)

    def offcpu_frames(self, tgid: int, e: abi.OffCpu) -> tuple[list[str], list[str]]:
        """Kernel frames, then user frames (leaf first), as on-CPU rows have them. When the
        user leaf is in a shared library (a frameless libc wrapper such as pause or a futex
        wait), its caller's return address is not on the frame-pointer chain: the first
        word at the user sp that lands in a function of the program (not a .so) and is not
        already the next frame is inserted after the leaf."""
        s = self.tracer.session
        sym = self.tracer.symbolizer
        functions: list[str] = []
        modules: list[str] = []
        for addr in list(e.kernel)[: max(0, e.kernel_len) // 8]:
            if addr:
                functions.append(s.ksym(addr))
                modules.append("[kernel]")
        user: list[tuple[str, str]] = [sym.frame(tgid, addr)
                                       for addr in list(e.user)[: max(0, e.user_len) // 8]
                                       if addr]
        if user and ".so" in user[0][1] and e.scan_len > 0:
            for word in list(e.scan)[: e.scan_len // 8]:
                mod, fn = sym.symbolize(tgid, word)
                if fn and ".so" not in mod and mod != "[unknown]":
                    if len(user) < 2 or user[1][0] != fn:
                        user.insert(1, (fn, mod))
                    break
        for fn, mod in user:
            functions.append(fn)
            modules.append(mod)
        return functions, modules

    def take(self) -> pl.DataFrame:
        """The host rows not drained yet (they leave the channel), ranks as known now."""
        rows, self.rows = self.rows, []
        return self.frame(rows)

    def frame(self, rows: list[dict] | None = None) -> pl.DataFrame:
        rows = self.rows if rows is None else rows
        rank_of = self.tracer.ctx.rank_of
        rows = [{**r, "rank": rank_of.get(r["tgid"])} for r in rows]
        return pl.DataFrame(rows, schema=schema.HOST_SCHEMA) if rows else schema.empty_host()

    def manifest(self) -> dict:
        return {"host_context": {"enabled": self.on, "tracepoints": dict(self.status)}}
