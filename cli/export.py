"""`branchnas export`: stage 6, the fine-tuned network as a checked TorchScript file."""

from __future__ import annotations

from pathlib import Path

import click
from branchnas_cli._options import force_option, set_option


@click.command(name="export")
@click.argument("source", required=False, metavar="[RUN_OR_RECIPE]", type=click.Path())
@set_option
@force_option
@click.option("--format", "fmt", type=click.Choice(["torchscript", "onnx"]), default=None,
              help="File format (default: the recipe's export.format, torchscript). ONNX needs `pip install onnx`.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output file (default: the recipe's export.output, else <run dir>/export/model.pt).")
def command(source: str | None, overrides: tuple[str, ...], force: bool, fmt: str | None, output: str | None) -> None:
    """Export the fine-tuned network with its task names and preprocessing as metadata.

    RUN_OR_RECIPE is a run directory (holding recipe.toml) or a recipe file; default
    ./branchnas.toml, else the built-in default recipe. Earlier stages run first if they are
    not done. The file is reloaded in a separate Python process that cannot import
    branchnas and must reproduce the eager outputs within export.atol, or nothing is
    written. See docs/exported-model.md for using the file from plain PyTorch.
    """
    from branchnas import export
    from branchnas.errors import UserError
    from branchnas.pipeline import open_run
    from branchnas.recipe import load_recipe
    from branchnas.rundir import RunDir

    if fmt is not None:
        overrides = (*overrides, f"export.format={fmt}")
    if source is not None and Path(source).is_dir():
        recipe_file = Path(source) / "recipe.toml"
        if not recipe_file.exists():
            raise UserError(f"{source} is a folder without recipe.toml; pass a run directory or a recipe file")
        resolved = load_recipe(recipe_file, list(overrides))
        rundir = RunDir(source)
        with rundir.locked():
            rundir.save_recipe(resolved)
    else:
        resolved = load_recipe(source, list(overrides))
        rundir = open_run(resolved)
    result = export.run(resolved, rundir, force=force, output=output)
    if result.get("skipped"):
        click.echo("export: already done with these inputs (use --force to redo)")
    diffs = result.get("max_abs_diff") or {}
    check = (f"checked in a clean process without branchnas: max |diff| {max(diffs.values(), default=0.0):.2g} "
             f"<= {resolved.export.atol:g}") if result.get("checked") else "not checked (export.check = false)"
    click.echo(f"wrote {result['path']} ({result['format']}); {check}")
