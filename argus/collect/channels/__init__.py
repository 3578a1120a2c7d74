"""The channels argus collects, one module each, behind one protocol (`base.Channel`).

`REGISTRY` is the one ordered list of channels; every other list of channel names (the
switches `TraceOptions.channels` takes, the `argus attach --no-NAME` flags, the manifest's
"channels" map) derives from it:

    channel  BPF file           switches          collector module
    proc     proc.bpf.c         (always on)       channels/proc.py
    calls    calls.bpf.c        cuda nccl torch   channels/calls.py (specs: cuda_probes/*.toml)
    cpu      cpu_stacks.bpf.c   cpu               channels/cpu.py
    host     host.bpf.c         host              channels/host.py
    kernels  (GPU agent ring)   kernels           channels/kernels.py
    gpu      (NVML, no BPF)     --no-gpu          channels/gpu.py

bpf/argus.bpf.c (the maps every family shares) is always compiled first.
"""

from __future__ import annotations

from argus.collect.channels.base import Channel
from argus.collect.channels.calls import CallsChannel
from argus.collect.channels.cpu import CpuChannel
from argus.collect.channels.gpu import GpuChannel
from argus.collect.channels.host import HostChannel
from argus.collect.channels.kernels import KernelsChannel
from argus.collect.channels.proc import ProcChannel
from argus.errors import UsageError

REGISTRY: tuple[type[Channel], ...] = (ProcChannel, CallsChannel, CpuChannel, HostChannel,
                                       KernelsChannel, GpuChannel)
# The channels with a BPF side.
BPF_CHANNELS: tuple[type[Channel], ...] = tuple(c for c in REGISTRY if c.sources)
# The channels the Tracer composes (gpu runs beside it: its own sampler thread).
TRACER_CHANNELS: tuple[type[Channel], ...] = tuple(c for c in REGISTRY if c.in_tracer)
# Every name TraceOptions.channels takes (and `argus attach --no-NAME`), in order, with
# the flag's help; the default is all of them.
SWITCHES: dict[str, str] = {s: h for c in REGISTRY for s, h in c.switches.items()}
# Switches that explain nothing alone (host context): another one must be on.
CONTEXT_ONLY: frozenset[str] = frozenset(s for c in REGISTRY if c.context_only
                                         for s in c.switches)


def check_switches(channels: tuple[str, ...], need_primary: bool = True) -> None:
    """Every name a known switch (and, with `need_primary`, not only context switches);
    else a UsageError."""
    unknown = [c for c in channels if c not in SWITCHES]
    if unknown:
        raise UsageError(f"unknown channel(s) {', '.join(unknown)} "
                         f"(known: {', '.join(SWITCHES)}).")
    if need_primary and not [c for c in channels if c not in CONTEXT_ONLY]:
        raise UsageError("every channel is switched off: nothing to trace.")


__all__ = ["BPF_CHANNELS", "CONTEXT_ONLY", "REGISTRY", "SWITCHES", "TRACER_CHANNELS",
           "CallsChannel", "Channel", "CpuChannel", "GpuChannel", "HostChannel",
           "KernelsChannel", "ProcChannel", "check_switches"]
