"""A recording written as it goes: `DIR/parts/`, merged into `DIR` when the session ends.

`argus attach` writes what it traced every `PART_S` (5 s) as one part,
`DIR/parts/<first>-<last>/`, itself a complete recording (`manifest.json` written last,
`events.parquet`, `stacks.parquet`, `host.parquet`, `gpu.parquet`): a SIGKILLed or
OOM-killed attach leaves every part written so far, and `argus report DIR` reads them
(`load_parts`). Every `COMPACT_EVERY` parts the writer merges the ones since the last
compaction into one part that covers their range (then removes them), so a day of tracing
is ~290 parts, not 17,280. (A part every second was ~40 % of argus's Python samples on a
4-rank torch job: a part's fixed cost, four parquet files and the manifest, dwarfs its
rows.) At the end, `PartWriter.finish` merges every part into `DIR` (the recording's usual
files) and removes `DIR/parts/`.

What a part holds: the rows that became final since the previous part (events, CPU and
off-CPU stacks, host context, NVML samples), plus a snapshot valid only in the latest part:
the calls in flight at that moment (`in_flight` true: the kernel's in-flight map, and
entry-only work calls not completed yet). `merge_parts` keeps the in-flight rows of the
last part only and re-resolves each row's rank from the last manifest (a rank learned late,
from NCCL's communicator init, names the rows of earlier parts too).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from argus.errors import RecordingInvalid
from argus.recording import schema
from argus.recording.io import Recording, coerce, load_recording, write_recording

PARTS = "parts"
PART_S = 5.0
COMPACT_EVERY = 60
UNFINISHED = "unfinished"  # end_reason of a recording read from parts (argus stopped early)


def has_parts(directory: str | os.PathLike[str]) -> bool:
    """A recording still in parts: DIR/parts/ holds at least one part and DIR has no
    manifest.json of its own (the merged recording wins once it is written)."""
    d = Path(directory)
    return not (d / schema.MANIFEST).exists() and bool(_part_dirs(d))


def _range(name: str) -> tuple[int, int] | None:
    first, sep, last = name.partition("-")
    if not (sep and first.isdigit() and last.isdigit()) or int(first) > int(last):
        return None
    return int(first), int(last)


def _part_dirs(directory: Path) -> list[tuple[int, int, Path]]:
    """Complete parts (manifest.json written), oldest first, without the parts a compacted
    part covers (a writer killed between writing the compacted part and removing the parts
    it replaced leaves both)."""
    root = directory / PARTS
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    parts = []
    for p in entries:
        r = _range(p.name)
        if r is not None and p.is_dir() and (p / schema.MANIFEST).exists():
            parts.append((r[0], r[1], p))
    parts.sort(key=lambda x: (x[0], -x[1]))
    out: list[tuple[int, int, Path]] = []
    for first, last, p in parts:
        if out and last <= out[-1][1]:
            continue  # inside the previous part's range
        out.append((first, last, p))
    return out


def _concat(frames: list[pl.DataFrame], empty: pl.DataFrame) -> pl.DataFrame:
    frames = [f for f in frames if f.height]
    return pl.concat(frames, how="vertical_relaxed") if frames else empty


def merge_parts(parts: list[Recording], manifest: dict[str, Any] | None = None) -> Recording:
    """Consecutive parts of one session as one recording (see the module doc). `manifest`
    (the session's final one) replaces the last part's; its counts are recomputed from the
    merged rows either way."""
    if not parts:
        raise RecordingInvalid("a recording in parts needs at least one part.")
    last = parts[-1]
    man = dict(manifest if manifest is not None else last.manifest)
    man.pop("part", None)
    first_start = parts[0].manifest.get("started_ns")
    if isinstance(first_start, int):
        man["started_ns"] = first_start
    ev = _concat([p.events.filter(~pl.col("in_flight").fill_null(False)) for p in parts[:-1]]
                 + [last.events], schema.empty_events()).sort("ts_ns")
    stacks = _concat([p.stacks for p in parts], schema.empty_stacks())
    host = _concat([p.host_ctx for p in parts], schema.empty_host())
    gpu = _concat([p.gpu for p in parts], schema.empty_gpu())
    kernels = _concat([p.kernels for p in parts], schema.empty_kernels())
    rank_of = {int(r["tgid"]): r["rank"] for r in man.get("ranks") or []
               if isinstance(r, dict) and isinstance(r.get("tgid"), int)
               and isinstance(r.get("rank"), int)}
    if rank_of:
        def fill(df: pl.DataFrame) -> pl.DataFrame:
            if not df.height or "tgid" not in df.columns:
                return df
            known = pl.col("tgid").replace_strict(rank_of, default=None, return_dtype=pl.Int32)
            return df.with_columns(pl.coalesce(known, pl.col("rank")).alias("rank"))

        ev, stacks, host, kernels = fill(ev), fill(stacks), fill(host), fill(kernels)
    counts = dict(man.get("counts") or {})
    counts["events"] = ({str(k): int(v) for k, v in ev.group_by("channel").len().iter_rows()}
                        if ev.height else {})
    counts["stack_samples"] = int(stacks["count"].sum()) if stacks.height else 0
    # ring records are counted since the start of the session: the latest count is the total
    seen = [(p.manifest.get("counts") or {}).get("ring_records") for p in parts]
    counts["ring_records"] = max(int(x) for x in [*seen, counts.get("ring_records"), 0]
                                 if isinstance(x, int))
    man["counts"] = counts
    return Recording(manifest=man, events=ev, stacks=stacks, path=last.path, gpu=gpu,
                     host_ctx=host, pystacks=last.pystacks, kernels=kernels)


def load_parts(directory: str | os.PathLike[str]) -> Recording:
    """The recording of a session that stopped before merging its parts (SIGKILL, OOM,
    power loss): every complete part merged, `end_reason` "unfinished", `parts` the
    number read. A part that cannot be read (the one being written when the process died
    is never complete: its manifest.json is written last) is skipped when it is the last
    one, and is an error naming it otherwise."""
    d = Path(directory)
    dirs = _part_dirs(d)
    if not dirs:
        raise RecordingInvalid(f"{d} holds no complete recording part ({d / PARTS}/).")
    parts = []
    for i, (_first, _last, p) in enumerate(dirs):
        try:
            parts.append(load_recording(p))
        except RecordingInvalid:
            if i < len(dirs) - 1:
                raise
    if not parts:
        raise RecordingInvalid(f"{d}: its only recording part is unreadable ({dirs[-1][2]}).")
    rec = merge_parts(parts)
    rec.manifest["end_reason"] = UNFINISHED
    rec.manifest["parts"] = len(parts)
    rec.path = d
    return rec


@dataclass
class PartWriter:
    """Writes the parts of one session (see the module doc) and merges them at the end.

    The parts written are also kept in memory (the final merge does not read them back);
    memory grows with the recording as it did before parts existed."""

    directory: Path
    compact_every: int = COMPACT_EVERY
    parts: list[Recording] = field(default_factory=list)  # merged, in order
    _pending: list[tuple[int, Recording, Path]] = field(default_factory=list)  # not compacted
    _next: int = 0

    def write(self, manifest: dict[str, Any], events: pl.DataFrame, stacks: pl.DataFrame,
              host: pl.DataFrame | None = None, gpu: pl.DataFrame | None = None,
              kernels: pl.DataFrame | None = None) -> Path:
        """One part: DIR/parts/<n>-<n>/ (a complete recording, its manifest written last)."""
        n = self._next
        self._next += 1
        root = self.directory / PARTS
        if n == 0:
            root.mkdir(mode=0o700, exist_ok=True)
            os.chmod(root, 0o700)  # the umask does not widen it: readable by its owner only
        path = root / f"{n:06d}-{n:06d}"
        man = dict(manifest, part={"index": n})
        write_recording(path, man, events, stacks, gpu=gpu, host=host, kernels=kernels)
        rec = Recording(  # coerced to the schema, as a reader of the part will see it
            manifest=man, path=self.directory,
            events=coerce(events, schema.EVENTS_SCHEMA, "events"),
            stacks=coerce(stacks, schema.STACKS_SCHEMA, "stacks"),
            gpu=coerce(gpu, schema.GPU_SCHEMA, "gpu") if gpu is not None else schema.empty_gpu(),
            host_ctx=(coerce(host, schema.HOST_SCHEMA, "host") if host is not None
                      else schema.empty_host()),
            kernels=(coerce(kernels, schema.KERNELS_SCHEMA, "kernels") if kernels is not None
                     else schema.empty_kernels()))
        self.parts.append(rec)
        self._pending.append((n, rec, path))
        if len(self._pending) >= self.compact_every:
            self._compact()
        return path

    def _compact(self) -> None:
        """Merge the parts since the last compaction into one part over their range; the
        small parts are removed after it is complete (a reader skips covered parts)."""
        first, last = self._pending[0][0], self._pending[-1][0]
        merged = merge_parts([rec for _n, rec, _p in self._pending])
        path = self.directory / PARTS / f"{first:06d}-{last:06d}"
        man = dict(merged.manifest, part={"first": first, "last": last})
        write_recording(path, man, merged.events, merged.stacks, gpu=merged.gpu,
                        host=merged.host_ctx, kernels=merged.kernels)
        for _n, _rec, p in self._pending:
            shutil.rmtree(p, ignore_errors=True)
        self._pending = []

    def finish(self, manifest: dict[str, Any], pystacks: pl.DataFrame | None = None,
               gpu: pl.DataFrame | None = None, merged: Recording | None = None) -> Recording:
        """Merge every part into DIR (manifest.json written last), then remove DIR/parts/.
        `gpu`: the session's final NVML frame (every sample, joined to ranks at the end)
        replaces the parts' rows; `merged`: `merge_parts(self.parts, manifest)` when the
        caller has it already."""
        if merged is not None:
            rec = merged
        elif self.parts:
            rec = merge_parts(self.parts, manifest)
        else:
            rec = Recording(manifest=dict(manifest), events=schema.empty_events(),
                            stacks=schema.empty_stacks())
        if gpu is not None:
            rec.gpu = gpu
        if pystacks is not None:
            rec.pystacks = pystacks
        write_recording(self.directory, rec.manifest, rec.events, rec.stacks,
                        gpu=rec.gpu if rec.gpu.height else None,
                        host=rec.host_ctx if "host" in _enabled(rec.manifest) else None,
                        pystacks=rec.pystacks if rec.pystacks.height else None,
                        kernels=rec.kernels if rec.kernels.height else None)
        shutil.rmtree(self.directory / PARTS, ignore_errors=True)
        rec.path = self.directory
        return rec


def _enabled(manifest: dict[str, Any]) -> set[str]:
    ch = manifest.get("channels") or {}
    return {k for k, v in ch.items() if v} if isinstance(ch, dict) else set()
