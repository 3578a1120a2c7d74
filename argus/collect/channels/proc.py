"""The proc channel (bpf/proc.bpf.c, always on): fork, exec and exit of watched processes.

Its ring buffer (proc_events) tells the session loop which children to watch (ranks that
start after attach), which images to probe again (exec) and which targets ended (exit);
the events of traced processes become `proc` rows of the events frame.
"""

from __future__ import annotations

import ctypes as ct

import polars as pl

from argus.collect import abi, features
from argus.collect.channels.base import Channel
from argus.collect.decode import rows_to_frame

TRACEPOINTS = {
    "sched:sched_process_fork": "argus_on_fork",
    "sched:sched_process_exec": "argus_on_exec",
    "sched:sched_process_exit": "argus_on_exit",
}
NAMES = {abi.PROC_FORK: "fork", abi.PROC_EXEC: "exec", abi.PROC_EXIT: "exit"}


class ProcChannel(Channel):
    name = "proc"
    always = True
    sources = ("proc.bpf.c",)

    def __init__(self, tracer):
        super().__init__(tracer)
        self.events: list[dict] = []  # not yet drained, in ring-buffer order

    def cflags(self) -> list[str]:
        off = features.fork_child_offset()
        return [] if off is None else [f"-DARGUS_TP_FORK_CHILD_PID_OFF={off}"]

    def attach(self, session) -> None:
        for tp, fn in TRACEPOINTS.items():
            session.attach_tracepoint(tp, fn)
        session.open_ring_buffer("proc_events", self._on_proc)

    def _on_proc(self, _ctx, data, size) -> None:
        e = ct.cast(data, ct.POINTER(abi.ProcEvent)).contents
        self.events.append(
            {"what": int(e.what), "ts_ns": int(e.ts_ns), "tgid": int(e.tgid),
             "child": int(e.child), "comm": e.comm.decode("utf-8", "replace")}
        )

    def take(self) -> list[dict]:
        """The events not drained yet; they leave the channel."""
        out, self.events = self.events, []
        return out

    def rows(self, procs: list[dict]) -> pl.DataFrame:
        """Lifecycle rows (fork of a traced process, exec, exit) of the proc ring buffer."""
        rank_of = self.tracer.ctx.rank_of
        targets = self.tracer.targets
        return rows_to_frame([
            {"ts_ns": e["ts_ns"], "tgid": e["tgid"] if e["what"] != abi.PROC_FORK else e["child"],
             "tid": e["tgid"], "rank": rank_of.get(e["tgid"]), "channel": self.name,
             "name": NAMES[e["what"]], "in_flight": False}
            for e in procs
            if e["what"] != abi.PROC_FORK or e["child"] in targets
        ])
