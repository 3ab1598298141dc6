"""`branchnas pretrain`: stage 1, one single-task model per task."""

from __future__ import annotations

import click
from branchnas_cli._options import force_option, load, recipe_options, run_stage_command


def _split_tasks(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("expected task names separated by commas, e.g. --tasks depth,shape")
    return names


@click.command(name="pretrain")
@recipe_options
@force_option
@click.option("--tasks", "tasks", default=None, metavar="A,B", callback=_split_tasks,
              help="Train only these tasks (comma-separated); a later run trains the rest.")
def command(recipe: str | None, overrides: tuple[str, ...], force: bool, tasks: list[str] | None) -> None:
    """Train one single-task model per task: the recipe's backbone plus the task's head.

    The models train together on shared batches (pretrain.concurrent), with the recipe's
    [pretrain] settings. Writes pretrain/<task>.pt and pretrain/metrics.json in the run
    directory and prints each task's validation and test metric next to the chance level
    (the best constant prediction). A model already trained is not trained again; a killed
    run continues from its last finished epoch.
    """
    from branchnas.pretrain import metrics_table
    from branchnas.stages.pretrain import read_metrics

    resolved = load(recipe, overrides)
    rundir, result = run_stage_command(resolved, "pretrain", force=force, options={"tasks": tasks} if tasks else {})
    click.echo(metrics_table(read_metrics(rundir)))
    missing = result.get("missing") or []
    if missing:
        click.echo(f"still to train: {', '.join(missing)} (run `branchnas pretrain` to train them)")
    click.echo(f"models and metrics in {rundir.path / 'pretrain'}")
