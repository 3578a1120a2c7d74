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
                   check=True)  # fmt: skip
    return str(out)


def test_an_exported_function_is_found_through_the_hash_table(lib):
    elf = symbols.ElfFile(lib)
    assert elf._hash.get("cudaLaunchKernelExported") is not None
    assert elf.defines("cudaLaunchKernelExported")


def test_a_hidden_or_local_function_is_found_in_the_symbol_table(lib):
    # a static copy of a runtime inside another library: not exported, only in .symtab
    elf = symbols.ElfFile(lib)
    assert elf._hash.get("cudaLaunchKernel") is None
    assert symbols._strings_have(lib, "cudaLaunchKernel")
    assert elf.defines("cudaLaunchKernel") and elf.defines("ncclAllReduceLocal")


def test_a_name_only_part_of_another_is_not_defined(lib):
    elf = symbols.ElfFile(lib)
    for name in ("cudaLaunch", "LaunchKernel", "ncclAllReduce", "cudaLaunchKernelEx"):
        assert not symbols._strings_have(lib, name), name
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
