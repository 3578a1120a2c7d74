"""`argus top`: a live view of the ranks of running jobs, one row per rank."""

from __future__ import annotations

import click

from argus.errors import UsageError


@click.command(
    "top",
    epilog="""\b
Examples:
  argus top --daemon                       # every job the local `argus daemon` traces
  argus top --daemon http://127.0.0.1:9464 # a daemon on another loopback port
  argus top 4242 4243                      # attach to two ranks (or a launcher) itself
  argus top --recording ./argus-run1       # a recorded directory (post-mortem)
  # keys: s = next sort column, r = reverse, q = quit
""",
)
@click.argument("pids", nargs=-1, type=int)
@click.option(
    "--daemon",
    "daemon_url",
    is_flag=False,
    flag_value="http://127.0.0.1:9464",
    default=None,
    metavar="[URL]",
    help="Read a running daemon (default http://127.0.0.1:9464).",
)
@click.option(
    "--recording",
    "recordings",
    multiple=True,
    metavar="DIR",
    help="Show a recorded directory instead (repeatable).",
)
@click.option(
    "-i",
    "--interval",
    type=float,
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Refresh period.",
)
def command(pids, daemon_url, recordings, interval) -> int:
    """Live view: step time, compute vs wait, arrival lateness, last collective and seq,
    hottest CPU frame per rank; stragglers in red, hangs highlighted."""
    from argus.present.top import DaemonReader, RecordingReader, run_top

    if sum(bool(x) for x in (pids, daemon_url, recordings)) != 1:
        raise UsageError("give PIDs, --daemon [URL] or --recording DIR (exactly one).")
    if interval <= 0:
        raise UsageError("-i/--interval must be positive.")
    if daemon_url:
        reader = DaemonReader(daemon_url)
    elif recordings:
        reader = RecordingReader(recordings)
    else:
        from argus.daemon.service import AttachReader

        reader = AttachReader(list(pids), interval_s=max(1.0, interval))
    return run_top(reader, refresh_s=interval)
