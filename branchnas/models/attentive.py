"""ASTMT on top of a tree (Maninis et al., *Attentive Single-Tasking of Multiple Tasks*, Sec. 3).

Every node of the tree that two or more tasks share runs once per task, with that task's
modulation (single-tasking). Each of the node's layers (each residual block of a stage, or the
block itself when it is not a sequence of layers) keeps its convolutions shared and gets, per
task of the node:

* **BatchNorm**: every BatchNorm of the layer (a projection shortcut's included) becomes one
  copy per task, each initialised from the plain node's (paper Sec. 3.2);
* **squeeze-and-excitation** (Hu et al.) on the layer's conv output, where SE-ResNet and ASTMT
  put it: in a residual block on the residual branch after its last conv and BatchNorm, before
  the sum with the shortcut; in a layer without a shortcut (LeNet's conv blocks, MobileNetV2's
  non-residual blocks) at its output. ``SE(x) = x · 2σ(W₂ relu(W₁ avgpool(x) + b₁) + b₂)``
  with ``max(1, C // reduction)`` hidden channels. W₂ and b₂ start at zero, so every SE starts
  as the identity (``2σ(0) = 1``); the factor 2 is what makes that possible, and the gate's
  range is (0, 2) instead of (0, 1);
* with ``adapters``, a **residual adapter** per conv of the residual branch (Rebuffi et al.'s
  parallel form, paper eq. 2): a 1×1 conv beside the conv (same stride and groups), initialised
  to zero, ``conv(x) + A_t(x)``.

So, built from a plain network (:meth:`AttentiveNet.from_single_task`), the attentive network
computes exactly what the plain one computes until training moves the modulation (tested to
float tolerance, in train and eval mode).

Nodes of one task and the stem (shared by all tasks, never modulated) run once per image; a
node shared by ``k`` tasks runs ``k`` times. ``forward(x, tasks)`` runs only the requested
tasks' passes, like :class:`~branchnas.models.BranchedNet`, and the scripted network keeps that
argument. Features are keyed ``"<node>:<task>"`` (the stem's ``"stem"``).

In training mode the eager network also keeps, for the adversarial loss, the features each
task's branch receives from the shared trunk (:attr:`AttentiveNet.branch_inputs`): the output
of the last node on the task's path that it shares with another task, or the stem's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from branchnas.errors import UserError
from branchnas.models.branched import STEM, BranchedNet, TaskPass
from branchnas.models.pruning import layer_units

__all__ = ["AttentiveNet", "AttentiveLayer", "AttentiveNode", "PerTask", "SqueezeExcite", "TaskPass",
           "modulate_layer", "node_layers"]


class SqueezeExcite(nn.Module):
    """``x · 2σ(W₂ relu(W₁ avgpool(x) + b₁) + b₂)``; starts as the identity (W₂, b₂ = 0).

    Args:
        channels: Channels of ``x``.
        reduction: ``W₁`` maps ``channels`` to ``max(1, channels // reduction)``.
    """

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: Tensor) -> Tensor:
        squeezed = F.adaptive_avg_pool2d(x, 1)
        return x * (2.0 * torch.sigmoid(self.expand(torch.relu(self.reduce(squeezed)))))


class PerTask(nn.Module):
    """One module per task of a node; ``forward(x, t)`` runs task ``t``'s (its index in the node)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.copies = nn.ModuleList(modules)

    def forward(self, x: Tensor, t: int) -> Tensor:
        out = x
        for i, module in enumerate(self.copies):  # TorchScript indexes a ModuleList only by constants
            if i == t:
                out = module(x)
        return out


class _Shared(nn.Module):
    """A module every task of the node runs as it is."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, t: int) -> Tensor:
        return self.module(x)


class _AdaptedConv(nn.Module):
    """``conv(x) + A_t(x)``: a shared conv with a per-task 1×1 residual adapter beside it."""

    def __init__(self, conv: nn.Conv2d, tasks: int) -> None:
        super().__init__()
        self.conv = conv
        self.adapters = PerTask([_zero_adapter(conv) for _ in range(tasks)])

    def forward(self, x: Tensor, t: int) -> Tensor:
        return self.conv(x) + self.adapters(x, t)


def _zero_adapter(conv: nn.Conv2d) -> nn.Conv2d:
    kernel, padding, dilation = conv.kernel_size, conv.padding, conv.dilation
    if isinstance(padding, str):
        same = padding == "same" or all(k == 1 for k in kernel)
    else:
        same = all(2 * p == d * (k - 1) for k, p, d in zip(kernel, padding, dilation, strict=True))
    if not same:
        raise UserError(f"finetune.attentive.adapters: a {kernel} conv with padding {padding} changes the feature "
                        "size, so a 1×1 adapter cannot sit beside it; set finetune.attentive.adapters = false")
    adapter = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, groups=conv.groups, bias=False)
    nn.init.zeros_(adapter.weight)
    return adapter.to(device=conv.weight.device, dtype=conv.weight.dtype)


class _Solo(nn.Module):
    """A node of one task: the plain block, on the ``(x, t)`` node interface."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, t: int) -> Tensor:
        return self.block(x)


class AttentiveLayer(nn.Module):
    """One layer of a shared node: shared convs, per-task BatchNorm, SE and adapters.

    ``forward(x, t)`` is ``body_t(x)`` then ``SE_t``, then, for a residual layer, the sum with
    ``shortcut_t(x)`` (and a ReLU after it for ResNet blocks, none for MobileNetV2's).
    """

    def __init__(self, body: Sequence[nn.Module], se: PerTask, shortcut: Sequence[nn.Module] | None,
                 relu_after: bool) -> None:
        super().__init__()
        self.body = nn.ModuleList(body)
        self.se = se
        self.residual = shortcut is not None
        self.shortcut = nn.ModuleList(shortcut or [])
        self.relu_after = relu_after

    def forward(self, x: Tensor, t: int) -> Tensor:
        h = x
        for op in self.body:
            h = op(h, t)
        h = self.se(h, t)
        if self.residual:
            skip = x
            for step in self.shortcut:  # not `op`: TorchScript types a loop variable once per function
                skip = step(skip, t)
            h = h + skip
            if self.relu_after:
                h = torch.relu(h)
        return h


class AttentiveNode(nn.Module):
    """A node shared by several tasks: its :class:`AttentiveLayer` s in order; ``t`` picks the task."""

    def __init__(self, layers: Sequence[AttentiveLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, t: int) -> Tensor:
        for layer in self.layers:
            x = layer(x, t)
        return x


def node_layers(block: nn.Module) -> list[nn.Module]:
    """The layers of a block that are modulated one by one: a Sequential's children when they are
    layers themselves (residual blocks, inverted residuals), else the block as one layer."""
    if isinstance(block, nn.Sequential) and len(block) > 1 and all(len(list(c.children())) > 0 for c in block):
        return list(block)
    return [block]


def _ops(module: nn.Module, tasks: int, adapters: bool) -> list[nn.Module]:
    """``module`` as a list of ``(x, t)`` ops: per-task BatchNorm copies, (adapted) shared convs."""
    if isinstance(module, nn.Sequential):
        return [op for child in module for op in _ops(child, tasks, adapters)]
    if isinstance(module, nn.BatchNorm2d):
        return [PerTask([copy.deepcopy(module) for _ in range(tasks)])]
    if isinstance(module, nn.Conv2d):
        return [_AdaptedConv(module, tasks) if adapters else _Shared(module)]
    if any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in module.modules()):
        raise UserError(f"finetune.variant = 'attentive' cannot modulate a {type(module).__name__} (its convs and "
                        "BatchNorms are not a Sequential of layers); use a resnet, mobilenet_v2 or lenet5 backbone, "
                        "or another finetune.variant")
    return [_Shared(module)]


def modulate_layer(layer: nn.Module, tasks: int, reduction: int, adapters: bool) -> AttentiveLayer:
    """``layer`` (its own convs, shared) with per-task BatchNorm, SE and, optionally, adapters.

    Residual blocks (branchnas's CIFAR block, torchvision's ``BasicBlock`` and ``Bottleneck``,
    MobileNetV2's ``InvertedResidual``) get SE on the residual branch, before the sum; any other
    layer at its output.
    """
    units, shortcut = layer_units(layer)
    relu_after = True
    if shortcut is not None:
        body_modules = units
    elif type(layer).__name__ == "InvertedResidual" and hasattr(layer, "conv"):
        body_modules = [layer.conv]
        shortcut = nn.Identity() if layer.use_res_connect else None
        relu_after = False
    else:
        body_modules = [layer]
    convs = [m for body in body_modules for m in body.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError(f"finetune.variant = 'attentive': a {type(layer).__name__} layer has no conv to modulate; "
                        "use another finetune.variant")
    body = [op for m in body_modules for op in _ops(m, tasks, adapters)]
    skip = None if shortcut is None else _ops(shortcut, tasks, adapters=False)
    channels = convs[-1].out_channels
    device = convs[-1].weight.device
    se = PerTask([SqueezeExcite(channels, reduction).to(device) for _ in range(tasks)])
    return AttentiveLayer(body, se, skip, relu_after)


class AttentiveNet(BranchedNet):
    """The tree's network with ASTMT modulation in every node that several tasks share.

    Built like :class:`BranchedNet` (same arguments), usually through :meth:`from_single_task`.

    Args:
        tree, backbone, heads, tasks: As :class:`BranchedNet`.
        reduction: The SE reduction ratio.
        adapters: Per-task 1×1 residual adapters beside the shared convs.
        plain: A plain :class:`BranchedNet` of the same tree whose weights the stem, heads and
            nodes take before they are modulated (so the BatchNorm copies start as its own).

    Attributes:
        branch_inputs: ``{task: feature key}``: the features the task's branch receives from
            the shared trunk (the last node on its path shared with another task, else the stem).
        keep_branch_features: Keep those features of each training forward in
            :attr:`branch_features` (for the adversarial loss; :meth:`take_branch_features`).
        input_shape: ``[C, H, W]`` of the last training batch (for per-image costs).
    """

    __jit_ignored_attributes__ = [*BranchedNet.__jit_ignored_attributes__, "branch_inputs", "branch_features",
                                  "input_shape"]

    def __init__(self, tree: Any, backbone: nn.Module, heads: Mapping[str, nn.Module],
                 tasks: Sequence[str] | None = None, *, reduction: int = 16, adapters: bool = False,
                 plain: BranchedNet | None = None) -> None:
        super().__init__(tree, backbone, heads, tasks)
        if int(reduction) < 1:
            raise UserError(f"finetune.attentive.reduction: expected a positive integer; got {reduction}")
        if plain is not None:
            if plain.partitions() != self.partitions() or plain.task_names != self.task_names:
                raise ValueError("AttentiveNet: the plain network is of another tree")
            self.stem.load_state_dict(plain.stem.state_dict())
            self.heads.load_state_dict(plain.heads.state_dict())
            self.nodes.load_state_dict(plain.nodes.state_dict())
            self.sources = dict(getattr(plain, "sources", {}) or {})
            self.alignment = dict(getattr(plain, "alignment", {}) or {})
        self.reduction = int(reduction)
        self.adapters = bool(adapters)
        nodes: dict[str, nn.Module] = {}
        for name, _ in self.plan:
            group, block = self.node_groups[name], self.nodes[name]
            if len(group) == 1:
                nodes[name] = _Solo(block)
            else:
                nodes[name] = AttentiveNode([modulate_layer(layer, len(group), self.reduction, self.adapters)
                                             for layer in node_layers(block)])
        self.nodes = nn.ModuleDict(nodes)
        # The features a node reads, per task of the node: "stem" or "<parent node>:<task>".
        self.node_inputs = [[STEM if parent == STEM else f"{parent}:{t}" for t in self.node_groups[name]]
                            for name, parent in self.plan]
        self.head_inputs = [f"{self.leaf[t]}:{t}" for t in self.task_names]
        self.branch_inputs = {t: self._branch_input(t) for t in self.task_names}
        self.keep_branch_features = False
        self.branch_features = {}
        self.input_shape = []

    @classmethod
    def from_single_task(cls, tree: Any, backbones_by_task: Mapping[str, nn.Module],
                         heads_by_task: Mapping[str, nn.Module], init: str = "first", *,
                         tasks: Sequence[str] | None = None, affinity: Any = None, seed: int = 0,
                         align: Tensor | None = None,
                         reduction: int = 16, adapters: bool = False) -> AttentiveNet:
        """The attentive network of ``tree``: the plain network's weights (``init``, see
        :meth:`BranchedNet.from_single_task`), modulated. The SE layers' first convs are drawn
        from ``seed`` (their second convs and the adapters start at zero)."""
        plain = BranchedNet.from_single_task(tree, backbones_by_task, heads_by_task, init, tasks=tasks,
                                             affinity=affinity, seed=seed, align=align)
        names = plain.task_names
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(tree, backbones_by_task[names[0]], heads_by_task, tasks=names, reduction=reduction,
                       adapters=adapters, plain=plain)

    def _branch_input(self, task: str) -> str:
        shared = [name for name in self.plan_nodes(task) if len(self.node_groups[name]) > 1]
        return f"{shared[-1]}:{task}" if shared else STEM

    @torch.jit.unused
    def plan_nodes(self, task: str) -> list[str]:
        """The nodes ``task`` passes through, one per block, in order."""
        return [name for name, _ in self.plan if task in self.node_groups[name]]

    # -- forward

    def forward_features(self, x: Tensor, tasks: list[str] | None = None
                         ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """As :meth:`BranchedNet.forward_features`; node features are keyed ``"<node>:<task>"``
        and a shared node runs once for each requested task of its group."""
        wanted = self._wanted(tasks)
        features: dict[str, Tensor] = {"stem": self.stem(x)}
        i = 0
        for name, node in self.nodes.items():
            k = 0
            for t in self.node_tasks[i]:
                if t in wanted:
                    features[name + ":" + t] = node(features[self.node_inputs[i][k]], k)
                k += 1
            i += 1
        if self.training and not torch.jit.is_scripting():
            self._observe(x, features)
        return self._run_heads(features, wanted), features

    @torch.jit.unused
    def _observe(self, x: Tensor, features: dict[str, Tensor]) -> None:
        """Remember the input's shape and, when asked, the branch features of this training step."""
        self.input_shape = [int(s) for s in x.shape[1:]]
        if self.keep_branch_features:
            self.branch_features = {t: features[key] for t, key in self.branch_inputs.items() if key in features}

    @torch.jit.unused
    def take_branch_features(self) -> dict[str, Tensor]:
        """``{task: features its branch received}`` of the last training forward, then forgotten."""
        kept, self.branch_features = self.branch_features, {}
        return kept

    @torch.jit.unused
    def task_path(self, task: str) -> list[str]:
        """The feature keys (``"<node>:<task>"``) of the nodes ``task`` passes through."""
        return [f"{name}:{task}" for name in self.plan_nodes(task)]

    # -- parameters

    @torch.jit.unused
    def modulated_nodes(self) -> dict[str, list[str]]:
        """``{node: its tasks}`` of every modulated (shared) node."""
        return {name: list(self.node_groups[name]) for name, node in self.nodes.items()
                if isinstance(node, AttentiveNode)}

    @torch.jit.unused
    def task_parameters(self) -> list[nn.Parameter]:
        """The per-task parameters of the shared nodes: BatchNorm copies, SE, adapters."""
        return [p for node in self.nodes.values() if isinstance(node, AttentiveNode)
                for m in node.modules() if isinstance(m, PerTask) for p in m.parameters()]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The stem's and the shared nodes' shared convs (not their per-task modulation)."""
        own = {id(p) for p in self.task_parameters()}
        params = list(self.stem.parameters())
        for node in self.nodes.values():
            if isinstance(node, AttentiveNode):
                params.extend(p for p in node.parameters() if id(p) not in own)
        return params
