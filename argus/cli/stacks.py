"""`argus stacks`: the current Python + native stack of every thread of every rank."""

from __future__ import annotations

import json

import click

from argus.collect.pyspy_dumps import ProcessStacks, dump_process, expand_targets, where
from argus.errors import ArgusError, UsageError


def _render(dumps: list[ProcessStacks], failed: list[tuple[int, str]]) -> None:
    for d in dumps:
        who = f"rank {d.rank}" if d.rank is not None else "process"
        click.echo(f"{who} (pid {d.tgid}, {d.comm}): {len(d.threads)} thread(s)"
                   + (f"; {d.note}" if d.note else ""))
        for t in d.threads:
            state = t.state + (f" in {t.wchan}" if t.wchan else "")
            gil = ", holds the GIL" if t.owns_gil else ""
            click.echo(f"  thread {t.tid} {t.thread!r} [{state}{gil}]")
            for f in t.frames:
                if f["kind"] == "python":
                    click.echo(f"    {where(f)}")
                elif f["kind"] == "native":
                    lib = (f.get("module") or f.get("file") or "").rsplit("/", 1)[-1]
                    click.echo(f"    [native] {f['function']}" + (f" ({lib})" if lib else ""))
                elif t.source == "procfs":
                    click.echo(f"    [kernel] {f['function']}")
        click.echo("")
    for tgid, why in failed:
        click.echo(f"pid {tgid}: {why}")


@click.command(
    "stacks",
    epilog="""\b
Examples:
  argus stacks 4242                  # every thread of process 4242: Python + native frames
  argus stacks $(pgrep -f torchrun)  # a launcher expands to its ranks (RANK in their env)
  argus stacks 4242 --no-native      # Python frames only (faster on huge native libraries)
  argus stacks 4242 --json | jq .    # one argus.stacks/1 JSON object
""",
)
@click.argument("pids", nargs=-1, required=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one argus.stacks/1 JSON object.")
@click.option("--native/--no-native", default=True, show_default=True,
              help="Merge native frames into the Python stacks (py-spy --native).")
def command(pids: tuple[int, ...], as_json: bool, native: bool) -> None:
    """Print the current stack of every thread of each PID (a launcher: of its ranks).

    Python processes: Python frames with file:line, native frames merged at the
    interpreter (read by py-spy from outside; each process pauses for a few ms). Threads
    without Python frames, and processes that are not Python, show their state and the
    kernel function they sleep in. Blocked threads are shown as well as running ones.
    """
    if any(p <= 0 for p in pids):
        raise UsageError("PIDs must be positive integers.")
    targets = expand_targets(list(pids))
    dumps, failed = [], []
    for tgid, rank in targets:
        try:
            dumps.append(dump_process(tgid, native=native, rank=rank))
        except ArgusError as err:
            if len(targets) == 1:
                raise
            failed.append((tgid, str(err)))
    if as_json:
        click.echo(json.dumps({
            "schema": "argus.stacks/1",
            "processes": [d.to_dict() for d in dumps],
            "failed": [{"tgid": t, "error": e} for t, e in failed],
        }))
    else:
        _render(dumps, failed)
