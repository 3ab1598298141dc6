"""The optimizer of a run, its learning-rate schedule and gradient-norm clipping.

The recipe's ``optimizer`` (sgd, adam or adamw) steps at ``lr * lr_factor(step, ...)``: a
per-step cosine (or constant) schedule with linear warm-up.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from branchnas.errors import UserError

__all__ = ["lr_factor"]


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of the peak.

    Linear warm-up from ``1/warmup_steps`` to 1 over the first ``warmup_steps`` steps, then
    ``0.5 (1 + cos(pi (step - warmup) / (total - warmup)))`` for ``cosine`` (1 at the end of
    the warm-up, tending to 0 at ``total_steps``) or 1 for ``constant``.

    Example:
        >>> lr_factor(0, 100), lr_factor(50, 100), lr_factor(1, 100, warmup_steps=4)
        (1.0, 0.5, 0.5)
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _section(cfg: Any) -> str:
    """The recipe section a TrainConfig came from (PretrainConfig -> 'pretrain'), for messages."""
    name = type(cfg).__name__.removesuffix("Config").lower()
    return name if name not in ("train", "") else "train"


def _make_optimizer(cfg: Any, decayed: list[Tensor], plain: list[Tensor]) -> torch.optim.Optimizer:
    """The recipe's optimizer; ``plain`` parameters (loss-weighting ones) get no weight decay."""
    groups = [{"params": decayed, "weight_decay": cfg.weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"{_section(cfg)}.optimizer: expected one of 'sgd', 'adam', 'adamw'; got {cfg.optimizer!r}")


def _clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    # As torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6), never up.
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
