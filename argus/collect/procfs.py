"""Process inspection through /proc: does a target exist, what it is, what it maps.

Every function takes `proc_root` (default "/proc") so tests can build a fake /proc tree.
Security: only what argus needs is read. The rank identity (the allowlisted environment)
lives in argus.collect.identity.
`cmdline` returns the raw argv for launcher discovery only: never record or print it whole
(command lines can carry secrets).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from argus.errors import TargetNotFound

# ---------------------------------------------------------------------------------------------
# Reading files. One indirection so tests can fake EACCES (tests run as root here, where
# chmod 000 does not stop a read).

Reader = Callable[[Path], bytes]


def _read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


_read: Reader = _read_file


def _pdir(tgid: int, proc_root: str | os.PathLike[str]) -> Path:
    return Path(proc_root) / str(int(tgid))


def _missing(tgid: int) -> TargetNotFound:
    err = TargetNotFound(
        f"no process with PID {tgid}",
        remedy="Check the PID with `ps -p PID` (the process may have exited).",
    )
    err.reason = "missing"  # type: ignore[attr-defined]
    return err


def read_proc(tgid: int, name: str, proc_root: str | os.PathLike[str]) -> bytes:
    """Read /proc/TGID/NAME; a vanished process becomes TargetNotFound(reason="missing")."""
    try:
        return _read(_pdir(tgid, proc_root) / name)
    except FileNotFoundError as e:
        raise _missing(tgid) from e
    except ProcessLookupError as e:  # ESRCH: exited between open and read
        raise _missing(tgid) from e


# ---------------------------------------------------------------------------------------------
# Process state

Access = Literal["readable", "other_user", "no_permission"]


@dataclass(frozen=True)
class ProcessInfo:
    """What /proc says about one process, as far as argus needs it.

    `access` is "readable" when its maps and environ can be read (so it can be traced),
    "other_user" when it belongs to another user and we are not root, "no_permission"
    when it is ours (or we are root) and the kernel still refuses (a non-dumpable process,
    Yama ptrace_scope, a hidepid mount, an LSM).
    """

    tgid: int
    comm: str
    uid: int  # real uid of the process owner
    ppid: int
    access: Access


def _status_fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def process_state(
    tgid: int, proc_root: str | os.PathLike[str] = "/proc", euid: int | None = None
) -> ProcessInfo:
    """Tell apart a missing process, one we may not inspect, and one we can trace.

    Reads /proc/TGID/status (owner uid, ppid, name) and then tries to read /proc/TGID/maps
    and /proc/TGID/environ, which the kernel guards with a ptrace-read check. Raises
    `TargetNotFound` (with `.reason` "missing", "other_user" or "no_permission") unless the
    process exists and is readable; otherwise returns its `ProcessInfo`.
    """
    if tgid <= 0:
        raise _missing(tgid)
    euid = os.geteuid() if euid is None else euid
    try:
        status = _status_fields(read_proc(tgid, "status", proc_root).decode("utf-8", "replace"))
    except PermissionError as e:  # hidepid=1 style mounts
        raise _access_error(tgid, "no_permission", None) from e
    if status.get("Tgid") and status["Tgid"] != str(tgid):
        # A thread id, not a process: /proc/TID exists but is hidden from listings.
        err = TargetNotFound(
            f"PID {tgid} is a thread of process {status['Tgid']}, not a process",
            remedy=f"Use the process id instead: `argus doctor -p {status['Tgid']}`.",
        )
        err.reason = "missing"  # type: ignore[attr-defined]
        raise err
    if status.get("State", "")[:1] in ("Z", "X"):
        # A zombie (exited, not reaped yet): its entry stays, but nothing is left to trace.
        err = _missing(tgid)
        err.message = f"process {tgid} has exited (a zombie its parent has not reaped yet)"
        err.args = (err.message,)
        raise err
    uid = int(status.get("Uid", "-1").split()[0]) if status.get("Uid") else -1
    ppid = int(status.get("PPid", "0") or 0)
    comm_name = status.get("Name", "")
    access: Access = "readable"
    for name in ("maps", "environ"):
        try:
            read_proc(tgid, name, proc_root)
        except PermissionError:
            access = "other_user" if (euid != 0 and uid != euid) else "no_permission"
            break
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                access = "other_user" if (euid != 0 and uid != euid) else "no_permission"
                break
            raise
    info = ProcessInfo(tgid=tgid, comm=comm_name, uid=uid, ppid=ppid, access=access)
    if access != "readable":
        raise _access_error(tgid, access, uid)
    return info


def state(tgid: int, proc_root: str | os.PathLike[str] = "/proc") -> str | None:
    """The state letter of /proc/TGID/stat (R, S, D, Z, X, ...); None when the entry is gone."""
    try:
        text = _read(_pdir(tgid, proc_root) / "stat").decode("utf-8", "replace")
    except OSError:
        return None
    rest = text[text.rfind(")") + 1 :].split()
    return rest[0] if rest else None


def cpu_times(proc_root: str | os.PathLike[str] = "/proc") -> tuple[int, int] | None:
    """The node's CPU time so far, all CPUs, from /proc/stat's `cpu` line, in ns: (all of it,
    steal). Steal is the time a hypervisor ran something else while one of this VM's vCPUs
    had work: its tasks run slower without waiting runnable. None when unreadable."""
    try:
        with open(Path(proc_root) / "stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != b"cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    ns = 1_000_000_000 // (os.sysconf("SC_CLK_TCK") or 100)
    return sum(ticks) * ns, ticks[7] * ns


def alive(tgid: int, proc_root: str | os.PathLike[str] = "/proc") -> bool:
    """False when the process is gone: its /proc entry is missing, or it is a zombie (Z) or
    dead (X) whose parent has not reaped it yet (its entry stays, with nothing left to
    trace: no maps, no threads running)."""
    return state(tgid, proc_root) not in (None, "Z", "X", "x")


def mapped_code(tgid: int, proc_root: str | os.PathLike[str] = "/proc") -> tuple[int, int] | None:
    """(VmExe, VmLib) of /proc/TGID/status, in kB: the size of the program's and of the
    libraries' executable mappings. Loading or unloading a library changes them; anonymous
    memory (allocations) does not, so a caller compares them to read /proc/TGID/maps (a
    line per mapping, ~0.4 ms for a torch rank's ~340) only when they moved. Reading them
    costs the same for any number of mappings. None when the process is gone or a zombie."""
    try:
        text = _read(_pdir(tgid, proc_root) / "status")
    except OSError:
        return None
    exe = lib = None
    for line in text.splitlines():
        if line.startswith(b"VmExe:"):
            exe = int(line.split()[1])
        elif line.startswith(b"VmLib:"):
            lib = int(line.split()[1])
            break
    return None if exe is None or lib is None else (exe, lib)


def exited_error(tgid: int) -> TargetNotFound:
    """A target that was there when argus started and is gone now."""
    err = TargetNotFound(
        f"process {tgid} exited while argus was starting",
        remedy="Attach to a process that is still running (`ps -p PID`); a job attached "
        "through its launcher keeps being traced while the launcher runs.",
    )
    err.reason = "exited"  # type: ignore[attr-defined]
    return err


def _access_error(tgid: int, access: Access, uid: int | None) -> TargetNotFound:
    if access == "other_user":
        err = TargetNotFound(
            f"process {tgid} belongs to another user (uid {uid}) and cannot be inspected "
            "without root",
            remedy="Run argus as root (sudo argus ...) to trace another user's process.",
        )
    else:
        err = TargetNotFound(
            f"process {tgid} exists but the kernel refuses to let argus read its memory maps "
            "(not dumpable, Yama ptrace_scope, hidepid or a security module)",
            remedy="Run as root with CAP_SYS_PTRACE, or check kernel.yama.ptrace_scope and "
            "the /proc mount options.",
        )
    err.reason = access  # type: ignore[attr-defined]
    return err


# ---------------------------------------------------------------------------------------------
# Small accessors the collector uses for launcher discovery


def comm(tgid: int, proc_root: str | os.PathLike[str] = "/proc") -> str:
    """The process name (/proc/TGID/comm, at most 15 characters)."""
    return read_proc(tgid, "comm", proc_root).decode("utf-8", "replace").rstrip("\n")


def exe(tgid: int, proc_root: str | os.PathLike[str] = "/proc") -> str | None:
    """The executable path (readlink /proc/TGID/exe); None for kernel threads or no access."""
    link = _pdir(tgid, proc_root) / "exe"
    try:
        return os.readlink(link)
    except FileNotFoundError:
        if not _pdir(tgid, proc_root).exists():
            raise _missing(tgid) from None
        return None
    except OSError:
        return None


def cmdline(tgid: int, proc_root: str | os.PathLike[str] = "/proc") -> list[str]:
    """argv of the process (NUL-separated /proc/TGID/cmdline).

    For launcher discovery (is this torchrun?) only: never print or record it whole.
    """
    raw = read_proc(tgid, "cmdline", proc_root)
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a] if raw else []


def _stat_ppid(raw: bytes) -> int | None:
    # "pid (comm with ) maybe) S ppid ...": the name may contain ')' so split on the last one.
    text = raw.decode("utf-8", "replace")
    rest = text[text.rfind(")") + 1 :].split()
    if len(rest) < 2:
        return None
    try:
        return int(rest[1])
    except ValueError:
        return None


def children(tgid: int, proc_root: str | os.PathLike[str] = "/proc") -> list[int]:
    """Direct child processes (tgids), sorted.

    Reads /proc/TGID/task/*/children (CONFIG_PROC_CHILDREN); without it, scans the ppid
    field of every /proc/*/stat.
    """
    pdir = _pdir(tgid, proc_root)
    if not pdir.exists():
        raise _missing(tgid)
    found: set[int] = set()
    task_dir = pdir / "task"
    have_children_files = False
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        tasks = []
    for task in tasks:
        try:
            raw = _read(task / "children")
        except OSError:
            continue
        have_children_files = True
        found.update(int(x) for x in raw.split() if x.isdigit())
    if have_children_files:
        return sorted(found)
    for entry in Path(proc_root).iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = _stat_ppid(_read(entry / "stat"))
        except OSError:
            continue
        if ppid == tgid:
            found.add(int(entry.name))
    return sorted(found)


def descendants(tgid: int, proc_root: str | os.PathLike[str] = "/proc") -> list[int]:
    """Every process below TGID (children, grandchildren, ...), breadth first."""
    out: list[int] = []
    seen = {tgid}
    queue = [tgid]
    while queue:
        parent = queue.pop(0)
        try:
            kids = children(parent, proc_root)
        except TargetNotFound:
            continue  # exited meanwhile
        for kid in kids:
            if kid not in seen:
                seen.add(kid)
                out.append(kid)
                queue.append(kid)
    return out


# ---------------------------------------------------------------------------------------------
# Mapped libraries

# family -> file-name pattern. Torch wheels may bundle hashed copies (libcudart-1a2b3c4d.so.12).
LIBRARY_FAMILIES: dict[str, re.Pattern[str]] = {
    "libcudart": re.compile(r"^libcudart(?:-[0-9a-f]{8})?\.so(?:\.[0-9.]+)?$"),
    "libcuda": re.compile(r"^libcuda\.so(?:\.[0-9.]+)?$"),
    "libnccl": re.compile(r"^libnccl(?:-[0-9a-f]{8})?\.so(?:\.[0-9.]+)?$"),
    "libtorch_cuda": re.compile(r"^libtorch_cuda(?:_cu|_cpp)?\.so$"),
    "libtorch_cpu": re.compile(r"^libtorch_cpu\.so$"),
    "libnvidia-ml": re.compile(r"^libnvidia-ml\.so(?:\.[0-9.]+)?$"),
    "libpython": re.compile(r"^libpython3\.[0-9]+[a-z]*\.so(?:\.[0-9.]+)?$"),
}

# A process mapping any of these is a training process (libnvidia-ml / libpython alone are not).
TRAINING_FAMILIES = ("libcudart", "libcuda", "libnccl", "libtorch_cuda", "libtorch_cpu")

# PyPI distributions that ship each family, for a version when the file name has only a major.
_WHEEL_DIST = {
    "libcudart": re.compile(r"^nvidia_cuda_runtime_cu\d+-([0-9][0-9.]*)\.dist-info$"),
    "libnccl": re.compile(r"^nvidia_nccl_cu\d+-([0-9][0-9.]*)\.dist-info$"),
    "libtorch_cuda": re.compile(r"^torch-([0-9][0-9a-z.+]*)\.dist-info$"),
    "libtorch_cpu": re.compile(r"^torch-([0-9][0-9a-z.+]*)\.dist-info$"),
    "libnvidia-ml": re.compile(r"^nvidia_ml_py-([0-9][0-9.]*)\.dist-info$"),
}

_SO_VERSION = re.compile(r"\.so\.([0-9]+(?:\.[0-9]+)*)$")
_PY_VERSION = re.compile(r"^libpython(3\.[0-9]+)")


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/TGID/maps that maps a file."""

    start: int
    end: int
    offset: int
    perms: str  # "r-xp"
    dev: str  # "fd:01"
    inode: int
    path: str  # as the process sees it (its mount namespace), " (deleted)" stripped
    deleted: bool = False


@dataclass(frozen=True)
class MappedLibrary:
    """A library of interest mapped by a process.

    `base` is the start of the mapping with file offset 0 (the load base used to turn
    file offsets and symbol values into addresses); None if no such mapping is seen.
    `host_path` reaches the same file from our mount namespace via /proc/TGID/root, so
    containers work. `version` is None when neither the file name, the soname nor the
    wheel it came from tells it; `version_source` says which one did.
    """

    name: str  # family: libcudart, libcuda, libnccl, libtorch_cuda, libtorch_cpu, ...
    path: str
    host_path: str
    version: str | None
    version_source: str | None  # "filename" | "soname" | "wheel" | None
    soname: str | None
    base: int | None
    mappings: tuple[Mapping, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly summary (addresses as hex strings)."""
        return {
            "name": self.name,
            "path": self.path,
            "host_path": self.host_path,
            "version": self.version,
            "version_source": self.version_source,
            "soname": self.soname,
            "base": None if self.base is None else hex(self.base),
        }


def parse_maps(text: str) -> list[Mapping]:
    """Parse /proc/TGID/maps text into file-backed `Mapping`s (anonymous ones skipped)."""
    out: list[Mapping] = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        addr, perms, offset, dev, inode, path = parts
        lo, _, hi = addr.partition("-")
        deleted = path.endswith(" (deleted)")
        if deleted:
            path = path[: -len(" (deleted)")]
        out.append(
            Mapping(
                start=int(lo, 16),
                end=int(hi, 16),
                offset=int(offset, 16),
                perms=perms,
                dev=dev,
                inode=int(inode),
                path=path,
                deleted=deleted,
            )
        )
    return out


def library_family(path: str) -> str | None:
    """The family (key of LIBRARY_FAMILIES) a library path belongs to, by its file name."""
    base = os.path.basename(path)
    for family, pattern in LIBRARY_FAMILIES.items():
        if pattern.match(base):
            return family
    return None


_SONAMES: dict[tuple[int, int, int, int], str | None] = {}
_SONAMES_MAX = 4096


def read_soname(path: str | os.PathLike[str]) -> str | None:
    """DT_SONAME of an ELF shared object, or None (not ELF, unreadable, no soname).

    Cached by file identity (device, inode, size, mtime): a tracer rescans its targets'
    mapped libraries for the life of the job, and parsing the same ELF headers again on
    every rescan cost a large part of a core with real torch ranks (~50 libraries each)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _SONAMES:
        return _SONAMES[key]
    if len(_SONAMES) >= _SONAMES_MAX:
        _SONAMES.clear()
    _SONAMES[key] = name = _parse_soname(path)
    return name


def _parse_soname(path: str | os.PathLike[str]) -> str | None:
    try:
        from elftools.common.exceptions import ELFError
        from elftools.elf.dynamic import DynamicSection
        from elftools.elf.elffile import ELFFile
    except ImportError:  # pragma: no cover - pyelftools is a dependency
        return None
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for section in elf.iter_sections():
                if isinstance(section, DynamicSection):
                    for tag in section.iter_tags():
                        if tag.entry.d_tag == "DT_SONAME":
                            return str(tag.soname)
    except (OSError, ELFError, ValueError):
        return None
    return None


def _name_version(family: str, name: str | None) -> str | None:
    if not name:
        return None
    if family == "libpython":
        m = _PY_VERSION.match(name)
        return m.group(1) if m else None
    m = _SO_VERSION.search(name)
    return m.group(1) if m else None


def _wheel_version(family: str, host_path: str) -> str | None:
    """Version of the PyPI wheel the file came from (site-packages/<dist>.dist-info)."""
    pattern = _WHEEL_DIST.get(family)
    if pattern is None:
        return None
    d = Path(host_path).parent
    for _ in range(4):  # lib/ -> cuda_runtime/ -> nvidia/ -> site-packages/
        d = d.parent
        try:
            entries = [e.name for e in d.iterdir() if e.name.endswith(".dist-info")]
        except OSError:
            return None
        for name in sorted(entries):
            m = pattern.match(name)
            if m:
                return m.group(1)
    return None


def _best_version(
    family: str, path: str, soname: str | None, host_path: str
) -> tuple[str | None, str | None]:
    candidates = [
        (_name_version(family, os.path.basename(path)), "filename"),
        (_name_version(family, soname), "soname"),
    ]
    best: tuple[str | None, str | None] = (None, None)
    for version, source in candidates:
        if version and (best[0] is None or version.count(".") > best[0].count(".")):
            best = (version, source)
    if best[0] is None or best[0].count(".") < 2:
        wheel = _wheel_version(family, host_path)
        if wheel:
            return wheel, "wheel"
    return best


def host_path(tgid: int, path: str, proc_root: str | os.PathLike[str] = "/proc") -> str:
    """The path of a file the process sees as PATH, reached through /proc/TGID/root."""
    return str(_pdir(tgid, proc_root) / "root" / path.lstrip("/"))


def mapped_libraries(tgid: int, proc_root: str | os.PathLike[str] = "/proc",
                     maps_text: str | None = None) -> list[MappedLibrary]:
    """Which CUDA / NCCL / torch / NVML / Python libraries the process maps, and where.

    Parses /proc/TGID/maps, groups file mappings by path, keeps paths whose file name
    matches a family in LIBRARY_FAMILIES, and for each reads DT_SONAME (pyelftools,
    through /proc/TGID/root) and picks the most specific version of: the file name
    (libcudart.so.12.4.127), the soname, the pip wheel's dist-info. One entry per distinct
    path, in the order first mapped. `maps_text`: /proc/TGID/maps as the caller read it.
    """
    text = maps_text if maps_text is not None else (
        read_proc(tgid, "maps", proc_root).decode("utf-8", "replace"))
    by_path: dict[str, list[Mapping]] = {}
    for m in parse_maps(text):
        if library_family(m.path) is not None:
            by_path.setdefault(m.path, []).append(m)
    out: list[MappedLibrary] = []
    for path, maps in by_path.items():
        family = library_family(path)
        assert family is not None
        hpath = host_path(tgid, path, proc_root)
        soname = read_soname(hpath)
        version, source = _best_version(family, path, soname, hpath)
        zero = [m.start for m in maps if m.offset == 0]
        out.append(
            MappedLibrary(
                name=family,
                path=path,
                host_path=hpath,
                version=version,
                version_source=source,
                soname=soname,
                base=min(zero) if zero else None,
                mappings=tuple(maps),
            )
        )
    return out


def is_training_process(libraries: list[MappedLibrary]) -> bool:
    """True when any library is one argus probes (CUDA runtime/driver, NCCL, libtorch)."""
    return any(lib.name in TRAINING_FAMILIES for lib in libraries)


def parent(tgid: int, proc_root: str | os.PathLike[str] = "/proc") -> int | None:
    """The parent process (ppid from /proc/TGID/stat); None when unknown."""
    return _stat_ppid(read_proc(tgid, "stat", proc_root))

