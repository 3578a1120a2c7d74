"""The calls channel (bpf/calls.bpf.c): every probe spec's uprobes (CUDA runtime/driver,
NCCL, PyTorch c10d), one generic entry/return program pair; what to capture is data.

Switches: the probe families of cuda_probes/*.toml (`specs.CHANNELS`: cuda, nccl, torch).
Per traced process and probed library, each spec symbol is resolved from the file the
process actually maps (through its /proc/PID/root) and placed (endbr64 skipped); its
(tgid, address) goes into the in-kernel probe table, which is the filter; the uprobe itself
is shared by every rank mapping the file (`argus.collect.uprobes`). Records come through
the `calls` ring buffer and are decoded by `argus.collect.decode`; calls still in flight
are read from the `inflight` map; exact per-probe counts from `call_counts`.
"""

from __future__ import annotations

import ctypes as ct
import os
from types import SimpleNamespace

import polars as pl

from argus.collect import abi, c10d, procfs
from argus.collect.channels.base import Channel
from argus.collect.decode import (
    ProbeRef,
    decode_call,
    decode_records,
    pair_completions,
    rows_to_frame,
)
from argus.collect.specs import CHANNELS as PROBE_FAMILIES
from argus.collect.specs import LibrarySpec, load_specs
from argus.collect.symbols import elf_file, runtime_address
from argus.recording import schema

CALL_ARGS_OFF = abi.Call.args.offset  # where struct argus_call's args begin (32)
_REC_GROUP = abi.REC_GROUP.to_bytes(4, "little")
SWITCH_HELP = {
    "cuda": "Do not probe the CUDA runtime/driver.",
    "nccl": "Do not probe NCCL.",
    "torch": "Do not probe PyTorch c10d / autograd.",
}


class CallsChannel(Channel):
    name = "calls"
    switches = {family: SWITCH_HELP.get(family, f"Do not probe {family}.")
                for family in PROBE_FAMILIES}
    sources = ("calls.bpf.c",)

    def __init__(self, tracer):
        super().__init__(tracer)
        families = tuple(c for c in tracer.opts.channels if c in self.switches)
        self.specs: list[LibrarySpec] = load_specs(channels=families) if families else []
        self.on = bool(self.specs)
        self.probe_refs: dict[int, ProbeRef] = {}
        self._probe_id: dict[tuple[str, str], int] = {}
        for lib in self.specs:
            for spec in lib.probes:
                for sym in spec.symbols:
                    pid = len(self.probe_refs)
                    self.probe_refs[pid] = ProbeRef(spec, sym)
                    self._probe_id[(lib.family, sym)] = pid
        self.blobs: list[bytes] = []
        self.ring_total = 0  # ring records already drained (`take` empties self.blobs)
        # entry-only work calls (gloo) not completed at the last drain: paired in the next
        self._open_work: pl.DataFrame | None = None
        self.probe_status: dict[tuple, dict] = {}
        self._pg_slots: dict[int, tuple[int | None, str]] = {}  # probe id -> (comm slot, kind)
        self._work = {r.name for r in self.probe_refs.values() if r.spec.kind == "pg_work"}
        self._done = {r.name for r in self.probe_refs.values() if r.spec.kind == "pg_work_done"}

    def cflags(self) -> list[str]:
        pages = max(1, self.tracer.opts.ringbuf_mb * 1024 * 1024 // 4096)
        return [f"-DARGUS_CALL_PAGES={1 << (pages.bit_length() - 1)}"]  # a power of two

    def attach(self, session) -> None:
        session.open_ring_buffer("calls", self._on_call)

    def _on_call(self, _ctx, data, size) -> None:
        blob = ct.string_at(data, size)
        if blob[:4] == _REC_GROUP:  # what the BPF program read of a c10d group (c10d.py)
            self.tracer.ctx.name_group(*c10d.from_record(blob))
            return
        self.blobs.append(blob)
        if len(self._pg_slots) != len(self.probe_refs):
            self._pg_slots = {pid: (r.spec.args.get("comm"), r.spec.kind)
                              for pid, r in self.probe_refs.items()}
        slot, kind = self._pg_slots.get(int.from_bytes(blob[4:8], "little"), (None, ""))
        if slot is not None and kind.startswith("pg_"):
            # a c10d group the BPF read did not name (its record faulted): read it from the
            # process's memory now (`c10d.read_group`, once per group) rather than at the
            # decode, which may come after the rank exited
            tgid = int.from_bytes(blob[8:12], "little")
            off = CALL_ARGS_OFF + 8 * slot
            self.tracer.ctx.comm_id(tgid, int.from_bytes(blob[off : off + 8], "little"), kind)

    # -- placing probes in a target ------------------------------------------------------
    def specs_for(self, lib: procfs.MappedLibrary) -> list[LibrarySpec]:
        """The library specs of a mapped file: by file name, or a static copy of the
        runtime inside another .so (libtorch), found by its marker symbol."""
        name = os.path.basename(lib.path)
        out = [spec for spec in self.specs if spec.matches_file(name)]
        markers = tuple(spec.static_marker for spec in self.specs
                        if spec.static_marker and spec not in out)
        if markers and lib.name.startswith("libtorch"):
            elf = elf_file(lib.host_path)
            found = elf.defined_of(markers) if elf is not None else set()
            out += [spec for spec in self.specs if spec.static_marker in found
                    and spec not in out]
        return out

    def _status(self, libspec: LibrarySpec, spec, lib: procfs.MappedLibrary, sym: str) -> dict:
        return self.probe_status.setdefault(
            (libspec.channel, lib.path, sym),
            {
                "channel": libspec.channel,
                "library": lib.path,
                "symbol": sym,
                "name": spec.name if sym == spec.symbol else sym,
                "kind": "entry+exit" if spec.exit else "entry",
                "status": "missing",
                "reason": "",
                "tgids": [],
            },
        )

    def attach_library(self, t, lib: procfs.MappedLibrary, specs: list[LibrarySpec]) -> None:
        """Place every symbol of `specs` found in `lib` for target t (its probe-table entry
        first, then the shared uprobes); each outcome goes to probe_status."""
        elf = elf_file(lib.host_path)
        for libspec in specs:
            for spec in libspec.probes:
                for sym in spec.symbols:
                    status = self._status(libspec, spec, lib, sym)
                    found = elf.lookup(sym) if elf is not None else None
                    if found is None:
                        status["reason"] = "symbol not in this library"
                        continue
                    place = elf.placement(found)
                    addr = runtime_address(lib.mappings, place.file_offset) if place else None
                    if addr is None:
                        status.update(status="failed",
                                      reason="address not in the process's mappings")
                        continue
                    self._place(t, lib, spec, self._probe_id[(libspec.family, sym)], addr,
                                place, status)

    def _place(self, t, lib, spec, probe_id: int, addr: int, place, status: dict) -> None:
        table = self.tracer.session.table("probes")
        uprobes = self.tracer.uprobes
        pkey = abi.ProbeKey(tgid=t.tgid, pad=0, addr=addr)
        # The table entry first: from here on this process's calls are recorded.
        table[pkey] = spec.probe_info(probe_id)
        held = []
        try:
            held.append(uprobes.acquire(lib.host_path, place.vaddr, False))
            if spec.exit:
                held.append(uprobes.acquire(lib.host_path, place.vaddr, True))
        except Exception as e:  # ProbeAttachFailed, OSError
            # Never leave an entry probe whose return half is missing.
            for k in held:
                uprobes.release(k)
            del table[pkey]
            half = "return probe: " if held else ""
            status.update(status="failed", reason=f"{half}{e}")
            return
        t.attached[lib.path].uprobes.extend(held)
        t.attached[lib.path].keys.append(pkey)
        slow = f"first instruction {place.first_insn} is single-stepped (slow)"
        status.update(
            status="attached",
            reason="" if place.emulated else slow,
            placement={"skipped": place.skipped, "first_insn": place.first_insn,
                       "emulated": place.emulated},
        )
        status["tgids"].append(t.tgid)

    def on_gone(self, t) -> None:
        if not self.on:
            return
        table = self.tracer.session.table("probes")
        for att in t.attached.values():
            for key in att.uprobes:
                self.tracer.uprobes.release(key)
            att.uprobes.clear()
            for pkey in att.keys:
                try:
                    del table[pkey]
                except KeyError:
                    pass
            att.keys.clear()

    def attached_count(self) -> int:
        """(process, probe) pairs attached so far."""
        return sum(len(p["tgids"]) for p in self.probe_status.values()
                   if p["status"] == "attached")

    # -- rows ----------------------------------------------------------------------------
    def take(self) -> list[bytes]:
        """The records not drained yet; they leave the channel."""
        blobs, self.blobs = self.blobs, []
        self.ring_total += len(blobs)
        return blobs

    def decode(self, blobs: list[bytes]) -> pl.DataFrame:
        return decode_records(blobs, self.tracer.ctx)

    def paired(self, frames: list[pl.DataFrame | None]) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(events sorted by time with entry-only work calls paired to their completions,
        the work calls with no completion yet: in flight). The work calls still open at the
        previous drain join this pairing."""
        frames = [f for f in (frames[0], self._open_work, *frames[1:])
                  if f is not None and f.height]
        self._open_work = None
        events = pl.concat(frames, how="vertical_relaxed").sort("ts_ns") if frames else (
            schema.empty_events())
        events = pair_completions(events, self._work, self._done)
        if not self._work or not events.height:
            return events, schema.empty_events()
        still = (pl.col("name").cast(pl.Utf8).is_in(list(self._work)) & pl.col("in_flight")
                 & pl.col("dur_ns").is_null())
        return events.filter(~still), events.filter(still).with_columns(
            pl.lit(False).alias("in_flight"))

    def keep_open(self, still_open: pl.DataFrame) -> None:
        """Work calls with no completion at this drain: paired by the next one."""
        self._open_work = still_open

    def inflight_rows(self) -> pl.DataFrame:
        """The calls every traced thread is inside now (the kernel's `inflight` map)."""
        if not self.on:
            return schema.empty_events()
        rows = []
        for tid_key, st in self.tracer.session.table("inflight").items():
            for i in range(min(int(st.depth), abi.MAX_DEPTH)):
                call = FrameView(st.frames[i], int(st.tgid), int(tid_key.value))
                row = decode_call(call, None, self.tracer.ctx, in_flight=True)
                if row is not None:
                    rows.append(row)
        return rows_to_frame(rows)

    def call_counts(self) -> dict:
        """{tgid: {probe name: calls entered}}, exact, from the in-kernel counts map."""
        out: dict[str, dict[str, int]] = {}
        if not self.on:
            return out
        for key, value in self.tracer.session.table("call_counts").items():
            ref = self.probe_refs.get(int(key.probe_id))
            if ref is None:
                continue
            per = out.setdefault(str(int(key.tgid)), {})
            per[ref.name] = per.get(ref.name, 0) + int(value.value)
        return out

    def manifest(self) -> dict:
        return {
            "probes": sorted(self.probe_status.values(),
                             key=lambda p: (p["channel"], p["symbol"])),
            "call_counts": self.call_counts(),
        }


class FrameView:
    """Make an in-flight argus_frame look like a call record to decode_call."""

    FIELDS = ("probe_id", "tgid", "tid", "ts_ns", "dur_ns", "args", "uid_hash", "out", "seq",
              "ret")

    def __init__(self, f: abi.Frame, tgid: int, tid: int):
        self._v = {
            "probe_id": f.probe_id,
            "tgid": tgid,
            "tid": tid,
            "ts_ns": f.ts_ns,
            "dur_ns": 0,
            "args": list(f.args),
            "uid_hash": f.uid_hash,
            "out": 0,
            "seq": f.seq,
            "ret": 0,
        }

    dtype = SimpleNamespace(names=FIELDS)

    def __getitem__(self, k):
        return self._v[k]
