"""The ``branchnas`` command: a click group whose subcommands load lazily.

``branchnas --help`` and ``branchnas --version`` import neither torch nor any stage: each
subcommand lives in its own module under this package and is imported only when it runs
(click's "lazily loading subcommands" pattern).

Under torchrun (``WORLD_SIZE`` > 1) the command runs in a process group that :func:`main`
joins first and leaves last (:mod:`branchnas.training.distributed`); the processes other
than rank 0 print nothing but their errors.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import traceback
from collections.abc import Iterator

# How long idle OpenMP threads spin before they sleep (set before torch loads; a value the user
# set wins). Measured on this 2-core CPU, a ResNet-20 training step (batch 64, 2 threads) takes
# 117 ms with libgomp's default spin, 120 ms with 10,000, 152 ms with OMP_WAIT_POLICY=PASSIVE;
# with a second such process on the same cores: 970, 350 and 265 ms. A short spin keeps nearly
# all the speed of spinning and most of the safety of passive waiting.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import click

from branchnas import __version__

#: commands that are not pipeline stages: name -> one-line help shown by ``--help``
_OTHER_COMMANDS: dict[str, str] = {
    "run": "Run the whole pipeline (pretrain → affinity → search → finetune [→ tune] → export).",
    "report": "Print the report of a finished run.",
    "recipe": "Show the resolved recipe, or validate one (--check runs every stage's checks).",
    "datasets": "List the dataset families and their targets.",
    "tasks": "List the task kinds with their losses and metrics.",
    "backbones": "List the backbones with branch points, params and FLOPs.",
    "profile": "Measure the per-block latency table on this machine (for search.metric latency).",
}


def _commands() -> dict[str, str]:
    """Command name -> one-line help: ``run``, then one per registered stage, then the rest.

    The stage registry imports no torch, so ``branchnas --help`` stays fast.
    """
    from branchnas.stages import REGISTRY, stage_names

    stages = {name: REGISTRY[name].summary for name in stage_names()}
    return {"run": _OTHER_COMMANDS["run"], **stages, **{k: v for k, v in _OTHER_COMMANDS.items() if k != "run"}}


COMMANDS = _commands()

_state: dict[str, object] = {"debug": False, "rank": 0}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"branchnas_cli.{name}")
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # `branchnas --help` lists the commands from COMMANDS, importing none of them.
        rows = list(COMMANDS.items())
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def resolve_command(self, ctx, args):  # type: ignore[no-untyped-def]
        cmd_name = click.utils.make_str(args[0]) if args else None
        if cmd_name and cmd_name not in COMMANDS and not cmd_name.startswith("-"):
            from branchnas.errors import unknown_choice

            raise click.UsageError(unknown_choice("command", cmd_name, COMMANDS), ctx)
        return super().resolve_command(ctx, args)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="branchnas")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bars and no progress messages on stderr (errors are still shown). "
                   "Progress bars are drawn only when stderr is a terminal anyway.")
def cli(debug: bool, quiet: bool) -> None:
    """branchnas: decide which encoder layers your vision tasks should share.

    Give it tasks that share one image encoder and a parameter, FLOP or latency budget. It trains
    one model per task, measures task affinity at every branch point, finds the branched
    network that fits the budget, fine-tunes it and exports it as TorchScript.

    \b
    Quick start (built-in shapes data, CPU is fine):
      branchnas run                      the whole pipeline on the default recipe
      branchnas search --budget 800k     the best tree within 800k parameters
      branchnas recipe > my.toml         a recipe to edit

    run, search, compare, tune, report, datasets, tasks and backbones take --json: one JSON
    document on stdout, for scripts.
    """
    from branchnas.progress import set_quiet

    _state["debug"] = debug
    set_quiet(quiet or _state["rank"] != 0)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line and exit status 2."""
    from branchnas.errors import UserError

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:  # a bare `branchnas` is a request for help, not a usage error
        args = ["--help"]
    _state["debug"] = "--debug" in args
    try:
        with _processes():
            rv = cli.main(args=args, prog_name="branchnas", standalone_mode=False)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted; run the same command again to resume.", err=True)
        sys.exit(130)
    except UserError as err:
        if _state["debug"]:
            traceback.print_exc()
        where = f" (rank {_state['rank']})" if _state["rank"] else ""
        click.echo(f"Error{where}: {err}", err=True)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)


@contextlib.contextmanager
def _processes() -> Iterator[None]:
    """Under torchrun: join the process group for the command, then leave it; else nothing.

    A process other than rank 0 prints nothing on stdout and shows no progress.
    """
    try:
        several = int(os.environ.get("WORLD_SIZE") or 1) > 1
    except ValueError:
        several = False
    if not several:
        yield
        return
    from branchnas.training import distributed

    distributed.init_from_env()
    _state["rank"] = distributed.rank()
    if distributed.is_main():
        yield
    else:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    # Only after success: a process that fails exits, and torchrun stops the others.
    distributed.shutdown()


if __name__ == "__main__":
    main()
