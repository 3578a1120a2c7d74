"""Planted faults in synthetic recordings -> exact findings (see scenarios.py)."""

from __future__ import annotations

import functools

import pytest
import scenarios

from argus.analyze.diagnosis import diagnose

pytestmark = pytest.mark.unit

SCENARIOS = {
    "healthy": {},
    "gpu_straggler": {"gpu_slow": {2: 1.5}},
    "host_stall": {"host_stall": {1: (8, 14, 30.0)}},
    "jit_stall": {"jit_stall": {3: (10, 13, 60.0)}},
    "link_degradation": {"link_slow": (10, 16, 6.0)},
    "hang": {"hang": (2, 15)},
    "rank_exit": {"exit_rank": (1, 12)},
    "single_rank": {"ranks": 1},
    "torch_only": {"torch_only": True},
    "torch_host_stall": {"torch_only": True, "host_stall": {1: (8, 14, 30.0)}},
    "mid_run": {"attach_bucket": {0: 1, 1: 2, 2: 0, 3: 1}},
    "two_nodes": {"hosts": 2, "clock_err_ns": {1: 7_000_000}},
    "drops": {"drop": 0.01},
    "noisy_healthy": {"jitter": 0.08, "seed": 7, "drop": 0.005},
}


@functools.cache
def report(name: str) -> dict:
    return diagnose(scenarios.simulate(**SCENARIOS[name]).recordings)


def serious(r: dict) -> list[dict]:
    return [f for f in r["findings"] if f["severity"] in ("warning", "critical")]


@pytest.mark.parametrize(
    "name", ["healthy", "noisy_healthy", "single_rank", "torch_only", "mid_run", "two_nodes",
             "drops"],
)
def test_healthy_jobs_have_no_warning(name):
    assert serious(report(name)) == []


@pytest.mark.parametrize(
    "name,count",
    [("healthy", 20), ("gpu_straggler", 20), ("host_stall", 20), ("link_degradation", 20),
     ("single_rank", 20), ("torch_only", 20), ("mid_run", 20), ("two_nodes", 20),
     ("hang", 14), ("rank_exit", 11)],
)
def test_step_count_is_the_planted_number(name, count):
    r = report(name)
    assert r["steps"]["detected"] is True
    assert r["steps"]["count"] == count
    assert all(rank["steps"] == count for rank in r["ranks"])


def test_step_method_per_kind_of_job():
    assert report("healthy")["steps"]["method"] == "collectives"
    assert report("healthy")["steps"]["collectives_per_step"] == 3
    assert report("torch_only")["steps"]["method"] == "torch"
    assert report("single_rank")["steps"]["method"] == "sync"


def test_step_time_matches_the_simulated_step():
    # 5 ms load + 20 ms forward + 36 ms backward + 3 ms allreduce + 4 ms optimizer + overheads
    p50 = report("healthy")["steps"]["step_time_ms_p50"]
    assert 70 < p50 < 80


def test_gpu_straggler_is_flagged_with_gpu_cause():
    r = report("gpu_straggler")
    f = serious(r)
    assert [(x["kind"], x["rank"]) for x in f] == [("straggler", 2)]
    ev = f[0]["evidence"]
    assert f[0]["cause"] == "gpu"
    # the slow rank waits longer for its own GPU, and SHORTER at the end-of-step sync
    assert ev["compute_wait_ms"]["rank"] > ev["compute_wait_ms"]["others"] + 5
    assert ev["sync_wait_ms"]["rank"] < ev["sync_wait_ms"]["others"] - 5
    assert f[0]["score"] >= 4


def test_host_stall_flags_rank_window_and_function():
    f = serious(report("host_stall"))
    kinds = [(x["kind"], x.get("rank")) for x in f]
    assert kinds[0] == ("straggler", 1)
    assert f[0]["cause"] == "host"
    assert (f[0]["start_step"], f[0]["end_step"]) == (7, 13)  # sim steps 8-14 = ids 7-13
    win = [x for x in f if x["kind"] == "anomalous_window"]
    assert [(w["start_step"], w["end_step"]) for w in win] == [(7, 13)]
    assert not [x for x in f if x["kind"] == "collective_stall"]


def test_jit_stall_names_the_compile_function():
    f = serious(report("jit_stall"))
    assert [(x["kind"], x.get("rank")) for x in f][:2] == [("straggler", 3), ("cpu_hotspot", 3)]
    hot = f[1]
    assert hot["function"] == "jit_compile_graph"
    assert hot["share_anomalous"] > 0.8 and hot["share_normal"] == 0.0


def test_link_degradation_is_a_collective_stall_not_a_straggler():
    f = serious(report("link_degradation"))
    assert [x["kind"] for x in f] == ["collective_stall", "anomalous_window"]
    st = f[0]
    assert (st["comm"], st["op"], st["since_step"]) == ("0xc0ffee", "allreduce", 9)
    assert st["slowdown"] > 1.3
    assert st["wait_ms"]["window"] > st["wait_ms"]["baseline"] + 20


def test_hang_names_seq_and_missing_rank_with_its_stack():
    f = serious(report("hang"))
    assert [x["kind"] for x in f] == ["collective_hang"]
    h = f[0]
    assert h["severity"] == "critical"
    # sim step 15 = 16th step since attach at bucket 1 of step 0: its bucket 0 is seq
    # 2 + 14 * 3 = 44 (rank 2 issued it), bucket 1 (seq 45) is the one rank 2 never reached;
    # the others also issued bucket 2 (seq 46), queued behind 45 on their stream.
    assert (h["comm"], h["op"], h["seq"]) == ("0xc0ffee", "allreduce", 45)
    assert h["waiting_ranks"] == [0, 1, 3]
    assert h["missing_ranks"] == [2]
    ms = h["missing_stacks"][0]
    assert ms["rank"] == 2 and ms["exited"] is False
    assert ms["stacks"][0]["function"] == "wait_for_dataloader_worker"


def test_rank_exit_is_a_hang_with_the_exited_rank_missing():
    f = serious(report("rank_exit"))
    assert [x["kind"] for x in f] == ["collective_hang"]
    assert f[0]["missing_ranks"] == [1]
    assert f[0]["waiting_ranks"] == [0, 2, 3]
    assert f[0]["missing_stacks"][0]["exited"] is True


def test_hang_after_is_respected():
    rec = scenarios.simulate(hang=(2, 15), hang_tail_s=8.0).recordings
    assert [f["kind"] for f in diagnose(rec, hang_after_s=10)["findings"]] == []
    assert [f["kind"] for f in diagnose(rec, hang_after_s=5)["findings"]] == ["collective_hang"]


def test_torch_only_host_straggler():
    f = serious(report("torch_host_stall"))
    assert [(x["kind"], x.get("rank")) for x in f][0] == ("straggler", 1)
    assert f[0]["cause"] == "host"


def test_two_nodes_clock_offset_is_recovered():
    ca = report("two_nodes")["clock_alignment"]
    assert ca["reference"] == "node0"
    assert abs(ca["offsets_ns"]["node1"] + 7_000_000) < 200_000
    assert ca["residual_ns"] < 200_000


def test_report_contract_keys():
    r = report("gpu_straggler")
    assert r["schema"] == "argus.report/1"
    assert set(r["steps"]) >= {"detected", "count", "step_time_ms_p50"}
    for rank in r["ranks"]:
        assert set(rank) >= {"rank", "tgid", "host", "steps", "step_time_ms"}
        assert set(rank["step_time_ms"]) == {"p50", "p90", "max"}
    for f in r["findings"]:
        assert set(f) >= {"kind", "severity", "summary"}
        assert f["severity"] in ("info", "warning", "critical")
