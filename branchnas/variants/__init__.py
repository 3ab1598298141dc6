"""Fine-tuning variants: how the network of the chosen tree is built, trained and made static.

A variant (``finetune.variant``) is an object registered by name. For one fine-tuning it:

* :meth:`Variant.build` s the network from the tree and the single-task models;
* adds its own loss terms to every training step through the one trainer
  (:meth:`Variant.regulariser`, e.g. the gates' sparsity loss);
* may own parameters with optimizers of its own (:meth:`Variant.optimizers`; the recipe's
  optimizer takes every other parameter), stepped on the same learning-rate schedule;
* :meth:`Variant.finalise` s the trained network into the static network that is costed,
  evaluated, saved and exported (the gated variant prunes it);
* saves and restores its own state for resume (:meth:`Variant.state_dict`), and says how to
  :meth:`Variant.rebuild` its saved network without the data.

=========  ===================================================================
name       network
=========  ===================================================================
plain      the tree's branched network (:class:`branchnas.models.BranchedNet`)
gated      GatedMTL layers in the shared nodes, pruned after training
           (:class:`branchnas.models.gated.GatedNet`)
fused      Task Fusion layers (per-task FiLM/PReLU and a shared bottleneck) in place
           of the shared nodes' BN→ReLU pairs; task-specific parameters learn from
           their own task's loss only (:class:`branchnas.models.fused.FusedNet`)
attentive  ASTMT: per-task squeeze-and-excitation and BatchNorm (optionally 1×1
           adapters) in the shared nodes, one pass per task, and a discriminator on
           the tasks' gradients (:class:`branchnas.models.attentive.AttentiveNet`)
=========  ===================================================================

Example:
    >>> variant = get_variant("gated", recipe)
    >>> net = variant.build(tree, backbones, heads, init="outlier", tasks=names)
    >>> Trainer(net, tasks, recipe.finetune, ..., variant=variant).fit(train, val)
    >>> final = variant.finalise(net)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from branchnas.errors import NotAvailableYet, RecipeError, unknown_choice

__all__ = ["Variant", "VARIANTS", "PLANNED", "over_budget_fix", "register_variant", "get_variant", "variant_class", "variant_names"]

#: name -> Variant class, in registration order.
VARIANTS: dict[str, type[Variant]] = {}

#: Names the recipe accepts that no variant implements yet (refused before any work).
PLANNED: tuple[str, ...] = ()


class Variant:
    """Base class and the plain behaviour of every hook.

    Args:
        recipe: The resolved recipe (its ``[finetune]`` section configures the variant).
    """

    name = ""
    summary = ""
    #: Why the variant cannot train under DDP (several processes), or "" when it can.
    ddp_conflict = ""

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe

    def check(self, task_names: Sequence[str] | None = None) -> None:
        """Refuse a bad configuration before any work (``task_names``: when known)."""

    def build(self, tree: Any, backbones: Mapping[str, nn.Module], heads: Mapping[str, nn.Module], *,
              init: str, tasks: Sequence[str], affinity: Any = None, seed: int = 0,
              align: Tensor | None = None) -> nn.Module:
        """The network to train, from the single-task backbones and heads (``align``: training
        images for the change of basis at branch points, see :meth:`BranchedNet.from_single_task`)."""
        raise NotImplementedError

    def backward(self, model: nn.Module, losses: Mapping[str, Tensor], weighting: Any,
                 shared: Sequence[Tensor], progress: float) -> dict[str, float]:
        """The training step's backward pass; returns the loss weights used (for the history).

        By default the loss weighting's (``weighting.backward(losses, shared)``). A variant that
        routes gradients (task-specific parameters updated by their own task's loss only), or
        adds a term that needs the step's graph (a discriminator on the gradients), overrides
        it and still leaves the weighting's backward to do the rest. ``progress``: the share of
        the training steps done, from 0 to 1 (for schedules).
        """
        return weighting.backward(losses, shared)

    def regulariser(self, model: nn.Module) -> Tensor | None:
        """A loss term added to every training step (``None``: none)."""
        return None

    def optimizers(self, model: nn.Module) -> list[Any]:
        """Optimizers of the parameters the variant owns; each group carries a ``base_lr``."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """The variant's own training state (beyond the model's and its optimizers')."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` when a run resumes."""

    def finalise(self, model: nn.Module) -> nn.Module:
        """The static network that is costed, evaluated, saved and exported."""
        return model.eval()

    def report(self, trained: nn.Module, final: nn.Module) -> dict[str, Any]:
        """Extra fields for ``report.json``."""
        return {}

    def checkpoint(self, final: nn.Module) -> dict[str, Any]:
        """Extra fields for ``model.pt`` that :meth:`rebuild` needs."""
        return {}

    @classmethod
    def rebuild(cls, checkpoint: Mapping[str, Any], tree: Any, backbone: nn.Module,
                heads: Mapping[str, nn.Module], tasks: Sequence[str]) -> nn.Module:
        """The saved network's module, weights loaded, from a ``model.pt``'s contents."""
        raise NotImplementedError


def register_variant(cls: type[Variant]) -> type[Variant]:
    """Class decorator: register a variant under ``cls.name`` (no duplicates)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a variant needs a name")
    if cls.name in VARIANTS:
        raise ValueError(f"fine-tuning variant '{cls.name}' is already registered ({VARIANTS[cls.name].__name__})")
    VARIANTS[cls.name] = cls
    return cls


def variant_class(name: str) -> type[Variant]:
    """The class registered as ``name``.

    Raises:
        NotAvailableYet: ``name`` is planned but not built.
        RecipeError: ``name`` is unknown.
    """
    _load()
    if name in VARIANTS:
        return VARIANTS[name]
    if name in PLANNED:
        raise NotAvailableYet(f"finetune.variant '{name}' is not available yet; use one of: {', '.join(VARIANTS)}")
    raise RecipeError(f"finetune.variant: {unknown_choice('fine-tuning variant', name, VARIANTS)}")


def get_variant(name: str, recipe: Any) -> Variant:
    """The variant ``name`` configured by ``recipe``."""
    return variant_class(name)(recipe)


#: What to change when a variant's finished network is over the search budget (the search
#: sizes trees with plain blocks; gated, fused and attentive networks add their own layers).
OVER_BUDGET_FIX = {
    "gated": "raise finetune.gated.sparsity or lower finetune.gated.targets (or let `branchnas tune` choose them)",
    "fused": "its fusion layers add parameters the search did not count: set finetune.fused.where = 'last', "
             "or a lower search.budget",
    "attentive": "its per-task squeeze-and-excitation and BatchNorm add what the search did not count: set "
                 "finetune.attentive.adapters = false, or a lower search.budget",
}


def over_budget_fix(variant: str) -> str:
    """What to change when ``variant``'s network is over the budget (see :data:`OVER_BUDGET_FIX`)."""
    return OVER_BUDGET_FIX.get(variant, "set a lower search.budget")


#: The built-in variants, in the order they are listed (whichever module was imported first).
BUILTIN = ("plain", "gated", "fused", "attentive")


def variant_names() -> list[str]:
    """The registered variants: the built-in ones in :data:`BUILTIN` order, then any others."""
    _load()
    return sorted(VARIANTS, key=lambda name: BUILTIN.index(name) if name in BUILTIN else len(BUILTIN))


def _load() -> None:
    from branchnas.variants import plain  # noqa: F401, I001  (registration, in this order)
    from branchnas.variants import gated  # noqa: F401
    from branchnas.variants import fused  # noqa: F401
    from branchnas.variants import attentive  # noqa: F401


