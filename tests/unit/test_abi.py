"""The ctypes mirror (argus/collect/abi.py) matches bpf/argus.h, field by field."""

import re
import subprocess
from pathlib import Path

import pytest

from argus.collect import abi

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _c_layout(tmp_path: Path) -> dict[str, dict[str, int]]:
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "argus.h"', "int main(void) {"]
    for cname, mirror in abi.STRUCTS.items():
        lines.append(f'printf("{cname} sizeof %zu\\n", sizeof(struct {cname}));')
        for field, *_ in mirror._fields_:
            lines.append(
                f'printf("{cname} {field} %zu\\n", offsetof(struct {cname}, {field}));'
            )
    lines += ["return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-I", str(ROOT / "bpf"), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    layout: dict[str, dict[str, int]] = {}
    for line in out.splitlines():
        cname, field, value = line.split()
        layout.setdefault(cname, {})[field] = int(value)
    return layout


def test_every_struct_matches_the_header(tmp_path):
    layout = _c_layout(tmp_path)
    assert set(layout) == set(abi.STRUCTS)
    for cname, mirror in abi.STRUCTS.items():
        import ctypes

        assert layout[cname]["sizeof"] == ctypes.sizeof(mirror), cname
        for field, *_ in mirror._fields_:
            assert layout[cname][field] == getattr(mirror, field).offset, f"{cname}.{field}"


def test_constants_match_the_header():
    header = (ROOT / "bpf" / "argus.h").read_text()
    defines = dict(re.findall(r"#define (ARGUS_\w+)[ \t]+([^/\n]+)", header))

    def value(name: str) -> int:
        text = defines[name].strip().replace("1u", "1")
        assert re.fullmatch(r"[0-9()<< ]+", text), text
        return int(eval(text))  # digits, parentheses and << only (checked above)

    assert value("ARGUS_PF_EXIT") == abi.PF_EXIT
    assert value("ARGUS_PF_NO_RECORD") == abi.PF_NO_RECORD
    assert value("ARGUS_MAX_DEPTH") == abi.MAX_DEPTH
    assert value("ARGUS_STR_LEN") == abi.STR_LEN
    assert value("ARGUS_NDROPS") == len(abi.DROP_NAMES)
    assert value("ARGUS_REC_PROC") == abi.REC_PROC
    assert value("ARGUS_REC_GROUP") == abi.REC_GROUP
    assert value("ARGUS_PF_GROUP") == abi.PF_GROUP
    assert value("ARGUS_C10D_HEAD") == abi.C10D_HEAD
    assert value("ARGUS_C10D_NAME_OFF") == abi.C10D_NAME_OFF
    assert value("ARGUS_C10D_NAME_LEN") == abi.C10D_NAME_LEN
    assert value("ARGUS_W_DESCEND") == abi.W_DESCEND
    assert value("ARGUS_DROP_HOST_MAP_FULL") == abi.DROP_NAMES.index("host_map_full")
    for name, kind in (("CPU", abi.HOST_CPU), ("TCP", abi.HOST_TCP), ("OOM", abi.HOST_OOM),
                       ("BLOCK", abi.HOST_BLOCK), ("CPU_WAIT", abi.HOST_CPU_WAIT),
                       ("ON_CPU", abi.HOST_ON_CPU)):
        assert value(f"ARGUS_HOST_{name}") == kind
    assert value("ARGUS_NATIVE_DEPTH") == abi.NATIVE_DEPTH
    assert value("ARGUS_OFFCPU_USER_DEPTH") == abi.OFFCPU_USER_DEPTH
    assert value("ARGUS_OFFCPU_KERNEL_DEPTH") == abi.OFFCPU_KERNEL_DEPTH
    assert value("ARGUS_OFFCPU_SCAN") == abi.OFFCPU_SCAN
    assert value("ARGUS_DROP_PY_WALK") == abi.DROP_NAMES.index("py_walk_failed")
    assert value("ARGUS_DROP_PY_MAP_FULL") == abi.DROP_NAMES.index("py_stack_map_full")
    for name in ("DEPTH", "THREADS", "CFRAME", "PTHREAD", "IS_ENTRY", "OWNER", "ALL_ENTRY"):
        assert value(f"ARGUS_PY_{name}") == getattr(abi, f"PY_{name}"), name
    assert value("ARGUS_PY_NSTATS") == len(abi.PY_STAT_NAMES)
    assert value("ARGUS_PY_STAT_TRUNCATED") == abi.PY_STAT_NAMES.index("truncated")
