"""The host channel's off-CPU stack of a traced thread (host.bpf.c argus_offcpu_record) on a
real process: a thread that blocks again and again at one site keeps the stacks of its first
block there (only its time moves: the walks are skipped), and one that then blocks somewhere
else gets that new site's stacks at once."""

from __future__ import annotations

import ctypes as ct
import subprocess
import sys
import time

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


def _kernel_frames(s: BpfSession, e) -> list[str]:
    return [s.ksym(a) for a in list(e.kernel)[: max(0, e.kernel_len) // 8] if a]


def test_a_thread_blocking_at_one_site_keeps_its_stack_and_a_new_site_is_walked():
    cflags, status = host_tracepoint_plan()
    if status.get("sched:sched_switch") != "ok":
        pytest.skip(f"sched:sched_switch: {status.get('sched:sched_switch')}")
    s = BpfSession([str(BPF_DIR / f) for f in ("argus.bpf.c", "proc.bpf.c", "host.bpf.c")],
                   [f"-I{BPF_DIR}", "-DARGUS_BPF", "-DARGUS_CALL_PAGES=16", *cflags])
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        s.attach_tracepoint("sched:sched_switch", "argus_host_switch")
        s.table("watched")[ct.c_uint32(child.pid)] = ct.c_uint32(abi.W_TRACE)
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
    finally:
        child.kill()
        child.wait()
        s.close()
