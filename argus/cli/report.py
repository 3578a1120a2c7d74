"""`argus report`: the diagnosis of one or several recorded directories."""

from __future__ import annotations

import json
import math

import click

from argus.analyze.diagnosis import DEFAULT_HANG_AFTER_S, diagnose_dirs
from argus.errors import UsageError, cannot_read
from argus.present.phases import Phases
from argus.present.render import print_report


@click.command(
    "report",
    epilog="""\b
Examples:
  argus report /var/lib/argus/run1           # readable diagnosis of one node's recording
  argus report node0/ node1/                 # one job recorded on two nodes, clocks aligned
  argus report /var/lib/argus                # the daemon's job there, every segment merged
  argus report n0/jobs/slurm-42 n1/jobs/slurm-42  # a job's segments on two nodes' daemons
  argus report run1 --json | jq .findings    # machine-readable argus.report/1 object
  argus report run1 --hang-after 30          # call a hang only after 30 s without progress
""",
)
@click.argument("dirs", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one argus.report/1 JSON object.")
@click.option(
    "--hang-after",
    type=float,
    default=DEFAULT_HANG_AFTER_S,
    show_default=True,
    metavar="SECONDS",
    help="Ranks blocked this long (and > 5 median steps) at the end of a recording are hung.",
)
@click.option(
    "--from-summaries",
    is_flag=True,
    help="Diagnose from the per-step summaries (DIR/summaries/, built from the events when "
    "absent). Automatic for a DIR that has summaries and no events.",
)
def command(
    dirs: tuple[str, ...], as_json: bool, hang_after: float, from_summaries: bool = False
) -> None:
    """Diagnose recorded DIR(s): stragglers, stalls, hangs and their causes.

    Give one directory per node of the same job; their clocks are aligned on matched
    collectives. A DIR may also be an `argus daemon` output directory, one of its job
    directories (DIR/jobs/<job>) or a segment: a node's segments are merged into one
    continuous run. Without --json a table is printed; with --json exactly one JSON object.
    """
    if not math.isfinite(hang_after) or hang_after <= 0:
        raise UsageError("--hang-after must be a finite positive number of seconds.")
    phases = Phases(plain=False)  # a spinner on a terminal; scripts' stderr stays quiet
    phases.say(f"reading and diagnosing {len(dirs)} director{'y' if len(dirs) == 1 else 'ies'}")
    try:
        report = diagnose_dirs(dirs, hang_after_s=hang_after, from_summaries=from_summaries)
    except PermissionError as err:
        raise cannot_read(err) from err
    finally:
        phases.close()
    if as_json:
        click.echo(json.dumps(report, default=str))
    else:
        print_report(report)

