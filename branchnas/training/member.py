"""One model's training state: everything that belongs to it alone when models train together.

A :class:`_Member` holds a model's tasks, loss weighting, optimizer, step and epoch counters,
its own torch RNG stream, its history, best epoch and early-stopping state, and turns all of
that into a checkpoint and back. The trainer keeps one member per model it trains.
:func:`_score` says which validated epoch is the best.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from branchnas.training.optim import _make_optimizer
from branchnas.training.runtime import derive_seed

#: Bumped when the layout of a checkpoint changes; an older file is refused, not misread.
_CHECKPOINT_VERSION = 1


def _score(tasks: Sequence[Any], metrics: Mapping[str, Mapping[str, float]],
           reference: Mapping[str, Mapping[str, float]] | None) -> float:
    """Larger is better. One task: its primary metric (negated when lower is better).

    Several tasks: the mean relative change of the primary metrics against ``reference``
    (the first validated epoch), as Δ_MTL does, so that tasks on different scales count alike.
    """
    if len(tasks) == 1:
        task = tasks[0]
        value = float(metrics[task.name][task.primary_metric])
        return value if task.higher_is_better(task.primary_metric) else -value
    terms = []
    for task in tasks:
        metric = task.primary_metric
        value = float(metrics[task.name][metric])
        base = float(reference[task.name][metric]) if reference else 0.0
        sign = 1.0 if task.higher_is_better(metric) else -1.0
        change = (value - base) / abs(base) if base and math.isfinite(base) else value - base
        terms.append(sign * change)
    return float(np.mean(terms))


def _better(score: float, best: float | None) -> bool:
    if best is None:
        return True
    if math.isnan(score):
        return False
    return math.isnan(best) or score > best


def _state_to_cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


class _Member:
    """One independently trained model and everything that belongs to it alone."""

    def __init__(self, name: str, model: nn.Module, tasks: list[Any], weighting: Any,
                 cfg: Any, seed: int, device: torch.device, variant: Any = None) -> None:
        self.name = name
        self.model = model
        self.tasks = tasks
        self.weighting = weighting
        self.seed = seed
        self.device = device
        # The fine-tuning variant (gated, ...) may own parameters with optimizers of its own
        # (the gates); the recipe's optimizer takes every other parameter.
        self.variant = variant
        self.owned = list(variant.optimizers(model)) if variant is not None else []
        owned = {id(p) for opt in self.owned for group in opt.param_groups for p in group["params"]}
        shared = model.shared_parameters() if hasattr(model, "shared_parameters") else model.parameters()
        self.shared = [p for p in shared if id(p) not in owned]
        self.params = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
        self.extra = [p for p in weighting.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(cfg, self.params, self.extra)
        self.step = 0
        self.epoch = 0  # finished epochs
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.reference: dict[str, dict[str, float]] | None = None
        self.bad_epochs = 0
        self.stopped = False
        # Each model draws from its own torch RNG stream (dropout, random weightings), so
        # that training it next to others draws exactly what training it alone draws.
        gen = torch.Generator().manual_seed(derive_seed(seed, "rng", name))
        self.rng_cpu = gen.get_state()
        self.rng_cuda: Tensor | None = None
        self.last_losses: dict[str, float] = {}
        self.epoch_loss_sums: dict[str, float] = {}
        self.epoch_regulariser = 0.0
        # Under DDP (several processes): the model's replica, through which it trains.
        self.replica: nn.Module | None = None

    def forward(self, images: Tensor, features: bool = False) -> Any:
        """The model's outputs (with ``features``: ``forward_features``), through its DDP replica if any."""
        if self.replica is not None:
            return self.replica(images, features=features)
        return self.model.forward_features(images) if features else self.model(images)

    @contextlib.contextmanager
    def rng(self) -> Iterator[None]:
        """Run with this model's RNG stream as torch's global one, then put the outer one back."""
        outer_cpu = torch.get_rng_state()
        cuda = self.device.type == "cuda"
        if cuda:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            if self.rng_cuda is None:
                torch.cuda.manual_seed(derive_seed(self.seed, "rng-cuda", self.name))
                self.rng_cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.rng_cuda, self.device)
        torch.set_rng_state(self.rng_cpu)
        try:
            yield
        finally:
            self.rng_cpu = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if cuda:
                self.rng_cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def done(self, epochs: int) -> bool:
        """Stopped early, or trained for every epoch."""
        return self.stopped or self.epoch >= epochs

    def losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {t.name: t.loss(outputs[t.name], targets[t.target]) for t in self.tasks}

    def state(self, config: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": _CHECKPOINT_VERSION,
            "member": self.name,
            "config": config,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.step},
            "weighting": self.weighting.state_dict() if hasattr(self.weighting, "state_dict") else {},
            "owned_optimizers": [opt.state_dict() for opt in self.owned],
            "variant": self.variant.state_dict() if self.variant is not None else {},
            "rng": {"cpu": self.rng_cpu, "cuda": self.rng_cuda},
            "history": self.history,
            "best": self.best,
            "reference": self.reference,
            "bad_epochs": self.bad_epochs,
            "stopped": self.stopped,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("weighting") and hasattr(self.weighting, "load_state_dict"):
            self.weighting.load_state_dict(state["weighting"])
        for opt, saved in zip(self.owned, state.get("owned_optimizers", []), strict=False):
            opt.load_state_dict(saved)
        if self.variant is not None and state.get("variant"):
            self.variant.load_state_dict(state["variant"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.rng_cpu = state["rng"]["cpu"]
        self.rng_cuda = state["rng"].get("cuda")
        self.history = list(state["history"])
        self.best = state["best"]
        self.reference = state["reference"]
        self.bad_epochs = int(state["bad_epochs"])
        self.stopped = bool(state["stopped"])

    def restore_best(self) -> None:
        if self.best is not None and self.best.get("state") is not None:
            self.model.load_state_dict(self.best["state"])

    def result(self) -> dict[str, Any]:
        best = self.best or {}
        return {
            "history": self.history,
            "best_epoch": best.get("epoch"),
            "best_val": best.get("val"),
            "epochs": self.epoch,
            "steps": self.step,
            "stopped_early": self.stopped,
        }
