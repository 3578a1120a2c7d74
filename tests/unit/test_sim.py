"""The simulated training job: stand-in library semantics, the launcher, faults, truth."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from sim_helpers import (
    BUILD,
    CUDART_REQUIRED,
    NCCL_REQUIRED,
    REPO,
    build_standins,
    run_job,
    run_snippet,
    simulate,
)

pytestmark = pytest.mark.unit
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session", autouse=True)
def built():
    return build_standins()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One healthy 4-rank job, shared by the tests that only read its truth."""
    rc, truth = run_job(tmp_path_factory.mktemp("base"), "--ranks", "4", "--steps", "20")
    assert rc == 0
    return truth


def median_step_ms(truth: dict) -> float:
    return statistics.median(statistics.median(r["step_time_ms"]) for r in truth["ranks"])


# ---------------------------------------------------------------- library semantics

def test_launch_is_async_and_sync_waits_for_queued_kernel_time():
    out = run_snippet("""
        s = stream()
        t0 = time.monotonic()
        for _ in range(10):
            launch(s, 20)                      # 10 x 20 ms of GPU work
        t1 = time.monotonic()
        assert rt.cudaStreamSynchronize(s) == 0
        t2 = time.monotonic()
        print(json.dumps({"launch_s": t1 - t0, "sync_s": t2 - t0}))
    """, env={"ARGUS_SIM_NODE": f"t{os.getpid()}a"})
    assert out["launch_s"] < 0.05          # returns at once (generous: noisy 2-core box)
    assert 0.19 <= out["sync_s"] < 0.6      # waited for the 200 ms of queued work


def test_events_order_streams_and_event_sync_waits():
    out = run_snippet("""
        a, b = stream(), stream()
        ev = ctypes.c_void_p()
        assert rt.cudaEventCreate(ctypes.byref(ev)) == 0
        t0 = time.monotonic()
        launch(a, 100)
        assert rt.cudaEventRecord(ev, a) == 0
        q0 = rt.cudaEventQuery(ev)
        assert rt.cudaStreamWaitEvent(b, ev, 0) == 0
        launch(b, 50)                          # may only start after a's 100 ms
        assert rt.cudaEventSynchronize(ev) == 0
        t_ev = time.monotonic() - t0
        assert rt.cudaStreamSynchronize(b) == 0
        t_b = time.monotonic() - t0
        print(json.dumps({"q0": q0, "q1": rt.cudaEventQuery(ev), "t_ev": t_ev, "t_b": t_b}))
    """, env={"ARGUS_SIM_NODE": f"t{os.getpid()}b"})
    assert out["q0"] == 600 and out["q1"] == 0   # cudaErrorNotReady, then cudaSuccess
    assert out["t_ev"] >= 0.095
    assert out["t_b"] >= 0.145 and out["t_b"] > out["t_ev"] + 0.04


def test_collective_completes_at_slowest_arrival_plus_cost(tmp_path):
    code = """
        rank, delay, idfile = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
        uid = ctypes.create_string_buffer(128)
        if rank == 0:
            assert nccl.ncclGetUniqueId(uid) == 0
            open(idfile + ".tmp", "wb").write(uid.raw); os.rename(idfile + ".tmp", idfile)
        else:
            while not os.path.exists(idfile): time.sleep(0.001)
            uid = ctypes.create_string_buffer(open(idfile, "rb").read(), 128)
        class Id(ctypes.Structure): _fields_ = [("internal", ctypes.c_char * 128)]
        comm = ctypes.c_void_p()
        nccl.ncclCommInitRank.argtypes = [ctypes.c_void_p, ctypes.c_int, Id, ctypes.c_int]
        assert nccl.ncclCommInitRank(ctypes.byref(comm), 2, Id.from_buffer_copy(uid.raw), rank) == 0
        s = stream()
        time.sleep(delay)
        t_arrive = time.monotonic()
        # 1.25e9 bf16 = 2.5 GB at 50 GB/s, 2 ranks: 2*(1/2)*2.5e9/50 ns = 50 ms
        assert nccl.ncclAllReduce(None, None, ctypes.c_size_t(1250000000), 9, 0, comm, s) == 0
        t_enq = time.monotonic()
        assert rt.cudaStreamSynchronize(s) == 0
        t_end = time.monotonic()
        assert nccl.ncclCommDestroy(comm) == 0
        print(json.dumps({"arrive": t_arrive, "enq": t_enq, "end": t_end}))
    """
    import textwrap

    from sim_helpers import CTYPES_PRELUDE
    env = {**os.environ, "ARGUS_SIM_JOB": f"t{os.getpid()}c", "ARGUS_SIM_NODE": f"t{os.getpid()}c"}
    idfile = str(tmp_path / "uid")
    procs = [subprocess.Popen([sys.executable, "-c", CTYPES_PRELUDE + textwrap.dedent(code),
                               str(BUILD), str(r), str(d), idfile], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
             for r, d in ((0, 0.0), (1, 0.3))]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=30)
        assert p.returncode == 0, e
        outs.append(json.loads(o.strip().splitlines()[-1]))
    fast, slow = outs
    assert fast["enq"] - fast["arrive"] < 0.05            # the enqueue itself does not wait
    assert fast["end"] >= slow["arrive"] + 0.048          # slowest arrival + 50 ms cost
    assert fast["end"] <= slow["arrive"] + 0.25
    assert abs(fast["end"] - slow["end"]) < 0.05          # both finish together


# ---------------------------------------------------------------- the job

def test_bad_fault_spec_exits_2_naming_the_key():
    p = simulate("--ranks", "2", "--steps", "2", "--fault", "straggler:rank=1,speed=3")
    assert p.returncode == 2
    assert "'speed'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = simulate("--ranks", "2", "--steps", "2", "--fault", "straggler:rank=5")
    assert p.returncode == 2 and "'rank'" in p.stderr
    p = simulate("--ranks", "2", "--steps", "2", "--fault", "melt:rank=1")
    assert p.returncode == 2 and "'melt'" in p.stderr


def test_missing_build_says_make_setup(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "simulate"), "--steps", "1"],
                       capture_output=True, text=True,
                       env={**os.environ, "ARGUS_BUILD_DIR": str(tmp_path)})
    assert p.returncode == 1 and "make setup" in p.stderr


def test_truth_counts_equal_the_rank_programs_own_counts(baseline):
    assert baseline["schema"] == "argus.sim.truth/1" and baseline["outcome"] == "completed"
    assert [r["rank"] for r in baseline["ranks"]] == [0, 1, 2, 3]
    for r in baseline["ranks"]:
        lib = {s: n for per_lib in r["library_calls"].values() for s, n in per_lib.items()}
        assert set(r["library_calls"]) == {"libcudart.so.12", "libcuda.so.1", "libnccl.so.2"}
        assert set(CUDART_REQUIRED) <= set(r["library_calls"]["libcudart.so.12"])
        assert set(NCCL_REQUIRED) <= set(r["library_calls"]["libnccl.so.2"])
        for sym, n in lib.items():
            assert r["caller_calls"].get(sym, 0) == n, (r["rank"], sym)
        assert r["steps_completed"] == 20 and len(r["step_time_ms"]) == 20
        assert lib["ncclAllReduce"] == 20 * 4
        assert r["collectives"]["world"] == 20 * 4 + 1          # + DDP's broadcast
        assert lib["cudaMemcpy"] == 2 * 20 and lib["cudaSetDevice"] == 1  # 2 loss read-backs
        assert lib["cudaLaunchKernel"] > 20 * 50 and lib["cuLaunchKernel"] > 20 * 5
    assert len({r["tgid"] for r in baseline["ranks"]}) == 4


def test_straggler_lengthens_every_ranks_median_step(baseline, tmp_path):
    rc, truth = run_job(tmp_path, "--ranks", "4", "--steps", "20",
                        "--fault", "straggler:rank=2,factor=2.0")
    assert rc == 0
    assert truth["faults"] == [{"kind": "straggler", "ranks": [2], "start": 0, "steps": None,
                                "params": {"factor": 2.0},
                                "spec": "straggler:rank=2,factor=2.0"}]
    base = [statistics.median(r["step_time_ms"]) for r in baseline["ranks"]]
    slow = [statistics.median(r["step_time_ms"]) for r in truth["ranks"]]
    for b, s in zip(base, slow, strict=True):
        assert s / b > 1.3


def test_hang_blocks_the_others_at_that_collective(tmp_path):
    rc, truth = run_job(tmp_path, "--ranks", "4", "--steps", "50", "--timeout", "2.5",
                        "--fault", "hang:rank=1,start=3")
    assert rc == 0 and truth["outcome"] == "timeout"
    assert truth["faults"][0]["params"] == {"at": 12, "comm_seq": 13}
    for r in truth["ranks"]:
        assert r["exit"] == "terminated"
        assert r["steps_completed"] == 3                 # nobody completes step 3
        assert r["hung"] == (r["rank"] == 1)
        lib = r["library_calls"]["libnccl.so.2"]
        assert lib["ncclAllReduce"] == r["caller_calls"]["ncclAllReduce"]
        # the hung rank issued collectives 0..12 (broadcast + 12 allreduces); the others
        # issued all of step 3's and wait for the hung rank at sequence number 13
        assert r["collectives"]["world"] == (13 if r["rank"] == 1 else 17)


def test_duration_runs_the_same_number_of_steps_everywhere(tmp_path):
    rc, truth = run_job(tmp_path, "--ranks", "3", "--duration", "0.8",
                        "--fault", "host_stall:rank=0,ms=20")
    assert rc == 0
    steps = {r["steps_completed"] for r in truth["ranks"]}
    assert len(steps) == 1 and steps.pop() >= 5


def test_pipeline_mode_pairs_send_and_recv(tmp_path):
    rc, truth = run_job(tmp_path, "--ranks", "4", "--pp", "2", "--steps", "5",
                        "--kernels-per-step", "40", "--fault", "bubble:stage=1,factor=2")
    assert rc == 0, truth["outcome"]
    assert truth["faults"][0]["ranks"] == [1, 3]
    for r in truth["ranks"]:
        nccl = r["library_calls"]["libnccl.so.2"]
        assert nccl["ncclSend"] == nccl["ncclRecv"] == 5 * 4
        assert nccl["ncclGroupStart"] == nccl["ncclGroupEnd"] == 5 * 8
        assert nccl["ncclCommSplit"] == 1 and r["collectives"]["dp"] == 5 * 4


def test_ranks_map_named_libraries_with_real_exports_and_push_rbp_prologues(tmp_path):
    from elftools.elf.elffile import ELFFile

    from argus.sim import SimConfig, start_job

    go = tmp_path / "go"
    job = start_job(SimConfig(ranks=2, steps=3, wait_go=str(go), quiet=True,
                              node=f"t{os.getpid()}m", build_dir=str(BUILD)))
    try:
        pids = job.wait_ready(30)
        assert len(pids) == 2
        for pid in pids:
            assert os.getppid() != pid
            with open(f"/proc/{pid}/stat") as f:
                assert int(f.read().rsplit(")", 1)[1].split()[1]) == job.launcher_pid
            maps = Path(f"/proc/{pid}/maps").read_text().split("\n")
            paths = {line.split()[-1] for line in maps if line.count("/") and ".so" in line}
            by_name = {os.path.basename(p): p for p in paths}
            for name, required in (("libcudart.so.12", CUDART_REQUIRED),
                                   ("libnccl.so.2", NCCL_REQUIRED)):
                assert name in by_name
                with open(by_name[name], "rb") as f:
                    elf = ELFFile(f)
                    dyn = elf.get_section_by_name(".dynsym")
                    syms = {s.name: s for s in dyn.iter_symbols()
                            if s["st_shndx"] != "SHN_UNDEF" and s["st_info"]["type"] == "STT_FUNC"}
                    assert set(required) <= set(syms)
                    text = elf.get_section_by_name(".text")
                    for sym in syms:                   # every exported function
                        off = syms[sym]["st_value"] - text["sh_addr"] + text["sh_offset"]
                        f.seek(off)
                        assert f.read(1) == b"\x55", sym   # push %rbp
        go.touch()
        assert job.wait(30) == 0
        truth = job.truth()
        assert [r["steps_completed"] for r in truth["ranks"]] == [3, 3]
        assert all(r["library_calls"]["libcudart.so.12"]["cudaSetDevice"] == 1
                   for r in truth["ranks"])
    finally:
        job.close()


def test_pynvml_reads_the_standin_and_throttle_lowers_the_clock(tmp_path):
    from argus.sim import SimConfig, start_job

    node = f"t{os.getpid()}n"
    job = start_job(SimConfig(ranks=2, steps=400, quiet=True, node=node, build_dir=str(BUILD),
                              faults=["throttle:rank=1,mhz=1100"]))
    try:
        job.wait_ready(30)
        code = """
import json, time, pynvml as n
n.nvmlInit()
for _ in range(100):
    h0, h1 = n.nvmlDeviceGetHandleByIndex(0), n.nvmlDeviceGetHandleByIndex(1)
    c1 = n.nvmlDeviceGetClockInfo(h1, n.NVML_CLOCK_SM)
    if c1 == 1100:
        break
    time.sleep(0.05)
out = {"name": n.nvmlDeviceGetName(h0), "count": n.nvmlDeviceGetCount(),
       "c0": n.nvmlDeviceGetClockInfo(h0, n.NVML_CLOCK_SM), "c1": c1,
       "max1": n.nvmlDeviceGetMaxClockInfo(h1, n.NVML_CLOCK_SM),
       "r0": n.nvmlDeviceGetCurrentClocksEventReasons(h0),
       "r1": n.nvmlDeviceGetCurrentClocksThrottleReasons(h1),
       "bus": n.nvmlDeviceGetPciInfo(h1).busId,
       "mem": n.nvmlDeviceGetMemoryInfo(h1).used,
       "power": n.nvmlDeviceGetPowerUsage(h1), "limit": n.nvmlDeviceGetEnforcedPowerLimit(h1)}
n.nvmlShutdown()
print(json.dumps(out))
"""
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=30, env={**os.environ, "ARGUS_SIM_NODE": node,
                                            "LD_LIBRARY_PATH": str(BUILD / "stubs")})
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert "H100" in out["name"] and out["count"] == 8
        assert out["c0"] == 1980 and out["c1"] == 1100 and out["max1"] == 1980
        assert out["r1"] & 0x20 and not out["r0"] & 0x20        # SwThermalSlowdown
        assert out["bus"] == "00000000:19:00.0"
        assert out["mem"] > 100 << 20 and 70000 <= out["power"] <= out["limit"]
    finally:
        job.terminate()
    truth = job.truth()
    job.close()
    assert not os.path.exists(job.truth_path)
    assert truth["outcome"] == "interrupted"
    assert all(r["exit"] == "terminated" for r in truth["ranks"])
    assert not list(Path("/dev/shm").glob(f"argus-sim-{node}-*"))
