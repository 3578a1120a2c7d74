"""Probe specs: which library, which symbols, which arguments (cuda_probes/*.toml).

A spec file has one `[library]` table and `[[probe]]` entries. `load_specs()` validates
every entry and raises `SpecInvalid` naming the file, the entry and the field. Argument
locations are `reg1`..`reg6` (rdi rsi rdx rcx r8 r9) and `stack1`..`stack4` (the 7th.. integer
eightbytes at sp+8.. at entry); what the generic BPF program must capture (flags) is derived
here from the fields, so the BPF side never changes when a probe is added.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from argus import resources
from argus.collect import abi
from argus.errors import SpecInvalid

SPEC_DIR = resources.spec_dir()

CHANNELS = ("cuda", "nccl", "torch")
KINDS = (
    "launch", "graph_launch", "memcpy", "sync", "event", "malloc", "free", "device", "module",
    "collective", "p2p", "group", "comm_init", "comm_init_all", "comm_split", "comm_destroy",
    "pg_collective", "pg_p2p", "pg_work", "pg_work_done", "autograd", "ddp_bucket",
)
# Semantic argument names and what they mean (decoded in argus.collect.decode).
ARG_FIELDS = (
    "kernel", "kernel_handle", "stream", "bytes", "memcpy_kind", "count", "dtype", "redop",
    "comm", "peer", "root", "nranks", "rank", "uid", "out", "name", "event", "ptr", "device",
    "parent_comm", "color", "key",
)
_LIBRARY_KEYS = {"family", "channel", "files", "static_marker", "versions"}
_PROBE_KEYS = {"symbol", "variants", "name", "kind", "op", "exit", "args"}


def _slot(loc: str) -> int | None:
    """'reg3' -> 2, 'stack1' -> 6; None when malformed."""
    if loc.startswith("reg") and loc[3:].isdigit() and 1 <= int(loc[3:]) <= abi.REG_ARGS:
        return int(loc[3:]) - 1
    if loc.startswith("stack") and loc[5:].isdigit() and 1 <= int(loc[5:]) <= abi.STACK_ARGS:
        return abi.REG_ARGS + int(loc[5:]) - 1
    return None


@dataclass(frozen=True)
class ProbeSpec:
    """One probed function (and its variants: same arguments, other symbol names)."""

    family: str
    channel: str
    symbol: str
    variants: tuple[str, ...]
    name: str  # what events.parquet calls it
    kind: str
    op: str | None
    exit: bool
    args: dict[str, int]  # semantic field -> slot index into argus_call.args
    source: str  # "file.toml probe #N", for messages

    @property
    def symbols(self) -> tuple[str, ...]:
        return (self.symbol, *self.variants)

    @property
    def flags(self) -> int:
        """The ARGUS_PF_* flags the generic BPF program needs for this probe."""
        f = 0
        if self.exit:
            f |= abi.PF_EXIT
        if any(slot >= abi.REG_ARGS for field_, slot in self.args.items() if field_ != "uid"):
            f |= abi.PF_STACK
        if "uid" in self.args:
            f |= abi.PF_UID_HASH
        if "out" in self.args:
            f |= abi.PF_OUT
        if "name" in self.args:
            f |= abi.PF_STR
        if "comm" in self.args and self.kind in ("collective", "p2p", "pg_collective", "pg_p2p"):
            f |= abi.PF_SEQ
            if self.kind in ("p2p", "pg_p2p"):
                f |= abi.PF_PEER
            if self.kind.startswith("pg_"):  # its comm is a c10d::Backend (argus.collect.c10d)
                f |= abi.PF_GROUP
        return f

    def probe_info(self, probe_id: int) -> abi.ProbeInfo:
        return abi.ProbeInfo(
            probe_id=probe_id,
            flags=self.flags,
            out_arg=self.args.get("out", 0),
            str_arg=self.args.get("name", 0),
            seq_arg=self.args.get("comm", 0),
            peer_arg=self.args.get("peer", 0),
        )


@dataclass(frozen=True)
class LibrarySpec:
    family: str
    channel: str
    files: tuple[str, ...]
    static_marker: str | None
    versions: str
    probes: tuple[ProbeSpec, ...] = field(default=())
    source: str = ""

    def matches_file(self, basename: str) -> bool:
        return any(fnmatch.fnmatch(basename, pat) for pat in self.files)


def _fail(where: str, msg: str) -> SpecInvalid:
    return SpecInvalid(f"{where}: {msg}")


def parse_spec(text: str, source: str) -> LibrarySpec:
    """Parse and validate one spec file's text; `source` names it in errors.

    The checks run in a fixed order, so a file with several mistakes always reports the same
    (first) one: the TOML, the [library] table, then each [[probe]] entry in file order.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _fail(source, f"not valid TOML ({e})") from e
    lib = _check_library(data.get("library"), source)
    entries = data.get("probe", [])
    if not isinstance(entries, list) or not entries:
        raise _fail(source, "no [[probe]] entries")
    seen: set[str] = set()
    probes = tuple(_parse_probe(entry, f"{source} probe #{i}", lib, seen)
                   for i, entry in enumerate(entries, 1))
    return LibrarySpec(
        family=lib["family"],
        channel=lib["channel"],
        files=tuple(lib["files"]),
        static_marker=lib.get("static_marker"),
        versions=lib.get("versions", ""),
        probes=probes,
        source=source,
    )


def _check_library(lib: object, source: str) -> dict:
    """The [library] table, validated: known fields only, family/channel/files present."""
    if not isinstance(lib, dict):
        raise _fail(source, "missing the [library] table")
    where = f"{source} [library]"
    unknown = set(lib) - _LIBRARY_KEYS
    if unknown:
        raise _fail(where, f"unknown field {sorted(unknown)[0]!r}")
    for key in ("family", "channel", "files"):
        if key not in lib:
            raise _fail(where, f"missing field {key!r}")
    if lib["channel"] not in CHANNELS:
        raise _fail(where, f"field 'channel' must be one of {CHANNELS}")
    files = lib["files"]
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise _fail(where, "field 'files' must be a non-empty list of patterns")
    return lib


def _parse_probe(entry: object, where: str, lib: dict, seen: set[str]) -> ProbeSpec:
    """One [[probe]] entry (`where` is "file probe #N"), validated; adds its symbols to
    `seen`, the symbols of the entries before it in the same file."""
    if not isinstance(entry, dict):
        raise _fail(where, "must be a table")
    if isinstance(entry.get("symbol"), str) and entry["symbol"]:
        where = f"{where} ({entry['symbol']})"
    _check_probe_fields(entry, where)
    variants = entry.get("variants", [])
    if not isinstance(variants, list) or not all(isinstance(v, str) for v in variants):
        raise _fail(where, "field 'variants' must be a list of symbol names")
    exit_ = entry.get("exit", False)
    if not isinstance(exit_, bool):
        raise _fail(where, "field 'exit' must be true or false")
    args = _parse_args(entry.get("args", {}), where)
    _check_semantics(entry, where, variants, exit_, args)
    for sym in (entry["symbol"], *variants):
        if sym in seen:
            raise _fail(where, f"symbol {sym!r} is listed twice")
        seen.add(sym)
    return ProbeSpec(
        family=lib["family"],
        channel=lib["channel"],
        symbol=entry["symbol"],
        variants=tuple(variants),
        name=entry.get("name", entry["symbol"]),
        kind=entry["kind"],
        op=entry.get("op"),
        exit=exit_,
        args=args,
        source=where,
    )


def _check_probe_fields(entry: dict, where: str) -> None:
    """Known fields only; `symbol` and `kind` non-empty strings, `kind` one of KINDS."""
    unknown = set(entry) - _PROBE_KEYS
    if unknown:
        raise _fail(where, f"unknown field {sorted(unknown)[0]!r}")
    for key in ("symbol", "kind"):
        if not isinstance(entry.get(key), str) or not entry.get(key):
            raise _fail(where, f"field {key!r} is required (a non-empty string)")
    if entry["kind"] not in KINDS:
        raise _fail(where, f"field 'kind': {entry['kind']!r} is not one of {KINDS}")


def _parse_args(args_in: object, where: str) -> dict[str, int]:
    """The `args` table (semantic name = "regN" | "stackN") as name -> slot index."""
    if not isinstance(args_in, dict):
        raise _fail(where, "field 'args' must be a table of name = location")
    args: dict[str, int] = {}
    for name, loc in args_in.items():
        if name not in ARG_FIELDS:
            raise _fail(where, f"field 'args.{name}': unknown argument name")
        slot = _slot(loc) if isinstance(loc, str) else None
        if slot is None:
            raise _fail(where,
                        f"field 'args.{name}': {loc!r} is not reg1..reg6 or stack1..stack4")
        args[name] = slot
    return args


def _check_semantics(entry: dict, where: str, variants: list[str], exit_: bool,
                     args: dict[str, int]) -> None:
    """The rules between fields: no return probe on C++, return-time arguments need exit,
    where a by-value uid lies, collectives name their op."""
    if exit_ and any(sym.startswith("_Z") for sym in (entry["symbol"], *variants)):
        raise _fail(
            where,
            "field 'exit': no return probes on C++ functions (a C++ exception unwinding "
            "through a uretprobe's trampoline aborts the process); pair the entry with a "
            "completion function instead",
        )
    if ("out" in args or "name" in args) and not exit_:
        raise _fail(where, "fields 'args.out'/'args.name' are read at return: set exit = true")
    if "uid" in args and args["uid"] != abi.REG_ARGS:
        raise _fail(where, "field 'args.uid': a by-value ncclUniqueId is read at stack1 only")
    if entry["kind"] in ("collective", "p2p", "pg_collective", "pg_p2p") and "op" not in entry:
        raise _fail(where, "field 'op' is required for collectives")


def load_specs(spec_dir: Path = SPEC_DIR,
               channels: tuple[str, ...] = CHANNELS) -> list[LibrarySpec]:
    """Every *.toml in spec_dir whose channel is enabled, validated."""
    specs = []
    for path in sorted(spec_dir.glob("*.toml")):
        spec = parse_spec(path.read_text(), path.name)
        if spec.channel in channels:
            specs.append(spec)
    if not specs:
        raise SpecInvalid(f"no probe specs for channels {channels} in {spec_dir}")
    return specs
