"""GatedMTL on top of a tree (Bejnordi et al., GatedMTL, Sec. 3.1): learned per-channel sharing.

In every node of the tree that two or more tasks share, each of the node's layers (each
residual block of a stage, or the block itself when it is not a sequence of layers) holds a
*shared* copy ``Ψ`` and one *task* copy ``Φ_t`` per task of the node. A layer is cut into
*units* at its gate points (:func:`branchnas.models.pruning.layer_units`): after every
conv + BatchNorm (+ ReLU) of a residual block, the last one after ``relu(· + shortcut(x))``;
any other layer is one unit. For unit ``ℓ`` with per-task inputs ``x_t``:

* the shared input mixes the tasks' inputs channel by channel (eq. 3),
  ``ψ_in = Σ_t softmax_t(β)[c, t] · x_t`` with ``β ∈ R^{C_in × T}`` (when all the tasks' inputs
  are the same tensor, as after the stem, ``ψ_in`` is that tensor and ``β`` is empty);
* ``ψ = Ψ(ψ_in)`` and ``φ_t = Φ_t(x_t)``;
* each task picks, channel by channel, its own feature or the shared one (eq. 2):
  ``φ'_t = G_t ⊙ φ_t + (1 − G_t) ⊙ ψ`` with the hard gate ``G_t = 1[σ(α_t) > 0.5]`` and a
  straight-through gradient ``∂G/∂α = σ'(α)`` (:func:`hard_gate`).

Nodes of one task are plain blocks, as in :class:`~branchnas.models.BranchedNet`. The gates
are trained with the hinge sparsity loss (eq. 4, :func:`sparsity_loss`).

Because the gates do not depend on the input, :meth:`GatedNet.prune` turns the trained
network into a static one with the same eval outputs: each unit of a task copy keeps only
the conv rows (and BatchNorm, shortcut rows) of its open channels
(:func:`branchnas.models.pruning.prune_outputs`), a shared unit only the channels some task
still takes from it, the softmax of ``β`` becomes fixed mixing weights, and a unit with no
channel left is dropped. So a task pays, conv by conv, for the channels it opens. The pruned
network is what is costed, saved and exported.

Every node module maps a list of per-task inputs (in the node's task order) to a list of
per-task outputs, so the forward pass, gated or pruned, is one loop that TorchScript compiles.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from branchnas.models.branched import STEM, BranchedNet
from branchnas.models.pruning import layer_units, prune_outputs, prune_shortcut

__all__ = ["GatedNet", "hard_gate", "mix_inputs", "sparsity_loss", "gate_layers"]


def hard_gate(alpha: Tensor) -> Tensor:
    """``1[σ(α) > 0.5]`` in the forward pass, with the gradient of ``σ(α)`` (straight-through).

    The value is exactly 0 or 1 (the soft part is ``σ − σ.detach()``, which is exactly 0), so
    the gated and the pruned networks compute the same thing.
    """
    soft = torch.sigmoid(alpha)
    return (soft > 0.5).to(soft.dtype).detach() + (soft - soft.detach())


def mix_inputs(weights: Tensor, xs: list[Tensor]) -> Tensor:
    """``Σ_t weights[t, c] · xs[t][:, c]``: the shared input of eq. 3 (``weights`` is ``T × C``)."""
    out = xs[0] * weights[0].view(1, -1, 1, 1)
    for t in range(1, len(xs)):
        out = out + xs[t] * weights[t].view(1, -1, 1, 1)
    return out


def gate_layers(block: nn.Module) -> list[nn.Module]:
    """The layers of a block that get gates: a Sequential's children, else the block itself."""
    if isinstance(block, nn.Sequential) and len(block) > 1:
        return list(block)
    return [block]


class SoloNode(nn.Module):
    """A node of one task: the plain block, on the list-in, list-out node interface."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [self.block(xs[0])]


class GatedLayer(nn.Module):
    """One gated layer: a shared copy and one copy per task, with gates after every unit.

    Args:
        shared: The shared copy of the layer.
        copies: One copy per task (in the node's task order).
        channels: ``[input channels, output channels of each unit]`` (see
            :func:`branchnas.models.pruning.layer_units`).
        identical_inputs: Every task's input is the same tensor (no mixing at the first unit).
        alpha_init: Initial gate logit.

    Attributes:
        alphas: Per unit, the gate logits ``α`` (T × C_unit).
        betas: Per unit, the mixing logits ``β`` (C_in × T) of the shared copy's input
            (``0 × T`` for the first unit when the inputs are identical).
    """

    def __init__(self, shared: nn.Module, copies: Sequence[nn.Module], channels: Sequence[int],
                 identical_inputs: bool, alpha_init: float) -> None:
        super().__init__()
        self.shared = shared
        self.copies = nn.ModuleList(copies)
        self.identical_inputs = identical_inputs
        # Views of the layers' own modules (plain lists: not registered twice).
        self._shared_units, self._shared_shortcut = layer_units(shared)
        cut = [layer_units(c) for c in copies]
        self._copy_units = [u for u, _ in cut]
        self._copy_shortcuts = [sc for _, sc in cut]
        self.residual = self._shared_shortcut is not None
        tasks = len(copies)
        if len(channels) != len(self._shared_units) + 1:
            raise ValueError(f"GatedLayer: {len(self._shared_units)} units need {len(self._shared_units) + 1} channel counts")
        self.alphas = nn.ParameterList(
            [nn.Parameter(torch.full((tasks, c), float(alpha_init))) for c in channels[1:]])
        self.betas = nn.ParameterList(
            [nn.Parameter(torch.zeros(0 if (k == 0 and identical_inputs) else channels[k], tasks))
             for k in range(len(channels) - 1)])

    def mixing_weights(self, unit: int) -> Tensor:
        """``softmax_t(β)`` of ``unit`` as ``T × C_in`` (each channel's weights sum to 1)."""
        return torch.softmax(self.betas[unit], dim=1).t()

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        first = xs[0] if self.identical_inputs else mix_inputs(self.mixing_weights(0), xs)
        h, shared_in = xs, first
        last = len(self._shared_units) - 1
        for k, unit in enumerate(self._shared_units):
            if k > 0:
                shared_in = mix_inputs(self.mixing_weights(k), h)
            psi = unit(shared_in)
            phis = [self._copy_units[t][k](h[t]) for t in range(len(h))]
            if k == last and self.residual:
                psi = torch.relu(psi + self._shared_shortcut(first))
                phis = [torch.relu(phi + self._copy_shortcuts[t](xs[t])) for t, phi in enumerate(phis)]
            gates = hard_gate(self.alphas[k]).to(psi.dtype)
            h = [gates[t].view(1, -1, 1, 1) * phi + (1 - gates[t].view(1, -1, 1, 1)) * psi
                 for t, phi in enumerate(phis)]
        return h


class GatedNode(nn.Module):
    """A node shared by several tasks: its :class:`GatedLayer` s (after pruning, its
    :class:`PrunedLayer` s) in order."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        for layer in self.layers:
            xs = layer(xs)
        return xs


class _Unit(nn.Module):
    """A pruned unit on the two-input interface ``(input, layer input)``: ``module(input)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.module(x)


class _Tail(nn.Module):
    """A pruned last unit of a residual layer: ``relu(body(input) + shortcut(layer input))``."""

    def __init__(self, body: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(skip))


class _TaskOutput(nn.Module):
    """A pruned unit's output for one task: its open channels from its own (pruned) copy, the
    others from the shared features, put back in channel order."""

    def __init__(self, copy_: nn.Module | None, pick: Tensor, order: Tensor, reorder: bool) -> None:
        super().__init__()
        self.has_copy = copy_ is not None
        self.copy = copy_ if copy_ is not None else _Unit(nn.Identity())
        self.has_shared = len(pick) > 0
        self.register_buffer("pick", pick.long())
        self.register_buffer("order", order.long())
        self.reorder = reorder

    def forward(self, x: Tensor, skip: Tensor, psi: Tensor) -> Tensor:
        if self.has_copy and self.has_shared:
            y = torch.cat([self.copy(x, skip), psi.index_select(1, self.pick)], 1)
        elif self.has_copy:
            y = self.copy(x, skip)
        else:
            y = psi.index_select(1, self.pick)
        if self.reorder:
            y = y.index_select(1, self.order)
        return y


class PrunedUnit(nn.Module):
    """One unit of a gated layer made static: fixed mixing weights, pruned copies, no gates."""

    def __init__(self, shared: nn.Module | None, weights: Tensor | None, first: bool,
                 outputs: Sequence[_TaskOutput]) -> None:
        super().__init__()
        self.has_shared = shared is not None
        self.shared = shared if shared is not None else _Unit(nn.Identity())
        self.first = first
        self.identical_inputs = weights is None
        self.register_buffer("weights", weights if weights is not None else torch.zeros(0))
        self.outputs = nn.ModuleList(outputs)

    def forward(self, h: list[Tensor], xs: list[Tensor], first: Tensor) -> list[Tensor]:
        psi = h[0]
        if self.has_shared:
            if self.first:
                shared_in = first
            elif self.identical_inputs:
                shared_in = h[0]
            else:
                shared_in = mix_inputs(self.weights, h)
            psi = self.shared(shared_in, first)
        outs = []
        for t, output in enumerate(self.outputs):
            outs.append(output(h[t], xs[t], psi))
        return outs


class PrunedLayer(nn.Module):
    """A gated layer made static: its :class:`PrunedUnit` s, fed the layer's inputs."""

    def __init__(self, weights: Tensor | None, units: Sequence[PrunedUnit]) -> None:
        super().__init__()
        self.identical_inputs = weights is None
        self.register_buffer("weights", weights if weights is not None else torch.zeros(0))
        self.units = nn.ModuleList(units)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        first = xs[0] if self.identical_inputs else mix_inputs(self.weights, xs)
        h = xs
        for unit in self.units:
            h = unit(h, xs, first)
        return h


def _prune_module(module: nn.Module, keep: Tensor, shortcut: nn.Module | None, whole: bool) -> nn.Module:
    """A unit's output channels ``keep`` as a two-input module (a residual tail with ``shortcut``)."""
    body = copy.deepcopy(module) if whole else prune_outputs(module, keep)
    if shortcut is None:
        return _Unit(body)
    return _Tail(body, copy.deepcopy(shortcut) if whole else prune_shortcut(shortcut, keep))


def _prune_layer(layer: GatedLayer, identical_inputs: bool) -> tuple[PrunedLayer, bool, list[dict[str, Any]]]:
    """(the pruned layer, whether its outputs are identical for all tasks, a summary per unit)."""
    last = len(layer._shared_units) - 1
    units, summary = [], []
    identical = identical_inputs
    for k, shared_unit in enumerate(layer._shared_units):
        with torch.no_grad():
            open_ = (torch.sigmoid(layer.alphas[k]) > 0.5).cpu()
        channels = open_.shape[1]
        tail = k == last and layer.residual
        uses_shared = (~open_).any(dim=0)  # channels some task takes from the shared copy
        shared_keep = torch.nonzero(uses_shared).flatten()
        shared = None
        if len(shared_keep):
            shared = _prune_module(shared_unit, shared_keep, layer._shared_shortcut if tail else None,
                                   whole=len(shared_keep) == channels)
        position = torch.full((channels,), -1, dtype=torch.long)
        position[shared_keep] = torch.arange(len(shared_keep))
        outputs = []
        for t in range(open_.shape[0]):
            own = torch.nonzero(open_[t]).flatten()
            taken = torch.nonzero(~open_[t]).flatten()
            pruned = None
            if len(own):
                pruned = _prune_module(layer._copy_units[t][k], own, layer._copy_shortcuts[t] if tail else None,
                                       whole=len(own) == channels)
            concat = torch.cat([own, taken])  # the channel each position of [own copy, picked shared] holds
            order = torch.empty(channels, dtype=torch.long)
            order[concat] = torch.arange(channels)
            reorder = bool((order != torch.arange(channels)).any())
            outputs.append(_TaskOutput(pruned, position[taken], order, reorder))
        weights = None if (k == 0 or identical) else layer.mixing_weights(k).detach().clone()
        units.append(PrunedUnit(shared, weights, k == 0, outputs))
        identical = not bool(open_.any())  # every task took every channel from the shared copy
        summary.append({"channels": channels, "open": open_.sum(dim=1).tolist(), "shared_kept": len(shared_keep),
                        "mask": open_.tolist()})
    first = None if identical_inputs else layer.mixing_weights(0).detach().clone()
    return PrunedLayer(first, units), identical, summary


class GatedNet(BranchedNet):
    """The tree's network with GatedMTL layers in every node that several tasks share.

    Built like :class:`BranchedNet` (same arguments; each gated layer's shared and task copies
    start as copies of the backbone's layer), usually through :meth:`from_single_task`. After
    :meth:`prune` the nodes are static (:attr:`pruned` is true) and the network is an ordinary
    module that TorchScript compiles.

    Args:
        tree, backbone, heads, tasks: As :class:`BranchedNet`.
        alpha_init: Initial gate logit (``> 0``: a task starts on its own features).
        probe_size: Height and width of the zero image that measures each layer's channels.
    """

    __jit_ignored_attributes__ = [*BranchedNet.__jit_ignored_attributes__, "gate_summary"]

    def __init__(self, tree: Any, backbone: nn.Module, heads: Mapping[str, nn.Module],
                 tasks: Sequence[str] | None = None, *, alpha_init: float = 1.0, probe_size: int = 64) -> None:
        super().__init__(tree, backbone, heads, tasks)
        channels = _layer_channels(backbone, probe_size)
        nodes: dict[str, nn.Module] = {}
        for name, parent in self.plan:
            group, block = self.node_groups[name], self.nodes[name]
            if len(group) == 1:
                nodes[name] = SoloNode(block)
                continue
            d = int(name[1:].split("_", 1)[0])
            layers = []
            for k, layer in enumerate(gate_layers(block)):
                identical = k == 0 and parent == STEM
                layers.append(GatedLayer(layer, [copy.deepcopy(layer) for _ in group], channels[d][k],
                                         identical, alpha_init))
            nodes[name] = GatedNode(layers)
        self.nodes = nn.ModuleDict(nodes)
        self.pruned = False
        self.gate_summary = {}
        # The features a node reads, per task of the node: "stem" or "<parent node>:<task>".
        self.node_inputs = [[STEM if parent == STEM else f"{parent}:{t}" for t in self.node_groups[name]]
                            for name, parent in self.plan]
        self.head_inputs = [f"{self.leaf[t]}:{t}" for t in self.task_names]

    @classmethod
    def from_single_task(cls, tree: Any, backbones_by_task: Mapping[str, nn.Module],
                         heads_by_task: Mapping[str, nn.Module], init: str = "first", *,
                         tasks: Sequence[str] | None = None, affinity: Any = None, seed: int = 0,
                         align: Tensor | None = None,
                         alpha_init: float = 1.0) -> GatedNet:
        """The gated network of ``tree`` from trained single-task models.

        The stem, the heads, the single-task nodes and every gated layer's *shared* copy take
        the plain network's initialisation (``init``, see :meth:`BranchedNet.from_single_task`);
        each task copy takes its own task's single-task block.
        """
        plain = BranchedNet.from_single_task(tree, backbones_by_task, heads_by_task, init, tasks=tasks,
                                             affinity=affinity, seed=seed, align=align)
        names = plain.task_names
        net = cls(tree, backbones_by_task[names[0]], heads_by_task, tasks=names, alpha_init=alpha_init)
        with torch.no_grad():
            net.stem.load_state_dict(plain.stem.state_dict())
            net.heads.load_state_dict(plain.heads.state_dict())
            for name, _ in net.plan:
                node = net.nodes[name]
                if isinstance(node, SoloNode):
                    node.block.load_state_dict(plain.nodes[name].state_dict())
                    continue
                d = int(name[1:].split("_", 1)[0])
                shared_layers = gate_layers(plain.nodes[name])
                for k, layer in enumerate(node.layers):
                    layer.shared.load_state_dict(shared_layers[k].state_dict())
                    for t, task in enumerate(net.node_groups[name]):
                        own = gate_layers(backbones_by_task[task].blocks[d])[k]
                        layer.copies[t].load_state_dict(own.state_dict())
        net.sources = dict(plain.sources)
        net.alignment = dict(plain.alignment)
        return net

    # -- forward

    def forward_features(self, x: Tensor, tasks: list[str] | None = None
                         ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """As :meth:`BranchedNet.forward_features`; features are keyed ``"<node>:<task>"``."""
        wanted = self._wanted(tasks)
        features: dict[str, Tensor] = {"stem": self.stem(x)}
        i = 0
        for name, node in self.nodes.items():
            needed = False
            for t in self.node_tasks[i]:
                if t in wanted:
                    needed = True
            if needed:
                outs = node([features[key] for key in self.node_inputs[i]])
                k = 0
                for t in self.node_tasks[i]:
                    features[name + ":" + t] = outs[k]
                    k += 1
            i += 1
        return self._run_heads(features, wanted), features

    @torch.jit.unused
    def task_path(self, task: str) -> list[str]:
        """The feature keys (``"<node>:<task>"``) of the nodes ``task`` passes through."""
        return [f"{name}:{task}" for name, _ in self.plan if task in self.node_groups[name]]

    # -- gates

    @torch.jit.unused
    def gated_layers(self) -> list[tuple[str, int, GatedLayer]]:
        """``(node, layer index, layer)`` of every gated layer (none once pruned)."""
        return [(name, k, layer) for name, node in self.nodes.items() if isinstance(node, GatedNode)
                for k, layer in enumerate(node.layers) if isinstance(layer, GatedLayer)]

    @torch.jit.unused
    def gate_parameters(self) -> list[nn.Parameter]:
        """Every ``α`` and ``β`` (the gate optimizer's parameters)."""
        return [p for _, _, layer in self.gated_layers() for p in (*layer.alphas, *layer.betas)]

    @torch.jit.unused
    def gate_probabilities(self) -> dict[str, list[Tensor]]:
        """``{task: [σ(α_t) of each gated layer on the task's path]}``."""
        out: dict[str, list[Tensor]] = {t: [] for t in self.task_names}
        for name, _, layer in self.gated_layers():
            for t, task in enumerate(self.node_groups[name]):
                out[task].extend(torch.sigmoid(alpha[t]) for alpha in layer.alphas)
        return out

    @torch.jit.unused
    def openness(self) -> dict[str, dict[str, float]]:
        """``{node: {task: share of its channels open (task-specific)}}`` over the node's layers."""
        if self.pruned:
            return {node: dict(v) for node, v in self.gate_summary.get("openness", {}).items()}
        out: dict[str, dict[str, float]] = {}
        for name, node in self.nodes.items():
            if not isinstance(node, GatedNode):
                continue
            alphas = [alpha.detach() for layer in node.layers for alpha in layer.alphas]
            opened = sum((torch.sigmoid(alpha) > 0.5).sum(dim=1) for alpha in alphas)
            total = sum(alpha.shape[1] for alpha in alphas)
            out[name] = {t: float(opened[i]) / total for i, t in enumerate(self.node_groups[name])}
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        """The stem's and the gated nodes' parameters (their task copies feed the shared mixing)."""
        params = list(self.stem.parameters())
        gates = {id(p) for p in self.gate_parameters()}
        for node in self.nodes.values():
            if isinstance(node, GatedNode):
                params.extend(p for p in node.parameters() if id(p) not in gates)
        return params

    # -- pruning

    @torch.jit.unused
    def prune(self) -> GatedNet:
        """A static copy with the same eval outputs: closed channels and unused copies removed.

        The copy's :attr:`gate_summary` records, per node and layer, how many channels each
        task keeps open and how many the shared copy keeps.
        """
        memo = {id(self.tree): self.tree}  # the tree is immutable: shared, not copied
        if self.pruned:
            return copy.deepcopy(self, memo)
        net = copy.deepcopy(self, memo)
        all_shared: dict[str, bool] = {}
        summary: dict[str, Any] = {"layers": {}, "openness": self.openness()}
        for name, parent in net.plan:
            node = net.nodes[name]
            if isinstance(node, SoloNode):
                continue
            # A node's inputs are one tensor when its parent is the stem or when every task of
            # the parent took every channel from the parent's shared copy.
            identical = parent == STEM or all_shared.get(parent, False)
            layers, per_layer = [], []
            for layer in node.layers:
                pruned, identical, info = _prune_layer(layer, identical)
                layers.append(pruned)
                per_layer.append(info)
            all_shared[name] = identical
            net.nodes[name] = GatedNode(layers)
            summary["layers"][name] = per_layer
        net.pruned = True
        net.gate_summary = summary
        return net.eval() if not self.training else net


def sparsity_loss(net: GatedNet, targets: Mapping[str, float]) -> Tensor:
    """The hinge sparsity loss of eq. 4: ``(1/T) Σ_t max(0, mean σ(α_t) − τ_t)``.

    The mean runs over every gate (channel) the task has in every gated layer it passes
    through; ``T`` counts the tasks that have gates. Zero (with no graph) when no node is
    shared.
    """
    terms = []
    for task, probabilities in net.gate_probabilities().items():
        if probabilities:
            mean = torch.cat(probabilities).mean()
            terms.append(torch.clamp(mean - float(targets[task]), min=0.0))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def _layer_channels(backbone: nn.Module, size: int) -> list[list[list[int]]]:
    """Per block and gate layer: ``[input channels, output channels of each unit]``, measured on zeros."""
    was_training = backbone.training
    backbone.eval()
    try:
        device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
        with torch.no_grad():
            x = backbone.stem(torch.zeros(1, backbone.in_channels, size, size, device=device))
            out = []
            for block in backbone.blocks:
                per_layer = []
                for layer in gate_layers(block):
                    units, _ = layer_units(layer)
                    sizes, h = [x.shape[1]], x
                    for unit in units:
                        h = unit(h)
                        sizes.append(h.shape[1])
                    per_layer.append(sizes)
                    x = layer(x)
                out.append(per_layer)
    finally:
        backbone.train(was_training)
    return out
