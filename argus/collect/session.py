"""One `argus attach` session: trace until told to stop, then write the recording.

Stops on the duration, Ctrl-C (SIGINT), SIGTERM, or when every traced process has exited;
every way out still drains the kernel maps and writes a complete recording.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from argus.collect import features, procfs, pyspy_dumps
from argus.collect.channels import GpuChannel
from argus.collect.tracer import TraceOptions, Tracer
from argus.errors import OutputNotWritable, ProbeAttachFailed
from argus.recording.io import Recording
from argus.recording.parts import PART_S, PartWriter, merge_parts

PART_SLACK_S = 1.0  # no part is written this close to a -d deadline (the final flush is)
NO_RANK_WARN_S = 15.0  # launchers with no rank this long after the tracing line: one warning
TRACING_NICE = 10  # argus's priority once its probes are live: its work waits for the job's


def yield_to_the_job(nice: int = TRACING_NICE) -> dict[int, int]:
    """Lower every thread of this process to at least `nice` (Linux's nice is per thread;
    threads and processes started later inherit it). Once the probes are live argus's work
    (draining, decoding, writing parts) is never urgent, and on a node whose ranks keep the
    CPUs busy a burst of it slowed every rank: a part write 5 s into a 4-rank tp_dp job on 2
    vCPUs, steps 1.35x slower for 4 steps (a false alarm in 1 of 10 healthy runs). The BPF
    side is unaffected: it runs in the ranks' context and timestamps there. Returns
    {tid: its nice before} of the threads it lowered, for `restore_priorities`."""
    lowered: dict[int, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            now = os.getpriority(os.PRIO_PROCESS, int(tid))
            if now < nice:
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
                lowered[int(tid)] = now
        except (OSError, ValueError):  # a thread that ended meanwhile
            pass
    return lowered


def restore_priorities(lowered: dict[int, int]) -> None:
    """Give the threads `yield_to_the_job` lowered (those still alive) their nice back: a
    process that traces and goes on (`run_session` called from a test run or a notebook)
    must not run on, or start its later children, at nice 10. A test process that had
    traced once started every later job's ranks at nice 10, and on a busy machine a
    nice-0 process beside them took their CPUs (raising a priority back needs root, as
    tracing does; without it the thread keeps nice 10)."""
    alive = set(os.listdir("/proc/self/task"))
    for tid, nice in lowered.items():
        if str(tid) in alive:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError:
                pass


@dataclass
class SessionResult:
    path: Path
    manifest: dict
    recording: Recording | None = None  # what was written, in memory (no need to read it back)


def default_output_dir() -> Path:
    return Path(f"argus-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_output(path: Path) -> Path:
    """Create the output directory (0700) before anything is attached, or fail clearly."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        probe = path / ".argus-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputNotWritable(f"cannot write the recording to {path}: {e.strerror}") from e
    if (path / "manifest.json").exists():
        raise OutputNotWritable(
            f"{path} already holds a recording", remedy="Choose a new directory with -o/--output."
        )
    return path


def check_kernel_features() -> None:
    """The kernel checks of `argus doctor` (kernel config, tracefs or the uprobe PMU), a
    FAIL raised as KernelFeatureMissing (`features.require_kernel`)."""
    features.require_kernel()


def _hang_pystacks(manifest: dict, events, after_s: float | None):
    """When some rank still had a call in flight for >= after_s at the end (a likely hang),
    dump the Python stacks of every live traced rank (pystacks.parquet); else nothing (the
    dump pauses each process for a few ms, so it is taken only when it can explain a hang)."""
    if after_s is None:
        return None
    blocked = pyspy_dumps.blocked_tgids(events, int(manifest["ended_ns"]), after_s)
    if not blocked:
        return None
    live = [r for r in manifest.get("ranks", []) if not r.get("exited")]
    frame, meta = pyspy_dumps.capture_ranks(live)
    meta["blocked_tgids"] = blocked
    manifest["pystacks"] = meta
    return frame if meta.get("taken") else None


def run_session(
    tgids: list[int],
    output: Path,
    opts: TraceOptions,
    duration_s: float | None = None,
    on_started: Callable[[Tracer], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    pystacks_after_s: float | None = pyspy_dumps.HANG_CAPTURE_AFTER_S,
    part_s: float = PART_S,
    on_note: Callable[[str], None] | None = None,
    no_rank_warn_s: float = NO_RANK_WARN_S,
    on_phase: Callable[[str, bool], None] | None = None,
) -> SessionResult:
    """Attach to tgids, trace until a stop condition, write the recording to `output`.

    The recording is written as it goes: every `part_s` what was traced since the last
    part goes to OUTPUT/parts/ (argus.recording.parts), so a SIGKILL loses at most the
    last part_s; at the end the parts are merged into OUTPUT and the probes are released by
    a background holder process (the kernel's removal of each uprobe takes ~0.23 s here:
    it no longer delays the result). `on_note(line)` gets the one warning of a session whose
    launchers started no rank within `no_rank_warn_s` of the tracing line (it goes on
    watching for them). `on_phase(text, live)` hears what it is doing: each phase longer
    than a second (compiling and placing probes, writing the recording) with live False,
    and while tracing, every second, the live count (ranks, calls) with live True."""
    phase = on_phase or (lambda _text, _live: None)
    check_kernel_features()
    tracer = Tracer(opts)
    plan = tracer.plan(tgids)  # target errors come before anything is created
    created = not output.exists()
    prepare_output(output)
    stop = {"reason": None}

    # Signals set a flag: a KeyboardInterrupt raised inside bcc's ring-buffer callback
    # would be swallowed by ctypes and never stop the loop.
    def on_signal(signum, _frame):
        stop["reason"] = "sigterm" if signum == signal.SIGTERM else "interrupt"

    old_term = signal.signal(signal.SIGTERM, on_signal)
    old_int = signal.signal(signal.SIGINT, on_signal)
    ok = False
    lowered: dict[int, int] = {}
    gpu = GpuChannel(tracer)
    parts = PartWriter(output)
    try:
        phase(f"compiling the BPF programs [{','.join(opts.channels)}] and placing probes in "
              f"{len(plan)} process(es)", False)
        tracer.start(plan)
        if tracer.all_exited():  # every target ended before its exit could be traced
            raise procfs.exited_error(plan[0][0])
        launchers = any(t.launcher for t in tracer.targets.values())
        if tracer.attached_count() == 0 and not launchers and tracer.specs:
            tracer.session.close()
            failed = [p for p in tracer.probe_status.values() if p["status"] == "failed"]
            why = (failed[0]["reason"] if failed
                   else "no probe symbol was found in the mapped libraries")
            raise ProbeAttachFailed(f"no probe could be attached: {why}")
        gpu.start()  # NVML absent = one manifest line, never a failure
        lowered = yield_to_the_job()
        if on_started is not None:
            on_started(tracer)
        now = time.monotonic()
        # -d N: N s from here, the targets' probes in place (the "tracing" line); the
        # recording began earlier (started_ns: the ring buffer open, before the probes were
        # placed, which took 1.3 s of a -d 10 run on a busy 2-core box)
        tracer.traced_ns = time.monotonic_ns()
        deadline = None if duration_s is None else now + duration_s
        next_part = now + part_s
        warn_at = now + no_rank_warn_s if on_note is not None else None
        t_traced, next_tick = now, now + 1.0
        while stop["reason"] is None:
            tracer.poll(0.1)
            now = time.monotonic()
            if on_phase is not None and now >= next_tick:  # the live count: only if heard
                next_tick = now + 1.0
                ranks = sum(1 for t in tracer.targets_view.values() if t.traced and not t.exited)
                phase(f"traced so far: {ranks} rank(s), {tracer.records_seen:,} calls, "
                      f"{now - t_traced:.0f} s", True)
            if warn_at is not None and now >= warn_at:
                warn_at = None
                if not any(t.traced for t in tracer.targets_view.values()):
                    on_note(_no_rank_note(tgids, no_rank_warn_s))
            if deadline is not None and now >= deadline:
                stop["reason"] = "duration"
            elif tracer.all_exited():
                stop["reason"] = "targets_exited"
            elif should_stop is not None and should_stop():
                stop["reason"] = "requested"
            elif now >= next_part and (deadline is None or deadline - now > PART_SLACK_S):
                # (a part due within PART_SLACK_S of the end: the final flush writes it)
                _write_part(tracer, parts, gpu)
                next_part = time.monotonic() + part_s
        # A second Ctrl-C while flushing must not lose the recording.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Tracing is over: what is left (the last drain, the merge, the diagnosis of `argus
        # attach`) is what the user waits for, and slowing the job now can mislead no
        # recording. At nice 10 beside a busy process per CPU it took 10 s instead of 1.
        restore_priorities(lowered)
        lowered = {}
        phase(f"stopped ({stop['reason']}): draining the kernel maps, writing the recording "
              f"into {output}", False)
        manifest, events, stacks = tracer.finish(stop["reason"], close=False)
        gpu_frame = gpu.conclude(manifest)  # None: no gpu.parquet, the manifest says why
        host_frame = tracer.host_frame() if tracer.host_context.on else None
        parts.write(manifest, events, stacks, host=host_frame, kernels=tracer.kernels.take())
        merged = merge_parts(parts.parts, manifest)
        py_frame = _hang_pystacks(merged.manifest, merged.events, pystacks_after_s)
        recording = parts.finish(merged.manifest, pystacks=py_frame, gpu=gpu_frame,
                                 merged=merged)
        ok = True
        return SessionResult(recording.path, recording.manifest, recording)
    finally:
        gpu.stop()
        tracer.kernels.close()  # every way out leaves the GPU agents dormant (idempotent)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        if tracer.session is not None:
            # the recording is complete (or the session failed): nothing needs the probes
            tracer.session.close(background=True)
        if not ok and created and not parts.parts:
            shutil.rmtree(output, ignore_errors=True)
        restore_priorities(lowered)


def _no_rank_note(tgids: list[int], waited_s: float) -> str:
    return (f"no rank found under {', '.join(map(str, tgids))} after "
            f"{waited_s:.0f} s (no process below maps CUDA, NCCL or PyTorch); still watching "
            f"for new ranks. Is it the job's launcher? `argus doctor -p PID` says what a "
            f"process maps.")


def _write_part(tracer: Tracer, parts: PartWriter, gpu: GpuChannel) -> None:
    """What was traced since the last part -> OUTPUT/parts/ (rows that became final, plus
    the calls in flight now, the NVML samples and GPU agent records since the last part)."""
    events, inflight, stacks, host = tracer.drain()
    if inflight.height:
        events = pl.concat([events, inflight], how="vertical_relaxed")
    manifest = tracer.manifest("recording", time.monotonic_ns(), events, stacks)
    parts.write(manifest, events, stacks, host=host if tracer.host_context.on else None,
                gpu=gpu.part(manifest["ranks"]), kernels=tracer.kernels.take())
