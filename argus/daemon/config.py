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
    job_grace_s = 300                 # a finished job stays in /metrics and /state this long

Unknown keys are an error naming the key (a typo must not silently change what is traced).
"""

from __future__ import annotations

import fnmatch
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


def load_config(path: str | Path | None, **overrides) -> DaemonConfig:
    """Read the TOML file (None: defaults), then apply non-None overrides (CLI flags)."""
    values: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise UsageError(f"cannot read the config file {path}: {e.strerror}.") from e
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"the config file {path} is not valid TOML: {e}.") from e
        for section, body in data.items():
            if section not in _SECTIONS or not isinstance(body, dict):
                raise UsageError(
                    f"{path}: unknown section [{section}] (known: {', '.join(_SECTIONS)})."
                )
            for key, value in body.items():
                if key not in _SECTIONS[section]:
                    raise UsageError(f"{path}: unknown key {key} in [{section}].")
                values[key] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    types = {f.name: f.type for f in fields(DaemonConfig)}
    for key, value in values.items():
        if types[key] == "bool" and not isinstance(value, bool):
            raise UsageError(f"{key} must be true or false.")
        if types[key] == "float" and (not isinstance(value, int | float) or value <= 0):
            raise UsageError(f"{key} must be a positive number.")
        if types[key].startswith("list") and (
            not isinstance(value, list) or not all(isinstance(x, str) for x in value)
        ):
            raise UsageError(f"{key} must be a list of strings (fnmatch patterns).")
    return DaemonConfig(**values)
