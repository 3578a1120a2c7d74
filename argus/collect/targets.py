"""Targets: the processes a session watches, and the rules that say which are ranks.

- `Target`: one watched process (a rank, a launcher, a launcher's child that is neither
  yet) and what was learnt of it (rank identity, mapped libraries, probes placed);
  `Attached`: the probes placed in one process for one library file.
- `plan_targets`: the PIDs a user named -> [(tgid, is_launcher)], refusing argus itself
  and a process that maps no probed library and has no children.
- `is_rank_launcher`: a process that maps PyTorch but only starts ranks (torchrun, python -m
  torch.distributed.run): watched for its ranks, never probed itself. The one rule
  `argus attach` and `argus daemon` (daemon/discovery.py) both apply.
- `is_argus`: this argus process (never traced, even when attached through a shell).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from argus.collect import abi, identity, procfs
from argus.errors import NotATrainingProcess, TargetNotFound

# torchrun imports torch, so it maps libtorch_cpu like its ranks: recognised by name.
LAUNCHER_NAMES = ("torchrun",)
LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch")


@dataclass
class Attached:
    """Probes placed in one process for one library file."""

    path: str
    host_path: str
    uprobes: list[tuple] = field(default_factory=list)  # keys of shared uprobes held
    keys: list[abi.ProbeKey] = field(default_factory=list)  # probe-table entries


@dataclass
class Target:
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
    attached: dict[str, Attached] = field(default_factory=dict)  # library path -> probes
    maps: list[procfs.Mapping] = field(default_factory=list)
    maps_text: str | None = None  # /proc/TGID/maps at the last full scan
    scanned_ns: int = 0  # monotonic time of the last scan that read the maps
    code: tuple[int, int] | None = None  # procfs.mapped_code as of that scan
    rank_launcher: bool = False  # maps PyTorch but only starts ranks (torchrun): never probed
    worker_of: int | None = None  # a rank's worker (DataLoader, same RANK): never probed

    def probe_count(self) -> int:
        """Probe-table entries (symbols probed) in this process."""
        return sum(len(a.keys) for a in self.attached.values())

    def identify(self, proc_root: str) -> None:
        """Now traced: its rank identity (an allowlist of the environment) and executable."""
        ident = identity.rank_identity(self.tgid, proc_root)
        if self.rank is None:
            self.rank = ident["rank"]
        self.local_rank, self.world_size = ident["local_rank"], ident["world_size"]
        self.env = ident["env"]
        self.exe = procfs.exe(self.tgid, proc_root)

    def comm_init(self, rank: int | None, nranks: int | None) -> bool:
        """A communicator init seen in this process: its rank when the environment did not
        say (MPI-style launchers without RANK). True when the rank was learnt here."""
        if rank is None or self.rank is not None:
            return False
        self.rank, self.world_size = rank, nranks
        return True

    def new_image(self) -> None:
        """After an exec: nothing of the old image's probes or maps holds."""
        self.attached.clear()
        self.traced = False
        self.rank_launcher = False
        self.maps_text = None

    def describe(self, host: str, cuda_device: int | None) -> dict:
        """The manifest's entry of a traced process."""
        return {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "tgid": self.tgid,
            "host": host,
            "exe": self.exe,
            "env": self.env,
            "cuda_device": cuda_device,  # last cudaSetDevice ordinal
            "exited": self.exited,
            "libraries": self.libraries,
        }


def rank_order(t: Target) -> tuple:
    """Ranks first in rank order, then processes of unknown rank by tgid."""
    return (t.rank is None, t.rank, t.tgid)


def is_argus(tgid: int) -> bool:
    """This argus process: never a target."""
    return tgid == os.getpid()


def is_rank_launcher(tgid: int, proc_root: str = "/proc") -> bool:
    """A process that starts ranks without being one: no rank in its own environment, and
    its command line is torchrun (or python -m torch.distributed.run/launch), or one of its
    children has a rank in its environment (the launcher set RANK for it)."""
    try:
        if identity.rank_identity(tgid, proc_root)["rank"] is not None:
            return False
        argv = procfs.cmdline(tgid, proc_root)
        if any(os.path.basename(a) in LAUNCHER_NAMES for a in argv[:2]):
            return True
        for i, a in enumerate(argv[:-1]):
            if a == "-m" and argv[i + 1] in LAUNCHER_MODULES:
                return True
        return any(
            identity.rank_identity(c, proc_root)["rank"] is not None
            for c in procfs.children(tgid, proc_root)
        )
    except (TargetNotFound, OSError):
        return False


def argus_ancestors(proc_root: str = "/proc") -> set[int]:
    """The processes above this argus process (its shell, the script or sudo that started
    it...), pid 1 excluded: never targets (`argus attach $$` is not a job)."""
    out: set[int] = set()
    pid = os.getpid()
    for _ in range(64):  # a loop in a fake /proc must still end
        try:
            pid = procfs.parent(pid, proc_root)
        except (TargetNotFound, OSError):
            break
        if pid is None or pid <= 1 or pid in out:
            break
        out.add(pid)
    return out


def check_exist(tgids: list[int], proc_root: str = "/proc") -> None:
    """Every PID names a process argus may trace: TargetNotFound (missing, other user, no
    permission), NotATrainingProcess for argus itself and for its own ancestors."""
    above = argus_ancestors(proc_root) if proc_root == "/proc" else set()
    for tgid in tgids:
        procfs.process_state(tgid, proc_root)  # raises TargetNotFound
        if is_argus(tgid):
            raise NotATrainingProcess(f"process {tgid} is this argus process itself")
        if tgid in above:
            name = procfs.comm(tgid, proc_root)
            raise NotATrainingProcess(
                f"process {tgid} ({name}) runs this argus process (its shell or script), so "
                f"it is no job and no rank was found there",
                "Give the PID of the job's launcher (torchrun, mpirun, srun, a job script "
                "started elsewhere) or of a rank; `argus doctor -p PID` says what a process "
                "maps.")


def plan_targets(tgids: list[int], proc_root: str = "/proc") -> list[tuple[int, bool]]:
    """[(tgid, is_launcher)]: a rank maps a probed library and is not a rank launcher; a
    launcher is a rank launcher or has children (its descendants are watched). Anything
    else raises NotATrainingProcess. Call `check_exist` first."""
    plan: list[tuple[int, bool]] = []
    for tgid in tgids:
        libs = procfs.mapped_libraries(tgid, proc_root)
        launcher = is_rank_launcher(tgid, proc_root)
        if procfs.is_training_process(libs) and not launcher:
            plan.append((tgid, False))
        elif launcher or procfs.children(tgid, proc_root):
            plan.append((tgid, True))
        else:
            name = procfs.comm(tgid, proc_root)
            raise NotATrainingProcess(
                f"process {tgid} ({name}) maps no CUDA, NCCL or PyTorch library and has "
                "no child processes: nothing to probe"
            )
    return plan


def new_process(tgid: int, proc_root: str = "/proc") -> bool:
    """A forked child that is a new process (not a thread) and not argus itself."""
    try:
        info = procfs.process_state(tgid, proc_root)
    except TargetNotFound:
        return False
    if info.tgid != tgid or is_argus(tgid):
        return False
    status = os.path.join(proc_root, str(tgid), "status")
    try:
        with open(status) as f:
            line = next(ln for ln in f.read().splitlines() if ln.startswith("Tgid:"))
        return int(line.split()[1]) == tgid
    except (OSError, StopIteration, ValueError):
        return False
