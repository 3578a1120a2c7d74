"""`argus export`: write recorded DIR(s) as a timeline for another viewer."""

from __future__ import annotations

import click

from argus.analyze.diagnosis import DEFAULT_HANG_AFTER_S, diagnose
from argus.errors import OutputNotWritable, cannot_read
from argus.present.chrome import write_chrome_trace
from argus.recording.io import load_recording


@click.command(
    "export",
    epilog="""\b
Examples:
  argus export run1 -f chrome -o trace.json         # open trace.json in ui.perfetto.dev
  argus export node0/ node1/ -f chrome -o job.json  # two nodes on one aligned timeline
""",
)
@click.argument("dirs", nargs=-1, required=True, type=click.Path())
@click.option(
    "-f", "--format", "fmt", type=click.Choice(["chrome"]), default="chrome", show_default=True,
    help="Output format: chrome = Trace Event Format JSON (Perfetto, chrome://tracing).",
)
@click.option("-o", "--output", required=True, type=click.Path(), help="File to write.")
def command(dirs: tuple[str, ...], fmt: str, output: str) -> None:
    """Export recorded DIR(s) as a trace: one process per rank, steps, collectives, findings.

    Times are microseconds from the earliest event on the aligned wall clock.
    """
    try:
        recordings = [load_recording(d) for d in dirs]
        report = diagnose(recordings, hang_after_s=DEFAULT_HANG_AFTER_S)
    except PermissionError as err:
        raise cannot_read(err) from err
    try:
        n = write_chrome_trace(output, recordings, report)
    except OSError as err:
        raise OutputNotWritable(f"Cannot write {output}: {err.strerror}.") from err
    click.echo(f"argus: wrote {n} trace events to {output}", err=True)
