"""The daemon's incremental analysis whatever the drain timing, on recorded event streams, no
root: a recording is replayed through the daemon's per-job path (`JobWindow.add_rows`,
`JobWindow.settling`, `Daemon._analyse`, as `Daemon.flush` calls them) with the flushes put
where they hurt:
inside a collective call, inside the end-of-step wait, right after a step boundary, two
or more intervals' rows at once (a late drain), intervals that bring no rows, and the
tracer's in-flight snapshot taken later than its ring-buffer read (a daemon descheduled
between the two).

The streams are what a daemon sees of a job: its ranks attached one after another, each
one's NCCL `seq` counting from its own attach, as the tracer's counter does.
`daemon_busy_straggler` is 8 s of what the daemon itself drained from a 3-rank simulated
job (rank 1 a 1.6x GPU straggler) with a CPU hog beside it on this 2-core machine (the
ranks enter the same collective up to 40 ms apart, differently every step); the simulator
recordings get a 150 ms attach stagger here. `sim_straggler_stalled` is 5.6 s of the same
job under `argus attach` with all 3 ranks stopped (SIGSTOP) for 0.3-0.7 s every 0.8-2 s, as
a busy node's CPU hogs stop them: a build over a window that held one rank's step start
after a stall and not the others' merged the others' steps 2 at a time (`cycles.
agree_on_period` measured each rank's mean cycle over its own starts), and the daemon
numbered two steps alike, or one rank's ids went one step off the others' for the rest of
the run (`make test-stress`). Checks:
- per rank the step ids of all segments are consecutive, none twice, and they are the
  ids of one build over the whole recording up to one shift for all ranks; one id is one
  step on every rank (its starts within half a step time, but for a stall now and then);
- a hang: every interval's live finding and `argus report` over the segments name the
  whole recording's waiting and missing ranks, also after the raw rows of the hang's start
  aged out of the daemon's window (a 2 s window, a 5 s hang).

Before the fix (docs/daemon.md, "Whatever the drain timing") the busy stream's segments
went 48, 50, 52 on every rank when a flush fell inside or right after an end-of-step wait,
and the hang's findings said "every rank arrived" once the hang was older than the window."""

from __future__ import annotations

import io
import json
import random
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from argus.analyze.compress import build_summaries
from argus.analyze.diagnosis import diagnose
from argus.cli import main
from argus.daemon.service import SETTLE_S, Daemon, DaemonOptions, _Job
from argus.recording import schema
from argus.recording.io import Recording, load_recording
from argus.recording.segments import expand_dirs
from argus.recording.summaries import load_summaries

pytestmark = pytest.mark.unit
DATA = Path(__file__).resolve().parents[1] / "data"
STAGGER_NS = 150_000_000  # ranks attached one scan step after another
INTERVAL_S = 0.5
MS = 1_000_000


def _attached(rec: Recording, stagger_ns: int = STAGGER_NS) -> tuple[Recording, dict[int, int]]:
    """The recording as a daemon attaching rank after rank sees it: rank i's rows from
    i * stagger_ns after the first event on, its NCCL seq counted from there. Returns the
    stream and each tgid's attach time (monotonic ns)."""
    ev = rec.events
    t0 = int(ev["ts_ns"].min())
    tgids = [r["tgid"] for r in sorted(rec.manifest["ranks"], key=lambda r: r["rank"])]
    attach = {t: t0 + i * stagger_ns for i, t in enumerate(tgids)}
    att = pl.DataFrame({"tgid": list(attach), "_att": list(attach.values())},
                       schema={"tgid": ev.schema["tgid"], "_att": pl.Int64})
    ev = ev.join(att, on="tgid").filter(pl.col("ts_ns") >= pl.col("_att")).drop("_att")
    ev = ev.with_columns(
        (pl.col("seq") - pl.col("seq").min().over(["tgid", "comm"])).alias("seq"))
    st = rec.stacks.join(att, on="tgid").filter(pl.col("ts_ns") >= pl.col("_att")).drop("_att")
    out = Recording(manifest=rec.manifest, events=ev.sort("ts_ns"), stacks=st,
                    host_ctx=rec.host_ctx)
    return out, attach


def _fake_tracer(rec: Recording):
    m = rec.manifest
    targets = {r["tgid"]: SimpleNamespace(traced=True, exited=False, rank=r["rank"],
                                          local_rank=r.get("local_rank"),
                                          world_size=r.get("world_size"), env={}, exe=None,
                                          libraries=[])
               for r in m["ranks"]}
    return SimpleNamespace(
        targets_view=targets, cuda_device=lambda _t: None, probes_of=lambda _t: 7,
        mono_to_wall_ns=m["clock"]["mono_to_wall_ns"],
        opts=SimpleNamespace(sample_hz=49, channels=("cuda", "nccl", "torch", "cpu", "host")),
        kernels=SimpleNamespace(take=lambda: None,
                                manifest=lambda: {"kernels": {"enabled": False, "agents": {}}}),
    )


def _drive(rec: Recording, attach: dict[int, int], flushes: list[tuple[int, int]], out: Path,
           window_s: float = 60.0, hang_after_s: float = 10.0, exit_at_end: bool = True,
           ) -> tuple[Daemon, _Job, list[dict]]:
    """Flush the job at each (ring-buffer read, in-flight snapshot) pair of monotonic ns, as
    `Daemon.flush` does: the calls that returned since the last read (a record reaches
    user space when the call returns), the calls in flight at the snapshot, CPU stack rows
    of the interval; the first analysis once the ranks were traced together long enough
    (`JobWindow.settling`). After the recording's end every rank exits (when `exit_at_end`) and a
    last flush runs. Returns the daemon, the job and every interval's live view."""
    d = Daemon(DaemonOptions(output=out, metrics_addr=None, overrides={
        "interval_s": INTERVAL_S, "window_s": window_s, "hang_after_s": hang_after_s}))
    d.tracer = _fake_tracer(rec)
    job = _Job("torchelastic-test", tgids=set(d.tracer.targets_view))
    ev = rec.events.with_columns(pl.col("in_flight").fill_null(False))
    done = ev.filter(~pl.col("in_flight"))
    never = ev.filter(pl.col("in_flight"))  # still in flight when the recording ended
    end = pl.col("ts_ns") + pl.col("dur_ns").fill_null(0)
    t1 = int(rec.manifest["ended_ns"])
    flushes = [*flushes, (t1 + 1, t1 + 1)]
    prev = int(ev["ts_ns"].min()) - 1
    views = []
    for i, (read, snap) in enumerate(flushes):
        last = i == len(flushes) - 1
        if last and exit_at_end:
            for t in d.tracer.targets_view.values():
                t.exited = True
        now = min(max(read, snap), t1)
        rows = done.filter((end >= prev) & (end < read)) if read > prev else done.head(0)
        infl = pl.concat([
            done.filter((pl.col("ts_ns") < snap) & (end >= snap)),
            never.filter(pl.col("ts_ns") < snap),
        ]).with_columns(pl.lit(True).alias("in_flight"), pl.lit(None, pl.Int64).alias("dur_ns"))
        sel = (pl.col("ts_ns") >= prev) & (pl.col("ts_ns") < read)
        job.win.add_rows(rows.sort("ts_ns"), rec.stacks.filter(sel), rec.host_ctx.filter(sel),
                         now, INTERVAL_S)
        prev = max(prev, read)
        joined = [a for a in attach.values() if a <= now]
        job.win.joined_ns = max(joined) if joined else None
        if job.win.joined_ns is None or job.win.settling(now, max(SETTLE_S, 2 * INTERVAL_S)):
            continue
        job.view = d._analyse(job, infl, schema.empty_gpu(), now)
        views.append(job.view)
    return d, job, views


def _points(rec: Recording, what: str) -> list[tuple[int, int]]:
    """Call intervals (entry, return) of one kind, for flushes placed inside or after them."""
    ev = rec.events.filter(~pl.col("in_flight").fill_null(False) & pl.col("dur_ns").is_not_null())
    if what == "collective":
        ev = ev.filter(pl.col("channel") == "nccl")
    else:  # the end-of-step waits (read-back, synchronize)
        ev = ev.filter(pl.col("name").is_in(["cudaMemcpy", "cudaStreamSynchronize"]))
    return [(t, t + d) for t, d in ev.select("ts_ns", "dur_ns").sort("ts_ns").rows()]


def _schedule(rec: Recording, kind: str, seed: int) -> list[tuple[int, int]]:
    """Flush times (ring-buffer read, in-flight snapshot) of one adversarial kind."""
    rnd = random.Random(seed)
    t0, t1 = int(rec.events["ts_ns"].min()), int(rec.manifest["ended_ns"])
    colls, waits = _points(rec, "collective"), _points(rec, "wait")
    step = int(INTERVAL_S * 1e9)
    out: list[tuple[int, int]] = []
    t = t0 + rnd.randrange(step)
    while t < t1:
        mode = kind if kind != "mixed" else rnd.choice(
            ["regular", "mid_collective", "mid_wait", "after_boundary", "late", "empty",
             "late_snapshot"])
        if mode == "mid_collective":  # inside the next collective call after one interval
            a, b = next(((a, b) for a, b in colls if a > t + step // 2), (t + step, t + step))
            t = (a + b) // 2
        elif mode == "mid_wait":  # inside the end-of-step wait (mid-step for the analysis)
            a, b = next(((a, b) for a, b in waits if a > t + step // 2 and b - a > 2 * MS),
                        (t + step, t + step))
            t = a + (b - a) // 3
        elif mode == "after_boundary":  # 1 ns after a step boundary (end of the wait)
            a, b = next(((a, b) for a, b in waits if b > t + step // 2 and b - a > 2 * MS),
                        (t + step, t + step))
            t = b + 1
        elif mode == "late":  # two or three intervals' rows in one drain
            t += rnd.choice([2, 3]) * step + rnd.randrange(step)
        elif mode == "empty":  # an interval that brings no rows at all
            out.append((t, t))
            t += step
        else:
            t += step
        snap = t + (rnd.choice([5, 20, 60]) * MS if mode == "late_snapshot" else 0)
        out.append((t, snap))
    return out


def _written(out: Path) -> pl.DataFrame:
    rows = []
    for i, seg in enumerate(expand_dirs([out])):
        s = load_summaries(seg)
        rows += [(i, *r) for r in s.steps.select("rank", "step", "start_ns").rows()]
    return pl.DataFrame(rows, schema={"seg": pl.Int64, "rank": pl.Int64, "step": pl.Int64,
                                      "start_ns": pl.Int64}, orient="row")


KINDS = ["regular", "mid_collective", "mid_wait", "after_boundary", "late", "empty", "mixed"]


def _stream(name: str) -> tuple[Recording, dict[int, int], Recording]:
    """(the stream the daemon sees, each tgid's attach time, the reference recording)."""
    rec = load_recording(DATA / name)
    if name.startswith("daemon_"):  # drained by a daemon: attached as it happened
        first = rec.events.group_by("tgid").agg(pl.col("ts_ns").min()).rows()
        return rec, dict(first), rec
    stream, attach = _attached(rec)
    return stream, attach, rec


@pytest.mark.parametrize(("name", "seeds"), [("daemon_busy_straggler", 1), ("sim_straggler", 1),
                                             ("sim_straggler_stalled", 1)])
@pytest.mark.parametrize("kind", KINDS)
def test_step_ids_are_continuous_whatever_the_drain_timing(name, seeds, kind, tmp_path):
    rec, attach, ref = _stream(name)
    whole = build_summaries([ref]).steps.select("rank", "start_ns", pl.col("step").alias("w"))
    half = int(whole.join(build_summaries([ref]).steps.select("rank", "start_ns",
                                                               "step_time_ns"),
                          on=["rank", "start_ns"])["step_time_ns"].median() // 2)
    for seed in range(seeds):
        out = tmp_path / f"{kind}-{seed}"
        _drive(rec, attach, _schedule(rec, kind, seed), out)
        got = _written(out)
        assert got.height, (kind, seed)
        assert got.select("rank", "start_ns").is_unique().all(), "a step written twice"
        assert got.select("rank", "step").is_unique().all(), "an id given twice"
        for rank, ids in got.sort("start_ns").group_by("rank", maintain_order=True).agg(
                pl.col("step")).rows():
            assert ids == list(range(ids[0], ids[0] + len(ids))), (kind, seed, rank, ids)
        # one id, one step: the ranks' starts of an id lie within half a step time (but for
        # a stalled rank now and then: one rank off by a step would put every id off)
        spread = got.group_by("step").agg((pl.col("start_ns").max() - pl.col("start_ns").min())
                                          .alias("d"))["d"]
        assert (spread < half).mean() >= 0.9, (kind, seed, spread.to_list(), half)
        # the whole recording's steps, from the daemon's first one on, with the same ids up
        # to one shift for every rank
        j = got.join(whole, on=["rank", "start_ns"], how="left")
        assert j["w"].null_count() == 0, (kind, seed, j.filter(pl.col("w").is_null()))
        assert (j["step"] - j["w"]).unique().to_list() == [int(j["step"][0] - j["w"][0])]
        first = got.group_by("rank").agg(pl.col("start_ns").min().alias("_first"))
        want = whole.join(first, on="rank").filter(pl.col("start_ns") >= pl.col("_first"))
        assert sorted(got.select("rank", "start_ns").rows()) == sorted(
            want.select("rank", "start_ns").rows()), (kind, seed)


def _hang(finding: dict) -> tuple:
    return (finding["waiting_ranks"], finding["missing_ranks"], finding["op"])


@pytest.mark.parametrize("kind", ["regular", "late", "mid_wait", "empty", "mixed"])
def test_hang_findings_of_the_segments_are_the_live_ones(kind, tmp_path):
    """sim_hang: rank 3 stops before a collective ~1 s in, the others wait 5 s. With a 2 s
    window the raw rows of the hang's start age out while it lasts: the live finding and
    the segments' must still name ranks 0-2 waiting and rank 3 missing."""
    full = load_recording(DATA / "sim_hang")
    (expect,) = [f for f in diagnose([build_summaries([full])], hang_after_s=2.0)
                 ["findings"] if f["kind"] == "collective_hang"]
    assert (expect["waiting_ranks"], expect["missing_ranks"]) == ([0, 1, 2], [3])
    rec, attach = _attached(full)
    for seed in range(2):
        out = tmp_path / f"{kind}-{seed}"
        _d, job, views = _drive(rec, attach, _schedule(rec, kind, seed), out, window_s=2.0,
                                hang_after_s=2.0, exit_at_end=False)
        live = [[f for f in v["findings"] if f["kind"] == "collective_hang"] for v in views]
        hung = [h for h in live if h]
        assert len(hung) >= 3, (kind, seed, live)  # flagged over several intervals
        assert all(len(h) == 1 and _hang(h[0]) == _hang(expect) for h in hung), (kind, seed,
                                                                                  hung)
        assert not any(h for h in live[live.index(hung[0]):] if not h), (kind, seed, live)
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(["report", str(out), "--json", "--hang-after", "2"]) == 0
        (seg,) = [f for f in json.loads(buf.getvalue())["findings"]
                  if f["kind"] == "collective_hang"]
        assert _hang(seg) == _hang(expect)
        assert (seg["comm"], seg["seq"]) == (hung[-1][0]["comm"], hung[-1][0]["seq"])
        assert job.view is views[-1]
