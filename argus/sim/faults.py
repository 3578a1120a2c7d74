"""Fault specs of the simulated job: `KIND:key=val,...`, validated here, then passed to the
rank program in a normalised form (ARGUS_SIM_FAULTS)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# kind -> (parameter keys with defaults, fixed steps or None)
KINDS: dict[str, dict[str, float]] = {
    "straggler": {"factor": 2.0},
    "host_stall": {"ms": 50.0},
    "link": {"factor": 4.0},
    "hang": {"at": -1.0},
    "jit_stall": {"ms": 500.0},
    "bubble": {"factor": 2.0, "stage": -1.0},
    "throttle": {"mhz": 0.0, "factor": 0.0, "reasons": float(0x20)},
    # only the compute kernels before the step's gradient collectives run `factor` x longer
    "gpu_straggler": {"factor": 2.0},
}
COMMON = ("rank", "ranks", "start", "steps")
HANG_COMMS = ("dp", "tp")  # hang: comm=dp (default: the gradient allreduces) or comm=tp
MAX_SM_MHZ = 1980
DEFAULT_THROTTLE_MHZ = 1200


class FaultSpecError(ValueError):
    """A --fault spec that cannot be used; the message is one sentence naming the bad key."""


@dataclass
class Fault:
    kind: str
    ranks: list[int]
    start: int = 0
    steps: int | None = None  # None: until the end
    params: dict[str, float] = field(default_factory=dict)
    spec: str = ""

    def to_truth(self) -> dict:
        return {
            "kind": self.kind,
            "ranks": self.ranks,
            "start": self.start,
            "steps": self.steps,
            "params": self.params,
            "spec": self.spec,
        }

    def normalised(self, buckets: int) -> str:
        """The form argus-sim-rank reads: kind:ranks=..,start=..,steps=..,value=..,..."""
        value, value2, at = 0.0, 0.0, -1
        p = self.params
        if self.kind == "hang":
            value = float(HANG_COMMS.index(p.get("comm", "dp")))
        if self.kind in ("straggler", "link", "bubble", "gpu_straggler"):
            value = p["factor"]
        elif self.kind in ("host_stall", "jit_stall"):
            value = p["ms"]
        elif self.kind == "throttle":
            value, value2 = p["mhz"], p["reasons"]
        elif self.kind == "hang":
            at = int(p["at"])
        steps = -1 if self.steps is None else self.steps
        ranks = "+".join(str(r) for r in self.ranks)
        return (f"{self.kind}:ranks={ranks},start={self.start},steps={steps},"
                f"value={value!r},value2={value2!r},at={at}")


def _num(spec: str, key: str, val: str, integer: bool = False) -> float:
    try:
        v = int(val, 0) if integer else float(val)
    except ValueError:
        raise FaultSpecError(
            f"fault {spec!r}: key {key!r} needs a {'whole' if integer else ''} number, "
            f"not {val!r}.".replace("a  number", "a number")) from None
    return v


@dataclass
class _Parsed:
    """What the `key=val` items of one spec said (before the kind's own checks)."""

    params: dict[str, Any]
    ranks: list[int] | None = None
    start: int = 0
    steps: int | None = None
    given: set[str] = field(default_factory=set)


def _hang_comm(spec: str, val: str, tp: int) -> str:
    """A hang's `comm=` value: dp, or tp where the job has tensor-parallel groups."""
    if val.strip() not in HANG_COMMS or (val.strip() == "tp" and tp < 2):
        raise FaultSpecError(
            f"fault {spec!r}: key 'comm' must be dp or tp (tp needs --tp 2 or more).")
    return val.strip()


def _ranks(spec: str, key: str, val: str, nranks: int) -> list[int]:
    """`rank=` / `ranks=` (several joined by `+`), each in 0..nranks-1."""
    parts = val.replace("+", " ").split()
    if not parts:
        raise FaultSpecError(f"fault {spec!r}: key {key!r} names no rank.")
    ranks = [int(_num(spec, key, p, True)) for p in parts]
    bad = [r for r in ranks if not 0 <= r < nranks]
    if bad:
        raise FaultSpecError(
            f"fault {spec!r}: key {key!r} names rank {bad[0]}, but the job has "
            f"ranks 0..{nranks - 1}.")
    return ranks


def _count(spec: str, key: str, val: str, least: int) -> int:
    """A whole-number key (`start`, `steps`) that is at least `least`."""
    n = int(_num(spec, key, val, True))
    if n < least:
        raise FaultSpecError(f"fault {spec!r}: key {key!r} must be >= {least}.")
    return n


def _read_items(spec: str, kind: str, rest: str, nranks: int, tp: int) -> _Parsed:
    """The `key=val,...` part of a spec of `kind`, each key checked as it comes."""
    out = _Parsed(params=dict(KINDS[kind]))
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq:
            raise FaultSpecError(f"fault {spec!r}: key {key!r} has no value (use {key}=...).")
        if kind == "hang" and key == "comm":
            out.given.add(key)
            out.params["comm"] = _hang_comm(spec, val, tp)
            continue
        if key not in COMMON and key not in out.params:
            extra = ["comm"] if kind == "hang" else []
            known = ", ".join(list(COMMON) + list(KINDS[kind]) + extra)
            raise FaultSpecError(
                f"fault {spec!r}: unknown key {key!r} for {kind} (known: {known}).")
        out.given.add(key)
        if key in ("rank", "ranks"):
            out.ranks = _ranks(spec, key, val, nranks)
        elif key == "start":
            out.start = _count(spec, key, val, 0)
        elif key == "steps":
            out.steps = _count(spec, key, val, 1)
        else:
            out.params[key] = _num(spec, key, val, key in ("at", "stage", "reasons"))
    return out


def _bubble_ranks(spec: str, p: _Parsed, nranks: int, pp: int) -> None:
    """A bubble's ranks from `stage=` (every rank of that pipeline stage), or its stage from
    its ranks."""
    if pp < 2:
        raise FaultSpecError(f"fault {spec!r}: key 'stage' needs pipeline mode (--pp 2 or more).")
    if "stage" in p.given:
        st = int(p.params["stage"])
        if not 0 <= st < pp:
            raise FaultSpecError(f"fault {spec!r}: key 'stage' must be in 0..{pp - 1}.")
        p.ranks = [r for r in range(nranks) if r % pp == st]
    elif p.ranks is not None:
        p.params["stage"] = float(p.ranks[0] % pp)


def _throttle_mhz(spec: str, params: dict[str, Any]) -> None:
    """A throttle's clock: `mhz`, else the top clock / `factor`, else the default; `factor`
    made to match it."""
    if params["mhz"] > 0:
        mhz = params["mhz"]
    elif params["factor"] > 0:
        mhz = MAX_SM_MHZ / params["factor"]
    else:
        mhz = DEFAULT_THROTTLE_MHZ
    if not 1 <= mhz <= MAX_SM_MHZ:
        raise FaultSpecError(f"fault {spec!r}: key 'mhz' must be in 1..{MAX_SM_MHZ}.")
    params["mhz"] = float(int(mhz))
    params["factor"] = MAX_SM_MHZ / params["mhz"]


def _hang_seq(spec: str, p: _Parsed, pp: int, tp: int, buckets: int, layers: int,
              warmup_steps: int) -> None:
    """A hang's `at` (the collective of its comm it stops at; default: step `start`'s first)
    and `comm_seq` (that collective's sequence number on its communicator)."""
    if p.steps is not None:
        raise FaultSpecError(
            f"fault {spec!r}: key 'steps' does not apply to a hang (it lasts forever).")
    params = p.params
    on_tp = params.get("comm") == "tp"
    per_step = 2 * layers if on_tp else buckets  # collectives per step on that comm
    if params["at"] < 0:
        params["at"] = float(p.start * per_step)  # the first one of step `start`
    params["at"] = float(int(params["at"]))
    # sequence number on that communicator where the others wait: with --pp 1 and
    # --tp 1 the gradients go to the world communicator, whose collective 0 is DDP's
    # broadcast; split communicators start at 0; a warm-up step came first
    world_dp = pp == 1 and tp == 1 and not on_tp
    params["comm_seq"] = params["at"] + (1 if world_dp else 0) + warmup_steps * per_step


def _check_values(spec: str, kind: str, p: _Parsed) -> None:
    """The checks across keys: ranks given, a positive factor, a non-negative stall."""
    if p.ranks is None:
        raise FaultSpecError(f"fault {spec!r}: key 'rank' is missing (e.g. rank=1 or ranks=1+3).")
    if "factor" in p.params and kind != "throttle" and p.params["factor"] <= 0:
        raise FaultSpecError(f"fault {spec!r}: key 'factor' must be > 0.")
    if kind in ("host_stall", "jit_stall") and p.params["ms"] < 0:
        raise FaultSpecError(f"fault {spec!r}: key 'ms' must be >= 0.")


def parse_fault(spec: str, nranks: int, pp: int = 1, buckets: int = 4, *, tp: int = 1,
                layers: int = 4, warmup_steps: int = 0) -> Fault:
    """Parse and validate one `KIND:key=val,...` spec for a job of nranks ranks (tp, layers:
    the --tp shape; warmup_steps: steps run before the go file, whose collectives come
    before a hang's `comm_seq`)."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise FaultSpecError(
            f"fault {spec!r}: unknown kind {kind!r} (known: {', '.join(KINDS)}).")
    p = _read_items(spec, kind, rest, nranks, tp)
    if kind == "bubble":
        _bubble_ranks(spec, p, nranks, pp)
    _check_values(spec, kind, p)
    if kind == "jit_stall" and p.steps is None:
        p.steps = 1
    if kind == "throttle":
        _throttle_mhz(spec, p.params)
    if kind == "hang":
        _hang_seq(spec, p, pp, tp, buckets, layers, warmup_steps)
    ints = ("at", "comm_seq", "stage", "reasons", "mhz")
    params = {k: (int(v) if k in ints and not isinstance(v, str) else v)
              for k, v in p.params.items()}
    return Fault(kind=kind, ranks=sorted(set(p.ranks)), start=p.start, steps=p.steps,
                 params=params, spec=spec)
