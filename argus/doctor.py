"""`argus doctor`: can tracing work here, and on this process? Each check says how to fix it.

Every check is a function over injectable inputs (proc root, /boot, kernel config text,
euid, capability set, tracefs paths, the bcc self-test, the NVML probe), so each one is
unit-testable on faked inputs. `run_doctor` runs them all; `argus attach` runs the same
checks before loading anything.

Status: PASS (fine), WARN (tracing works, something is degraded or unknown), FAIL (tracing
cannot work until fixed). Exit code: 0 when no check FAILs, 1 otherwise.
"""

from __future__ import annotations

import gzip
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from argus.collect import procfs
from argus.errors import ArgusError, NotATrainingProcess, TargetNotFound

SCHEMA = "argus.doctor/1"

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


@dataclass
class DoctorReport:
    """All checks plus what was learnt about each target process (allowlisted data only)."""

    checks: list[Check]
    processes: list[dict[str, object]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return exit_code(self.checks) == 0

    def to_json_obj(self) -> dict[str, object]:
        """The `argus.doctor/1` object printed by `argus doctor --json`."""
        return {
            "schema": SCHEMA,
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "process": self.processes[0] if self.processes else None,
            "processes": self.processes,
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
# A target process


def _lib_text(lib: procfs.MappedLibrary) -> str:
    return f"{lib.name} {lib.version or 'version unknown'} ({lib.path})"


def inspect_process(
    tgid: int, proc_root: str = "/proc", euid: int | None = None
) -> tuple[list[Check], dict[str, object]]:
    """Checks for one target: exists and readable, mapped libraries, rank identity.

    A process that maps no CUDA/NCCL/torch library but has descendants that do is a
    launcher (torchrun): its ranks are listed and it passes. Returns the checks and a
    JSON-friendly description (allowlisted environment only).
    """
    info: dict[str, object] = {"tgid": tgid}
    label = f"process {tgid}"
    try:
        state = procfs.process_state(tgid, proc_root, euid=euid)
    except TargetNotFound as err:
        info["state"] = getattr(err, "reason", "missing")
        return [Check(label, Status.FAIL, err.message, err.remedy)], info
    info.update(
        state="readable",
        comm=state.comm,
        uid=state.uid,
        ppid=state.ppid,
        exe=procfs.exe(tgid, proc_root),
    )
    checks = [Check(label, Status.PASS, f"{state.comm} (uid {state.uid}) exists and is readable")]

    try:
        libs = procfs.mapped_libraries(tgid, proc_root)
    except TargetNotFound as err:
        return [*checks, Check(label, Status.FAIL, err.message, err.remedy)], info
    info["libraries"] = [lib.to_dict() for lib in libs]
    lib_name = f"libraries {tgid}"
    if procfs.is_training_process(libs):
        checks.append(Check(lib_name, Status.PASS, "; ".join(_lib_text(lib) for lib in libs)))
        expect_rank = True
    else:
        ranks = _training_descendants(tgid, proc_root)
        info["rank_tgids"] = ranks
        if ranks:
            shown = ", ".join(str(r) for r in ranks[:16]) + (" ..." if len(ranks) > 16 else "")
            checks.append(
                Check(
                    lib_name,
                    Status.PASS,
                    f"a launcher: maps no CUDA/NCCL/torch library itself; {len(ranks)} "
                    f"descendant(s) do (tgids {shown})",
                )
            )
            expect_rank = False  # a launcher has no rank of its own
        else:
            checks.append(
                Check(
                    lib_name,
                    Status.FAIL,
                    "not a training process: maps none of libcudart/libcuda/libnccl/libtorch, "
                    "nor does any descendant",
                    NotATrainingProcess.default_remedy,
                )
            )
            expect_rank = False  # not a rank: no identity to expect

    try:
        identity = procfs.rank_identity(tgid, proc_root)
    except TargetNotFound as err:
        return [*checks, Check(f"rank {tgid}", Status.FAIL, err.message, err.remedy)], info
    info["identity"] = identity
    env = identity["env"]
    assert isinstance(env, dict)
    if identity["rank"] is not None:
        checks.append(
            Check(
                f"rank {tgid}",
                Status.PASS,
                f"rank {identity['rank']}, local rank {_opt(identity['local_rank'])}, "
                f"world size {_opt(identity['world_size'])} (from {identity['source']})",
            )
        )
    elif expect_rank:
        checks.append(
            Check(
                f"rank {tgid}",
                Status.WARN,
                "no rank in the environment (RANK, OMPI_COMM_WORLD_RANK, PMI_RANK, "
                "SLURM_PROCID): the rank will come from NCCL communicator init when seen",
                "Nothing to do for NCCL jobs; launch with torchrun/srun/mpirun to set RANK.",
            )
        )
    info["visible_devices"] = env.get("CUDA_VISIBLE_DEVICES")
    if expect_rank:
        py = _python_frames_check(tgid, proc_root, info)
        if py is not None:
            checks.append(py)
    return checks, info


def _python_frames_check(tgid: int, proc_root: str, info: dict[str, object]) -> Check | None:
    """Can CPU samples of this process carry Python frames (argus/collect/pyframes.py)?
    None when it does not run CPython."""
    from argus.collect import pyframes  # noqa: PLC0415 - only for processes being inspected

    name = f"python {tgid}"
    try:
        maps = procfs.parse_maps(Path(proc_root, str(tgid), "maps").read_text())
        found = pyframes.describe(tgid, maps, proc_root, exe=info.get("exe"))  # type: ignore[arg-type]
    except pyframes.NotPython:
        return None
    except pyframes.LayoutRefused as err:
        info["python_frames"] = {"ok": False, "note": str(err)}
        return Check(name, Status.WARN, f"no Python frames in CPU samples: {err}",
                     "The native stacks are still sampled; see docs/stacks.md (versions).")
    except OSError as err:
        info["python_frames"] = {"ok": False, "note": str(err)}
        return Check(name, Status.WARN, f"cannot read the interpreter's memory ({err})",
                     "Run as root (reading another process's memory needs CAP_SYS_PTRACE).")
    info["python_frames"] = {"ok": True, "python": found["python"], "layout": found["layout"]}
    return Check(name, Status.PASS,
                 f"CPython {found['python']} ({found['interpreter']}, layout from "
                 f"{found['layout']}, checked on {len(found['threads'])} thread(s)): CPU "
                 "samples will carry Python frames")


def _opt(v: object) -> str:
    return "unknown" if v is None else str(v)


def _training_descendants(tgid: int, proc_root: str) -> list[int]:
    out = []
    for kid in procfs.descendants(tgid, proc_root):
        try:
            if procfs.is_training_process(procfs.mapped_libraries(kid, proc_root)):
                out.append(kid)
        except (TargetNotFound, OSError):
            continue
    return out


# ---------------------------------------------------------------------------------------------
# All together


def _internal_error(name: str, err: Exception, status: Status) -> Check:
    return Check(
        name,
        status,
        f"the check itself failed: {type(err).__name__}: {err}",
        "Run `argus -v doctor` and report the output.",
    )


def _guard(name: str, check: Callable[[], Check]) -> Check:
    """Run a node check; an unexpected exception becomes a WARN (unknown), never a crash."""
    try:
        return check()
    except Exception as err:  # noqa: BLE001
        return _internal_error(name, err, Status.WARN)


def run_doctor(
    pid: int | Sequence[int] | None = None,
    *,
    proc_root: str = "/proc",
    boot_dir: str = "/boot",
    release: str | None = None,
    config_text: str | None = None,
    euid: int | None = None,
    cap_eff: int | None = None,
    tracefs_candidates: Sequence[str] = TRACEFS_CANDIDATES,
    uprobe_pmu: str = UPROBE_PMU_TYPE,
    perf_event_paranoid: int | None = None,
    selftest: Callable[[], object] | None = None,
    nvml_probe: Callable[[], str] | None = None,
) -> DoctorReport:
    """Run every check (and the per-process ones for each PID); see the check functions."""
    pids = [] if pid is None else [pid] if isinstance(pid, int) else list(pid)
    checks = [
        _guard("privileges", lambda: check_privileges(euid, cap_eff, proc_root)),
        _guard(
            "kernel config",
            lambda: check_kernel_config(
                config_text=config_text, proc_root=proc_root, boot_dir=boot_dir, release=release
            ),
        ),
        _guard("tracefs", lambda: check_tracefs(tracefs_candidates, uprobe_pmu)),
        _guard(
            "perf_event_paranoid",
            lambda: check_perf_event_paranoid(perf_event_paranoid, euid, cap_eff, proc_root),
        ),
        _guard("bcc", lambda: check_bcc(selftest)),
    ]
    processes: list[dict[str, object]] = []
    visible: str | None = None
    for p in pids:
        try:
            pchecks, pinfo = inspect_process(p, proc_root, euid=euid)
        except Exception as err:  # noqa: BLE001 - a doctor reports, it does not crash
            pchecks = [_internal_error(f"process {p}", err, Status.FAIL)]
            pinfo = {"tgid": p, "state": "error"}
        checks.extend(pchecks)
        processes.append(pinfo)
        if visible is None and isinstance(pinfo.get("visible_devices"), str):
            visible = str(pinfo["visible_devices"])
    checks.append(_guard("nvml", lambda: check_nvml(nvml_probe, visible)))
    return DoctorReport(checks=checks, processes=processes)


def run_checks(pid: int | Sequence[int] | None = None, **inputs: object) -> list[Check]:
    """The checks of `run_doctor` (same arguments), without the process descriptions."""
    return run_doctor(pid, **inputs).checks  # type: ignore[arg-type]
