"""Rank identity of a process: which rank it is, from the allowlisted environment only.

Security: `rank_identity` parses /proc/PID/environ and keeps only `ENV_ALLOWLIST`; nothing
else from the environment is returned, stored or logged. `worker_of` tells a rank's
workers (DataLoader, compile workers: the same identity as their parent rank) from ranks.
`job_key()` groups ranks into jobs (for the daemon and `argus top`) by what launchers and
schedulers leave in the allowlisted environment, never mixing two jobs:

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
from pathlib import Path

from argus.collect.procfs import is_training_process, mapped_libraries, parent, read_proc
from argus.errors import TargetNotFound

# The only environment variables argus ever reads. Nothing else leaves /proc/TGID/environ.
ENV_ALLOWLIST: tuple[str, ...] = (
    # torch.distributed / torchrun
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "CUDA_VISIBLE_DEVICES",
    # Slurm
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_NODEID",
    # Open MPI / PMI
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    # Kubernetes (downward API names used by the Kubeflow training operator and friends)
    "POD_NAME",
    "POD_NAMESPACE",
)

# Where each identity field comes from, first present wins.
_RANK_KEYS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
_LOCAL_RANK_KEYS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
_WORLD_SIZE_KEYS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")

_MAX_VALUE_CHARS = 256


def parse_environ(raw: bytes, allowlist: tuple[str, ...] = ENV_ALLOWLIST) -> dict[str, str]:
    """Allowlisted NAME=value pairs of a NUL-separated environ block; all others dropped."""
    allowed = set(allowlist)
    out: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if not sep:
            continue
        key = name.decode("ascii", "replace")
        if key in allowed:
            out[key] = value.decode("utf-8", "replace")[:_MAX_VALUE_CHARS]
    return out


def _first_int(env: dict[str, str], keys: tuple[str, ...]) -> tuple[int | None, str | None]:
    for key in keys:
        value = env.get(key)
        if value is None:
            continue
        try:
            return int(value.strip()), key
        except ValueError:
            continue
    return None, None


def rank_of_env(env: dict[str, str]) -> int | None:
    """The rank an allowlisted environment names (see rank_identity), else None."""
    return _first_int(env, _RANK_KEYS)[0]


def rank_identity(tgid: int, proc_root: str | os.PathLike[str] = "/proc") -> dict[str, object]:
    """The rank identity of a process, from the allowlisted part of its environment only.

    Returns {"rank", "local_rank", "world_size": int or None, "source": the variable the
    rank came from or None, "env": {name: value} for names in ENV_ALLOWLIST}. The rank is
    the first integer of RANK, OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID (torchrun's RANK
    wins over the Slurm task id of the launcher); likewise for local rank and world size.
    /proc/TGID/environ is the environment at exec time.
    """
    env = parse_environ(read_proc(tgid, "environ", proc_root))
    rank, source = _first_int(env, _RANK_KEYS)
    local_rank, _ = _first_int(env, _LOCAL_RANK_KEYS)
    world_size, _ = _first_int(env, _WORLD_SIZE_KEYS)
    return {
        "rank": rank,
        "local_rank": local_rank,
        "world_size": world_size,
        "source": source,
        "env": env,
    }



def worker_of(tgid: int, proc_root: str | os.PathLike[str] = "/proc") -> int | None:
    """The rank process this one is a worker of, else None.

    A process is a worker of its parent when both have the same rank identity (a rank, and
    the same rank / local rank / world size from the allowlisted environment) and the parent
    itself maps the training libraries: PyTorch DataLoader workers (forked, or spawned with
    the environment inherited), a rank's compile workers. They are not ranks: tracing them
    as such would make a second rank with the same number. A rank started by a wrapper
    (a shell script with RANK set running python) is still a rank: the wrapper maps no
    training library. A rank whose parent is a training process with the same RANK (a
    Python launcher that set its own RANK and runs the trainer as a child) is taken for a
    worker: a limit, docs/daemon.md."""
    try:
        mine = rank_identity(tgid, proc_root)
        if mine["rank"] is None:
            return None
        ppid = parent(tgid, proc_root)
        if ppid is None or ppid <= 1:
            return None
        theirs = rank_identity(ppid, proc_root)
        same = all(mine[k] == theirs[k] for k in ("rank", "local_rank", "world_size"))
        if not same or not is_training_process(mapped_libraries(ppid, proc_root)):
            return None
    except (TargetNotFound, OSError):
        return None
    return ppid


def start_time(tgid: int, proc_root: str) -> int | None:
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
    rank = rank_of_env(env)
    if rank is None:
        return None
    pid = tgid
    for _ in range(16):  # wrappers are few; a loop in a fake /proc must still end
        try:
            ppid = parent(pid, proc_root)
        except (TargetNotFound, OSError):
            return None
        if ppid is None or ppid <= 1:
            return None
        try:
            theirs = rank_identity(ppid, proc_root)["rank"]
        except (TargetNotFound, OSError):
            return None
        if theirs != rank:
            start = start_time(ppid, proc_root)
            return None if start is None else (ppid, start)
        pid = ppid
    return None
