"""The GPU agent (cuda_probes/agent) over the simulator: NCCL profiler plugin + CUPTI
subscriber, dormant until enabled, records in a bounded shared ring (no root, no BPF)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from sim_helpers import BUILD, REPO, build_standins

from argus.cli import main as cli_main
from argus.collect import gpu_agent as ga
from argus.sim.launcher import SimConfig, start_job

pytestmark = pytest.mark.unit

AGENT = BUILD / "agent" / "libargus_gpu_agent.so"
BENCH = BUILD / "agent" / "argus-gpu-agent-bench"


@pytest.fixture(scope="module", autouse=True)
def built():
    build_standins()
    assert AGENT.is_file() and BENCH.is_file()


def gpu_env_from_cli(capsys) -> dict[str, str]:
    """What `argus gpu-env` prints, parsed as a shell would read NAME=value lines."""
    assert cli_main(["gpu-env", "--build-dir", str(BUILD)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    env = dict(line.split("=", 1) for line in lines)
    assert len(lines) == 2 and set(env) == {"NCCL_PROFILER_PLUGIN", "CUDA_INJECTION64_PATH"}
    return env


def run_enabled_job(tmp_path, monkeypatch, env, *, ranks=2, steps=6, faults=(), extra=None,
                    read_before_go=True):
    """Start a job with the agent's variables, check it is dormant through init and the
    warm-up step, enable every rank, let it run; returns (truth, {rank: frame}, rings)."""
    for k, v in {**env, **(extra or {})}.items():
        monkeypatch.setenv(k, v)
    go = tmp_path / "go"
    cfg = SimConfig(ranks=ranks, steps=steps, wait_go=str(go), wait_at="step", step_ms=8.0,
                    kernels_per_step=24, buckets=2, faults=list(faults), quiet=True,
                    build_dir=str(BUILD), timeout_s=120)
    job = start_job(cfg)
    try:
        pids = job.wait_ready(60)
        rings = [ga.GpuAgentRing.open(p, timeout=10) for p in pids]
        for r in rings:
            # loaded as both NCCL plugin and CUPTI subscriber, nothing switched on, no record
            assert r.loaded == ga.LOADED_NCCL | ga.LOADED_CUPTI
            assert r.active == 0 and r.header("enabled") == 0
            if read_before_go:
                assert r.read().height == 0 and r.drops().written == 0
        for r in rings:
            r.enable()
        for r in rings:
            assert r.wait_active(ga.ACTIVE_NCCL | ga.ACTIVE_CUPTI, timeout=10)
        go.touch()
        assert job.wait(120) == 0
        truth = job.truth()
    finally:
        job.close()
    frames = {}
    for r, rt in zip(rings, truth["ranks"], strict=True):
        assert r.tgid == rt["tgid"]
        frames[rt["rank"]] = r.read()
    return truth, frames, rings


def compute_kernels(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter((pl.col("kind") == "kernel") & ~pl.col("name").str.starts_with("ncclDev"))


def test_ring_layout_matches_the_c_header(tmp_path):
    hdr = REPO / "cuda_probes" / "agent"
    prog = ["#include <stdio.h>", "#include <stddef.h>", '#include "argus_gpu_ring.h"',
            "int main(void) {",
            'printf("hdr %zu rec %zu\\n", sizeof(struct argus_gpu_hdr), '
            "sizeof(struct argus_gpu_rec));"]
    for name, _, _ in ga.HEADER_FIELDS:
        prog.append(f'printf("h {name} %zu\\n", offsetof(struct argus_gpu_hdr, {name}));')
    for name, _, _ in ga.RECORD_FIELDS:
        prog.append(f'printf("r {name} %zu\\n", offsetof(struct argus_gpu_rec, {name}));')
    prog.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(prog) + "\n")
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-I", str(hdr), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == f"hdr {ga.HDR_BYTES} rec {ga.REC_BYTES}"
    got = dict(((w[0], w[1]), int(w[2])) for w in (line.split() for line in out[1:] if line))
    for tag, fields in (("h", ga.HEADER_FIELDS), ("r", ga.RECORD_FIELDS)):
        for name, _, off in fields:
            assert got[(tag, name)] == off, (tag, name)


def test_gpu_env_prints_only_the_agent_variables(capsys):
    env = gpu_env_from_cli(capsys)
    for v in env.values():
        assert Path(v).is_absolute() and Path(v).resolve() == AGENT.resolve()


def test_gpu_env_without_a_built_agent_says_make_setup(tmp_path, capsys):
    assert cli_main(["gpu-env", "--build-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "make setup" in captured.err


def test_job_without_the_variables_has_no_agent(tmp_path, monkeypatch):
    monkeypatch.delenv("NCCL_PROFILER_PLUGIN", raising=False)
    monkeypatch.delenv("CUDA_INJECTION64_PATH", raising=False)
    go = tmp_path / "go"
    job = start_job(SimConfig(ranks=2, steps=2, wait_go=str(go), wait_at="step", step_ms=4.0,
                              kernels_per_step=16, quiet=True, build_dir=str(BUILD)))
    try:
        pids = job.wait_ready(60)
        assert all(not ga.shm_path(p).exists() for p in pids)
        go.touch()
        assert job.wait(60) == 0
        assert all("gpu" not in r for r in job.truth()["ranks"])
    finally:
        job.close()


def test_enabled_records_equal_the_simulated_gpu_work(tmp_path, monkeypatch, capsys):
    env = gpu_env_from_cli(capsys)
    truth, frames, rings = run_enabled_job(tmp_path, monkeypatch, env)
    world = [r["gpu"]["comms"]["world"] for r in truth["ranks"]]
    assert len({w["hash"] for w in world}) == 1
    ends: dict[int, set[int]] = {}
    for rt in truth["ranks"]:
        g, df = rt["gpu"], frames[rt["rank"]]
        assert rt["steps_completed"] == 6 and g["kernels"] == 6 * 25
        # CUPTI: exactly the kernels, copies and NCCL kernels of the steps after enabling
        k = compute_kernels(df)
        assert k.height == g["kernels"]
        assert abs(k["dur_ns"].sum() - g["kernel_ns"]) <= 0.01 * g["kernel_ns"]
        assert (k["dur_ns"] > 0).all() and (k["ts_end_ns"] > k["ts_start_ns"]).all()
        m = df.filter(pl.col("kind") == "memcpy")
        assert m.height == g["copies"] and m["bytes"].min() > 0
        assert abs(m["dur_ns"].sum() - g["copy_ns"]) <= 0.01 * g["copy_ns"]
        nk = df.filter((pl.col("kind") == "kernel") & pl.col("name").str.starts_with("ncclDev"))
        assert nk.height == g["nccl_ops"]
        # NCCL profiler (v5 negotiated): one record per collective, its comm hash and seq
        assert rings[0].header("nccl_version") == 5
        c = df.filter(pl.col("kind") == "coll")
        w = g["comms"]["world"]
        assert (c["comm_hash"] == w["hash"]).all()
        assert sorted(c["coll_seq"].to_list()) == list(range(w["seq_from"], w["seq_end"]))
        assert set(c["op"]) == {"AllReduce"} and (c["bytes"] > 0).all()
        assert (c["dur_ns"] > 0).all()
        for seq, end in zip(c["coll_seq"], c["ts_end_ns"], strict=True):
            ends.setdefault(seq, set()).add(end)
        assert rings[0].drops().ring_full == 0
    # a collective ends on every rank at the same device time (slowest arrival + cost)
    assert ends and all(len(e) == 1 for e in ends.values())


def test_v4_negotiation(tmp_path, monkeypatch, capsys):
    env = gpu_env_from_cli(capsys)
    truth, frames, rings = run_enabled_job(tmp_path, monkeypatch, env, steps=3,
                                           extra={"ARGUS_SIM_NCCL_PROFILER_MAX": "4"})
    assert all(r.header("nccl_version") == 4 for r in rings)
    for rt in truth["ranks"]:
        w = rt["gpu"]["comms"]["world"]
        c = frames[rt["rank"]].filter(pl.col("kind") == "coll")
        assert sorted(c["coll_seq"].to_list()) == list(range(w["seq_from"], w["seq_end"]))
        assert (c["comm_hash"] == w["hash"]).all()


def test_attach_mid_run_then_detach_stops_the_records(tmp_path, monkeypatch, capsys):
    """Enabled while the job steps (not at a step boundary), then disabled: every collective
    in between is recorded once, contiguously, and nothing is published after the
    acknowledgement of `enabled = 0` while the job goes on."""
    for k, v in gpu_env_from_cli(capsys).items():
        monkeypatch.setenv(k, v)
    job = start_job(SimConfig(ranks=2, duration_s=6.0, step_ms=8.0, kernels_per_step=24,
                              buckets=2, quiet=True, build_dir=str(BUILD), timeout_s=60))
    try:
        pids = job.wait_ready(60)
        rings = [ga.GpuAgentRing.open(p, timeout=10) for p in pids]
        time.sleep(0.3)
        for r in rings:
            r.enable()
        assert all(r.wait_active(ga.ACTIVE_NCCL | ga.ACTIVE_CUPTI, 10) for r in rings)
        time.sleep(0.5)
        for r in rings:
            r.disable()
        assert all(r.wait_active(0, 10) for r in rings)
        time.sleep(0.2)  # the last KernelCh of an op enqueued before the switch may still come
        written = [r.drops().written for r in rings]
        time.sleep(0.5)
        assert job.proc.poll() is None  # still stepping
        assert [r.drops().written for r in rings] == written
        for r in rings:
            df = r.read()
            assert df.height == r.drops().written > 0
            seqs = sorted(df.filter(pl.col("kind") == "coll")["coll_seq"].to_list())
            assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert compute_kernels(df).height > 0 and r.header("enables") == 1
    finally:
        job.close()


def test_a_full_ring_counts_every_dropped_record(tmp_path, monkeypatch, capsys):
    env = gpu_env_from_cli(capsys)
    truth, frames, rings = run_enabled_job(tmp_path, monkeypatch, env, steps=3,
                                           extra={"ARGUS_GPU_RING_RECORDS": "16"})
    for r, rt in zip(rings, truth["ranks"], strict=True):
        g = rt["gpu"]
        w = g["comms"]["world"]
        produced = g["kernels"] + g["copies"] + g["nccl_ops"] + (w["seq_end"] - w["seq_from"])
        d = r.drops()
        assert r.capacity == 16 and frames[rt["rank"]].height == 16
        assert d.written == 16 and d.ring_full == produced - 16 and d.cupti == 0


def test_gpu_straggler_slows_only_its_pre_collective_kernels(tmp_path, monkeypatch, capsys):
    env = gpu_env_from_cli(capsys)
    truth, frames, _ = run_enabled_job(tmp_path, monkeypatch, env, steps=4,
                                       faults=["gpu_straggler:rank=1,factor=3"])
    assert truth["faults"][0]["kind"] == "gpu_straggler"
    assert truth["faults"][0]["params"] == {"factor": 3.0}
    slow, fast = truth["ranks"][1]["gpu"], truth["ranks"][0]["gpu"]
    assert slow["slow_factor"] == 3 and fast["slowed_kernels"] == 0
    # per step: 22 forward/backward kernels before the gradient collectives, 3 after
    assert slow["slowed_kernels"] == 4 * 22
    k0, k1 = compute_kernels(frames[0]), compute_kernels(frames[1])
    assert k0.height == k1.height == 4 * 25
    ratios = [b / a for a, b in zip(k0["dur_ns"], k1["dur_ns"], strict=True)]
    tripled = [r for r in ratios if abs(r - 3.0) <= 0.03]
    same = [r for r in ratios if abs(r - 1.0) <= 0.01]
    assert len(tripled) == slow["slowed_kernels"] and len(same) == 4 * 3
    # the collectives themselves are not slowed: each lasts the same on both ranks' GPUs
    c0 = frames[0].filter(pl.col("kind") == "coll").sort("coll_seq")
    c1 = frames[1].filter(pl.col("kind") == "coll").sort("coll_seq")
    assert c0["coll_seq"].to_list() == c1["coll_seq"].to_list()
    assert c0["ts_end_ns"].to_list() == c1["ts_end_ns"].to_list()


def test_stale_files_of_dead_processes_are_removed():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = ga.shm_path(p.pid)
    stale.write_bytes(b"\0" * 256)
    try:
        assert p.pid in ga.remove_stale() and not stale.exists()
    finally:
        stale.unlink(missing_ok=True)
    with pytest.raises(ga.TargetNotFound):
        ga.GpuAgentRing.open(p.pid)


def bench(mode: str, n: int, ring: int = 1 << 18, what: str = "launch") -> dict:
    out = subprocess.run([str(BENCH), mode, str(n), str(AGENT), what], capture_output=True,
                         text=True,
                         env={**os.environ, "ARGUS_GPU_RING_RECORDS": str(ring)}, check=True,
                         timeout=120)
    return json.loads(out.stdout)


def test_agent_cost_per_kernel_dormant_vs_enabled():
    """Prints ns per launch (min of 3 runs each); asserts the record accounting is exact."""
    n = 20000
    runs = {m: [bench(m, n) for _ in range(3)] for m in ("none", "dormant", "enabled")}
    for r in runs["dormant"]:
        assert r["records"] == 0 and r["dropped"] == 0
    for r in runs["enabled"]:
        # every kernel, memset and copy after enabling is a record or a counted drop
        assert r["records"] + r["dropped"] + r["cupti_dropped"] == 1000 + n + 2 * (n // 10)
        assert r["records"] > 0
    best = {m: min(r["ns_per_launch"] for r in rs) for m, rs in runs.items()}
    print(f"\nagent cost per kernel launch (stand-in, {n} launches, min of 3): "
          + ", ".join(f"{m} {v:.0f} ns" for m, v in best.items()))
    assert best["none"] > 0 and best["dormant"] > 0 and best["enabled"] > 0


def test_agent_cost_per_collective_dormant_vs_enabled():
    """The bench's collective mode (agent loaded as NCCL profiler plugin and CUPTI
    subscriber, a one-rank communicator): dormant publishes nothing, enabled exactly two
    records per collective (NCCL's KernelCh, CUPTI's ncclDevKernel_AllReduce), warm-up
    included; prints ns per call (min of 3 runs each)."""
    n = 5003
    runs = {m: [bench(m, n, what="coll") for _ in range(3)] for m in ("none", "dormant",
                                                                        "enabled")}
    for r in runs["none"] + runs["dormant"]:
        assert (r["what"], r["records"], r["dropped"], r["cupti_dropped"]) == ("coll", 0, 0, 0)
    assert all(r["capacity"] == 0 for r in runs["none"])
    for r in runs["enabled"]:
        assert (r["records"], r["dropped"], r["cupti_dropped"]) == (2 * (1000 + n), 0, 0)
    best = {m: min(r["ns_per_launch"] for r in rs) for m, rs in runs.items()}
    print(f"\nagent cost per collective (stand-in, {n} ncclAllReduce, min of 3): "
          + ", ".join(f"{m} {v:.0f} ns" for m, v in best.items()))
    assert all(v > 0 for v in best.values())


def test_the_bench_refuses_an_unknown_measurement():
    out = subprocess.run([str(BENCH), "none", "10", str(AGENT), "memcpy"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "launch or coll, not memcpy" in out.stderr


REAL_CUPTI = REPO / "build" / "real" / "nvidia" / "cuda_cupti" / "lib" / "libcupti.so.12"


def cupti_symbols_missing(lib: Path) -> tuple[list[str], list[str]]:
    """(the CUPTI functions the agent's source dlsyms, those `lib` does not define)."""
    import re

    from elftools.elf.elffile import ELFFile

    src = (REPO / "cuda_probes" / "agent" / "argus_gpu_agent.c").read_text()
    wanted = re.findall(r'dlsym\(\s*lib,\s*"(cupti\w+)"\s*\)', src)
    with open(lib, "rb") as fh:
        dynsym = ELFFile(fh).get_section_by_name(".dynsym")
        defined = {s.name for s in dynsym.iter_symbols() if s["st_shndx"] != "SHN_UNDEF"}
    return wanted, [w for w in wanted if w not in defined]


def test_the_real_libcupti_defines_every_function_the_agent_resolves():
    """No GPU needed: the wheel's libcupti.so.12 (make setup fetches it into build/real)
    exports each CUPTI function the agent looks up with dlsym, under the same name."""
    if not REAL_CUPTI.is_file():
        pytest.skip(f"the real libcupti is not fetched ({REAL_CUPTI}); run `make setup`")
    wanted, missing = cupti_symbols_missing(REAL_CUPTI)
    assert len(wanted) == 7
    assert {"cuptiActivityRegisterCallbacks", "cuptiGetTimestamp"} <= set(wanted)
    assert missing == []
    # and the check can fail: the stand-in has no such symbols under another name
    _, fake = cupti_symbols_missing(BUILD / "agent" / "libargus_gpu_agent.so")
    assert fake == wanted


def test_the_bench_agent_rows_run_the_three_modes_and_account_for_every_record():
    """`make bench`'s GPU agent rows (scripts/bench --agent-only --quick: 2 rounds of
    10,000): both rows present, three figures each; the bench itself raises when an enabled
    run's records do not add up (13,000 per launch run, 22,000 per collective run)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench"), "--agent-only",
                          "--quick"], capture_output=True, text=True, timeout=300, check=True)
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]]
            for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"GPU agent per kernel launch: none / dormant / enabled",
                         "GPU agent per collective: none / dormant / enabled"}
    for (value, note), records in zip(rows.values(), ("13,000", "22,000"), strict=True):
        figures = value.removesuffix(" ns").split(" / ")
        assert len(figures) == 3 and all(float(f.replace(",", "")) > 0 for f in figures)
        assert f"enabled: {records} records, 0 dropped" in note
