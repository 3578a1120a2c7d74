"""Build a fake /proc tree in a temporary directory for procfs and doctor tests."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

_STATES = {"R": "running", "S": "sleeping", "D": "disk sleep", "Z": "zombie", "X": "dead"}


def make_process(
    proc_root: Path,
    tgid: int,
    *,
    name: str = "python",
    uid: int = 0,
    ppid: int = 1,
    maps: str = "",
    environ: dict[str, str] | None = None,
    cmdline: tuple[str, ...] = ("python", "train.py"),
    exe: str | None = "/usr/bin/python3.11",
    children: list[int] | None = None,
    status_tgid: int | None = None,
    state: str = "S",
) -> Path:
    """A fake /proc/TGID: status, stat, comm, maps, environ, cmdline, exe, root/.

    `children` writes task/TGID/children (CONFIG_PROC_CHILDREN); None leaves it out so
    the ppid scan of */stat is used. `status_tgid` fakes a thread (Tgid != the dir name).
    `state` is the state letter (Z: a zombie its parent has not reaped).
    """
    d = proc_root / str(tgid)
    (d / "root").mkdir(parents=True, exist_ok=True)
    (d / "task" / str(tgid)).mkdir(parents=True, exist_ok=True)
    t = status_tgid if status_tgid is not None else tgid
    (d / "status").write_text(
        f"Name:\t{name}\nUmask:\t0022\nState:\t{state} ({_STATES.get(state, '?')})\n"
        f"Tgid:\t{t}\nPid:\t{tgid}\n"
        f"PPid:\t{ppid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n"
    )
    (d / "stat").write_text(f"{tgid} ({name}) {state} {ppid} {tgid} {tgid} 0 -1 4194304 0\n")
    (d / "comm").write_text(name + "\n")
    (d / "maps").write_text(maps)
    env = environ or {}
    (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in cmdline))
    if exe is not None:
        os.symlink(exe, d / "exe")
    if children is not None:
        (d / "task" / str(tgid) / "children").write_text("".join(f"{c} " for c in children))
    return d


def put_file(proc_root: Path, tgid: int, path: str, data: bytes | Path) -> Path:
    """Place a file at PATH inside the fake process's /proc/TGID/root."""
    dest = proc_root / str(tgid) / "root" / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path):
        shutil.copyfile(data, dest)
    else:
        dest.write_bytes(data)
    return dest


def maps_line(start: int, end: int, perms: str, offset: int, path: str, inode: int = 1234) -> str:
    return f"{start:x}-{end:x} {perms} {offset:08x} fd:01 {inode}    {path}\n"


def lib_maps(path: str, base: int, inode: int = 1234) -> str:
    """The four mappings ld.so makes for a shared object at BASE."""
    return (
        maps_line(base, base + 0x1000, "r--p", 0, path, inode)
        + maps_line(base + 0x1000, base + 0x5000, "r-xp", 0x1000, path, inode)
        + maps_line(base + 0x5000, base + 0x6000, "r--p", 0x5000, path, inode)
        + maps_line(base + 0x6000, base + 0x7000, "rw-p", 0x6000, path, inode)
    )


def write_self(proc_root: Path, cap_eff: int) -> None:
    """/proc/self/status with a CapEff line."""
    d = proc_root / "self"
    d.mkdir(parents=True, exist_ok=True)
    (d / "status").write_text(f"Name:\tpython\nCapEff:\t{cap_eff:016x}\n")


def write_config_gz(proc_root: Path, text: str) -> None:
    proc_root.mkdir(parents=True, exist_ok=True)
    with gzip.open(proc_root / "config.gz", "wt") as f:
        f.write(text)


def build_shared_object(dest: Path, soname: str | None) -> Path:
    """Compile an empty shared object with the given DT_SONAME (needs a C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise FileNotFoundError("no C compiler (cc/gcc) to build a test shared object")
    src = dest.with_suffix(".c")
    src.write_text("int argus_test_symbol(void) { return 7; }\n")
    cmd = [cc, "-shared", "-fPIC", "-o", str(dest), str(src)]
    if soname:
        cmd.insert(3, f"-Wl,-soname,{soname}")
    subprocess.run(cmd, check=True, capture_output=True)
    src.unlink()
    return dest
