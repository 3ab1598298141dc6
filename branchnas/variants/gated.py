"""The gated variant (GatedMTL, Bejnordi et al.): learned per-channel sharing on top of the tree.

Every node that several tasks share becomes GatedMTL layers (:mod:`branchnas.models.gated`):
a shared copy initialised as the plain network's node, one copy per task initialised from
its single-task model, hard per-channel gates with a straight-through gradient and learned
mixing of the shared input. Training adds ``λ_s · L_sparsity`` (eq. 4–5;
``finetune.gated.sparsity`` and ``.targets``), and the gates (``α``, ``β``) have their own
SGD (``finetune.gated.lr``, 0.1 in the paper) on the run's learning-rate schedule.

:meth:`GatedVariant.finalise` prunes the trained network to a static one with the same eval
outputs; that is what is costed (fvcore, on the real pruned modules), checked against the
budget, evaluated, saved and exported. ``model.pt`` keeps the pruned weights and every
gate's decision, so :meth:`GatedVariant.rebuild` recreates it without the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from branchnas.errors import RecipeError
from branchnas.variants import Variant, register_variant


@register_variant
class GatedVariant(Variant):
    name = "gated"
    summary = "GatedMTL gates in the shared nodes, pruned after training"

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self.cfg = recipe.finetune.gated

    def targets(self, task_names: Sequence[str]) -> dict[str, float]:
        """τ_t for every task."""
        targets = self.cfg.targets
        if isinstance(targets, Mapping):
            from branchnas.recipe import GatedConfig

            default = GatedConfig.targets  # tasks the table leaves out get the default
            return {t: float(targets.get(t, default)) for t in task_names}
        return {t: float(targets) for t in task_names}

    def check(self, task_names: Sequence[str] | None = None) -> None:
        targets = self.cfg.targets
        if isinstance(targets, Mapping) and task_names is not None:
            unknown = [k for k in targets if k not in task_names]
            if unknown:
                raise RecipeError(
                    f"finetune.gated.targets: unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(task_names)}"
                )

    def build(self, tree: Any, backbones: Mapping[str, nn.Module], heads: Mapping[str, nn.Module], *,
              init: str, tasks: Sequence[str], affinity: Any = None, seed: int = 0,
              align: Tensor | None = None) -> nn.Module:
        from branchnas.models.gated import GatedNet

        self.check(tasks)
        self._targets = self.targets(tasks)
        return GatedNet.from_single_task(tree, backbones, heads, init, tasks=tasks, affinity=affinity,
                                         seed=seed, align=align, alpha_init=self.cfg.init)

    def regulariser(self, model: nn.Module) -> Tensor | None:
        from branchnas.models.gated import sparsity_loss

        if not self.cfg.sparsity or not model.gated_layers():
            return None
        targets = getattr(self, "_targets", None) or self.targets(model.task_names)
        return self.cfg.sparsity * sparsity_loss(model, targets).to(next(model.parameters()).device)

    def optimizers(self, model: nn.Module) -> list[Any]:
        params = model.gate_parameters()
        if not params:
            return []
        optimizer = torch.optim.SGD(params, lr=self.cfg.lr)
        for group in optimizer.param_groups:
            group["base_lr"] = self.cfg.lr
        return [optimizer]

    def finalise(self, model: nn.Module) -> nn.Module:
        return model.eval().prune()

    def report(self, trained: nn.Module, final: nn.Module) -> dict[str, Any]:
        from branchnas.cost import count_params

        return {"gates": {
            "sparsity": self.cfg.sparsity,
            "targets": self.targets(trained.task_names),
            "lr": self.cfg.lr,
            "init": self.cfg.init,
            # per node and task: the share of the node's channels the task computes itself
            "openness": final.gate_summary["openness"],
            "labels": {node: _label(trained, node) for node in final.gate_summary["openness"]},
            # per node, layer and unit: channels, open channels per task, shared channels kept
            "layers": {node: [[{k: v for k, v in unit.items() if k != "mask"} for unit in layer] for layer in layers]
                       for node, layers in final.gate_summary["layers"].items()},
            "params_before_pruning": count_params(trained),
        }}

    def checkpoint(self, final: nn.Module) -> dict[str, Any]:
        return {"gates": gate_decisions(final)}

    @classmethod
    def rebuild(cls, checkpoint: Mapping[str, Any], tree: Any, backbone: nn.Module,
                heads: Mapping[str, nn.Module], tasks: Sequence[str]) -> nn.Module:
        from branchnas.models.gated import GatedNet

        net = GatedNet(tree, backbone, heads, tasks=tasks)
        decisions = checkpoint["gates"]
        with torch.no_grad():
            for name, k, layer in net.gated_layers():
                for unit, alpha in enumerate(layer.alphas):
                    opened = torch.tensor(decisions[name][k][unit], dtype=torch.bool)
                    alpha.copy_(torch.where(opened, 1.0, -1.0))
        pruned = net.eval().prune()
        pruned.load_state_dict(checkpoint["state_dict"])
        pruned.gate_summary = checkpoint.get("gate_summary") or pruned.gate_summary
        return pruned


def _label(net: nn.Module, node: str) -> str:
    """A node as a person reads it, e.g. ``layer2 {shape,count}`` or ``layer2 {segmentation,… 5 tasks}``."""
    d = int(node[1:].split("_", 1)[0])
    info = net.block_info[d] if d < len(net.block_info) else None
    group = net.node_groups[node]
    tasks = ",".join(group)
    if len(tasks) > 24:
        tasks = f"{group[0]},… {len(group)} tasks"
    return f"{getattr(info, 'name', f'block {d}')} {{{tasks}}}"


def gate_decisions(net: nn.Module) -> dict[str, list[list[list[list[bool]]]]]:
    """``{node: [per layer: [per unit: [per task: [open per channel]]]]}`` of a pruned gated network."""
    return {name: [[unit["mask"] for unit in layer] for layer in layers]
            for name, layers in net.gate_summary["layers"].items()}
