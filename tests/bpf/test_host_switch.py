"""The host channel's sched_switch program (host.bpf.c) on real processes: the off-CPU stack
of a traced thread (argus_offcpu_record): a thread that blocks again and again at one site
keeps the stacks of its first block there (only its time moves: the walks are skipped), and
one that then blocks somewhere else gets that new site's stacks at once; and the on-CPU time
it sums per traced process (the clock read only where a traced thread's slice begins or
ends) against the kernel's own account of that process's CPU time."""

from __future__ import annotations

import ctypes as ct
import os
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from argus.collect import abi
from argus.collect.bcc_adapter import BpfSession
from argus.collect.channels.host import host_tracepoint_plan
from argus.collect.tracer import BPF_DIR

pytestmark = pytest.mark.bpf

# Blocks in select() 400 times (one site), says so, then blocks in read() on stdin (another).
CHILD = """
import os, select, sys
print("looping", flush=True)
for _ in range(400):
    select.select([], [], [], 0.002)
print("reading", flush=True)
os.read(0, 1)
"""


def _session() -> BpfSession:
    cflags, status = host_tracepoint_plan()
    if status.get("sched:sched_switch") != "ok":
        pytest.skip(f"sched:sched_switch: {status.get('sched:sched_switch')}")
    return BpfSession([str(BPF_DIR / f) for f in ("argus.bpf.c", "proc.bpf.c", "host.bpf.c")],
                      [f"-I{BPF_DIR}", "-DARGUS_BPF", "-DARGUS_CALL_PAGES=16", *cflags])


def _kernel_frames(s: BpfSession, e) -> list[str]:
    return [s.ksym(a) for a in list(e.kernel)[: max(0, e.kernel_len) // 8] if a]


@contextmanager
def _switches_of(script: str):
    """A BPF session with the switch program attached and a Python child running `script`
    (stdin and stdout piped); both gone afterwards."""
    s = _session()
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        s.attach_tracepoint("sched:sched_switch", "argus_host_switch")
        yield s, child
    finally:
        child.kill()
        child.wait()
        s.close()


def _trace(s: BpfSession, pid: int) -> None:
    s.table("watched")[ct.c_uint32(pid)] = ct.c_uint32(abi.W_TRACE)


def test_a_thread_blocking_at_one_site_keeps_its_stack_and_a_new_site_is_walked():
    with _switches_of(CHILD) as (s, child):
        _trace(s, child.pid)
        assert child.stdout.readline().strip() == "looping"
        offcpu = s.table("offcpu")
        seen = []  # (ts_ns, stack_ns, kernel frames) of the child's main thread while it loops
        deadline = time.monotonic() + 30.0
        while len(seen) < 20 and time.monotonic() < deadline:
            e = offcpu.get(ct.c_uint32(child.pid))
            if e is not None:
                seen.append((e.ts_ns, e.stack_ns, _kernel_frames(s, e)))
            time.sleep(0.005)
        assert len(seen) == 20
        reused = [x for x in seen if x[1] < x[0]]
        # within the loop most blocks are at the site of the one before: the stacks were
        # walked once, earlier than the block they describe
        assert len(reused) >= 10, seen
        assert all(any("select" in f for f in k) for _t, _s, k in reused), reused[:3]
        assert len({st for _t, st, _k in reused}) <= 2  # one walk (or one rewalk after 1 s)
        assert child.stdout.readline().strip() == "reading"
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            e = offcpu.get(ct.c_uint32(child.pid))
            frames = _kernel_frames(s, e) if e is not None else []
            if any("pipe_read" in f or "anon_pipe_read" in f for f in frames):
                break
            time.sleep(0.01)
        assert any("pipe_read" in f for f in frames), frames
        assert not any("select" in f for f in frames), frames
        assert e.stack_ns == e.ts_ns  # a new site: walked at this very block


# Two threads, each 40 rounds of ~5 ms busy then 1 ms asleep (80 slices at least), then wait.
BUSY = """
import os, sys, threading, time
def work():
    for _ in range(40):
        t = time.thread_time() + 0.005
        while time.thread_time() < t:
            pass
        time.sleep(0.001)
print("ready", flush=True)
sys.stdin.readline()
ts = [threading.Thread(target=work) for _ in range(2)]
for t in ts: t.start()
for t in ts: t.join()
print("done", flush=True)
sys.stdin.readline()
"""


def _cpu_ns(pid: int) -> int:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def test_on_cpu_time_of_a_traced_process_matches_the_kernels_account():
    with _switches_of(BUSY) as (s, child):
        assert child.stdout.readline().strip() == "ready"
        _trace(s, child.pid)
        before = _cpu_ns(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        spent = _cpu_ns(child.pid) - before
        got = [(int(v.count), int(v.total_ns)) for k, v in s.items("host_counts")
               if k.kind == abi.HOST_ON_CPU and k.tgid == child.pid]
        assert len(got) == 1, got
        slices, on_cpu = got[0]
        assert slices >= 80  # every busy slice of both threads ended in a switch
        # the kernel's account is in clock ticks (10 ms here): 0.4 s of work, within 15 %
        assert spent >= 350_000_000
        assert 0.85 * spent <= on_cpu <= 1.15 * spent, (on_cpu, spent)
