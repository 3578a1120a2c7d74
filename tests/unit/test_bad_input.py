"""Bad input, tried systematically (hypothesis): recordings, summaries, daemon segments, configs.

Every example starts from a real recording of tests/data, written again by today's writer
(`write_recording`: its manifest records each file's size and SHA-256; the summaries by
`write_summaries` likewise), damages one file (truncated at any byte, bytes flipped, random
bytes, non-UTF-8, valid JSON of the wrong shape, a valid parquet file with a column missing,
of the wrong type or with nulls, zero rows, no columns; such a valid file mostly recorded in
the manifest as its writer would, else the checksum alone rejects it) or the daemon's folder
layout, and runs the real CLI (`argus.cli.main`). A recording as older versions wrote it
(no checksums) is damaged only by valid files and JSON: a damaged page header can make
polars abort the process, which only the checksum prevents (`test_a_damaged_page_header`).

The oracle is the loader: when `load_recording` / `load_summaries` / `expand_dirs` reject
the damaged input, the command must exit with that error's code (1, or 2 for usage) and print
one `argus: ...` sentence (plus at most one indented remedy line), nothing on stdout, no
traceback, and leave every file as it was (no output file, no summaries folder, no .tmp
file). When they accept it, the command must succeed with a complete output: the analysis
never sees input the loader let through and then fails on it.

The daemon config parser (`load_config`) is checked against a model of the documented rules
over generated TOML: every failure is a UsageError naming the file and the key in one
sentence, every success has the declared types, numbers finite and positive; `argus daemon
--config` exits 2 on a bad file before anything is created (only bad configs go through the
CLI: a good one would start tracing).

Bounded (fixed example counts, derandomized, no deadline) so that the module runs in a few
tens of seconds on two cores, the same examples on every run.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from argus.analyze.compress import build_summaries
from argus.cli import main
from argus.daemon.config import MAX_SECONDS, DaemonConfig, load_config
from argus.errors import ArgusError, UsageError
from argus.recording import schema
from argus.recording.io import file_digest, load_recording, write_recording
from argus.recording.segments import JOBS, expand_dirs
from argus.recording.summaries import (
    DIR,
    MAX_PARTITION_S,
    MIN_PARTITION_S,
    Summaries,
    has_events,
    has_summaries,
    load_summaries,
    write_summaries,
)

pytestmark = pytest.mark.unit
DATA = Path(__file__).resolve().parents[1] / "data"


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# -- the valid inputs every example starts from --------------------------------------------


def _pystacks(tgids: list[int]) -> pl.DataFrame:
    """A valid pystacks.parquet (no recording of tests/data has one): one thread per tgid."""
    rows = [{"ts_ns": 25_000_000_000, "tgid": t, "tid": t, "rank": i, "thread": "MainThread",
             "state": "sleeping", "wchan": "futex_wait_queue", "functions": ["wait", "main"],
             "files": ["train.py", None], "lines": [12, None], "kinds": ["python", "native"]}
            for i, t in enumerate(tgids)]
    return pl.DataFrame(rows, schema=schema.PYSTACKS_SCHEMA)


def _rewrite(d: Path) -> Path:
    """`d` as today's writer writes it (the manifest records every file's size and SHA-256)."""
    rec = load_recording(d)
    man = {k: v for k, v in rec.manifest.items() if k != schema.FILES}
    write_recording(d, man, rec.events, rec.stacks,
                    gpu=rec.gpu if (d / schema.GPU).exists() else None,
                    host=rec.host_ctx if (d / schema.HOST).exists() else None,
                    pystacks=rec.pystacks if (d / schema.PYSTACKS).exists() else None)
    return d


def _with_summaries(d: Path, raw: bool) -> Path:
    write_summaries(d, build_summaries([load_recording(d)]))
    if not raw:
        for f in (schema.EVENTS, schema.STACKS, schema.GPU, schema.HOST, schema.PYSTACKS):
            (d / f).unlink(missing_ok=True)
    return d


def _daemon_output(out: Path, src: Path) -> Path:
    """OUTPUT/jobs/job-a/<end ns>/{manifest.json, summaries/}: `src`'s summaries cut in two
    segments, laid out as `argus daemon` writes them."""
    whole = build_summaries([load_recording(src)])
    cut = int(whole.steps["step"].median())
    manifest = json.loads((src / schema.MANIFEST).read_text())
    manifest.pop(schema.FILES, None)  # the daemon's segments hold no raw files
    for i, sel in enumerate((pl.col("step") < cut, pl.col("step") >= cut)):
        steps = whole.steps.filter(sel)
        seg = out / JOBS / "job-a" / str(int(steps["end_ns"].max()))
        write_summaries(seg, Summaries(meta=dict(whole.meta), steps=steps,
                                       stack_dict=whole.stack_dict, tail=whole.tail,
                                       manifest=manifest, gpu=whole.gpu,
                                       host_ctx=whole.host_ctx))
        (seg / schema.MANIFEST).write_text(json.dumps(dict(manifest, started_ns=1000 + i)))
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """name -> a valid input directory (never modified: examples work on copies)."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, src in (("hang", "synthetic_hang"), ("host", "ddp_gloo_healthy"),
                      ("gpu", "sim_bubble")):
        out[name] = Path(shutil.copytree(DATA / src, root / name))
    man = json.loads((out["hang"] / schema.MANIFEST).read_text())
    _pystacks([r["tgid"] for r in man["ranks"]]).write_parquet(out["hang"] / schema.PYSTACKS)
    out["legacy"] = Path(shutil.copytree(out["hang"], root / "legacy"))  # no checksums
    for name in ("hang", "host", "gpu"):
        _rewrite(out[name])
    out["summ_host"] = _with_summaries(Path(shutil.copytree(out["host"], root / "sh")), raw=False)
    out["summ_gpu"] = _with_summaries(Path(shutil.copytree(out["gpu"], root / "sg")), raw=True)
    out["daemon"] = _daemon_output(root / "daemon", out["host"])
    for d in out.values():  # the starting points are valid, else no example means anything
        assert _expected("report", d) == 0, d
    return out


# -- running the CLI and judging its output ----------------------------------------------


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` -> its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def _cli(cap, *args: str) -> tuple[int, str, str]:
    cap.readouterr()
    rc = main(list(args))  # anything but an ArgusError propagates: the test fails on it
    got = cap.readouterr()
    return rc, got.out, got.err


def _one_sentence(err: str) -> str:
    """`err` is `argus: <sentence>` plus at most one indented remedy line; returns the sentence."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith("argus: ") and len(lines[0]) > len("argus: "), err
    assert lines[0].endswith("."), err
    if len(lines) == 2:
        assert lines[1].startswith("  ") and lines[1].strip(), err
    return lines[0][len("argus: "):]


def _command(cmd: str, d: Path, out: Path) -> list[str]:
    if cmd == "export":
        return ["export", str(d), "-f", "chrome", "-o", str(out)]
    return [*cmd.split()[:1], str(d), *cmd.split()[1:]]


def _expected(cmd: str, d: Path) -> int:
    """What the loaders say about `d` for `cmd`: 0 (loads) or the exit code of their error."""
    try:
        if cmd.startswith(("export", "summarize")):
            load_recording(d)
            return 0
        paths = expand_dirs([d])
        summ = "--from-summaries" in cmd or any(has_summaries(p) and not has_events(p)
                                                for p in paths)
        for p in paths:
            load_summaries(p) if summ and has_summaries(p) else load_recording(p)
    except ArgusError as err:
        return err.exit_code
    return 0


def _check(cap, cmd: str, d: Path, root: Path) -> int:
    """Run `cmd` on `d` (everything of the example lives under `root`) and judge it."""
    out = root / "trace.json"
    want = _expected(cmd, d)
    before = _snapshot(root)
    rc, stdout, err = _cli(cap, *_command(cmd, d, out))
    assert "Traceback" not in stdout + err
    if want != 0:
        assert rc == want, (rc, err)
        _one_sentence(err)
        assert stdout == ""
        assert _snapshot(root) == before  # nothing written, nothing half-written
        return rc
    assert rc == 0, err
    if cmd == "report --json":
        assert err == ""
        obj = json.loads(stdout)
        assert stdout.count("\n") == 1 and obj["schema"] == "argus.report/1"
        assert {"ranks", "steps", "findings"} <= set(obj)
    elif cmd.startswith("report"):
        assert err == "" and "rank(s)" in stdout.splitlines()[0] and "Ranks" in stdout
    elif cmd == "export":
        trace = json.loads(out.read_text())
        assert stdout == ""
        assert re.fullmatch(rf"argus: wrote {len(trace['traceEvents'])} trace events to "
                            rf"{re.escape(str(out))} \([\d.]+ [kMG]?B, chrome, [\d.]+ s\)\n",
                            err), err
        assert _snapshot(root).keys() - before.keys() == {out.name}
    else:  # summarize
        assert stdout == "" and err.startswith(f"argus: {d / DIR}: ") and err.count("\n") == 1
        s = load_summaries(d)
        assert s.meta["bytes"] == {f: (d / DIR / f).stat().st_size for f in s.meta["bytes"]}
        assert not [p for p in d.rglob("*") if p.name.endswith(".tmp")]
    if cmd.startswith("report"):
        assert _snapshot(root) == before  # report never writes
    return rc


@contextmanager
def _example(base: Path):
    """A private copy of `base` for one example: (root, copy)."""
    root = Path(tempfile.mkdtemp(prefix="argus-bad-"))
    try:
        yield root, Path(shutil.copytree(base, root / base.name))
    finally:
        shutil.rmtree(root)


# -- damage -------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)
OFFSET = st.integers(0, 2**20)  # taken modulo the file size


def _json_paths(doc, prefix=()) -> list[tuple]:
    """Every key path of a JSON document, down to three levels."""
    out = [prefix] if prefix else []
    if len(prefix) < 3:
        items = doc.items() if isinstance(doc, dict) else (
            enumerate(doc[:2]) if isinstance(doc, list) else ())
        for k, v in items:
            out += _json_paths(v, (*prefix, k))
    return out


def _json_damage(data, p: Path) -> tuple:
    raw = p.read_bytes()
    kind = data.draw(st.sampled_from(["truncate", "bytes", "nonutf8", "doc", "set", "del"]))
    if kind == "truncate":
        n = data.draw(OFFSET) % len(raw)
        p.write_bytes(raw[:n])
        return kind, n
    if kind == "bytes":
        b = data.draw(st.binary(max_size=40))
        p.write_bytes(b)
        return kind, b
    if kind == "nonutf8":
        n = data.draw(OFFSET) % len(raw)
        p.write_bytes(raw[:n] + b"\xff\xfe" + raw[n:])
        return kind, n
    doc = json.loads(raw)
    if kind == "doc":
        new = data.draw(JSON)
        p.write_text(json.dumps(new))
        return kind, new
    path = data.draw(st.sampled_from(_json_paths(doc)))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if kind == "del":
        del parent[path[-1]]
        p.write_text(json.dumps(doc))
        return kind, path
    value = data.draw(JSON)
    parent[path[-1]] = value
    p.write_text(json.dumps(doc))
    return kind, path, value


RETYPE = {
    "text": lambda c, h: pl.lit("x"),
    "numeric text": lambda c, h: c.cast(pl.Utf8) if not h.is_nested() else pl.lit("1"),
    "int": lambda c, h: pl.lit(7, pl.Int64),
    "negative": lambda c, h: pl.lit(-3, pl.Int64),
    "float": lambda c, h: pl.lit(1.5),
    "nan": lambda c, h: pl.lit(float("nan")),
    "bool": lambda c, h: pl.lit(True),
    "null": lambda c, h: pl.lit(None),
    "typed null": lambda c, h: pl.lit(None).cast(pl.Int64),
    "int list": lambda c, h: pl.lit([1, 2]),
    "text list": lambda c, h: pl.lit(["a", "b"]),
    "struct": lambda c, h: pl.struct(a=pl.lit(1)),
    "huge": lambda c, h: pl.lit(2**63 - 1, pl.Int64),
    "uint": lambda c, h: pl.lit(2**64 - 1, pl.UInt64),
}


def _resign(p: Path) -> None:
    """Record the parquet file `p` where its writer records it (the manifest's `files`, or
    meta.json's `bytes` and `sha256`), as if it had written it."""
    digest = file_digest(p.read_bytes())
    if p.parent.name == DIR:
        mp = p.parent / "meta.json"
        meta = json.loads(mp.read_text())
        meta.setdefault("bytes", {})[p.name] = digest["bytes"]
        meta.setdefault("sha256", {})[p.name] = digest["sha256"]
        mp.write_text(json.dumps(meta))
        return
    mp = p.parent / schema.MANIFEST
    man = json.loads(mp.read_text())
    if schema.FILES in man:
        man[schema.FILES][p.name] = digest
        mp.write_text(json.dumps(man))


def _parquet_damage(data, p: Path, bytes_too: bool = True) -> tuple:
    """Damage parquet file `p`: its bytes (`bytes_too`) or, by a valid parquet file, its
    content; a valid file is mostly recorded as its writer would (`_resign`)."""
    out = _parquet_content(data, p, bytes_too)
    if out[0] in FRAME_KINDS and data.draw(st.integers(0, 3)) > 0:
        _resign(p)
        return *out, "recorded"
    return out


FRAME_KINDS = ("no columns", "rows", "drop", "retype")


def _parquet_content(data, p: Path, bytes_too: bool) -> tuple:
    raw = p.read_bytes()
    kinds = ["truncate", "flip", "bytes", "empty"] * bytes_too + list(FRAME_KINDS)
    kind = data.draw(st.sampled_from(kinds))
    if kind == "truncate":
        n = data.draw(OFFSET) % len(raw)
        p.write_bytes(raw[:n])
        return kind, n
    if kind == "flip":
        flips = data.draw(st.lists(st.tuples(OFFSET, st.integers(1, 255)), min_size=1,
                                   max_size=4))
        b = bytearray(raw)
        for pos, x in flips:  # the middle: the 4-byte magic at either end is a truncation case
            i = 4 + pos % max(1, len(b) - 8)
            b[i] ^= x
        p.write_bytes(bytes(b))
        return kind, flips
    if kind == "bytes":
        b = data.draw(st.binary(max_size=64))
        p.write_bytes(b)
        return kind, b
    if kind == "empty":
        p.write_bytes(b"")
        return (kind,)
    df = pl.read_parquet(p)
    if kind == "no columns":
        pl.DataFrame().write_parquet(p)
        return (kind,)
    if kind == "rows":
        n = data.draw(st.integers(0, 3))
        df.head(n).write_parquet(p)
        return kind, n
    col = data.draw(st.sampled_from(df.columns))
    if kind == "drop":
        df.drop(col).write_parquet(p)
        return kind, col
    how = data.draw(st.sampled_from(sorted(RETYPE)))
    df.with_columns(RETYPE[how](pl.col(col), df.schema[col]).alias(col)).write_parquet(p)
    return kind, col, how


def _damage(data, d: Path, bytes_too: bool = True) -> tuple:
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    rel = data.draw(st.sampled_from(files))
    if rel.endswith(".json"):
        return rel, *_json_damage(data, d / rel)
    return rel, *_parquet_damage(data, d / rel, bytes_too)


# -- recordings, summaries, segments through the CLI -------------------------------------

RAW_COMMANDS = ["report", "report --json", "report --from-summaries", "export", "summarize"]


@_settings(120)
@given(data=st.data(), base=st.sampled_from(["hang", "host", "gpu", "legacy"]),
       cmd=st.sampled_from(RAW_COMMANDS))
def test_damaged_recording(bases, capfd, data, base, cmd):
    with _example(bases[base]) as (root, d):
        _damage(data, d, bytes_too=base != "legacy")
        event(f"exit {_check(capfd, cmd, d, root)}")  # --hypothesis-show-statistics


@_settings(80)
@given(data=st.data(), base=st.sampled_from(["summ_host", "summ_gpu"]),
       cmd=st.sampled_from(["report", "report --json", "report --from-summaries",
                            "summarize"]))
def test_damaged_summaries(bases, capfd, data, base, cmd):
    with _example(bases[base]) as (root, d):
        files = sorted(str(p.relative_to(d)) for p in (d / DIR).iterdir())
        rel = data.draw(st.sampled_from(files))
        (_json_damage if rel.endswith(".json") else _parquet_damage)(data, d / rel)
        event(f"exit {_check(capfd, cmd, d, root)}")  # --hypothesis-show-statistics


LAYOUT = ["second job", "empty jobs", "jobs is a file", "segment without meta",
          "segment is a file", "stray file", "empty segment", "named segment", "no jobs",
          "missing dir", "file for dir"]


def _layout_damage(kind: str, out: Path) -> Path:
    """Damage the daemon output `out`; returns the directory to give `argus report`."""
    job = out / JOBS / "job-a"
    segs = sorted(job.iterdir())
    if kind == "second job":
        shutil.copytree(job, out / JOBS / "job-b")
    elif kind == "empty jobs":
        shutil.rmtree(out / JOBS)
        (out / JOBS).mkdir()
    elif kind == "jobs is a file":
        shutil.rmtree(out / JOBS)
        (out / JOBS).write_text("x")
    elif kind == "segment without meta":
        (segs[0] / DIR / "meta.json").unlink()
    elif kind == "segment is a file":
        shutil.rmtree(segs[1])
        segs[1].write_text("x")
    elif kind == "stray file":
        (job / "notes.txt").write_text("x")
    elif kind == "empty segment":
        (job / "123").mkdir()
    elif kind == "named segment":
        segs[0].rename(job / "latest")
    elif kind == "no jobs":
        shutil.rmtree(out / JOBS)
    elif kind == "missing dir":
        shutil.rmtree(out)
    elif kind == "file for dir":
        shutil.rmtree(out)
        out.write_text("x")
    return out


@_settings(50)
@given(data=st.data(), cmd=st.sampled_from(["report", "report --json"]),
       where=st.sampled_from(["output", "job", "segment"]))
def test_damaged_daemon_segments(bases, capfd, data, cmd, where):
    with _example(bases["daemon"]) as (root, out):
        if data.draw(st.booleans()):
            _layout_damage(data.draw(st.sampled_from(LAYOUT)), out)
        else:
            _damage(data, out)
        job = out / JOBS / "job-a"
        target = {"output": out, "job": job,
                  "segment": min(job.iterdir()) if job.is_dir() and any(job.iterdir())
                  else job}[where]
        event(f"exit {_check(capfd, cmd, target, root)}")


def test_the_layouts_are_told_apart(bases, capfd):
    """The layout damages above do not all fall into one error (else the test is moot)."""
    seen = {}
    for kind in LAYOUT:
        with _example(bases["daemon"]) as (root, out):
            seen[kind] = _check(capfd, "report --json", _layout_damage(kind, out), root)
    assert seen == {"second job": 2, "empty jobs": 1, "jobs is a file": 1,
                    "segment without meta": 0, "segment is a file": 0, "stray file": 0,
                    "empty segment": 0, "named segment": 0, "no jobs": 1, "missing dir": 1,
                    "file for dir": 1}


# Byte 14 of tests/data/synthetic_hang/events.parquet is in its first page header: xor 64
# makes polars 2.1 panic, xor 1 makes it allocate exabytes and abort the process.
PAGE_HEADER = 14


def _flipped(x: int) -> bytes:
    b = bytearray((DATA / "synthetic_hang" / schema.EVENTS).read_bytes())
    b[PAGE_HEADER] ^= x
    return bytes(b)


def test_a_polars_panic_is_one_sentence(bases, capfd):
    """A corrupt file that makes polars panic (a Rust panic, printed on fd 2, and a
    PanicException that is no Exception) in a recording without checksums."""
    try:
        pl.read_parquet(io.BytesIO(_flipped(64)))
    except pl.exceptions.PanicException:
        pass
    except Exception as err:
        pytest.skip(f"this polars raises {type(err).__name__} on the file, no panic to test")
    else:
        pytest.skip("this polars reads the damaged file")
    with _example(bases["legacy"]) as (root, d):
        (d / schema.EVENTS).write_bytes(_flipped(64))
        rc, out, err = _cli(capfd, "report", str(d))
        assert (rc, out) == (1, "")
        assert "PanicException" in _one_sentence(err) and "panicked" not in err


def test_a_damaged_page_header_is_found_before_polars_decodes_it(bases, tmp_path):
    """The flip that makes polars abort, in a recording that records its files: refused by
    its checksum, never decoded (in a child process: were it decoded, it would abort)."""
    with _example(bases["hang"]) as (root, d):
        (d / schema.EVENTS).write_bytes(_flipped(1))
        run = subprocess.run([sys.executable, "-c", "import sys; from argus.cli import main; "
                              "sys.exit(main(sys.argv[1:]))", "report", str(d)],
                             capture_output=True, text=True, timeout=120)
        assert (run.returncode, run.stdout) == (1, "")
        assert _one_sentence(run.stderr) == (
            f"{d / schema.EVENTS} is damaged: its content differs from what its writer "
            "recorded (SHA-256).")


def test_a_folder_this_user_may_not_read(bases, capfd):
    """summaries/ is 0700 (`sudo argus attach` writes it so): another user's `argus report`
    gets one sentence naming the file, not a PermissionError traceback. As root the command
    runs as nobody in a child process; otherwise the folder is made unreadable."""
    if os.geteuid() == 0:
        try:
            ok = subprocess.run([sys.executable, "-c", "import argus"], user=65534,
                                capture_output=True, timeout=60).returncode == 0
        except PermissionError:
            ok = False
        if not ok:  # e.g. a clone under a 0700 mktemp folder (../shared/tools/fresh-check)
            pytest.skip(f"nobody (uid 65534) cannot run {sys.executable}: a folder above it "
                        "is closed to other users")
    root = Path(tempfile.mkdtemp(prefix="argus-perm-"))
    try:
        d = Path(shutil.copytree(bases["summ_gpu"], root / "run"))
        for p in (root, d, *[p for p in d.iterdir() if p.name != DIR]):
            p.chmod(0o755 if p.is_dir() else 0o644)
        (d / DIR).chmod(0o700 if os.geteuid() == 0 else 0)
        args = ["report", str(d), "--from-summaries"]
        if os.geteuid() == 0:
            run = subprocess.run([sys.executable, "-c", "import sys; from argus.cli import main; "
                                  "sys.exit(main(sys.argv[1:]))", *args], user=65534,
                                 capture_output=True, text=True, timeout=120)
            rc, out, err = run.returncode, run.stdout, run.stderr
        else:
            rc, out, err = _cli(capfd, *args)
        assert (rc, out) == (1, "")
        assert _one_sentence(err) == (f"{d / DIR / 'meta.json'} cannot be read "
                                      "(Permission denied).")
    finally:
        (root / "run" / DIR).chmod(0o700)
        shutil.rmtree(root)


# -- writes that fail half-way leave nothing behind ---------------------------------------


@contextmanager
def _file_size_limit(n: int):
    """Writes past `n` bytes of any file fail with EFBIG (RLIMIT_FSIZE), like a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def _largest_write(args: list[str], d: Path, root: Path) -> int:
    """The size of the largest file `args` (on `d`, output under `root`) writes when all is
    well: run on a copy."""
    with _example(d) as (r, probe):
        args = [a.replace(str(d), str(probe)).replace(str(root), str(r)) for a in args]
        assert main(args) == 0
        made = [r / "trace.json"] if "export" in args else list((probe / DIR).iterdir())
        return max(p.stat().st_size for p in made)


@_settings(20)
@given(cmd=st.sampled_from(["summarize", "export", "resummarize"]),
       base=st.sampled_from(["hang", "host"]), frac=st.floats(0, 0.999))
def test_a_write_failing_half_way_leaves_nothing(bases, capsys, cmd, base, frac):
    src = bases["summ_host"] if cmd == "resummarize" else bases[base]
    with _example(src) as (root, d):
        if cmd == "resummarize":  # summaries only: re-summarising needs the events back
            for f in (schema.EVENTS, schema.STACKS, schema.HOST):
                shutil.copy(bases["host"] / f, d / f)
        args = _command("summarize" if cmd == "resummarize" else cmd, d, root / "trace.json")
        limit = int(frac * _largest_write(args, d, root))
        before = _snapshot(root)
        with _file_size_limit(limit):
            rc, out, err = _cli(capsys, *args)
        assert rc == 1 and out == ""
        assert "File too large" in _one_sentence(err)
        assert _snapshot(root) == before


def test_summarize_checks_every_dir_before_writing_any(bases, capfd, tmp_path):
    good = Path(shutil.copytree(bases["hang"], tmp_path / "good"))
    bad = Path(shutil.copytree(bases["host"], tmp_path / "bad"))
    (bad / schema.EVENTS).write_bytes(b"PAR1")
    before = _snapshot(tmp_path)
    rc, out, err = _cli(capfd, "summarize", str(good), str(bad))
    assert (rc, out) == (1, "")
    assert str(bad / schema.EVENTS) in _one_sentence(err)
    assert _snapshot(tmp_path) == before


def test_export_to_a_missing_folder_or_a_folder(bases, capfd, tmp_path):
    before = _snapshot(tmp_path)
    for out in (tmp_path / "no" / "trace.json", tmp_path):
        rc, stdout, err = _cli(capfd, "export", str(bases["hang"]), "-o", str(out))
        assert (rc, stdout) == (1, "")
        assert str(out) in _one_sentence(err)
    assert _snapshot(tmp_path) == before


# -- the daemon config ---------------------------------------------------------------------

SECTIONS = {
    "discover": {"libraries": "bool", "include_comm": "patterns", "include_exe": "patterns",
                 "exclude_comm": "patterns", "exclude_exe": "patterns"},
    "output": {"interval_s": "seconds", "window_s": "seconds", "max_disk_mb": "positive"},
    "diagnosis": {"hang_after_s": "seconds", "job_grace_s": "seconds"},
}
KEYS = {k: kind for sec in SECTIONS.values() for k, kind in sec.items()}
NUMBER = (st.integers(-(2**64), 2**64) | st.floats() | st.sampled_from([0, 0.0, -0.0, 1e-300,
          MAX_SECONDS, MAX_SECONDS + 1, 2**70, 10**400]))
TOML_VALUE = st.recursive(
    st.booleans() | NUMBER | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=2),
    max_leaves=4,
)
GOOD_VALUE = {
    "bool": st.booleans(),
    "patterns": st.lists(st.text(max_size=6), max_size=3),
    "seconds": st.floats(1e-6, MAX_SECONDS) | st.integers(1, MAX_SECONDS),
    "positive": st.floats(1e-6, 1e12) | st.integers(1, 10**12),
}


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else (
            repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"


@st.composite
def config_docs(draw) -> dict:
    """A config document: mostly known sections and keys with good values, some bad ones."""
    doc: dict = {}
    names = st.sampled_from([*SECTIONS, "outptu", ""]) | st.text(max_size=4)
    for sec in draw(st.lists(names, unique=True, max_size=4)):
        if draw(st.integers(0, 9)) == 0:
            doc[sec] = draw(TOML_VALUE)  # not a table
            continue
        keys = st.sampled_from([*SECTIONS.get(sec, {}), "interval", "libraries"])
        body = {}
        for key in draw(st.lists(keys | st.text(max_size=4), unique=True, max_size=4)):
            kind = SECTIONS.get(sec, {}).get(key)
            good = kind is not None and draw(st.integers(0, 2)) > 0
            body[key] = draw(GOOD_VALUE[kind] if good else TOML_VALUE)
        doc[sec] = body
    return doc


def _render(doc: dict) -> str:
    tops = [f"{json.dumps(s)} = {_toml(b)}" for s, b in doc.items() if not isinstance(b, dict)]
    tables = [f"[{json.dumps(s)}]\n" + "".join(f"{json.dumps(k)} = {_toml(v)}\n"
                                              for k, v in b.items())
              for s, b in doc.items() if isinstance(b, dict)]
    return "\n".join(tops) + "\n" + "\n".join(tables)


def _value_ok(kind: str, v) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "patterns":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        f = float(v)
    except OverflowError:
        return False
    return math.isfinite(f) and f > 0 and (kind != "seconds" or f <= MAX_SECONDS)


def _shown(name: str) -> str:
    return name if name.isprintable() else repr(name)


def _problems(data) -> list[tuple[str, ...]]:
    """What the documented rules reject in a parsed document: for each defect, the words an
    error about it must contain (the section, and the key)."""
    bad = []
    for sec, body in data.items():
        if sec not in SECTIONS or not isinstance(body, dict):
            bad.append((f"[{_shown(sec)}]",))
            continue
        for key, v in body.items():
            if key not in SECTIONS[sec] or not _value_ok(SECTIONS[sec][key], v):
                bad.append((f"[{sec}]", _shown(key)))
    return bad


FLAGS = {"interval_s": "-i/--interval", "window_s": "--window", "max_disk_mb": "--max-disk-mb"}


def _check_config(path: Path, text: str | None, overrides: dict) -> None:
    """load_config(path, **overrides) against the model: the error or the values."""
    try:
        data = tomllib.loads(text) if text is not None else None
    except tomllib.TOMLDecodeError:
        data = None
    bad = _problems(data) if data is not None else []
    bad += [(FLAGS[k],) for k, v in overrides.items() if v is not None
            and not _value_ok(KEYS[k], v)]
    try:
        cfg = load_config(path, **overrides)
    except UsageError as err:
        msg = str(err)
        assert err.exit_code == 2 and "\n" not in msg and msg.endswith("."), msg
        if data is None:  # unreadable, not UTF-8 or not TOML: the file is named
            assert str(path) in msg, msg
            return
        named = [words for words in bad if all(w in msg for w in words)]
        assert named, (msg, bad)  # only what the rules reject fails, and it is named
        if all(words[0].startswith("[") for words in named):  # a defect of the file
            assert str(path) in msg, msg
        return
    assert data is not None and not bad, (data, bad)
    want = {f: v for body in data.values() for f, v in body.items()}
    want.update({k: v for k, v in overrides.items() if v is not None})
    for name, kind in KEYS.items():
        got = getattr(cfg, name)
        default = getattr(DaemonConfig(), name)
        if kind in ("seconds", "positive"):
            assert type(got) is float and math.isfinite(got) and got > 0
            assert got == float(want.get(name, default))
        elif kind == "bool":
            assert type(got) is bool and got == want.get(name, default)
        else:
            assert type(got) is list and all(type(x) is str for x in got)
            assert got == want.get(name, default)


OVERRIDES = st.fixed_dictionaries({k: st.none() | NUMBER | st.booleans()
                                   for k in ("interval_s", "window_s", "max_disk_mb")})


@_settings(250)
@given(doc=config_docs(), overrides=OVERRIDES, cut=st.none() | st.integers(0, 400))
def test_config_file(tmp_path, doc, overrides, cut):
    text = _render(doc)
    if cut is not None:  # truncated anywhere: often invalid TOML, sometimes still valid
        text = text[:cut]
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    _check_config(path, text, overrides)


@_settings(60)
@given(raw=st.binary(max_size=60), at=st.integers(0, 200))
def test_config_bytes(tmp_path, raw, at):
    """Random bytes, and non-UTF-8 bytes inside a valid file."""
    path = tmp_path / "daemon.toml"
    for blob in (raw, b"[output]\ninterval_s = 2\n"[:at % 25] + b"\xff" + raw):
        path.write_bytes(blob)
        try:
            text = blob.decode()
        except UnicodeDecodeError:
            text = None
        _check_config(path, text, {})


def test_config_that_is_no_file(tmp_path):
    for path in (tmp_path, tmp_path / "missing.toml"):
        with pytest.raises(UsageError) as info:
            load_config(path)
        assert str(path) in str(info.value) and str(info.value).count("\n") == 0


@_settings(30)
@given(doc=config_docs(), cut=st.none() | st.integers(0, 400))
def test_daemon_exits_2_on_a_bad_config_before_creating_anything(tmp_path, capfd, doc, cut):
    text = _render(doc)[:cut]
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    try:
        load_config(path)
    except UsageError:
        pass
    else:  # a good config would start tracing: not in the unit tier
        assume(False)
    out = tmp_path / "out"
    rc, stdout, err = _cli(capfd, "daemon", "--config", str(path), "-o", str(out),
                           "--metrics-addr", "off")
    assert (rc, stdout) == (2, "")
    assert str(path) in _one_sentence(err)
    assert not out.exists()


@_settings(30)
@given(cmd=st.sampled_from(["report --json --hang-after", "summarize --partition"]),
       value=st.floats() | st.sampled_from([0.0, -0.0, 1e-300, 1e-4, 1e-3, MAX_PARTITION_S,
                                            MAX_PARTITION_S + 1, 1e300]))
def test_number_options(bases, capfd, cmd, value):
    """--hang-after and --partition: a finite positive number (--partition 1 ms to 10 years), else
    exit 2 with one sentence naming the option, before anything is read or written."""
    with _example(bases["hang"]) as (root, d):
        before = _snapshot(root)
        name, *opts = cmd.split()
        rc, out, err = _cli(capfd, name, str(d), *opts, repr(value))
        ok = math.isfinite(value) and (MIN_PARTITION_S <= value <= MAX_PARTITION_S
                                       if name == "summarize" else value > 0)
        if not ok:
            assert (rc, out) == (2, "")
            assert opts[-1] in _one_sentence(err)
            assert _snapshot(root) == before
        else:
            assert rc == 0, err
