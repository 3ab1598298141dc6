"""`branchnas run`: the whole pipeline against one run directory."""

from __future__ import annotations

import click
from branchnas_cli._options import load, recipe_options

STAGES = ("pretrain", "affinity", "search", "finetune", "export")


@click.command(name="run")
@recipe_options
@click.option("--until", type=click.Choice(STAGES), help="Stop after this stage.")
@click.option("--from", "start", type=click.Choice(STAGES), help="Redo this stage and every later one.")
@click.option("--budget", help="Shortcut for --set search.budget=... (e.g. 1M, 500k).")
@click.option("--force", is_flag=True, help="Redo every stage.")
def command(recipe, overrides, until, start, budget, force):  # noqa: ANN001
    """Run pretrain → affinity → search → finetune → export, then write the report.

    With no RECIPE it uses ./branchnas.toml if present, else the built-in default recipe
    (generated shapes data; a few minutes on a laptop CPU). A re-run skips finished stages
    and a killed run resumes where it stopped. The run directory gets report.md with the
    figures; `branchnas report` prints it again.
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
