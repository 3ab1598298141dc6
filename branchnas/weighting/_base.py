"""The loss-weighting contract, its registry, and what the schemes share."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from branchnas.errors import RecipeError, did_you_mean, unknown_choice
from branchnas.tasks import Task


class LossWeighting:
    """Base class: a fixed weight per task, then one backward pass of the weighted sum.

    Subclasses change :meth:`weights` (loss-based schemes) or :meth:`backward` (schemes that
    need the total loss or the per-task gradients).

    Args:
        tasks: The tasks trained together.
        seed: Seed of the scheme's random choices (RLW's weights, PCGrad's order).
    """

    name = ""
    #: Why the scheme cannot train under DDP (several processes), or "" when it can. DDP
    #: averages the gradients of the backward pass over the processes; a scheme that reshapes
    #: per-task gradients, or that weighs by loss values, would see only its own process's
    #: share of the batch.
    ddp_conflict = ""

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


def get_weighting(spec: str | Mapping[str, Any], tasks: Sequence[Task], seed: int = 0) -> LossWeighting:
    """Build the weighting scheme ``spec`` names (``finetune.weighting`` in the recipe).

    Args:
        spec: A registered name (``"gradnorm"``), or a table ``{"name": "gradnorm",
            "alpha": 1.5}`` whose other keys are options of the scheme (keyword arguments of
            its class; see :func:`weighting_options`).
        tasks: The tasks trained together.
        seed: Seed of the scheme's random choices.

    Raises:
        RecipeError: The name is not registered, an option is unknown, or a value is wrong.
    """
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise RecipeError(f"finetune.weighting.name: missing; choose one of: {', '.join(sorted(WEIGHTINGS))}")
    else:
        name, options = spec, {}
    if name not in WEIGHTINGS:
        raise RecipeError(f"finetune.weighting: {unknown_choice('loss weighting', name, WEIGHTINGS)}")
    valid = weighting_options(name)
    for key in options:
        if key not in valid:
            raise RecipeError(
                f"finetune.weighting.{key}: unknown option of '{name}'{did_you_mean(key, valid)}; "
                f"valid options: {', '.join(valid) or '(none)'}"
            )
    try:
        return WEIGHTINGS[name](tasks, seed, **options)
    except ValueError as err:
        raise RecipeError(f"finetune.weighting: {err}") from None


def weighting_options(name: str) -> dict[str, tuple[type, Any]]:
    """The options of scheme ``name``: ``{option: (type, default)}``, from its class's signature."""
    init = WEIGHTINGS[name].__init__
    hints = typing.get_type_hints(init)
    return {
        p.name: (hints[p.name], p.default)
        for p in list(inspect.signature(init).parameters.values())[3:]  # after self, tasks, seed
    }



def _loss_values(losses: Sequence[Tensor]) -> Tensor:
    """The losses' values as a CPU float64 vector (one device sync)."""
    return torch.stack([loss.detach().double().reshape(()) for loss in losses]).cpu()



class _TaskState(LossWeighting):
    """A scheme with per-task state: maps loss names to task indices."""

    def _indices(self, names: Sequence[str]) -> list[int]:
        for name in names:
            self._recipe_weight(name)  # a clear error for an unknown task
        return [self.task_names.index(name) for name in names]


