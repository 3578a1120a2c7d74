"""Which processes on the node are training ranks, and which job each belongs to.

`Scanner.scan()` lists /proc, and for each process not seen before (a PID is keyed with its
start time, so a reused PID is a new process) reads its mapped libraries; a process that
maps nothing interesting yet is looked at again on the next scans for `PENDING_S` (ranks
that import torch a few seconds after exec). A child of a rank with the same rank identity
(a DataLoader worker, `identity.worker_of`) is not a rank: it is never traced (its data
loading shows in the rank as the wait for the next batch, `host_gap`). Which job a rank
belongs to is `argus.collect.identity.job_key()` (the same grouping as `argus top PID`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from argus.collect import identity, procfs
from argus.collect.identity import job_key
from argus.daemon.config import DaemonConfig
from argus.errors import TargetNotFound

PENDING_S = 60.0  # how long a new non-training process is re-checked for late libraries


@dataclass
class Found:
    tgid: int
    comm: str
    exe: str | None
    job: str
    rank: int | None


class Scanner:
    """New training processes on the node, per the config (see the module doc)."""

    def __init__(self, config: DaemonConfig, proc_root: str = "/proc"):
        self.config = config
        self.proc_root = proc_root
        self.seen: dict[int, int | None] = {}  # tgid -> start time, decided
        self.pending: dict[int, tuple[int | None, float]] = {}  # tgid -> (start, first seen)
        self.me = os.getpid()

    def reset(self) -> None:
        """Look at every process again (after a config reload)."""
        self.seen.clear()
        self.pending.clear()

    def scan(self) -> list[Found]:
        now = time.monotonic()
        alive: set[int] = set()
        found: list[Found] = []
        for name in os.listdir(self.proc_root):
            if not name.isdigit():
                continue
            tgid = int(name)
            alive.add(tgid)
            if tgid == self.me:
                continue
            start = identity.start_time(tgid, self.proc_root)
            if tgid in self.seen and self.seen[tgid] == start:
                continue
            first = self.pending.get(tgid)
            if first is not None and first[0] != start:
                first = None
            f = self._look(tgid)
            if f is not None:
                found.append(f)
                self.seen[tgid] = start
                self.pending.pop(tgid, None)
            elif first is None:
                self.pending[tgid] = (start, now)
            elif now - first[1] > PENDING_S:
                self.seen[tgid] = start
                self.pending.pop(tgid, None)
        for tgid in list(self.seen):
            if tgid not in alive:
                del self.seen[tgid]
        for tgid in list(self.pending):
            if tgid not in alive:
                del self.pending[tgid]
        return found

    def _look(self, tgid: int) -> Found | None:
        try:
            libs = procfs.mapped_libraries(tgid, self.proc_root)
            comm = procfs.comm(tgid, self.proc_root)
            exe = procfs.exe(tgid, self.proc_root)
            if not self.config.wants(comm, exe, procfs.is_training_process(libs)):
                return None
            ident = identity.rank_identity(tgid, self.proc_root)
        except (TargetNotFound, OSError):
            return None
        if ident["rank"] is None and _is_launcher(tgid, self.proc_root):
            return None  # torchrun maps libtorch but only starts ranks: its ranks are found
        if identity.worker_of(tgid, self.proc_root) is not None:
            return None  # a DataLoader worker of a rank (same RANK, forked): not a rank
        return Found(tgid, comm, exe, job_key(tgid, ident["env"], self.proc_root), ident["rank"])


def _is_launcher(tgid: int, proc_root: str) -> bool:
    from argus.collect.targets import is_rank_launcher  # the same rule as `argus attach`

    return is_rank_launcher(tgid, proc_root)
