"""Multi-task loss weighting: how the task losses of one batch become one backward pass.

A :class:`LossWeighting` is handed to the trainer as an object (``Trainer(weighting=...)``).
It knows the tasks and, for gradient surgery, the *shared* parameters; it knows nothing else
about the model. Per training step the trainer calls :meth:`LossWeighting.backward` once; per
epoch it calls :meth:`LossWeighting.start_epoch` with the mean training loss of every
finished epoch. :meth:`LossWeighting.parameters` lists learnable weighting parameters (only
uncertainty weighting has any) that the trainer must add to its optimizer, without weight
decay, and save in its checkpoint through :meth:`LossWeighting.state_dict`.

Every scheme multiplies its own weight by the task's recipe weight (1 by default), so a
recipe weight acts as a fixed prior scale on top of the scheme.

=============  ==============================================================  =============
name           weight of task t                                                sum (w = 1)
=============  ==============================================================  =============
uniform        w_t                                                             T
uncertainty    w_t exp(-s_t), plus the regulariser s_t (learned s_t)            -
dwa            w_t T softmax(r / 2)_t, r_t = L_t(e-1) / L_t(e-2)                T
rlw            w_t softmax(z)_t, z ~ N(0, I) drawn every step                  1
pcgrad         w_t, then conflicting shared gradients are projected            T
=============  ==============================================================  =============

Example:
    >>> weighting = get_weighting("dwa", tasks, seed=0)
    >>> weighting.start_epoch(epoch, history)           # history: [{task: mean loss}, ...]
    >>> weights = weighting.backward(losses, shared)    # fills .grad; {task: weight used}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from branchnas.errors import RecipeError, unknown_choice
from branchnas.tasks import Task

__all__ = [
    "LossWeighting",
    "Uniform",
    "UncertaintyWeighting",
    "DWA",
    "RLW",
    "PCGrad",
    "WEIGHTINGS",
    "register_weighting",
    "get_weighting",
    "project_conflicting",
]


class LossWeighting:
    """Base class: a fixed weight per task, then one backward pass of the weighted sum.

    Subclasses change :meth:`weights` (loss-based schemes) or :meth:`backward` (schemes that
    need the total loss or the per-task gradients).

    Args:
        tasks: The tasks trained together.
        seed: Seed of the scheme's random choices (RLW's weights, PCGrad's order).
    """

    name = ""

    def __init__(self, tasks: Sequence[Task], seed: int = 0) -> None:
        if not tasks:
            raise ValueError("a loss weighting needs at least one task")
        self.task_names = [t.name for t in tasks]
        self.recipe_weights = {t.name: float(t.weight) for t in tasks}
        self.seed = seed
        # A private CPU generator: the same draws on every device, saved with the checkpoint.
        self.generator = torch.Generator().manual_seed(seed)

    def parameters(self) -> list[Tensor]:
        """Learnable parameters of the scheme, for the optimizer (none by default)."""
        return []

    def to(self, device: torch.device | str) -> LossWeighting:
        """Move learnable parameters to ``device`` in place (call before building the optimizer)."""
        for p in self.parameters():
            p.data = p.data.to(device)
        return self

    def start_epoch(self, epoch: int, epoch_losses: Sequence[Mapping[str, float]]) -> None:
        """Called before each epoch.

        Args:
            epoch: The epoch about to start, counted from 0.
            epoch_losses: The mean training loss per task of every finished epoch, oldest
                first (so ``len(epoch_losses) == epoch`` in a run that started at 0).
        """

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        """The weight of each task's loss in this step."""
        return {name: self._recipe_weight(name) for name in losses}

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[Tensor]) -> dict[str, float]:
        """Backpropagate the weighted losses, accumulating into each parameter's ``.grad``.

        Args:
            losses: The scalar loss of each task in this batch.
            shared: The parameters every task's loss depends on (gradient surgery uses them).

        Returns:
            The weight applied to each task's loss.
        """
        weights = self.weights(losses)
        total = sum(weights[name] * loss for name, loss in losses.items())
        total.backward()  # type: ignore[union-attr]
        return weights

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep for an identical resumed run."""
        return {
            "generator": self.generator.get_state(),
            "parameters": [p.detach().cpu().clone() for p in self.parameters()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.generator.set_state(state["generator"])
        for p, saved in zip(self.parameters(), state["parameters"], strict=True):
            with torch.no_grad():
                p.copy_(saved)

    def _recipe_weight(self, name: str) -> float:
        if name not in self.recipe_weights:
            raise ValueError(
                f"{type(self).__name__} got a loss for task '{name}' but was built for: "
                f"{', '.join(self.task_names)}"
            )
        return self.recipe_weights[name]


#: name -> class; ``get_weighting`` looks names up here.
WEIGHTINGS: dict[str, type[LossWeighting]] = {}


def register_weighting(name: str) -> Callable[[type[LossWeighting]], type[LossWeighting]]:
    """Class decorator that registers a weighting scheme under ``name`` (no duplicates)."""

    def wrap(cls: type[LossWeighting]) -> type[LossWeighting]:
        if name in WEIGHTINGS:
            raise ValueError(f"loss weighting '{name}' is already registered ({WEIGHTINGS[name].__name__})")
        WEIGHTINGS[name] = cls
        cls.name = name
        return cls

    return wrap


def get_weighting(name: str, tasks: Sequence[Task], seed: int = 0) -> LossWeighting:
    """Build the weighting scheme called ``name`` (``finetune.weighting`` in the recipe).

    Raises:
        RecipeError: ``name`` is not registered.
    """
    if name not in WEIGHTINGS:
        raise RecipeError(f"finetune.weighting: {unknown_choice('loss weighting', name, WEIGHTINGS)}")
    return WEIGHTINGS[name](tasks, seed)


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
        self.log_vars = torch.zeros(len(self.task_names), requires_grad=True)

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


def project_conflicting(grads: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """PCGrad's projection (Yu et al., NeurIPS 2020, Algorithm 1) on flat gradients.

    For each task i, starting from ``g_i``, and for each other task j in ``orders[i]``: when
    the running ``g_i`` conflicts with the *original* ``g_j`` (negative dot product), remove
    its component along ``g_j``: ``g_i -= (g_i·g_j / |g_j|²) g_j``.

    Args:
        grads: ``(T, N)`` per-task gradients.
        orders: For each task, the order in which to visit the other tasks.

    Returns:
        ``(T, N)`` projected gradients; their sum is PCGrad's update.
    """
    projected = grads.clone()
    for i, order in enumerate(orders):
        g = projected[i]
        for j in order:
            if j == i:
                continue
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g -= dot / grads[j].square().sum() * grads[j]
    return projected


@register_weighting("pcgrad")
class PCGrad(LossWeighting):
    """Projecting Conflicting Gradients (Yu et al., "Gradient surgery", NeurIPS 2020).

    The shared parameters get ``Σ_t PC(w_t ∇L_t)`` from :func:`project_conflicting`, with
    every task visiting the others in a fresh random order (the seeded generator); all
    shared parameters form one flat vector, as in the paper. Every other parameter gets its
    plain gradient of ``Σ_t w_t L_t``. This costs T backward passes through the shared part
    plus one full one.
    """

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[Tensor]) -> dict[str, float]:
        weights = self.weights(losses)
        names = list(losses)
        weighted = [weights[name] * losses[name] for name in names]
        shared = [p for p in shared if p.requires_grad]
        if len(names) < 2 or not shared:
            sum(weighted).backward()  # type: ignore[union-attr]
            return weights
        flat = []
        for loss in weighted:
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            flat.append(torch.cat([
                (torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(shared, grads, strict=True)
            ]))
        orders = [torch.randperm(len(names), generator=self.generator).tolist() for _ in names]
        update = project_conflicting(torch.stack(flat), orders).sum(0)
        before = [None if p.grad is None else p.grad.clone() for p in shared]
        # The plain backward gives the task-specific gradients; the shared ones are replaced.
        sum(weighted).backward()  # type: ignore[union-attr]
        offset = 0
        for p, old in zip(shared, before, strict=True):
            n = p.numel()
            new = update[offset:offset + n].view_as(p).to(p.dtype)
            p.grad = new if old is None else old + new
            offset += n
        return weights
