"""`argus attach`: trace running ranks (or their launcher), then print the diagnosis."""

from __future__ import annotations

import json
from pathlib import Path

import click

from argus.analyze import DEFAULT_HANG_AFTER_S
from argus.collect.channels import SWITCHES, check_switches
from argus.collect.session import default_output_dir, run_session
from argus.collect.tracer import TraceOptions, Tracer
from argus.errors import NotATrainingProcess, UsageError
from argus.present.phases import Phases
from argus.recording.io import load_recording

# the analysis (diagnosis, compress, render, summaries) is imported once the recording is
# written: 0.1-0.2 s less before the programs compile and the probes go in


def channels_from_flags(flags: dict[str, bool]) -> tuple[str, ...]:
    """The switches (argus.collect.channels.SWITCHES) whose --no-NAME flag is not given."""
    chans = tuple(c for c in SWITCHES if not flags.get(f"no_{c}"))
    check_switches(chans)  # host context alone explains nothing
    return chans


def channel_flags(fn):
    """One --no-NAME flag per channel switch, in the registry's order."""
    for name, help_text in reversed(SWITCHES.items()):
        fn = click.option(f"--no-{name}", f"no_{name}", is_flag=True, help=help_text)(fn)
    return fn


def describe_targets(tracer: Tracer) -> str:
    ranks = [t for t in tracer.targets_view.values() if t.traced]
    launchers = [t.tgid for t in tracer.targets_view.values() if t.launcher and not t.traced]
    parts = []
    if ranks:
        parts.append(
            f"{len(ranks)} rank process(es) "
            + ", ".join(
                f"{t.tgid}" + (f" (rank {t.rank})" if t.rank is not None else "") for t in ranks
            )
        )
    if launchers:
        parts.append(f"launcher(s) {', '.join(map(str, launchers))} (their new ranks too)")
    return "; ".join(parts) or "no process yet"


def summary_lines(manifest: dict, path: Path) -> list[str]:
    events = manifest["counts"]["events"]
    per_channel = ", ".join(f"{k} {v}" for k, v in sorted(events.items())) or "none"
    drops = {k: v for k, v in manifest["drops"].items() if v}
    probes = manifest["probes"]
    attached = sum(1 for p in probes if p["status"] == "attached")
    failed = [p for p in probes if p["status"] == "failed"]
    lines = [
        f"recorded {manifest['duration_s']:.1f} s ({manifest['end_reason']}) into {path}",
        f"ranks: {len(manifest['ranks'])}; events: {per_channel}; "
        f"CPU samples: {manifest['counts']['stack_samples']}",
        f"probes: {attached} attached, {len(failed)} failed",
    ]
    if drops:
        lines.append(
            "WARNING: dropped " + ", ".join(f"{k}={v}" for k, v in drops.items())
            + " (raise --ringbuf-mb, or lower -F for stack maps)"
        )
    py = {tgid: p for tgid, p in ((manifest.get("python_stacks") or {}).get("processes") or {}
                                  ).items() if p["status"] != "not_python"}
    if py:
        ok = [p for p in py.values() if p["status"] == "attached"]
        versions = ", ".join(sorted({p["python"] for p in ok if p.get("python")}))
        line = f"Python frames in CPU samples: {len(ok)} of {len(py)} Python process(es)"
        lines.append(line + (f" (Python {versions})" if versions else ""))
        for tgid, p in list(py.items())[:5]:
            if p["status"] != "attached":
                lines.append(f"  no Python frames for {tgid}: {p['note'][:160]}")
    gpu = manifest.get("gpu")
    if isinstance(gpu, dict):
        if gpu.get("available"):
            devs = gpu.get("devices", [])
            joined = sum(1 for d in devs if d.get("ranks"))
            lines.append(f"GPU: {gpu.get('samples', 0)} NVML samples of {len(devs)} "
                         f"device(s), {joined} joined to ranks")
        else:
            lines.append(f"GPU counters off: {gpu.get('reason')}")
    for p in failed[:5]:
        lines.append(f"  failed: {p['symbol']} in {p['library']}: {p['reason'][:160]}")
    return lines


def write_summary_files(recording) -> None:
    """DIR/summaries/: what the diagnosis needs per rank per step, kept when the raw events
    are not (docs/scaling.md). A failure here is a warning: the recording is already safe."""
    from argus.analyze.compress import build_summaries  # noqa: PLC0415 - after tracing
    from argus.recording.summaries import write_summaries  # noqa: PLC0415

    try:
        summ = build_summaries([recording])
        write_summaries(recording.path, summ)
    except Exception as e:  # noqa: BLE001 - never lose a finished recording over its summary
        click.echo(f"argus: WARNING: could not write summaries: {e}", err=True)


@click.command(
    "attach",
    epilog="""\b
Examples:
  argus attach 4242                       # trace rank 4242 until Ctrl-C, then diagnose
  argus attach $(pgrep -f torchrun) -d 60 # a torchrun launcher: all its ranks, 60 s
  argus attach 4242 4243 -o /tmp/run1     # two ranks, recording into /tmp/run1
  argus attach 4242 --no-cpu -F 99        # no CPU stacks (or sample at 99 Hz)
  argus attach 4242 --no-host             # no host context (sched_switch, TCP, OOM, block I/O)
  argus attach 4242 -d 30 --json          # print the argus.report/1 JSON at the end
  argus attach 4242 --gpu-interval 0.5    # NVML GPU counters twice a second (--no-gpu: off)
""",
)
@click.argument("pids", nargs=-1, required=True, type=int)
@click.option("-d", "--duration", type=float, default=None, metavar="SECONDS",
              help="Stop after SECONDS (default: until Ctrl-C, SIGTERM or every target exited).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Recording directory (default: ./argus-HOST-DATE-TIME).")
@click.option("-F", "--frequency", type=int, default=49, show_default=True, metavar="HZ",
              help="CPU stack sampling frequency.")
@channel_flags
@click.option("--no-gpu", is_flag=True, help="Do not sample GPU counters (NVML).")
@click.option("--gpu-interval", type=float, default=1.0, show_default=True, metavar="SECONDS",
              help="NVML sampling period per GPU (clocks, throttle reasons, power, ...).")
@click.option("--ringbuf-mb", type=int, default=8, show_default=True,
              help="Size of the call ring buffer (raise it if calls are dropped).")
@click.option("--hang-after", type=float, default=DEFAULT_HANG_AFTER_S, show_default=True,
              metavar="SECONDS", help="Blocked this long at the end = hung (diagnosis).")
@click.option("--json", "as_json", is_flag=True, help="Print the diagnosis as one JSON object.")
@click.option("--no-summaries", is_flag=True,
              help="Do not write the per-rank-per-step summaries (DIR/summaries/).")
def command(pids, duration, output, frequency, ringbuf_mb, hang_after, as_json, no_gpu=False,
            gpu_interval=1.0, no_summaries=False, **channel_off) -> int:
    """Trace running training processes (ranks, or a launcher such as torchrun).

    Probes the CUDA runtime and driver, NCCL and PyTorch c10d in every rank, samples CPU
    stacks, and records until the duration ends, Ctrl-C, SIGTERM, or every target exits.
    Then it writes the recording (readable by its owner only) and prints the diagnosis.
    """
    if duration is not None and duration <= 0:
        raise UsageError("-d/--duration must be a positive number of seconds.")
    if not 1 <= frequency <= 10000:
        raise UsageError("-F/--frequency must be between 1 and 10000 Hz.")
    if ringbuf_mb < 1:
        raise UsageError("--ringbuf-mb must be at least 1.")
    if not 0.01 <= gpu_interval <= 3600:
        raise UsageError("--gpu-interval must be between 0.01 and 3600 seconds.")
    opts = TraceOptions(
        channels=channels_from_flags(channel_off),
        sample_hz=frequency,
        ringbuf_mb=ringbuf_mb,
        gpu_interval_s=None if no_gpu else gpu_interval,
    )
    output = output or default_output_dir()

    phases = Phases()

    def started(tracer: Tracer) -> None:
        until = f"for {duration:g} s" if duration else "until Ctrl-C"
        phases.echo(
            f"argus: tracing {describe_targets(tracer)} [{','.join(opts.channels)}"
            f"{f' @{frequency} Hz' if 'cpu' in opts.channels else ''}] {until}; "
            f"recording into {output}"
        )

    def on_phase(text: str, live: bool) -> None:
        (phases.tick if live else phases.say)(text)

    try:
        result = run_session(list(pids), output, opts, duration, on_started=started,
                             on_note=lambda line: phases.echo(f"argus: warning: {line}"),
                             on_phase=on_phase)
    finally:
        phases.close()
    for line in summary_lines(result.manifest, result.path):
        click.echo(f"argus: {line}", err=True)
    if not result.manifest["ranks"]:
        raise NotATrainingProcess(
            f"traced 0 ranks: no process under {', '.join(map(str, pids))} mapped CUDA, NCCL "
            f"or PyTorch while argus watched (the recording in {result.path} is empty)")
    recording = result.recording or load_recording(result.path)
    if not no_summaries:
        write_summary_files(recording)
    click.echo("argus: diagnosing", err=True)
    from argus.analyze.diagnosis import diagnose  # noqa: PLC0415 - not on the way in

    report = diagnose([recording], hang_after_s=hang_after)
    if as_json:
        click.echo(json.dumps(report, default=str))
    else:
        from argus.present.render import print_report  # noqa: PLC0415 - not on the way in

        print_report(report)
    return 0
