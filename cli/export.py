"""`branchnas export`: stage 6, the fine-tuned network as checked TorchScript, torch.export or ONNX files."""

from __future__ import annotations

from pathlib import Path

import click
from branchnas_cli._options import force_option, set_option


@click.command(name="export")
@click.argument("source", required=False, metavar="[RUN_OR_RECIPE]", type=click.Path())
@set_option
@force_option
@click.option("--format", "fmt", type=click.Choice(["torchscript", "torch.export", "onnx"]), multiple=True,
              help="File format, repeatable (default: the recipe's export.format, torchscript): torchscript "
                   "(model.pt), torch.export (model.pt2), onnx (model.onnx; pip install 'branchnas[onnx]').")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the export to this file instead; the run's own export/ is left as it is.")
def command(source: str | None, overrides: tuple[str, ...], force: bool, fmt: tuple[str, ...],
            output: str | None) -> None:
    """Export the fine-tuned network with its task names and preprocessing as metadata.

    RUN_OR_RECIPE is a run directory (holding recipe.toml) or a recipe file; default
    ./branchnas.toml, else the built-in default recipe. Earlier stages run first if they are
    not done. The file is reloaded in a separate Python process that cannot import
    branchnas and must reproduce the eager outputs within export.atol, or nothing is
    written. --format may be given several times (one file each). See docs/exported-model.md
    for using the files from plain PyTorch.
    """
    from branchnas.errors import UserError
    from branchnas.pipeline import run_stages
    from branchnas.recipe import load_recipe
    from branchnas.rundir import RunDir
    from branchnas.stages.export import check_export, export_to

    if fmt:
        overrides = (*overrides, "export.format=[" + ", ".join(f'"{f}"' for f in fmt) + "]")
    rundir = None
    if source is not None and Path(source).is_dir():
        recipe_file = Path(source) / "recipe.toml"
        if not recipe_file.exists():
            raise UserError(f"{source} is a folder without recipe.toml; pass a run directory or a recipe file")
        resolved = load_recipe(recipe_file, list(overrides))
        rundir = RunDir(source)
    else:
        resolved = load_recipe(source, list(overrides))
    if output is not None:
        # Another file: the stage's own export stays as it is; only the final network must be done.
        check_export(resolved)
        rundir, _ = run_stages(resolved, ["tune" if resolved.tune.enabled else "finetune"], rundir=rundir)
        result = export_to(resolved, rundir, output)
    else:
        rundir, results = run_stages(resolved, ["export"], force=["export"] if force else [], rundir=rundir)
        result = results["export"]
        if result.get("skipped"):
            click.echo("export: already done with these inputs (use --force to redo)")
    files = result.get("formats") or {result["format"]: result}
    for name, entry in files.items():
        diffs = entry.get("max_abs_diff") or {}
        check = (f"checked in a clean process without branchnas: max |diff| {max(diffs.values(), default=0.0):.2g} "
                 f"<= {resolved.export.atol:g}") if entry.get("checked") else "not checked (export.check = false)"
        click.echo(f"wrote {entry['path']} ({name}); {check}")
    if result.get("source") == "tune":
        click.echo("the exported network is the tuned one (tune/model.pt: the best tuning trial within the budget)")
