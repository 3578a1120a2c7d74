"""Unit tier: the daemon's config and job grouping, the live state, the metrics exposition
and `argus top` rendered at a fixed terminal size from recorded data with a frozen clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from argus.collect import identity
from argus.collect.identity import job_key
from argus.daemon.config import load_config
from argus.errors import UsageError
from argus.present.metrics import LiveCollector
from argus.present.top import RecordingReader, render

pytestmark = pytest.mark.unit
DATA = Path(__file__).resolve().parents[1] / "data"
FROZEN_NS = 1_900_000_000_000_000_000


@pytest.fixture(scope="module")
def slow_rank1():
    return RecordingReader([DATA / "ddp_gloo_slow_rank1"], now_ns=FROZEN_NS - 3_000_000_000)


def test_config_rules_and_unknown_keys(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text('[discover]\nlibraries = false\ninclude_comm = ["train*"]\n'
                   'exclude_exe = ["/opt/bad/*"]\n[output]\ninterval_s = 2\n')
    c = load_config(cfg, window_s=30)
    assert (c.interval_s, c.window_s, c.libraries) == (2, 30, False)
    assert c.wants("trainer", "/usr/bin/python3", training=False)
    assert not c.wants("trainer", "/opt/bad/python3", training=True)  # exclusion wins
    assert not c.wants("bash", "/bin/bash", training=True)  # libraries = false
    assert load_config(None).wants("python3", "/usr/bin/python3", training=True)
    cfg.write_text("[discover]\ninclud_comm = []\n")
    with pytest.raises(UsageError, match="includ_comm"):
        load_config(cfg)
    cfg.write_text("[output]\ninterval_s = -1\n")
    with pytest.raises(UsageError, match="interval_s"):
        load_config(cfg)


def test_job_grouping_never_mixes_jobs(tmp_path):
    fake = tmp_path / "proc"
    (fake / "7").mkdir(parents=True)
    (fake / "7" / "cgroup").write_text("0::/kubepods/pod-a/c1\n")
    assert job_key(7, {"SLURM_JOB_ID": "42", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"},
                   str(fake)) == "slurm-42"
    a = job_key(7, {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"},
                str(fake))
    b = job_key(7, {"MASTER_ADDR": "n1", "MASTER_PORT": "29501"}, str(fake))
    assert a.startswith("master-n1-29500") and b.startswith("master-n1-29501") and a != b
    assert job_key(7, {"TORCHELASTIC_RUN_ID": "r1"}, str(fake)).startswith("torchelastic-r1")
    assert job_key(7, {"POD_NAME": "w-0", "POD_NAMESPACE": "ml"}, str(fake)) == "pod-ml-w-0"
    assert job_key(7, {}, str(fake)) == "cgroup-kubepods_pod-a_c1"
    assert job_key(8, {}, str(fake)) == "pid-8"


def _fake_proc(root, tgid: int, ppid: int, env: dict[str, str], start: int = 1000) -> None:
    d = root / str(tgid)
    d.mkdir(parents=True)
    rest = " ".join(["0"] * 17 + [str(start)] + ["0"] * 10)  # field 22 is the start time
    (d / "stat").write_text(f"{tgid} (x) S {ppid} {rest}\n")
    (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
    (d / "cgroup").write_text("0::/user.slice/session-3.scope\n")  # shared by the session


def test_ranks_of_a_plain_launcher_are_one_job_and_two_launchers_two(tmp_path):
    """A shell loop `RANK=$r WORLD_SIZE=4 LOCAL_RANK=$r sim &` (no MASTER_*, no scheduler):
    the ranks' one shared thing is the launcher; a wrapper with the same RANK (bash -c) is
    seen through; a second launcher in the same login session is a second job."""
    fake = tmp_path / "proc"
    _fake_proc(fake, 100, 1, {}, start=500)  # launcher A (bash, no rank)
    _fake_proc(fake, 200, 1, {}, start=600)  # launcher B
    for r in range(4):
        _fake_proc(fake, 110 + r, 100, {"RANK": str(r), "WORLD_SIZE": "4", "LOCAL_RANK": str(r)})
    _fake_proc(fake, 120, 100, {"RANK": "0"})  # wrapper: bash -c '... python'
    _fake_proc(fake, 121, 120, {"RANK": "0"})  # its rank
    _fake_proc(fake, 210, 200, {"OMPI_COMM_WORLD_RANK": "0"})
    _fake_proc(fake, 300, 1, {"RANK": "0"})  # started by init: no launcher to share
    keys = {t: job_key(t, identity.rank_identity(t, fake)["env"], str(fake))
            for t in (110, 111, 112, 113, 121, 210, 300)}
    assert {keys[t] for t in (110, 111, 112, 113, 121)} == {"launcher-100-500"}
    assert keys[210] == "launcher-200-600"
    assert keys[300] == "cgroup-user.slice_session-3.scope"


def test_top_renders_the_straggler_at_a_fixed_size(slow_rank1):
    state = slow_rank1.read()
    console = Console(width=120, height=30, record=True, force_terminal=False, color_system=None)
    console.print(render(state, sort="rank", now_ns=FROZEN_NS))
    text = console.export_text()
    lines = text.splitlines()
    assert "updated 3 s ago" in lines[0] and "jobs 1" in lines[0]
    rows = {int(ln.split()[0]): ln for ln in lines if ln.strip()[:1].isdigit()
            and len(ln.split()) > 5}
    assert sorted(rows) == [0, 1, 2]
    assert "STRAGGLER" in rows[1] and "STRAGGLER" not in rows[0] + rows[2]
    assert "allreduce" in rows[1]
    assert max(len(ln) for ln in lines) <= 120
    # sorted by lateness, descending: the straggler first
    console = Console(width=120, record=True, force_terminal=False, color_system=None)
    console.print(render(state, sort="late", reverse=True, now_ns=FROZEN_NS))
    first = next(ln for ln in console.export_text().splitlines() if ln.strip()[:1].isdigit()
                 and len(ln.split()) > 5)
    assert first.split()[0] == "1"


def test_top_highlights_a_hang():
    state = {"host": "h", "now_ns": FROZEN_NS, "jobs": [{"job": "j", "steps": {}, "findings": [
        {"kind": "collective_hang", "severity": "critical", "summary": "Hang at allreduce seq 9"}],
        "ranks": [{"rank": 0, "tgid": 10, "hang": True, "hang_waited_s": 12.5},
                  {"rank": 1, "tgid": 11, "hang": False}]}]}
    console = Console(width=100, record=True, force_terminal=False, color_system=None)
    console.print(render(state, now_ns=FROZEN_NS))
    text = console.export_text()
    assert "CRITICAL: Hang at allreduce seq 9" in text
    assert "HANG 12.5s" in next(ln for ln in text.splitlines() if ln.strip().startswith("0 "))


def test_metrics_exposition_is_bounded(slow_rank1):
    state = dict(slow_rank1.read(), targets=3, uprobes=40, drops={"call_ringbuf": 0},
                 flush_s=0.25)
    reg = CollectorRegistry()
    reg.register(LiveCollector(lambda: state))
    text = generate_latest(reg).decode()
    job = state["jobs"][0]["job"]
    assert f'argus_straggler_score{{host="vm",job_id="{job}",rank="1"}}' in text
    score1 = float(text.split(f'argus_straggler_score{{host="vm",job_id="{job}",rank="1"}} ')[1]
                   .split()[0])
    assert score1 > 0
    assert f'argus_straggler_score{{host="vm",job_id="{job}",rank="0"}} 0.0' in text
    assert 'argus_drops_total{host="vm",kind="call_ringbuf"} 0.0' in text
    assert 'argus_analysis_seconds{host="vm"} 0.25' in text
    labels = set()
    for line in text.splitlines():
        if line.startswith("argus_") and "{" in line:
            labels |= {kv.split("=")[0] for kv in line.split("{")[1].split("}")[0].split(",")}
    assert labels == {"host", "job_id", "rank", "kind"}


def test_sighup_reload_applies_a_good_config_and_keeps_the_old_on_a_bad_one(tmp_path):
    from argus.daemon.service import Daemon, DaemonOptions

    cfg = tmp_path / "d.toml"
    cfg.write_text("[output]\ninterval_s = 2\nmax_disk_mb = 50\n")
    d = Daemon(DaemonOptions(output=tmp_path / "out", metrics_addr=None, config_path=cfg))
    assert (d.config.interval_s, d.config.max_disk_mb) == (2, 50)
    cfg.write_text("[output]\ninterval_s = 5\nmax_disk_mb = 10\n")
    d.request_reload()  # what SIGHUP does
    d._do_reload()
    assert (d.config.interval_s, d.config.max_disk_mb) == (5, 10)
    assert d.scanner.config is d.config
    cfg.write_text("[output]\ninterval_s = -3\n")  # invalid: rejected, the old one stays
    d._do_reload()
    assert (d.config.interval_s, d.config.max_disk_mb) == (5, 10)
    assert "keeping the previous config" in d.errors[-1]


def test_disk_budget_removes_the_oldest_segments_first(tmp_path):
    import os

    from argus.daemon.service import JOBS_DIR, Daemon, DaemonOptions

    cfg = tmp_path / "d.toml"
    cfg.write_text("[output]\nmax_disk_mb = 1\n")
    d = Daemon(DaemonOptions(output=tmp_path / "out", metrics_addr=None, config_path=cfg))
    segs = []
    for i, job in enumerate(["job-a", "job-b", "job-a", "job-b", "job-a"]):
        seg = tmp_path / "out" / JOBS_DIR / job / f"{1000 + i}"
        seg.mkdir(parents=True)
        (seg / "data").write_bytes(b"x" * 300_000)  # 5 x 300 kB against a 1 MiB budget
        os.utime(seg, ns=(i * 10**9, i * 10**9))
        segs.append(seg)
    d._enforce_budget()
    # 1.5 MB -> at most 1 MiB: the two oldest go, the three newest stay
    assert [s.exists() for s in segs] == [False, False, True, True, True]
    d.config.max_disk_mb = 0.01  # far below one segment: only the newest one is kept
    d._enforce_budget()
    assert [s.exists() for s in segs] == [False, False, False, False, True]
    assert not (tmp_path / "out" / JOBS_DIR / "job-b").exists()  # empty job dirs removed


def test_top_shows_a_job_traced_but_not_analysed_yet():
    from argus.present.live import node_state, pending_view

    state = node_state("h", [pending_view("j", "h", [{"rank": 0, "tgid": 10, "probes": 9},
                                                     {"rank": 1, "tgid": 11, "probes": 9}])],
                       FROZEN_NS)
    console = Console(width=100, record=True, force_terminal=False, color_system=None)
    console.print(render(state, now_ns=FROZEN_NS))
    lines = console.export_text().splitlines()
    assert "job j: 2 ranks, step p50 - ms  (traced, not analysed yet)" in lines
    rows = [ln.split() for ln in lines if ln.strip()[:1].isdigit()]
    assert rows == [["0", "10", *["-"] * 7], ["1", "11", *["-"] * 7]]
