"""Which processes on the node are training ranks, and which job each belongs to.

`Scanner.scan()` lists /proc, and for each process not seen before (a PID is keyed with its
start time, so a reused PID is a new process) reads its mapped libraries; a process that
maps nothing interesting yet is looked at again on the next scans for `PENDING_S` (ranks
that import torch a few seconds after exec). A child of a rank with the same rank identity
(a DataLoader worker, `procfs.worker_of`) is not a rank: it is never traced (its data
loading shows in the rank as the wait for the next batch, `host_gap`). `job_key()` groups
ranks into jobs by what
launchers and schedulers leave in the allowlisted environment, never mixing two jobs:

1. SLURM_JOB_ID (unique in the cluster) -> `slurm-<id>`
2. TORCHELASTIC_RUN_ID (unless torchrun's default "none") -> `torchelastic-<id>` + net ns
3. MASTER_ADDR:MASTER_PORT -> `master-<addr>-<port>` + net ns (a port is bound once per
   network namespace, so two containers using 29500 are two jobs)
4. POD_NAMESPACE/POD_NAME -> `pod-<ns>-<name>`
5. a rank (a rank variable set: RANK, OMPI_COMM_WORLD_RANK, PMI_RANK, ...) -> its launcher,
   `launcher-<pid>-<start time>`: the nearest ancestor that is not the same rank (a plain
   shell loop `RANK=$r python train.py &`, mpirun's orted, a Python launcher's parent).
   Ancestors with the same rank are wrappers of it (`bash -c`, `numactl`); pid 1 is no
   launcher. A plain launcher's ranks share nothing else that is theirs alone: their
   cgroup is the login session's, shared with every other job started from it.
6. the cgroup path (/proc/PID/cgroup) -> `cgroup-<path>`
7. else the process alone -> `pid-<tgid>`
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from argus.collect import procfs
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


def _start_time(tgid: int, proc_root: str) -> int | None:
    try:
        raw = Path(proc_root, str(tgid), "stat").read_bytes()
        return int(raw.rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _netns(tgid: int, proc_root: str) -> str:
    try:
        return os.readlink(Path(proc_root, str(tgid), "ns", "net")).strip("net:[]")
    except OSError:
        return "?"


def cgroup_path(tgid: int, proc_root: str = "/proc") -> str | None:
    """The process's cgroup (v2 unified path, else the first v1 line's path)."""
    try:
        lines = Path(proc_root, str(tgid), "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:] or None
    return lines[0].split(":", 2)[2] if lines and lines[0].count(":") >= 2 else None


_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


def _slug(s: str) -> str:
    return _SLUG.sub("_", s).strip("_")[:120] or "_"


def job_key(tgid: int, env: dict[str, str], proc_root: str = "/proc") -> str:
    """The job a rank belongs to (see the module doc); a filesystem-safe string."""
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{_slug(env['SLURM_JOB_ID'])}"
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchelastic-{_slug(run_id)}-ns{_netns(tgid, proc_root)}"
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return (
            f"master-{_slug(env['MASTER_ADDR'])}-{_slug(env['MASTER_PORT'])}"
            f"-ns{_netns(tgid, proc_root)}"
        )
    if env.get("POD_NAME"):
        return f"pod-{_slug(env.get('POD_NAMESPACE', 'default'))}-{_slug(env['POD_NAME'])}"
    launcher = _launcher(tgid, env, proc_root)
    if launcher is not None:
        return f"launcher-{launcher[0]}-{launcher[1]}"
    cg = cgroup_path(tgid, proc_root)
    if cg and cg != "/":
        return f"cgroup-{_slug(cg)}"
    return f"pid-{tgid}"


def _launcher(tgid: int, env: dict[str, str], proc_root: str) -> tuple[int, int] | None:
    """(pid, start time) of the process that launched this rank (rule 5), else None."""
    rank = procfs.rank_of_env(env)
    if rank is None:
        return None
    pid = tgid
    for _ in range(16):  # wrappers are few; a loop in a fake /proc must still end
        try:
            ppid = procfs.parent(pid, proc_root)
        except (TargetNotFound, OSError):
            return None
        if ppid is None or ppid <= 1:
            return None
        try:
            theirs = procfs.rank_identity(ppid, proc_root)["rank"]
        except (TargetNotFound, OSError):
            return None
        if theirs != rank:
            start = _start_time(ppid, proc_root)
            return None if start is None else (ppid, start)
        pid = ppid
    return None


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
            start = _start_time(tgid, self.proc_root)
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
            ident = procfs.rank_identity(tgid, self.proc_root)
        except (TargetNotFound, OSError):
            return None
        if ident["rank"] is None and _is_launcher(tgid, self.proc_root):
            return None  # torchrun maps libtorch but only starts ranks: its ranks are found
        if procfs.worker_of(tgid, self.proc_root) is not None:
            return None  # a DataLoader worker of a rank (same RANK, forked): not a rank
        return Found(tgid, comm, exe, job_key(tgid, ident["env"], self.proc_root), ident["rank"])


def _is_launcher(tgid: int, proc_root: str) -> bool:
    from argus.collect.targets import is_rank_launcher  # the same rule as `argus attach`

    return is_rank_launcher(tgid, proc_root)
