"""Stage 1 library: one single-task model per task (the paper's Sec. 3.1, first step).

Every task gets the same encoder architecture (the recipe's backbone) and its own head,
trained under the same conditions (``[pretrain]``). The N models are trained together on
shared batches by :class:`branchnas.training.Trainer` (``pretrain.concurrent``), which is the
same computation as training them one after another. Their weights feed the affinity stage
and their metrics are the single-task baselines of Δ_MTL.

Artifacts in ``<run>/pretrain/``:

* ``<task>.pt``: ``{"task", "backbone", "head", "val", "test", ...}``: the task's name, the
  encoder and head state dicts, the validation and test metrics, plus what
  :func:`load_single_task` needs to rebuild the model without loading data;
* ``metrics.json``: ``{"tasks": {task: {"val": {...}, "test": {...}, "chance": {...}, ...}}}``;
* ``history-<task>.csv``: the model's training history, one row per epoch
  (:mod:`branchnas.training.history`; rewritten after every epoch while it trains);
* ``ckpt/<task>.pt``: per-epoch checkpoints, so that a killed run continues where it stopped.

A model whose ``<task>.pt`` exists is not trained again, so ``--tasks a,b`` trains a subset
and a later run trains the rest. Under torchrun the processes share the models or the
batches (``pretrain.parallel``, :func:`train_missing`). The stage itself (config, checks, readers) is
:mod:`branchnas.stages.pretrain`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from branchnas.rundir import atomic_torch_save, atomic_write_json

__all__ = [
    "STAGE",
    "build_single_task",
    "train_missing",
    "write_metrics",
    "task_file",
    "history_file",
    "write_missing_histories",
    "task_names",
    "parallel_mode",
    "metrics_table",
    "chance_metrics",
    "unlearned_tasks",
    "unlearned_warnings",
]

STAGE = "pretrain"


def task_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.pt"


def history_file(folder: Path, name: str) -> Path:
    """``history-<task>.csv``: the training history of task ``name``'s model."""
    return folder / f"history-{name}.csv"


def write_missing_histories(folder: Path, names: Sequence[str]) -> None:
    """Write ``history-<task>.csv`` from ``<task>.pt`` for models trained before the CSV existed."""
    import torch

    from branchnas.training.history import write_history_csv

    for name in names:
        if task_file(folder, name).exists() and not history_file(folder, name).exists():
            saved = torch.load(task_file(folder, name), map_location="cpu", weights_only=True)
            write_history_csv(history_file(folder, name), saved.get("history") or [])


def task_names(recipe: Any) -> list[str]:
    """Task names without loading data: the recipe's, or the dataset family's defaults."""
    if recipe.tasks:
        return [t.name for t in recipe.tasks]
    from branchnas.data import get_family

    family = get_family(recipe.data.dataset)
    return [t.name for t in family.default_tasks(family.parse_options(recipe.data.options))]


def build_single_task(recipe: Any, task: Any, in_channels: int, image_size: tuple[int, int]) -> Any:
    """The untrained single-task model of ``task``: the recipe's backbone plus the task's head.

    The initial weights depend only on the seed and the task's name, so a model starts the
    same whichever other tasks are trained with it.
    """
    import torch

    from branchnas.backbones import build_backbone
    from branchnas.heads import build_head
    from branchnas.training import SingleTaskModel, derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(recipe.seed, STAGE, "init", task.name))
        backbone = build_backbone(recipe.backbone, in_channels, image_size)
        head = build_head(task, backbone.out_channels, backbone.reduction, image_size)
    return SingleTaskModel(backbone, head, task.name)


def parallel_mode(parallel: str, tasks: int, processes: int) -> str:
    """How ``processes`` processes share the training of ``tasks`` models (``pretrain.parallel``).

    ``"tasks"``: each process trains its round-robin share of the models by itself;
    ``"data"``: the models train under DDP, every process taking its share of each batch.
    ``"auto"`` is ``"tasks"`` when there are at least as many models as processes.

    Example:
        >>> parallel_mode("auto", 7, 2), parallel_mode("auto", 1, 2)
        ('tasks', 'data')
    """
    if parallel == "auto":
        return "tasks" if tasks >= processes else "data"
    return parallel


def train_missing(recipe: Any, folder: Path, names: Sequence[str], progress: bool) -> None:
    """Train the models of ``names`` that have no ``<task>.pt`` yet and write their files.

    Several processes (torchrun): with ``pretrain.parallel`` "tasks" (:func:`parallel_mode`)
    process r trains models r, r + K, ... of those left by itself, writing their per-epoch
    checkpoints, and rank 0 gathers the trained models; with "data" every model trains under
    DDP. Either way rank 0 alone writes the files, and they are what one process writes (with
    "tasks", the same numbers: each model's training does not depend on the others').
    """
    from branchnas.training import distributed

    main = distributed.is_main()
    # What rank 0 finds in the folder decides, so that every process trains the same models.
    todo = distributed.broadcast_object([n for n in names if not task_file(folder, n).exists()])
    if not todo:
        return
    world = distributed.world_size()
    if world > 1 and parallel_mode(recipe.pretrain.parallel, len(todo), world) == "tasks":
        mine = todo[distributed.rank()::world]
        with distributed.alone():
            trained = _train(recipe, folder, mine, progress and main, log=main)
        shares = distributed.gather_objects(trained) or []
        trained = {name: saved for share in shares for name, saved in share.items()}
    else:
        trained = _train(recipe, folder, todo, progress, log=main)
    if main:
        for name in todo:
            _write_model(folder, name, trained[name])


def _train(recipe: Any, folder: Path, todo: Sequence[str], progress: bool, log: bool) -> dict[str, dict[str, Any]]:
    """Train the models of ``todo``: ``{task: what <task>.pt holds}`` (``log``: write the histories as they grow)."""
    if not todo:
        return {}
    from branchnas.data import load_splits
    from branchnas.training import Trainer, evaluate_models
    from branchnas.training.history import (
        TENSORBOARD_DIR,
        log_epoch_to_tensorboard,
        write_history_csv,
    )

    splits, all_tasks = load_splits(recipe)
    by_name = {t.name: t for t in all_tasks}
    tasks = [by_name[n] for n in todo]
    train = splits["train"]
    models = {t.name: build_single_task(recipe, t, train.in_channels, train.image_size) for t in tasks}
    cfg = recipe.pretrain
    batch = recipe.data.batch_size
    started = time.time()
    ckpt = folder / "ckpt"

    def log_epoch(info: Mapping[str, Any]) -> None:
        # Each model's history names its one task; a person can follow a long run.
        history = info["history"]
        for name in history[-1]["train_loss"] if log else []:
            write_history_csv(history_file(folder, name), history)
            if recipe.pretrain.log == "tensorboard":
                log_epoch_to_tensorboard(folder / TENSORBOARD_DIR / name, history[-1])

    if cfg.concurrent:
        trainer = Trainer(models, tasks, cfg, batch_size=batch, seed=recipe.seed, checkpoint=ckpt,
                          augment=recipe.data.augment, desc=f"{STAGE} ({len(tasks)} models)", progress=progress,
                          callbacks=[log_epoch])
        results = trainer.fit(train, splits["val"])
    else:
        results = {}
        for t in tasks:
            trainer = Trainer({t.name: models[t.name]}, [t], cfg, batch_size=batch, seed=recipe.seed,
                              checkpoint=ckpt, augment=recipe.data.augment, desc=f"{STAGE} {t.name}",
                              progress=progress, callbacks=[log_epoch])
            results.update(trainer.fit(train, splits["val"]))
    seconds = time.time() - started
    chance = chance_metrics(tasks, train, splits["test"], batch)
    chance_val = chance_metrics(tasks, train, splits["val"], batch)
    # In fp32 whatever the training precision: the saved models are fp32, and the single-task
    # baselines must be measured as the fine-tuned network will be.
    pairs = [(models[t.name], [t]) for t in tasks]
    tests = evaluate_models(pairs, splits["test"], batch, precision="fp32")
    vals = evaluate_models(pairs, splits["val"], batch, precision="fp32") if cfg.precision != "fp32" else None
    trained = {}
    for i, (t, test) in enumerate(zip(tasks, tests, strict=True)):
        model = models[t.name]
        result = results[t.name]
        # Trained in fp32, the kept weights' validation metrics were measured while training.
        kept = result["best_val"] if cfg.patience > 0 and result["best_val"] else result["history"][-1]["val"]
        if vals is not None:
            kept = vals[i]
        trained[t.name] = {
            "task": t.name,
            "task_spec": dataclasses.asdict(t),
            "backbone": _cpu(model.backbone.state_dict()),
            "head": _cpu(model.head.state_dict()),
            "val": kept[t.name],
            "test": test[t.name],
            "chance": chance[t.name],
            "chance_val": chance_val[t.name],
            "num_val": len(splits["val"]),
            "in_channels": train.in_channels,
            "image_size": list(train.image_size),
            "backbone_config": dataclasses.asdict(recipe.backbone),
            "best_epoch": result["best_epoch"],
            # the epoch whose weights these are: the best one when early stopping restored it
            "weights_epoch": result["best_epoch"] if cfg.patience > 0 and result["best_epoch"] else result["epochs"],
            "epochs": result["epochs"],
            "stopped_early": result["stopped_early"],
            "history": result["history"],
            "seconds": round(seconds, 3),
        }
    return trained


def _write_model(folder: Path, name: str, saved: Mapping[str, Any]) -> None:
    """Write ``<task>.pt`` and its history CSV; the finished file supersedes the per-epoch checkpoint."""
    from branchnas.training.history import write_history_csv

    atomic_torch_save(dict(saved), task_file(folder, name))
    write_history_csv(history_file(folder, name), saved["history"])
    (folder / "ckpt" / f"{name}.pt").unlink(missing_ok=True)


def _cpu(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() for k, v in state.items()}


def write_metrics(folder: Path, names: Sequence[str]) -> dict[str, Any]:
    import torch

    tasks = {}
    for name in names:
        saved = torch.load(task_file(folder, name), map_location="cpu", weights_only=True)
        spec = saved["task_spec"]
        primary = _primary(spec)
        tasks[name] = {
            "kind": spec["kind"],
            "metric": primary[0],
            "higher_is_better": primary[1],
            "val": saved["val"],
            "test": saved["test"],
            "chance": saved["chance"],
            "chance_val": saved.get("chance_val"),
            "num_val": saved.get("num_val"),
            "best_epoch": saved["best_epoch"],
            "weights_epoch": saved["weights_epoch"],
            "epochs": saved["epochs"],
        }
    data = {"tasks": tasks}
    atomic_write_json(folder / "metrics.json", data)
    return data


def _primary(spec: Mapping[str, Any]) -> tuple[str, bool]:
    from branchnas.tasks import Task

    task = Task(**spec)
    return task.primary_metric, task.higher_is_better(task.primary_metric)


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """A plain-text table of the per-task metrics in ``metrics.json``'s form.

    One row per task: kind, primary metric (↑ higher / ↓ lower is better), validation and
    test values, the chance level on test (the best constant prediction) and the epoch whose
    weights were kept (out of those trained).
    """
    from tabulate import tabulate

    rows = []
    for name, entry in metrics.get("tasks", {}).items():
        metric = entry["metric"]
        arrow = "↑" if entry["higher_is_better"] else "↓"
        rows.append([
            name, entry["kind"], f"{metric} {arrow}",
            _fmt(entry["val"].get(metric)), _fmt(entry["test"].get(metric)),
            _fmt(entry.get("chance", {}).get(metric)), f"{entry.get('weights_epoch', '-')}/{entry.get('epochs', '-')}",
        ])
    table = tabulate(rows, headers=["task", "kind", "metric", "val", "test", "chance", "epoch"],
                     tablefmt="simple", disable_numparse=True, colalign=("left", "left", "left", "right", "right", "right", "right"))
    return "\n".join([table, *unlearned_warnings(metrics)])


def unlearned_warnings(metrics: Mapping[str, Any], tasks: Sequence[str] | None = None) -> list[str]:
    """One warning line per task of ``tasks`` (default: all) whose model learned nothing."""
    return [f"warning: {task}'s single-task model learned nothing, {why}; its affinities may be noise, so "
            "where the tree puts it is not evidence: train longer (pretrain.epochs) or check its labels"
            for task, why in unlearned_tasks(metrics).items() if tasks is None or task in tasks]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.4f}"


def unlearned_tasks(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The tasks whose single-task model learned nothing, each with the evidence in words.

    A model learned nothing when its validation metric does not beat the best constant
    prediction on the validation split: for accuracy, by more than two binomial standard
    errors ``2·sqrt(c(1 - c)/n)`` (c the constant's accuracy, n the validation images); for
    other metrics, at all. What its features hold is then unknown, and so is what its
    affinities mean: where the tree puts the task is not evidence. ``metrics`` is
    ``metrics.json``'s form; files written before the validation chance level was recorded
    are compared with the test split's, without the margin.

    Example:
        >>> m = {"tasks": {"parity": {"metric": "accuracy", "higher_is_better": True,
        ...     "val": {"accuracy": 0.53}, "chance_val": {"accuracy": 0.5}, "num_val": 500}}}
        >>> unlearned_tasks(m)
        {'parity': 'val accuracy 0.530 against 0.500 for a constant prediction (2 s.e. = 0.045)'}
    """
    out = {}
    for name, entry in metrics["tasks"].items():
        metric, higher = entry["metric"], entry["higher_is_better"]
        chance = (entry.get("chance_val") or entry.get("chance") or {}).get(metric)
        value = entry.get("val", {}).get(metric)
        if chance is None or value is None or not (math.isfinite(chance) and math.isfinite(value)):
            continue
        margin, n = 0.0, entry.get("num_val") if entry.get("chance_val") else None
        if metric == "accuracy" and n:
            margin = 2 * math.sqrt(max(chance * (1 - chance), 0.0) / n)
        gain = value - chance if higher else chance - value
        if gain <= margin:
            noise = f" (2 s.e. = {margin:.3f})" if margin else ""
            out[name] = f"val {metric} {value:.3f} against {chance:.3f} for a constant prediction{noise}"
    return out


def chance_metrics(tasks: Sequence[Any], train: Any, dataset: Any, batch_size: int) -> dict[str, dict[str, float]]:
    """The metrics of the best *constant* prediction learned from ``train``, on ``dataset``.

    The chance level a trained model must beat: the majority class (classification,
    attribute, segmentation), every pixel an edge (edges: the best constant F-score), the
    mean (regression, depth over valid pixels) or the mean direction (normals).
    """
    from branchnas.data import batches

    stats: dict[str, dict[str, Any]] = {t.name: {} for t in tasks}
    for _, targets in batches(train, batch_size, shuffle=False, seed=0, epoch=0, augment=False):
        for t in tasks:
            _accumulate(t, stats[t.name], targets[t.target])
    constants = {t.name: _constant(t, stats[t.name]) for t in tasks}
    meters = {t.name: t.meter() for t in tasks}
    for images, targets in batches(dataset, batch_size, shuffle=False, seed=0, epoch=0, augment=False):
        b, _, h, w = images.shape
        for t in tasks:
            c = constants[t.name]
            if t.kind in ("classification", "regression"):
                out = c.expand(b, -1)
            elif t.kind == "attribute":
                out = c.expand(b)
            else:
                out = c.view(1, -1, 1, 1).expand(b, -1, h, w)
            meters[t.name].update(out, targets[t.target])
    return {name: m.compute() for name, m in meters.items()}


def _accumulate(task: Any, stat: dict[str, Any], target: Any) -> None:
    import torch

    kind = task.kind
    if kind in ("classification", "segmentation"):
        labels = target[target != 255] if kind == "segmentation" else target
        counts = torch.bincount(labels.reshape(-1), minlength=task.num_classes)[: task.num_classes].double()
        stat["sum"] = stat.get("sum", 0) + counts
    elif kind in ("attribute", "edges"):
        stat["sum"] = stat.get("sum", 0) + target.double().sum()
        stat["count"] = stat.get("count", 0) + target.numel()
    elif kind == "depth":
        valid = target > 0
        stat["sum"] = stat.get("sum", 0) + target[valid].double().sum()
        stat["count"] = stat.get("count", 0) + int(valid.sum())
    elif kind == "normals":
        stat["sum"] = stat.get("sum", 0) + target.double().sum(dim=(0, 2, 3))
    else:  # regression
        stat["sum"] = stat.get("sum", 0) + target.double().sum(dim=0)
        stat["count"] = stat.get("count", 0) + target.shape[0]


def _constant(task: Any, stat: dict[str, Any]) -> Any:
    """The constant head output of the best constant prediction, in the head's format."""
    import torch

    kind = task.kind
    if kind in ("classification", "segmentation"):
        counts = stat.get("sum", torch.ones(task.num_classes, dtype=torch.float64))
        return torch.log(counts.float() + 1e-6).view(1, -1)  # argmax = the majority class
    if kind == "attribute":
        p = float(stat.get("sum", 0)) / max(1, stat.get("count", 0))
        return torch.tensor([1.0 if p >= 0.5 else -1.0])  # the majority label (a meter reads the sign)
    if kind == "edges":
        # The best constant F-score marks every pixel an edge (precision p, recall 1).
        return torch.tensor([1.0])
    if kind == "depth":
        return torch.tensor([float(stat.get("sum", 0)) / max(1, stat.get("count", 0))])
    if kind == "normals":
        mean = stat.get("sum", torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64))
        return torch.nn.functional.normalize(mean.float(), dim=0)
    total = stat.get("sum", torch.zeros(task.channels, dtype=torch.float64))
    return (total / max(1, stat.get("count", 0))).float().view(1, -1)
