"""Symbol resolution with pyelftools: probe addresses, placement, and kernel-stub names.

Files are opened through /proc/PID/root/<path> so a process in a container is resolved from
its own files. Each file is parsed once per (device, inode, size, mtime) and cached.

Placement: a uprobe on an instruction the kernel emulates (`push %rbp` and other pushes)
costs ~0.75 us per hit here; one that must be single-stepped (`endbr64`, most `mov`s) costs
11-14 us. When a function starts with `endbr64` the probe goes on the next instruction
(entry semantics are unchanged: the stack and argument registers are untouched by it).
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.hash import ELFHashSection, GNUHashSection
from elftools.elf.sections import SymbolTableSection

ENDBR64 = bytes.fromhex("f30f1efa")


@dataclass(frozen=True)
class Symbol:
    name: str
    vaddr: int  # ELF virtual address (st_value)
    size: int


@dataclass(frozen=True)
class Placement:
    """Where a probe for `symbol` goes: the ELF address to attach at and why."""

    symbol: str
    vaddr: int  # attach here (bcc translates to a file offset)
    file_offset: int
    skipped: int  # bytes skipped at the function start (4 after endbr64)
    first_insn: str  # hex of the probed instruction's first bytes
    emulated: bool  # the probed instruction is one the kernel emulates (cheap)


def _is_emulated(code: bytes) -> bool:
    # push %reg (50-57) and push %r8-r15 (41 50-57): emulated by x86 uprobes, no single-step.
    if code[:1] and 0x50 <= code[0] <= 0x57:
        return True
    return len(code) >= 2 and code[0] == 0x41 and 0x50 <= code[1] <= 0x57


class ElfFile:
    """The symbols of one ELF file, loaded lazily."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            elf = ELFFile(f)
            self.elf_type = elf.header["e_type"]
            self._loads = [
                (seg["p_vaddr"], seg["p_offset"], seg["p_filesz"])
                for seg in elf.iter_segments()
                if seg["p_type"] == "PT_LOAD"
            ]
            self.soname = None
            dynamic = elf.get_section_by_name(".dynamic")
            if dynamic is not None:
                for tag in dynamic.iter_tags():
                    if tag.entry.d_tag == "DT_SONAME":
                        self.soname = tag.soname
        self._hash = _HashLookup(path)
        self._funcs: _AddressTable | _SortedSymbols | None = None
        self._by_name: dict[str, Symbol] | None = None
        # Answers kept with the file (the file never changes; one ElfFile per identity):
        # every rank asks the same questions of libtorch_cpu through its own path. The names
        # asked come from the probe specs, a fixed set, so these stay small.
        self._defined: dict[str, bool] = {}  # defined_of
        self._in_strings: dict[str, bool] = {}  # _strings_with
        self._symbols: dict[str, Symbol | None] = {}  # symbol's scans

    def reached_by(self, path: str) -> None:
        """The file is the same (identity) at `path`: read it from there from now on (the
        path it was opened by, another rank's /proc/PID/root/..., goes when that rank does)."""
        self.path = path
        if self._hash._file is None:
            self._hash.path = path

    def lookup(self, name: str) -> Symbol | None:
        """A defined function symbol by exact (mangled) name, from .dynsym then .symtab."""
        # Large libraries (libtorch_cpu: 75k dynamic symbols) are looked up through their
        # GNU/SysV hash tables first instead of being scanned.
        hit = self._hash.get(name)
        if hit is not None:
            return hit
        # a name in no string table is in no symbol table: a byte search (0.04 s on
        # libtorch_cpu) instead of reading its 352k functions into a table (1.3 s), which
        # every torch build paid for the ProcessGroupNCCL methods a CPU build lacks
        if name not in self._strings_with((name,)):
            return None
        return self._all_funcs_by_name().get(name)

    def _all_funcs_by_name(self) -> dict[str, Symbol]:
        # Kept with the file (one ElfFile per file identity, `elf_file`): every rank maps
        # the same libtorch_cpu.so through its own /proc/PID/root path, and its .symtab has
        # 530k symbols (1.5 s to read).
        if self._by_name is None:
            self._by_name = _function_table(self.path, (".symtab", ".dynsym"))
        return self._by_name

    def symbol(self, name: str, scan: bool = True) -> Symbol | None:
        """A defined symbol of any type (data too: `_PyRuntime`) by exact name, from the
        dynamic hash table, else (scan) a scan of .dynsym and .symtab (slow: ~0.5 s for
        a 10k-symbol library)."""
        hit = self._hash.get(name)
        if hit is not None or not scan:
            return hit
        if name not in self._symbols:
            self._symbols[name] = _any_symbol(self.path, name)
        return self._symbols[name]

    def load_base(self, mappings) -> int | None:
        """What the loader added to this file's ELF addresses in a process (0 for a non-PIE
        executable), from the file's mappings there (objects with start and offset)."""
        for m in mappings:
            for p_vaddr, p_offset, _ in self._loads:
                if p_offset & ~0xFFF == m.offset:
                    return m.start - (p_vaddr & ~0xFFF)
        return None

    def defines(self, name: str) -> bool:
        """Whether the file defines function `name`: through the dynamic hash table, else
        only when the name is in one of its string tables at all (a byte search; the static-
        runtime marker asked of libtorch_cpu, which has none: 1.5 s to read its 530k-symbol
        .symtab into a table, ~0.05 s to search its strings) by reading the tables."""
        return name in self.defined_of((name,))

    def defined_of(self, names: tuple[str, ...]) -> set[str]:
        """Which of `names` the file defines as functions (`defines` of each), with one pass
        over its string tables for all the names the hash table does not have (the
        static-runtime markers of every spec asked of each libtorch library: 0.05 s on
        libtorch_cpu for two, where a search per name took 0.1 s, 0.5 s while ranks ran)."""
        asked = [n for n in names if n not in self._defined]
        if asked:  # once per file identity: every rank asks the same libtorch_cpu.so
            found = {n for n in asked if self._hash.get(n) is not None}
            rest = tuple(sorted(set(asked) - found))
            if rest:
                found |= {n for n in self._strings_with(rest) if self.lookup(n) is not None}
            self._defined.update((n, n in found) for n in asked)
        return {n for n in names if self._defined[n]}

    def _strings_with(self, names: tuple[str, ...]) -> frozenset[str]:
        """Which of `names` are whole strings (or `name@...`) of the file's symbol string
        tables (.dynstr, .strtab): when a name is not, no symbol of the file has it."""
        new = tuple(n for n in names if n not in self._in_strings)
        if new:  # one pass for every name not asked before
            found = _strings_with(self.path, new)
            self._in_strings.update((n, n in found) for n in new)
        return frozenset(n for n in names if self._in_strings[n])

    def vaddr_to_offset(self, vaddr: int) -> int | None:
        for p_vaddr, p_offset, p_filesz in self._loads:
            if p_vaddr <= vaddr < p_vaddr + p_filesz:
                return vaddr - p_vaddr + p_offset
        return None

    def offset_to_vaddr(self, file_off: int) -> int | None:
        for p_vaddr, p_offset, p_filesz in self._loads:
            if p_offset <= file_off < p_offset + p_filesz:
                return file_off - p_offset + p_vaddr
        return None

    def read(self, vaddr: int, n: int) -> bytes:
        off = self.vaddr_to_offset(vaddr)
        if off is None:
            return b""
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def placement(self, sym: Symbol) -> Placement | None:
        code = self.read(sym.vaddr, 8)
        if not code:
            return None
        skip = 4 if code.startswith(ENDBR64) else 0
        vaddr = sym.vaddr + skip
        return Placement(
            symbol=sym.name,
            vaddr=vaddr,
            file_offset=self.vaddr_to_offset(vaddr),
            skipped=skip,
            first_insn=code[skip : skip + 4].hex(),
            emulated=_is_emulated(code[skip:]),
        )

    def function_at(self, vaddr: int) -> str | None:
        """Name of the function containing ELF address vaddr (CPU samples, launch host
        stubs), from the functions' addresses sorted once per file (`_AddressTable`)."""
        if self._funcs is None:
            self._funcs = _AddressTable.of(self.path)
        if self._funcs is None:  # not a 64-bit little-endian file: the named table
            syms = sorted(self._all_funcs_by_name().values(), key=lambda s: s.vaddr)
            self._funcs = _SortedSymbols([s.vaddr for s in syms], syms)
        return self._funcs.at(vaddr)


_ELF64_SYM = np.dtype(
    [("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"),
     ("size", "<u8")]
)
_STT_FUNC, _STT_GNU_IFUNC = 2, 10


def _defined_functions(syms: np.ndarray) -> np.ndarray:
    """Which entries of an ELF64 symbol table (`_ELF64_SYM` rows) are defined, named
    functions with an address (STT_FUNC or STT_GNU_IFUNC, not SHN_UNDEF)."""
    kind = syms["info"] & 0xF
    keep = ((kind == _STT_FUNC) | (kind == _STT_GNU_IFUNC)) & (syms["shndx"] != 0)
    return keep & (syms["value"] != 0) & (syms["name"] != 0)


def _function_table(path: str, names: tuple[str, ...]) -> dict[str, Symbol]:
    """Defined functions of the symbol tables `names` (first definition of a name wins)."""
    out: dict[str, Symbol] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        fast = elf.elfclass == 64 and elf.little_endian
        for secname in names:
            sec = elf.get_section_by_name(secname)
            if not isinstance(sec, SymbolTableSection):
                continue
            if not fast:
                for s in sec.iter_symbols():
                    if s["st_info"]["type"] not in ("STT_FUNC", "STT_GNU_IFUNC"):
                        continue
                    if s["st_shndx"] == "SHN_UNDEF" or not s.name or s["st_value"] == 0:
                        continue
                    # Versioned names come back bare; keep the first (default).
                    out.setdefault(s.name, Symbol(s.name, s["st_value"], s["st_size"]))
                continue
            # Read the table with numpy: pyelftools takes ~10 s on libtorch_cpu's .symtab.
            f.seek(sec["sh_offset"])
            syms = np.frombuffer(f.read(sec["sh_size"]), dtype=_ELF64_SYM)
            strtab = elf.get_section(sec["sh_link"])
            f.seek(strtab["sh_offset"])
            strs = f.read(strtab["sh_size"])
            kept = syms[_defined_functions(syms)]
            for off, value, size in zip(
                kept["name"].tolist(), kept["value"].tolist(), kept["size"].tolist(), strict=True
            ):
                name = strs[off : strs.index(b"\0", off)].decode("utf-8", "replace")
                if name not in out:
                    out[name] = Symbol(name, value, size)
    return out


@dataclass
class _SortedSymbols:
    starts: list[int]
    syms: list[Symbol]

    def at(self, vaddr: int) -> str | None:
        i = bisect.bisect_right(self.starts, vaddr) - 1
        if i < 0:
            return None
        s = self.syms[i]
        return s.name if vaddr == s.vaddr or vaddr < s.vaddr + max(s.size, 1) else None


class _AddressTable:
    """The defined functions of a 64-bit little-endian file's .symtab and .dynsym as numpy
    arrays sorted by address (start, size, where the name is); a name is decoded when asked
    for, from the file mapped read-only (the page cache, not argus's heap). libtorch_cpu's
    352k functions: 0.1 s and ~8 MB, where a table of named Symbol objects took 1.3 s (and
    was built for every rank's first CPU sample in libtorch: a 0.3 s burst of argus's CPU,
    1.3x slower steps for 6 steps on 2 vCPUs, 4 of 10 healthy tp_dp runs warned)."""

    def __init__(self, starts, sizes, names, strtabs, mm, f):
        self._starts, self._sizes, self._names = starts, sizes, names
        self._strtabs, self._mm, self._file = strtabs, mm, f

    @classmethod
    def of(cls, path: str) -> _AddressTable | None:
        f = open(path, "rb")  # noqa: SIM115 - lives with the cached ElfFile
        try:
            elf = ELFFile(f)
            if not (elf.elfclass == 64 and elf.little_endian):
                f.close()
                return None
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            parts, strtabs = [], []
            for secname in (".symtab", ".dynsym"):
                sec = elf.get_section_by_name(secname)
                if not isinstance(sec, SymbolTableSection) or not sec["sh_size"]:
                    continue
                syms = np.frombuffer(mm, dtype=_ELF64_SYM, count=sec["sh_size"] // 24,
                                     offset=sec["sh_offset"])
                keep = _defined_functions(syms)
                strtab = elf.get_section(sec["sh_link"])
                parts.append((syms["value"][keep], syms["size"][keep], syms["name"][keep],
                              np.full(int(keep.sum()), len(strtabs), dtype=np.uint8)))
                strtabs.append((strtab["sh_offset"], strtab["sh_offset"] + strtab["sh_size"]))
        except (ELFError, OSError, ValueError):
            f.close()
            return None
        if not parts:
            return cls(np.empty(0, np.uint64), np.empty(0, np.uint64),
                       np.empty(0, np.uint32), [], None, f)
        value = np.concatenate([p[0] for p in parts])
        size = np.concatenate([p[1] for p in parts])
        name = np.concatenate([p[2] for p in parts]).astype(np.uint64)
        tab = np.concatenate([p[3] for p in parts])
        order = np.argsort(value, kind="stable")  # .symtab's first at an address
        return cls(value[order], size[order], (name[order] << np.uint64(8)) | tab[order],
                   strtabs, mm, f)

    def at(self, vaddr: int) -> str | None:
        if vaddr < 0 or vaddr >= 1 << 64:
            return None
        i = int(self._starts.searchsorted(np.uint64(vaddr), side="right")) - 1
        if i < 0:
            return None
        start = int(self._starts[i])
        # the first function at that address (aliases: the one .symtab lists first)
        i = int(self._starts.searchsorted(self._starts[i], side="left"))
        if not (vaddr == start or vaddr < start + max(int(self._sizes[i]), 1)):
            return None
        packed = int(self._names[i])
        lo, hi = self._strtabs[packed & 0xFF]
        off = lo + (packed >> 8)
        end = self._mm.find(b"\0", off, hi)
        return self._mm[off : end if end >= 0 else hi].decode("utf-8", "replace")


_SHT_SYMTAB, _SHT_DYNSYM = 2, 11
_ELF64_SHDR = np.dtype(
    [("name", "<u4"), ("type", "<u4"), ("flags", "<u8"), ("addr", "<u8"), ("offset", "<u8"),
     ("size", "<u8"), ("link", "<u4"), ("info", "<u4"), ("addralign", "<u8"),
     ("entsize", "<u8")]
)


def _symbol_strtabs(f, mm) -> list[tuple[int, int]]:
    """(offset, size) of the string table of each symbol table (.symtab, .dynsym). An
    ELF64 little-endian file's section headers are read as one array: pyelftools'
    iter_sections builds every section, parsing libtorch_cpu's .gnu.hash on the way
    (60 ms, on every call)."""
    if mm[:6] == b"\x7fELF\x02\x01":  # ELFCLASS64, ELFDATA2LSB
        shoff = int.from_bytes(mm[0x28:0x30], "little")
        entsize = int.from_bytes(mm[0x3A:0x3C], "little")
        count = int.from_bytes(mm[0x3C:0x3E], "little")
        if entsize == _ELF64_SHDR.itemsize and 0 < count and shoff + count * entsize <= len(mm):
            sh = np.frombuffer(mm, dtype=_ELF64_SHDR, count=count, offset=shoff)
            out = []
            for link in sh["link"][(sh["type"] == _SHT_SYMTAB) | (sh["type"] == _SHT_DYNSYM)]:
                if link < count:
                    out.append((int(sh["offset"][link]), int(sh["size"][link])))
            return out
    elf = ELFFile(f)
    out = []
    for sec in elf.iter_sections():
        if isinstance(sec, SymbolTableSection):
            strtab = elf.get_section(sec["sh_link"])
            out.append((strtab["sh_offset"], strtab["sh_size"]))
    return out


def _strings_with(path: str, names: tuple[str, ...]) -> frozenset[str]:
    """Which of `names` are whole strings (or `name@...`) of the file's symbol string
    tables: one regular-expression pass over each table for all of them."""
    pat = re.compile(b"\0(" + b"|".join(re.escape(n.encode()) for n in names) + b")[\0@]")
    out: set[str] = set()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for start, size in _symbol_strtabs(f, mm):
            for m in pat.finditer(mm, start, start + size):
                out.add(m.group(1).decode())
    return frozenset(out)


def _any_symbol(path: str, name: str) -> Symbol | None:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for secname in (".dynsym", ".symtab"):
            sec = elf.get_section_by_name(secname)
            if not isinstance(sec, SymbolTableSection):
                continue
            for s in sec.get_symbol_by_name(name) or ():
                if s["st_shndx"] != "SHN_UNDEF" and s["st_value"]:
                    return Symbol(s.name, s["st_value"], s["st_size"])
    return None


class _HashLookup:
    """Exact-name lookup of defined functions through .gnu.hash / .hash of .dynsym.

    The file stays open and its hash section parsed for the lifetime of the lookup, so a
    lookup costs a few reads, not a re-parse of the ELF headers (libtorch: ~23 ms each)."""

    def __init__(self, path: str):
        self.path = path
        self._section = None
        self._file = None

    def _hash_section(self):
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - lives with the cached ElfFile
            elf = ELFFile(self._file)
            for secname in (".gnu.hash", ".hash"):
                sec = elf.get_section_by_name(secname)
                if isinstance(sec, (GNUHashSection, ELFHashSection)):
                    self._section = sec
                    break
        return self._section

    def get(self, name: str) -> Symbol | None:
        sec = self._hash_section()
        if sec is None:
            return None
        s = sec.get_symbol(name)
        if s is None or s["st_shndx"] == "SHN_UNDEF" or s["st_value"] == 0:
            return None
        return Symbol(s.name, s["st_value"], s["st_size"])


MAX_FILES = 256  # parsed ELF files kept (least recently used out): ~50 per torch rank, shared
_files: OrderedDict[tuple[int, int, int, int], ElfFile | None] = OrderedDict()
_files_lock = threading.Lock()


def elf_file(path: str) -> ElfFile | None:
    """The parsed ELF at path, None when it is not a readable ELF. One per file identity
    (device, inode, size, mtime), whatever path reached it: the ranks of a node map the same
    libraries, each through its own /proc/PID/root. Safe from several threads (the tracer
    warms the tables of the files its targets map in one while it attaches in another)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _files_lock:
        if key in _files:
            _files.move_to_end(key)
            elf = _files[key]
            if elf is not None and elf.path != path:
                elf.reached_by(path)
            return elf
    try:
        elf = ElfFile(path)
    except OSError:
        return None  # gone meanwhile (a rank's /proc/PID/root): another path may reach it
    except ELFError:
        elf = None
    with _files_lock:
        elf = _files.setdefault(key, elf)  # another thread's parse of it first: that one
        if len(_files) > MAX_FILES:
            _files.popitem(last=False)
    return elf


def host_path(tgid: int, path: str, proc_root: str = "/proc") -> str:
    """A path as seen by process tgid, reachable from here (through its root: containers)."""
    return f"{proc_root}/{tgid}/root{path}"


def runtime_address(mappings, file_offset: int) -> int | None:
    """The virtual address of file_offset in a process, from that file's mappings.

    `mappings` are objects with start, end, offset (from /proc/PID/maps).
    """
    for m in mappings:
        if m.offset <= file_offset < m.offset + (m.end - m.start):
            return m.start + (file_offset - m.offset)
    return None


_demangler = None


def demangle(name: str) -> str:
    """C++ demangling through libstdc++'s __cxa_demangle; the name itself when not mangled."""
    global _demangler
    if not name.startswith("_Z"):
        return name
    if _demangler is None:
        try:
            lib = ctypes.CDLL("libstdc++.so.6")
            fn = lib.__cxa_demangle
            fn.restype = ctypes.c_void_p
            fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.POINTER(ctypes.c_int)]
            free = ctypes.CDLL(None).free
            free.argtypes = [ctypes.c_void_p]
            _demangler = (fn, free)
        except (OSError, AttributeError):
            _demangler = False
    if not _demangler:
        return name
    fn, free = _demangler
    status = ctypes.c_int()
    ptr = fn(name.encode(), None, None, ctypes.byref(status))
    if status.value != 0 or not ptr:
        return name
    try:
        return ctypes.string_at(ptr).decode("utf-8", "replace")
    finally:
        free(ptr)


def short_name(demangled: str) -> str:
    """'ns::Class::method(args) const' -> 'ns::Class::method' (kernel names in tables)."""
    depth = 0
    for i, ch in enumerate(demangled):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return demangled[:i]
    return demangled
