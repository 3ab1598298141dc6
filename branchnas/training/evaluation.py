"""Measuring models: every metric of every task on a split, several models in one pass.

Each task's meter (:meth:`branchnas.tasks.Task.meter`) accumulates over the batches; the
models run in eval mode in the given precision (``bf16``: under autocast, as in training, with
the outputs cast to fp32 before the meters) and keep their train/eval mode.

Several processes (torchrun, :mod:`branchnas.training.distributed`): every process must call
the function; each measures its contiguous share of every batch, and the meters' sums and
counts are added up over the processes in rank order, so every process ends with the same
numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from branchnas.training import distributed
from branchnas.training.runtime import (
    _autocast,
    _batches,
    _float_outputs,
    _model_device,
    _to_device,
    resolve_device,
    resolve_precision,
)

__all__ = ["evaluate", "evaluate_models"]


@torch.no_grad()
def _evaluate_members(models: Sequence[tuple[nn.Module, Sequence[Any]]], dataset: Any, batch_size: int,
                      device: torch.device, channels_last: bool,
                      precision: str) -> list[dict[str, dict[str, float]]]:
    """Evaluate several models on one pass over ``dataset`` (each batch is loaded once).

    ``precision`` is a resolved one: ``fp32`` or ``bf16``.
    """
    meters = [{t.name: t.meter() for t in tasks} for _, tasks in models]
    modes = [model.training for model, _ in models]
    several = distributed.world_size() > 1
    for model, _ in models:
        model.eval()
    try:
        for images, targets in _batches(dataset, batch_size, shuffle=False, seed=0, epoch=0, augment=False):
            if several:
                images, targets, _ = distributed.share_batch(images, targets)
                if not len(images):
                    continue
            images, targets = _to_device(images, targets, device, channels_last)
            for (model, tasks), meter in zip(models, meters, strict=True):
                with _autocast(device, precision):
                    outputs = model(images)
                outputs = _float_outputs(outputs)  # the meters see fp32
                for t in tasks:
                    meter[t.name].update(outputs[t.name], targets[t.target])
    finally:
        for (model, _), mode in zip(models, modes, strict=True):
            model.train(mode)
    if several:
        _add_up(meters)
    return [{name: m.compute() for name, m in meter.items()} for meter in meters]


def _add_up(meters: Sequence[dict[str, Any]]) -> None:
    """Replace each meter's sums by their totals over the processes, added in rank order."""
    states = distributed.all_gather_objects([{name: m.state() for name, m in meter.items()} for meter in meters])
    for i, meter in enumerate(meters):
        for name, m in meter.items():
            m.reset()
            for state in states:
                m.merge(state[i][name])


def evaluate_models(models: Sequence[tuple[nn.Module, Sequence[Any]]], dataset: Any, batch_size: int,
                    device: str | torch.device | None = None,
                    precision: str = "fp32") -> list[dict[str, dict[str, float]]]:
    """:func:`evaluate` for several models in one pass over ``dataset`` (each batch loaded once).

    Args:
        models: ``(model, tasks)`` pairs.
        dataset: A :class:`branchnas.data.MultiTaskDataset` split.
        batch_size: Images per forward pass.
        device: Where to run; ``None`` keeps each model where it is (the first model's device).
        precision: ``fp32``, ``bf16`` (autocast; the metrics stay fp32) or ``auto`` (bf16 where
            the device does it in hardware), as the recipe's ``precision``.

    Returns:
        ``{task: {metric: value}}`` per model, in order.

    Raises:
        UserError: ``bf16`` where the hardware has no native bf16.
    """
    if not models:
        return []
    if device is None:
        target = _model_device(models[0][0])
    else:
        target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    resolved = resolve_precision(precision, target)
    for model, _ in models:
        model.to(target)
    return _evaluate_members([(m, list(t)) for m, t in models], dataset, batch_size, target, target.type == "cuda",
                             resolved)


def evaluate(model: nn.Module, tasks: Sequence[Any], dataset: Any, batch_size: int,
             device: str | torch.device | None = None, precision: str = "fp32") -> dict[str, dict[str, float]]:
    """Every metric of every task of ``model`` on ``dataset``.

    Args:
        model: Maps images to ``{task: output}``.
        tasks: The tasks to measure.
        dataset: A :class:`branchnas.data.MultiTaskDataset` split.
        batch_size: Images per forward pass.
        device: Where to run; ``None`` keeps the model where it is. The model is moved there.
        precision: ``fp32``, ``bf16`` or ``auto``, as for :func:`evaluate_models`.

    Returns:
        ``{task: {metric: value}}``; the model keeps its train/eval mode.
    """
    return evaluate_models([(model, tasks)], dataset, batch_size, device, precision)[0]
