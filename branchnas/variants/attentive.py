"""The attentive variant (ASTMT, Maninis et al. 2019): single-tasking with per-task modulation,
and adversarial training on the tasks' gradients.

The network (:class:`branchnas.models.attentive.AttentiveNet`) gives every node that several
tasks share a per-task squeeze-and-excitation and per-task BatchNorm (and, with
``finetune.attentive.adapters``, per-task 1×1 residual adapters) and runs it once per task.

Adversarial training (``finetune.attentive.adversarial``, paper Sec. 4): for each task ``t``,
``g_t = ∂L_t/∂f_t`` where ``f_t`` is what the task's branch receives from the shared trunk
(:attr:`AttentiveNet.branch_inputs`), computed with ``create_graph=True`` (double backprop) and
L2-normalised over the channels at each pixel. Tasks that branch at the same depth share one
discriminator (1×1 conv, ReLU, 1×1 conv: depth 2, kernel 1) that classifies, pixel by pixel,
which of them a gradient came from; ``L_D`` is the mean of those cross-entropies. The
gradients pass through a gradient reversal scaled by ``α(p) = 2/(1 + e^{−10p}) − 1`` (``p``:
the share of the training steps done), so the discriminator minimises ``L_D`` and the network
maximises it. A depth where one task alone branches has nothing to tell apart and gets none.

How the loss ``(1 − w)·L_task + w·L_D`` composes with the loss weighting: ``w·L_D`` is
backpropagated first (keeping the step's graph), its gradients are set aside, the weighting's
own backward runs on the task losses as it would without this variant, its gradients are
scaled by ``(1 − w)`` and the set-aside ones added. So every weighting (gradient surgery
included) sees the task losses and gradients it always sees, and the step's gradient is
``(1 − w)·(the weighting's gradient) + w·∇L_D``. The discriminator has its own optimizer (the
recipe's, at ``finetune.lr × discriminator_lr``) on the run's schedule; its weights are saved in
the trainer's checkpoints, so a killed run resumes to the same network. It is used only in
training: the network that is costed, saved and exported has none.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from branchnas.variants import Variant, register_variant

__all__ = ["AttentiveVariant", "Discriminator", "reversal_alpha", "reverse_gradient", "exposed_gradients",
           "discriminator_loss", "branch_levels"]

logger = logging.getLogger(__name__)


def reversal_alpha(progress: float) -> float:
    """``α(p) = 2/(1 + e^{−10p}) − 1``: 0 at the start of training, about 1 from ``p`` = 0.5 on."""
    return 2.0 / (1.0 + math.exp(-10.0 * float(progress))) - 1.0


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.alpha * grad, None


def reverse_gradient(x: Tensor, alpha: float) -> Tensor:
    """The identity forward; the backward multiplies the incoming gradient by ``−alpha``."""
    return _Reverse.apply(x, float(alpha))


class Discriminator(nn.Sequential):
    """A fully convolutional task classifier: 1×1 conv, ReLU, 1×1 conv to one logit per task."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, classes, 1))


def exposed_gradients(losses: Mapping[str, Tensor], features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{task: ∂L_t/∂features_t}``, L2-normalised over channels per pixel, differentiable
    (``create_graph=True``) so that a loss on them reaches the network (double backprop)."""
    out = {}
    for task, feature in features.items():
        (grad,) = torch.autograd.grad(losses[task], feature, create_graph=True)
        out[task] = F.normalize(grad.float(), p=2.0, dim=1)
    return out


def discriminator_loss(discriminators: Mapping[str, nn.Module], levels: Mapping[str, Sequence[str]],
                       grads: Mapping[str, Tensor], alpha: float) -> Tensor:
    """Mean over the tasks of each level of the per-pixel cross-entropy of its discriminator
    on the task's (reversed) gradient, the label being the task's index in its level."""
    terms = []
    for level, tasks in levels.items():
        for label, task in enumerate(tasks):
            logits = discriminators[level](reverse_gradient(grads[task], alpha))
            target = torch.full((logits.shape[0], *logits.shape[2:]), label, dtype=torch.long, device=logits.device)
            terms.append(F.cross_entropy(logits, target))
    return torch.stack(terms).mean()


def branch_levels(net: nn.Module) -> dict[str, list[str]]:
    """``{depth: tasks that branch there}`` (``"stem"`` or ``"b<d>"``) for depths with two or more tasks."""
    levels: dict[str, list[str]] = {}
    for task, key in net.branch_inputs.items():
        levels.setdefault(key.split("_", 1)[0] if key != "stem" else "stem", []).append(task)
    return {level: tasks for level, tasks in levels.items() if len(tasks) >= 2}


def _level_channels(net: nn.Module, level: str) -> int:
    info = net.stem_info if level == "stem" else net.block_info[int(level[1:])]
    return int(info.channels)


@register_variant
class AttentiveVariant(Variant):
    name = "attentive"
    summary = "ASTMT: per-task SE and BatchNorm in the shared nodes, one pass per task, adversarial gradients"

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self.cfg = recipe.finetune.attentive
        if self.cfg.adversarial:
            self.ddp_conflict = ("its adversarial term backpropagates through the step's gradients (double backprop), "
                                 "a second backward pass that DDP's gradient reducer does not allow; "
                                 "finetune.attentive.adversarial = false lifts this")
        self.levels: dict[str, list[str]] = {}
        self.discriminators = nn.ModuleDict()
        self.loss_sum = 0.0
        self.loss_steps = 0

    def build(self, tree: Any, backbones: Mapping[str, nn.Module], heads: Mapping[str, nn.Module], *,
              init: str, tasks: Sequence[str], affinity: Any = None, seed: int = 0,
              align: Tensor | None = None) -> nn.Module:
        from branchnas.models.attentive import AttentiveNet

        net = AttentiveNet.from_single_task(tree, backbones, heads, init, tasks=tasks, affinity=affinity, seed=seed,
                                            align=align, reduction=self.cfg.reduction, adapters=self.cfg.adapters)
        self.levels = branch_levels(net) if self.cfg.adversarial else {}
        if self.cfg.adversarial and not self.levels:
            logger.warning("finetune.attentive.adversarial: no two tasks of this tree branch at the same depth, "
                           "so there is nothing for a discriminator to tell apart; training without it")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.discriminators = nn.ModuleDict({level: Discriminator(_level_channels(net, level), len(group))
                                                 for level, group in self.levels.items()})
        net.keep_branch_features = bool(self.levels)
        return net

    def optimizers(self, model: nn.Module) -> list[Any]:
        from branchnas.training.optim import _make_optimizer

        if not self.levels:
            return []
        self.discriminators.to(next(model.parameters()).device)
        cfg = self.recipe.finetune
        lr = cfg.lr * self.cfg.discriminator_lr
        optimizer = _make_optimizer(dataclasses.replace(cfg, lr=lr), list(self.discriminators.parameters()), [])
        for group in optimizer.param_groups:
            group["base_lr"] = lr
        return [optimizer]

    def backward(self, model: nn.Module, losses: Mapping[str, Tensor], weighting: Any,
                 shared: Sequence[Tensor], progress: float) -> dict[str, float]:
        if not self.levels:
            return weighting.backward(losses, shared)
        w = float(self.cfg.weight)
        features = model.take_branch_features()
        grads = exposed_gradients(losses, {t: features[t] for group in self.levels.values() for t in group})
        adversarial = discriminator_loss(self.discriminators, self.levels, grads, reversal_alpha(progress))
        (w * adversarial).backward(retain_graph=True)
        params = [p for p in model.parameters() if p.requires_grad]
        aside = [p.grad for p in params]
        for p in params:
            p.grad = None
        weights = weighting.backward(losses, shared)
        for p, extra in zip(params, aside, strict=True):
            if p.grad is not None:
                p.grad.mul_(1.0 - w)
            if extra is not None:
                p.grad = extra if p.grad is None else p.grad.add_(extra)
        self.loss_sum += float(adversarial.detach())
        self.loss_steps += 1
        return {name: (1.0 - w) * value for name, value in weights.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"discriminators": {k: v.detach().cpu().clone() for k, v in self.discriminators.state_dict().items()},
                "loss_sum": self.loss_sum, "loss_steps": self.loss_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.discriminators.load_state_dict(state["discriminators"])
        self.loss_sum = float(state["loss_sum"])
        self.loss_steps = int(state["loss_steps"])

    def finalise(self, model: nn.Module) -> nn.Module:
        model.keep_branch_features = False
        model.take_branch_features()
        return model.eval()

    def report(self, trained: nn.Module, final: nn.Module) -> dict[str, Any]:
        return {
            "attentive": {
                "reduction": self.cfg.reduction,
                "adapters": self.cfg.adapters,
                "adversarial": self.cfg.adversarial,
                "weight": self.cfg.weight,
                "discriminator_lr": self.cfg.discriminator_lr,
                "modulated_nodes": final.modulated_nodes(),
                "discriminator_levels": dict(self.levels),
                "discriminator_loss": self.loss_sum / self.loss_steps if self.loss_steps else None,
            },
        }

    def checkpoint(self, final: nn.Module) -> dict[str, Any]:
        return {"attentive": {"reduction": final.reduction, "adapters": final.adapters}}

    @classmethod
    def rebuild(cls, checkpoint: Mapping[str, Any], tree: Any, backbone: nn.Module,
                heads: Mapping[str, nn.Module], tasks: Sequence[str]) -> nn.Module:
        from branchnas.models.attentive import AttentiveNet

        settings = checkpoint["attentive"]
        net = AttentiveNet(tree, backbone, heads, tasks=tasks, reduction=settings["reduction"],
                           adapters=settings["adapters"])
        net.load_state_dict(checkpoint["state_dict"])
        return net
