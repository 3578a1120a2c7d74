"""HostChannel's off-CPU rows: one row per blocked traced thread per drain, its stacks named
once per walk (a thread still blocked where the last drain saw it is not symbolised again)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from argus.collect import abi
from argus.collect.channels.host import HostChannel
from argus.collect.tracer import TraceOptions

pytestmark = pytest.mark.unit


class FakeSession:
    def __init__(self):
        self.offcpu: dict[int, abi.OffCpu] = {}
        self.deleted: list[int] = []

    def items(self, name):
        assert name == "offcpu"
        return list(self.offcpu.items())  # as BpfSession.items: scalar keys are ints

    def delete_keys(self, name, keys):
        self.deleted += keys
        for k in keys:
            self.offcpu.pop(k, None)

    def ksym(self, addr):
        return f"k{addr:x}"


class CountingSymbolizer:
    def __init__(self):
        self.asked: list[int] = []

    def frame(self, tgid, addr):
        self.asked.append(addr)
        return f"f{addr:x}", "libx.so"

    def symbolize(self, tgid, addr):
        return "python", None


def entry(tgid: int, walked_ns: int, site: int, user: list[int]) -> abi.OffCpu:
    e = abi.OffCpu(ts_ns=walked_ns, tgid=tgid, user_len=8 * len(user), kernel_len=8,
                   scan_len=0, comm=b"worker", site=site, stack_ns=walked_ns)
    for i, a in enumerate(user):
        e.user[i] = a
    e.kernel[0] = 0xFFFF0001
    return e


@pytest.fixture
def host(tmp_path):
    def state(tid: int, letter: str):
        d = tmp_path / "100" / "task" / str(tid)
        d.mkdir(parents=True, exist_ok=True)
        (d / "stat").write_text(f"{tid} (worker) {letter} 1 2 3\n")

    tracer = SimpleNamespace(opts=TraceOptions(proc_root=str(tmp_path)), session=FakeSession(),
                             symbolizer=CountingSymbolizer(), stack_rows=[],
                             ctx=SimpleNamespace(rank_of={100: 0}))
    ch = HostChannel(tracer)
    return ch, tracer, state


def test_a_thread_still_blocked_at_the_same_walk_is_named_once(host):
    ch, tr, state = host
    state(101, "S")
    state(102, "S")
    tr.session.offcpu = {101: entry(100, 1_000, 7, [0x10, 0x20]), 102: entry(100, 2_000, 8, [0x30])}
    for i in range(3):
        ch._offcpu_rows(start_ns=i, interval_ns=1, now_ns=10_000)
    assert len(tr.stack_rows) == 6  # one row per blocked thread per drain
    assert sorted(tr.symbolizer.asked) == [0x10, 0x20, 0x30]  # each stack named once
    rows101 = [r for r in tr.stack_rows if r["tid"] == 101]
    assert [r["functions"] for r in rows101] == [["kffff0001", "f10", "f20"]] * 3
    assert [r["blocked_ns"] for r in rows101] == [9_000] * 3


def test_a_new_walk_or_site_is_named_again_and_gone_threads_are_forgotten(host):
    ch, tr, state = host
    state(101, "S")
    tr.session.offcpu = {101: entry(100, 1_000, 7, [0x10])}
    ch._offcpu_rows(0, 1, 5_000)
    tr.session.offcpu[101] = entry(100, 3_000, 9, [0x40])  # blocked elsewhere since
    ch._offcpu_rows(1, 1, 5_000)
    assert tr.symbolizer.asked == [0x10, 0x40]
    assert tr.stack_rows[-1]["functions"] == ["kffff0001", "f40"]
    state(101, "R")  # running again: no row, nothing named
    ch._offcpu_rows(2, 1, 5_000)
    assert len(tr.stack_rows) == 2 and tr.symbolizer.asked == [0x10, 0x40]
    shutil.rmtree(f"{tr.opts.proc_root}/100/task/101")  # it exits: its entry and name go
    ch._offcpu_rows(3, 1, 5_000)
    assert tr.session.deleted == [101] and ch._frames == {}
