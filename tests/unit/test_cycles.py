"""`cycles.agree_on_period`: a rank seen with k cycles per step is merged k at a time, and a
stall of the whole job does not make a rank look like that."""

from __future__ import annotations

import numpy as np
import pytest

from argus.analyze.cycles import Markers, agree_on_period

pytestmark = pytest.mark.unit
MS = 1_000_000
PER_STEP = 4  # markers per cycle (a simulated step's 4 gradient allreduces)


def _rank(cycle_starts_ms: list[float]) -> tuple[Markers, tuple]:
    """A rank whose cycles (PER_STEP markers 1 ms apart) start at these times, and its
    cycle as `cycles.cycle` gives it."""
    t = [int((s + j) * MS) for s in cycle_starts_ms for j in range(PER_STEP)]
    n = len(t)
    idle = [None] + [t[i] - t[i - 1] for i in range(1, n)]
    m = Markers(tok=np.zeros(n, dtype=np.int64), t=t, end=t, idle=idle, comm=[None] * n,
                gseq=[None] * n, p2p=[False] * n, waited=[i % PER_STEP == 0 for i in range(n)],
                waits=[], work=[0] * n, bucket=np.zeros(n, dtype=bool))
    return m, (PER_STEP, list(range(0, n, PER_STEP)), True, True)


def _agree(ranks: dict[int, list[float]]) -> dict[int, tuple[int, int]]:
    built = {r: _rank(starts) for r, starts in ranks.items()}
    out = agree_on_period({r: m for r, (m, _c) in built.items()},
                          {r: c for r, (_m, c) in built.items()})
    return {r: (c[0], len(c[1])) for r, c in out.items()}


def _steps(first: float, n: int, dt: float = 85.0, stall_after: int | None = None,
           stall: float = 0.0) -> list[float]:
    """n cycle starts dt apart from `first`; `stall` ms more before the one at index
    stall_after + 1 (every rank stopped at once)."""
    out, t = [], first
    for i in range(n):
        out.append(t)
        t += dt + (stall if stall_after is not None and i == stall_after else 0.0)
    return out


def test_a_rank_whose_starts_go_on_past_a_stall_is_not_merged():
    # the daemon build seen under a CPU hog: every rank stopped for 580 ms; one rank's
    # next step start was recorded, the others' not yet. Over each rank's own starts its
    # mean cycle was 150 ms against 85 for the others (1.76x, "2 cycles per step" within
    # 15%) and the other ranks' steps were merged 2 at a time.
    ranks = {0: _steps(0.0, 9), 1: _steps(15.0, 9), 2: _steps(0.0, 9)}
    ranks[2].append(ranks[2][-1] + 668.0)
    assert _agree(ranks) == {0: (4, 9), 1: (4, 9), 2: (4, 10)}


def test_a_stall_at_the_start_of_one_ranks_cycles_only_is_not_merged():
    # the stall is the first gap of every rank, but one rank's first start is 15 ms after
    # the others': its cycles must not be measured from after the stall only
    ranks = {r: _steps(off, 10, stall_after=0, stall=620.0)
             for r, off in ((0, 0.0), (1, 15.0), (2, 0.0))}
    ranks[2].append(ranks[2][-1] + 83.0)
    assert _agree(ranks) == {0: (4, 10), 1: (4, 10), 2: (4, 11)}


def test_a_rank_with_two_cycles_per_step_is_merged_even_across_a_stall():
    # the other side (a last 1F1B stage repeating its recv/send): rank 1 cycles twice per
    # step of rank 0; a 600 ms stall of both in the middle leaves that ratio as it is
    ranks = {0: _steps(0.0, 10, dt=170.0, stall_after=4, stall=600.0),
             1: _steps(40.0, 20, dt=85.0, stall_after=9, stall=600.0)}
    got = _agree(ranks)
    assert got == {0: (4, 10), 1: (8, 10)}
