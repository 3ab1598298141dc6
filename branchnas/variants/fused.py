"""The fused variant (Task Fusion, Agarwal et al., Sec. 3): task modulation in the shared nodes.

Every node that several tasks share gets task fusion layers in place of its BatchNorm→ReLU
pairs (:mod:`branchnas.models.fused`; ``finetune.fused.where``, ``.modulation``,
``.bottleneck``): one shared and one per-task modulation of the features, fused back to ``C``
channels by a shared bottleneck.

Per-task backpropagation (eq. 4–5), in :meth:`FusedVariant.backward`: the shared parameters
(everything but the per-task modulations) get the loss weighting's gradient as usual, and the
parameters ``φ_t`` of task ``t``'s modulations get the gradient of task ``t``'s own term only::

    φ_t.grad = λ_t ∇_{φ_t} L_t        (instead of ∇_{φ_t} Σ_s λ_s L_s)

where ``λ_t`` is the weight the loss weighting gave ``L_t`` in this step (what it returns, and
what the history records). So each parameter gets the gradient of exactly the terms of the
objective whose task uses it. Under ``uniform`` weighting (``Σ_t w_t L_t``, recipe weights 1)
that is the paper's eq. 4, ``∇L_t``; the shared parameters get ``Σ_t ∇L_t``, which is eq. 5's
mean times T (branchnas sums the task losses; the learning rate absorbs the constant). Under a
learned weighting (uncertainty: ``λ_t = w_t exp(-s_t)``), a task's own parameters see its loss
on the same scale as its head and the shared parameters do. For imtl and gradvac, ``λ_t`` is
the weight of the task in the *shared* gradient (their heads get ``w_t L_t``). Eq. 6 (task
groups sharing one set of modulation parameters, scaled by ``1/|h(t)|``) does not arise: in a
tree every modulation set belongs to one task, ``|h(t)| = 1``.

The per-task gradients are taken with ``torch.autograd.grad`` before the weighting's backward
frees the graph: T extra partial backward passes, from each task's loss back to the first
fusion layer on its path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from branchnas.errors import RecipeError
from branchnas.variants import Variant, register_variant


@register_variant
class FusedVariant(Variant):
    name = "fused"
    summary = "task fusion layers (per-task FiLM/PReLU, shared bottleneck) in the shared nodes"
    ddp_conflict = ("its task-specific gradients are taken outside DDP's gradient averaging, so each "
                    "process would update them from its own share of the batch")

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self.cfg = recipe.finetune.fused

    def settings(self) -> dict[str, str]:
        """``{"where", "modulation", "bottleneck"}`` of ``[finetune.fused]``."""
        return {"where": self.cfg.where, "modulation": self.cfg.modulation, "bottleneck": self.cfg.bottleneck}

    def check(self, task_names: Sequence[str] | None = None) -> None:
        from branchnas.backbones import build_backbone
        from branchnas.models.fused import fusable

        cfg = self.recipe.backbone
        # The layout alone decides; a small random copy (no weights file read) shows it.
        backbone = build_backbone(dataclasses.replace(cfg, weights=""), 3, (32, 32))
        if not all(fusable(block) for block in backbone.blocks):
            raise RecipeError(
                f"finetune.variant 'fused' needs a backbone of residual blocks with BatchNorm→ReLU pairs; "
                f"backbone '{cfg.name}' has other blocks; use resnet20, resnet18, resnet34 or resnet50, "
                f"or finetune.variant = \"plain\" or \"gated\""
            )

    def build(self, tree: Any, backbones: Mapping[str, nn.Module], heads: Mapping[str, nn.Module], *,
              init: str, tasks: Sequence[str], affinity: Any = None, seed: int = 0,
              align: Tensor | None = None) -> nn.Module:
        from branchnas.models.fused import FusedNet

        return FusedNet.from_single_task(tree, backbones, heads, init, tasks=tasks, affinity=affinity, seed=seed,
                                         align=align, **self.settings())

    def backward(self, model: nn.Module, losses: Mapping[str, Tensor], weighting: Any,
                 shared: Sequence[Tensor], progress: float) -> dict[str, float]:
        own = {t: [p for p in params if p.requires_grad] for t, params in model.task_parameters().items()}
        own = {t: params for t, params in own.items() if params and t in losses}
        # Each task's gradient on its own parameters, while the graph still exists.
        grads = {t: torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
                 for t, params in own.items()}
        weights = weighting.backward(losses, shared)
        for t, params in own.items():
            for p, g in zip(params, grads[t], strict=True):
                p.grad = torch.zeros_like(p) if g is None else g * weights[t]
        return weights

    def report(self, trained: nn.Module, final: nn.Module) -> dict[str, Any]:
        from branchnas.cost import count_params

        layers: dict[str, int] = {}
        for node, _ in final.fusion_layers():
            layers[node] = layers.get(node, 0) + 1
        return {"fusion": {
            **self.settings(),
            "layers": layers,  # per shared node: how many fusion layers
            "task_params": {t: sum(p.numel() for p in params) for t, params in final.task_parameters().items()},
            "fusion_params": sum(count_params(layer) for _, layer in final.fusion_layers()),
        }}

    def checkpoint(self, final: nn.Module) -> dict[str, Any]:
        return {"fused": dict(final.fusion)}

    @classmethod
    def rebuild(cls, checkpoint: Mapping[str, Any], tree: Any, backbone: nn.Module,
                heads: Mapping[str, nn.Module], tasks: Sequence[str]) -> nn.Module:
        from branchnas.models.fused import FusedNet

        net = FusedNet(tree, backbone, heads, tasks=tasks, **checkpoint["fused"])
        net.load_state_dict(checkpoint["state_dict"])
        return net
