"""`branchnas compare`: single-task, all-shared, chosen and random trees side by side."""

from __future__ import annotations

import click
from branchnas_cli._options import force_option, load, recipe_options, run_stage_command


@click.command(name="compare")
@recipe_options
@force_option
@click.option("--random", "random_trees", type=click.IntRange(min=0), default=None,
              help="Also fine-tune this many random trees within ±10% of the chosen tree's "
                   "parameters (shortcut for --set finetune.compare_random=N).")
@click.option("--variants", default=None, metavar="LIST",
              help="Comma-separated fine-tuning variants to train on the chosen tree, one row each "
                   "(shortcut for --set finetune.compare_variants=[...]); default: plain,gated.")
def command(recipe: str | None, overrides: tuple[str, ...], force: bool, random_trees: int | None,
            variants: str | None) -> None:
    """Fine-tune and tabulate the single-task models, the all-shared network and the chosen tree.

    As in the paper's Tables 1 and 2: parameters, FLOPs (fvcore, one multiply-add = one
    flop, per image), every task's primary test metric and Δ_MTL against the single-task
    models. The chosen tree's model is stage 4's; the all-shared and random trees, and the
    chosen tree under each other variant of finetune.compare_variants (gated by default), are
    fine-tuned here with the same settings. Writes compare/compare.json and compare/compare.md.
    """
    from branchnas.compare import comparison_table
    from branchnas.stages.compare import read_comparison

    if random_trees is not None:
        overrides = (*overrides, f"finetune.compare_random={random_trees}")
    if variants is not None:
        names = [v.strip() for v in variants.split(",") if v.strip()]
        overrides = (*overrides, "finetune.compare_variants=[" + ", ".join(f'"{v}"' for v in names) + "]")
    resolved = load(recipe, overrides)
    rundir, _ = run_stage_command(resolved, "compare", force=force)
    click.echo(comparison_table(read_comparison(rundir)))
    click.echo(f"wrote {rundir.path / 'compare' / 'compare.md'} and compare.json")
