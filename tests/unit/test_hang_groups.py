"""collective_hang when one local comm name covers several communicators (made before
attach: every TP group's comm is `anon0` on its ranks) and the hang cascades into other
groups. The shape is the one recorded from the simulator's 2 TP x 2 DP job (rank 3 hung
before its TP allreduce; TP = {0, 1}, {2, 3}; DP = {0, 2}, {1, 3}):

- rank 2 issued TP allreduce 99 and waits on the GPU (its peer, rank 3, never issued it);
- ranks 0 and 1 finished their TP group's allreduces (up to 103) and DP allreduces up to
  51, and wait on the GPU for the DP allreduce 48 that ranks 2 and 3 never issued;
- rank 3 is in host code, no call in flight.

Before: "missing [2, 3], waiting [0, 1]" (rank 2 is behind ranks 0 and 1 on `anon0`, which
is another communicator for them). The rank that never arrived is 3, awaited in anon0."""

from __future__ import annotations

import polars as pl
import pytest

from argus.analyze.hang import detect_hangs

pytestmark = pytest.mark.unit

S = 1_000_000_000


def _coll(last: dict[int, dict[str, int]]) -> pl.DataFrame:
    rows = [{"comm": comm, "rank": r, "gseq": k, "op": "allreduce"}
            for r, comms in last.items() for comm, n in comms.items()
            for k in range(n + 1)]
    return pl.DataFrame(rows)


def _tl(waiting: list[int], t_end: int) -> pl.DataFrame:
    rows = [{"rank": r, "host": "h", "tgid": 100 + r, "t_ns": t_end - 30 * S, "in_flight": True,
             "kind": "readback", "name": "cudaMemcpy"} for r in waiting]
    rows += [{"rank": r, "host": "h", "tgid": 100 + r, "t_ns": t_end - 40 * S,
              "in_flight": False, "kind": "collective", "name": "ncclAllReduce"}
             for r in range(4)]
    return pl.DataFrame(rows)


STACKS = pl.DataFrame(schema={"rank": pl.Int32, "ts_ns": pl.Int64, "functions": pl.List(pl.Utf8),
                              "modules": pl.List(pl.Utf8), "count": pl.Int64})


def test_a_tp_hang_cascading_into_dp_names_only_the_rank_that_never_arrived():
    last = {0: {"anon0": 103, "anon1": 51}, 1: {"anon0": 103, "anon1": 51},
            2: {"anon0": 99, "anon1": 47}, 3: {"anon0": 98, "anon1": 47}}
    (f,) = detect_hangs(_tl([0, 1, 2], 100 * S), _coll(last), STACKS, {"h": 100 * S},
                        hang_after_s=10, step_ns=0.05 * S)
    assert f["missing_ranks"] == [3]
    assert (f["comm"], f["seq"], f["waiting_ranks"]) == ("anon0", 99, [0, 1, 2])


def test_every_rank_behind_waiting_keeps_them_all_missing():
    """No rank behind is outside a wait (each is stuck in a GPU wait of its own): nobody is
    a mere victim, so both ranks behind stay missing."""
    last = {0: {"w": 10}, 1: {"w": 10}, 2: {"w": 9}, 3: {"w": 9}}
    (f,) = detect_hangs(_tl([0, 1, 2, 3], 100 * S), _coll(last), STACKS, {"h": 100 * S},
                        hang_after_s=10, step_ns=0.05 * S)
    assert (f["missing_ranks"], f["waiting_ranks"], f["seq"]) == ([2, 3], [0, 1], 10)


def test_one_comm_the_non_waiting_rank_is_missing():
    last = {0: {"w": 10}, 1: {"w": 10}, 2: {"w": 10}, 3: {"w": 9}}
    (f,) = detect_hangs(_tl([0, 1, 2], 100 * S), _coll(last), STACKS, {"h": 100 * S},
                        hang_after_s=10, step_ns=0.05 * S)
    assert (f["missing_ranks"], f["waiting_ranks"]) == ([3], [0, 1, 2])
    assert (f["comm"], f["seq"]) == ("w", 10)


def test_pipeline_stages_are_told_apart_where_their_dp_comms_share_a_name():
    """2 stages x 2 data-parallel, every comm made before attach: each stage's DP comm is
    `anon1` on its ranks and the send/recv comm `anon0` (peers are world ranks: 0 <-> 1,
    2 <-> 3). The stages are {0, 2} (they send first) and {1, 3} (they receive first); by
    the step comm's name alone there was one group, so no stage (and no slow stage)."""
    from argus.analyze import pipeline

    rows = []
    for r in range(4):
        first, peer = ("send", r + 1) if r % 2 == 0 else ("recv", r - 1)
        second = "recv" if first == "send" else "send"
        for step in range(10):
            t = step * 1000 + r
            rows += [{"rank": r, "comm": "anon0", "op": first, "peer": peer, "t_ns": t},
                     {"rank": r, "comm": "anon0", "op": second, "peer": peer, "t_ns": t + 100},
                     {"rank": r, "comm": "anon1", "op": "allreduce", "peer": None,
                      "t_ns": t + 200}]
    coll = pl.DataFrame(rows, schema={"rank": pl.Int32, "comm": pl.Utf8, "op": pl.Utf8,
                                      "peer": pl.Int32, "t_ns": pl.Int64})
    assert pipeline.stage_keys(coll) == {0: "anon1|send1", 1: "anon1|recv1",
                                         2: "anon1|send1", 3: "anon1|recv1"}
    assert pipeline.stages(coll) == [[0, 2], [1, 3]]


def test_step_ids_by_time_when_two_groups_of_one_comm_name_are_numbered_apart():
    """Each TP group's comm is `pg0` on its ranks; aligned as one comm, group {2, 3} came
    out 10 collectives off group {0, 1}: 20 ids for 10 steps (the zoo's tp_dp job with a
    straggler counted 192 steps for 97). Then the steps are numbered by time: step k
    starts at about the same time on every rank."""
    from argus.analyze.steps import global_step_ids

    def steps(off: int, jitter: int) -> list[dict]:
        return [{"key": ("pg0", k + off, False), "start_ns": k * 100 + jitter,
                 "end_ns": k * 100 + jitter + 95} for k in range(10)]

    per_rank = {0: steps(0, 0), 1: steps(0, 2), 2: steps(10, 1), 3: steps(10, 3)}
    assert global_step_ids(per_rank) == {r: list(range(10)) for r in range(4)}
    # agreeing numberings keep the collective's ids (a rank that joined 2 steps late)
    per_rank = {0: steps(0, 0), 1: steps(0, 2), 2: steps(0, 1)[2:], 3: steps(0, 3)}
    assert global_step_ids(per_rank)[2] == list(range(2, 10))
