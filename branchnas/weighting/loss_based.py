"""Schemes that reweight the task losses: uniform, uncertainty, DWA, RLW and FAMO."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from branchnas.tasks import Task
from branchnas.weighting._base import LossWeighting, _loss_values, _TaskState, register_weighting


@register_weighting("uniform")
class Uniform(LossWeighting):
    """Each task's loss times its recipe weight (1 by default): ``Σ_t w_t L_t``."""


@register_weighting("uncertainty")
class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    One learnable ``s_t = log σ_t²`` per task, initialised at 0, and the total loss::

        Σ_t exp(-s_t) w_t L_t + s_t

    Kendall et al. write ``1/(2σ²) L + log σ`` for regression and ``1/σ² L + log σ`` for
    classification. We use one form for every kind: twice the regression form, i.e. with the
    ½ factors dropped. Both forms have the same optimum ``s_t = log(w_t L_t)``; the
    classification form is itself an approximation, and one form keeps tasks comparable.
    """

    def __init__(self, tasks: Sequence[Task], seed: int = 0) -> None:
        super().__init__(tasks, seed)
        # A Parameter, so that DDP can average its gradient with the model's (several processes).
        self.log_vars = torch.nn.Parameter(torch.zeros(len(self.task_names)))

    def parameters(self) -> list[Tensor]:
        return [self.log_vars]

    def _s(self, name: str, like: Tensor) -> Tensor:
        self._recipe_weight(name)
        # .to() is differentiable, so a CPU log_vars still learns from a GPU loss.
        return self.log_vars[self.task_names.index(name)].to(like.device)

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        return {
            name: self._recipe_weight(name) * math.exp(-float(self._s(name, loss).detach()))
            for name, loss in losses.items()
        }

    def total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The objective ``Σ_t exp(-s_t) w_t L_t + s_t`` (differentiable in ``s``)."""
        terms = []
        for name, loss in losses.items():
            s = self._s(name, loss)
            terms.append(torch.exp(-s) * self._recipe_weight(name) * loss + s)
        return torch.stack(terms).sum()

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[Tensor]) -> dict[str, float]:
        self.total(losses).backward()
        return self.weights(losses)


@register_weighting("dwa")
class DWA(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, MTAN, CVPR 2019, eq. 7).

    ``w_t(e) = T exp(r_t / τ) / Σ_i exp(r_i / τ)`` with ``r_t = L_t(e-1) / L_t(e-2)``, the
    ratio of the task's mean training losses over the last two finished epochs, and τ = 2.
    The weights are 1 (uniform) until two epochs have finished, and always sum to T. A task
    whose loss two epochs ago was 0 (or not finite) gets the neutral ratio 1.

    Args:
        temperature: τ; larger is closer to uniform.
    """

    def __init__(self, tasks: Sequence[Task], seed: int = 0, temperature: float = 2.0) -> None:
        super().__init__(tasks, seed)
        if temperature <= 0:
            raise ValueError(f"dwa: temperature must be > 0; got {temperature}")
        self.temperature = temperature
        self.current = {name: 1.0 for name in self.task_names}

    def start_epoch(self, epoch: int, epoch_losses: Sequence[Mapping[str, float]]) -> None:
        if len(epoch_losses) < 2:
            self.current = {name: 1.0 for name in self.task_names}
            return
        last, before = epoch_losses[-1], epoch_losses[-2]
        ratios = torch.tensor([_ratio(last[name], before[name]) for name in self.task_names], dtype=torch.float64)
        w = len(self.task_names) * torch.softmax(ratios / self.temperature, dim=0)
        self.current = dict(zip(self.task_names, w.tolist(), strict=True))

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        return {name: self._recipe_weight(name) * self.current[name] for name in losses}


def _ratio(last: float, before: float) -> float:
    if before > 0 and math.isfinite(before) and math.isfinite(last):
        return last / before
    return 1.0


@register_weighting("rlw")
class RLW(LossWeighting):
    """Random Loss Weighting (Lin, Ye & Zhang, "A closer look at loss weighting", 2021).

    Every step draws ``z ~ N(0, I_T)`` from the seeded generator and uses
    ``softmax(z)``: positive weights that sum to 1, as in Lin et al. (and LibMTL). So the
    total loss is on the scale of one task's loss, about 1/T of uniform weighting's.
    """

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        z = torch.randn(len(self.task_names), generator=self.generator, dtype=torch.float64)
        drawn = dict(zip(self.task_names, torch.softmax(z, dim=0).tolist(), strict=True))
        return {name: self._recipe_weight(name) * drawn[name] for name in losses}



@register_weighting("famo")
class FAMO(_TaskState):
    """Fast Adaptive Multitask Optimization (Liu, Liang, Stone & Liu, NeurIPS 2023, Algorithm 1).

    Logits ξ (initially 0) give ``z = softmax(ξ)``. A step minimises
    ``Σ_t c z_t log L_t`` with ``c = (Σ_s z_s / L_s)^{-1}`` held constant, i.e. it
    backpropagates ``Σ_t λ_t L_t`` with ``λ_t = c z_t / L_t`` (λ sums to 1; each ρ_t, the
    recipe weight, multiplies on top). After the model's step, the change of the log
    losses updates the logits::

        δ = (∂z/∂ξ)^T (log L(θ_old) - log L(θ_new)),    ξ ← ξ - β (δ + γ ξ)

    the paper's plain gradient step (the official code runs Adam with weight decay γ
    instead; β and γ keep their names and defaults). The trainer calls :meth:`backward`
    once per step, so the update happens lazily at the start of the next call, with *that*
    step's losses (the next batch's) as ``L(θ_new)``, just as the official ``update(new_loss)``
    after each step uses fresh losses. Losses are clamped to at least 1e-8 before the
    logarithm and the division.

    Args:
        lr: β, the learning rate of ξ.
        decay: γ, the decay of ξ.
    """

    eps = 1e-8
    ddp_conflict = "its weights follow each process's own loss values, so the processes would disagree"

    def __init__(self, tasks: Sequence[Task], seed: int = 0, lr: float = 0.025, decay: float = 0.001) -> None:
        super().__init__(tasks, seed)
        if lr < 0 or decay < 0:
            raise ValueError(f"famo: lr and decay must be >= 0; got lr={lr}, decay={decay}")
        self.lr = float(lr)
        self.decay = float(decay)
        self.logits = torch.zeros(len(self.task_names), dtype=torch.float64)
        self.previous = torch.full((len(self.task_names),), math.nan, dtype=torch.float64)  # log L of the last step

    def update(self, log_losses: Tensor) -> None:
        """ξ's step from the new log losses (a full T vector; NaN where unknown)."""
        if torch.isnan(self.previous).all():
            return
        z = torch.softmax(self.logits, 0)
        change = torch.nan_to_num(self.previous - log_losses)
        delta = z * (change - (z * change).sum())  # (∂z/∂ξ)^T change, ∂z/∂ξ = diag(z) - z z^T
        self.logits = self.logits - self.lr * (delta + self.decay * self.logits)

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[Tensor]) -> dict[str, float]:
        names = list(losses)
        idx = torch.tensor(self._indices(names))
        values = _loss_values([losses[n] for n in names]).clamp_min(self.eps)
        current = torch.full_like(self.previous, math.nan)
        current[idx] = values.log()
        self.update(current)
        self.previous = current
        z = torch.softmax(self.logits, 0)[idx]
        lam = (z / values) / (z / values).sum()
        weights = {name: self._recipe_weight(name) * float(w) for name, w in zip(names, lam, strict=True)}
        sum(weights[name] * losses[name] for name in names).backward()  # type: ignore[union-attr]
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "logits": self.logits.clone(), "previous": self.previous.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.logits = state["logits"].clone().double()
        self.previous = state["previous"].clone().double()
