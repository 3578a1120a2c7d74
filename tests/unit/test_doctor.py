"""Every doctor check on faked inputs (PASS/WARN/FAIL), and the `doctor` command."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.fakeproc import lib_maps, make_process, write_config_gz, write_self  # noqa: E402

from argus import doctor  # noqa: E402
from argus.cli import doctor as doctor_cli  # noqa: E402
from argus.collect import procfs  # noqa: E402
from argus.collect.bcc_adapter import HEADERS_REMEDY, SelftestResult  # noqa: E402
from argus.doctor import Status  # noqa: E402
from argus.errors import KernelFeatureMissing, PermissionDenied, ProbeAttachFailed  # noqa: E402

pytestmark = pytest.mark.unit

CAP = {
    name: 1 << bit for name, bit in (("PTRACE", 19), ("ADMIN", 21), ("PERFMON", 38), ("BPF", 39))
}
ALL_CAPS = 0x000001FFFEFFFFFF  # what root has on these machines

GOOD_CONFIG = """\
CONFIG_BPF=y
CONFIG_BPF_SYSCALL=y
CONFIG_BPF_JIT=y
CONFIG_UPROBES=y
CONFIG_UPROBE_EVENTS=y
CONFIG_PERF_EVENTS=y
CONFIG_BPF_EVENTS=y
CONFIG_DEBUG_INFO_BTF=y
# CONFIG_KPROBES is not set
"""

SECRET = "hunter2-do-not-leak"


# ------------------------------------------------------------------------------ privileges


@pytest.mark.parametrize(
    ("euid", "caps", "status", "needle"),
    [
        (0, ALL_CAPS, Status.PASS, "root with CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN"),
        (1000, CAP["BPF"] | CAP["PERFMON"], Status.PASS, "only your own processes"),
        (1000, CAP["ADMIN"] | CAP["PTRACE"], Status.PASS, "uid 1000 with CAP_SYS_ADMIN"),
        (1000, CAP["BPF"], Status.FAIL, "without CAP_PERFMON"),
        (1000, 0, Status.FAIL, "without CAP_BPF and CAP_PERFMON"),
        (0, CAP["PTRACE"], Status.FAIL, "running as root without CAP_BPF and CAP_PERFMON"),
    ],
)
def test_privileges(euid: int, caps: int, status: Status, needle: str) -> None:
    c = doctor.check_privileges(euid=euid, cap_eff=caps)
    assert c.status == status
    assert needle in c.detail
    assert bool(c.remedy) == (status == Status.FAIL)


def test_privileges_reads_capeff_from_proc_self_status(tmp_path: Path) -> None:
    write_self(tmp_path, CAP["BPF"] | CAP["PERFMON"])
    assert doctor.read_cap_eff(str(tmp_path)) == CAP["BPF"] | CAP["PERFMON"]
    assert doctor.check_privileges(euid=1000, proc_root=str(tmp_path)).status == Status.PASS
    write_self(tmp_path, CAP["PERFMON"])
    assert doctor.check_privileges(euid=1000, proc_root=str(tmp_path)).status == Status.FAIL


def test_privileges_unreadable_caps(tmp_path: Path) -> None:
    assert doctor.check_privileges(euid=0, proc_root=str(tmp_path)).status == Status.WARN
    assert doctor.check_privileges(euid=1000, proc_root=str(tmp_path)).status == Status.FAIL


# ------------------------------------------------------------------------------ kernel config


def test_kernel_config_pass_mentions_kprobes_off() -> None:
    c = doctor.check_kernel_config(config_text=GOOD_CONFIG, source="test")
    assert c.status == Status.PASS
    assert "CONFIG_KPROBES off (fine" in c.detail
    assert c.remedy == ""


def test_kernel_config_missing_required_fails_naming_options() -> None:
    text = GOOD_CONFIG.replace("CONFIG_UPROBE_EVENTS=y", "# CONFIG_UPROBE_EVENTS is not set")
    text = text.replace("CONFIG_BPF_EVENTS=y\n", "")
    c = doctor.check_kernel_config(config_text=text)
    assert c.status == Status.FAIL
    assert "CONFIG_UPROBE_EVENTS off" in c.detail and "CONFIG_BPF_EVENTS off" in c.detail
    assert c.remedy == "Boot a kernel built with CONFIG_UPROBE_EVENTS=y, CONFIG_BPF_EVENTS=y."


def test_kernel_config_btf_or_jit_off_only_warns() -> None:
    text = GOOD_CONFIG.replace("CONFIG_DEBUG_INFO_BTF=y", "# CONFIG_DEBUG_INFO_BTF is not set")
    c = doctor.check_kernel_config(config_text=text)
    assert c.status == Status.WARN
    assert "CONFIG_DEBUG_INFO_BTF off" in c.detail
    text = GOOD_CONFIG.replace("CONFIG_BPF_JIT=y", "")
    assert doctor.check_kernel_config(config_text=text).status == Status.WARN


def test_kernel_config_from_proc_config_gz_then_boot(tmp_path: Path) -> None:
    proc, boot = tmp_path / "proc", tmp_path / "boot"
    boot.mkdir()
    (boot / "config-6.1.0-test").write_text(GOOD_CONFIG.replace("CONFIG_PERF_EVENTS=y", ""))
    c = doctor.check_kernel_config(proc_root=str(proc), boot_dir=str(boot), release="6.1.0-test")
    assert c.status == Status.FAIL and "CONFIG_PERF_EVENTS" in c.detail
    assert "config-6.1.0-test" in c.detail
    write_config_gz(proc, GOOD_CONFIG)  # /proc/config.gz wins over /boot
    c = doctor.check_kernel_config(proc_root=str(proc), boot_dir=str(boot), release="6.1.0-test")
    assert c.status == Status.PASS and "config.gz" in c.detail


def test_kernel_config_unknown_warns(tmp_path: Path) -> None:
    c = doctor.check_kernel_config(proc_root=str(tmp_path), boot_dir=str(tmp_path), release="x")
    assert c.status == Status.WARN
    assert "unknown" in c.detail
    assert "modprobe configs" in c.remedy


def test_parse_kernel_config() -> None:
    cfg = doctor.parse_kernel_config('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\n#x\n')
    assert cfg == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "x y"}


# ------------------------------------------------------------------------------ tracefs


def test_tracefs(tmp_path: Path) -> None:
    tracing, debug = tmp_path / "tracing", tmp_path / "debug_tracing"
    tracing.mkdir()
    debug.mkdir()
    pmu = tmp_path / "uprobe_type"
    cands = (str(tracing), str(debug))
    c = doctor.check_tracefs(cands, str(pmu))
    assert c.status == Status.FAIL
    assert c.remedy == "Mount it: mount -t tracefs tracefs /sys/kernel/tracing"
    pmu.write_text("8\n")
    c = doctor.check_tracefs(cands, str(pmu))
    assert c.status == Status.WARN and "tracepoints" in c.detail
    assert "mount -t tracefs" in c.remedy
    (debug / "uprobe_events").write_text("")
    c = doctor.check_tracefs(cands, str(pmu))
    assert c.status == Status.PASS and c.detail == f"mounted at {debug}"


# ------------------------------------------------------------------------------ perf_event_paranoid


def test_perf_event_paranoid(tmp_path: Path) -> None:
    assert doctor.check_perf_event_paranoid(4, euid=0, cap_eff=0).status == Status.PASS
    c = doctor.check_perf_event_paranoid(3, euid=1000, cap_eff=CAP["BPF"])
    assert c.status == Status.WARN and "sysctl kernel.perf_event_paranoid=2" in c.remedy
    assert doctor.check_perf_event_paranoid(3, euid=1000, cap_eff=CAP["PERFMON"]).status == (
        Status.PASS
    )
    assert doctor.check_perf_event_paranoid(2, euid=1000, cap_eff=0).status == Status.PASS
    # read from the proc tree
    p = tmp_path / "sys" / "kernel"
    p.mkdir(parents=True)
    (p / "perf_event_paranoid").write_text("3\n")
    c = doctor.check_perf_event_paranoid(euid=1000, cap_eff=0, proc_root=str(tmp_path))
    assert c.status == Status.WARN and c.detail.startswith("3:")
    (p / "perf_event_paranoid").unlink()
    c = doctor.check_perf_event_paranoid(euid=0, cap_eff=0, proc_root=str(tmp_path))
    assert c.status == Status.WARN and "CONFIG_PERF_EVENTS" in c.detail


# ------------------------------------------------------------------------------ bcc


def _raise(err: Exception):
    def f() -> object:
        raise err

    return f


def test_bcc_pass() -> None:
    c = doctor.check_bcc(lambda: SelftestResult(bcc_version="0.26.0", compile_load_s=0.4))
    assert c.status == Status.PASS
    assert c.detail == "bcc 0.26.0 compiled and loaded a test BPF program in 0.40 s"


@pytest.mark.parametrize(
    "err",
    [
        KernelFeatureMissing("bcc cannot compile BPF programs: kernel headers ...", HEADERS_REMEDY),
        ProbeAttachFailed("bcc is not importable (No module named 'bcc')", "Install bcc."),
        PermissionDenied("the kernel refused to load a BPF program"),
    ],
)
def test_bcc_fail_carries_remedy(err: Exception) -> None:
    c = doctor.check_bcc(_raise(err))
    assert c.status == Status.FAIL
    assert c.detail == err.message and c.remedy == err.remedy and c.remedy


def test_bcc_unexpected_exception_is_a_fail_not_a_crash() -> None:
    c = doctor.check_bcc(_raise(RuntimeError("boom")))
    assert c.status == Status.FAIL and "RuntimeError: boom" in c.detail


def test_headers_error_text_is_recognised(monkeypatch: pytest.MonkeyPatch) -> None:
    """bcc_selftest maps libbcc's headers message to KernelFeatureMissing with the remedy."""
    import types

    from argus.collect import bcc_adapter

    class FakeBPF:
        KPROBE = 2

        def __init__(self, text: str) -> None:
            # libbcc writes this from C, on file descriptor 1
            os.write(1, b"Unable to find kernel headers. Try rebuilding kernel with ...\n")
            raise Exception("Failed to compile BPF module <text>")

    monkeypatch.setitem(sys.modules, "bcc", types.SimpleNamespace(BPF=FakeBPF, __version__="0"))
    with pytest.raises(KernelFeatureMissing) as ei:
        bcc_adapter.bcc_selftest()
    assert ei.value.remedy == HEADERS_REMEDY


# ------------------------------------------------------------------------------ nvml


def test_nvml() -> None:
    c = doctor.check_nvml(_raise(OSError("NVML Shared Library Not Found")))
    assert c.status == Status.WARN
    assert c.detail.startswith("NVML not available: GPU counters off")
    c = doctor.check_nvml(lambda: "driver 550.54.15, 8 GPU(s)", visible_devices="3")
    assert c.status == Status.PASS
    assert c.detail == "driver 550.54.15, 8 GPU(s); the process sees CUDA_VISIBLE_DEVICES=3"


# ------------------------------------------------------------------------------ a target process


def _rank(proc: Path, tgid: int, rank: int, **kw: object) -> None:
    maps = lib_maps("/usr/local/cuda/lib64/libcudart.so.12.4.127", 0x7F1000000000) + lib_maps(
        "/opt/nccl/libnccl.so.2.21.5", 0x7F2000000000
    )
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % 2),
        "WORLD_SIZE": "2",
        "CUDA_VISIBLE_DEVICES": str(rank % 2),
        "SECRET_TOKEN": SECRET,
    }
    make_process(proc, tgid, maps=maps, environ=env, **kw)  # type: ignore[arg-type]


def _by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_process_rank_pass(tmp_path: Path) -> None:
    _rank(tmp_path, 100, 1)
    checks, info = doctor.inspect_process(100, str(tmp_path), euid=0)
    by = _by_name(checks)
    # no GPU agent file mapped by this process: a WARN naming `argus gpu-env`
    assert [c.status for c in checks] == [Status.PASS] * 3 + [Status.WARN]
    assert by["gpu agent 100"].detail.startswith("no GPU agent in this process")
    assert "argus gpu-env" in by["gpu agent 100"].remedy and info["gpu_agent"] == {"loaded": []}
    assert (
        "libcudart 12.4.127 (/usr/local/cuda/lib64/libcudart.so.12.4.127)"
        in by["libraries 100"].detail
    )
    assert "libnccl 2.21.5" in by["libraries 100"].detail
    assert by["rank 100"].detail == "rank 1, local rank 1, world size 2 (from RANK)"
    assert info["identity"]["env"]["CUDA_VISIBLE_DEVICES"] == "1"  # type: ignore[index]
    assert SECRET not in json.dumps(info)


def test_process_missing_other_user_no_permission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks, info = doctor.inspect_process(999999, str(tmp_path), euid=0)
    assert [(c.status, c.detail) for c in checks] == [(Status.FAIL, "no process with PID 999999")]
    assert info == {"tgid": 999999, "state": "missing"}

    _rank(tmp_path, 100, 0, uid=1001)

    def deny(path: Path) -> bytes:
        if path.name in ("maps", "environ"):
            raise PermissionError(13, "Permission denied")
        return path.read_bytes()

    monkeypatch.setattr(procfs, "_read", deny)
    (c,), info = doctor.inspect_process(100, str(tmp_path), euid=1000)
    assert c.status == Status.FAIL and "another user (uid 1001)" in c.detail
    assert info["state"] == "other_user"
    (c,), info = doctor.inspect_process(100, str(tmp_path), euid=0)
    assert c.status == Status.FAIL and "refuses" in c.detail
    assert info["state"] == "no_permission"


def test_process_not_training_fails(tmp_path: Path) -> None:
    make_process(tmp_path, 100, maps=lib_maps("/usr/lib/libpython3.11.so.1.0", 0x7F0000000000))
    checks, _ = doctor.inspect_process(100, str(tmp_path), euid=0)
    lib = _by_name(checks)["libraries 100"]
    assert lib.status == Status.FAIL
    assert lib.detail.startswith(
        "not a training process: maps none of libcudart/libcuda/libnccl/libtorch"
    )
    assert "launcher" in lib.remedy
    assert "rank 100" not in _by_name(checks)  # no rank WARN on top of the FAIL


def test_launcher_with_rank_descendants_passes(tmp_path: Path) -> None:
    make_process(tmp_path, 10, name="torchrun", environ={"MASTER_PORT": "29500"})
    _rank(tmp_path, 11, 0, ppid=10)
    _rank(tmp_path, 12, 1, ppid=10)
    make_process(tmp_path, 13, ppid=10, name="helper")  # a non-rank child
    checks, info = doctor.inspect_process(10, str(tmp_path), euid=0)
    by = _by_name(checks)
    assert by["libraries 10"].status == Status.PASS
    assert "2 descendant(s) do (tgids 11, 12)" in by["libraries 10"].detail
    assert info["rank_tgids"] == [11, 12]
    assert "rank 10" not in by


def test_rank_unknown_warns(tmp_path: Path) -> None:
    make_process(tmp_path, 100, maps=lib_maps("/x/libcuda.so.1", 0x7F0000000000))
    c = _by_name(doctor.inspect_process(100, str(tmp_path), euid=0)[0])["rank 100"]
    assert c.status == Status.WARN and "NCCL communicator init" in c.detail


# ------------------------------------------------------------------------------ run_doctor


def _fake_system(tmp_path: Path) -> dict[str, object]:
    proc = tmp_path / "proc"
    write_self(proc, ALL_CAPS)
    write_config_gz(proc, GOOD_CONFIG)
    (proc / "sys" / "kernel").mkdir(parents=True)
    (proc / "sys" / "kernel" / "perf_event_paranoid").write_text("2\n")
    tracing = tmp_path / "tracing"
    tracing.mkdir()
    (tracing / "uprobe_events").write_text("")
    return {
        "proc_root": str(proc),
        "boot_dir": str(tmp_path / "boot"),
        "release": "6.18.0-test",
        "euid": 0,
        "tracefs_candidates": (str(tracing),),
        "uprobe_pmu": str(tmp_path / "none"),
        "selftest": lambda: SelftestResult("0.26.0", 0.2),
        "nvml_probe": _raise(OSError("NVML Shared Library Not Found")),
    }


def test_run_doctor_all_pass_then_exit_codes(tmp_path: Path) -> None:
    inputs = _fake_system(tmp_path)
    proc = Path(str(inputs["proc_root"]))
    _rank(proc, 100, 0)
    report = doctor.run_doctor(100, **inputs)  # type: ignore[arg-type]
    names = [c.name for c in report.checks]
    assert names == [
        "privileges", "kernel config", "tracefs", "perf_event_paranoid", "bcc",
        "process 100", "libraries 100", "rank 100", "gpu agent 100", "nvml",
    ]
    assert [c.status for c in report.checks].count(Status.FAIL) == 0
    assert report.ok and doctor.exit_code(report.checks) == 0
    nvml = report.checks[-1]
    assert nvml.status == Status.WARN and "CUDA_VISIBLE_DEVICES" not in nvml.detail
    report = doctor.run_doctor([100, 999999], **inputs)  # type: ignore[arg-type]
    assert not report.ok and doctor.exit_code(report.checks) == 1
    checks = doctor.run_checks(None, **inputs)
    assert len(checks) == 6 and doctor.exit_code(checks) == 0


# ------------------------------------------------------------------------------ the command


@pytest.fixture
def fake_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    inputs = _fake_system(tmp_path)
    monkeypatch.setattr(doctor_cli, "run_doctor", functools.partial(doctor.run_doctor, **inputs))
    proc = Path(str(inputs["proc_root"]))
    _rank(proc, 100, 1)
    return proc


def test_cli_json_is_one_object_and_leaks_no_secret(fake_cli: Path) -> None:
    res = CliRunner().invoke(doctor_cli.command, ["-p", "100", "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)  # nothing else on stdout
    assert obj["schema"] == "argus.doctor/1" and obj["ok"] is True
    assert {c["status"] for c in obj["checks"]} <= {"PASS", "WARN"}
    assert set(obj["checks"][0]) == {"name", "status", "detail", "remedy"}
    assert obj["process"]["tgid"] == 100
    assert obj["process"]["identity"]["rank"] == 1
    assert obj["process"]["libraries"][0]["version"] == "12.4.127"
    assert obj["process"]["libraries"][0]["base"] == "0x7f1000000000"
    assert SECRET not in res.output and "SECRET_TOKEN" not in res.output


def test_cli_table_leaks_no_secret(fake_cli: Path) -> None:
    res = CliRunner().invoke(doctor_cli.command, ["-p", "100"])
    assert res.exit_code == 0
    assert "libcudart 12.4.127" in res.output and "PASS" in res.output
    assert "tracing can work here." in res.output
    assert SECRET not in res.output and "SECRET_TOKEN" not in res.output


def test_cli_missing_pid_exits_1_with_one_sentence(fake_cli: Path) -> None:
    res = CliRunner().invoke(doctor_cli.command, ["-p", "999999"])
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)  # a clean exit, not a crash
    assert "argus cannot trace: no process with PID 999999." in res.stderr
    res = CliRunner().invoke(doctor_cli.command, ["-p", "999999", "--json"])
    assert res.exit_code == 1
    obj = json.loads(res.stdout)
    assert obj["ok"] is False and obj["process"] == {"tgid": 999999, "state": "missing"}


@pytest.mark.parametrize("arg", ["notanumber", "0", "-5"])
def test_cli_bad_pid_is_usage_error(arg: str) -> None:
    res = CliRunner().invoke(doctor_cli.command, ["-p", arg])
    assert res.exit_code == 2
    assert "Traceback" not in res.output


def test_cli_help_has_examples() -> None:
    res = CliRunner().invoke(doctor_cli.command, ["--help"])
    assert res.exit_code == 0
    assert "Examples:" in res.output and "argus doctor -p 4242" in res.output


def test_main_entry_point_exit_codes(fake_cli: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through `argus.cli.main` (the console script): 1 for a missing PID, 2 for a bad one."""
    from argus.cli import main

    assert main(["doctor", "-p", "100"]) == 0
    assert main(["doctor", "-p", "999999"]) == 1
    err = capsys.readouterr().err
    assert "argus cannot trace: no process with PID 999999." in err and "Traceback" not in err
    assert main(["doctor", "-p", "notanumber"]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for '-p'" in err and "Traceback" not in err


def test_a_crashing_check_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = _fake_system(tmp_path)

    def boom(*a: object, **k: object) -> doctor.Check:
        raise OSError("weird sysfs")

    monkeypatch.setattr(doctor, "check_tracefs", boom)
    monkeypatch.setattr(doctor, "inspect_process", boom)
    report = doctor.run_doctor(100, **inputs)  # type: ignore[arg-type]
    by = _by_name(report.checks)
    assert by["tracefs"].status == Status.WARN
    assert "OSError: weird sysfs" in by["tracefs"].detail
    assert by["process 100"].status == Status.FAIL
    assert report.processes == [{"tgid": 100, "state": "error"}]


def test_bcc_missing_remedy_names_debians_python_when_another_python_runs_argus() -> None:
    from argus.collect.bcc_adapter import BCC_MISSING_REMEDY, bcc_missing_remedy

    other = bcc_missing_remedy("/root/.pyenv/versions/3.11.7", "3.11")
    assert other.startswith("argus runs on /root/.pyenv/versions/3.11.7/bin/python3.11, "
                            "which cannot see Debian's bcc")
    assert "`/usr/bin/python3 -m venv --system-site-packages .venv`" in other
    assert bcc_missing_remedy("/usr", "3.11") == BCC_MISSING_REMEDY
    assert "/usr/bin/python3" in BCC_MISSING_REMEDY
