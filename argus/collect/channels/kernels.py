"""The kernels channel: device times from argus's GPU agent (argus.collect.gpu_agent).

No BPF side. A job started with `argus gpu-env`'s variables has one shared file per
process, /dev/shm/argus-gpu-<tgid> (cuda_probes/agent/argus_gpu_ring.h). For each traced
rank (ranks that start later too: `on_traced` runs at every scan of a traced process) the
channel looks for that file; once the process maps it (the inode in /proc/PID/maps: a stale
file of a dead process with the same pid is never read) it drains what an earlier reader
left (records from before this session), sets `enabled` (the agent switches NCCL's profiler
mask and CUPTI's activity kinds on within ~100 ms and acknowledges in `active`), and from
then on drains the ring every DRAIN_S, at most one ring's worth per process per poll.
Records become KERNELS_SCHEMA rows (`gpu_agent.kernel_rows`), the device times moved to the
node's CLOCK_MONOTONIC by the offset the agent measured at enable.

At the end (`finish`, also `close` on every other way out): a last drain, `enabled` = 0 on
every ring (the agent goes dormant again; `active` back to 0 is awaited, bounded), a drain
of what its switch-off flushed, the mappings closed. A rank that exits or execs is drained
at once (the mapping outlives the agent's unlink). The manifest part is
`kernels: {enabled, agents: {tgid: {rank, loaded, active, records, dropped, cupti_dropped,
nccl_version, clock}}}` for every traced rank (loaded [] where no agent was found).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import polars as pl

from argus.collect import gpu_agent as ga
from argus.collect.channels.base import Channel
from argus.errors import ArgusError
from argus.recording import schema

DRAIN_S = 0.2  # the agent flushes CUPTI every 100 ms: records reach the ring that often
DISABLE_WAIT_S = 1.0  # at the end, how long the agents get to acknowledge `enabled` = 0


@dataclass
class Agent:
    """One traced process's agent, as this session saw it."""

    tgid: int
    ring: ga.GpuAgentRing | None = None
    loaded: int = 0
    active: int = 0  # every ACTIVE_* bit seen during the session
    records: int = 0
    dropped0: int = 0  # the counters when the session opened the ring (earlier sessions')
    cupti0: int = 0
    dropped: int = 0
    cupti_dropped: int = 0
    nccl_version: int | None = None
    clock: dict = field(default_factory=dict)
    stale_dropped: int = 0  # records left by an earlier reader, drained unread at open
    taken_over: bool = False  # `enabled` was already set (another reader, or a killed one)

    def header(self) -> None:
        """Refresh what the header says (drops since open, what is switched on)."""
        r = self.ring
        if r is None:
            return
        self.loaded = r.loaded
        self.active |= r.active
        self.dropped = r.header("dropped") - self.dropped0
        self.cupti_dropped = r.header("cupti_dropped") - self.cupti0
        self.nccl_version = r.header("nccl_version")
        self.clock = {"source": ga.CLOCK_SOURCES.get(r.header("clock_source"), "none"),
                      "offset_ns": r.header("clock_offset_ns"),
                      "error_ns": r.header("clock_error_ns")}

    def describe(self, rank: int | None) -> dict:
        out = {"rank": rank, "loaded": ga.bit_names(self.loaded),
               "active": ga.bit_names(self.active),
               "records": self.records, "dropped": self.dropped,
               "cupti_dropped": self.cupti_dropped, "nccl_version": self.nccl_version}
        if self.ring is not None or self.clock:
            out["clock"] = self.clock
        if self.stale_dropped:
            out["stale_dropped"] = self.stale_dropped
        if self.taken_over:
            out["note"] = ("the agent was already enabled when argus opened it (another "
                           "reader, or one that was killed): argus took it over")
        return out


class KernelsChannel(Channel):
    name = "kernels"
    switches = {"kernels": "Do not read device kernel times from argus's GPU agent (jobs "
                           "started with `argus gpu-env`); the agent stays dormant."}
    context_only = True  # device times need the calls' steps and collectives to explain

    def __init__(self, tracer):
        super().__init__(tracer)
        self.agents: dict[int, Agent] = {}
        self.frames: list[pl.DataFrame] = []  # rows not taken yet
        self.max_per_poll: int | None = None  # records per process per poll (None: a ring)
        self._last = 0.0
        self.drain_s_total = 0.0  # CPU s of this thread draining and converting (its cost)

    # -- finding and switching agents ----------------------------------------------------
    def on_traced(self, target) -> None:
        a = self.agents.get(target.tgid)
        if a is None:
            a = self.agents[target.tgid] = Agent(target.tgid)
        if a.ring is None:
            self._open(a)

    def _open(self, a: Agent) -> None:
        if ga.owned_file(a.tgid, self.tracer.opts.proc_root) is None:
            return
        try:
            ring = ga.GpuAgentRing.open(a.tgid)
        except ArgusError:  # being made (its magic is stored last), or another version
            return
        a.ring = ring
        a.taken_over = bool(ring.header("enabled"))
        while (n := len(ring.read_batch())):  # an earlier reader's leftovers
            a.stale_dropped += n
        a.dropped0, a.cupti0 = ring.header("dropped"), ring.header("cupti_dropped")
        ring.enable()
        a.header()

    def _drain(self, a: Agent, limit: int | None) -> None:
        ring = a.ring
        if ring is None:
            return
        t0 = time.thread_time()
        a.header()
        # the offset is stored before `active`: records of a ring not acknowledged yet wait
        if a.active or limit is None:
            while True:
                batch = ring.read_batch(limit)
                if len(batch):
                    a.records += len(batch)
                    rank = self.tracer.ctx.rank_of.get(a.tgid)
                    offset = a.clock.get("offset_ns", 0) if a.clock.get("source") != "none" else 0
                    self.frames.append(ga.kernel_rows(ga.batch_frame(batch, a.tgid), rank,
                                                      offset))
                if limit is not None or len(batch) < ring.capacity:
                    break
        self.drain_s_total += time.thread_time() - t0

    def poll(self, now: float) -> None:
        if now - self._last < DRAIN_S:
            return
        self._last = now
        for a in self.agents.values():
            self._drain(a, self.max_per_poll or (a.ring.capacity if a.ring else None))

    def on_gone(self, target) -> None:
        """Exited or exec'd: its last records (the mapping outlives the agent's unlink)."""
        a = self.agents.get(target.tgid)
        if a is not None and a.ring is not None:
            self._drain(a, None)
            a.ring.disable()  # the file can outlive it (a SIGKILL skips the unlink): dormant
            a.ring.close()
            a.ring = None

    def finish(self) -> None:
        self.close()

    def close(self) -> None:
        """Every agent dormant again, its last records read, its mapping closed (any way
        out of a session; idempotent)."""
        live = [a for a in self.agents.values() if a.ring is not None]
        for a in live:
            self._drain(a, None)
            a.ring.disable()
        deadline = time.monotonic() + DISABLE_WAIT_S
        for a in live:
            while a.ring.active and time.monotonic() < deadline and ga.shm_path(a.tgid).exists():
                time.sleep(0.005)
            self._drain(a, None)  # what the switch-off flushed
            a.ring.close()
            a.ring = None

    def forget(self, tgids: set[int]) -> None:
        for t in tgids:
            a = self.agents.pop(t, None)
            if a is not None and a.ring is not None:
                a.ring.close()

    # -- rows and manifest ---------------------------------------------------------------
    def take(self) -> pl.DataFrame | None:
        """The rows since the last take (they leave the channel), ranks as known now; None
        when the channel is off or no agent was found."""
        frames, self.frames = self.frames, []
        if not self.on or not any(a.loaded or a.records for a in self.agents.values()):
            return None
        if not frames:
            return schema.empty_kernels()
        rank_of = self.tracer.ctx.rank_of
        out = pl.concat(frames, how="vertical")
        if rank_of:
            known = pl.col("tgid").replace_strict(rank_of, default=None, return_dtype=pl.Int32)
            out = out.with_columns(pl.coalesce(known, pl.col("rank")).alias("rank"))
        return out

    def manifest(self) -> dict:
        agents = {}
        if self.on:
            for t in sorted(self.tracer.targets.values(), key=lambda t: t.tgid):
                if t.traced:
                    a = self.agents.get(t.tgid) or Agent(t.tgid)
                    agents[str(t.tgid)] = a.describe(t.rank)
        return {"kernels": {"enabled": self.on, "agents": agents}}
