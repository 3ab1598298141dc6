"""Stage 1, ``pretrain``: one single-task model per task (the training is :mod:`branchnas.pretrain`).

Artifacts in ``pretrain/``: ``<task>.pt`` (encoder and head weights, val/test metrics and what
:func:`load_single_task` needs to rebuild the model), ``metrics.json`` (the single-task
baselines of Δ_MTL) and ``history-<task>.csv`` (each model's training, one row per epoch). Options: ``tasks`` trains a subset; the stage is done once every task is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from branchnas.errors import UserError, did_you_mean
from branchnas.stages._base import Artifact, Stage, StageContext, get_stage, register_stage

__all__ = ["PretrainStage", "read_metrics", "load_single_task", "model_path", "select_tasks"]


@register_stage
class PretrainStage(Stage):
    name = "pretrain"
    summary = "Stage 1: train one single-task model per task."
    distributed = True
    artifacts = (
        Artifact("*.pt", "one trained single-task model per task: encoder, head, metrics"),
        Artifact("metrics.json", "per task: val/test metrics, chance level, kept epoch (the Δ_MTL baselines)"),
        Artifact("history-*.csv", "per task: the training history, one row per epoch: lr, time, loss, val metrics"),
    )

    def config(self, recipe: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        """Data, tasks, backbone, ``[pretrain]`` and the seed.

        ``pretrain.device``, ``pretrain.concurrent``, ``pretrain.parallel`` and ``pretrain.log``
        decide where and how the models train and are logged, not what they compute, so they
        are left out (as is the number of processes).
        """
        train = dataclasses.asdict(recipe.pretrain)
        for key in ("device", "concurrent", "parallel", "log"):
            train.pop(key, None)
        # What every run computed before these keys existed: keyed as before.
        if train.get("precision") == "fp32":
            train.pop("precision")
        if not train.get("sync_bn"):
            train.pop("sync_bn", None)
        return {
            "data": dataclasses.asdict(recipe.data),
            "tasks": [dataclasses.asdict(t) for t in recipe.tasks],
            "backbone": dataclasses.asdict(recipe.backbone),
            "pretrain": train,
            "seed": recipe.seed,
        }

    def check(self, recipe: Any, options: Mapping[str, Any]) -> None:
        from branchnas.pretrain import parallel_mode, task_names
        from branchnas.stages._checks import (
            check_device,
            check_log,
            check_precision,
            check_processes,
            splits_of,
        )
        from branchnas.training import distributed

        selected = select_tasks(task_names(recipe), options.get("tasks"))
        check_device(recipe.pretrain.device, "pretrain.device")
        check_precision(recipe.pretrain.precision, recipe.pretrain.device, "pretrain.precision")
        check_log(recipe.pretrain.log, "pretrain.log")
        splits_of(recipe)  # the data opens and every task's target is there
        _check_backbone(recipe)
        # As many models as will train when none is done yet (the trainer checks again).
        mode = parallel_mode(recipe.pretrain.parallel, len(selected), distributed.world_size())
        check_processes(recipe, "pretrain", ddp=mode == "data")

    def keep_on_force(self, options: Mapping[str, Any]) -> Callable[[str], bool] | None:
        """``--force --tasks a``: retrain ``a`` only, keeping the other models."""
        tasks = options.get("tasks")
        if not tasks:
            return None
        retrain = {f"{self.name}/{t}.pt" for t in tasks} | {f"{self.name}/history-{t}.csv" for t in tasks}
        return lambda out: out not in retrain and not out.endswith("metrics.json")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from branchnas.pretrain import (
            history_file,
            task_file,
            task_names,
            train_missing,
            write_metrics,
            write_missing_histories,
        )
        from branchnas.training import distributed

        names = task_names(ctx.recipe)
        selected = select_tasks(names, ctx.options.get("tasks"))
        train_missing(ctx.recipe, ctx.folder, selected, ctx.progress)
        if not distributed.is_main():
            return {}  # rank 0 writes the stage's files; the others only helped train
        done = [n for n in names if task_file(ctx.folder, n).exists()]
        missing = [n for n in names if n not in done]
        write_metrics(ctx.folder, done)
        write_missing_histories(ctx.folder, done)
        ckpt = ctx.folder / "ckpt"
        if not missing and ckpt.is_dir() and not any(ckpt.iterdir()):
            ckpt.rmdir()
        histories = [history_file(ctx.folder, n).name for n in done if history_file(ctx.folder, n).exists()]
        return {"outputs": [f"{n}.pt" for n in done] + ["metrics.json"] + histories, "tasks": done,
                "missing": missing, "partial": bool(missing)}


def _check_backbone(recipe: Any) -> None:
    from branchnas.backbones._registry import backbone_entry, check_dilation, check_width

    backbone_entry(recipe.backbone.name)
    check_width(recipe.backbone)
    check_dilation(recipe.backbone)
    if recipe.backbone.weights and not Path(recipe.backbone.weights).is_file():
        raise UserError(f"backbone.weights: no file {recipe.backbone.weights!r}; give a local weights file or ''")


def select_tasks(names: Sequence[str], tasks: Sequence[str] | None) -> list[str]:
    """The recipe's task names restricted to ``tasks`` (recipe order), checked."""
    if tasks is None:
        return list(names)
    wanted = [t.strip() for t in tasks if t and t.strip()]
    if not wanted:
        raise UserError(f"--tasks: expected task names separated by commas; choose from: {', '.join(names)}")
    for name in wanted:
        if name not in names:
            raise UserError(f"--tasks: no task named '{name}'{did_you_mean(name, names)}; the tasks are: {', '.join(names)}")
    return [n for n in names if n in wanted]


# --------------------------------------------------------------------------- readers


def _rundir(rundir: Any) -> Any:
    from branchnas.rundir import RunDir

    return rundir if isinstance(rundir, RunDir) else RunDir(rundir)


def model_path(rundir: Any, task: str) -> Path:
    """``pretrain/<task>.pt`` of a run directory."""
    return get_stage("pretrain").path(_rundir(rundir), f"{task}.pt")


def read_metrics(rundir: Any) -> dict[str, Any]:
    """``pretrain/metrics.json``: ``{"tasks": {task: {"val", "test", "chance", "metric", ...}}}``.

    Raises:
        UserError: stage 1 has not written it yet, or it is damaged.
    """
    return get_stage("pretrain").read_json(_rundir(rundir), "metrics.json")


def load_single_task(recipe: Any, rundir: Any, task: str) -> tuple[Any, Any]:
    """Rebuild the trained single-task model of ``task``: ``(backbone, head)``, in eval mode.

    Args:
        recipe: The resolved recipe (its ``[backbone]`` section builds the encoder).
        rundir: The run directory holding ``pretrain/``.
        task: The task's name.

    Raises:
        UserError: no trained model for ``task``; the file is damaged or does not fit the
            recipe's backbone.
    """
    import torch

    from branchnas.backbones import build_backbone
    from branchnas.heads import build_head
    from branchnas.tasks import Task

    path = model_path(rundir, task)
    folder = path.parent
    if not path.exists():
        have = sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []
        hint = did_you_mean(task, have) if have else ""
        raise UserError(
            f"no single-task model for task '{task}' in {folder}{hint}; run `branchnas pretrain` first"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises several types
        raise UserError(f"{path} is damaged ({type(err).__name__}); run `branchnas pretrain --force` "
                        "to train it again") from None
    spec = Task(**saved["task_spec"])
    image_size = tuple(saved["image_size"])
    # The recipe's backbone section decides the architecture, except for the weights file:
    # the trained weights replace whatever it would load.
    cfg = dataclasses.replace(recipe.backbone, weights="")
    backbone = build_backbone(cfg, int(saved["in_channels"]), image_size)
    head = build_head(spec, backbone.out_channels, backbone.reduction, image_size)
    try:
        backbone.load_state_dict(saved["backbone"])
        head.load_state_dict(saved["head"])
    except RuntimeError:
        raise UserError(
            f"{path} does not fit the recipe's backbone ({recipe.backbone.name}); "
            "run `branchnas pretrain --force` to train it again"
        ) from None
    return backbone.eval(), head.eval()
