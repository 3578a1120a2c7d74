"""`argus gpu-env`: the variables that start a job with argus's dormant GPU agent."""

from __future__ import annotations

import shlex

import click

from argus.collect.gpu_agent import gpu_env


@click.command(
    "gpu-env",
    epilog="""\b
Examples:
  eval "$(argus gpu-env)"; torchrun --nproc-per-node 8 train.py   # ranks load the agent
  argus gpu-env >> job.env                                     # for a launcher's env file
  argus gpu-env --build-dir /opt/argus/build                   # another build of the agent
""",
)
@click.option("--build-dir", type=click.Path(file_okay=False), default=None,
              help="Where the agent was built (default: ARGUS_GPU_AGENT, ARGUS_BUILD_DIR, build/).")
def command(build_dir: str | None) -> None:
    """Print shell-sourceable NAME=value lines that load argus's GPU agent into a job.

    NCCL_PROFILER_PLUGIN and CUDA_INJECTION64_PATH both name libargus_gpu_agent.so: NCCL
    loads it as its profiler plugin at communicator init, the CUDA driver as a CUPTI
    subscriber at CUDA init. It stays dormant (NCCL event mask 0, no CUPTI activity kind
    enabled) until argus attaches; then it hands kernel, memcpy, memset and collective
    device times to argus through a bounded shared-memory ring per process. Nothing but
    the variables is printed on stdout.
    """
    for name, value in gpu_env(build_dir).items():
        click.echo(f"{name}={shlex.quote(value)}")
