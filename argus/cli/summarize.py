"""`argus summarize`: per-rank-per-step summaries of recorded directories (docs/scaling.md)."""

from __future__ import annotations

import math

import click

from argus.errors import UsageError, cannot_read
from argus.recording import schema
from argus.recording.io import load_recording
from argus.recording.summaries import (
    DEFAULT_PARTITION_S,
    MAX_PARTITION_S,
    MIN_PARTITION_S,
    summary_bytes,
    write_summaries,
)


@click.command(
    "summarize",
    epilog="""\b
Examples:
  argus summarize /var/lib/argus/run1              # write run1/summaries/ next to the events
  argus summarize run1 --summaries-only            # keep only the summaries (and the manifest)
  argus report run1                                # a DIR with only summaries is diagnosed too
""",
)
@click.argument("dirs", nargs=-1, required=True, type=click.Path())
@click.option("--summaries-only", is_flag=True,
              help="Delete events.parquet, stacks.parquet and gpu.parquet once summarised.")
@click.option("--partition", "partition_s", type=float, default=DEFAULT_PARTITION_S,
              show_default=True, metavar="SECONDS",
              help="One summaries/part-<start>.parquet per this much wall time.")
def command(dirs: tuple[str, ...], summaries_only: bool, partition_s: float) -> None:
    """Summarise recorded DIR(s): per (rank, step) what the diagnosis needs, in DIR/summaries/.

    The same findings come out of `argus report` on the summaries alone; they take a few
    hundred bytes per rank per step instead of the raw events.
    """
    from argus.analyze.compress import build_summaries

    if not (math.isfinite(partition_s) and MIN_PARTITION_S <= partition_s <= MAX_PARTITION_S):
        raise UsageError(f"--partition must be between {MIN_PARTITION_S} and {MAX_PARTITION_S} "
                         f"seconds (ten years).")
    # every DIR is loaded and summarised before any is written: a bad one leaves all as they were
    done = []
    for d in dirs:
        try:
            rec = load_recording(d)
        except PermissionError as err:
            raise cannot_read(err) from err
        raw = sum((rec.path / f).stat().st_size for f in (schema.EVENTS, schema.STACKS, schema.GPU)
                  if (rec.path / f).exists())
        done.append((d, rec.path, raw, build_summaries([rec])))
        del rec
    for d, path, raw, summ in done:
        out = write_summaries(d, summ, partition_s=partition_s)
        n = max(summ.steps.height, 1)
        size = summary_bytes(d)
        click.echo(f"argus: {out}: {summ.steps.height} rank-steps, {size / n:.0f} B per rank "
                   f"per step (raw events {raw / n:.0f} B)", err=True)
        if summaries_only:
            for f in (schema.EVENTS, schema.STACKS, schema.GPU):
                (path / f).unlink(missing_ok=True)
