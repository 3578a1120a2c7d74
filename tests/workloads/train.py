"""The workload zoo: real PyTorch training jobs (CPU, gloo) in the shapes real jobs have.

    python tests/workloads/train.py --shape SHAPE --truth-dir DIR [--steps S | --duration SEC]
        [--wait-go FILE] [--straggler RANK:PCT] [--hang RANK:GROUP:OP:STEP[:NTH]]
        [--slow-stage STAGE:PCT] [--step-ms MS] [--warmup-steps W] [--comm NAME]

Shapes (tests/workloads/shapes.py lists their groups and per-step collectives):
- ddp: DistributedDataParallel on the default group, one gradient bucket.
- tp_dp: 2 tensor-parallel x 2 data-parallel on 4 ranks: TP groups {0,1},{2,3}, DP groups
  {0,2},{1,3} (dist.new_group), Megatron's f/g operators (a TP allreduce per layer in
  forward and one in backward), DDP on the DP group, every 5th step a world allgather of
  the loss + a broadcast from rank 0 (metrics, the stop flag real jobs broadcast).
- pp_gpipe / pp_1f1b: 4 stages on 4 ranks, M micro-batches through dist.send/recv (GPipe:
  all forwards then all backwards) or isend/irecv pairs (1F1B, Megatron's schedule without
  interleaving); an optimizer step per step.
- grad_accum: DDP with K micro-steps per step, no_sync() for the first K-1.
- sync_every_n: DDP; the loss stays a tensor and is allreduced + .item()'d only every Nth
  step (logging without a host sync per step).

Rank and world come from the environment the launcher set: RANK/WORLD_SIZE/LOCAL_RANK
(torchrun, a plain shell), else OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK (Open MPI's mpirun)
or PMI_RANK/PMI_SIZE (+MPI_LOCALRANKID; MPICH/Intel MPI hydra), mapped onto torch's
variables by this script as MPI launch wrappers do; MASTER_ADDR/MASTER_PORT always.

The GPU time of a layer is a sleep in forward and backward (`wait_for_device`: a host
waiting for its GPU), `--step-ms` in all per step, so 4 ranks fit on 2 cores; the real
torch compute on small tensors is a few ms of CPU per step.

Faults (each written to the truth with its parameters):
- `--straggler RANK:PCT`: RANK burns PCT % of the step time (`--straggler-base-ms`, by
  default --step-ms; a harness passes the measured healthy step) of CPU per step in
  `host_straggler_work()` before its forward (a slow input pipeline on that host).
- `--hang RANK:GROUP:OP:STEP[:NTH]`: RANK blocks forever in `stuck_before_collective()`
  (a sleep) right before its NTH call (default 0) of OP on GROUP in step STEP; DDP's own
  gradient allreduce is reached through a comm hook (torch's allreduce_hook) only then.
- `--slow-stage STAGE:PCT` (pipelines): that stage's device time is PCT % longer.

`--wait-go FILE`: the process groups are created and `--warmup-steps` steps (default 2:
DDP rebuilds its buckets in the second) are run, then each rank prints
`ready rank=R pid=P` and writes DIR/ready.R, and waits until FILE exists: the communicators
exist before a tracer attaches. Each rank writes DIR/truth.R.json at the end, on SIGTERM /
SIGINT (a thread sigwaits for them: a rank blocked in a collective still answers) and after
`--max-wall-s`; then a final barrier and os._exit(0) (torch 2.13's gloo teardown aborts
about 1 run in 12 otherwise, see tests/bpf/ddp_train.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes as zoo  # noqa: E402  (stdlib only)

TRUTH_SCHEMA = "argus.zoo.rank/1"
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def identity_from_env(env=os.environ) -> str:
    """Map the launcher's variables onto torch's RANK/WORLD_SIZE/LOCAL_RANK (in `env`);
    returns which launcher convention was found."""
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        env.setdefault("LOCAL_RANK", env["RANK"])
        return "torch"
    if env.get("OMPI_COMM_WORLD_RANK") is not None:
        env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
        env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", env["RANK"])
        return "ompi"
    if env.get("PMI_RANK") is not None:
        env["RANK"] = env["PMI_RANK"]
        env["WORLD_SIZE"] = env["PMI_SIZE"]
        env["LOCAL_RANK"] = env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", env["RANK"]))
        return "pmi"
    raise SystemExit("train.py: no rank in the environment (RANK/WORLD_SIZE, "
                     "OMPI_COMM_WORLD_RANK/SIZE or PMI_RANK/SIZE): start it with a launcher.")


# ------------------------------------------------------------------ named host functions
def host_straggler_work(ms: float) -> int:
    """`--straggler`: burn `ms` ms of this thread's CPU time (not a sleep: CPU stacks see it)."""
    end = time.thread_time() + ms / 1000.0
    n = 0
    while time.thread_time() < end:
        n += 1
    return n


def wait_for_device(ms: float) -> None:
    """A layer's GPU time: the host waits for its device (a sleep; see the module doc)."""
    if ms > 0:
        time.sleep(ms / 1000.0)


class Truth:
    """This rank's ground truth, written once (end, signal, watchdog, hang)."""

    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record
        self.lock = threading.Lock()
        self.written = False

    def write(self, exit_how: str) -> None:
        with self.lock:
            if self.written:
                return
            self.written = True
            self.record["exit"] = exit_how
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(self.record))
            os.replace(tmp, self.path)

    def leave(self, exit_how: str, code: int) -> None:
        self.write(exit_how)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def stuck_before_collective(truth: Truth, out: Path, rank: int, site: dict) -> None:
    """`--hang`: never returns (a rank stuck before a collective: a lost peer, a bug)."""
    truth.record["hung"] = True
    truth.record["hang_site"] = site
    tmp = out / f".hung.{rank}.tmp"
    tmp.write_text(json.dumps({**site, "pid": os.getpid(), "at": time.time()}))
    os.replace(tmp, out / f"hung.{rank}.json")
    while True:
        time.sleep(3600)


# ------------------------------------------------------------------ collectives
class Comms:
    """Every collective the shapes issue goes through here: counted per step per (group,
    op) for the hang sites, and per group since go for the truth."""

    def __init__(self, dist, pgs: dict, truth: Truth, out: Path, rank: int, hang: dict | None):
        self.dist, self.pgs, self.truth, self.out, self.rank = dist, pgs, truth, out, rank
        self.hang = hang if hang and hang["rank"] == rank else None
        self.step = -1
        self.per_step: Counter = Counter()
        self.total: Counter = Counter()

    def new_step(self, step: int) -> None:
        self.step = step
        self.per_step.clear()

    def before(self, group: str, op: str) -> None:
        nth = self.per_step[(group, op)]
        h = self.hang
        if h and self.step == h["step"] and (group, op, nth) == (h["group"], h["op"], h["nth"]):
            stuck_before_collective(self.truth, self.out, self.rank,
                                    {"group": group, "op": op, "step": self.step, "nth": nth,
                                     "group_calls_since_go": self.total[group]})
        self.per_step[(group, op)] += 1
        if self.step >= 0:
            self.total[group] += 1

    def hooked(self, group: str) -> bool:
        """Whether DDP's gradient allreduce on `group` must go through a comm hook (a hang
        is planted at it on this rank)."""
        return bool(self.hang) and self.hang["group"] == group and self.hang["op"] == "allreduce"

    def all_reduce(self, t, group: str) -> None:
        self.before(group, "allreduce")
        self.dist.all_reduce(t, group=self.pgs[group])

    def all_gather(self, out: list, t, group: str) -> None:
        self.before(group, "allgather")
        self.dist.all_gather(out, t, group=self.pgs[group])

    def broadcast(self, t, src: int, group: str) -> None:
        self.before(group, "broadcast")
        self.dist.broadcast(t, src, group=self.pgs[group])

    def send(self, t, dst: int) -> None:
        self.before("world", "send")
        self.dist.send(t, dst)

    def recv(self, t, src: int) -> None:
        self.before("world", "recv")
        self.dist.recv(t, src)

    def isend(self, t, dst: int):
        self.before("world", "send")
        return self.dist.isend(t, dst)

    def irecv(self, t, src: int):
        self.before("world", "recv")
        return self.dist.irecv(t, src)


def ddp_wrap(model, comms: Comms, group: str, world_of_group: int):
    """DDP on `group`. With a hang planted at its gradient allreduce on this rank, the
    allreduce goes through a comm hook (torch's allreduce_hook, counted by Comms);
    otherwise DDP's own C++ allreduce, counted after each synchronising backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    pg = comms.pgs[group]
    ddp = DDP(model, process_group=pg)
    if comms.hooked(group):
        dist = comms.dist

        def allreduce_hook(_state, bucket):
            comms.before(group, "allreduce")
            fut = dist.all_reduce(bucket.buffer(), group=pg, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0].div_(world_of_group))

        ddp.register_comm_hook(None, allreduce_hook)
    return ddp


def ddp_synced(comms: Comms, group: str) -> None:
    """A backward that synchronised DDP's gradients: count its allreduce (unhooked)."""
    if not comms.hooked(group):
        comms.before(group, "allreduce")


# ------------------------------------------------------------------ shapes
class Shape:
    def __init__(self, args, comms: Comms, rank: int, world: int, torch, dist):
        self.a, self.comms, self.rank, self.world = args, comms, rank, world
        self.torch, self.dist = torch, dist
        self.scale = 1.0  # device time multiplier (slow stage)

    def step(self, step: int) -> None:
        raise NotImplementedError


def _device_time_fn(torch, scale_of):
    class DeviceTime(torch.autograd.Function):
        """The GPU time of a layer (forward and backward): the host waits for its device."""

        @staticmethod
        def forward(ctx, x, fwd_ms, bwd_ms):
            ctx.bwd_ms = bwd_ms
            wait_for_device(fwd_ms * scale_of())
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            wait_for_device(ctx.bwd_ms * scale_of())
            return g, None, None

    return DeviceTime


class DDPShape(Shape):
    """ddp, grad_accum, sync_every_n: an MLP of `--layers` blocks under DDP (world)."""

    def __init__(self, *a):
        super().__init__(*a)
        torch, nn = self.torch, self.torch.nn
        self.DT = _device_time_fn(torch, lambda: self.scale)
        h, layers = self.a.hidden, self.a.layers
        torch.manual_seed(1234)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(h, h), nn.GELU())
                                     for _ in range(layers)])
        micro = self.a.accum if self.a.shape == "grad_accum" else 1
        per_layer = self.a.step_ms / micro / layers
        self.f_ms, self.b_ms = per_layer / 3, 2 * per_layer / 3

        outer = self

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = outer.blocks

            def forward(self, x):
                for b in self.blocks:
                    x = outer.DT.apply(b(x), outer.f_ms, outer.b_ms)
                return x

        self.ddp = ddp_wrap(Net(), self.comms, "world", self.world)
        self.opt = torch.optim.SGD(self.ddp.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(100 + self.rank)
        self.x = [torch.randn(self.a.batch, h, generator=gen) for _ in range(micro)]
        self.y = [torch.randn(self.a.batch, h, generator=gen) for _ in range(micro)]
        self.running = torch.zeros(())

    def _loss(self, i):
        return self.torch.nn.functional.mse_loss(self.ddp(self.x[i]), self.y[i])

    def step(self, step: int) -> None:
        a = self.a
        self.opt.zero_grad(set_to_none=True)
        if a.shape == "grad_accum":
            for k in range(a.accum):
                last = k == a.accum - 1
                with contextlib.nullcontext() if last else self.ddp.no_sync():
                    (self._loss(k) / a.accum).backward()
            ddp_synced(self.comms, "world")
            self.opt.step()
            return
        loss = self._loss(0)
        loss.backward()  # DDP's reducer allreduces the bucket here
        ddp_synced(self.comms, "world")
        self.opt.step()
        if a.shape == "sync_every_n":
            self.running += loss.detach()  # no host sync: the loss stays a tensor
            if step >= 0 and step % a.log_every == a.log_every - 1:
                self.comms.all_reduce(self.running, "world")
                self.last_logged = self.running.item() / (a.log_every * self.world)
                self.running.zero_()


class TPDPShape(Shape):
    """tp_dp: Megatron-style tensor parallelism inside DDP on the data-parallel group."""

    def __init__(self, *a):
        super().__init__(*a)
        torch, nn, F = self.torch, self.torch.nn, self.torch.nn.functional
        comms, tp = self.comms, 2
        self.DT = DT = _device_time_fn(torch, lambda: self.scale)

        class CopyToTP(torch.autograd.Function):
            """Megatron's f: identity forward, allreduce of the input grad in backward."""

            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                g = g.clone()
                comms.all_reduce(g, "tp")
                return g

        class ReduceFromTP(torch.autograd.Function):
            """Megatron's g: allreduce of the partial outputs forward, identity backward."""

            @staticmethod
            def forward(ctx, x):
                x = x.clone()
                comms.all_reduce(x, "tp")
                return x

            @staticmethod
            def backward(ctx, g):
                return g

        h = self.a.hidden
        per_layer = self.a.step_ms / self.a.layers
        f_ms, b_ms = per_layer / 3, 2 * per_layer / 3

        class ParallelMLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = nn.Linear(h, 4 * h // tp)  # column parallel: a shard of 4h
                self.fc2 = nn.Linear(4 * h // tp, h, bias=False)  # row parallel
                self.bias = nn.Parameter(torch.zeros(h))

            def forward(self, x):
                y = self.fc2(F.gelu(self.fc1(CopyToTP.apply(x))))
                return x + DT.apply(ReduceFromTP.apply(y) + self.bias, f_ms, b_ms)

        tp_rank, dp_rank = self.rank % tp, self.rank // tp
        torch.manual_seed(999)
        embed = nn.Linear(h, h)  # replicated input layer: layer 0's input needs a grad too
        torch.manual_seed(1000 + tp_rank)  # the same shard on both DP replicas
        model = nn.Sequential(embed, *[ParallelMLP() for _ in range(self.a.layers)])
        self.ddp = ddp_wrap(model, comms, "dp", self.world // tp)
        self.opt = torch.optim.SGD(self.ddp.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(100 + dp_rank)  # the same batch in a TP group
        self.x = torch.randn(self.a.batch, h, generator=gen)
        self.y = torch.randn(self.a.batch, h, generator=gen)
        self.stop_flag = torch.zeros(1, dtype=torch.int64)

    def step(self, step: int) -> None:
        F = self.torch.nn.functional
        self.opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.ddp(self.x), self.y)
        loss.backward()
        ddp_synced(self.comms, "dp")
        self.opt.step()
        if step >= 0 and step % zoo.METRICS_EVERY == zoo.METRICS_EVERY - 1:
            gathered = [self.torch.zeros(1) for _ in range(self.world)]
            self.comms.all_gather(gathered, loss.detach().reshape(1), "world")
            self.comms.broadcast(self.stop_flag, 0, "world")


class PipelineShape(Shape):
    """pp_gpipe / pp_1f1b: one stage per rank, activations and grads by send/recv."""

    def __init__(self, *a):
        super().__init__(*a)
        torch, nn = self.torch, self.torch.nn
        self.DT = _device_time_fn(torch, lambda: self.scale)
        h, m, s = self.a.hidden, self.a.micro, self.world
        torch.manual_seed(2000 + self.rank)
        self.stage = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, h))
        self.opt = torch.optim.SGD(self.stage.parameters(), lr=0.01)
        per_mb = self.a.step_ms / (m + s - 1)
        self.f_ms, self.b_ms = per_mb / 3, 2 * per_mb / 3
        self.first, self.last = self.rank == 0, self.rank == s - 1
        gen = torch.Generator().manual_seed(7)
        mb = max(1, self.a.batch // m)
        self.shape = (mb, h)
        self.x = [torch.randn(*self.shape, generator=gen) for _ in range(m)]
        self.y = [torch.randn(*self.shape, generator=gen) for _ in range(m)]

    def _empty(self):
        return self.torch.empty(*self.shape)

    def _fwd(self, m: int, x):
        inp = self.x[m] if self.first else x.requires_grad_()
        out = self.DT.apply(self.stage(inp), self.f_ms, self.b_ms)
        return inp, out

    def _bwd(self, m: int, inp, out, grad):
        if self.last:
            loss = self.torch.nn.functional.mse_loss(out, self.y[m]) / self.a.micro
            loss.backward()
        else:
            self.torch.autograd.backward(out, grad)
        return None if self.first else inp.grad

    def step(self, step: int) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.a.shape == "pp_gpipe":
            self._gpipe()
        else:
            self._one_f_one_b()
        self.opt.step()

    def _gpipe(self) -> None:
        c, r, acts = self.comms, self.rank, []
        for m in range(self.a.micro):
            x = None
            if not self.first:
                x = self._empty()
                c.recv(x, r - 1)
            inp, out = self._fwd(m, x)
            if not self.last:
                c.send(out.detach(), r + 1)
            acts.append((inp, out))
        for m in range(self.a.micro):
            g = None
            if not self.last:
                g = self._empty()
                c.recv(g, r + 1)
            gi = self._bwd(m, *acts[m], g)
            if not self.first:
                c.send(gi, r - 1)

    # Megatron's forward_backward_pipelining_without_interleaving, with isend/irecv pairs
    def _wait(self, *reqs) -> None:
        for q in reqs:
            q.wait()

    def _recv_fwd(self):
        if self.first:
            return None
        x = self._empty()
        self._wait(self.comms.irecv(x, self.rank - 1))
        return x

    def _send_fwd(self, out) -> None:
        if not self.last:
            self._wait(self.comms.isend(out.detach(), self.rank + 1))

    def _recv_bwd(self):
        if self.last:
            return None
        g = self._empty()
        self._wait(self.comms.irecv(g, self.rank + 1))
        return g

    def _send_bwd(self, g) -> None:
        if not self.first:
            self._wait(self.comms.isend(g, self.rank - 1))

    def _send_fwd_recv_bwd(self, out):
        if self.last:
            return None
        g = self._empty()
        self._wait(self.comms.isend(out.detach(), self.rank + 1),
                   self.comms.irecv(g, self.rank + 1))
        return g

    def _send_bwd_recv_fwd(self, gi):
        if self.first:
            return None
        x = self._empty()
        self._wait(self.comms.isend(gi, self.rank - 1), self.comms.irecv(x, self.rank - 1))
        return x

    def _one_f_one_b(self) -> None:
        M = self.a.micro
        warm = min(self.world - self.rank - 1, M)
        rest = M - warm
        queue, mf = [], 0
        for _ in range(warm):
            inp, out = self._fwd(mf, self._recv_fwd())
            self._send_fwd(out)
            queue.append((mf, inp, out))
            mf += 1
        x = self._recv_fwd() if rest > 0 else None
        for i in range(rest):
            inp, out = self._fwd(mf, x)
            queue.append((mf, inp, out))
            mf += 1
            g = self._send_fwd_recv_bwd(out)
            mb, binp, bout = queue.pop(0)
            gi = self._bwd(mb, binp, bout, g)
            if i == rest - 1:
                x = None
                self._send_bwd(gi)
            else:
                x = self._send_bwd_recv_fwd(gi)
        for _ in range(warm):
            g = self._recv_bwd()
            mb, binp, bout = queue.pop(0)
            self._send_bwd(self._bwd(mb, binp, bout, g))


SHAPE_CLASSES = {"ddp": DDPShape, "grad_accum": DDPShape, "sync_every_n": DDPShape,
                 "tp_dp": TPDPShape, "pp_gpipe": PipelineShape, "pp_1f1b": PipelineShape}


# ------------------------------------------------------------------ main
def _rank_pct(spec: str, what: str) -> tuple[int, float]:
    try:
        r, pct = spec.split(":")
        return int(r), float(pct)
    except ValueError:
        raise SystemExit(f"train.py: {what} {spec!r}: use N:PCT, e.g. 1:10.") from None


def _hang(spec: str | None) -> dict | None:
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (4, 5):
        raise SystemExit(f"train.py: --hang {spec!r}: use RANK:GROUP:OP:STEP[:NTH].")
    rank, group, op, step = int(parts[0]), parts[1], parts[2], int(parts[3])
    return {"rank": rank, "group": group, "op": op, "step": step,
            "nth": int(parts[4]) if len(parts) == 5 else 0}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, choices=zoo.TORCH_SHAPES)
    ap.add_argument("--truth-dir", required=True, help="ready.R, truth.R.json, hung.R.json")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="training steps after go (default 100)")
    g.add_argument("--duration", type=float, help="about SEC seconds of steps after go")
    ap.add_argument("--wait-go", metavar="FILE", help="wait for FILE after the warm-up")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--step-ms", type=float, default=40.0, help="device time per step")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, default=zoo.Params.layers)
    ap.add_argument("--micro", type=int, default=zoo.Params.micro)
    ap.add_argument("--accum", type=int, default=zoo.Params.accum)
    ap.add_argument("--log-every", type=int, default=zoo.Params.log_every)
    ap.add_argument("--straggler", metavar="RANK:PCT")
    ap.add_argument("--straggler-base-ms", type=float, metavar="MS",
                    help="the step time --straggler's PCT refers to (default --step-ms)")
    ap.add_argument("--hang", metavar="RANK:GROUP:OP:STEP[:NTH]")
    ap.add_argument("--slow-stage", metavar="STAGE:PCT")
    ap.add_argument("--comm", help="set the process name (comm) once torch is imported")
    ap.add_argument("--torch-profiler", metavar="DIR",
                    help="run the steps under torch.profiler (CPU activities, the usual "
                         "schedule wait=1 warmup=1 active=3, repeated), traces to DIR "
                         "(what make bench compares argus with)")
    ap.add_argument("--profiler-when", metavar="FILE",
                    help="with --torch-profiler: the profiler runs only while FILE exists "
                         "(checked at each step's start: make bench's windows in one job)")
    ap.add_argument("--max-wall-s", type=float, default=600.0,
                    help="leave (truth exit 'timeout', code 124) after SEC in all")
    return ap


def _start_profiler(trace_dir: str):
    """torch.profiler as a user would run it: CPU activities, wait=1 warmup=1 active=3,
    repeated, each cycle's trace written to `trace_dir`."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=1, active=3),
                   on_trace_ready=tensorboard_trace_handler(trace_dir))
    prof.start()
    return prof


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before torch starts any thread: every thread inherits the mask, one thread sigwaits.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    t_start = time.monotonic()
    source = identity_from_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(args.truth_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps_wanted = args.steps if args.steps is not None else (None if args.duration else 100)
    straggler = _rank_pct(args.straggler, "--straggler") if args.straggler else None
    slow = _rank_pct(args.slow_stage, "--slow-stage") if args.slow_stage else None
    hang = _hang(args.hang)
    step_times: list[float] = []
    step_ends: list[float] = []  # CLOCK_MONOTONIC s at each step's end (make bench's windows)
    record = {
        "schema": TRUTH_SCHEMA, "shape": args.shape, "rank": rank, "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]), "pid": os.getpid(),
        "identity_from": source, "exit": None, "hung": False, "hang_site": None,
        "warmup_steps": args.warmup_steps, "steps_completed": 0, "step_time_ms": step_times,
        "step_end_s": step_ends,
        "collectives": {}, "straggler_ms": 0.0, "device_scale": 1.0,
        # the job's planted faults (every rank's copy; straggler_ms / device_scale / hung:
        # what applies to this rank)
        "faults": {"straggler": args.straggler, "straggler_base_ms": args.straggler_base_ms,
                   "hang": hang, "slow_stage": args.slow_stage},
    }
    truth = Truth(out / f"truth.{rank}.json", record)

    def on_signal() -> None:
        sig = signal.sigwait(_SIGNALS)
        truth.leave("terminated", 128 + sig)

    def watchdog() -> None:
        time.sleep(max(0.0, args.max_wall_s - (time.monotonic() - t_start)))
        truth.leave("timeout", 124)

    threading.Thread(target=on_signal, daemon=True, name="zoo-signals").start()
    threading.Thread(target=watchdog, daemon=True, name="zoo-watchdog").start()

    import torch
    import torch.distributed as dist

    if args.comm:
        import ctypes

        ctypes.CDLL(None).prctl(15, args.comm.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    pgs: dict = {"world": dist.group.WORLD}
    for name, members in zoo.groups(args.shape, world).items():
        if name == "world":
            continue
        for ranks in members:  # every rank creates every group, in the same order
            pg = dist.new_group(ranks)
            if rank in ranks:
                pgs[name] = pg
    comms = Comms(dist, pgs, truth, out, rank, hang)
    shape = SHAPE_CLASSES[args.shape](args, comms, rank, world, torch, dist)
    if slow and slow[0] == rank:
        shape.scale = 1.0 + slow[1] / 100.0
        record["device_scale"] = shape.scale
    base_ms = args.straggler_base_ms or args.step_ms
    straggle_ms = straggler[1] / 100.0 * base_ms if straggler and straggler[0] == rank else 0
    record["straggler_ms"] = straggle_ms
    for w in range(args.warmup_steps):
        comms.new_step(-args.warmup_steps + w)
        shape.step(comms.step)

    if args.wait_go:
        (out / f"ready.{rank}").write_text(str(os.getpid()))
        print(f"ready rank={rank} pid={os.getpid()}", flush=True)
        while not os.path.exists(args.wait_go):
            time.sleep(0.01)
    prof = None
    if args.torch_profiler and not args.profiler_when:
        prof = _start_profiler(args.torch_profiler)
    t_go, cpu_go = time.monotonic(), time.process_time()
    stop_file = out / "stop"
    stop_at = None
    step = 0
    while steps_wanted is None or step < steps_wanted:
        if args.duration is not None:
            if rank == 0 and not stop_file.exists() and time.monotonic() - t_go >= args.duration:
                tmp = out / ".stop.tmp"
                tmp.write_text(str(step + 2))  # nobody is past step + 1 (one sync per step)
                os.replace(tmp, stop_file)
            if stop_at is None and stop_file.exists():
                stop_at = int(stop_file.read_text())
            if stop_at is not None and step >= stop_at:
                break
        if args.profiler_when:  # a window of make bench: on while the file exists
            want = os.path.exists(args.profiler_when)
            if want and prof is None:
                prof = _start_profiler(args.torch_profiler)
            elif prof is not None and not want:
                prof.stop()
                prof = None
        comms.new_step(step)
        t0 = time.perf_counter()
        if straggle_ms:
            host_straggler_work(straggle_ms)
        shape.step(step)
        if prof is not None:
            prof.step()
        step_times.append(round((time.perf_counter() - t0) * 1000.0, 3))
        step_ends.append(round(time.monotonic(), 4))
        record["steps_completed"] = step + 1
        record["collectives"] = dict(comms.total)
        step += 1
    record["collectives"] = dict(comms.total)
    record["cpu_ms_per_step"] = round((time.process_time() - cpu_go) * 1000 / max(1, step), 3)
    record["wall_s"] = round(time.monotonic() - t_go, 3)
    truth.write("completed")
    # Without a barrier a fast rank tears its gloo pairs down while a slow one still reads
    # from them (SIGABRT now and then); after it, leave without the destructors (torch
    # 2.13's gloo teardown aborts ~1 run in 12: a joinable thread destroyed).
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
