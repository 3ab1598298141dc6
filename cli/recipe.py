"""`branchnas recipe`: print the resolved recipe, or validate one."""

from __future__ import annotations

import click
from branchnas_cli._options import load, recipe_options


@click.command(name="recipe")
@recipe_options
@click.option("--check", is_flag=True,
              help="Validate, including every stage's checks (data layout, budget, device, packages); "
                   "print a one-line summary. Nothing is trained or written.")
def command(recipe: str | None, overrides: tuple[str, ...], check: bool) -> None:
    """Print RECIPE resolved (built-in defaults, then the file, then --set) as TOML.

    With no RECIPE it uses ./branchnas.toml if present, else the built-in default recipe,
    so `branchnas recipe > branchnas.toml` gives a complete recipe to edit.
    """
    from branchnas.recipe import recipe_to_toml

    resolved = load(recipe, overrides)
    if check:
        from branchnas import pipeline

        pipeline.check(resolved, pipeline.plan(pipeline.default_stages(resolved), resolved))
        tasks = ", ".join(t.name for t in resolved.tasks) or "the dataset's default tasks"
        click.echo(
            f"ok: recipe '{resolved.name}' — dataset {resolved.data.dataset}, "
            f"backbone {resolved.backbone.name}, tasks: {tasks}; run directory {resolved.run_dir}; "
            f"checked: {', '.join(pipeline.plan(pipeline.default_stages(resolved), resolved))}"
        )
        return
    click.echo(recipe_to_toml(resolved), nl=False)
