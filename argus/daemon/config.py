"""The daemon's configuration file (TOML). Data only: nothing in it is ever executed.

    [discover]
    libraries = true                  # trace processes mapping libcudart/libcuda/libnccl/libtorch
    include_comm = ["trainer*"]       # also trace processes whose comm matches (fnmatch)
    include_exe = ["*/bin/my-train"]  # ... or whose executable path matches
    exclude_comm = ["nvidia-smi"]     # never trace these (exclusion wins)
    exclude_exe = []

    [output]
    interval_s = 5                    # drain, write a segment and diagnose every S seconds
    window_s = 60                     # the recent window each diagnosis reads
    max_disk_mb = 1024                # oldest segments are removed above this

    [diagnosis]
    hang_after_s = 10
    job_grace_s = 300                 # a finished job stays in /state this long (not /metrics)

Unknown keys are an error naming the key (a typo must not silently change what is traced).
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from argus.errors import UsageError


@dataclass
class DaemonConfig:
    libraries: bool = True
    include_comm: list[str] = field(default_factory=list)
    include_exe: list[str] = field(default_factory=list)
    exclude_comm: list[str] = field(default_factory=list)
    exclude_exe: list[str] = field(default_factory=list)
    interval_s: float = 5.0
    window_s: float = 60.0
    max_disk_mb: float = 1024.0
    hang_after_s: float = 10.0
    job_grace_s: float = 300.0

    def wants(self, comm: str, exe: str | None, training: bool) -> bool:
        """Trace a process with this comm / exe (training: it maps a probed library)?"""

        def match(pats: list[str], value: str | None) -> bool:
            return value is not None and any(fnmatch.fnmatchcase(value, p) for p in pats)

        if match(self.exclude_comm, comm) or match(self.exclude_exe, exe):
            return False
        if training and self.libraries:
            return True
        return match(self.include_comm, comm) or match(self.include_exe, exe)


_SECTIONS = {
    "discover": ("libraries", "include_comm", "include_exe", "exclude_comm", "exclude_exe"),
    "output": ("interval_s", "window_s", "max_disk_mb"),
    "diagnosis": ("hang_after_s", "job_grace_s"),
}
# The command-line flags that override keys (their errors name the flag, not a file).
_FLAGS = {"interval_s": "-i/--interval", "window_s": "--window", "max_disk_mb": "--max-disk-mb"}
# The remedy of a defect in the file.
FIX = "Fix it in the config file; docs/daemon.md lists the sections and keys."
# Durations (the `*_s` keys) are at most a year: a longer one overflows the daemon's timers.
MAX_SECONDS = 365 * 24 * 3600


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _name(name: str) -> str:
    """A section or key name as an error shows it: as written, quoted when not printable."""
    return name if name.isprintable() else repr(name)


def _checked(name: str, kind: str, value, where: str):
    """`value` of key `name` as its declared type `kind`, else a UsageError naming `where`.

    bool: true or false (not a number); list[str]: strings only; float: an int or float (not
    a boolean: `true` is an int in Python), finite, positive, and for durations <= a year."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false (found {_show(value)}).")
        return value
    if kind.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise UsageError(
                f"{where} must be a list of strings (fnmatch patterns), found {_show(value)}."
            )
        return list(value)
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise UsageError(f"{where} must be a finite positive number (found {_show(value)}).")
    if name.endswith("_s") and number > MAX_SECONDS:
        raise UsageError(f"{where} must be at most {MAX_SECONDS} seconds (one year), "
                         f"found {_show(value)}.")
    return number


def _read(path: Path, types: dict[str, str]) -> dict:
    """The validated values of the TOML file `path` (see `load_config`)."""
    values: dict = {}
    try:
        data = tomllib.loads(Path(path).read_bytes().decode())
    except OSError as e:
        raise UsageError(f"cannot read the config file {path}: {e.strerror}.") from e
    except UnicodeDecodeError as e:
        raise UsageError(
            f"the config file {path} is not UTF-8 text (byte {e.start} is invalid)."
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"the config file {path} is not valid TOML: {e}.") from e
    for section, body in data.items():
        if section not in _SECTIONS:
            raise UsageError(f"{path}: unknown section [{_name(section)}] "
                             f"(known: {', '.join(_SECTIONS)}).")
        if not isinstance(body, dict):
            raise UsageError(f"{path}: [{section}] must be a table of keys, "
                             f"found {_show(body)}.")
        for key, value in body.items():
            if key not in _SECTIONS[section]:
                raise UsageError(f"{path}: unknown key {_name(key)} in [{section}] "
                                 f"(known: {', '.join(_SECTIONS[section])}).")
            values[key] = _checked(key, types[key], value, f"{path}: [{section}] {key}")
    return values


def load_config(path: str | Path | None, **overrides) -> DaemonConfig:
    """Read the TOML file (None: defaults), then apply non-None overrides (CLI flags).

    Validated: the file is readable, UTF-8 and TOML; every top-level name is a known section
    and a table; every key is known in its section and of its declared type (see `_checked`).
    Any defect is one UsageError naming the file, the section and the key (or the flag)."""
    values: dict = {}
    types = {f.name: f.type for f in fields(DaemonConfig)}
    if path is not None:
        try:
            values = _read(Path(path), types)
        except UsageError as e:
            e.remedy = FIX
            raise
    for key, value in overrides.items():
        if value is not None:
            values[key] = _checked(key, types[key], value, _FLAGS.get(key, key))
    return DaemonConfig(**values)
