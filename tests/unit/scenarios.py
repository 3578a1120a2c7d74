"""Synthetic recordings with the semantics of a data-parallel training job (see docs/report.md).

`simulate(...)` plays N ranks through steps with a per-rank host clock and a per-rank GPU
clock: data loading (CPU, sampled into stacks), forward launches, a blocking D2H loss
read-back (waits for the rank's own GPU), backward launches with bucketed ncclAllReduce (each
completes on the GPU when the slowest rank's GPU reached it, plus the transfer time),
optimizer launches, an end-of-step cudaStreamSynchronize, and a logging read-back every 10
steps. The recording window starts inside step 0 and ends inside the last step, so exactly
`steps` complete steps are recorded. Faults are keyword arguments; everything is
deterministic for a seed.

`kernels=True` also records what argus's GPU agent would (each recording's `kernels`,
KERNELS_SCHEMA, from the same GPU clocks): one CUPTI record per kernel (forward
`fwd_gemm`/`fwd_softmax`, backward `bwd_gemm`/`bwd_softmax`, optimizer `adam_step`), per
read-back a memcpy, per allreduce an NCCL kernel-channel record per channel (2) from the
rank's GPU reaching it to the collective's end (the same on every rank). `kernel_slow`
(rank -> {family: factor}) slows only those kernel families; `readback=False` leaves out the
read-back after forward (a loop that never calls loss.item() mid-step: a GPU-slow rank is
then invisible host-side). `gpu_busy` (rank -> (from step, to step, ms)) occupies the
rank's GPU with work that is not its own (another process) before its backward: none of its
kernels is slower, its GPU reaches the collectives late.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from argus.recording.io import Recording, coerce
from argus.recording.schema import (
    EVENTS_SCHEMA,
    FORMAT,
    KERNELS_SCHEMA,
    STACKS_SCHEMA,
    empty_kernels,
)

MS = 1_000_000
US = 1_000
WALL0 = 1_700_000_000 * 1_000_000_000
BUCKETS = (("allreduce", 100 << 20), ("allreduce", 100 << 20), ("allreduce", 37 << 20))

LOAD_STACK = (["decode_batch", "load_batch", "train_step", "main", "__libc_start_main"],
              ["train", "train", "train", "train", "libc.so.6"])
JIT_STACK = (["memcpy", "jit_compile_graph", "train_step", "main", "__libc_start_main"],
             ["libc.so.6", "train", "train", "train", "libc.so.6"])
WAIT_STACK = (["futex_wait", "do_futex", "argus_sim_stream_sync", "cudaStreamSynchronize",
               "train_step", "main"],
              ["[kernel]", "[kernel]", "libargus_simgpu.so", "libcudart.so.12", "train",
               "train"])
HANG_STACK = (["pthread_mutex_lock", "wait_for_dataloader_worker", "load_batch", "train_step",
               "main"],
              ["libc.so.6", "train", "train", "train", "train"])


@dataclass
class Scenario:
    recordings: list[Recording]
    truth: dict[str, Any] = field(default_factory=dict)


def _manifest(host: str, ranks: list[int], mono_base: int, clock_err: int, start: int,
              end: int, world: int, end_reason: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "argus_version": "0.1.0",
        "host": host,
        "kernel": "6.1.0-test",
        "clock": {"mono_to_wall_ns": WALL0 - mono_base + clock_err},
        "started_ns": start + mono_base,
        "ended_ns": end + mono_base,
        "duration_s": (end - start) / 1e9,
        "end_reason": end_reason,
        "sample_hz": 1000,
        "channels": {"cuda": True, "nccl": True, "torch": True, "cpu": True},
        "ranks": [
            {
                "rank": r,
                "local_rank": r,
                "world_size": world,
                "tgid": 1000 + r,
                "host": host,
                "exe": "/usr/bin/train",
                "env": {"RANK": str(r)},
                "libraries": [],
            }
            for r in ranks
        ],
        "probes": [],
        "drops": {"events_ringbuf": 0, "stack_walk_failed": 0, "stack_map_full": 0},
        "counts": {"events": {}, "stack_samples": 0},
    }


def simulate(
    ranks: int = 4,
    steps: int = 20,
    seed: int = 1,
    jitter: float = 0.02,
    gpu_slow: dict[int, float] | None = None,  # rank -> GPU time factor (all steps)
    host_stall: dict[int, tuple[int, int, float]] | None = None,  # rank -> (from, to, extra ms)
    jit_stall: dict[int, tuple[int, int, float]] | None = None,  # rank -> (from, to, extra ms)
    link_slow: tuple[int, int, float] | None = None,  # (from step, to step, factor)
    hang: tuple[int, int] | None = None,  # (rank, step): the rank never reaches bucket 1
    exit_rank: tuple[int, int] | None = None,  # (rank, step): the rank exits before bucket 0
    hang_tail_s: float = 30.0,
    torch_only: bool = False,
    hosts: int = 1,
    clock_err_ns: dict[int, int] | None = None,  # node index -> wall clock error
    attach_bucket: dict[int, int] | None = None,  # rank -> first bucket of step 0 observed
    drop: float = 0.0,
    kernels: bool = False,
    kernel_slow: dict[int, dict[str, float]] | None = None,
    readback: bool = True,
    gpu_busy: dict[int, tuple[int, int, float]] | None = None,  # rank -> (from, to, ms)
) -> Scenario:
    """Simulate a job; see the module doc. Steps are numbered 0..steps+1; 1..steps complete."""
    rng = random.Random(seed)
    gpu_slow = gpu_slow or {}
    host_stall = host_stall or {}
    jit_stall = jit_stall or {}
    clock_err_ns = clock_err_ns or {}
    attach_bucket = attach_bucket if attach_bucket is not None else {r: 1 for r in range(ranks)}
    n_buckets = len(BUCKETS) if ranks > 1 or torch_only else 0
    ev: list[dict[str, Any]] = []
    st: list[dict[str, Any]] = []
    h = [0] * ranks  # host clocks
    g = [0] * ranks  # GPU clocks
    attach = [None] * ranks
    dead: set[int] = set()
    stuck: dict[int, int] = {}
    kern: list[dict[str, Any]] = []  # device records (kernels=True)
    kernel_slow = kernel_slow or {}

    def j(x: float) -> int:
        return int(x * (1 + rng.uniform(-jitter, jitter)))

    def add(r: int, t: int, dur: int | None, channel: str, name: str, **kw: Any) -> None:
        ev.append({"ts_ns": t, "dur_ns": dur, "in_flight": dur is None, "tgid": 1000 + r,
                   "tid": 1000 + r, "rank": r, "channel": channel, "name": name, **kw})

    def cpu(r: int, dur: int, stack: tuple[list[str], list[str]]) -> None:
        n = max(1, dur // MS)
        st.append({"ts_ns": h[r], "interval_ns": dur, "tgid": 1000 + r, "tid": 1000 + r,
                   "rank": r, "thread": "train", "count": n, "functions": stack[0],
                   "modules": stack[1]})
        h[r] += dur

    def wait(r: int, t_until: int, name: str, **kw: Any) -> None:
        start = h[r]
        end = max(start, t_until) + 5 * US
        add(r, start, end - start, "cuda", name, **kw)
        if end - start > 2 * MS:
            st.append({"ts_ns": start, "interval_ns": end - start, "tgid": 1000 + r,
                       "tid": 1000 + r, "rank": r, "thread": "train", "count": 1,
                       "functions": WAIT_STACK[0], "modules": WAIT_STACK[1]})
        h[r] = end

    def launch(r: int, n: int, gpu_ns: float, names: tuple[str, ...] = ("gemm",)) -> None:
        for i in range(n):
            add(r, h[r], 8 * US, "cuda", "cudaLaunchKernel", kernel="gemm_kernel", stream=7)
            h[r] += 10 * US
            name = names[i % len(names)]
            t0 = max(g[r], h[r])
            g[r] = t0 + int(j(gpu_ns / n) * gpu_slow.get(r, 1.0)
                            * kernel_slow.get(r, {}).get(name, 1.0))
            if kernels:
                kern.append({"ts_ns": t0, "dur_ns": g[r] - t0, "tgid": 1000 + r, "rank": r,
                             "kind": "kernel", "name": name, "device": r, "stream": 7,
                             "correlation": len(kern) + 1})

    def copy(r: int) -> None:
        if kernels:
            kern.append({"ts_ns": g[r], "dur_ns": 2 * US, "tgid": 1000 + r, "rank": r,
                         "kind": "memcpy", "name": "memcpy", "device": r, "stream": 0,
                         "bytes": 4})

    seq = [0] * ranks
    coll_t: list[list[int]] = [[] for _ in range(ranks)]
    last_start = [0] * ranks
    for k in range(steps + 2):
        live = [r for r in range(ranks) if r not in dead and r not in stuck]
        for r in live:
            last_start[r] = h[r]
            if exit_rank and exit_rank == (r, k):
                add(r, h[r], None, "proc", "exit")
                ev[-1]["in_flight"] = False
                dead.add(r)
                continue
            load = j(5 * MS)
            cpu(r, load, LOAD_STACK)
            if r in host_stall and host_stall[r][0] <= k <= host_stall[r][1]:
                cpu(r, int(host_stall[r][2] * MS), LOAD_STACK)
            if r in jit_stall and jit_stall[r][0] <= k <= jit_stall[r][1]:
                cpu(r, int(jit_stall[r][2] * MS), JIT_STACK)
            if torch_only:
                cpu(r, j(20 * MS) * gpu_slow.get(r, 1.0), LOAD_STACK)
            else:
                launch(r, 6, 20 * MS, ("fwd_gemm", "fwd_softmax"))
                if readback:
                    copy(r)
                    wait(r, g[r], "cudaMemcpy", memcpy_kind=2, bytes=4, stream=0)
        live = [r for r in range(ranks) if r not in dead and r not in stuck]
        for r, (a, z, ms) in (gpu_busy or {}).items():
            if r in live and a <= k <= z:
                g[r] = max(g[r], h[r]) + int(ms * MS)
        for b in range(n_buckets):
            op, nbytes = BUCKETS[b]
            ready = {}
            for r in live:
                if r in stuck:
                    continue
                if hang and hang == (r, k) and b == 1:
                    stuck[r] = h[r]
                    continue
                if torch_only:
                    cpu(r, j(12 * MS) * gpu_slow.get(r, 1.0), LOAD_STACK)
                else:
                    launch(r, 4, 12 * MS, ("bwd_gemm", "bwd_softmax"))
                ready[r] = (h[r], g[r])
            if not ready:
                break
            factor = link_slow[2] if link_slow and link_slow[0] <= k <= link_slow[1] else 1.0
            xfer = int(j(3 * MS) * factor)
            arrived = [r for r in ready]
            complete = len(arrived) == ranks  # an exited or stuck rank never arrives
            done = max(x[1] for x in ready.values()) + xfer if not torch_only else (
                max(x[0] for x in ready.values()) + xfer
            )
            for r in arrived:
                kw = {"op": op, "bytes": nbytes, "count": nbytes // 4, "dtype": "float32",
                      "redop": "sum", "comm": "0xc0ffee", "comm_rank": r, "comm_nranks": ranks,
                      "seq": seq[r]}
                seq[r] += 1
                coll_t[r].append(h[r])
                if torch_only:
                    if complete:
                        add(r, h[r], done - h[r] + 20 * US, "torch",
                            "c10d::ProcessGroupGloo::allreduce", **kw)
                        h[r] = done + 20 * US
                    else:
                        add(r, h[r], None, "torch", "c10d::ProcessGroupGloo::allreduce", **kw)
                        stuck[r] = h[r]
                else:
                    add(r, h[r], 20 * US, "nccl", "ncclAllReduce", stream=7, **kw)
                    if kernels and complete:
                        t0 = max(ready[r])  # the GPU reaches it after its enqueue
                        for ch in range(2):
                            kern.append({"ts_ns": t0, "dur_ns": done - t0,
                                         "tgid": 1000 + r, "rank": r, "kind": "coll",
                                         "name": "AllReduce", "device": r,
                                         "comm_hash": 0xC0FFEE, "coll_seq": seq[r] - 1,
                                         "channel": ch, "bytes": nbytes})
                    h[r] += 20 * US
                    g[r] = done if complete else 1 << 62
        live = [r for r in range(ranks) if r not in dead and r not in stuck]
        for r in live:
            if torch_only:
                cpu(r, j(3 * MS), LOAD_STACK)
                continue
            launch(r, 3, 4 * MS, ("adam_step",))
            if g[r] >= 1 << 62:
                add(r, h[r], None, "cuda", "cudaStreamSynchronize", stream=7)
                stuck[r] = h[r]
                continue
            wait(r, g[r], "cudaStreamSynchronize", stream=7)
            if k % 10 == 0:
                copy(r)
                wait(r, g[r], "cudaMemcpy", memcpy_kind=2, bytes=64, stream=0)
        if attach[0] is None:
            # attach time per rank: just before its bucket `attach_bucket[r]` of step 0
            for r in range(ranks):
                ts = coll_t[r]
                b = attach_bucket.get(r, 1)
                attach[r] = ts[b] - 1 if b < len(ts) else 0
    # recording end: in the middle of the step after the last complete one
    if hang or exit_rank:
        end_t = max(h) + int(hang_tail_s * 1e9)
    else:  # inside the data loading of the last (incomplete) step on every rank
        end_t = min(last_start) + 2 * MS
    for r in stuck:
        stack = HANG_STACK if hang and r == hang[0] else WAIT_STACK
        st.append({"ts_ns": end_t - 2000 * MS, "interval_ns": 2000 * MS, "tgid": 1000 + r,
                   "tid": 1000 + r, "rank": r, "thread": "train", "count": 400,
                   "functions": stack[0], "modules": stack[1]})
    # trim: events of rank r before attach[r] are not seen; seq restarts at attach
    evf = pl.DataFrame(ev, infer_schema_length=None)
    evf = evf.with_columns(pl.col("rank").cast(pl.Int32))
    att = pl.DataFrame({"rank": list(range(ranks)), "attach": attach}).with_columns(
        pl.col("rank").cast(pl.Int32), pl.col("attach").cast(pl.Int64)
    )
    evf = evf.join(att, on="rank").filter(
        (pl.col("ts_ns") >= pl.col("attach")) & (pl.col("ts_ns") <= end_t)
    )
    evf = evf.with_columns(
        pl.when(pl.col("dur_ns").is_not_null() & (pl.col("ts_ns") + pl.col("dur_ns") > end_t))
        .then(None)
        .otherwise(pl.col("dur_ns"))
        .alias("dur_ns")
    )
    evf = evf.with_columns(
        (pl.col("dur_ns").is_null() & (pl.col("channel") != "proc")).alias("in_flight")
    )
    if "seq" in evf.columns:
        evf = evf.with_columns((pl.col("seq") - pl.col("seq").min().over("rank")).alias("seq"))
    evf = evf.drop("attach")
    if drop > 0:
        keep = [rng.random() >= drop for _ in range(evf.height)]
        evf = evf.filter(pl.Series(keep))
    stf = pl.DataFrame(st, infer_schema_length=None).with_columns(pl.col("rank").cast(pl.Int32))
    stf = (
        stf.join(att, on="rank")
        .filter((pl.col("ts_ns") >= pl.col("attach")) & (pl.col("ts_ns") <= end_t))
        .drop("attach")
    )
    # split by node
    per_node = max(1, ranks // hosts)
    recs = []
    for n in range(hosts):
        rs = list(range(n * per_node, ranks if n == hosts - 1 else (n + 1) * per_node))
        base = 10_000_000_000 * (n + 1)  # each node's monotonic clock has its own origin
        e = evf.filter(pl.col("rank").is_in(rs)).with_columns(pl.col("ts_ns") + base)
        s = stf.filter(pl.col("rank").is_in(rs)).with_columns(pl.col("ts_ns") + base)
        start = min(attach[r] for r in rs)
        host = f"node{n}"
        m = _manifest(host, rs, base, clock_err_ns.get(n, 0), start, end_t, ranks,
                      "duration")
        kf = empty_kernels()
        if kern:  # what the agent saw: from attach, device starts up to the recording's end
            kf = pl.DataFrame(kern, schema={c: KERNELS_SCHEMA[c] for c in kern[0]} | {
                c: KERNELS_SCHEMA[c] for c in ("stream", "correlation", "comm_hash",
                                               "coll_seq", "channel", "bytes")},
                infer_schema_length=None)
            kf = kf.join(att, on="rank").filter(
                pl.col("rank").is_in(rs) & (pl.col("ts_ns") >= pl.col("attach"))
                & (pl.col("ts_ns") + pl.col("dur_ns") <= end_t)).drop("attach")
            kf = coerce(kf.with_columns(pl.col("ts_ns") + base), KERNELS_SCHEMA, "kernels")
        recs.append(Recording(m, coerce(e, EVENTS_SCHEMA, "events"),
                              coerce(s, STACKS_SCHEMA, "stacks"), kernels=kf))
    return Scenario(recs, {"steps": steps})
