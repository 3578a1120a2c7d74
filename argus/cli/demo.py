"""`argus demo`: run the simulated job with a planted fault, trace it, diagnose it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import click

from argus.errors import ArgusError, UsageError

DEFAULT_FAULT = "straggler:rank=2,factor=1.5"  # what `argus demo` plants on 4 ranks


def default_fault(ranks: int) -> str:
    """The fault `argus demo` plants without --fault: rank 2's kernels 1.5x slower (the last
    rank's when there are fewer than 3); a single rank has no peers to be slower than, so it
    gets a one-off 400-ms compile stall in step 10 (an anomalous window with its hotspot)."""
    if ranks == 1:
        return "jit_stall:rank=0,ms=400,start=10"
    return f"straggler:rank={min(2, ranks - 1)},factor=1.5"
STEP_S = 0.06  # a healthy simulated step, for the hang timing below
HANG_AFTER_S = 2.0


def run_demo(ranks: int, faults: list[str], steps: int, output: Path, pp: int = 1,
             sample_hz: int | None = None, on_phase=None):
    """Simulate, attach to the launcher (ranks wait for a go file), diagnose.

    Returns (report, truth, session result). A hang needs the recording to end while the
    ranks still wait: the attach lasts until a few seconds after the hang, then the job is
    stopped, and the diagnosis calls a hang after HANG_AFTER_S.
    """
    from argus.analyze.diagnosis import diagnose
    from argus.collect.session import run_session
    from argus.collect.tracer import TraceOptions
    from argus.recording.io import load_recording
    from argus.sim.faults import FaultSpecError
    from argus.sim.launcher import SimConfig, SimError, find_build_dir, start_job

    hang_start = None
    for spec in faults:
        if spec.startswith("hang:"):
            keys = dict(kv.split("=", 1) for kv in spec[5:].split(",") if "=" in kv)
            hang_start = int(float(keys.get("start", 0)))
    duration = None
    timeout = None
    if hang_start is not None:
        duration = hang_start * STEP_S * 2 + 3 * HANG_AFTER_S
        timeout = duration + 30
    work = Path(tempfile.mkdtemp(prefix="argus-demo-"))
    go = work / "go"
    cfg = SimConfig(ranks=ranks, steps=steps, faults=list(faults), pp=pp, wait_go=str(go),
                    truth=str(work / "truth.json"), timeout_s=timeout, quiet=True)
    # GPU counters: argus reads the simulated GPUs through the simulator's libnvidia-ml
    # stand-in (docs/gpu.md), in this job's own device namespace.
    cfg.node = os.environ.get("ARGUS_SIM_NODE") or f"demo-{os.getpid()}"
    os.environ["ARGUS_SIM_NODE"] = cfg.node
    stub = find_build_dir() / "stubs" / "libnvidia-ml.so.1"
    os.environ.setdefault("ARGUS_NVML_LIB", str(stub))
    try:
        job = start_job(cfg)
    except FaultSpecError as e:
        raise UsageError(str(e)) from e
    except SimError as e:
        msg = str(e)
        if "not built" in msg:
            raise ArgusError("the simulator is not built: run `make setup` first.") from e
        raise ArgusError(msg) from e
    try:
        job.wait_ready()
        opts = TraceOptions() if sample_hz is None else TraceOptions(sample_hz=sample_hz)
        result = run_session([job.launcher_pid], output, opts, duration_s=duration,
                             on_started=lambda tracer: go.touch(), on_phase=on_phase)
        if job.proc.poll() is None and hang_start is not None:
            job.terminate()
        job.wait(timeout=60)
    finally:
        if job.proc.poll() is None:
            job.terminate()
    truth = json.loads(Path(cfg.truth).read_text())
    shutil.rmtree(work, ignore_errors=True)
    report = diagnose([result.recording or load_recording(result.path)],
                      hang_after_s=HANG_AFTER_S if hang_start is not None else 10.0)
    return report, truth, result


@click.command(
    "demo",
    epilog="""\b
Examples:
  argus demo                                   # 4 ranks, rank 2's kernels 1.5x slower
  argus demo --fault host_stall:rank=1,ms=30   # a slow data loader on rank 1
  argus demo --ranks 8 --fault hang:rank=3,start=10   # rank 3 never reaches an allreduce
  argus demo --fault none                      # a healthy job: no warning expected
  argus demo --json -o /tmp/demo               # JSON report; keep the recording
""",
)
@click.option("--ranks", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Simulated rank processes.")
@click.option("--fault", "faults", multiple=True, metavar="SPEC",
              help=f"Planted fault, repeatable (default {DEFAULT_FAULT}, on the last rank "
              "below 3 ranks; a compile stall on 1 rank; 'none': healthy). "
              "Kinds: straggler, host_stall, link, hang, jit_stall, bubble, throttle; "
              "see docs/simulator.md.")
@click.option("--steps", type=click.IntRange(5, 100000), default=40, show_default=True,
              help="Training steps.")
@click.option("--pp", type=int, default=1, show_default=True,
              help="Pipeline-parallel stages (must divide --ranks).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Keep the recording in DIR (default: a temporary directory).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the argus.report/1 object with a `demo` key (planted vs found).")
def command(ranks, faults, steps, pp, output, as_json) -> int:
    """Run a simulated training job with a planted fault, trace it and diagnose it.

    Needs root (eBPF) and the simulator built by `make setup`; no GPU. Prints the report
    and one line comparing what was planted with what was found.
    """
    from argus.present.render import print_report
    from argus.sim.expect import describe, score

    faults = [f for f in (faults or (default_fault(ranks),)) if f != "none"]
    if pp < 1 or ranks % pp:
        raise UsageError("--pp must divide --ranks.")
    keep = output is not None
    out = output or Path(tempfile.mkdtemp(prefix="argus-demo-rec-")) / "rec"
    click.echo(f"argus demo: simulating {ranks} ranks x {steps} steps"
               f"{' with ' + ', '.join(faults) if faults else ' (healthy)'}; tracing it "
               f"(CUDA, NCCL, CPU stacks), Ctrl-C stops; recording into {out}"
               f"{'' if keep else ' (temporary)'}", err=True)
    t0 = time.monotonic()
    from argus.present.phases import Phases

    phases = Phases()
    try:
        report, truth, _ = run_demo(ranks, faults, steps, out, pp, on_phase=lambda text, live: (
            phases.tick if live else phases.say)(text))
    finally:
        phases.close()
    line = describe(report, truth)
    if not keep:
        shutil.rmtree(out.parent, ignore_errors=True)
    if as_json:
        report["demo"] = {"line": line, **score(report, truth)}
        click.echo(json.dumps(report, default=str))
    else:
        print_report(report)
        click.echo(line)
    click.echo(f"argus demo: done in {time.monotonic() - t0:.1f} s", err=True)
    return 0
