"""Stage 6, ``export``: the fine-tuned network as checked, self-describing files.

The work is :func:`branchnas.export.export_model`. The stage writes one file per format of
``export.format`` into its own folder (``model.pt`` TorchScript, ``model.pt2`` torch.export,
``model.onnx``), swapped in only once every file has been reloaded in a clean process and
matched the eager model. ``export.output`` (or ``branchnas export -o FILE``) writes a further
copy of the first format elsewhere; that never touches the stage's own files (:func:`export_to`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from branchnas.errors import UserError, unknown_choice
from branchnas.stages._base import Artifact, Stage, StageContext, register_stage

__all__ = ["ExportStage", "export_to", "file_name", "check_export", "export_formats"]


def file_name(fmt: str) -> str:
    """The stage's file for format ``fmt``."""
    from branchnas.export import FILE_NAMES

    return FILE_NAMES[fmt]


def export_formats(recipe: Any) -> list[str]:
    """``export.format`` as a list (one format or several)."""
    fmt = recipe.export.format
    return [fmt] if isinstance(fmt, str) else list(fmt)


def check_export(recipe: Any, fmt: str | None = None) -> None:
    """The formats are known and their packages are installed (checked before any training)."""
    from branchnas.export import FORMATS
    from branchnas.stages._checks import check_package

    for one in [fmt] if fmt else export_formats(recipe):
        if one not in FORMATS:
            raise UserError(unknown_choice("export format", one, FORMATS))
        if one == "onnx":
            fix = "pip install 'branchnas[onnx]', or use --format torchscript"
            check_package("onnx", "export.format = 'onnx'", fix)
            check_package("onnxscript", "export.format = 'onnx' (torch's ONNX exporter)", fix)
            if recipe.export.check:
                check_package("onnxruntime", "checking an ONNX export",
                              "pip install 'branchnas[onnx]', or --set export.check=false")


@register_stage
class ExportStage(Stage):
    name = "export"
    summary = "Stage 6: export the fine-tuned network (TorchScript, torch.export, ONNX), checked in a clean process."
    requires = ("finetune",)
    artifacts = (
        Artifact("model.pt", "TorchScript with branchnas.json metadata (task names, preprocessing, tree)"),
        Artifact("model.pt2", "torch.export ExportedProgram (dynamic batch) with the same metadata as an extra file"),
        Artifact("model.onnx", "ONNX (dynamic batch) with the same metadata as a model property"),
    )

    def dependencies(self, recipe: Any, options: Mapping[str, Any]) -> tuple[str, ...]:
        # With tune.enabled the tuned network is the final one, so the tune stage runs first.
        return (*self.requires, "tune") if recipe.tune.enabled else self.requires

    def config(self, recipe: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"export": dataclasses.asdict(recipe.export)}

    def fingerprint_extra(self, recipe: Any, rundir: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        # Which network is exported (stage 4's, or the tuned one once `branchnas tune` has run), by content.
        from branchnas.rundir import file_sha256
        from branchnas.stages.tune import final_model

        path, source = final_model(rundir, recipe)
        return {"model": {"source": source, "sha256": file_sha256(path)}}

    def check(self, recipe: Any, options: Mapping[str, Any]) -> None:
        check_export(recipe)
        if recipe.export.output:
            _check_target(Path(recipe.export.output))

    def run(self, ctx: StageContext) -> dict[str, Any]:
        formats = export_formats(ctx.recipe)
        files = {}
        for fmt in formats:
            name = file_name(fmt)
            result = export_to(ctx.recipe, ctx.rundir, ctx.folder / name, fmt)
            files[fmt] = {"path": str((ctx.rundir.path / self.name / name).resolve()),
                          "max_abs_diff": result["max_abs_diff"], "checked": result["checked"]}
        first = files[formats[0]]
        # The first format's fields at the top level, as before several formats existed.
        extras = {"outputs": [file_name(f) for f in formats], "format": formats[0], "path": first["path"],
                  "source": result["source"],
                  "max_abs_diff": first["max_abs_diff"], "checked": first["checked"], "formats": files}
        if ctx.recipe.export.output:
            copy = export_to(ctx.recipe, ctx.rundir, Path(ctx.recipe.export.output), formats[0])
            extras["copy"] = copy["path"]
        return extras


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"export output {str(path)!r} is a folder; give a file name such as model.pt")
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"export output {str(path)!r}: {str(probe)!r} is not a folder")


def _check_budget(recipe: Any, rundir: Any, source: str) -> None:
    """A fine-tuned network over the search budget (a gated one can grow) is not exported silently."""
    from branchnas.budget import format_count
    from branchnas.stages.finetune import read_report
    from branchnas.stages.tune import read_tuned

    report = read_tuned(rundir, recipe) if source == "tune" else read_report(rundir)
    budget = (report or {}).get("budget") or {}
    if budget.get("within") is False and not recipe.export.over_budget:
        from branchnas.variants import over_budget_fix

        variant = (report or {}).get("variant", "plain")
        raise UserError(
            f"the fine-tuned {variant} network has {format_count(budget['size'])} {budget['metric']}, over the budget "
            f"of {format_count(budget['limit'])}; {over_budget_fix(variant)} and fine-tune again, or export it anyway "
            "with --set export.over_budget=true"
        )


def export_to(recipe: Any, rundir: Any, path: str | Path, fmt: str | None = None) -> dict[str, Any]:
    """Export the run's final network to ``path`` (checked, atomic); nothing else is touched.

    The final network is the tuned one when ``branchnas tune`` is done for this tree and found
    a trial within the budget, else stage 4's (:func:`branchnas.stages.tune.final_model`).

    Returns:
        :func:`branchnas.export.export_model`'s result: ``path``, ``format``, ``checked``,
        ``max_abs_diff``.
    """
    from branchnas.export import build_metadata, export_model
    from branchnas.finetune import load_checkpoint_info, load_model_file
    from branchnas.stages.tune import final_model

    fmt = fmt or export_formats(recipe)[0]
    check_export(recipe, fmt)
    path = Path(path)
    _check_target(path)
    source_path, source = final_model(rundir, recipe)
    _check_budget(recipe, rundir, source)
    net = load_model_file(source_path)
    metadata = build_metadata(net, load_checkpoint_info(source_path))
    result = export_model(net, path.resolve(), metadata, format=fmt, check=recipe.export.check, atol=recipe.export.atol)
    return {**result, "source": source}
