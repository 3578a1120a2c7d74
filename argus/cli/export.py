"""`argus export`: write recorded DIR(s) as a timeline for another viewer."""

from __future__ import annotations

import os
import sys

import click

from argus.analyze.diagnosis import DEFAULT_HANG_AFTER_S, diagnose
from argus.errors import ArgusError, OutputNotWritable, cannot_read
from argus.present.trace_export import ExportProgress, build_trace, write_atomically
from argus.recording.io import load_recording

FORMATS = ("auto", "perfetto", "chrome")


def resolve_format(fmt: str, output: str) -> str:
    """`auto`: chrome when the output is named *.json, else perfetto."""
    if fmt != "auto":
        return fmt
    return "chrome" if output.lower().endswith(".json") else "perfetto"


@click.command(
    "export",
    epilog="""\b
Examples:
  argus export run1 -o trace.pftrace               # Perfetto protobuf: open in ui.perfetto.dev
  argus export run1 -f chrome -o trace.json        # Trace Event Format JSON (chrome://tracing)
  argus export node0/ node1/ -o job.pftrace        # two nodes on one aligned timeline
""",
)
@click.argument("dirs", nargs=-1, required=True, type=click.Path())
@click.option(
    "-f", "--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True,
    help="perfetto = native Perfetto TrackEvent protobuf (compact, for large recordings); "
    "chrome = Trace Event Format JSON; auto = chrome when OUTPUT ends in .json, else perfetto.",
)
@click.option("-o", "--output", required=True, type=click.Path(), help="File to write.")
def command(dirs: tuple[str, ...], fmt: str, output: str) -> None:
    """Export recorded DIR(s) as a trace: one process per rank, steps, calls, collectives,
    findings.

    Calls with a duration are slices, strictly nested per (thread, channel) track; calls
    recorded at entry only (kernel launches, event records) are instants; calls in flight
    when the recording ended last to its end. Progress goes to stderr (a bar on a terminal,
    plain lines for large exports otherwise), then one line: file, size, events, time.
    """
    fmt = resolve_format(fmt, output)
    progress = ExportProgress(sys.stderr)
    progress.phase("reading and diagnosing")
    try:
        recordings = [load_recording(d) for d in dirs]
        report = diagnose(recordings, hang_after_s=DEFAULT_HANG_AFTER_S)
    except PermissionError as err:
        progress.close()
        raise cannot_read(err) from err
    except BaseException:
        progress.close()
        raise
    try:
        progress.large(sum(r.events.height for r in recordings))
        progress.phase("aligning the timeline")
        trace = build_trace(recordings, report)
        del recordings
        try:
            if fmt == "perfetto":
                try:
                    from argus.present.perfetto import dump_perfetto
                except ImportError as err:
                    raise ArgusError(f"Cannot write {output}: the perfetto package is not "
                                     f"installed ({err.name}).",
                                     "pip install perfetto, or export with -f chrome.") from err

                n = write_atomically(output, "wb", lambda fh: dump_perfetto(trace, fh, progress))
            else:
                from argus.present.chrome import dump_chrome

                n = write_atomically(output, "w", lambda fh: dump_chrome(trace, fh, progress))
        except OSError as err:
            raise OutputNotWritable(f"Cannot write {output}: {err.strerror}.") from err
    finally:
        progress.close()
    size = os.stat(output).st_size if os.path.isfile(output) else None
    progress.done(output, size, n, fmt)
