"""Where argus's own files are: the BPF sources, the probe specs, the simulator's build.

The only module that locates package data; nothing else walks up from `__file__`.

- An installed wheel carries the repository's `bpf/` and `cuda_probes/` inside the package,
  as `argus/_data/bpf/` and `argus/_data/cuda_probes/` (pyproject.toml maps them there), and
  `data_dir()` finds them with importlib.resources.
- A source checkout (PYTHONPATH, or an editable install of any age) has no `argus/_data/`:
  `data_dir()` falls back to the top-level directory of the checkout the package was imported
  from.
- The simulator (`argus demo`, argus.sim) needs the C stand-ins and the rank program built.
  `sim_build_dir()` is the checkout's `build/` (`make standins`), or, outside a checkout, a
  per-user cache built from the packaged C sources with the system `make` and `cc` on first
  use (`$ARGUS_CACHE_DIR`, else `$XDG_CACHE_HOME/argus`, else `~/.cache/argus`). An explicit
  `ARGUS_BUILD_DIR` or `--build-dir` wins over both (argus.sim.launcher.find_build_dir).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.resources
import os
import shutil
import subprocess
from pathlib import Path

from argus.errors import ArgusError

PACKAGE = "argus"
DATA = "_data"  # the folder inside the installed package that holds the top-level dirs
CACHE_ENV = "ARGUS_CACHE_DIR"
# A file each data folder must hold, so a stray empty folder is not taken for the real one.
_MARKERS = {"bpf": "argus.h", "cuda_probes": "standins/Makefile"}
_DONE = ".argus-built"  # written last into a finished stand-in build


class DataMissing(ArgusError):
    """Package data (BPF sources, probe specs, the simulator's sources) cannot be found or
    built."""

    default_remedy = "Reinstall argus (pip install --force-reinstall argus-*.whl)."


def package_root() -> Path:
    """The folder the `argus` package was imported from sits in (site-packages, or the
    checkout): what a child Python needs on its PYTHONPATH to import this same argus."""
    return Path(str(importlib.resources.files(PACKAGE))).resolve().parent


def checkout_root() -> Path | None:
    """The source checkout argus runs from, None when it runs from an installed wheel."""
    root = package_root()
    if (root / "pyproject.toml").is_file() and (root / "bpf" / _MARKERS["bpf"]).is_file():
        return root
    return None


def data_dir(name: str) -> Path:
    """The folder of top-level directory `name` ("bpf" or "cuda_probes"): the wheel's
    argus/_data/NAME, else the checkout's NAME. Raises DataMissing naming both places."""
    packaged = importlib.resources.files(PACKAGE).joinpath(DATA, name)
    candidates = [Path(str(packaged)), package_root() / name]
    for path in candidates:
        if (path / _MARKERS[name]).is_file():
            return path.resolve()
    raise DataMissing(f"argus's {name}/ files are missing (looked in "
                      f"{' and '.join(str(p) for p in candidates)}).")


def bpf_dir() -> Path:
    """The BPF C sources and their shared header (bpf/*.bpf.c, bpf/argus.h)."""
    return data_dir("bpf")


def spec_dir() -> Path:
    """The probe spec files (cuda_probes/*.toml)."""
    return data_dir("cuda_probes")


def standins_src() -> Path:
    """The C sources and Makefile of the stand-in libraries and the simulated rank."""
    return spec_dir() / "standins"


def cache_dir() -> Path:
    """argus's per-user cache: $ARGUS_CACHE_DIR, $XDG_CACHE_HOME/argus or ~/.cache/argus."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "argus"


def sim_build_dir() -> Path:
    """Where the simulator's stand-ins are built when no folder is named: the checkout's
    build/ (as `make standins` leaves it; not built here), else the per-user cache, built on
    first use by `build_standins()`."""
    root = checkout_root()
    if root is not None:
        return root / "build"
    return build_standins()


def _sources_digest(src: Path) -> str:
    """The stand-ins' sources and the GPU agent's (their Makefile builds both: ../agent)."""
    h = hashlib.sha256()
    for folder in (src, src.parent / "agent"):
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        for path in files:
            h.update(f"{folder.name}/{path.name}".encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_standins(dest_root: Path | None = None) -> Path:
    """Build the stand-ins and the rank program from the packaged sources into
    DEST_ROOT/standins-<digest of the sources> (default: the per-user cache) unless done.

    The build runs `make -C <sources> BUILD=<temporary folder>` (the sources are not written
    to: site-packages may be read-only) and renames the folder into place when it is complete,
    under a file lock, so concurrent first uses build once and never see half a build. The
    rank program finds the stand-ins through its rpath ($ORIGIN/../stubs): the folder may move.
    """
    src = standins_src()
    root = dest_root or cache_dir()
    dest = root / f"standins-{_sources_digest(src)}"
    if (dest / _DONE).is_file():
        return dest
    cc = (os.environ.get("CC") or "cc").split()[0]
    tools = [t for t in ("make", cc) if shutil.which(t) is None]
    if tools:
        raise DataMissing(
            f"the simulator's stand-in libraries must be built once and `{tools[0]}` is not "
            f"installed.",
            "Install a C toolchain (apt-get install build-essential), or set ARGUS_BUILD_DIR "
            "to a folder built by `make standins` in a checkout.")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{dest.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (dest / _DONE).is_file():
                _make(src, dest)
    except OSError as e:
        raise DataMissing(f"cannot build the simulator's stand-ins into {dest} ({e}).",
                          f"Set {CACHE_ENV} to a writable folder, or ARGUS_BUILD_DIR to a "
                          f"built one.") from e
    return dest


def _make(src: Path, dest: Path) -> None:
    # what a killed build left (we hold the lock: no other build is running)
    for old in dest.parent.glob(f"{dest.name}.tmp-*"):
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(dest)  # a folder without the marker: not ours to trust
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    out = subprocess.run(["make", "-s", "-C", str(src), f"BUILD={tmp}"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataMissing(f"building the simulator's stand-ins failed ({last}).",
                          f"Run `make -C {src} BUILD=/some/dir` to see the whole error, then "
                          f"set ARGUS_BUILD_DIR=/some/dir.")
    (tmp / _DONE).write_text(f"built from {src}\n")
    tmp.rename(dest)
