"""``compare`` (optional): single-task, all-shared, chosen, runner-up and random trees side by side,
and the chosen tree under every fine-tuning variant of ``finetune.compare_variants``.

The work is :func:`branchnas.compare.compare_trees`. Keyed, like fine-tuning, on the trees
it trains (the ranked trees of the search), not on how the search was called.

Artifacts in ``compare/``: ``compare.json`` (rows of params, FLOPs, test metrics, Δ_MTL) and
``compare.md`` (the same as a Markdown table), plus each extra tree's fine-tuned model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from branchnas.stages._base import Artifact, Stage, StageContext, get_stage, register_stage
from branchnas.stages.finetune import VARIANT_SECTIONS

__all__ = ["CompareStage", "read_comparison", "read_comparison_markdown"]


@register_stage
class CompareStage(Stage):
    name = "compare"
    summary = "Fine-tune single-task, all-shared and chosen trees side by side."
    requires = ("pretrain", "search", "finetune")
    optional = True
    artifacts = (
        Artifact("compare.json", "one row per model: partitions, params, FLOPs, test metrics, Δ_MTL"),
        Artifact("compare.md", "the comparison as a Markdown table"),
        Artifact("weightings.png", "with finetune.compare_weightings: Δ_MTL and time per epoch of each loss weighting"),
    )

    def dependencies(self, recipe: Any, options: Mapping[str, Any]) -> tuple[str, ...]:
        # It fine-tunes trees as stage 4 does, so it reads what stage 4 reads.
        extra = tuple(d for d in get_stage("finetune").dependencies(recipe, options) if d not in self.requires)
        return (*self.requires, *extra)

    def keyed_on(self, recipe: Any, options: Mapping[str, Any]) -> tuple[str, ...]:
        return ("pretrain", "finetune")

    def config(self, recipe: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        config = get_stage("finetune").config(recipe, options) | {
            "compare_random": recipe.finetune.compare_random,
            "compare_variants": recipe.finetune.compare_variants,
            "compare_weightings": recipe.finetune.compare_weightings,
        }
        for variant in recipe.finetune.compare_variants:  # the settings of each variant it trains
            if variant in VARIANT_SECTIONS:
                config["finetune"][variant] = dataclasses.asdict(getattr(recipe.finetune, variant))
        return config

    def fingerprint_extra(self, recipe: Any, rundir: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        from branchnas.finetune import tree_to_json
        from branchnas.rundir import file_sha256
        from branchnas.stages.search import read_ranked
        from branchnas.stages.tune import final_model

        path, source = final_model(rundir, recipe)  # the tuned network is a row once `branchnas tune` has run
        return {"ranked": [tree_to_json(t) for t in read_ranked(rundir)],
                **({"tuned": file_sha256(path)} if source == "tune" else {})}

    def check(self, recipe: Any, options: Mapping[str, Any]) -> None:
        from branchnas.compare import check_weightings
        from branchnas.finetune import check_variant

        get_stage("finetune").check(recipe, options)
        for variant in recipe.finetune.compare_variants:
            check_variant(recipe, variant)
        check_weightings(recipe.finetune.compare_weightings)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from branchnas.compare import compare_trees, comparison_markdown, plot_weightings
        from branchnas.rundir import atomic_write_json, atomic_write_text

        data = compare_trees(ctx.recipe, ctx.rundir, ctx.folder)
        outputs = ["compare.json", "compare.md"]
        if any(row["kind"] == "weighting" for row in data["rows"]):
            plot_weightings(data, ctx.folder / "weightings.png")
            outputs.append("weightings.png")
        atomic_write_json(ctx.folder / "compare.json", data)
        atomic_write_text(ctx.folder / "compare.md", comparison_markdown(data))
        return {"outputs": outputs, "models": len(data["rows"])}


def read_comparison(rundir: Any) -> dict[str, Any]:
    """``compare/compare.json`` of a run."""
    return get_stage("compare").read_json(rundir, "compare.json")


def read_comparison_markdown(rundir: Any) -> str | None:
    """``compare/compare.md``, or ``None`` when ``compare`` has not run."""
    path = get_stage("compare").path(rundir, "compare.md")
    return path.read_text() if path.exists() else None
