"""The branched multi-task network of a tree (Vandenhende et al. 2020, Sec. 3.2).

A tree is a chain of task partitions ``P_0 <= P_1 <= ... <= P_{D-1}``, one per backbone
block, each refining the one before it. Every group ``g`` of ``P_d`` is one *node*: its own
copy of block ``d``, fed by the node of ``P_{d-1}`` whose group contains ``g`` (the stem for
``d = 0``). Each task's head reads the leaf node of its group in ``P_{D-1}``. The two
extremes are the same class: a tree whose partitions are all ``{all tasks}`` is the usual
fully shared multi-task baseline, one whose partitions are all singletons is N single-task
networks side by side.

The network is built from explicit modules (an ``nn.ModuleDict`` of nodes and one of heads)
and a static plan of ``(node, parent)`` pairs fixed in ``__init__``, so ``forward`` uses no
hooks and :func:`torch.jit.script` compiles it. Each node runs at most once per input.

Node names are stable: ``b{d}_{i}_{j}...`` where ``d`` is the block and ``i, j, ...`` are
the indices of the node's tasks in the network's task order. The same group at the same
depth has the same name in every tree over the same tasks, so state-dict keys carry over.

Example:
    >>> net = BranchedNet([[("a", "b")], [("a",), ("b",)]], backbone, {"a": head_a, "b": head_b})
    >>> out = net(images)                    # {"a": ..., "b": ...}
    >>> out = net(images, ["a"])             # runs only the stem, b0_0_1, b1_0 and head a
    >>> scripted = torch.jit.script(net)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from branchnas.errors import UserError

__all__ = ["BranchedNet", "INIT_RULES", "TaskPass", "tree_chain", "node_name", "source_task"]

#: How :meth:`BranchedNet.from_single_task` initialises the nodes (see there).
INIT_RULES = ("first", "central", "outlier", "average", "scratch")

#: The feature name of the stem's output in the plan.
STEM = "stem"

Chain = list[list[tuple[str, ...]]]


def tree_chain(tree: Any, tasks: Sequence[str] | None = None) -> tuple[list[str], Chain]:
    """A tree as ``(task names, partitions)``: one partition (a list of groups) per block.

    Accepts a :class:`branchnas.tree.Tree` (anything with ``tasks`` and ``partitions``) or a
    plain sequence of partitions whose groups are sequences of task names (or of task
    indices into ``tasks``). Groups come back in a canonical order: by their first task in
    the task order, tasks within a group in task order.

    Args:
        tree: The tree.
        tasks: The task order; default: the tree's own, else the order of first appearance.

    Raises:
        UserError: A partition does not cover every task exactly once, or a partition does
            not refine the one before it.
    """
    if hasattr(tree, "named_partitions"):
        # A Tree's groups hold indices into its own task order, which ``tasks`` may reorder.
        parts = tree.named_partitions()
    else:
        parts = getattr(tree, "partitions", tree)
    if tasks is None:
        tasks = getattr(tree, "tasks", None)
    raw: list[list[list[Any]]] = [[list(group) for group in part] for part in parts]
    if not raw:
        raise UserError("tree: expected at least one partition (one per backbone block); got none")
    if tasks is None:
        seen: list[str] = []
        for group in raw[0]:
            seen.extend(str(t) for t in group)
        tasks = seen
    names = [str(getattr(t, "name", t)) for t in tasks]
    index = {name: i for i, name in enumerate(names)}

    def resolve(item: Any) -> str:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < len(names):
                raise UserError(f"tree: task index {item} is out of range for {len(names)} tasks")
            return names[item]
        name = str(getattr(item, "name", item))
        if name not in index:
            raise UserError(f"tree: unknown task '{name}'; the tasks are: {', '.join(names)}")
        return name

    chain: Chain = []
    for d, part in enumerate(raw):
        groups = [tuple(sorted((resolve(t) for t in group), key=index.__getitem__)) for group in part]
        groups = [g for g in groups if g]
        covered = sorted((t for g in groups for t in g), key=index.__getitem__)
        if covered != names:
            raise UserError(
                f"tree: partition {d} must hold every task exactly once; it holds {covered}, "
                f"the tasks are {names}"
            )
        groups.sort(key=lambda g: index[g[0]])
        if chain:
            for group in groups:
                if not any(set(group) <= set(parent) for parent in chain[-1]):
                    raise UserError(
                        f"tree: partition {d} does not refine partition {d - 1}: group "
                        f"{list(group)} spans several groups of {[list(p) for p in chain[-1]]}"
                    )
        chain.append(groups)
    return names, chain


def node_name(depth: int, group: Sequence[str], tasks: Sequence[str]) -> str:
    """The stable name of the node of ``group`` at block ``depth``, e.g. ``b2_0_3``."""
    return f"b{depth}_" + "_".join(str(tasks.index(t)) for t in group)


def source_task(
    group: Sequence[str], depth: int, rule: str, affinity: Any = None, tasks: Sequence[str] | None = None
) -> str:
    """The task whose single-task weights a node takes, under rule ``first``, ``central`` or ``outlier``.

    * ``first``: the group's first task in the task (recipe) order.
    * ``central``: the task with the highest summed affinity ``sum_u A[depth, t, u]`` to the
      other tasks of the group, i.e. the single-task model whose features at this branch
      point are most representative of the group; ties go to the earlier task.
    * ``outlier``: the task with the *lowest* summed affinity to the rest of the group at the
      deepest branch point (``depth`` is ignored, so a group keeps one source all the way
      down): the task whose features the others represent worst, and which would be the
      hardest to rebuild from another task's weights. The others adapt from its features
      (see docs/why-a-task-collapses.md); ties go to the earlier task.

    Args:
        group: The node's tasks, in task order.
        depth: The block index (the affinity is read at this branch point).
        rule: ``first`` or ``central``.
        affinity: ``D x N x N`` affinity in ``tasks`` order; needed for ``central``.
        tasks: The task order of ``affinity``.
    """
    if rule == "first" or len(group) == 1:
        return group[0]
    if rule not in ("central", "outlier"):
        raise ValueError(f"source_task: rule must be 'first', 'central' or 'outlier'; got {rule!r}")
    if affinity is None or tasks is None:
        raise UserError(f"init '{rule}' needs the task affinity; run the affinity stage or use init 'first'")
    idx = [list(tasks).index(t) for t in group]
    at = len(affinity) - 1 if rule == "outlier" else depth
    scores = [sum(float(affinity[at][i][j]) for j in idx if j != i) for i in idx]
    sign = 1.0 if rule == "central" else -1.0
    best = max(range(len(group)), key=lambda k: (sign * scores[k], -k))
    return group[best]


class BranchedNet(nn.Module):
    """A branched multi-task network: shared stem, one block copy per tree node, task heads.

    Args:
        tree: The tree (see :func:`tree_chain`); one partition per backbone block.
        backbone: A :class:`branchnas.backbones.Backbone`; its stem and blocks are deep-copied
            (the backbone itself is left untouched), so every node starts from its weights.
        heads: ``{task: head}``; each head is deep-copied.
        tasks: The task order (default: the tree's). Outputs come in this order.

    Attributes:
        task_names: The tasks, in order.
        chain: The tree's partitions, canonical (see :func:`tree_chain`).
        stem: The shared stem.
        nodes: ``{node name: block copy}``, in plan order (by depth, then group).
        heads: ``{task: head}``.
        plan: ``[(node, parent)]``: the order in which the nodes run; the parent is a node
            name or ``"stem"``.
        node_groups: ``{node: tasks it serves}``.
        leaf: ``{task: the node its head reads}``.
    """

    # Plain-Python descriptions that the scripted forward never reads.
    __jit_ignored_attributes__ = ["chain", "plan", "node_groups", "leaf", "stem_info", "block_info",
                                  "backbone_name", "tree", "sources", "alignment"]
    __jit_unused_properties__ = ["num_nodes"]

    def __init__(
        self,
        tree: Any,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        tasks: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        names, chain = tree_chain(tree, tasks)
        blocks = backbone.blocks
        if len(chain) != len(blocks):
            raise UserError(
                f"tree: expected {len(blocks)} partitions, one per block of backbone "
                f"'{getattr(backbone, 'name', type(backbone).__name__)}'; got {len(chain)}"
            )
        dotted = [t for t in names if "." in t]
        if dotted:
            # nn.ModuleDict keys become state-dict path segments, which '.' separates.
            raise UserError(f"task names may not contain '.' (got {', '.join(dotted)}); rename the task in the recipe")
        missing = [t for t in names if t not in heads]
        if missing:
            raise UserError(f"BranchedNet: no head for task(s) {', '.join(missing)}; got heads for {', '.join(heads)}")
        self.tree = tree
        self.chain = chain
        self.task_names = list(names)
        self.stem_info = getattr(backbone, "stem_info", None)
        self.block_info = list(getattr(backbone, "block_info", []))
        self.backbone_name = getattr(backbone, "name", type(backbone).__name__)
        self.stem = copy.deepcopy(backbone.stem)

        nodes: dict[str, nn.Module] = {}
        plan: list[tuple[str, str]] = []
        node_groups: dict[str, tuple[str, ...]] = {}
        previous: list[tuple[tuple[str, ...], str]] = []
        for d, partition in enumerate(chain):
            current = []
            for group in partition:
                name = node_name(d, group, names)
                parent = STEM if d == 0 else next(n for g, n in previous if set(group) <= set(g))
                nodes[name] = copy.deepcopy(blocks[d])
                plan.append((name, parent))
                node_groups[name] = group
                current.append((group, name))
            previous = current
        self.nodes = nn.ModuleDict(nodes)
        self.plan = plan
        self.node_groups = node_groups
        self.leaf = {t: next(n for g, n in previous if t in g) for t in names}
        self.heads = nn.ModuleDict({t: copy.deepcopy(heads[t]) for t in names})

        # The static plan in TorchScript-friendly form, aligned with the ModuleDict orders.
        self.node_parents = [parent for _, parent in plan]
        self.node_tasks = [list(node_groups[name]) for name, _ in plan]
        self.head_inputs = [self.leaf[t] for t in names]

    def forward(self, x: Tensor, tasks: list[str] | None = None) -> dict[str, Tensor]:
        """Run the network.

        Args:
            x: Images ``(B, C, H, W)``, normalised with the dataset's mean and std.
            tasks: The tasks to compute (default: all). Only the nodes these tasks need run.

        Returns:
            ``{task: output}`` in the network's task order.
        """
        return self.forward_features(x, tasks)[0]

    def forward_features(self, x: Tensor, tasks: list[str] | None = None
                         ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Like :meth:`forward`, also returning every computed node's output ``{node: features}``
        (``"stem"`` included); :meth:`task_path` says which nodes a task passes through."""
        wanted = self._wanted(tasks)
        features: dict[str, Tensor] = {"stem": self.stem(x)}
        i = 0
        for name, node in self.nodes.items():
            needed = False
            for t in self.node_tasks[i]:
                if t in wanted:
                    needed = True
            if needed:
                features[name] = node(features[self.node_parents[i]])
            i += 1
        return self._run_heads(features, wanted), features

    def _wanted(self, tasks: list[str] | None) -> list[str]:
        """The tasks to compute (default: all), each checked to be one of the network's."""
        wanted: list[str] = self.task_names if tasks is None else tasks
        for t in wanted:
            if t not in self.task_names:
                raise ValueError("BranchedNet: unknown task '" + t + "'; the tasks are " + ", ".join(self.task_names))
        return wanted

    def _run_heads(self, features: dict[str, Tensor], wanted: list[str]) -> dict[str, Tensor]:
        """``{task: head output}`` for the ``wanted`` tasks, each head reading ``head_inputs``."""
        out: dict[str, Tensor] = {}
        j = 0
        for task, head in self.heads.items():
            if task in wanted:
                out[task] = head(features[self.head_inputs[j]])
            j += 1
        return out

    @torch.jit.unused
    def shared_tasks(self) -> list[str]:
        """Tasks that share at least one block with another task (the stem, shared by all,
        is not counted); the others run a network of their own."""
        return [t for t in self.task_names
                if any(t in group and len(group) > 1 for group in self.node_groups.values())]

    @torch.jit.unused
    def task_path(self, task: str) -> list[str]:
        """The nodes ``task`` passes through, one per block (branch point), in order."""
        return [name for name, _ in self.plan if task in self.node_groups[name]]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the stem and of every node that serves two or more tasks (PCGrad)."""
        params = list(self.stem.parameters())
        for name, node in self.nodes.items():
            if len(self.node_groups[name]) >= 2:
                params.extend(node.parameters())
        return params

    @property
    def num_nodes(self) -> int:
        """How many block copies the network holds (``sum_d |P_d|``)."""
        return len(self.plan)

    def partitions(self) -> list[list[list[str]]]:
        """The tree's partitions as plain lists (JSON-friendly)."""
        return [[list(g) for g in part] for part in self.chain]

    @classmethod
    def from_single_task(
        cls,
        tree: Any,
        backbones_by_task: Mapping[str, nn.Module],
        heads_by_task: Mapping[str, nn.Module],
        init: str = "first",
        *,
        tasks: Sequence[str] | None = None,
        affinity: Any = None,
        seed: int = 0,
        align: Tensor | None = None,
    ) -> BranchedNet:
        """Build the network of ``tree`` from trained single-task models.

        Each head is a copy of its task's single-task head. Each node of group ``g`` at
        block ``d`` takes block ``d`` of one single-task backbone, by ``init``:

        * ``first``: the group's first task in the task order (so the all-shared tree is the
          first task's encoder, and the all-separate tree reproduces every single-task model);
        * ``central``: the group's most central task by affinity at block ``d`` (see
          :func:`source_task`); the stem takes the most central task over all tasks at block 0;
        * ``outlier``: the group's least central task by affinity at the deepest block (see
          :func:`source_task`), the stem likewise over all tasks;
        * ``average``: the element-wise mean of the group's blocks, parameters and floating
          buffers (BatchNorm running mean and variance) alike; integer buffers
          (``num_batches_tracked``) come from the group's first task. The stem is the mean
          over all tasks;
        * ``scratch``: fresh initialisation of every module (heads included), seeded by
          ``seed``; the single-task weights only fix the architecture.

        Args:
            tree: The tree.
            backbones_by_task: ``{task: single-task Backbone}`` (same architecture).
            heads_by_task: ``{task: single-task head}``.
            init: One of :data:`INIT_RULES`.
            tasks: Task order (default: the tree's).
            affinity: ``D x N x N`` affinity in task order, for ``central`` and ``outlier``.
            seed: Seed of ``scratch``.
            align: Training images; when given (and ``init`` is not ``scratch``), every node and
                head that receives another model's features gets the least-squares change of
                basis folded into its first layers (:func:`branchnas.models.align.align_inputs`;
                its report lands in ``net.alignment``).

        Raises:
            UserError: An unknown ``init``, or a task without a single-task model.
        """
        if init not in INIT_RULES:
            from branchnas.errors import unknown_choice

            raise UserError(unknown_choice("init rule", init, INIT_RULES))
        names, chain = tree_chain(tree, tasks)
        missing = [t for t in names if t not in backbones_by_task]
        if missing:
            raise UserError(f"from_single_task: no single-task backbone for task(s) {', '.join(missing)}")
        net = cls(tree, backbones_by_task[names[0]], heads_by_task, tasks=names)
        # Which task's weights each node starts from (None: an average, or fresh weights).
        net.sources = {name: None for name, _ in net.plan}
        net.alignment = {}
        if init == "scratch":
            _reinitialise(net, seed)
            return net
        with torch.no_grad():
            if init == "average":
                net.stem.load_state_dict(_mean_state([backbones_by_task[t].stem for t in names]))
            else:
                src = source_task(names, 0, init, affinity, names)
                net.stem.load_state_dict(backbones_by_task[src].stem.state_dict())
            for name, _ in net.plan:
                group = net.node_groups[name]
                d = int(name[1:].split("_", 1)[0])
                if init == "average":
                    state = _mean_state([backbones_by_task[t].blocks[d] for t in group])
                else:
                    net.sources[name] = source_task(group, d, init, affinity, names)
                    state = backbones_by_task[net.sources[name]].blocks[d].state_dict()
                net.nodes[name].load_state_dict(state)
        if align is not None:
            from branchnas.models.align import align_inputs

            net.alignment = align_inputs(net, backbones_by_task, align)
        return net


def _mean_state(modules: Sequence[nn.Module]) -> dict[str, Tensor]:
    """Element-wise mean of same-shaped modules' state dicts; integer entries from the first."""
    states = [m.state_dict() for m in modules]
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = torch.stack([s[key] for s in states]).mean(dim=0)
        else:
            out[key] = first.clone()
    return out


def _reinitialise(net: nn.Module, seed: int) -> None:
    """Reset every module that knows how (conv, linear, BatchNorm: weights and running stats)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in net.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    finally:
        torch.random.set_rng_state(generator_state)


class TaskPass(nn.Module):
    """``net(x, [task])[task]``: one task's pass alone, as a module fvcore can trace (:func:`branchnas.cost.task_pass_flops`)."""

    def __init__(self, net: nn.Module, task: str) -> None:
        super().__init__()
        self.net = net
        self.task = task

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, [self.task])[self.task]
