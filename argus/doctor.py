"""`argus doctor`: can tracing work here, and on this process? Each check says how to fix it.

Every check is a function over injectable inputs (proc root, /boot, kernel config text,
euid, capability set, tracefs paths, the bcc self-test, the NVML probe), so each one is
unit-testable on faked inputs. The node checks live in `argus.collect.features`, which
`argus attach` and `argus daemon` call before loading anything (`require_privileges`,
`require_kernel`): doctor cannot pass where attach then fails. `run_doctor` runs them all,
plus the checks of each target process.

Status: PASS (fine), WARN (tracing works, something is degraded or unknown), FAIL (tracing
cannot work until fixed). Exit code: 0 when no check FAILs, 1 otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from argus.collect import identity as rank_ids
from argus.collect import procfs
from argus.collect.features import (
    CAP_BPF,
    CAP_PERFMON,
    CAP_SYS_ADMIN,
    CAP_SYS_PTRACE,
    DEGRADED_CONFIG,
    REQUIRED_CONFIG,
    TRACEFS_CANDIDATES,
    TRACEFS_REMEDY,
    UPROBE_PMU_TYPE,
    Check,
    Status,
    check_bcc,
    check_kernel_config,
    check_nvml,
    check_perf_event_paranoid,
    check_privileges,
    check_tracefs,
    exit_code,
    parse_kernel_config,
    read_cap_eff,
    read_kernel_config,
)
from argus.errors import ArgusError, NotATrainingProcess, TargetNotFound

__all__ = [  # the node checks, re-exported: `argus.doctor` is where callers find them
    "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "DEGRADED_CONFIG",
    "REQUIRED_CONFIG", "SCHEMA", "TRACEFS_CANDIDATES", "TRACEFS_REMEDY", "UPROBE_PMU_TYPE",
    "Check", "DoctorReport", "Status", "check_bcc", "check_kernel_config", "check_nvml",
    "check_perf_event_paranoid", "check_privileges", "check_tracefs", "exit_code",
    "inspect_process", "parse_kernel_config", "read_cap_eff", "read_kernel_config",
    "run_checks", "run_doctor",
]

SCHEMA = "argus.doctor/1"


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
        identity = rank_ids.rank_identity(tgid, proc_root)
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
        checks.append(_gpu_agent_check(tgid, proc_root, info))
    return checks, info


GPU_AGENT_REMEDY = ("Start the job with argus's GPU agent: eval \"$(argus gpu-env)\" before the "
                    "launcher (docs/gpu.md); it loads at CUDA/NCCL init and stays dormant "
                    "until argus attaches.")


def _gpu_agent_check(tgid: int, proc_root: str, info: dict[str, object]) -> Check:
    """Has this rank argus's GPU agent (device kernel times: the `kernels` channel), as NCCL
    profiler and/or CUPTI subscriber (its ring header's `loaded`)?"""
    from argus.collect import gpu_agent  # noqa: PLC0415 - only for processes being inspected

    name = f"gpu agent {tgid}"
    path = gpu_agent.owned_file(tgid, proc_root)
    if path is None:
        info["gpu_agent"] = {"loaded": []}
        return Check(name, Status.WARN, "no GPU agent in this process: no device kernel "
                     "times (it was not started with `argus gpu-env`'s variables, or has not "
                     "initialised CUDA/NCCL yet)", GPU_AGENT_REMEDY)
    try:
        with gpu_agent.GpuAgentRing.open(tgid) as ring:
            loaded, enabled, active = ring.loaded, ring.header("enabled"), ring.active
            nccl_v = ring.header("nccl_version")
    except ArgusError as err:
        info["gpu_agent"] = {"file": str(path), "error": err.message}
        return Check(name, Status.WARN, f"cannot read its GPU agent: {err.message}", err.remedy)
    names = gpu_agent.bit_names(loaded)
    info["gpu_agent"] = {"file": str(path), "loaded": names, "enabled": bool(enabled),
                         "active": gpu_agent.bit_names(active), "nccl_version": nccl_v}
    as_ = [f"NCCL profiler plugin (v{nccl_v})"] if loaded & gpu_agent.LOADED_NCCL else []
    as_ += ["CUPTI subscriber"] if loaded & gpu_agent.LOADED_CUPTI else []
    state = (f"enabled, active: {', '.join(gpu_agent.bit_names(active)) or 'nothing yet'} "
             "(an argus session reads it)" if enabled else "dormant")
    if not as_:
        return Check(name, Status.WARN, f"GPU agent file {path} present but neither NCCL nor "
                     "CUPTI has called it yet", "Wait for CUDA/NCCL init; "
                     "if it never comes, check NCCL_PROFILER_PLUGIN and CUDA_INJECTION64_PATH.")
    missing = []
    if not loaded & gpu_agent.LOADED_CUPTI:
        missing.append("no CUPTI (no compute-kernel or copy times: libcupti.so.12 not found "
                       "(set ARGUS_GPU_CUPTI), or another CUPTI tool such as Nsight or the "
                       "PyTorch profiler holds the one subscriber slot)")
    if not loaded & gpu_agent.LOADED_NCCL:
        missing.append("no NCCL profiler (no collective kernel times: no communicator yet, "
                       "NCCL older than 2.26, or NCCL_PROFILER_PLUGIN unset)")
    text = f"GPU agent loaded as {' and '.join(as_)}, {state}"
    if missing:
        return Check(name, Status.WARN, f"{text}; {'; '.join(missing)}", GPU_AGENT_REMEDY)
    return Check(name, Status.PASS, f"{text}: device kernel times will be recorded")


def _python_frames_check(tgid: int, proc_root: str, info: dict[str, object]) -> Check | None:
    """Can CPU samples of this process carry Python frames (argus/collect/cpython_walk.py)?
    None when it does not run CPython."""
    from argus.collect import cpython_walk  # noqa: PLC0415 - only for processes being inspected

    name = f"python {tgid}"
    try:
        maps = procfs.parse_maps(Path(proc_root, str(tgid), "maps").read_text())
        found = cpython_walk.describe(tgid, maps, proc_root, exe=info.get("exe"))  # type: ignore[arg-type]
    except cpython_walk.NotPython:
        return None
    except cpython_walk.LayoutRefused as err:
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
