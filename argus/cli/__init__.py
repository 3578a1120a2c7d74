"""The `argus` command line: one thin module per subcommand, registered here.

`main(argv) -> int` is the single entry point: it runs the click group, turns every
`ArgusError` into one sentence plus its remedy on stderr (a traceback only with `-v`),
and returns the exit code (0 ok, 1 runtime failure, 2 usage error).
"""

from __future__ import annotations

import importlib
import sys
import traceback

import click

from argus import __version__
from argus.errors import ArgusError

# Subcommand modules; each exposes `command`, a click.Command.
_COMMANDS = ("doctor", "attach", "report", "export", "demo", "summarize", "stacks", "daemon", "top")
_COMMANDS += ("gpu_env",)  # `argus gpu-env` (argus/cli/gpu_env.py)


class _LazyGroup(click.Group):
    """Each subcommand's module is imported when that command runs: `argus attach` does not
    import the export, daemon or live-view code before it starts tracing (its start-up is
    what issue 14 times). `argus --help` imports them all, for their one-line help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n.replace("_", "-") for n in _COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = cmd_name.replace("-", "_")
        if module not in _COMMANDS:
            return None
        return importlib.import_module(f"argus.cli.{module}").command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="argus")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and debug output.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """argus: find why a distributed GPU training job is slow or stuck.

    Attaches eBPF probes to running ranks (CUDA runtime, NCCL, PyTorch c10d, CPU stacks),
    records per-rank timelines and diagnoses stragglers, stalls and hangs.
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code instead of exiting."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in args or "--verbose" in args
    try:
        rv = cli.main(args=args, prog_name="argus", standalone_mode=False)
    except ArgusError as err:
        if verbose:
            traceback.print_exc()
        click.echo(f"argus: {err}", err=True)
        if err.remedy:
            click.echo(f"  {err.remedy}", err=True)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("argus: aborted", err=True)
        return 1
    except click.ClickException as err:
        err.show()
        return 2 if isinstance(err, click.UsageError) else err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
