"""`argus.analyze.incremental`'s pure functions on small frames, no root, no daemon: step ids
continuous across builds (`assign_ids`, `new_steps`), the raw rows the next build re-reads
(`cut_rows`, `settle_rows`), the window (`window_steps`), the tail (`merge_tail`) and the
collective numbering (`learn_shifts`). The daemon's replays of whole recordings through
them are tests/unit/test_daemon_incremental.py and test_daemon_delayed_drain.py."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from argus.analyze.compress import build_summaries
from argus.analyze.incremental import (
    OVERLAP_STEPS,
    assign_ids,
    cut_rows,
    learn_shifts,
    merge_tail,
    new_steps,
    newer_rows,
    settle_rows,
    stack_ids,
    window_steps,
)
from argus.recording.io import load_recording
from argus.recording.summaries import TAIL_SCHEMA

pytestmark = pytest.mark.unit
DATA = Path(__file__).resolve().parents[1] / "data"
MS = 1_000_000


def _steps(rows: list[tuple[int, int, int]], dt: int = 100 * MS) -> pl.DataFrame:
    """(rank, start_ns, step) rows, each step `dt` long; step -1: not numbered yet."""
    return pl.DataFrame(
        [(r, st, st + dt, dt, i) for r, st, i in rows],
        schema={"rank": pl.Int32, "start_ns": pl.Int64, "end_ns": pl.Int64,
                "step_time_ns": pl.Int64, "step": pl.Int64}, orient="row")


def _ids(frame: pl.DataFrame) -> dict[tuple[int, int], int]:
    return {(r, st): i for r, st, i in frame.select("rank", "start_ns", "step").rows()}


def test_a_first_build_numbers_every_rank_from_next_id_by_the_nearest_start():
    # rank 0 has the most steps; rank 1's starts are 3 ms off (within half a step): same ids
    steps = _steps([(0, 0, -1), (0, 100 * MS, -1), (0, 200 * MS, -1),
                    (1, 103 * MS, -1), (1, 203 * MS, -1)])
    got = _ids(assign_ids(_steps([]), steps, steps, next_id=5))
    assert got == {(0, 0): 5, (0, 100 * MS): 6, (0, 200 * MS): 7,
                   (1, 103 * MS): 6, (1, 203 * MS): 7}


def test_a_rank_goes_on_from_its_own_ids_across_a_hole():
    done = _steps([(0, 0, 10), (0, 100 * MS, 11)])
    # the build finds step 11 again (same start), misses one step, then two new ones
    steps = _steps([(0, 100 * MS, -1), (0, 300 * MS, -1), (0, 400 * MS, -1)])
    new = steps.filter(pl.col("start_ns") > 100 * MS)
    assert _ids(assign_ids(done, steps, new, next_id=12)) == {(0, 300 * MS): 13,
                                                             (0, 400 * MS): 14}


def test_a_rank_new_to_the_job_takes_the_ids_of_the_steps_starting_with_its_own():
    done = _steps([(0, 0, 20), (0, 100 * MS, 21), (0, 200 * MS, 22)])
    steps = _steps([(0, 200 * MS, -1), (0, 300 * MS, -1), (1, 296 * MS, -1),
                    (1, 396 * MS, -1)])
    new = steps.filter(pl.col("start_ns") > 200 * MS)
    assert _ids(assign_ids(done, steps, new, next_id=23)) == {
        (0, 300 * MS): 23, (1, 296 * MS): 23, (1, 396 * MS): 24}


def test_new_steps_are_the_whole_recordings_steps_once_and_then_none():
    rec = load_recording(DATA / "sim_straggler")
    steps = build_summaries([rec]).steps
    new, wm, next_id = new_steps(steps, steps.head(0), {}, 0, final=True)
    assert new.height == steps.height
    assert next_id == int(new["step"].max()) + 1 and int(new["step"].min()) == 0
    assert wm == {r: s for r, s in steps.group_by("rank").agg(pl.col("start_ns").max()).rows()}
    per_rank = new.group_by("rank").agg(pl.col("step").sort().diff().drop_nulls().max())
    assert per_rank["step"].to_list() == [1] * per_rank.height  # consecutive on every rank
    again, wm2, next2 = new_steps(steps, new, wm, next_id)
    assert again.height == 0 and wm2 == wm and next2 == next_id


def test_new_steps_leave_the_samples_after_a_ranks_last_step_to_the_next_build():
    rec = load_recording(DATA / "sim_straggler")
    steps = build_summaries([rec]).steps
    last = pl.col("start_ns") == pl.col("start_ns").max().over("rank")

    def late(frame):  # samples charged to a step after its end
        return frame.filter(last).select(pl.col("stacks").explode().struct.field("t_off_ns")
                                         >= pl.col("step_time_ns"))
    assert late(steps).to_series().any()  # the recording gives them to the last step
    new, _wm, _n = new_steps(steps, steps.head(0), {}, 0, final=False)
    assert not late(new).to_series().fill_null(False).any()
    kept, _wm, _n = new_steps(steps, steps.head(0), {}, 0, final=True)
    assert late(kept).to_series().any()


def test_window_steps_keeps_window_s_and_at_most_max_steps():
    steps = _steps([(0, i * 100 * MS, i) for i in range(50)])
    newest = int(steps["end_ns"].max())
    w = window_steps(steps, 1.0)
    assert w["step"].to_list() == list(range(39, 50))  # step 39 ends exactly 1 s before
    assert int(w["end_ns"].min()) >= newest - 1_000_000_000
    assert window_steps(steps, 60.0, max_steps=5)["step"].to_list() == list(range(45, 50))
    assert window_steps(steps.head(0), 1.0).height == 0


def test_cut_rows_keeps_the_overlap_of_the_slowest_rank_and_the_latest_stacks():
    wall = 1_000 * MS  # wall ns = monotonic ns + wall
    steps = _steps([(r, wall + i * 100 * MS + r * MS, i) for r in (0, 1) for i in range(20)])
    ts = list(range(0, 2_000 * MS, 10 * MS))
    events = pl.DataFrame({"ts_ns": ts})
    host = pl.DataFrame({"ts_ns": ts})
    stacks = pl.DataFrame({"tgid": [7] * 3 + [8] * 3,
                           "ts_ns": [0, 100 * MS, 200 * MS, 0, 50 * MS, 1_900 * MS],
                           "interval_ns": [50 * MS] * 6})
    ev, st, hc, cut = cut_rows(events, stacks, host, steps, floor_ns=0, mono_to_wall_ns=wall)
    # the OVERLAP_STEPS-th last step of rank 0 starts first
    assert cut == (20 - OVERLAP_STEPS) * 100 * MS
    assert int(ev["ts_ns"].min()) >= cut and ev.height == events.filter(
        pl.col("ts_ns") >= cut).height
    assert hc.equals(ev)
    # tgid 7: its latest intervals stay (the hang detector's latest stacks); tgid 8 too
    assert st.filter(pl.col("tgid") == 7).height == 3
    assert st.filter(pl.col("tgid") == 8)["ts_ns"].to_list() == [0, 50 * MS, 1_900 * MS]
    # never before now - window
    _ev, _st, _hc, cut2 = cut_rows(events, stacks, host, steps, floor_ns=1_500 * MS,
                                   mono_to_wall_ns=wall)
    assert cut2 == 1_500 * MS
    # without steps: the floor
    assert cut_rows(events, stacks, host, steps.head(0), 123, wall)[3] == 123


def test_settle_rows_drops_what_came_before_the_last_rank_joined():
    ev = pl.DataFrame({"ts_ns": [1, 5, 9]})
    # stack intervals [0, 3), [3, 7), [2, 2), [8, 9): the second reaches past 5
    st = pl.DataFrame({"ts_ns": [0, 3, 2, 8], "interval_ns": [3, 4, None, 1]})
    e, s, h = settle_rows(ev, st, ev, 5)
    assert e["ts_ns"].to_list() == [5, 9] and h.equals(e)
    assert s["ts_ns"].to_list() == [3, 8]


def test_learn_shifts_keeps_a_numbering_once_it_rests_on_enough_collectives():
    known = {(7, "c0"): 10}
    found = [(7, "c0", 12, 3), (7, "c1", 4, 2), (8, "c0", 5, 8)]
    shifts, renumbered = learn_shifts(known, found, learn_seqs=8)
    # a known one is replaced (and its process renumbered), a new one kept from 8 on
    assert shifts == {(7, "c0"): 12, (8, "c0"): 5}
    assert renumbered == {7}
    assert known == {(7, "c0"): 10}  # the input is not changed
    assert learn_shifts(shifts, [(7, "c0", 12, 1)]) == (shifts, set())


def _tail(rows: list[tuple[int, int, list[tuple[str, int]]]]) -> pl.DataFrame:
    data = [{"rank": r, "tgid": t, "comms": [{"comm": c, "gseq": g, "op": "all_reduce",
                                              "bytes": 8} for c, g in comms]}
            for r, t, comms in rows]
    schema = {k: TAIL_SCHEMA[k] for k in ("rank", "tgid", "comms")}
    return pl.DataFrame(data, schema=schema)


def _gseqs(tail: pl.DataFrame) -> dict[int, list[int]]:
    return {r: [c["gseq"] for c in comms] for r, comms in tail.select("rank", "comms").rows()}


def test_merge_tail_keeps_what_a_window_lost_of_each_ranks_collectives():
    old = _tail([(0, 70, [("c", 1), ("c", 2)]), (1, 71, [("c", 1)]), (2, 72, [("c", 1)])])
    new = _tail([(0, 70, [("c", 3)]), (1, 99, [("c", 5)])])  # rank 1: another process
    got = merge_tail(new, old)
    # rank 0: the union; rank 1: the new process only; rank 2 (no rows now): its old row
    assert _gseqs(got) == {0: [1, 2, 3], 1: [5], 2: [1]}
    # a process whose numbering the build corrected keeps the build's row alone
    assert _gseqs(merge_tail(new, old, renumbered={70}))[0] == [3]
    assert merge_tail(new, old.head(0)).equals(new.sort("rank"))
    assert merge_tail(new.head(0), old).equals(old)


def test_stack_ids_reads_steps_and_tails():
    steps = pl.DataFrame({"stacks": [[{"stack_id": 3}, {"stack_id": 4}], [], None]})
    tail = pl.DataFrame({"latest_stacks": [[{"stack_id": 4}, {"stack_id": None}]]})
    assert stack_ids(steps) == {3, 4} and stack_ids(tail) == {4}
    assert stack_ids(pl.DataFrame({"rank": [1]})) == set()


def test_newer_rows_moves_the_watermark():
    hc = pl.DataFrame({"ts_ns": [5, 10, 15]})
    rows, wm = newer_rows(hc, 10)
    assert rows["ts_ns"].to_list() == [15] and wm == 15
    rows, wm = newer_rows(hc, 20)
    assert rows.height == 0 and wm == 20
    assert newer_rows(None, 3) == (None, 3)
