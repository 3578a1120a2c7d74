"""procfs on a fake /proc tree: process state, libraries and versions, rank identity, tree."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.fakeproc import (  # noqa: E402
    build_shared_object,
    lib_maps,
    make_process,
    maps_line,
    put_file,
)

from argus.collect import identity, procfs  # noqa: E402
from argus.errors import TargetNotFound  # noqa: E402

pytestmark = pytest.mark.unit

SECRET = "SECRET_TOKEN=hunter2-do-not-leak"


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    return root


def _deny(paths: set[str]):
    """A reader that raises EACCES for the given file names (root ignores chmod 000)."""

    def read(path: Path) -> bytes:
        if path.name in paths:
            raise PermissionError(13, "Permission denied", str(path))
        return path.read_bytes()

    return read


# ------------------------------------------------------------------------------ process state


def test_missing_process_raises_target_not_found(proc: Path) -> None:
    with pytest.raises(TargetNotFound) as ei:
        procfs.process_state(999999, proc)
    assert str(ei.value) == "no process with PID 999999"
    assert ei.value.reason == "missing"
    assert ei.value.exit_code == 1


def test_a_zombie_is_gone_though_its_entry_stays(proc: Path) -> None:
    make_process(proc, 100, name="launcher", state="Z")
    make_process(proc, 101, name="rank", state="R")
    make_process(proc, 102, name="waiting", state="S")
    assert [procfs.alive(t, proc) for t in (100, 101, 102, 103)] == [False, True, True, False]
    assert procfs.state(100, proc) == "Z" and procfs.state(103, proc) is None
    with pytest.raises(TargetNotFound) as ei:
        procfs.process_state(100, proc)
    assert str(ei.value) == "process 100 has exited (a zombie its parent has not reaped yet)"
    assert ei.value.reason == "missing"
    err = procfs.exited_error(100)
    assert str(err) == "process 100 exited while argus was starting"
    assert err.reason == "exited" and err.exit_code == 1


def test_readable_process(proc: Path) -> None:
    make_process(proc, 100, name="trainer", uid=1000, ppid=7)
    info = procfs.process_state(100, proc, euid=1000)
    assert info == procfs.ProcessInfo(tgid=100, comm="trainer", uid=1000, ppid=7, access="readable")


def test_other_user_when_not_root(proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_process(proc, 100, uid=1001)
    monkeypatch.setattr(procfs, "_read", _deny({"maps", "environ"}))
    with pytest.raises(TargetNotFound) as ei:
        procfs.process_state(100, proc, euid=1000)
    assert ei.value.reason == "other_user"
    assert "belongs to another user (uid 1001)" in str(ei.value)
    assert "root" in ei.value.remedy


def test_no_permission_for_own_or_as_root(proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_process(proc, 100, uid=1000)
    monkeypatch.setattr(procfs, "_read", _deny({"environ"}))
    for euid in (0, 1000):  # root refused, or our own non-dumpable process
        with pytest.raises(TargetNotFound) as ei:
            procfs.process_state(100, proc, euid=euid)
        assert ei.value.reason == "no_permission"
        assert "refuses" in str(ei.value)
        assert "ptrace_scope" in ei.value.remedy


def test_thread_id_is_not_a_process(proc: Path) -> None:
    make_process(proc, 101, status_tgid=100)
    with pytest.raises(TargetNotFound, match="thread of process 100"):
        procfs.process_state(101, proc)


def test_comm_exe_cmdline(proc: Path) -> None:
    make_process(proc, 100, name="torchrun", exe="/usr/bin/python3", cmdline=("torchrun", "-n"))
    assert procfs.comm(100, proc) == "torchrun"
    assert procfs.exe(100, proc) == "/usr/bin/python3"
    assert procfs.cmdline(100, proc) == ["torchrun", "-n"]
    make_process(proc, 2, name="kthreadd", exe=None, cmdline=())
    assert procfs.exe(2, proc) is None
    assert procfs.cmdline(2, proc) == []
    with pytest.raises(TargetNotFound):
        procfs.comm(5, proc)


# ------------------------------------------------------------------------------ children


def test_children_from_task_children_files(proc: Path) -> None:
    make_process(proc, 10, children=[12, 11])
    make_process(proc, 11, ppid=10, children=[13])
    make_process(proc, 12, ppid=10, children=[])
    make_process(proc, 13, ppid=11, children=[])
    make_process(proc, 20, ppid=10, children=[])  # the stat ppid is ignored with children files
    assert procfs.children(10, proc) == [11, 12]
    assert procfs.descendants(10, proc) == [11, 12, 13]


def test_children_fall_back_to_stat_ppid(proc: Path) -> None:
    make_process(proc, 10, name="torch (run) x")  # comm with parens and spaces
    make_process(proc, 11, ppid=10, name="a) b")
    make_process(proc, 12, ppid=10)
    make_process(proc, 13, ppid=12)
    make_process(proc, 14, ppid=1)
    (proc / "self").mkdir()  # non-numeric entries are skipped
    assert procfs.children(10, proc) == [11, 12]
    assert procfs.descendants(10, proc) == [11, 12, 13]
    assert procfs.descendants(14, proc) == []
    with pytest.raises(TargetNotFound):
        procfs.children(99, proc)


# ------------------------------------------------------------------------------ libraries


def test_parse_maps_skips_anonymous_and_strips_deleted() -> None:
    text = (
        "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n"
        "7f0000001000-7f0000002000 r--p 00000000 00:00 0    [heap]\n"
        "7f0000002000-7f0000003000 r-xp 00001000 fd:01 42   /opt/lib/libnccl.so.2.21.5 (deleted)\n"
        "7f0000003000-7f0000004000 r-xp 00002000 fd:01 43   /opt/my lib/libx.so\n"
    )
    maps = procfs.parse_maps(text)
    assert len(maps) == 2
    assert maps[0] == procfs.Mapping(
        start=0x7F0000002000,
        end=0x7F0000003000,
        offset=0x1000,
        perms="r-xp",
        dev="fd:01",
        inode=42,
        path="/opt/lib/libnccl.so.2.21.5",
        deleted=True,
    )
    assert maps[1].path == "/opt/my lib/libx.so"


@pytest.mark.parametrize(
    ("path", "family"),
    [
        ("/usr/local/cuda/lib64/libcudart.so.12.4.127", "libcudart"),
        ("/site/torch/lib/libcudart-9335f6a2.so.12", "libcudart"),
        ("/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15", "libcuda"),
        ("/site/nvidia/nccl/lib/libnccl.so.2", "libnccl"),
        ("/site/torch/lib/libtorch_cuda.so", "libtorch_cuda"),
        ("/site/torch/lib/libtorch_cpu.so", "libtorch_cpu"),
        ("/usr/lib/libnvidia-ml.so.1", "libnvidia-ml"),
        ("/usr/lib/libpython3.11.so.1.0", "libpython"),
        ("/usr/lib/libcudnn.so.9", None),
        ("/usr/lib/libcudart_static.a", None),
        ("/usr/lib/libtorch_python.so", None),
    ],
)
def test_library_family(path: str, family: str | None) -> None:
    assert procfs.library_family(path) == family


def test_mapped_libraries_versions_bases_and_host_paths(proc: Path, tmp_path: Path) -> None:
    cudart = "/usr/local/cuda/lib64/libcudart.so.12.4.127"
    nccl = "/opt/nccl/lib/libnccl.so"  # no version in the name: comes from the soname
    torch = "/site/torch/lib/libtorch_cpu.so"  # no version anywhere
    maps = (
        maps_line(0x555500000000, 0x555500001000, "r--p", 0, "/usr/bin/python3.11")
        + lib_maps(cudart, 0x7F1000000000)
        + "7f2000000000-7f2000001000 rw-p 00000000 00:00 0 \n"
        + lib_maps(nccl, 0x7F3000000000)
        + lib_maps(torch, 0x7F4000000000)
    )
    make_process(proc, 100, maps=maps)
    try:
        so = build_shared_object(tmp_path / "nccl.so", "libnccl.so.2")
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"cannot build a test ELF: {e}")
    put_file(proc, 100, nccl, so)
    put_file(proc, 100, cudart, b"not an elf")
    libs = procfs.mapped_libraries(100, proc)
    assert [lib.name for lib in libs] == ["libcudart", "libnccl", "libtorch_cpu"]
    c, n, t = libs
    assert (c.version, c.version_source, c.soname) == ("12.4.127", "filename", None)
    assert c.base == 0x7F1000000000
    assert c.path == cudart
    assert c.host_path == str(proc / "100" / "root" / cudart.lstrip("/"))
    assert len(c.mappings) == 4
    assert [m.perms for m in c.mappings] == ["r--p", "r-xp", "r--p", "rw-p"]
    assert (n.version, n.version_source, n.soname) == ("2", "soname", "libnccl.so.2")
    assert n.base == 0x7F3000000000
    assert (t.version, t.version_source) == (None, None)
    assert c.to_dict()["base"] == "0x7f1000000000"
    assert procfs.is_training_process(libs)


def test_version_from_pip_wheel_dist_info(proc: Path) -> None:
    site = "/venv/lib/python3.11/site-packages"
    cudart = f"{site}/nvidia/cuda_runtime/lib/libcudart.so.12"
    make_process(proc, 100, maps=lib_maps(cudart, 0x7F1000000000))
    put_file(proc, 100, cudart, b"\x7fELF-truncated")
    (
        proc / "100" / "root" / site.lstrip("/") / "nvidia_cuda_runtime_cu12-12.4.127.dist-info"
    ).mkdir()
    (lib,) = procfs.mapped_libraries(100, proc)
    assert (lib.version, lib.version_source) == ("12.4.127", "wheel")


def test_base_is_lowest_offset_zero_mapping(proc: Path) -> None:
    path = "/x/libcuda.so.1"
    maps = maps_line(0x7F0000010000, 0x7F0000020000, "r-xp", 0x10000, path) + maps_line(
        0x7F0000000000, 0x7F0000010000, "r--p", 0, path
    )
    make_process(proc, 100, maps=maps)
    (lib,) = procfs.mapped_libraries(100, proc)
    assert lib.base == 0x7F0000000000
    assert lib.version == "1"
    make_process(proc, 101, maps=maps_line(0x7F0000010000, 0x7F0000020000, "r-xp", 0x10000, path))
    assert procfs.mapped_libraries(101, proc)[0].base is None


def test_python_only_process_is_not_training(proc: Path) -> None:
    maps = lib_maps("/usr/lib/libpython3.11.so.1.0", 0x7F0000000000) + lib_maps(
        "/usr/lib/libnvidia-ml.so.1", 0x7F1000000000
    )
    make_process(proc, 100, maps=maps)
    libs = procfs.mapped_libraries(100, proc)
    assert [(lib.name, lib.version) for lib in libs] == [
        ("libpython", "3.11"),
        ("libnvidia-ml", "1"),
    ]
    assert not procfs.is_training_process(libs)


# ------------------------------------------------------------------------------ rank identity


def test_rank_identity_allowlist_only(proc: Path) -> None:
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "10.0.0.1",
        "CUDA_VISIBLE_DEVICES": "1",
        "NCCL_DEBUG": "INFO",
        "AWS_SECRET_ACCESS_KEY": "abc",
        "PATH": "/usr/bin",
    }
    make_process(proc, 100, environ=env)
    (proc / "100" / "environ").write_bytes(
        (proc / "100" / "environ").read_bytes() + SECRET.encode() + b"\0garbage-no-equals\0"
    )
    ident = identity.rank_identity(100, proc)
    assert ident == {
        "rank": 3,
        "local_rank": 1,
        "world_size": 8,
        "source": "RANK",
        "env": {
            "RANK": "3",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "8",
            "MASTER_ADDR": "10.0.0.1",
            "CUDA_VISIBLE_DEVICES": "1",
        },
    }
    assert "hunter2" not in repr(ident)


def test_rank_identity_fallbacks_and_bad_values(proc: Path) -> None:
    make_process(
        proc,
        100,
        environ={
            "RANK": "not-a-number",
            "OMPI_COMM_WORLD_RANK": "5",
            "OMPI_COMM_WORLD_LOCAL_RANK": "2",
            "SLURM_NTASKS": "16",
            "SLURM_PROCID": "0",
        },
    )
    ident = identity.rank_identity(100, proc)
    assert (ident["rank"], ident["local_rank"], ident["world_size"]) == (5, 2, 16)
    assert ident["source"] == "OMPI_COMM_WORLD_RANK"
    make_process(proc, 101, environ={"HOME": "/root"})
    ident = identity.rank_identity(101, proc)
    assert ident == {
        "rank": None,
        "local_rank": None,
        "world_size": None,
        "source": None,
        "env": {},
    }


def test_environ_values_are_capped() -> None:
    env = identity.parse_environ(b"MASTER_ADDR=" + b"a" * 5000 + b"\0")
    assert len(env["MASTER_ADDR"]) == 256


# ------------------------------------------------------------------------------ rank workers


def test_dataloader_workers_are_not_ranks(proc: Path) -> None:
    """A rank's forked DataLoader workers inherit RANK: workers of the rank, not ranks; a
    rank started by a shell wrapper with RANK set is a rank (the wrapper maps no library)."""
    from argus.daemon.config import DaemonConfig
    from argus.daemon.discovery import Scanner

    torch = lib_maps("/opt/venv/torch/lib/libtorch_cpu.so", 0x7F0000000000)
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "n1",
           "MASTER_PORT": "29500"}
    make_process(proc, 50, name="torchrun", ppid=1, maps=torch,
                 environ={"MASTER_ADDR": "n1", "MASTER_PORT": "29500"},
                 cmdline=("/usr/bin/python3", "/usr/local/bin/torchrun", "train.py"))
    make_process(proc, 60, name="python", ppid=50, maps=torch, environ=env)  # the rank
    for w in (61, 62):  # its DataLoader workers (num_workers=2)
        make_process(proc, w, name="pt_data_worker", ppid=60, maps=torch, environ=env)
    make_process(proc, 70, name="bash", ppid=50, environ={**env, "RANK": "0", "LOCAL_RANK": "0"},
                 cmdline=("/bin/bash", "run.sh"), exe="/bin/bash")
    make_process(proc, 71, name="python", ppid=70, maps=torch,
                 environ={**env, "RANK": "0", "LOCAL_RANK": "0"})
    other = {**env, "RANK": "0", "LOCAL_RANK": "0"}  # a child with another rank: a rank
    make_process(proc, 80, name="python", ppid=60, maps=torch, environ=other)
    assert [identity.worker_of(t, proc) for t in (60, 61, 62, 71, 80)] == [None, 60, 60, None, None]
    assert procfs.parent(62, proc) == 60
    found = Scanner(DaemonConfig(), str(proc)).scan()
    assert sorted((f.tgid, f.rank) for f in found) == [(60, 1), (71, 0), (80, 0)]


def test_cpu_times_reads_the_nodes_cpu_line_in_ns(tmp_path):
    from argus.collect.procfs import cpu_times

    (tmp_path / "stat").write_text(
        "cpu  3912804 10607 653358 11179854 13760 0 9565 79660 0 0\n"
        "cpu0 1688222 3613 305511 5881019 2811 0 3679 41736 0 0\n")
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    total = 3912804 + 10607 + 653358 + 11179854 + 13760 + 0 + 9565 + 79660
    assert cpu_times(tmp_path) == (total * tick, 79660 * tick)
    (tmp_path / "stat").write_text("intr 1 2 3\n")
    assert cpu_times(tmp_path) is None
    assert cpu_times(tmp_path / "missing") is None


def test_mapped_code_is_the_size_of_the_executable_mappings_and_none_when_gone(proc: Path):
    """VmExe/VmLib (kB) of a live process; a zombie's status has no Vm lines; gone: None."""
    d = make_process(proc, 300, name="rank")
    (d / "status").write_text(
        "Name:\trank\nState:\tS (sleeping)\nTgid:\t300\nVmPeak:\t 9000 kB\nVmRSS:\t 5000 kB\n"
        "VmData:\t 2000 kB\nVmStk:\t 132 kB\nVmExe:\t     144 kB\nVmLib:\t   67812 kB\n"
        "VmPTE:\t 400 kB\nThreads:\t6\n")
    assert procfs.mapped_code(300, proc) == (144, 67812)
    make_process(proc, 301, name="zombie", state="Z")
    assert procfs.mapped_code(301, proc) is None
    assert procfs.mapped_code(302, proc) is None
    assert procfs.mapped_code(os.getpid())[0] > 0  # the real /proc's format


def test_argus_own_ancestors_are_never_targets() -> None:
    import os

    from argus.collect import targets
    from argus.errors import NotATrainingProcess

    above = targets.argus_ancestors()
    assert os.getppid() in above and os.getpid() not in above and 1 not in above
    with pytest.raises(NotATrainingProcess, match="no rank was found"):
        targets.check_exist([os.getppid()])
    with pytest.raises(NotATrainingProcess, match="this argus process itself"):
        targets.check_exist([os.getpid()])
