"""`branchnas compare`: single-task, all-shared, chosen and random trees side by side."""

from __future__ import annotations

import click
from branchnas_cli._options import (
    emit_json,
    force_option,
    json_option,
    load,
    note,
    recipe_options,
    run_stage_command,
    stdout_to_stderr,
)


@click.command(name="compare")
@recipe_options
@force_option
@click.option("--random", "random_trees", type=click.IntRange(min=0), default=None,
              help="Also fine-tune this many random trees within ±10% of the chosen tree's "
                   "parameters (shortcut for --set finetune.compare_random=N).")
@click.option("--variants", default=None, metavar="LIST",
              help="Comma-separated fine-tuning variants to train on the chosen tree, one row each "
                   "(shortcut for --set finetune.compare_variants=[...]); default: plain,gated,fused,attentive.")
@click.option("--weighting", "weightings", default=None, metavar="LIST|all",
              help="Also fine-tune the chosen tree with each of these loss weightings (comma-separated, or "
                   "'all'), one row each, same seeds (shortcut for --set finetune.compare_weightings=[...]).")
@json_option
def command(recipe: str | None, overrides: tuple[str, ...], force: bool, random_trees: int | None,
            variants: str | None, weightings: str | None, as_json: bool) -> None:
    """Fine-tune and tabulate the single-task models, the all-shared network and the chosen tree.

    As in the paper's Tables 1 and 2: parameters, FLOPs (fvcore, one multiply-add = one
    flop, per image, and per task pass alone), every task's primary test metric and Δ_MTL against the single-task
    models. The chosen tree's model is stage 4's; the all-shared and random trees, and the
    chosen tree under each other variant of finetune.compare_variants (gated, fused and
    attentive by default) and each loss weighting of --weighting, are fine-tuned here with the same settings and seeds.
    The number of fine-tunes and an estimate of their time are printed first. Writes
    compare/compare.json, compare/compare.md (and weightings.png with --weighting).

    With --json: compare.json's content (tasks, split, units, random_requested, rows: one per
    model with name, kind, partitions, params, flops, test, delta_mtl, ...) plus run_dir and
    skipped.
    """
    from branchnas.compare import comparison_table
    from branchnas.stages.compare import read_comparison

    if random_trees is not None:
        overrides = (*overrides, f"finetune.compare_random={random_trees}")
    if variants is not None:
        names = [v.strip() for v in variants.split(",") if v.strip()]
        overrides = (*overrides, "finetune.compare_variants=[" + ", ".join(f'"{v}"' for v in names) + "]")
    from branchnas.report import write_report
    from branchnas.training import distributed

    if weightings is not None:
        from branchnas.compare import weighting_names

        names = weighting_names() if weightings.strip() == "all" else [w.strip() for w in weightings.split(",") if w.strip()]
        overrides = (*overrides, "finetune.compare_weightings=[" + ", ".join(f'"{w}"' for w in names) + "]")
    with stdout_to_stderr(as_json):
        resolved = load(recipe, overrides)
        _say_cost(resolved)
        rundir, outcome = run_stage_command(resolved, "compare", force=force)
        if distributed.is_main():  # under torchrun, rank 0 writes the files
            write_report(rundir)  # report.md holds the comparison, as after `branchnas run`
    if as_json:
        emit_json({"run_dir": str(rundir.path), "skipped": bool(outcome.get("skipped")),
                   **read_comparison(rundir)})
        return
    click.echo(comparison_table(read_comparison(rundir)))
    click.echo(f"wrote {rundir.path / 'compare' / 'compare.md'} and compare.json")


def _say_cost(recipe: object) -> None:
    """How many networks compare fine-tunes, and about how long that takes, before it starts."""
    cfg = recipe.finetune  # type: ignore[attr-defined]
    count = 1 + cfg.compare_random + len([v for v in cfg.compare_variants if v != cfg.variant])
    count += len([w for w in cfg.compare_weightings if w != cfg.weighting])
    estimate = ""
    report = recipe.run_dir / "finetune" / "report.json"  # type: ignore[attr-defined]
    if report.exists():
        import json

        history = json.loads(report.read_text()).get("training", {}).get("history", [])
        seconds = sum(float(h.get("seconds") or 0) for h in history)
        if seconds:
            estimate = (f"; stage 4 took {seconds / 60:.1f} min here, so about {count * seconds / 60:.0f} min "
                        "(gradient-surgery weightings and the gated, fused and attentive variants take longer)")
    note(f"compare: up to {count} fine-tunes (all-shared, random trees, variants, weightings; "
         f"each resumes if interrupted){estimate}")
