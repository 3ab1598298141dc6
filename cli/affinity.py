"""`branchnas affinity`: stage 2, RSA task affinity at every branch point."""

from __future__ import annotations

import click
from branchnas_cli._options import force_option, load, recipe_options, run_stage_command


@click.command(name="affinity")
@recipe_options
@force_option
@click.option("--images", "images", type=click.IntRange(min=3), default=None, metavar="K",
              help="Held-out images for the RDMs (shortcut for --set affinity.images=K).")
@click.option("--bootstrap", "bootstrap", type=click.IntRange(min=0), default=None, metavar="B",
              help="Bootstrap resamples of the images for 95% intervals; 0 = off "
                   "(shortcut for --set affinity.bootstrap=B).")
def command(recipe: str | None, overrides: tuple[str, ...], force: bool, images: int | None,
            bootstrap: int | None) -> None:
    """Measure how alike the tasks' single-task models are at each branch point.

    For K held-out images, each task's model gives one dissimilarity matrix (1 - Pearson
    correlation between the images' features) per branch point; two tasks' affinity there
    is the Spearman correlation of their matrices. Trains the single-task models first if
    they are missing. Writes affinity/affinity.npz, affinity.json, one heatmap per branch
    point and depth.png (affinity against depth).
    """
    from branchnas.affinity import format_affinity
    from branchnas.stages.affinity import read_affinity

    # As --set overrides, so the saved recipe.toml records them too.
    if images is not None:
        overrides = (*overrides, f"affinity.images={images}")
    if bootstrap is not None:
        overrides = (*overrides, f"affinity.bootstrap={bootstrap}")
    resolved = load(recipe, overrides)
    rundir, _ = run_stage_command(resolved, "affinity", force=force)
    saved = read_affinity(rundir)
    click.echo(format_affinity(saved["affinity"], saved["tasks"], saved["points"], saved["low"], saved["high"]))
    click.echo(f"\nK = {saved['images']} images; wrote {rundir.path / 'affinity'}/"
               "affinity.npz, affinity.json and heatmaps")
