"""The gpu channel: NVML counters per device (argus.collect.nvml), joined to ranks.

No BPF side: a sampler thread reads every `TraceOptions.gpu_interval_s` (None: off); the
counters are joined to the ranks of the manifest (by the CUDA device a rank set, its
visible devices, NVML's process list). NVML absent is one manifest line, never a failure.
`argus attach` (collect/session.py) runs it beside the Tracer; the daemon runs its own
`GpuSampler` for the node.
"""

from __future__ import annotations

import polars as pl

from argus.collect.channels.base import Channel
from argus.collect.nvml import GpuSampler, assign_ranks, disabled

OFF_REASON = "switched off (--no-gpu)"


class GpuChannel(Channel):
    name = "gpu"
    in_tracer = False  # a sampler thread beside the Tracer (session.py, the daemon)

    def __init__(self, tracer):
        super().__init__(tracer)
        interval = tracer.opts.gpu_interval_s
        self.sampler = GpuSampler(interval) if interval else None
        self._seen = 0  # samples already written into parts

    @classmethod
    def wanted(cls, opts) -> bool:
        return bool(opts.gpu_interval_s)

    def start(self) -> None:
        if self.sampler is not None:  # its own thread: NVML never delays the ring buffer
            self.sampler.start()

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def part(self, ranks: list[dict]) -> pl.DataFrame | None:
        """The samples since the last part, joined to `ranks` (the manifest's); None when
        there are none."""
        gpu = self.sampler
        if gpu is None or not gpu.available:
            return None
        rows, self._seen = gpu.rows_since(self._seen)
        return assign_ranks(rows, ranks, gpu.devices, gpu.processes) if rows else None

    def conclude(self, manifest: dict) -> pl.DataFrame | None:
        """At the end: manifest["gpu"] (and each joined rank's "gpu", channels["gpu"]); the
        gpu frame, or None when NVML gave nothing (the manifest line says why)."""
        frame = None
        if self.sampler is None:
            manifest["gpu"] = disabled(OFF_REASON)
        else:
            manifest["gpu"], frame, joins = self.sampler.finish(manifest["ranks"])
            for r in manifest["ranks"]:
                if r.get("tgid") in joins:
                    r["gpu"] = joins[r["tgid"]]
        manifest["channels"][self.name] = bool(manifest["gpu"].get("available"))
        return frame if manifest["channels"][self.name] else None
