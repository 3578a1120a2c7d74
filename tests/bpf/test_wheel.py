"""argus as an installed package: a wheel, installed outside the checkout, traces a job.

The bpf test builds the wheel from a copy of this tree, installs it into a fresh venv of
Debian's python3 (--system-site-packages, for bcc; the other dependencies come from the
package index, through pip's cache), and runs that venv's `argus demo` from `/` with a
fresh per-user cache, so the simulator's stand-ins are built there from the wheel's own C
sources on first use. It checks the installed argus is the venv's, which probes attached
(exactly: every spec'd symbol the stand-ins export, on both ranks), the steps, and the
planted straggler. ~20 s with a warm pip cache.

The unit tests check what a wheel can silently lose: a subpackage missing from
pyproject.toml's package list, and the first-use build of the stand-ins.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from argus import resources
from argus.collect.specs import load_specs

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
BUCKETS = 4  # the simulator's default gradient buckets: one ncclAllReduce each per step
# pip's words when it cannot reach an index (or the index lacks a dependency)
_OFFLINE = ("No matching distribution found", "Could not fetch URL", "NewConnectionError",
            "Max retries exceeded", "Temporary failure in name resolution",
            "Could not find a version that satisfies")


def _packages_in_tree() -> set[str]:
    return {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "argus").rglob(
        "__init__.py") if "__pycache__" not in p.parts}


@pytest.mark.unit
def test_the_wheel_lists_every_argus_package_and_maps_the_data_folders():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    data = {p for p in listed if p.startswith("argus._data.")}
    assert listed - data == _packages_in_tree(), "pyproject.toml [tool.setuptools] packages"
    assert tool["package-dir"] == {"argus._data.bpf": "bpf",
                                   "argus._data.cuda_probes": "cuda_probes"}
    assert data == {"argus._data.bpf", "argus._data.cuda_probes",
                    "argus._data.cuda_probes.standins", "argus._data.cuda_probes.agent"}


@pytest.mark.unit
def test_a_checkout_reads_its_own_top_level_folders():
    assert resources.checkout_root() == REPO
    assert resources.bpf_dir() == REPO / "bpf"
    assert resources.spec_dir() == REPO / "cuda_probes"
    assert resources.sim_build_dir() == REPO / "build"


@pytest.mark.unit
def test_the_standins_are_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(resources.CACHE_ENV, str(tmp_path / "cache"))
    built = resources.build_standins()
    assert built.parent == tmp_path / "cache" and built.name.startswith("standins-")
    rank = built / "sim" / "argus-sim-rank"
    for name in ("sim/argus-sim-rank", "stubs/libcudart.so.12", "stubs/libcuda.so.1",
                 "stubs/libnccl.so.2", "stubs/libnvidia-ml.so.1", "stubs/libargus_simgpu.so"):
        assert (built / name).is_file(), name
    mtime = rank.stat().st_mtime_ns
    assert resources.build_standins() == built
    assert rank.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name, f"{built.name}.lock"]


@pytest.mark.unit
def test_without_a_compiler_the_error_says_how_to_get_the_simulator(tmp_path, monkeypatch):
    monkeypatch.setenv(resources.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no make, no cc
    with pytest.raises(resources.DataMissing) as e:
        resources.build_standins()
    assert "`make` is not installed" in str(e.value)
    assert "build-essential" in e.value.remedy and "ARGUS_BUILD_DIR" in e.value.remedy
    assert not (tmp_path / "cache").exists()


def _run(cmd, what, timeout, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if p.returncode != 0:
        out = p.stdout + p.stderr
        if what.startswith("pip") and any(s in out for s in _OFFLINE):
            pytest.skip(f"{what}: the package index is unreachable "
                        f"({out.strip().splitlines()[-1]})")
        pytest.fail(f"{what} exited {p.returncode}:\n{out[-3000:]}")
    return p


def _copy_tree(dest: Path) -> Path:
    """What the wheel is built from, without build/, caches or a stale egg-info."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("argus", "bpf", "cuda_probes"):
        shutil.copytree(REPO / name, dest / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _exported(lib: Path) -> set[str]:
    from elftools.elf.elffile import ELFFile

    with open(lib, "rb") as f:
        dynsym = ELFFile(f).get_section_by_name(".dynsym")
        return {s.name for s in dynsym.iter_symbols() if s["st_shndx"] != "SHN_UNDEF"}


@pytest.mark.bpf
def test_a_wheel_installed_outside_the_checkout_traces_the_demo(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("ARGUS_")}
    src = _copy_tree(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
          str(src)], "pip wheel", 180, env=env)
    (wheel,) = (tmp_path / "dist").glob("argus-*.whl")
    venv = tmp_path / "venv"
    _run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], "venv", 120,
         env=env)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], "pip install", 300, env=env)

    py = venv / "bin" / "python"
    probe = ("import argus, bcc; from argus import resources as r; "
             "print(argus.__file__); print(r.bpf_dir()); print(r.spec_dir())")
    where = _run([str(py), "-c", probe], "import", 60, cwd="/", env=env).stdout.split()
    site = venv.resolve() / "lib"
    assert [Path(w).is_relative_to(site) for w in where] == [True, True, True], where
    assert where[1].endswith("argus/_data/bpf") and where[2].endswith("argus/_data/cuda_probes")

    cache = tmp_path / "xdg-cache"
    rec = tmp_path / "rec"
    demo = _run([str(venv / "bin" / "argus"), "demo", "--ranks", "2", "--steps", str(STEPS),
                 "--fault", "straggler:rank=1,factor=1.5", "--json", "-o", str(rec)],
                "argus demo", 120, cwd="/", env={**env, "XDG_CACHE_HOME": str(cache)})
    report = json.loads(demo.stdout)
    (built,) = [p for p in (cache / "argus").glob("standins-*") if p.is_dir()]

    assert report["steps"]["detected"] and report["steps"]["count"] == STEPS
    assert [(r["rank"], r["steps"]) for r in report["ranks"]] == [(0, STEPS), (1, STEPS)]
    assert [(f["kind"], f.get("rank")) for f in report["findings"]
            if f["severity"] != "info"] == [("straggler", 1)]
    assert report["demo"]["faults"][0]["found_ranks"] == [1]
    assert report["demo"]["false_alarms"] == []

    manifest = json.loads((rec / "manifest.json").read_text())
    tgids = sorted(r["tgid"] for r in manifest["ranks"])
    assert [Path(r["exe"]).parent.parent for r in manifest["ranks"]] == [built, built]
    # every spec'd symbol of the stand-ins' libraries: attached iff the stand-in exports it
    expected = {}
    for lib in sorted((built / "stubs").glob("lib*.so.*")):
        exported = _exported(lib)
        for spec in load_specs():
            if spec.matches_file(lib.name):
                for probe_spec in spec.probes:
                    for sym in probe_spec.symbols:
                        expected[(lib.name, sym)] = "attached" if sym in exported else "missing"
    got = {(Path(p["library"]).name, p["symbol"]): p["status"] for p in manifest["probes"]}
    assert got == expected
    attached = [p for p in manifest["probes"] if p["status"] == "attached"]
    assert len(attached) > 30 and all(sorted(p["tgids"]) == tgids for p in attached)
    assert all(Path(p["library"]).parent == built / "stubs" for p in attached)
    calls = {int(t): c for t, c in manifest["call_counts"].items()}
    assert {t: calls[t]["ncclAllReduce"] for t in tgids} == {t: BUCKETS * STEPS for t in tgids}
