"""Kernel and privilege features tracing needs, checked the same way by every caller.

`argus attach` (the Tracer's plan, `session.run_session`), `argus daemon` and `argus doctor`
all call these functions, so doctor cannot pass where attach then fails:

- `check_privileges`: root, or CAP_BPF + CAP_PERFMON (CAP_SYS_ADMIN also works)
- `check_kernel_config`: the CONFIG_ options (BPF syscall, uprobe events, perf, BPF events)
- `check_tracefs`: tracefs mounted, else the perf uprobe PMU (uprobes still attach)
- `check_perf_event_paranoid`, `check_bcc` (headers for bcc, clang, a test program loads),
  `check_nvml` (GPU counters; never a failure)
- `require_privileges`, `require_kernel`: the checks attach and the daemon need before
  loading anything; a FAIL is raised as a typed error (PermissionDenied,
  KernelFeatureMissing) with doctor's detail and remedy
- tracefs readers: `tracepoint_fields` (a tracepoint's format file), `fork_child_offset`

Every check is a function over injectable inputs (proc root, /boot, kernel config text,
euid, capability set, tracefs paths, the bcc self-test, the NVML probe) returning a `Check`
(PASS: fine, WARN: works degraded or unknown, FAIL: cannot trace until fixed).
"""

from __future__ import annotations

import gzip
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from argus.errors import ArgusError, KernelFeatureMissing, PermissionDenied

CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
UPROBE_PMU_TYPE = "/sys/bus/event_source/devices/uprobe/type"
TRACEFS_REMEDY = "Mount it: mount -t tracefs tracefs /sys/kernel/tracing"


class Status(StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One check's outcome: `remedy` is one sentence, empty when there is nothing to do."""

    name: str
    status: Status
    detail: str
    remedy: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "status": str(self.status),
            "detail": self.detail,
            "remedy": self.remedy,
        }


def exit_code(checks: Sequence[Check]) -> int:
    """0 when tracing can work (no FAIL), 1 when it cannot."""
    return 1 if any(c.status == Status.FAIL for c in checks) else 0


# ---------------------------------------------------------------------------------------------
# Privileges


def read_cap_eff(proc_root: str | os.PathLike[str] = "/proc") -> int | None:
    """The effective capability set of this process (CapEff of /proc/self/status)."""
    try:
        text = (Path(proc_root) / "self" / "status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return int(line.split(":", 1)[1].strip(), 16)
            except ValueError:
                return None
    return None


def _has(caps: int, cap: int) -> bool:
    return bool(caps >> cap & 1)


def check_privileges(
    euid: int | None = None, cap_eff: int | None = None, proc_root: str = "/proc"
) -> Check:
    """Root, or CAP_BPF + CAP_PERFMON (CAP_SYS_ADMIN also works) in the effective set.

    The capability set decides, not the uid: root in a restricted container may lack them.
    """
    euid = os.geteuid() if euid is None else euid
    caps = read_cap_eff(proc_root) if cap_eff is None else cap_eff
    name = "privileges"
    who = "root" if euid == 0 else f"uid {euid}"
    if caps is None:
        if euid == 0:
            return Check(name, Status.WARN, "running as root; capability set unreadable", "")
        return Check(
            name,
            Status.FAIL,
            f"running as {who} and the capability set is unreadable",
            "Run as root (sudo argus ...) or grant CAP_BPF and CAP_PERFMON.",
        )
    held = [
        n
        for n, c in (
            ("CAP_BPF", CAP_BPF),
            ("CAP_PERFMON", CAP_PERFMON),
            ("CAP_SYS_ADMIN", CAP_SYS_ADMIN),
        )
        if _has(caps, c)
    ]
    enough = _has(caps, CAP_SYS_ADMIN) or (_has(caps, CAP_BPF) and _has(caps, CAP_PERFMON))
    if not enough:
        missing = [n for n in ("CAP_BPF", "CAP_PERFMON") if n not in held]
        return Check(
            name,
            Status.FAIL,
            f"running as {who} without {' and '.join(missing)} (nor CAP_SYS_ADMIN): "
            "BPF programs cannot be loaded",
            "Run as root (sudo argus ...) or grant CAP_BPF and CAP_PERFMON "
            "(setcap cap_bpf,cap_perfmon+ep, or the container's securityContext).",
        )
    detail = f"running as {who} with {', '.join(held)}"
    if euid != 0 and not _has(caps, CAP_SYS_PTRACE):
        detail += "; without CAP_SYS_PTRACE only your own processes can be inspected"
    return Check(name, Status.PASS, detail, "")


# ---------------------------------------------------------------------------------------------
# Kernel config

REQUIRED_CONFIG = {
    "CONFIG_BPF_SYSCALL": "the bpf() system call",
    "CONFIG_UPROBE_EVENTS": "uprobes for BPF (needs CONFIG_UPROBES)",
    "CONFIG_PERF_EVENTS": "perf events (probe attachment, CPU sampling)",
    "CONFIG_BPF_EVENTS": "BPF programs on uprobes, tracepoints and perf events",
}
DEGRADED_CONFIG = {
    "CONFIG_BPF_JIT": "without the JIT, BPF programs run interpreted (slower probes)",
    "CONFIG_DEBUG_INFO_BTF": "no kernel BTF (/sys/kernel/btf/vmlinux): bcc needs kernel "
    "headers instead",
}


def parse_kernel_config(text: str) -> dict[str, str]:
    """`CONFIG_X=value` lines to {name: value}; `# CONFIG_X is not set` lines to "n"."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2 : -len(" is not set")]] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            out[key] = value.strip().strip('"')
    return out


def read_kernel_config(
    proc_root: str = "/proc", boot_dir: str = "/boot", release: str | None = None
) -> tuple[str | None, str | None]:
    """(config text, where it came from): /proc/config.gz, else /boot/config-RELEASE."""
    release = platform.release() if release is None else release
    gz = Path(proc_root) / "config.gz"
    try:
        with gzip.open(gz, "rt", errors="replace") as f:
            return f.read(), str(gz)
    except (OSError, EOFError):
        pass
    boot = Path(boot_dir) / f"config-{release}"
    try:
        return boot.read_text(errors="replace"), str(boot)
    except OSError:
        return None, None


def _enabled(cfg: dict[str, str], key: str) -> bool:
    return cfg.get(key) in ("y", "m")


def check_kernel_config(
    config_text: str | None = None,
    source: str | None = None,
    proc_root: str = "/proc",
    boot_dir: str = "/boot",
    release: str | None = None,
) -> Check:
    """The kernel options argus needs, from /proc/config.gz or /boot/config-$(uname -r).

    FAIL when a required option is off; WARN when the config cannot be found (unknown) or
    the JIT or BTF is off. CONFIG_KPROBES off is fine: argus uses no kprobes.
    """
    name = "kernel config"
    release = platform.release() if release is None else release
    if config_text is None:
        config_text, source = read_kernel_config(proc_root, boot_dir, release)
    if config_text is None:
        return Check(
            name,
            Status.WARN,
            f"kernel config not found ({proc_root}/config.gz, {boot_dir}/config-{release}): "
            "kernel features unknown",
            "Load it with `modprobe configs` (CONFIG_IKCONFIG_PROC) or install the kernel's "
            f"{boot_dir}/config-{release}.",
        )
    cfg = parse_kernel_config(config_text)
    missing = [k for k in REQUIRED_CONFIG if not _enabled(cfg, k)]
    degraded = [k for k in DEGRADED_CONFIG if not _enabled(cfg, k)]
    notes = []
    if not _enabled(cfg, "CONFIG_KPROBES"):
        notes.append("CONFIG_KPROBES off (fine: argus uses no kprobes)")
    where = f" (from {source})" if source else ""
    if missing:
        parts = [f"{k} off: no {REQUIRED_CONFIG[k]}" for k in missing]
        parts += [f"{k} off" for k in degraded]
        return Check(
            name,
            Status.FAIL,
            "; ".join(parts + notes) + where,
            f"Boot a kernel built with {', '.join(k + '=y' for k in missing)}.",
        )
    if degraded:
        parts = [f"{k} off: {DEGRADED_CONFIG[k]}" for k in degraded]
        return Check(
            name,
            Status.WARN,
            "; ".join(parts + notes) + where,
            f"For full speed boot a kernel with {', '.join(k + '=y' for k in degraded)}.",
        )
    ok = "BPF syscall, JIT, uprobes, perf events, BPF events and BTF on"
    return Check(name, Status.PASS, "; ".join([ok, *notes]) + where, "")


# ---------------------------------------------------------------------------------------------
# tracefs


def check_tracefs(
    candidates: Sequence[str] = TRACEFS_CANDIDATES, uprobe_pmu: str = UPROBE_PMU_TYPE
) -> Check:
    """tracefs mounted (a candidate directory holding `uprobe_events`).

    Without it bcc still attaches uprobes through the perf `uprobe` PMU (WARN), but not
    tracepoints (process exec/exit, off-CPU); with neither, uprobes cannot attach (FAIL).
    """
    name = "tracefs"
    for d in candidates:
        try:
            os.stat(Path(d) / "uprobe_events")
        except PermissionError:
            return Check(
                name,
                Status.WARN,
                f"{d} is not accessible to uid {os.geteuid()} (tracefs is root-only)",
                "Run argus as root (sudo argus ...).",
            )
        except OSError:
            continue
        return Check(name, Status.PASS, f"mounted at {d}", "")
    if Path(uprobe_pmu).exists():
        return Check(
            name,
            Status.WARN,
            f"not mounted ({', '.join(candidates)} hold no uprobe_events): uprobes still "
            "attach through the perf uprobe PMU, tracepoints (process exec/exit, off-CPU) do not",
            TRACEFS_REMEDY,
        )
    return Check(
        name,
        Status.FAIL,
        f"not mounted ({', '.join(candidates)} hold no uprobe_events) and the kernel has no "
        "perf uprobe PMU: uprobes cannot attach",
        TRACEFS_REMEDY,
    )


# ---------------------------------------------------------------------------------------------
# perf_event_paranoid


def check_perf_event_paranoid(
    value: int | None = None,
    euid: int | None = None,
    cap_eff: int | None = None,
    proc_root: str = "/proc",
) -> Check:
    """kernel.perf_event_paranoid: irrelevant with CAP_PERFMON/CAP_SYS_ADMIN (root); WARN
    when > 2 (Debian's "no perf for unprivileged users") and the caller lacks them."""
    name = "perf_event_paranoid"
    euid = os.geteuid() if euid is None else euid
    caps = read_cap_eff(proc_root) if cap_eff is None else cap_eff
    path = Path(proc_root) / "sys" / "kernel" / "perf_event_paranoid"
    if value is None:
        try:
            value = int(path.read_text().strip())
        except (OSError, ValueError):
            return Check(
                name,
                Status.WARN,
                f"{path} unreadable: perf events may be missing (CONFIG_PERF_EVENTS)",
                "Check that the kernel has CONFIG_PERF_EVENTS=y.",
            )
    privileged = euid == 0 or (
        caps is not None and (_has(caps, CAP_PERFMON) or _has(caps, CAP_SYS_ADMIN))
    )
    if value > 2 and not privileged:
        return Check(
            name,
            Status.WARN,
            f"{value}: perf events are closed to unprivileged users",
            "Run as root or with CAP_PERFMON, or lower it: sysctl kernel.perf_event_paranoid=2",
        )
    why = " (privileged: the setting does not apply)" if privileged else ""
    return Check(name, Status.PASS, f"{value}{why}", "")


# ---------------------------------------------------------------------------------------------
# bcc


def _default_selftest() -> object:
    from argus.collect.bcc_adapter import bcc_selftest

    return bcc_selftest()


def check_bcc(selftest: Callable[[], object] | None = None) -> Check:
    """bcc importable, and able to compile and load a trivial BPF program.

    Catches missing kernel headers, a broken clang/LLVM and a kernel that refuses BPF loads.
    `selftest` raises an `ArgusError` on failure (see `bcc_adapter.bcc_selftest`).
    """
    name = "bcc"
    selftest = _default_selftest if selftest is None else selftest
    try:
        result = selftest()
    except ArgusError as err:
        return Check(name, Status.FAIL, err.message, err.remedy)
    except Exception as err:  # noqa: BLE001 - a doctor reports, it does not crash
        return Check(
            name,
            Status.FAIL,
            f"bcc self-test failed unexpectedly: {type(err).__name__}: {err}",
            "Run `argus -v doctor` and report the traceback.",
        )
    version = getattr(result, "bcc_version", None)
    secs = getattr(result, "compile_load_s", None)
    detail = "compiled and loaded a test BPF program"
    if version:
        detail = f"bcc {version} " + detail
    if isinstance(secs, float):
        detail += f" in {secs:.2f} s"
    return Check(name, Status.PASS, detail, "")


# ---------------------------------------------------------------------------------------------
# NVML


def _default_nvml_probe() -> str:
    """Initialise NVML (the library ARGUS_NVML_LIB names, else the driver's libnvidia-ml.so.1);
    return "driver X, N GPU(s)". Raises when NVML is unavailable."""
    from argus.collect.nvml import probe_nvml

    info = probe_nvml()
    return f"driver {info['driver']}, {info['devices']} GPU(s)"


def check_nvml(
    nvml_probe: Callable[[], str] | None = None, visible_devices: str | None = None
) -> Check:
    """NVML (libnvidia-ml) usable for GPU counters. Never a failure: without it the GPU
    counter channel is off and everything else works."""
    name = "nvml"
    probe = _default_nvml_probe if nvml_probe is None else nvml_probe
    try:
        what = probe()
    except Exception as err:  # noqa: BLE001 - pynvml raises NVMLError, ImportError, OSError...
        reason = str(err).strip() or type(err).__name__
        return Check(
            name,
            Status.WARN,
            f"NVML not available: GPU counters off ({reason})",
            "Install the NVIDIA driver (libnvidia-ml.so.1) on a GPU node to get GPU counters.",
        )
    if what.endswith(" 0 GPU(s)"):
        return Check(name, Status.WARN, f"NVML works but sees no GPU ({what}): GPU counters off",
                     "Run argus on the GPU node, with access to /dev/nvidia*.")
    if visible_devices is not None:
        what += f"; the process sees CUDA_VISIBLE_DEVICES={visible_devices}"
    return Check(name, Status.PASS, what, "")


# ---------------------------------------------------------------------------------------------
# What attach needs (the same checks, raised)


def _raise_failed(checks: Sequence[Check], error: type[ArgusError]) -> None:
    for c in checks:
        if c.status == Status.FAIL:
            raise error(f"{c.name}: {c.detail}", remedy=c.remedy or None)


def require_privileges(euid: int | None = None, cap_eff: int | None = None,
                       proc_root: str = "/proc") -> None:
    """`check_privileges` (doctor's "privileges" line), a FAIL raised as PermissionDenied."""
    _raise_failed([check_privileges(euid, cap_eff, proc_root)], PermissionDenied)


def require_kernel(
    proc_root: str = "/proc",
    tracefs_candidates: Sequence[str] = TRACEFS_CANDIDATES,
    uprobe_pmu: str = UPROBE_PMU_TYPE,
) -> None:
    """`check_kernel_config` and `check_tracefs` (doctor's "kernel config" and "tracefs"
    lines), a FAIL raised as KernelFeatureMissing: a required CONFIG_ option off, or neither
    tracefs nor the perf uprobe PMU (no uprobes). WARNs (config unknown, tracefs not mounted
    but the PMU there) do not stop tracing."""
    _raise_failed([check_kernel_config(proc_root=proc_root),
                   check_tracefs(tracefs_candidates, uprobe_pmu)], KernelFeatureMissing)


# ---------------------------------------------------------------------------------------------
# tracefs readers


def tracepoint_fields(event: str, candidates: Sequence[str] = TRACEFS_CANDIDATES
                      ) -> dict[str, tuple[int, int]] | None:
    """{field: (offset, size)} of tracepoint `event` ("sched/sched_switch") from tracefs's
    format file of the running kernel; None when the tracepoint (or tracefs) is absent."""
    for base in candidates:
        fmt = Path(base) / "events" / event / "format"
        try:
            text = fmt.read_text()
        except OSError:
            continue
        out = {}
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("field:") or "offset:" not in line:
                continue
            try:
                decl = line.split("field:", 1)[1].split(";", 1)[0]
                name = decl.split()[-1].split("[", 1)[0]
                off = int(line.split("offset:")[1].split(";")[0])
                size = int(line.split("size:")[1].split(";")[0])
            except (IndexError, ValueError):
                continue
            out[name] = (off, size)
        return out
    return None


def fork_child_offset(candidates: Sequence[str] = TRACEFS_CANDIDATES) -> int | None:
    """Offset of child_pid in sched:sched_process_fork's record; None without tracefs."""
    for base in candidates:
        fmt = Path(base) / "events/sched/sched_process_fork/format"
        try:
            for line in fmt.read_text().splitlines():
                if "child_pid;" in line:
                    return int(line.split("offset:")[1].split(";")[0])
        except (OSError, IndexError, ValueError):
            continue
    return None
