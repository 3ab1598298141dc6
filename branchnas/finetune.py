"""Stage 4: build the branched network of the chosen tree and fine-tune it on all tasks.

The network (:class:`branchnas.models.BranchedNet`) is initialised from the single-task
models of stage 1 (``finetune.init``, see :meth:`BranchedNet.from_single_task`) and trained
with the shared trainer (:mod:`branchnas.training`) under the loss weighting
``finetune.weighting`` (uncertainty by default). It is then evaluated on the validation and test
splits, and compared with the single-task models of stage 1 by Δ_MTL (GatedMTL eq. 6,
:func:`branchnas.tasks.delta_mtl`) on each task's primary test metric. Parameters and FLOPs
are measured with fvcore on the built network (:mod:`branchnas.cost`; one multiply-add is one
flop, per image).

Artifacts in ``finetune/``:

* ``model.pt``: ``{"format", "state_dict", "partitions", "tree", "tasks", "backbone",
  "in_channels", "image_size", "mean", "std", ...}``: everything :func:`load_finetuned`
  needs to rebuild the network without the data;
* ``report.json``: per-task val/test metrics, the single-task baselines, per-task and mean
  Δ_MTL, params, FLOPs, the training history;
* ``history.csv``: the training history, one row per epoch (rewritten after every epoch;
  :mod:`branchnas.training.history`);
* ``ckpt/``: the trainer's checkpoints, so a killed run resumes where it stopped.

:func:`finetune_tree` does the work for any tree into any folder; ``branchnas compare``
uses it for the all-shared and random trees.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchnas.errors import UserError
from branchnas.rundir import RunDir, atomic_torch_save, atomic_write_json

if TYPE_CHECKING:
    from branchnas.models import BranchedNet
    from branchnas.recipe import Recipe
    from branchnas.tasks import Task

__all__ = [
    "MODEL_FORMAT",
    "check_variant",
    "finetune_tree",
    "build_branched",
    "load_model_file",
    "load_checkpoint_info",
    "rebuild",
    "load_tree",
    "load_ranked",
    "tree_to_json",
    "single_task_metrics",
    "model_cost",
    "report_table",
]

#: ``format`` field of ``finetune/model.pt``; bump it when the layout changes.
MODEL_FORMAT = "branchnas.branched/1"

def check_variant(recipe: Recipe, variant: str | None = None, task_names: Sequence[str] | None = None) -> None:
    """Refuse an unknown or unavailable ``finetune.variant`` (or ``variant``), or its bad settings."""
    from branchnas.variants import get_variant

    names = list(task_names or []) or [t.name for t in recipe.tasks] or None
    get_variant(variant or recipe.finetune.variant, recipe).check(names)


# --------------------------------------------------------------------------- trees


def load_ranked(path: str | Path) -> list[Any]:
    """The trees of ``search/tree.json``, best first (one unless ``search.top`` > 1).

    Reads the search stage's result (:class:`branchnas.search.SearchResult` JSON) or a
    single tree's JSON (:meth:`branchnas.tree.Tree.to_json`).
    """
    from branchnas.search import SEARCH_FORMAT, SearchResult
    from branchnas.tree import Tree

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; run `branchnas search` first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); run `branchnas search --force`") from None
    if isinstance(data, dict) and data.get("format") == SEARCH_FORMAT:
        return [scored.tree for scored in SearchResult.from_json(data).ranked]
    return [Tree.from_json(data)]


def load_tree(path: str | Path) -> Any:
    """The chosen (best) tree of ``search/tree.json``; see :func:`load_ranked`."""
    return load_ranked(path)[0]


def tree_to_json(tree: Any) -> Any:
    """The JSON form of a tree (:meth:`branchnas.tree.Tree.to_json`), or its partitions."""
    if hasattr(tree, "to_json"):
        return tree.to_json()
    from branchnas.models import tree_chain

    return [[list(g) for g in part] for part in tree_chain(tree)[1]]


# --------------------------------------------------------------------------- building


def build_branched(
    recipe: Recipe, rundir: RunDir, tree: Any, init: str | None = None, variant: Any = None,
    train: Any = None,
) -> BranchedNet:
    """The network of ``tree``, initialised from the stage-1 single-task models.

    Args:
        recipe: The resolved recipe.
        rundir: The run directory holding ``pretrain/``.
        tree: The tree (a :class:`branchnas.tree.Tree`; its task order is the network's).
        init: The init rule (default ``finetune.init``); see
            :meth:`branchnas.models.BranchedNet.from_single_task`.
        variant: The :class:`branchnas.variants.Variant` that builds it (default: plain).
        train: The training split; with ``finetune.align_images`` > 0 its images fit the change
            of basis at branch points (see :func:`alignment_images`).
    """
    from branchnas.models import tree_chain
    from branchnas.stages.pretrain import load_single_task
    from branchnas.variants import get_variant

    names = tree_chain(tree)[0]
    backbones, heads = {}, {}
    for name in names:
        backbones[name], heads[name] = load_single_task(recipe, rundir, name)
    init = init or recipe.finetune.init
    affinity = _affinity(rundir, names) if init in ("central", "outlier") else None
    variant = variant or get_variant("plain", recipe)
    images = alignment_images(recipe, train) if train is not None and init != "scratch" else None
    return variant.build(tree, backbones, heads, init=init, tasks=names, affinity=affinity, seed=recipe.seed,
                         align=images)


def alignment_images(recipe: Recipe, train: Any) -> Any:
    """``finetune.align_images`` training images drawn by ``recipe.seed``, un-augmented (``None`` when 0)."""
    import torch

    count = min(recipe.finetune.align_images, len(train))
    if count == 0:
        return None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.seed))
    return train.get_batch(order[:count].sort().values)[0]


def _affinity(rundir: RunDir, names: Sequence[str]) -> Any:
    """The affinity tensor of stage 2, reordered to ``names``."""
    from branchnas.stages.affinity import read_affinity

    saved = read_affinity(rundir)
    affinity, tasks = saved["affinity"], list(saved["tasks"])
    order = [tasks.index(n) for n in names]
    return affinity[:, order][:, :, order]


def _checkpoint(net: BranchedNet, tree: Any, tasks: Sequence[Task], data: Any, recipe: Recipe,
                variant: Any) -> dict[str, Any]:
    from branchnas import __version__

    return {
        "format": MODEL_FORMAT,
        "branchnas_version": __version__,
        "variant": variant.name,
        **variant.checkpoint(net),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "partitions": net.partitions(),
        "tree": tree_to_json(tree),
        "tasks": [_task_fields(t) for t in tasks],
        "backbone": dataclasses.asdict(recipe.backbone),
        "in_channels": int(data.in_channels),
        "image_size": [int(s) for s in data.image_size],
        "mean": [float(m) for m in data.mean],
        "std": [float(s) for s in data.std],
        "dataset": recipe.data.dataset,
    }


def _task_fields(task: Task) -> dict[str, Any]:
    fields = ("name", "kind", "target", "num_classes", "channels", "weight", "loss_name")
    return {f: getattr(task, f) for f in fields}


def rebuild(checkpoint: Mapping[str, Any]) -> BranchedNet:
    """Rebuild a fine-tuned network from the contents of a ``model.pt`` (no data needed).

    Raises:
        UserError: The file is not a branchnas fine-tuned model of a known format.
    """
    from branchnas.backbones import build_backbone
    from branchnas.heads import build_head
    from branchnas.recipe import BackboneConfig
    from branchnas.tasks import Task
    from branchnas.variants import variant_class

    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != MODEL_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise UserError(f"expected a fine-tuned model of format {MODEL_FORMAT}; got {found!r}; "
                        "run `branchnas finetune --force`")
    # The state dict replaces every weight, so a weights file named in the recipe is not read.
    cfg = BackboneConfig(**{**checkpoint["backbone"], "weights": ""})
    size = tuple(checkpoint["image_size"])
    backbone = build_backbone(cfg, checkpoint["in_channels"], size)
    tasks = [Task(**fields) for fields in checkpoint["tasks"]]
    heads = {t.name: build_head(t, backbone.out_channels, backbone.reduction, size) for t in tasks}
    # Files from before the variants were written by the plain one.
    variant = variant_class(checkpoint.get("variant", "plain"))
    net = variant.rebuild(checkpoint, checkpoint["partitions"], backbone, heads, [t.name for t in tasks])
    return net.eval()


def load_model_file(path: str | Path) -> BranchedNet:
    """Rebuild the network saved in a ``model.pt`` of stage 4 or of ``branchnas compare``."""

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; run `branchnas finetune` first")
    return rebuild(_load(path))


def _load(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign: torch raises several types
        raise UserError(f"{path} is damaged ({type(err).__name__}); run `branchnas finetune --force` "
                        "to rebuild it") from None


def load_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Everything in a ``model.pt`` but the weights (tasks, input size, normalisation, tree)."""
    data = _load(Path(path))
    return {k: v for k, v in data.items() if k != "state_dict"}


# --------------------------------------------------------------------------- measuring


def model_cost(net: BranchedNet, in_channels: int, image_size: Sequence[int]) -> dict[str, int]:
    """fvcore params and FLOPs (per image; one multiply-add = one flop) of a built network, and the
    FLOPs of each task's pass alone (``flops_per_task_pass``; the attentive variant runs one per task)."""
    import torch

    from branchnas.cost import count_flops, count_params, task_pass_flops

    device = next(net.parameters()).device
    x = torch.zeros(1, in_channels, *image_size, device=device)
    return {"params": count_params(net), "flops": count_flops(net, x), "flops_per_task_pass": task_pass_flops(net, x)}


def single_task_metrics(rundir: RunDir, split: str = "test") -> dict[str, dict[str, float]]:
    """The stage-1 metrics ``{task: {metric: value}}`` on ``split`` (``pretrain/metrics.json``)."""
    from branchnas.stages.pretrain import read_metrics

    tasks = read_metrics(rundir)["tasks"]
    return {name: {k: float(v) for k, v in entry[split].items()} for name, entry in tasks.items()}


def _per_task_delta(metrics: Mapping[str, Any], baseline: Mapping[str, Any], tasks: Sequence[Task]) -> dict[str, float]:
    from branchnas.tasks import delta_mtl

    return {t.name: delta_mtl(metrics, baseline, [t], undefined="nan") for t in tasks}


# --------------------------------------------------------------------------- fine-tuning


def finetune_tree(
    recipe: Recipe,
    rundir: RunDir,
    tree: Any,
    out_dir: str | Path,
    desc: str,
    *,
    splits: tuple[Mapping[str, Any], Sequence[Task]] | None = None,
    variant: str | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Build, fine-tune, evaluate and measure the network of ``tree``; write it to ``out_dir``.

    Writes ``out_dir/model.pt``, ``out_dir/report.json`` and ``out_dir/history.csv`` (see the
    module docstring) and keeps the trainer's checkpoints in ``out_dir/ckpt`` so that a killed
    run resumes. When ``out_dir/report.json`` and ``out_dir/model.pt`` already exist, the saved
    report is returned without training again (the caller clears ``out_dir`` when its inputs
    change, as :meth:`RunDir.run_stage` does); a missing ``history.csv`` is written from it.

    Under torchrun every process calls it and trains under DDP (:class:`branchnas.training.Trainer`);
    rank 0 alone writes the files, and what it finds in ``out_dir`` decides for every process.

    Args:
        recipe: The resolved recipe (``[finetune]`` is the training configuration).
        rundir: The run directory with the stage-1 models.
        tree: The tree to build.
        out_dir: Where to write.
        desc: The progress-bar label.
        splits: ``load_splits(recipe)`` when the caller already has it (several trees).
        variant: The fine-tuning variant (default ``finetune.variant``; see
            :mod:`branchnas.variants`).
        callbacks: Per-epoch callbacks of the trainer (see :class:`branchnas.training.Trainer`).

    Returns:
        The report (also in ``out_dir/report.json``).
    """
    from branchnas.data import load_splits
    from branchnas.tasks import delta_mtl
    from branchnas.training import Trainer, distributed, evaluate
    from branchnas.training.history import (
        HISTORY_CSV,
        TENSORBOARD_DIR,
        log_epoch_to_tensorboard,
        write_history_csv,
    )
    from branchnas.variants import get_variant
    from branchnas.weighting import get_weighting

    check_variant(recipe, variant)
    variant_obj = get_variant(variant or recipe.finetune.variant, recipe)
    out_dir = Path(out_dir)
    report_path, model_path, history_path = out_dir / "report.json", out_dir / "model.pt", out_dir / HISTORY_CSV
    main = distributed.is_main()
    finished = main and report_path.exists() and model_path.exists()
    done = distributed.broadcast_object(json.loads(report_path.read_text()) if finished else None)
    if done is not None:
        if main and not history_path.exists():  # finished before the CSV was written
            write_history_csv(history_path, (done.get("training") or {}).get("history") or [])
        return done

    def log_epoch(info: Mapping[str, Any]) -> None:
        if not main:
            return
        write_history_csv(history_path, info["history"])  # a person can follow a long run
        if recipe.finetune.log == "tensorboard":
            log_epoch_to_tensorboard(out_dir / TENSORBOARD_DIR, info["history"][-1])

    splits, tasks = splits if splits is not None else load_splits(recipe)
    baseline_test = single_task_metrics(rundir, "test")
    baseline_val = single_task_metrics(rundir, "val")
    net = build_branched(recipe, rundir, tree, variant=variant_obj, train=splits["train"])
    weighting = get_weighting(recipe.finetune.weighting, tasks, seed=recipe.seed)
    cfg = recipe.finetune
    trainer = Trainer(
        net, tasks, cfg, batch_size=recipe.data.batch_size, seed=recipe.seed,
        checkpoint=out_dir / "ckpt", weighting=weighting, augment=recipe.data.augment, desc=desc,
        objective=build_objective(recipe, rundir, net, tasks, splits["train"]),
        reference=baseline_val if cfg.select == "best" else None, keep_best=cfg.select == "best",
        variant=variant_obj, callbacks=[log_epoch, *callbacks],
    )
    history = trainer.fit(splits["train"], splits["val"])
    if main:
        write_history_csv(history_path, history["history"])
    trained = net
    # The static network (pruned, for the gated variant) is what is evaluated, costed and saved.
    net = variant_obj.finalise(trained)
    batch = recipe.data.batch_size
    val = evaluate(net, tasks, splits["val"], batch, precision=cfg.precision)
    test = evaluate(net, tasks, splits["test"], batch, precision=cfg.precision)
    net = net.cpu().eval()
    data = splits["train"]
    cost = model_cost(net, data.in_channels, data.image_size)
    report = {
        "variant": variant_obj.name,
        "tree": tree_to_json(tree),
        "partitions": net.partitions(),
        "tasks": [_task_fields(t) | {"metric": t.primary_metric,
                                     "higher_is_better": t.higher_is_better(t.primary_metric)} for t in tasks],
        "params": cost["params"],
        "flops": cost["flops"],
        "flops_per_task_pass": cost["flops_per_task_pass"],
        "val": val,
        "test": test,
        "single_task": {"val": baseline_val, "test": baseline_test},
        # NaN, not a crash, when a baseline metric is 0 (tiny data): the training is not lost.
        "delta_mtl": delta_mtl(test, baseline_test, tasks, undefined="nan"),
        "delta_mtl_val": delta_mtl(val, baseline_val, tasks, undefined="nan"),
        "delta_per_task": _per_task_delta(test, baseline_test, tasks),
        "weighting": recipe.finetune.weighting,
        "init": recipe.finetune.init,
        "distill": {"outputs": cfg.distill, "features": cfg.distill_features, "temperature": cfg.distill_temperature},
        "balance": cfg.balance,
        # which task's single-task block each node started from (None: an average or fresh)
        "init_sources": dict(getattr(net, "sources", {}) or {}),
        # where the change of basis was fitted: errors of the output against the source's, before/after
        "init_alignment": dict(getattr(net, "alignment", {}) or {}),
        "select": cfg.select,
        # With finetune.patience > 0 or select = "best" the trainer restores the best epoch
        # (by val Δ_MTL against the single-task models with "best"); else the last one counts.
        "weights_from_epoch": (history.get("best_epoch") if cfg.patience > 0 or cfg.select == "best"
                               else history.get("epochs")),
        "training": history,
        "budget": _budget_check(rundir, cost),
        **variant_obj.report(trained.cpu(), net),
    }
    if not main:
        return report  # rank 0 writes the files
    if "gates" in report:
        from branchnas.variants.present import plot_gates

        plot_gates(report["gates"]["openness"], [t.name for t in tasks], out_dir / "gates.png",
                   report["gates"]["labels"])
    atomic_torch_save(_checkpoint(net, tree, tasks, data, recipe, variant_obj), model_path)
    atomic_write_json(report_path, report)
    return report


def _budget_check(rundir: RunDir, cost: Mapping[str, int]) -> dict[str, Any] | None:
    """The search's budget against the finished network's measured size (``None``: no search)."""
    from branchnas.stages.search import read_result

    try:
        result, _ = read_result(rundir)
    except UserError:
        return None
    metric, limit = result.metric, result.budget
    if metric not in cost:
        # A latency budget: the network's latency is not measured here, so nothing is claimed.
        return {"metric": metric, "limit": limit, "size": None, "within": None}
    size = int(cost[metric])
    return {"metric": metric, "limit": limit, "size": size, "within": limit is None or size <= limit}


def single_task_losses(rundir: RunDir, names: Sequence[str]) -> dict[str, float]:
    """Each task's single-task model's training loss in its last epoch (``pretrain/<task>.pt``)."""
    from branchnas.stages.pretrain import model_path

    losses = {}
    for name in names:
        saved = _load(model_path(rundir, name))
        history = saved.get("history") or []
        if not history:
            raise UserError(f"{model_path(rundir, name)} has no training history; run `branchnas pretrain --force`")
        losses[name] = float(history[-1]["train_loss"][name])
    return losses


def build_objective(recipe: Recipe, rundir: RunDir, net: BranchedNet, tasks: Sequence[Task],
                    train: Any = None) -> Any:
    """The fine-tuning objective of ``[finetune]`` (see :mod:`branchnas.distill`), or ``None``.

    With the training split ``train``, the teachers compute their outputs on its images once
    (and on their mirrors when training flips them) instead of once per epoch.
    """
    from branchnas.data import batches
    from branchnas.distill import FinetuneObjective, Teachers
    from branchnas.stages.pretrain import load_single_task

    cfg = recipe.finetune
    names = [t.name for t in tasks]
    if not (cfg.distill or cfg.distill_features or cfg.balance != "none"):
        return None
    teachers = None
    if cfg.distill or cfg.distill_features:
        # A task that shares no block keeps its own network: its teacher would add nothing. Every
        # task of a shared block needs one, the block's source task included: when the others
        # are pulled towards their teachers, the source loses its features unless it is too.
        taught = net.shared_tasks()
        teachers = Teachers({n: load_single_task(recipe, rundir, n) for n in taught}) if taught else None
        if teachers is not None and train is not None:
            size = recipe.data.batch_size
            teachers.remember(lambda: (images for images, _ in batches(train, size, shuffle=False, seed=recipe.seed,
                                                                        epoch=0, augment=False)),
                              mirrored=recipe.data.augment and train.can_flip)
    scale = None
    if cfg.balance == "single_task":
        scale = {n: 1.0 / max(loss, 1e-8) for n, loss in single_task_losses(rundir, names).items()}
    paths = {n: net.task_path(n) for n in names}
    if teachers is None and scale is None:
        return None
    return FinetuneObjective(tasks, teachers, outputs=cfg.distill if teachers else 0.0,
                             features=cfg.distill_features if teachers else 0.0,
                             temperature=cfg.distill_temperature, scale=scale, paths=paths)


# --------------------------------------------------------------------------- reporting


def report_table(report: Mapping[str, Any]) -> str:
    """An aligned table of a fine-tuning report: per task, single-task vs branched and Δ."""
    from tabulate import tabulate

    from branchnas.budget import format_count
    from branchnas.tasks import format_delta

    rows = []
    for task in report["tasks"]:
        name, metric = task["name"], task["metric"]
        arrow = "↑" if task["higher_is_better"] else "↓"
        rows.append([
            name, f"{metric} {arrow}",
            _fmt(report["single_task"]["test"][name][metric]),
            _fmt(report["test"][name][metric]),
            format_delta(report['delta_per_task'][name], percent=""),
        ])
    table = tabulate(rows, headers=["task", "metric", "single-task", "branched", "Δ (%)"],
                     tablefmt="simple", disable_numparse=True, colalign=("left", "left", "right", "right", "right"))
    footer = (
        f"params {format_count(report['params'])}   FLOPs {format_count(report['flops'])} (fvcore, per image)   "
        f"Δ_MTL {format_delta(report['delta_mtl'])} (test)"
    )
    lines = [table, footer]
    budget = report.get("budget")
    if budget and budget.get("limit") is not None and budget.get("within") is not None:
        verdict = "within" if budget["within"] else "OVER"
        lines.append(f"{verdict} the budget: {format_count(budget['size'])} of {format_count(budget['limit'])} "
                     f"{budget['metric']}")
    if "gates" in report:
        from branchnas.variants.present import gate_table

        gates = report["gates"]
        lines += ["", f"gated variant (λ_s {gates['sparsity']:g}); pruned from "
                      f"{format_count(gates['params_before_pruning'])} params:",
                  gate_table(gates["openness"], [t["name"] for t in report["tasks"]], gates.get("labels"))]
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.4f}"
