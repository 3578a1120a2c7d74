"""ELF symbol facts on a library built here: what `ElfFile.defines` answers and how."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from argus.collect import symbols

pytestmark = pytest.mark.unit

SOURCE = r"""
int cudaLaunchKernelExported(void) { return 1; }
__attribute__((visibility("hidden"), used)) int cudaLaunchKernel(void) { return 2; }
static __attribute__((used)) int ncclAllReduceLocal(void) { return 3; }
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("elf")
    (d / "lib.c").write_text(SOURCE)
    out = d / "libstatic.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O0", "-o", str(out), str(d / "lib.c")],
                   check=True)
    return str(out)


def test_an_exported_function_is_found_through_the_hash_table(lib):
    elf = symbols.ElfFile(lib)
    assert elf._hash.get("cudaLaunchKernelExported") is not None
    assert elf.defines("cudaLaunchKernelExported")


def test_a_hidden_or_local_function_is_found_in_the_symbol_table(lib):
    # a static copy of a runtime inside another library: not exported, only in .symtab
    elf = symbols.ElfFile(lib)
    assert elf._hash.get("cudaLaunchKernel") is None
    assert "cudaLaunchKernel" in elf._strings_with(("cudaLaunchKernel",))
    assert elf.defines("cudaLaunchKernel") and elf.defines("ncclAllReduceLocal")


def test_a_name_only_part_of_another_is_not_defined(lib):
    elf = symbols.ElfFile(lib)
    for name in ("cudaLaunch", "LaunchKernel", "ncclAllReduce", "cudaLaunchKernelEx"):
        assert elf._strings_with((name,)) == frozenset(), name
        assert not elf.defines(name), name


def test_one_parsed_file_per_identity_whatever_path_reaches_it(lib, tmp_path):
    # each rank reaches a library through its own /proc/PID/root: one table for all
    link = tmp_path / "other-path.so"
    link.symlink_to(lib)
    a = symbols.elf_file(lib)
    b = symbols.elf_file(str(link))
    assert a is b and a.path == str(link)
    assert a.function_at(a.lookup("cudaLaunchKernel").vaddr) == "cudaLaunchKernel"
    link.unlink()  # the path it was last reached by is gone: the first still reaches it
    assert symbols.elf_file(lib) is a and a.path == lib
    assert a.defines("ncclAllReduceLocal")


def test_a_file_that_is_not_elf_is_none(tmp_path):
    p = tmp_path / "not.so"
    p.write_bytes(b"#!/bin/sh\n")
    assert symbols.elf_file(str(p)) is None
    assert symbols.elf_file(str(tmp_path / "missing.so")) is None


def test_a_name_in_no_string_table_is_missing_without_reading_the_symbol_table(lib):
    # a CPU build asked for names it cannot have: answered by the byte search alone
    elf = symbols.ElfFile(lib)
    assert elf.lookup("_ZN4c10d17ProcessGroupNCCL9allreduceE") is None
    assert elf._by_name is None
    assert elf.lookup("ncclAllReduceLocal") is not None  # only in .symtab: read now
    assert elf._by_name is not None


def test_markers_of_several_specs_are_answered_in_one_pass(lib):
    elf = symbols.ElfFile(lib)
    asked = ("cudaLaunchKernel", "ncclAllReduce", "ncclAllReduceLocal", "cudaLaunchKernelExported")
    assert elf.defined_of(asked) == {"cudaLaunchKernel", "ncclAllReduceLocal",
                                     "cudaLaunchKernelExported"}
    assert elf._strings_with(("ncclAllReduce", "LaunchKernel")) == frozenset()


def test_every_address_of_a_function_names_it_and_none_outside(lib):
    # CPU samples: the address table sorted once per file, a name read when asked for
    elf = symbols.ElfFile(lib)
    for name in ("cudaLaunchKernelExported", "cudaLaunchKernel", "ncclAllReduceLocal"):
        sym = elf.lookup(name)
        assert sym.size > 0
        assert [elf.function_at(sym.vaddr + k) for k in (0, sym.size - 1)] == [name, name]
        after = elf.function_at(sym.vaddr + sym.size)
        assert after != name
    assert isinstance(elf._funcs, symbols._AddressTable)
    assert elf.function_at(0) is None and elf.function_at(-1) is None


def test_string_tables_are_found_from_the_section_headers_as_pyelftools_finds_them(lib):
    # the numpy read of ELF64 section headers (no section built, no .gnu.hash parsed)
    import mmap

    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        fast = symbols._symbol_strtabs(f, mm)
        elf = ELFFile(f)
        links = [elf.get_section(s["sh_link"]) for s in elf.iter_sections()
                 if isinstance(s, SymbolTableSection)]
        slow = [(t["sh_offset"], t["sh_size"]) for t in links]
    assert len(fast) == 2 and fast == slow  # .dynsym's .dynstr and .symtab's .strtab


def test_string_searches_are_kept_by_file_identity_not_path(lib, tmp_path, monkeypatch):
    # each rank's /proc/PID/root/... path to the same libtorch: one search for all of them
    reads = []
    real = symbols._symbol_strtabs
    monkeypatch.setattr(symbols, "_symbol_strtabs", lambda f, mm: reads.append(1) or real(f, mm))
    monkeypatch.setattr(symbols, "_files", symbols.OrderedDict())  # no file parsed before
    paths = []
    for i in range(3):
        link = tmp_path / f"rank{i}.so"
        link.symlink_to(lib)
        paths.append(str(link))
    names = ("cudaLaunchKernel", "ncclAllReduceLocal")
    marker = {"cudaLaunchKernel", "ncclAllReduceLocal"}  # in no hash table: a string search
    assert [symbols.elf_file(p).defined_of(names) for p in paths] == [marker] * 3
    assert len(reads) == 1
    copy = tmp_path / "copy.so"  # another file (another inode): searched on its own
    shutil.copy(lib, copy)
    assert symbols.elf_file(str(copy)).defined_of(names) == marker
    assert len(reads) == 2


def test_defined_of_answers_each_name_once_per_file(lib, monkeypatch):
    elf = symbols.ElfFile(lib)
    asked = []
    real = symbols._strings_with
    monkeypatch.setattr(symbols, "_strings_with",
                        lambda path, names: asked.append(names) or real(path, names))
    assert elf.defined_of(("cudaLaunchKernel", "ncclAllReduce")) == {"cudaLaunchKernel"}
    assert asked[0] == ("cudaLaunchKernel", "ncclAllReduce")
    first = len(asked)
    assert elf.defined_of(("ncclAllReduce", "cudaLaunchKernel")) == {"cudaLaunchKernel"}
    assert len(asked) == first  # both answered already: the file is not read again
    assert elf.defined_of(("ncclAllReduceLocal", "cudaLaunchKernel")) == {"cudaLaunchKernel",
                                                                          "ncclAllReduceLocal"}
    assert asked[first] == ("ncclAllReduceLocal",)  # only the new name is searched
