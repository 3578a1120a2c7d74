"""The pre-flight checks attach and the daemon run are doctor's checks: a FAIL of doctor's
privileges / kernel config / tracefs line is the typed error attach raises, with the same
detail and remedy; and the channel registry is where the channel switches come from."""

from __future__ import annotations

import pytest

from argus.collect import features
from argus.collect.channels import CONTEXT_ONLY, REGISTRY, SWITCHES, check_switches
from argus.collect.tracer import TraceOptions, Tracer
from argus.errors import KernelFeatureMissing, PermissionDenied, UsageError

pytestmark = pytest.mark.unit

CAP_BPF, CAP_PERFMON = 1 << 39, 1 << 38
NO_UPROBES = {"tracefs_candidates": ("/nonexistent/tracing",), "uprobe_pmu": "/nonexistent/pmu"}


@pytest.mark.parametrize(("euid", "caps", "fails"), [
    (1000, 0, True), (0, 1 << 19, True), (1000, CAP_BPF | CAP_PERFMON, False), (0, None, False)])
def test_require_privileges_is_doctors_privileges_check(euid, caps, fails, tmp_path):
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "status").write_text("Name:\tx\n")  # CapEff unreadable: None
    check = features.check_privileges(euid, caps, str(tmp_path))
    assert (check.status == features.Status.FAIL) == fails
    if fails:
        with pytest.raises(PermissionDenied) as e:
            features.require_privileges(euid, caps, str(tmp_path))
        assert check.detail in e.value.message and e.value.remedy == check.remedy
    else:
        features.require_privileges(euid, caps, str(tmp_path))


def test_require_kernel_raises_doctors_tracefs_fail(tmp_path):
    check = features.check_tracefs(("/nonexistent/tracing",), "/nonexistent/pmu")
    assert check.status == features.Status.FAIL
    with pytest.raises(KernelFeatureMissing) as e:
        features.require_kernel(proc_root=str(tmp_path), **NO_UPROBES)
    assert check.detail in e.value.message and e.value.remedy == check.remedy
    pmu = tmp_path / "pmu"
    pmu.write_text("7\n")  # tracefs missing, the uprobe PMU there: a WARN, tracing works
    features.require_kernel(proc_root=str(tmp_path), tracefs_candidates=("/nonexistent",),
                            uprobe_pmu=str(pmu))


def test_tracepoint_fields_read_the_format_file(tmp_path):
    fmt = tmp_path / "events" / "sched" / "sched_process_fork"
    fmt.mkdir(parents=True)
    (fmt / "format").write_text(
        "name: sched_process_fork\n"
        "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n"
        "\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n")
    fields = features.tracepoint_fields("sched/sched_process_fork", (str(tmp_path),))
    assert fields == {"parent_comm": (8, 16), "child_pid": (44, 4)}
    assert features.fork_child_offset((str(tmp_path),)) == 44
    assert features.tracepoint_fields("sched/none", (str(tmp_path),)) is None


def test_switches_derive_from_the_registry():
    assert [c.name for c in REGISTRY] == ["proc", "calls", "cpu", "host", "kernels", "gpu"]
    assert tuple(SWITCHES) == ("cuda", "nccl", "torch", "cpu", "host", "kernels")
    assert TraceOptions().channels == tuple(SWITCHES)
    assert CONTEXT_ONLY == {"host", "kernels"}
    with pytest.raises(UsageError, match="nothing to trace"):
        check_switches(("host",))
    with pytest.raises(UsageError, match="nothing to trace"):
        check_switches(("host", "kernels"))
    with pytest.raises(UsageError, match="unknown channel"):
        Tracer(TraceOptions(channels=("cuda", "gpus")))


def test_a_tracer_composes_only_the_channels_switched_on():
    tr = Tracer(TraceOptions(channels=("nccl", "cpu")))
    assert [c.name for c in tr.active] == ["proc", "calls", "cpu"]
    assert {lib.channel for lib in tr.specs} == {"nccl"}
    assert tr.uprobe_count == 0 and dict(tr.targets_view) == {}
    assert tr.cuda_device(1) is None
    tr = Tracer(TraceOptions(channels=("cpu", "host")))
    assert [c.name for c in tr.active] == ["proc", "cpu", "host"] and tr.specs == []
