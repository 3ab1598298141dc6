"""Task Fusion on top of a tree (Agarwal, Duan & Singla, *Task Fusion*, Sec. 3.1).

In every node of the tree that two or more tasks share, *task fusion layers* take the place of
the BatchNorm→ReLU pairs of the node's residual blocks: after every conv (``where = "all"``)
or after the last conv of each block (``where = "last"``). Nodes of one task stay plain blocks.
A fusion layer of a node with ``T`` tasks, on the conv's output ``x`` with ``C`` channels:

1. ``x̂ = norm(x)``: the replaced BatchNorm's normalisation (its running statistics), without
   its scale and shift;
2. modulation (eq. 2): ``m(φ_sh, x̂) ‖ m(φ_1, x̂) ‖ … ‖ m(φ_T, x̂)``, ``C·(T+1)`` channels, with
   ``m`` FiLM (``γ ⊙ x̂ + β``, γ = 1 and β = 0 at first), MultiPReLU (a per-channel PReLU, α =
   0.25 at first) or FiLM then PReLU (``modulation = film | prelu | both``);
3. a shared bottleneck (eq. 3) back to ``C`` channels (``bottleneck``): a 1×1 conv + BN, a
   linear layer over the channels at each position, or single-head self-attention at each
   position among the ``T+1`` modulations (each a token of ``C`` channels; the ``T+1``
   attended outputs are averaged);
4. the block goes on as before: the ReLU after it, or for the last conv of a block
   ``relu(fusion output + shortcut(x))``.

How the replaced BatchNorm is kept. Its statistics stay in front (step 1), because the paper
modulates normalised activations (it replaces "the learned BatchNorm scale/shift" by FiLM).
Its learned scale and shift move to the *end* of the bottleneck, which starts by passing the
shared modulation through: the conv bottleneck's BN takes the BN's weight and bias (running
statistics 0 and 1), the linear bottleneck starts as ``[diag(weight), 0, …, 0]`` with the BN's
bias, the attention bottleneck's value projection likewise. So nothing of the trained
single-task weights is lost, and the fusion layer starts as the BatchNorm it replaces:

* ``film``: at step 0 every modulation is the identity, so the fused network computes what
  the plain network does: exactly (float rounding) with the linear and attention bottlenecks,
  in training and eval mode; with the conv bottleneck its BN normalises ``x̂`` once more, which
  changes an output by a relative ~1e-5 (BatchNorm's eps) where a channel's variance is well
  above eps (tested);
* ``prelu`` and ``both``: the modulations start as PReLU(x̂) with α = 0.25 (the paper's value),
  so the layer starts as ``weight · PReLU(x̂) + bias`` rather than ``weight · x̂ + bias``: the
  negative part of the normalised activations is scaled by 0.25 (exact formula tested).

The ReLU after the fusion layer is kept for every modulation. (The paper drops it when the
modulation has a PReLU; but at a block's last conv the ReLU acts on the residual sum, which a
PReLU before the bottleneck cannot replace, and keeping it everywhere keeps the block a
ResNet block with non-negative outputs, as the next block's trained weights expect.)

The task-specific parameters are those of ``m(φ_t, ·)`` in every fusion layer
(:meth:`FusedNet.task_parameters`); the fused variant (:mod:`branchnas.variants.fused`)
updates them with their own task's loss only. Every node still maps one tensor to one tensor,
so the network scripts (TorchScript) and exports like :class:`BranchedNet`, built from plain
``torch.nn`` modules and the few small modules below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from branchnas.errors import UserError, unknown_choice
from branchnas.models.branched import BranchedNet
from branchnas.models.pruning import Residual, layer_units

__all__ = ["FusedNet", "TaskFusion", "FiLM", "ChannelLinear", "ModulationAttention", "fuse_block",
           "fusable", "make_modulation", "make_bottleneck",
           "WHERE", "MODULATIONS", "BOTTLENECKS"]

WHERE = ("all", "last")
MODULATIONS = ("film", "prelu", "both")
BOTTLENECKS = ("conv", "linear", "attention")

#: MultiPReLU's initial slope (the paper's, and torch's PReLU default).
PRELU_INIT = 0.25


class FiLM(nn.Module):
    """``γ ⊙ x + β`` per channel; γ = 1 and β = 0 at first (the identity)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


def make_modulation(channels: int, kind: str) -> nn.Sequential:
    """One set of modulation parameters ``m(φ, ·)``: FiLM, a per-channel PReLU, or FiLM then PReLU."""
    parts: list[nn.Module] = []
    if kind in ("film", "both"):
        parts.append(FiLM(channels))
    if kind in ("prelu", "both"):
        parts.append(nn.PReLU(channels, init=PRELU_INIT))
    return nn.Sequential(*parts)


class ChannelLinear(nn.Module):
    """A linear layer over the channels at every position: ``(N, C_in, H, W) → (N, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ModulationAttention(nn.Module):
    """Single-head self-attention among the ``tokens`` modulations at every position.

    The input ``(N, tokens·C, H, W)`` is read as ``tokens`` vectors of ``C`` channels per
    position; queries, keys and values are linear maps ``C → C``; the attended tokens are
    averaged back to ``C`` channels. Matrix products (not a fused attention kernel), so that
    fvcore counts them.
    """

    def __init__(self, channels: int, tokens: int) -> None:
        super().__init__()
        self.channels = int(channels)
        self.tokens = int(tokens)
        self.scale = float(channels) ** -0.5
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        tokens = x.reshape(n, self.tokens, self.channels, h, w).permute(0, 3, 4, 1, 2)  # N, H, W, T+1, C
        q, k, v = self.query(tokens), self.key(tokens), self.value(tokens)
        attention = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        return torch.matmul(attention, v).mean(dim=3).permute(0, 3, 1, 2)


def make_bottleneck(bn: nn.BatchNorm2d, tokens: int, kind: str) -> nn.Module:
    """The shared bottleneck ``C·tokens → C`` that replaces ``bn``'s affine: at first it passes the
    first ``C`` channels through, scaled by ``bn``'s weight and shifted by its bias."""
    channels = bn.num_features
    weight = bn.weight.detach() if bn.affine else torch.ones(channels)
    bias = bn.bias.detach() if bn.affine else torch.zeros(channels)
    with torch.no_grad():
        if kind == "conv":
            conv = nn.Conv2d(channels * tokens, channels, 1, bias=False)
            conv.weight.zero_()
            conv.weight[:, :channels, 0, 0].copy_(torch.eye(channels))
            norm = nn.BatchNorm2d(channels, eps=bn.eps, momentum=bn.momentum)
            norm.weight.copy_(weight)
            norm.bias.copy_(bias)
            return nn.Sequential(conv, norm)
        if kind == "linear":
            layer = ChannelLinear(channels * tokens, channels)
            layer.linear.weight.zero_()
            layer.linear.weight[:, :channels].copy_(torch.diag(weight))
            layer.linear.bias.copy_(bias)
            return layer
        attention = ModulationAttention(channels, tokens)
        attention.value.weight.copy_(torch.diag(weight))
        attention.value.bias.copy_(bias)
        return attention


class TaskFusion(nn.Module):
    """A task fusion layer in place of the BatchNorm ``bn`` (see the module docstring).

    Args:
        bn: The BatchNorm it replaces (left untouched; its statistics and affine are copied).
        tasks: ``T``, the tasks of the node.
        modulation: ``film``, ``prelu`` or ``both``.
        bottleneck: ``conv``, ``linear`` or ``attention``.

    Attributes:
        norm: The normalisation (affine-free BatchNorm with ``bn``'s running statistics).
        shared_modulation: ``m(φ_sh, ·)``.
        task_modulations: ``m(φ_t, ·)`` per task, in the node's task order.
        bottleneck: ``C·(T+1) → C``.
    """

    def __init__(self, bn: nn.BatchNorm2d, tasks: int, modulation: str = "both", bottleneck: str = "conv") -> None:
        super().__init__()
        channels = bn.num_features
        self.norm = nn.BatchNorm2d(channels, eps=bn.eps, momentum=bn.momentum, affine=False,
                                   track_running_stats=bn.track_running_stats)
        if bn.track_running_stats:
            self.norm.load_state_dict({k: v for k, v in bn.state_dict().items() if k not in ("weight", "bias")})
        self.shared_modulation = make_modulation(channels, modulation)
        self.task_modulations = nn.ModuleList([make_modulation(channels, modulation) for _ in range(tasks)])
        self.bottleneck = make_bottleneck(bn, tasks + 1, bottleneck)

    def modulate(self, x: Tensor) -> Tensor:
        """``m(φ_sh, x̂) ‖ m(φ_1, x̂) ‖ … ‖ m(φ_T, x̂)``: ``(N, C·(T+1), H, W)`` (eq. 2)."""
        x = self.norm(x)
        outs = [self.shared_modulation(x)]
        for m in self.task_modulations:
            outs.append(m(x))
        return torch.cat(outs, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(self.modulate(x))


def _layers(block: nn.Module) -> list[nn.Module]:
    """A node's residual blocks: a stage's children, or the block itself."""
    return list(block) if isinstance(block, nn.Sequential) else [block]


def _fusable(layer: nn.Module) -> bool:
    units, shortcut = layer_units(layer)
    return shortcut is not None and all(isinstance(u[1], nn.BatchNorm2d) for u in units)


def fusable(block: nn.Module) -> bool:
    """Whether every layer of ``block`` is a residual block with conv→BatchNorm pairs."""
    return all(_fusable(layer) for layer in _layers(block))


def fuse_block(block: nn.Module, tasks: int, where: str = "all", modulation: str = "both",
               bottleneck: str = "conv") -> nn.Module:
    """``block`` (a residual block or a stage of them) with task fusion layers for ``tasks`` tasks.

    The result holds ``block``'s own convs and shortcuts (not copies) and computes, with
    BatchNorm in place of each fusion layer, exactly what ``block`` computes.

    Raises:
        UserError: A layer of ``block`` is not a residual block with conv→BatchNorm pairs.
    """
    fused = []
    for layer in _layers(block):
        if not _fusable(layer):
            raise UserError(f"finetune.variant 'fused' needs residual blocks with BatchNorm→ReLU pairs; "
                            f"got a {type(layer).__name__}; use a ResNet backbone or another variant")
        units, shortcut = layer_units(layer)
        body: list[nn.Module] = []
        for k, unit in enumerate(units):
            conv, bn, rest = unit[0], unit[1], list(unit)[2:]  # rest: the ReLU, but after the last conv
            fuse = where == "all" or k == len(units) - 1
            body += [conv, TaskFusion(bn, tasks, modulation, bottleneck) if fuse else bn, *rest]
        fused.append(Residual(nn.Sequential(*body), shortcut))
    return nn.Sequential(*fused) if isinstance(block, nn.Sequential) else fused[0]


class FusedNet(BranchedNet):
    """The tree's network with task fusion layers in every node that several tasks share.

    Built like :class:`BranchedNet` (usually through :meth:`from_single_task`); the nodes of
    one task are the plain blocks.

    Args:
        tree, backbone, heads, tasks: As :class:`BranchedNet`.
        where: ``all`` (every conv of a residual block) or ``last`` (the last conv of each).
        modulation: ``film``, ``prelu`` or ``both``.
        bottleneck: ``conv``, ``linear`` or ``attention``.

    Raises:
        UserError: An unknown setting, or a shared node whose blocks are not residual blocks.
    """

    __jit_ignored_attributes__ = [*BranchedNet.__jit_ignored_attributes__, "fusion"]

    def __init__(self, tree: Any, backbone: nn.Module, heads: Mapping[str, nn.Module],
                 tasks: Sequence[str] | None = None, *, where: str = "all", modulation: str = "both",
                 bottleneck: str = "conv") -> None:
        for key, value, choices in (("where", where, WHERE), ("modulation", modulation, MODULATIONS),
                                    ("bottleneck", bottleneck, BOTTLENECKS)):
            if value not in choices:
                raise UserError(f"finetune.fused.{key}: {unknown_choice(key, value, choices)}")
        super().__init__(tree, backbone, heads, tasks)
        self.fusion = {"where": where, "modulation": modulation, "bottleneck": bottleneck}
        self._fuse_nodes(self.nodes)

    def _fuse_nodes(self, blocks: Mapping[str, nn.Module]) -> None:
        """Set every node from ``blocks`` (plain blocks), with fusion layers where it is shared."""
        for name, _ in self.plan:
            group = self.node_groups[name]
            block = blocks[name]
            self.nodes[name] = fuse_block(block, len(group), **self.fusion) if len(group) > 1 else block

    @classmethod
    def from_single_task(cls, tree: Any, backbones_by_task: Mapping[str, nn.Module],
                         heads_by_task: Mapping[str, nn.Module], init: str = "first", *,
                         tasks: Sequence[str] | None = None, affinity: Any = None, seed: int = 0,
                         align: Tensor | None = None,
                         where: str = "all", modulation: str = "both", bottleneck: str = "conv") -> FusedNet:
        """The fused network of ``tree``: the plain network's initialisation (``init``, see
        :meth:`BranchedNet.from_single_task`), each shared node's BatchNorms turned into fusion
        layers. The attention bottleneck's query and key start random, drawn from ``seed``."""
        plain = BranchedNet.from_single_task(tree, backbones_by_task, heads_by_task, init, tasks=tasks,
                                             affinity=affinity, seed=seed, align=align)
        names = plain.task_names
        with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random stream untouched
            torch.manual_seed(seed)
            net = cls(tree, backbones_by_task[names[0]], heads_by_task, tasks=names, where=where,
                      modulation=modulation, bottleneck=bottleneck)
            net.stem = plain.stem
            net.heads = plain.heads
            net._fuse_nodes(plain.nodes)
        net.sources = dict(plain.sources)
        net.alignment = dict(plain.alignment)
        return net

    @torch.jit.unused
    def fusion_layers(self) -> list[tuple[str, TaskFusion]]:
        """``(node, layer)`` of every task fusion layer, in order."""
        return [(name, m) for name, node in self.nodes.items() for m in node.modules() if isinstance(m, TaskFusion)]

    @torch.jit.unused
    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        """``{task: its task-specific parameters φ_t in every fusion layer}`` (every task; may be empty)."""
        out: dict[str, list[nn.Parameter]] = {t: [] for t in self.task_names}
        for name, layer in self.fusion_layers():
            for task, m in zip(self.node_groups[name], layer.task_modulations, strict=True):
                out[task].extend(m.parameters())
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        """The stem's and the shared nodes' parameters, less the task-specific ones (gradient surgery)."""
        own = {id(p) for params in self.task_parameters().values() for p in params}
        return [p for p in super().shared_parameters() if id(p) not in own]
