"""The kernels channel end to end: 2-rank simulated jobs started with `argus gpu-env`'s
variables, traced by `argus attach` (run_session and the CLI): kernels.parquet equals the
job's truth, the manifest names each rank's agent, and every way out leaves the agents
dormant. The ranks wait at step 0 for a go file that is touched only once argus has
enabled every rank's agent and the agent acknowledged: every record of the truth (counted
from step 0) is made while argus reads."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import polars as pl
import pytest
from helpers.cli import ArgusProcess

from argus.collect import gpu_agent as ga
from argus.collect.session import run_session
from argus.collect.tracer import TraceOptions
from argus.recording import schema
from argus.recording.io import load_recording
from argus.sim.launcher import SimConfig, find_build_dir, start_job

pytestmark = pytest.mark.bpf

BUILD = find_build_dir()
AGENT_VARS = ("NCCL_PROFILER_PLUGIN", "CUDA_INJECTION64_PATH")
BOTH = ga.ACTIVE_NCCL | ga.ACTIVE_CUPTI
STEPS = 6


@pytest.fixture(autouse=True)
def built():
    if not (BUILD / "agent" / ga.AGENT_SONAME).is_file():
        pytest.skip("the GPU agent is not built (make setup)")


def _job(tmp: Path, monkeypatch, agent: bool = True, **kw):
    for k in AGENT_VARS:
        monkeypatch.delenv(k, raising=False)
    if agent:
        for k, v in ga.gpu_env(BUILD).items():
            monkeypatch.setenv(k, v)
    go = tmp / "go"
    cfg = SimConfig(**{"ranks": 2, "steps": STEPS, "wait_go": str(go), "wait_at": "step",
                       "step_ms": 8.0, "kernels_per_step": 24, "buckets": 2, "quiet": True,
                       "build_dir": str(BUILD), "timeout_s": 120, **kw})
    job = start_job(cfg)
    pids = job.wait_ready(60)
    rings = [ga.GpuAgentRing.open(p, timeout=10) for p in pids] if agent else []
    for r in rings:  # loaded as both, dormant, nothing written
        assert r.loaded == ga.LOADED_NCCL | ga.LOADED_CUPTI
        assert r.header("enabled") == 0 and r.active == 0 and r.drops().written == 0
    return job, go, pids, rings


def _wait_enabled(rings, timeout=20.0) -> None:
    """Until argus has set `enabled` on every ring and each agent acknowledged both halves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r.header("enabled") == 1 and r.active == BOTH for r in rings):
            return
        time.sleep(0.01)
    raise AssertionError([(r.header("enabled"), r.active) for r in rings])


def _release_when_enabled(rings, go: Path):
    def on_started(_tracer):
        _wait_enabled(rings)
        go.touch()
    return on_started


def _compute(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter((pl.col("kind") == "kernel") & ~pl.col("name").str.starts_with("ncclDev"))


def test_kernels_parquet_equals_the_jobs_gpu_truth(tmp_path, monkeypatch):
    job, go, pids, rings = _job(tmp_path, monkeypatch)
    try:
        result = run_session([job.launcher_pid], tmp_path / "rec",
                             TraceOptions(gpu_interval_s=None), duration_s=60,
                             on_started=_release_when_enabled(rings, go))
        assert job.wait(60) == 0
        truth = job.truth()
    finally:
        job.close()
    out = tmp_path / "rec"
    assert (out / schema.KERNELS).is_file()
    rec = load_recording(out)
    m = rec.manifest
    assert m["end_reason"] == "targets_exited" and m["channels"]["kernels"] is True
    kn = rec.kernels
    assert kn.columns == list(schema.KERNELS_SCHEMA)
    agents = m["kernels"]["agents"]
    assert m["kernels"]["enabled"] is True and set(agents) == {str(p) for p in pids}
    colls = {}
    for rt in truth["ranks"]:
        g, tgid = rt["gpu"], rt["tgid"]
        assert rt["steps_completed"] == STEPS and g["kernels"] == STEPS * 25
        df = kn.filter(pl.col("tgid") == tgid)
        assert (df["rank"] == rt["rank"]).all()
        # exact counts of every kind: the simulated GPU's work from step 0 on, nothing else
        counts = dict(df.group_by("kind").len().iter_rows())
        w = g["comms"]["world"]
        assert counts == {"kernel": g["kernels"] + g["nccl_ops"], "memcpy": g["copies"],
                          "coll": w["seq_end"] - w["seq_from"]}
        k = _compute(df)
        assert k.height == g["kernels"]
        assert abs(k["dur_ns"].sum() - g["kernel_ns"]) <= 0.01 * g["kernel_ns"]
        mc = df.filter(pl.col("kind") == "memcpy")
        assert abs(mc["dur_ns"].sum() - g["copy_ns"]) <= 0.01 * g["copy_ns"]
        assert mc["name"].unique().to_list() == ["memcpy"] and (mc["bytes"] > 0).all()
        assert df.filter(pl.col("name").str.starts_with("ncclDev")).height == g["nccl_ops"]
        # null where a column means nothing for the kind
        assert k["comm_hash"].null_count() == k.height and k["bytes"].null_count() == k.height
        assert k["stream"].null_count() == 0 and k["correlation"].null_count() == 0
        c = df.filter(pl.col("kind") == "coll").sort("coll_seq")
        assert c["coll_seq"].to_list() == list(range(w["seq_from"], w["seq_end"]))
        assert (c["comm_hash"] == w["hash"]).all() and set(c["name"]) == {"AllReduce"}
        assert c["stream"].null_count() == c.height and (c["bytes"] > 0).all()
        colls[rt["rank"]] = c
        # device times on the node's monotonic clock, inside the session
        assert df["ts_ns"].min() >= m["started_ns"]
        assert (df["ts_ns"] + df["dur_ns"]).max() <= m["ended_ns"]
        a = agents[str(tgid)]
        assert a["loaded"] == ["nccl", "cupti"] and a["active"] == ["nccl", "cupti"]
        assert a["rank"] == rt["rank"] and a["records"] == df.height
        assert a["dropped"] == 0 and a["cupti_dropped"] == 0 and a["nccl_version"] == 5
        clock = a["clock"]  # the stand-in CUPTI's timestamp is CLOCK_MONOTONIC itself
        assert clock["source"] == "cupti" and abs(clock["offset_ns"]) <= clock["error_ns"]
    # one communicator: the same sequence range and hash on both ranks, and each collective
    # ends on both at the same device time (converted by each rank's own measured offset)
    c0, c1 = colls[0], colls[1]
    assert c0["coll_seq"].to_list() == c1["coll_seq"].to_list()
    assert c0["comm_hash"].to_list() == c1["comm_hash"].to_list()
    err = sum(agents[str(p)]["clock"]["error_ns"] for p in pids)
    ends0 = (c0["ts_ns"] + c0["dur_ns"]).to_list()
    ends1 = (c1["ts_ns"] + c1["dur_ns"]).to_list()
    assert max(abs(a - b) for a, b in zip(ends0, ends1, strict=True)) <= err
    assert result.manifest["kernels"] == m["kernels"]


def test_sigterm_leaves_the_agents_dormant_and_the_rows_written(tmp_path, monkeypatch):
    job, go, pids, rings = _job(tmp_path, monkeypatch, steps=None, duration_s=60)
    out = tmp_path / "rec"
    cli = ArgusProcess(["attach", str(job.launcher_pid), "-o", str(out), "--no-gpu"])
    try:
        cli.wait_for("argus: tracing")
        _wait_enabled(rings)
        go.touch()
        deadline = time.monotonic() + 30  # until some collectives were published
        while time.monotonic() < deadline and min(r.drops().written for r in rings) < 200:
            time.sleep(0.02)
        cli.signal(signal.SIGTERM)
        assert cli.wait(60) == 0, cli.err
        # dormant again, the job still stepping
        assert job.proc.poll() is None
        assert [(r.header("enabled"), r.active) for r in rings] == [(0, 0), (0, 0)]
        os.kill(job.launcher_pid, signal.SIGTERM)  # the launcher stops its ranks
        job.wait(60)
        truth = job.truth()
        written = {r.tgid: r.drops().written for r in rings}
        tails = {r.tgid: r.header("tail") for r in rings}
        assert [r.header("enables") for r in rings] == [1, 1]
    finally:
        cli.kill()
        job.close()
    rec = load_recording(out)
    assert rec.manifest["end_reason"] == "sigterm"
    for rt in truth["ranks"]:
        p = rt["tgid"]
        a = rec.manifest["kernels"]["agents"][str(p)]
        rows = rec.kernels.filter(pl.col("tgid") == p)
        # every record argus consumed is a row, none lost
        assert a["records"] == tails[p] == rows.height > 0 and a["dropped"] == 0
        # after the switch-off only the kernel-channel stops of collectives already in
        # flight may still come (one per bucket of the step at most), although the job made
        # many more collectives before it was stopped
        assert 0 <= written[p] - tails[p] <= 2
        w = rt["gpu"]["comms"]["world"]
        assert w["seq_end"] - (rows["coll_seq"].max() + 1) > 10


def test_a_job_without_the_agent_has_no_kernels(tmp_path, monkeypatch):
    job, go, pids, _ = _job(tmp_path, monkeypatch, agent=False, steps=2)
    try:
        assert all(not ga.shm_path(p).exists() for p in pids)
        run_session([job.launcher_pid], tmp_path / "rec", TraceOptions(gpu_interval_s=None),
                    duration_s=60, on_started=lambda _t: go.touch())
        assert job.wait(60) == 0
    finally:
        job.close()
    out = tmp_path / "rec"
    assert not (out / schema.KERNELS).exists()
    rec = load_recording(out)
    assert rec.kernels.height == 0 and rec.events.height > 0
    agents = rec.manifest["kernels"]["agents"]
    assert set(agents) == {str(p) for p in pids}
    assert [a["loaded"] for a in agents.values()] == [[], []]
    assert [a["records"] for a in agents.values()] == [0, 0]


def test_no_kernels_leaves_the_agent_untouched(tmp_path, monkeypatch):
    job, go, pids, rings = _job(tmp_path, monkeypatch, steps=2)
    chans = tuple(c for c in TraceOptions().channels if c != "kernels")
    try:
        run_session([job.launcher_pid], tmp_path / "rec",
                    TraceOptions(channels=chans, gpu_interval_s=None), duration_s=60,
                    on_started=lambda _t: go.touch())
        assert job.wait(60) == 0
        # never enabled: nothing switched on, nothing written
        assert [(r.header("enabled"), r.header("enables"), r.drops().written) for r in rings] \
            == [(0, 0, 0), (0, 0, 0)]
    finally:
        job.close()
    out = tmp_path / "rec"
    assert not (out / schema.KERNELS).exists()
    m = load_recording(out).manifest
    assert m["channels"]["kernels"] is False
    assert m["kernels"] == {"enabled": False, "agents": {}}


def test_an_agent_that_appears_after_attach_is_read(tmp_path, monkeypatch):
    """Ranks attached before their CUDA init (no agent file yet): the file is found at a
    later scan of the traced rank; from its enable on every collective is a row."""
    for k, v in ga.gpu_env(BUILD).items():
        monkeypatch.setenv(k, v)
    go = tmp_path / "go"
    job = start_job(SimConfig(ranks=2, steps=200, wait_go=str(go), wait_at="init", step_ms=8.0,
                              kernels_per_step=24, buckets=2, quiet=True, build_dir=str(BUILD),
                              timeout_s=120))
    try:
        pids = job.wait_ready(60)
        assert all(not ga.shm_path(p).exists() for p in pids)  # before any CUDA call
        run_session([job.launcher_pid], tmp_path / "rec", TraceOptions(gpu_interval_s=None),
                    duration_s=60, on_started=lambda _t: go.touch())
        assert job.wait(60) == 0
        truth = job.truth()
    finally:
        job.close()
    rec = load_recording(tmp_path / "rec")
    for rt in truth["ranks"]:
        a = rec.manifest["kernels"]["agents"][str(rt["tgid"])]
        assert a["loaded"] == ["nccl", "cupti"] and a["active"] == ["nccl", "cupti"]
        df = rec.kernels.filter(pl.col("tgid") == rt["tgid"])
        assert a["records"] == df.height > 0 and a["dropped"] == 0
        seqs = df.filter(pl.col("kind") == "coll").sort("coll_seq")["coll_seq"].to_list()
        w = rt["gpu"]["comms"]["world"]
        assert seqs and seqs == list(range(seqs[0], w["seq_end"]))  # none missed after enable
