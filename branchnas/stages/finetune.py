"""Stage 4, ``finetune``: the branched network of the chosen tree, fine-tuned on all tasks.

The work is :func:`branchnas.finetune.finetune_tree`. The stage is keyed on the *tree it
trains* (and on the single-task models it starts from), not on how the search was called:
exploring budgets or affinity files with ``branchnas search`` never discards a fine-tuned
network whose tree is unchanged.

Artifacts in ``finetune/``: ``model.pt`` (weights plus everything needed to rebuild the
network without the data), ``report.json`` (per-task metrics, baselines, Δ_MTL, size, the
budget check), ``history.csv`` (the training history, one row per epoch) and, for the gated
variant, ``gates.png``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from branchnas.stages._base import Artifact, Stage, StageContext, get_stage, register_stage

__all__ = ["FinetuneStage", "read_report", "load_finetuned", "model_path"]

#: Keys of ``[finetune]`` that do not change what stage 4 computes: ``compare_*`` are read
#: only by ``branchnas compare``, ``device`` says where it runs (as in stage 1).
#: ``[finetune.<variant>]`` sections: each keys the fine-tune only when its variant is chosen.
VARIANT_SECTIONS = ("gated", "fused", "attentive")
NOT_FINGERPRINTED = ("compare_random", "compare_variants", "compare_weightings", "device", "log")


@register_stage
class FinetuneStage(Stage):
    name = "finetune"
    summary = "Stage 4: build the branched network and fine-tune it."
    distributed = True
    requires = ("pretrain", "search")
    artifacts = (
        Artifact("model.pt", "the fine-tuned network: weights, tree, tasks, preprocessing"),
        Artifact("report.json", "per-task val/test metrics, single-task baselines, Δ_MTL, params, FLOPs, budget check"),
        Artifact("gates.png", "gated variant: heatmap of each task's task-specific channels per shared node"),
        Artifact("history.csv", "the training history, one row per epoch: lr, time, train losses, val metrics"),
    )

    def dependencies(self, recipe: Any, options: Mapping[str, Any]) -> tuple[str, ...]:
        # init = "central"/"outlier" picks each group's source task by affinity.
        return (*self.requires, "affinity") if recipe.finetune.init in ("central", "outlier") else self.requires

    def keyed_on(self, recipe: Any, options: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(d for d in self.dependencies(recipe, options) if d != "search")

    def config(self, recipe: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        """``[finetune]`` (less what does not change the result), tasks, batch, augmentation, seed.

        The data, tasks and backbone also reach it through pretrain's fingerprint.
        """
        finetune = {k: v for k, v in dataclasses.asdict(recipe.finetune).items() if k not in NOT_FINGERPRINTED}
        # What every run computed before these keys existed: keyed as before.
        if finetune.get("precision") == "fp32":
            finetune.pop("precision")
        if not finetune.get("sync_bn"):
            finetune.pop("sync_bn", None)
        for section in VARIANT_SECTIONS:  # a variant's own settings change only that variant
            if recipe.finetune.variant != section:
                finetune.pop(section)
        return {
            "finetune": finetune,
            "tasks": [dataclasses.asdict(t) for t in recipe.tasks],
            "batch_size": recipe.data.batch_size,
            "augment": recipe.data.augment,
            "seed": recipe.seed,
        }

    def fingerprint_extra(self, recipe: Any, rundir: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        from branchnas.finetune import tree_to_json
        from branchnas.stages.search import read_tree

        return {"tree": tree_to_json(read_tree(rundir))}

    def check(self, recipe: Any, options: Mapping[str, Any]) -> None:
        from branchnas.finetune import check_variant
        from branchnas.stages._checks import (
            check_device,
            check_log,
            check_precision,
            check_processes,
            splits_of,
        )

        check_variant(recipe)  # an unknown variant is refused before the data is opened
        if recipe.finetune.variant != "plain":
            check_variant(recipe, task_names=[t.name for t in splits_of(recipe)[1]])
        check_device(recipe.finetune.device, "finetune.device")
        check_precision(recipe.finetune.precision, recipe.finetune.device, "finetune.precision")
        check_log(recipe.finetune.log, "finetune.log")
        check_processes(recipe, "finetune")
        _check_weighting_under_ddp(recipe)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from branchnas.finetune import finetune_tree
        from branchnas.stages.search import read_tree

        report = finetune_tree(ctx.recipe, ctx.rundir, read_tree(ctx.rundir), ctx.folder, desc="finetune")
        outputs = ["model.pt", "report.json"] + (["gates.png"] if "gates" in report else [])
        outputs += ["history.csv"] if (ctx.folder / "history.csv").exists() else []
        return {"outputs": outputs, "delta_mtl": report["delta_mtl"], "variant": report["variant"],
                "params": report["params"], "flops": report["flops"],
                "within_budget": (report.get("budget") or {}).get("within")}


def _check_weighting_under_ddp(recipe: Any) -> None:
    """Under torchrun, refuse a loss weighting that cannot train under DDP (``ddp_conflict``)."""
    from branchnas.errors import UserError
    from branchnas.training import distributed
    from branchnas.weighting import WEIGHTINGS

    if distributed.world_size() == 1:
        return
    spec = recipe.finetune.weighting
    name = spec.get("name") if isinstance(spec, Mapping) else spec
    conflict = getattr(WEIGHTINGS.get(name), "ddp_conflict", "")
    if conflict:
        usable = ", ".join(n for n, cls in WEIGHTINGS.items() if not cls.ddp_conflict)
        raise UserError(f"finetune.weighting: '{name}' cannot train under torchrun (DDP): {conflict}; "
                        f"choose one of {usable}, or train in one process")


def model_path(rundir: Any) -> Path:
    """``finetune/model.pt``, checked to exist."""
    return get_stage("finetune").require(rundir, "model.pt")


def read_report(rundir: Any) -> dict[str, Any]:
    """``finetune/report.json`` (see :func:`branchnas.finetune.finetune_tree`)."""
    return get_stage("finetune").read_json(rundir, "report.json")


def load_finetuned(rundir: Any) -> Any:
    """The fine-tuned network of stage 4, in eval mode on the CPU."""
    from branchnas.finetune import load_model_file

    return load_model_file(model_path(rundir))
