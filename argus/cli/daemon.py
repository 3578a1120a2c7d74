"""`argus daemon`: trace every training process on this node, continuously."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from argus.errors import UsageError


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--metrics-addr {text!r} is not HOST:PORT (e.g. 127.0.0.1:9464).")
    return host.strip("[]"), int(port)


@click.command(
    "daemon",
    epilog="""\b
Examples:
  argus daemon                      # summaries in /var/lib/argus, metrics on 127.0.0.1:9464
  argus daemon -o /tmp/argus -i 2               # another directory, a window every 2 s
  argus daemon --config /etc/argus/daemon.toml  # discovery rules, budgets (SIGHUP reloads it)
  argus daemon --metrics-addr 127.0.0.1:0       # any free port (printed on stderr)
  argus daemon --gpu-interval 0.5               # NVML GPU counters twice a second (--no-gpu: off)
  curl -s 127.0.0.1:9464/metrics                # Prometheus exposition
  argus top --daemon                            # the live view of every job it traces
""",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("/var/lib/argus"),
    show_default=True,
    metavar="DIR",
    help="Where per-job summaries are written.",
)
@click.option(
    "--metrics-addr",
    default="127.0.0.1:9464",
    show_default=True,
    metavar="HOST:PORT",
    help="Serve /metrics (Prometheus) and /state (JSON) here; 'off' for none.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    metavar="FILE",
    help="TOML config (docs/daemon.md).",
)
@click.option(
    "-i",
    "--interval",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Drain, diagnose and write every SECONDS (default 5, or the config's).",
)
@click.option(
    "--window",
    type=float,
    default=None,
    metavar="SECONDS",
    help="The recent window each diagnosis reads (default 60).",
)
@click.option(
    "--max-disk-mb",
    type=float,
    default=None,
    metavar="MB",
    help="Disk budget of the summaries; the oldest segments go first (default 1024).",
)
@click.option(
    "-F",
    "--frequency",
    type=int,
    default=49,
    show_default=True,
    metavar="HZ",
    help="CPU stack sampling frequency.",
)
@click.option("--no-gpu", is_flag=True, help="Do not sample GPU counters (NVML).")
@click.option("--gpu-interval", type=float, default=1.0, show_default=True, metavar="SECONDS",
              help="NVML sampling period (GPU clocks, throttle reasons, power, ...).")
@click.pass_context
def command(ctx, output, metrics_addr, config_path, interval, window, max_disk_mb,
            frequency, no_gpu=False, gpu_interval=1.0) -> int:
    """Trace every training process on this node as it starts, until SIGTERM.

    Processes that map libcudart, libcuda, libnccl or libtorch (or match the config's
    rules) are attached within about a second and detached when they exit, through one
    BPF program set; ranks are grouped into jobs (Slurm, torchrun, Kubernetes, cgroup).
    Every interval each job's recent window is summarised to disk and diagnosed; the
    result is served as Prometheus metrics and as the live state `argus top --daemon`
    reads. SIGTERM flushes and exits; SIGHUP reloads the config.
    """
    from argus.collect.tracer import TraceOptions
    from argus.daemon.service import Daemon, DaemonOptions

    if not 1 <= frequency <= 10000:
        raise UsageError("-F/--frequency must be between 1 and 10000 Hz.")
    if not 0.01 <= gpu_interval <= 3600:
        raise UsageError("--gpu-interval must be between 0.01 and 3600 seconds.")
    addr = None if metrics_addr == "off" else parse_addr(metrics_addr)
    logging.basicConfig(level=logging.DEBUG if (ctx.obj or {}).get("verbose") else logging.INFO,
                        format="%(message)s")
    opts = DaemonOptions(
        output=output, metrics_addr=addr, config_path=config_path,
        overrides={"interval_s": interval, "window_s": window, "max_disk_mb": max_disk_mb},
        trace=TraceOptions(sample_hz=frequency, gpu_interval_s=None if no_gpu else gpu_interval),
    )
    d = Daemon(opts)
    d.start()
    where = f"http://{addr[0]}:{d.metrics_port}/metrics" if addr else "no metrics"
    click.echo(
        f"argus: daemon tracing training processes on this node; summaries in {output}; "
        f"{where}; SIGTERM or Ctrl-C to stop, SIGHUP reloads the config",
        err=True,
    )
    reason = d.run()
    click.echo(f"argus: daemon stopped ({reason}); everything flushed", err=True)
    return 0
