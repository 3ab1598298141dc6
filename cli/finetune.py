"""`branchnas finetune`: stage 4, fine-tune the branched network of the chosen tree."""

from __future__ import annotations

import click
from branchnas_cli._options import force_option, load, recipe_options, run_stage_command


@click.command(name="finetune")
@recipe_options
@force_option
@click.option(
    "--weighting", type=click.Choice(["uniform", "uncertainty", "dwa", "rlw", "pcgrad", "gradnorm", "mgda", "graddrop",
                                      "imtl", "gradvac", "famo"]), default=None,
    help="Loss weighting (shortcut for --set finetune.weighting=...; options with --set finetune.weighting="
         "'{ name = \"gradnorm\", alpha = 1.5 }'); default: the recipe's (uncertainty).",
)
@click.option(
    "--variant", type=click.Choice(["plain", "gated", "fused", "attentive"]), default=None,
    help="Fine-tuning variant (shortcut for --set finetune.variant=...): plain; gated (GatedMTL gates in the "
         "shared blocks, pruned after training; [finetune.gated]); fused (Task Fusion layers, task parameters "
         "trained by their own task's loss; [finetune.fused]); attentive (ASTMT: per-task SE and BatchNorm, one "
         "pass per task, adversarial gradients; [finetune.attentive]).",
)
def command(recipe: str | None, overrides: tuple[str, ...], force: bool, weighting: str | None,
            variant: str | None) -> None:
    """Build the branched network of the searched tree and fine-tune it on all tasks.

    Runs the earlier stages first if they are not done. The nodes start from the single-task
    models of stage 1 (finetune.init); the training settings are the recipe's [finetune]
    section. Prints per-task test metrics next to the single-task ones, Δ_MTL, parameters
    and FLOPs (fvcore, one multiply-add = one flop, per image); writes finetune/model.pt and
    finetune/report.json in the run directory. An interrupted run resumes where it stopped.
    A tree that is unchanged is not fine-tuned again, however the search was called.

    With --variant gated the network is pruned after training to the channels its gates
    chose; the pruned size is what is printed and checked against the search budget, and a
    table (and finetune/gates.png) shows each task's share of task-specific channels.
    """
    from branchnas.finetune import report_table
    from branchnas.stages.finetune import read_report

    if weighting is not None:
        overrides = (*overrides, f"finetune.weighting={weighting}")
    if variant is not None:
        overrides = (*overrides, f"finetune.variant={variant}")
    resolved = load(recipe, overrides)
    rundir, _ = run_stage_command(resolved, "finetune", force=force)
    click.echo(report_table(read_report(rundir)))
    click.echo(f"wrote {rundir.path / 'finetune' / 'model.pt'} and report.json")
