"""`argus doctor`: the thin command over `argus.doctor`."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from argus import doctor as _doctor

# The command calls this; tests replace it with a run on faked inputs.
run_doctor = _doctor.run_doctor

_STYLE = {"PASS": "bold green", "WARN": "bold yellow", "FAIL": "bold red"}

EPILOG = """\b
Examples:
  argus doctor                 # can eBPF tracing work on this node?
  argus doctor -p 4242         # ... and on process 4242 (a rank or torchrun)
  argus doctor -p 11 -p 12     # several processes at once
  argus doctor --json | jq .ok # machine-readable, one JSON object
"""


@click.command("doctor", epilog=EPILOG)
@click.option(
    "-p",
    "--pid",
    "pids",
    type=click.IntRange(min=1),
    multiple=True,
    help="Also check this process (a rank or its launcher); repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (argus.doctor/1).")
@click.pass_context
def doctor(ctx: click.Context, pids: tuple[int, ...], as_json: bool) -> None:
    """Check that tracing can work here: privileges, kernel, tracefs, bcc, and the targets.

    Each check is PASS, WARN (works, degraded) or FAIL (cannot trace) with a one-sentence
    remedy. With -p, also checks that the process exists and is readable, which CUDA, NCCL
    and torch libraries it maps (path, version) and its rank (from an allowlist of
    environment variables only). Exit status: 0 when tracing can work, 1 when it cannot.
    """
    report = run_doctor(list(pids) if pids else None)
    if as_json:
        click.echo(json.dumps(report.to_json_obj(), indent=2, sort_keys=False))
    else:
        _print_table(report)
    ctx.exit(_doctor.exit_code(report.checks))


def _print_table(report: _doctor.DoctorReport) -> None:
    console = Console(highlight=False, soft_wrap=False)
    table = Table(show_header=True, header_style="bold", expand=False)
    table.add_column("status", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("detail", overflow="fold")
    table.add_column("remedy", overflow="fold")
    for c in report.checks:
        status = str(c.status)
        table.add_row(
            Text(status, style=_STYLE.get(status, "")), Text(c.name), Text(c.detail), Text(c.remedy)
        )
    console.print(table)
    failed = [c for c in report.checks if c.status == _doctor.Status.FAIL]
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more failed check(s))" if len(failed) > 1 else ""
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        err.print(Text(f"argus cannot trace: {first.detail}{more}."))
    else:
        console.print(Text("tracing can work here.", style="green"))


command = doctor
