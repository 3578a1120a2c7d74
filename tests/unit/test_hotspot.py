"""cpu_hotspot on synthetic stacks: the evidence rule (>= 10 samples each side, or a thin
baseline and a one-sided Fisher exact test), exact findings and the negative cases."""

from __future__ import annotations

from math import comb

import polars as pl
import pytest

from argus.analyze import hotspot

pytestmark = pytest.mark.unit

MS = 1_000_000
WINDOW = {"start_step": 5, "end_step": 7, "start_ns": 500 * MS, "end_ns": 800 * MS,
          "severity": "warning"}


def _stacks(rows):
    """rows: (rank, t_ms, functions, count); program frames (module "train"), 10 ms intervals."""
    return pl.DataFrame(
        [{"rank": r, "t_ns": t * MS, "interval_ns": 10 * MS, "functions": fns,
          "modules": ["train"] * len(fns), "count": n} for r, t, fns, n in rows],
        schema={"rank": pl.Int32, "t_ns": pl.Int64, "interval_ns": pl.Int64,
                "functions": pl.List(pl.Utf8), "modules": pl.List(pl.Utf8), "count": pl.Int64},
    )


def _straggler(rank, window=None):
    return {"kind": "straggler", "rank": rank, "severity": "warning",
            "start_step": window and window["start_step"],
            "end_step": window and window["end_step"]}


def _short(f):
    return {k: f[k] for k in ("kind", "severity", "rank", "function", "share_anomalous",
                              "share_normal", "samples_anomalous", "samples_normal")}


def test_fisher_tail_is_the_hypergeometric_tail():
    assert hotspot.fisher_greater(10, 10, 0, 3) == pytest.approx(1 / comb(13, 3))
    assert hotspot.fisher_greater(10, 10, 0, 2) == pytest.approx(1 / comb(12, 2))
    # 2 of the function's 3 samples among 5 of 10: P(X >= 2), X ~ Hypergeom(10, 3, 5)
    expect = (comb(3, 2) * comb(7, 3) + comb(3, 3) * comb(7, 2)) / comb(10, 5)
    assert hotspot.fisher_greater(2, 5, 1, 5) == pytest.approx(expect)
    assert hotspot.fisher_greater(10, 10, 0, 0) == 1.0  # no baseline: no evidence


def test_straggler_busy_in_a_function_the_idle_other_ranks_never_run():
    # rank 1 decodes images all the time (40 samples); ranks 0 and 2 wait for their GPU and
    # have 2 samples each of their own: 4 baseline samples, fewer than MIN_SAMPLES
    st = _stacks([(1, 100 + i, ["decode_jpeg", "load_batch", "main"], 1) for i in range(40)]
                 + [(r, 100, ["train_step", "main"], 2) for r in (0, 2)])
    found = hotspot.detect_hotspots(st, [], [_straggler(1)])
    assert [_short(f) for f in found] == [
        {"kind": "cpu_hotspot", "severity": "warning", "rank": 1, "function": "decode_jpeg",
         "share_anomalous": 1.0, "share_normal": 0.0, "samples_anomalous": 40,
         "samples_normal": 0}]
    assert found[0]["compared_with"] == "other_ranks"
    assert found[0]["summary"] == (
        "On rank 1, decode_jpeg took 100% of CPU samples on this rank vs 0% vs the other ranks."
    )


def test_window_function_never_seen_outside_it_with_a_thin_baseline():
    inside = [(0, 500 + 10 * i, ["jit_compile", "forward", "main"], 1) for i in range(12)]
    for n_out in (3, 2):
        outside = [(0, 100 + 10 * i, ["forward", "main"], 1) for i in range(n_out)]
        found = hotspot.detect_hotspots(_stacks(inside + outside), [WINDOW], [])
        if n_out == 3:  # P = 1/C(15, 3) = 0.0022
            assert [_short(f) for f in found] == [
                {"kind": "cpu_hotspot", "severity": "warning", "rank": None,
                 "function": "jit_compile", "share_anomalous": 1.0, "share_normal": 0.0,
                 "samples_anomalous": 12, "samples_normal": 0}]
            assert (found[0]["start_step"], found[0]["end_step"]) == (5, 7)
        else:  # P = 1/C(14, 2) = 0.011 > MAX_P: two samples say too little about normal time
            assert found == []


def test_too_few_samples_of_the_function_inside_is_not_a_hotspot():
    # 9 samples of it inside (< MIN_SAMPLES) against a thin baseline
    inside = [(0, 500 + 10 * i, ["jit_compile", "main"], 1) for i in range(9)]
    inside += [(0, 505, ["forward", "main"], 1)]
    outside = [(0, 100 + 10 * i, ["forward", "main"], 1) for i in range(5)]
    assert hotspot.detect_hotspots(_stacks(inside + outside), [WINDOW], []) == []


@pytest.mark.parametrize("n_out", [5, 40])
def test_a_function_equally_common_in_and_out_of_the_window_is_not_a_hotspot(n_out):
    # thin (5) and thick (40) baselines: half the samples in parse_batch, half in forward,
    # inside and outside the window alike
    rows = []
    for t0, n in ((500, 40), (100, n_out)):
        for i in range(n):
            fn = "parse_batch" if i % 2 == 0 else "forward"
            rows.append((0, t0 + i, [fn, "main"], 1))
    assert hotspot.detect_hotspots(_stacks(rows), [WINDOW], []) == []
    assert hotspot.detect_hotspots(_stacks(rows), [WINDOW], [_straggler(0, WINDOW)]) == []


def test_a_thick_baseline_keeps_the_share_rule():
    # >= 10 samples each side: the share growth alone decides (here 12 points, an info)
    inside = [(0, 500 + i, ["jit_compile" if i < 12 else "forward", "main"], 1)
              for i in range(100)]
    outside = [(0, 100 + i, ["forward", "main"], 1) for i in range(100)]
    found = hotspot.detect_hotspots(_stacks(inside + outside), [WINDOW], [])
    assert [_short(f) for f in found] == [
        {"kind": "cpu_hotspot", "severity": "info", "rank": None, "function": "jit_compile",
         "share_anomalous": 0.12, "share_normal": 0.0, "samples_anomalous": 12,
         "samples_normal": 0}]


def test_a_windowed_straggler_with_few_samples_outside_is_compared_with_the_other_ranks():
    """Seen on a busy machine (a CPU hog beside the job): rank 1's 400 ms JIT stall held 99
    samples, the rest of its recording 3, each 4 frames deep (12 frame-samples). The rule
    "fewer than MIN_SAMPLES outside the window: compare with the other ranks" counted
    frames, kept the 3-sample baseline and the Fisher test (P = 0.013) said no evidence."""
    deep = ["cpu_busy", "run_step", "main", "start"]
    st = _stacks([(1, 600 + i, ["jit_compile_graph", *deep], 1) for i in range(77)]
                 + [(1, 700 + i, deep, 1) for i in range(22)]
                 + [(1, 100 + 10 * i, deep, 1) for i in range(3)]
                 + [(r, 100 + i, deep, 1) for r in (0, 2) for i in range(20)])
    found = hotspot.detect_hotspots(st, [WINDOW], [_straggler(1, WINDOW)])
    assert [(f["rank"], f["function"], f["compared_with"]) for f in found] == [
        (1, "jit_compile_graph", "other_ranks")]


def test_a_windowed_straggler_busy_in_it_as_before_is_compared_with_the_other_ranks():
    """Real DDP on a busy host (tests/bpf/test_python_cpu_samples.py): rank 1 burned CPU in
    slow_rank_compute in every step and was a straggler in the window where the host's load
    slowed it most; inside and outside the window alike 95 % of its samples were in it, so
    its own differential was flat and no hotspot was named. Against the other ranks in the
    window (waiting for it, a few samples of their own): the function they never run."""
    burn = ["slow_rank_compute", "train_step", "main"]
    own = ["train_step", "main"]
    rows = [(1, t0 + i, burn if i % 20 else own, 1) for t0, n in ((500, 60), (100, 60))
            for i in range(n)]
    rows += [(0, 510 + 20 * i, own, 1) for i in range(4)]  # rank 0: 4 samples in the window
    found = hotspot.detect_hotspots(_stacks(rows), [WINDOW], [_straggler(1, WINDOW)])
    assert [(f["rank"], f["function"], f["compared_with"], f["samples_anomalous"],
             f["samples_normal"]) for f in found] == [
        (1, "slow_rank_compute", "other_ranks_in_window", 57, 0)]
    assert found[0]["summary"] == ("On rank 1, slow_rank_compute took 95% of CPU samples in "
                                   "steps 5-7 vs 0% on the other ranks.")
    # no other rank in the window: nothing to compare with, nothing said
    alone = [r for r in rows if r[0] == 1]
    assert hotspot.detect_hotspots(_stacks(alone), [WINDOW], [_straggler(1, WINDOW)]) == []


def test_the_function_that_burns_is_named_not_its_caller():
    """Seen on a fresh clone beside a CPU hog: a DDP rank burning CPU in slow_rank_compute
    (237 of 255 samples) was reported as `main`, whose inclusive share grew 1.8 points more
    (main also runs the rest of the step); only an exactly equal growth chose the callee."""
    burn = ["slow_rank_compute", "main"]
    rest = ["train_step", "main"]
    st = _stacks([(1, 100 + i, burn, 1) for i in range(237)]
                 + [(1, 400 + i, rest, 1) for i in range(18)]
                 + [(r, 100 + i, rest, 1) for r in (0, 2) for i in range(4)]
                 + [(r, 300 + i, ["worker_loop"], 1) for r in (0, 2) for i in range(60)])
    # the other ranks wait (not attributed) and their own samples are of another thread
    (f,) = hotspot.detect_hotspots(st, [], [_straggler(1)])
    assert (f["function"], f["within"], f["samples_anomalous"]) == (
        "slow_rank_compute", "main", 237)
    assert [r["function"] for r in f["profile"][:2]] == ["slow_rank_compute", "main"]


def test_a_callee_that_grew_much_less_than_its_caller_is_not_preferred():
    # main's growth comes from two callees; neither reaches 90% of it: main is named
    st = _stacks([(1, 100 + i, ["a" if i % 2 else "b", "main"], 1) for i in range(100)]
                 + [(r, 100 + i, ["loader"], 1) for r in (0, 2) for i in range(50)])
    (f,) = hotspot.detect_hotspots(st, [], [_straggler(1)])
    assert (f["function"], "within" in f, f["share_anomalous"]) == ("main", False, 1.0)

