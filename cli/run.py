"""`branchnas run`: the whole pipeline against one run directory."""

from __future__ import annotations

import click
from branchnas_cli._options import load, recipe_options


class _StageChoice(click.Choice):
    """The registered stages, read when the command is built (importing no torch)."""

    def __init__(self) -> None:
        from branchnas.stages import stage_names

        super().__init__(stage_names())


@click.command(name="run")
@recipe_options
@click.option("--until", type=_StageChoice(), help="Stop after this stage (an optional stage such as compare runs too).")
@click.option("--from", "start", type=_StageChoice(), help="Redo this stage and every later one.")
@click.option("--budget", help="Shortcut for --set search.budget=... (e.g. 1M, 500k).")
@click.option("--force", is_flag=True, help="Redo every stage.")
def command(recipe, overrides, until, start, budget, force):  # noqa: ANN001
    """Run every stage of the pipeline, then write the report.

    The stages and their order come from their declared dependencies: pretrain → affinity →
    search → finetune → export (compare is optional: --until compare). With no RECIPE it
    uses ./branchnas.toml if present, else the built-in default recipe (generated shapes
    data; a few minutes on a laptop CPU). Every stage's checks run before any work. A re-run
    skips finished stages, a killed run resumes where it stopped, and a failed stage leaves
    the previous outputs as they were. The run directory gets report.md with the figures;
    `branchnas report` prints it again.
    """
    from branchnas.pipeline import run_pipeline
    from branchnas.report import summary, write_report

    sets = list(overrides) + ([f'search.budget="{budget}"'] if budget else [])
    resolved = load(recipe, tuple(sets))
    click.echo(f"run directory: {resolved.run_dir}", err=True)
    rundir, results = run_pipeline(resolved, start=start, until=until, force=force)
    skipped = [name for name, result in results.items() if result.get("skipped")]
    if skipped:
        click.echo(f"(unchanged, skipped: {', '.join(skipped)})", err=True)
    write_report(rundir)
    click.echo(summary(rundir))
