"""The package's layout rules (issue 15), checked so that they stay true:

- no module of argus/ over 600 lines;
- no module imports another module's private (`_name`) names, or reads `module._name` of
  an argus module it imported;
- analysing never imports collecting or bcc; nothing imports the daemon but its command;
- the channel table at the top of docs/architecture.md is the collector's REGISTRY: the
  same channels in the same order, each with its BPF file, its probe spec files and its
  collector module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from argus.collect.channels import REGISTRY
from argus.collect.specs import load_specs

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "argus"
MAX_LINES = 600


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(tree: ast.AST) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) of every argus import, lazy ones included."""
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out += [(n.lineno, n.module, a.name) for a in n.names]
        elif isinstance(n, ast.Import):
            out += [(n.lineno, a.name, None) for a in n.names]
    return [x for x in out if x[1] == "argus" or x[1].startswith(("argus.", "bcc"))]


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_module_uses_another_modules_private_names():
    bad = []
    for p in _modules():
        tree = ast.parse(p.read_text())
        bound: set[str] = set()
        for line, mod, name in _imports(tree):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{p.relative_to(REPO)}:{line}: from {mod} import {name}")
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("argus"):
                bound |= {a.asname or a.name for a in n.names}
            elif isinstance(n, ast.Import):
                bound |= {(a.asname or a.name).split(".")[0] for a in n.names
                          if a.name.startswith("argus")}
        for n in ast.walk(tree):
            if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                    and n.value.id in bound and n.attr.startswith("_")
                    and not n.attr.startswith("__")):
                bad.append(f"{p.relative_to(REPO)}:{n.lineno}: {n.value.id}.{n.attr}")
    assert bad == []


def test_imports_point_one_way():
    bad = []
    for p in _modules():
        room = p.relative_to(PKG).parts[0]
        for line, mod, _name in _imports(ast.parse(p.read_text())):
            where = f"{p.relative_to(REPO)}:{line}: {mod}"
            if room in ("analyze", "recording", "present") and (
                    mod.startswith(("argus.collect", "bcc"))):
                bad.append(where)
            if mod.startswith("argus.daemon") and room != "daemon" and p.name != "daemon.py":
                bad.append(where)
            if room == "collect" and mod.startswith(("argus.analyze", "argus.present")):
                bad.append(where)
            if mod.startswith("bcc") and p.name != "bcc_adapter.py":
                bad.append(where)
    assert bad == []


def _channel_table() -> list[list[str]]:
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Read this first: the channels", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| ")]
    return rows[1:]  # the header row


def test_the_channel_table_in_the_architecture_doc_is_the_registry():
    rows = _channel_table()
    assert [r[0] for r in rows] == [c.name for c in REGISTRY]
    families = {s.channel: set() for s in load_specs()}
    for s in load_specs():
        families[s.channel].add(Path(s.source).name)
    for row, chan in zip(rows, REGISTRY, strict=True):
        bpf = re.findall(r"`([\w.]+\.bpf\.c)`", row[1])
        assert bpf == list(chan.sources), row
        specs = set(re.findall(r"`([\w.]+\.toml)`", row[2]))
        assert specs == set().union(*(families.get(s, set()) for s in chan.switches)), row
        module = chan.__module__.rsplit(".", 1)[1]
        assert f"`channels/{module}.py`" in row[3], row
