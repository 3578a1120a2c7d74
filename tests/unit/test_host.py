"""Host context: host.parquet round trip, the host detector on small frames, and the hang
finding preferring a missing rank's off-CPU stack."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from argus.analyze import hang, host_context, host_windows
from argus.recording import schema
from argus.recording.io import Recording, load_recording, write_recording

DATA = Path(__file__).resolve().parents[1] / "data"

pytestmark = pytest.mark.unit

MS = 1_000_000


def _manifest(ranks=(0, 1, 2)):
    return {
        "format": schema.FORMAT, "host": "node0", "clock": {"mono_to_wall_ns": 0},
        "duration_s": 10.0,
        "ranks": [{"rank": r, "tgid": 100 + r, "host": "node0"} for r in ranks],
    }


def _host_rows(rows):
    base = {"ts_ns": 0, "interval_ns": 1_000_000_000, "rank": None, "total_ns": 0}
    return pl.DataFrame([{**base, **r} for r in rows], schema=schema.HOST_SCHEMA)


def _steps(ranks=(0, 1, 2), n=10):
    return pl.DataFrame({"rank": [r for r in ranks for _ in range(n)],
                         "step": [s for _ in ranks for s in range(n)]})


def _straggler(rank=1, excess_ms=20.0, severity="warning", cause="host"):
    return {"kind": "straggler", "rank": rank, "severity": severity, "cause": cause,
            "summary": f"Rank {rank} is the straggler.", "score": 9.0,
            "evidence": {"excess_ms": excess_ms}}


def _rec(host_rows, stacks=None):
    return Recording(manifest=_manifest(), events=schema.empty_events(),
                     stacks=stacks if stacks is not None else schema.empty_stacks(),
                     host_ctx=host_rows)


def _contention():
    rows = [
        {"tgid": 101, "kind": "cpu_contention", "detail": "cpuhog", "count": 400,
         "total_ns": 150 * MS},
        {"tgid": 101, "kind": "cpu_contention", "detail": "kworker/1:0", "count": 5,
         "total_ns": 1 * MS},
    ]
    for t in (100, 102):
        rows.append({"tgid": t, "kind": "cpu_contention", "detail": "kworker/0:1", "count": 4,
                     "total_ns": 2 * MS})
    return rows


def test_host_parquet_round_trip(tmp_path):
    rows = _host_rows(
        _contention()
        + [{"tgid": 0, "kind": "block_io", "detail": "254:0", "count": 3, "total_ns": 3 * MS}]
    )
    write_recording(tmp_path / "r", _manifest(), schema.empty_events(), host=rows)
    rec = load_recording(tmp_path / "r")
    assert rec.host_ctx.schema == pl.Schema(schema.HOST_SCHEMA)
    assert rec.host_ctx.height == 5
    assert rec.host_ctx.filter(pl.col("detail") == "cpuhog")["total_ns"].to_list() == [150 * MS]


def test_recording_without_host_parquet_has_an_empty_frame_and_old_stacks_read(tmp_path):
    old = pl.DataFrame({"ts_ns": [1], "tgid": [100], "count": [3], "functions": [["f", "main"]]})
    write_recording(tmp_path / "r", _manifest(), schema.empty_events(), stacks=old)
    rec = load_recording(tmp_path / "r")
    assert rec.host_ctx.height == 0 and set(rec.host_ctx.columns) == set(schema.HOST_SCHEMA)
    assert rec.stacks["state"].to_list() == [None] and rec.stacks["blocked_ns"].to_list() == [None]


def test_contention_names_the_competitor_of_the_straggler_and_is_cited():
    rec = _rec(_host_rows(_contention()))
    stragglers = [_straggler(1, excess_ms=20.0)]
    found = host_context.detect([rec], _steps(), stragglers, step_ns=60 * MS)
    cpu = [f for f in found if f["kind"] == "cpu_contention"]
    assert len(cpu) == 1
    f = cpu[0]
    assert (f["rank"], f["competitor"], f["severity"]) == (1, "cpuhog", "warning")
    assert f["evidence"]["wait_ms_per_step"] == pytest.approx(15.1)  # (150 + 1) ms / 10 steps
    assert f["evidence"]["others_ms_per_step"] == pytest.approx(0.2)
    assert "cpuhog" in f["summary"]
    cited = stragglers[0]["evidence"]["host"]
    assert [c["kind"] for c in cited] == ["cpu_contention"] and cited[0]["competitor"] == "cpuhog"
    assert "cpuhog" in stragglers[0]["summary"]


def test_contention_that_explains_a_third_of_the_excess_is_a_share_not_the_cause():
    # rank 1 waited 14.9 ms per step more than the others of a 45 ms excess (33%): a rank
    # busy on its own CPU work is preempted more on a busy node; its own work is the cause
    rec = _rec(_host_rows(_contention()))
    stragglers = [_straggler(1, excess_ms=45.0)]
    found = host_context.detect([rec], _steps(), stragglers, step_ns=60 * MS)
    (cpu,) = [f for f in found if f["kind"] == "cpu_contention"]
    assert (cpu["rank"], cpu["severity"]) == (1, "info")
    assert cpu["explains_fraction_of_excess"] == pytest.approx(0.331, abs=1e-3)
    assert "host" not in stragglers[0]["evidence"]  # not cited as the straggler's cause


def test_contention_too_small_for_the_excess_is_not_blamed():
    rows = _contention()
    rows[0]["total_ns"] = 2 * MS  # 0.3 ms per step against a 20 ms excess
    stragglers = [_straggler(1, excess_ms=20.0)]
    found = host_context.detect([_rec(_host_rows(rows))], _steps(), stragglers, 60 * MS)
    assert not [f for f in found if f["kind"] == "cpu_contention"]
    assert "host" not in stragglers[0]["evidence"]


def test_contention_does_not_explain_a_gpu_side_straggler():
    # a GPU straggler (slower GPU work) and a pipeline-stage straggler (no ms excess, GPU
    # busy time): CPU taken from their threads cannot explain them; 15.1 ms runnable per
    # 60 ms step (>= 10%) is still worth an info line
    stage = _straggler(1, excess_ms=None, severity="critical", cause="gpu")
    for strag in (_straggler(1, cause="gpu"), stage):
        found = host_context.detect([_rec(_host_rows(_contention()))], _steps(), [strag],
                                    60 * MS)
        cpu = [(f["rank"], f["severity"]) for f in found if f["kind"] == "cpu_contention"]
        assert cpu == [(1, "info")]
        assert "host" not in strag["evidence"]


def test_contention_by_the_ranks_own_threads_is_not_host_context():
    rows = _contention()
    stacks = pl.DataFrame(
        [
            {
                "ts_ns": 0,
                "tgid": 101,
                "rank": 1,
                "thread": "cpuhog",
                "count": 1,
                "functions": ["f"],
                "modules": ["x"],
            }
        ],
        schema=schema.STACKS_SCHEMA,
    )
    found = host_context.detect([_rec(_host_rows(rows), stacks)], _steps(), [_straggler()],
                                60 * MS)
    assert not [f for f in found if f["kind"] == "cpu_contention"]


def _busy_node(waits_ms, samples, comm="python3"):
    """4 ranks on a node at 49 Hz cpu-clock sampling: rank r waited waits_ms[r] runnable
    behind `comm` over 10 steps and had samples[r] on-CPU samples."""
    rows = [{"tgid": 100 + r, "kind": "cpu_contention", "detail": comm, "count": 50,
             "total_ns": int(w * MS)} for r, w in enumerate(waits_ms)]
    stacks = pl.DataFrame(
        [{"ts_ns": 0, "interval_ns": 1_000_000_000, "tgid": 100 + r, "tid": 100 + r,
          "rank": r, "thread": "argus-sim-rank", "count": n, "functions": ["cpu_busy"],
          "modules": ["sim"], "state": "on_cpu"} for r, n in enumerate(samples)],
        schema=schema.STACKS_SCHEMA)
    man = {**_manifest(range(len(waits_ms))), "sample_hz": 49}
    return Recording(manifest=man, events=schema.empty_events(), stacks=stacks,
                     host_ctx=_host_rows(rows))


def test_a_straggler_doing_more_cpu_work_on_a_busy_node_is_not_blamed_on_the_node():
    # rank 1 spins 30 ms of its own per step: 8x the others' on-CPU samples, and so ~8x
    # their runnable wait behind the node's hog (160 ms against 20 ms over 10 steps): 14 ms
    # per step more than the others' 2 ms, 70% of its 20 ms excess, yet per ns of its own
    # CPU work it waited no longer than they did (bursty test-stress, 2026-12-05)
    rec = _busy_node([20, 160, 20, 20], [10, 80, 10, 10])
    stragglers = [_straggler(1, excess_ms=20.0, severity="critical")]
    found = host_context.detect([rec], _steps(range(4)), stragglers, 60 * MS)
    assert [f for f in found if f["kind"] == "cpu_contention" and f["severity"] != "info"] == []
    assert "host" not in stragglers[0]["evidence"]
    cont = host_context.contention(host_context.context([rec]), _steps(range(4)))
    assert cont[1]["on_cpu_samples"] == 80 and cont[1]["on_cpu_ns"] == pytest.approx(
        80 / 49 * 1e9 / 10)
    assert host_context.cpu_demand(cont, 0) == 1.0
    assert 5 < host_context.cpu_demand(cont, 1) < 8  # 8 at its lower bound, 1 sigma


def test_a_hog_on_one_ranks_cpu_is_blamed_whatever_its_cpu_work():
    # the same straggler with the hog on its own CPU: 20x the others' wait for 2x their CPU
    # work is CPU taken from it
    rec = _busy_node([10, 200, 10, 10], [10, 20, 10, 10], comm="cpuhog")
    stragglers = [_straggler(1, excess_ms=20.0, severity="critical")]
    found = host_context.detect([rec], _steps(range(4)), stragglers, 60 * MS)
    (cpu,) = [f for f in found if f["kind"] == "cpu_contention"]
    assert (cpu["rank"], cpu["competitor"], cpu["severity"]) == (1, "cpuhog", "critical")
    assert cpu["evidence"]["cpu_demand"] > 1
    assert stragglers[0]["evidence"]["host"][0]["competitor"] == "cpuhog"


def test_healthy_contention_without_a_straggler_stays_below_warning():
    found = host_context.detect([_rec(_host_rows(_contention()))], _steps(), [], 60 * MS)
    assert found and all(f["severity"] == "info" for f in found)


def test_oom_kill_of_a_rank_is_critical_and_of_another_process_info():
    rows = [
        {"ts_ns": 5, "interval_ns": 0, "tgid": 102, "kind": "oom_kill", "detail": "rank",
         "count": 1},
        {"ts_ns": 6, "interval_ns": 0, "tgid": 999, "kind": "oom_kill", "detail": "chrome",
         "count": 1},
    ]
    found = host_context.detect([_rec(_host_rows(rows))], _steps(), [], 60 * MS)
    by = {f["tgid"]: f for f in found if f["kind"] == "oom_kill"}
    assert by[102]["severity"] == "critical" and by[102]["rank"] == 2
    assert by[999]["severity"] == "info" and by[999]["rank"] is None


def test_tcp_retransmits_on_the_stragglers_rank_and_slow_block_io():
    rows = [
        {"tgid": 101, "kind": "tcp_retransmit", "detail": "10.0.0.2:29500", "count": 7},
        {"tgid": 0, "kind": "tcp_retransmit", "detail": "10.0.0.3:22", "count": 2},
        {"tgid": 0, "kind": "block_io", "detail": "259:0", "count": 10, "total_ns": 1000 * MS},
        {"tgid": 0, "kind": "block_io", "detail": "254:0", "count": 100, "total_ns": 100 * MS},
    ]
    stragglers = [_straggler(1)]
    stragglers[0]["evidence"]["steps"] = 10  # 7 retransmits: in up to 7 of its 10 steps
    found = host_context.detect([_rec(_host_rows(rows))], _steps(), stragglers, 60 * MS)
    tcp = next(f for f in found if f["kind"] == "tcp_retransmits")
    assert (tcp["count"], tcp["per_rank"], tcp["severity"]) == (9, {1: 7}, "warning")
    assert tcp["peers"][0] == {"peer": "10.0.0.2:29500", "count": 7}
    blk = [f for f in found if f["kind"] == "block_io_stall"]
    assert [(b["device"], b["mean_latency_ms"]) for b in blk] == [("259:0", 100.0)]
    assert [c["kind"] for c in stragglers[0]["evidence"]["host"]] == ["tcp_retransmits"]


def test_a_few_retransmits_of_a_straggler_over_many_steps_are_info():
    """gloo over loopback on a busy 2-vCPU node retransmits now and then on every rank (1-8
    per rank in 80-100 steps of a TP x DP job): a straggler over 80 steps whose process
    retransmitted 8 times (in at most 8 of its steps) is not explained by them."""
    rows = [{"tgid": 101, "kind": "tcp_retransmit", "detail": "127.0.0.1:43133", "count": 8},
            {"tgid": 100, "kind": "tcp_retransmit", "detail": "127.0.0.1:35730", "count": 3}]
    stragglers = [_straggler(1)]
    stragglers[0]["evidence"]["steps"] = 80
    found = host_context.detect([_rec(_host_rows(rows))], _steps(n=80), stragglers, 60 * MS)
    (tcp,) = [f for f in found if f["kind"] == "tcp_retransmits"]
    assert (tcp["count"], tcp["per_rank"], tcp["severity"], tcp["rank"]) == (
        11, {0: 3, 1: 8}, "info", None)
    assert "host" not in stragglers[0]["evidence"]
    stragglers = [_straggler(1)]
    stragglers[0]["evidence"]["steps"] = 16  # 8 retransmits in 16 steps: warning
    found = host_context.detect([_rec(_host_rows(rows))], _steps(n=16), stragglers, 60 * MS)
    assert [f["severity"] for f in found if f["kind"] == "tcp_retransmits"] == ["warning"]


def test_hang_prefers_the_missing_ranks_off_cpu_stack():
    rows = [
        # the last on-CPU samples of rank 1: before it hung
        {"ts_ns": 1, "tgid": 101, "tid": 101, "rank": 1, "thread": "rank", "count": 5,
         "functions": ["cpu_busy", "train_step", "main"], "modules": ["rank"] * 3,
         "state": "on_cpu"},
        {"ts_ns": 2, "tgid": 101, "tid": 105, "rank": 1, "thread": "helper", "count": 0,
         "functions": ["futex_wait", "pthread_cond_wait", "helper_loop"],
         "modules": ["[kernel]", "libc.so.6", "rank"], "state": "off_cpu", "blocked_ns": 9 * 10**9},
        {"ts_ns": 2, "tgid": 101, "tid": 101, "rank": 1, "thread": "rank", "count": 0,
         "functions": ["__schedule", "pause", "sim_hang_wait", "train_step", "main"],
         "modules": ["[kernel]", "libc.so.6", "rank", "rank", "rank"], "state": "off_cpu",
         "blocked_ns": 12 * 10**9},
    ]
    stacks = pl.DataFrame(rows, schema=schema.STACKS_SCHEMA)
    b = hang.latest_offcpu(stacks, 1)
    assert (b["function"], b["tid"], b["blocked_s"]) == ("sim_hang_wait", 101, 12.0)
    # on-CPU views ignore off-CPU rows
    assert [s["function"] for s in hang.latest_stacks(stacks, 1)] == ["cpu_busy"]
    assert hang.latest_offcpu(stacks, 0) is None


def test_node_wide_retransmits_alone_are_info():
    rows = [{"tgid": 0, "kind": "tcp_retransmit", "detail": "10.0.0.3:22", "count": 5}]
    found = host_context.detect([_rec(_host_rows(rows))], _steps(), [_straggler()], 60 * MS)
    tcp = next(f for f in found if f["kind"] == "tcp_retransmits")
    assert (tcp["count"], tcp["severity"]) == (5, "info")


# -- anomalous windows explained by CPU contention on the node --------------------------------

S = 1_000_000_000


def _window(start_s, end_s, slowdown=1.5, base_ms=60.0):
    return {"kind": "anomalous_window", "severity": "warning",
            "summary": f"Steps 10-20 took {base_ms * slowdown:.1f} ms (median).",
            "start_ns": start_s * S, "end_ns": end_s * S, "slowdown": slowdown,
            "baseline_step_time_ms": base_ms,
            "window_step_time_ms": base_ms * slowdown}


def _per_second(waits):
    """cpu_contention rows, one interval per second: {(rank, second): (comm, runnable ms)}."""
    return _host_rows([
        {"ts_ns": sec * S, "interval_ns": S, "tgid": 100 + rank, "kind": "cpu_contention",
         "detail": comm, "count": 10, "total_ns": int(ms * MS)}
        for (rank, sec), (comm, ms) in sorted(waits.items())
    ])


def _explain(waits, window, ranks=(0, 1, 2), offsets=None):
    ctx = host_context.context([_rec(_per_second(waits))])
    host_windows.explain_windows(ctx, [window], [(_manifest(), "node0")], offsets or {},
                                 list(ranks))
    return window


def test_a_window_every_rank_lost_to_a_competitor_is_the_nodes_not_the_jobs():
    # seconds 0-9, window 4-7: outside, 20 ms runnable per s (kworker); inside, 300 ms per s
    # (cpuhog): growth (0.3 - 0.02) x 90 ms = 25.2 ms per step >= 50% of the 30 ms excess
    waits = {(r, s): ("kworker/0:1", 20.0) for r in range(3) for s in range(10)}
    waits.update({(r, s): ("cpuhog", 300.0) for r in range(3) for s in (4, 5, 6)})
    w = _explain(waits, _window(4, 7))
    assert (w["severity"], w["cause"], w["competitor"]) == ("info", "cpu_contention", "cpuhog")
    assert w["runnable_growth_ms"] == pytest.approx(25.2)
    # per rank per step in the window (its steps unknown here: 1): 3 s x 300 ms
    assert w["competitors"] == [{"comm": "cpuhog", "wait_ms_per_step": 900.0}]
    assert "'cpuhog' ran on their CPUs" in w["summary"]


def test_contention_of_one_rank_does_not_explain_a_job_wide_window():
    waits = {(r, s): ("kworker/0:1", 20.0) for r in range(3) for s in range(10)}
    waits.update({(1, s): ("cpuhog", 300.0) for s in (4, 5, 6)})  # rank 1 only: a straggler
    w = _explain(waits, _window(4, 7))
    assert w["severity"] == "warning" and "cause" not in w


def test_too_little_contention_and_a_2x_window_stay_warnings():
    waits = {(r, s): ("kworker/0:1", 20.0) for r in range(3) for s in range(10)}
    waits.update({(r, s): ("cpuhog", 100.0) for r in range(3) for s in (4, 5, 6)})
    w = _explain(waits, _window(4, 7))  # (0.1 - 0.02) x 90 = 7.2 ms of a 30 ms excess
    assert w["severity"] == "warning" and "cause" not in w
    waits.update({(r, s): ("cpuhog", 700.0) for r in range(3) for s in (4, 5, 6)})
    w = _explain(waits, _window(4, 7, slowdown=2.5))
    assert (w["severity"], w["cause"]) == ("warning", "cpu_contention")


def test_window_explanation_uses_the_aligned_clock_and_the_ranks_with_host_context():
    waits = {(r, s): ("kworker/0:1", 20.0) for r in range(3) for s in range(10)}
    waits.update({(r, s): ("cpuhog", 300.0) for r in range(3) for s in (4, 5, 6)})
    # the node's clock is 3 s behind the reference: its seconds 4-6 are aligned 7-9
    assert _explain(waits, _window(4, 7), offsets={"node0": 3 * S})["severity"] == "warning"
    w = _explain(waits, _window(7, 10), offsets={"node0": 3 * S})
    assert (w["severity"], w["competitor"]) == ("info", "cpuhog")
    # rank 3 ran on a node that recorded no host context: judged on the ranks that did
    w = _explain(waits, _window(4, 7), ranks=(0, 1, 2, 3))
    assert (w["severity"], w["cause"]) == ("info", "cpu_contention")
    # ranks 1 and 2 recorded no contention at all (growth 0): the lower quartile is theirs
    only0 = {k: v for k, v in waits.items() if k[0] == 0}
    assert _explain(only0, _window(4, 7))["severity"] == "warning"


# -- a short window one rank's long runnable waits explain -----------------------------------


def _long_waits(waits):
    """cpu_wait rows: [(rank, start ms, length ms, competitor)]."""
    return _host_rows([
        {"ts_ns": int(t0 * MS), "interval_ns": int(ms * MS), "tgid": 100 + rank,
         "kind": "cpu_wait", "detail": comm, "count": 1, "total_ns": int(ms * MS)}
        for rank, t0, ms, comm in waits
    ])


def _short(start_ms, end_ms, window_ms, base_ms=80.0, steps=1):
    return {"kind": "anomalous_window", "severity": "warning", "summary": "Steps 27-27 ...",
            "start_ns": int(start_ms * MS), "end_ns": int(end_ms * MS), "steps": steps,
            "start_step": 27, "end_step": 27 + steps - 1, "slowdown": window_ms / base_ms,
            "baseline_step_time_ms": base_ms, "window_step_time_ms": window_ms}


def _late(rank):
    """Step metrics of steps 27-28: `rank` arrives 140 ms late, the others on time."""
    return pl.DataFrame({"rank": [0, 1, 2] * 2, "step": [27] * 3 + [28] * 3,
                         "lateness_ns": [140 * MS if r == rank else 0 for r in (0, 1, 2)] * 2})


def _explain_long(rows, window, metrics):
    ctx = host_context.context([_rec(_long_waits(rows))])
    host_windows.explain_windows(ctx, [window], [(_manifest(), "node0")], {}, [0, 1, 2],
                                 metrics)
    return window


def test_a_one_step_hiccup_that_the_late_ranks_runnable_waits_explain_is_info():
    # step 27: 300 ms against a baseline of 80 ms (3.75x); rank 1 arrived 140 ms late, and
    # was runnable but not running for 150 ms of it (two waits behind 'python3'); without
    # them the step is 150 ms, under 2x: a busy node delayed it
    rows = [(1, 1000, 90, "python3"), (1, 1100, 60, "python3"), (1, 1180, 3000, "python3"),
            (0, 1010, 40, "kworker/0:1")]  # the third starts at 1180: 120 ms inside
    w = _explain_long(rows, _short(1000, 1300, 300.0), _late(1))
    assert (w["severity"], w["cause"], w["rank"], w["competitor"]) == (
        "info", "cpu_contention", 1, "python3")
    assert w["runnable_ms_per_step"] == pytest.approx(270.0)
    assert "rank 1 waited 270.0 ms per step runnable while 'python3'" in w["summary"]


def test_long_waits_of_a_rank_that_was_not_late_do_not_explain_the_step():
    rows = [(0, 1000, 200, "python3")]  # rank 0 waited, but rank 1 made the step late
    w = _explain_long(rows, _short(1000, 1300, 300.0), _late(1))
    assert w["severity"] == "warning" and "cause" not in w


def test_a_step_still_slow_without_the_waits_and_a_long_window_stay_warnings():
    # a 400 ms JIT compile on rank 1 that also waited 200 ms for its CPU: 680 ms - 200 ms is
    # still 6x the baseline: the compile is the cause
    rows = [(1, 1000, 200, "python3")]
    w = _explain_long(rows, _short(1000, 1680, 680.0), _late(1))
    assert w["severity"] == "warning" and "cause" not in w
    # three steps delayed step after step: a straggler, named by the straggler detector
    rows = [(1, 1000 + 300 * i, 250, "python3") for i in range(3)]
    w = _explain_long(rows, _short(1000, 1900, 300.0, steps=3), _late(1))
    assert w["severity"] == "warning" and "cause" not in w
    # waits by the rank's own threads are not host context
    ctx_rows = [(1, 1000, 200, "pt_autograd_0")]
    stacks = pl.DataFrame({"rank": [1], "thread": ["pt_autograd_0"], "ts_ns": [0], "count": [1],
                           "functions": [["f"]]})
    rec = Recording(manifest=_manifest(), events=schema.empty_events(),
                    stacks=stacks, host_ctx=_long_waits(ctx_rows))
    w = _short(1000, 1300, 300.0)
    host_windows.explain_windows(host_context.context([rec]), [w], [(_manifest(), "node0")],
                                 {}, [0, 1, 2], _late(1))
    assert w["severity"] == "warning" and "cause" not in w


def test_a_window_stragglers_contention_is_measured_in_its_own_steps():
    """tests/data/host_cpuhog_rank1: tests/bpf/test_host_context.py's job (2 ranks, rank 1
    pinned with 'cpuhog' on its CPU) recorded by a fresh clone's suite with one more CPU
    hog beside it. Rank 1 is a straggler in steps 5-12 (23.6 ms per step); over the whole
    recording it waited 19.9 ms per step runnable against rank 0's 8.7 (the other hog took
    rank 0's CPU too): 47 % of the excess, which made the contention `info`. In its own
    steps it waited 23.1 ms against 7.4: the hog is the cause."""
    from argus.analyze.diagnosis import diagnose

    rep = diagnose([load_recording(DATA / "host_cpuhog_rank1")])
    (s,) = [f for f in rep["findings"] if f["kind"] == "straggler"]
    assert (s["rank"], s["cause"], s["start_step"], s["end_step"]) == (1, "host", 5, 12)
    (c,) = [f for f in rep["findings"] if f["kind"] == "cpu_contention"]
    assert (c["rank"], c["competitor"], c["severity"]) == (1, "cpuhog", "critical")
    scope = c["evidence"]["in_straggler_steps"]
    assert scope["steps"] == 8 and scope["wait_ms_per_step"] > 3 * scope["others_ms_per_step"]
    assert c["explains_fraction_of_excess"] >= host_context.EXPLAIN_SHARE
    assert c["evidence"]["wait_ms_per_step"] - c["evidence"]["others_ms_per_step"] < (
        host_context.EXPLAIN_SHARE * s["evidence"]["excess_ms"])  # the whole run alone: info
    assert s["evidence"]["host"][0]["competitor"] == "cpuhog"


# -- anomalous windows explained by the hypervisor's steal time --------------------------------


def _steal_rows(pct_by_second, seconds=10, cpus=2):
    """cpu_steal rows, one interval per second: the node's CPU time (cpus x 1 s) and the
    share of it stolen, `pct_by_second` {second: %} (else 1 %)."""
    return [{"ts_ns": sec * S, "interval_ns": S, "tgid": 0, "kind": "cpu_steal",
             "detail": "node", "count": cpus * S,
             "total_ns": int(cpus * S * pct_by_second.get(sec, 1.0) / 100)}
            for sec in range(seconds)]


def _explain_steal(pct_by_second, window):
    ctx = host_context.context([_rec(_host_rows(_steal_rows(pct_by_second)))])
    host_windows.explain_windows(ctx, [window], [(_manifest(), "node0")], {}, [0, 1, 2])
    return window


def test_a_window_the_hypervisor_stole_the_cpus_in_is_the_nodes_not_the_jobs():
    # 25 % stolen in seconds 4-6, 1 % elsewhere: a step of CPU work of 60 ms takes
    # 60 x 0.99 / 0.75 = 79.2 ms, 19.2 ms more: >= 50 % of the window's 30 ms excess
    w = _explain_steal({4: 25.0, 5: 25.0, 6: 25.0}, _window(4, 7, slowdown=1.5))
    assert (w["severity"], w["cause"]) == ("info", "cpu_steal")
    assert w["steal_pct"] == {"window": 25.0, "outside": 1.0}
    assert "the hypervisor took 25% of the node's CPU time (steal) against 1% outside" in (
        w["summary"])


def test_too_little_steal_or_a_2x_window_stay_warnings():
    # 8 % stolen: 60 x 0.99 / 0.92 - 60 = 4.6 ms of a 30 ms excess
    w = _explain_steal({4: 8.0, 5: 8.0, 6: 8.0}, _window(4, 7, slowdown=1.5))
    assert w["severity"] == "warning" and "cause" not in w
    # steal explains a 2.5x window too, which stays a warning (named)
    w = _explain_steal({4: 70.0, 5: 70.0, 6: 70.0}, _window(4, 7, slowdown=2.5))
    assert (w["severity"], w["cause"]) == ("warning", "cpu_steal")


def test_steal_all_along_does_not_explain_a_window():
    pct = {s: 25.0 for s in range(10)}  # as much inside as outside: the window is the job's
    w = _explain_steal(pct, _window(4, 7, slowdown=1.5))
    assert w["severity"] == "warning" and "cause" not in w
