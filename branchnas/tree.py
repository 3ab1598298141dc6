"""Branched multi-task trees: which tasks share which encoder block.

A tree over N tasks and D branch points is a chain of partitions ``P_0, ..., P_{D-1}`` of the
tasks. ``P_d`` says which tasks share block ``d``: every group of ``P_d`` is one copy of the
block. Each partition refines the one before it (a branch can split, never merge). The stem,
before block 0, is always shared; ``P_0`` may already split the tasks. After the last block
every task has its own head.

The representation is canonical: a partition is a sorted tuple of sorted task-index tuples,
so two trees are equal (and hash equally) exactly when they describe the same network.

Example:
    >>> tree = Tree([[[0, 1, 2]], [[0, 1], [2]]], tasks=["seg", "depth", "normals"],
    ...             points=["layer3", "layer4"])
    >>> tree.groups_per_point()
    (1, 2)
    >>> print(tree.render())
    stem: shared by all 3 tasks
    └── layer3 {seg, depth, normals}
        ├── layer4 {seg, depth}
        │   ├── seg
        │   └── depth
        └── layer4 → normals
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from branchnas.errors import UserError

__all__ = ["Tree", "Partition", "canonical_partition", "describe_partitions", "TREE_FORMAT"]

#: A partition of task indices: a sorted tuple of sorted, non-empty index tuples.
Partition = tuple[tuple[int, ...], ...]

#: The ``format`` field of a tree's JSON form.
TREE_FORMAT = "branchnas.tree/1"

STEM = "stem"


def canonical_partition(groups: Iterable[Iterable[int]]) -> Partition:
    """Sort each group and the groups, so that equal partitions compare equal.

    No validation; :class:`Tree` checks coverage and refinement.
    """
    return tuple(sorted(tuple(sorted(int(t) for t in group)) for group in groups))


class Tree:
    """A branched multi-task network's layout: one task partition per branch point.

    Args:
        partitions: one partition per branch point, outermost first. A partition is a list of
            groups; a group lists task indices (``0..N-1``) or task names (with ``tasks``).
        tasks: the task names (default ``task0, task1, ...``).
        points: the branch point names, one per partition (default ``point0, point1, ...``).

    Raises:
        UserError: a partition misses a task, repeats one, names an unknown one, has an empty
            group, or joins tasks that an earlier branch point separated.
    """

    __slots__ = ("partitions", "tasks", "points", "_hash")

    partitions: tuple[Partition, ...]
    tasks: tuple[str, ...]
    points: tuple[str, ...]

    def __init__(
        self,
        partitions: Sequence[Iterable[Iterable[int | str]]],
        tasks: Sequence[str] | None = None,
        points: Sequence[str] | None = None,
    ) -> None:
        raw = [[list(group) for group in partition] for partition in partitions]
        if not raw:
            raise UserError("tree: expected at least one branch point (one partition); got none")
        if tasks is None:
            indices = [t for partition in raw for group in partition for t in group]
            if any(not _is_index(t) for t in indices):
                raise UserError("tree: groups name tasks, so give the task names too (tasks=[...])")
            n = max((int(t) for t in indices), default=-1) + 1
            tasks = [f"task{i}" for i in range(n)]
        if points is None:
            points = [f"point{d}" for d in range(len(raw))]
        tasks = tuple(str(t) for t in tasks)
        points = tuple(str(p) for p in points)
        _check_names("task", tasks)
        _check_names("branch point", points)
        if not tasks:
            raise UserError("tree: expected at least one task; got none")
        if len(points) != len(raw):
            raise UserError(
                f"tree: {len(raw)} partitions but {len(points)} branch point names; give one name per partition"
            )
        index = {name: i for i, name in enumerate(tasks)}
        canon = tuple(
            _validate_partition([[_task_index(t, index, tasks, points[d]) for t in group] for group in partition],
                                tasks, points[d])
            for d, partition in enumerate(raw)
        )
        for d in range(1, len(canon)):
            _check_refines(canon[d], canon[d - 1], tasks, points[d], points[d - 1])
        object.__setattr__(self, "partitions", canon)
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "_hash", hash((canon, tasks, points)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Tree is immutable")

    # ------------------------------------------------------------------ basics

    @classmethod
    def all_shared(
        cls, num_tasks: int, num_points: int, tasks: Sequence[str] | None = None,
        points: Sequence[str] | None = None,
    ) -> Tree:
        """The smallest tree: every task shares every block."""
        _check_sizes(num_tasks, num_points)
        return cls([[list(range(num_tasks))]] * num_points, tasks=tasks, points=points)

    @classmethod
    def all_separate(
        cls, num_tasks: int, num_points: int, tasks: Sequence[str] | None = None,
        points: Sequence[str] | None = None,
    ) -> Tree:
        """The largest tree: every task has its own copy of every block (only the stem is shared)."""
        _check_sizes(num_tasks, num_points)
        return cls([[[t] for t in range(num_tasks)]] * num_points, tasks=tasks, points=points)

    @property
    def num_tasks(self) -> int:
        """N, the number of tasks."""
        return len(self.tasks)

    @property
    def num_points(self) -> int:
        """D, the number of branch points."""
        return len(self.points)

    def groups_per_point(self) -> tuple[int, ...]:
        """``|P_d|`` for every branch point: how many copies of block ``d`` the network has."""
        return tuple(len(p) for p in self.partitions)

    def key(self) -> tuple[Partition, ...]:
        """The canonical sort key (the partitions): the deterministic last tie-break of the search."""
        return self.partitions

    def group_of(self, task: int | str, point: int | str) -> tuple[int, ...]:
        """The group of task indices that shares ``task``'s copy of block ``point``."""
        t = _task_index(task, {n: i for i, n in enumerate(self.tasks)}, self.tasks, "group_of")
        d = self.points.index(point) if isinstance(point, str) and point in self.points else point
        if not isinstance(d, int) or not 0 <= d < self.num_points:
            raise UserError(f"tree: unknown branch point {point!r}; choose one of: {', '.join(self.points)}")
        return next(g for g in self.partitions[d] if t in g)

    def named_partitions(self) -> list[list[list[str]]]:
        """The partitions with task names instead of indices."""
        return [[[self.tasks[t] for t in g] for g in p] for p in self.partitions]

    def with_names(self, tasks: Sequence[str] | None = None, points: Sequence[str] | None = None) -> Tree:
        """The same layout with other task or branch point names."""
        return Tree(self.partitions, tasks=self.tasks if tasks is None else tasks,
                    points=self.points if points is None else points)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tree):
            return NotImplemented
        return (self.partitions, self.tasks, self.points) == (other.partitions, other.tasks, other.points)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Tree({describe_partitions(self.named_partitions())})"

    def __str__(self) -> str:
        return self.render()

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; groups are written with task names so that the file reads well."""
        return {
            "format": TREE_FORMAT,
            "tasks": list(self.tasks),
            "points": list(self.points),
            "partitions": self.named_partitions(),
            "groups_per_point": list(self.groups_per_point()),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> Tree:
        """Rebuild a tree from :meth:`to_json` output (a dict or its JSON text).

        Raises:
            UserError: the data is not a tree (with what is missing or wrong).
        """
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as err:
                raise UserError(f"tree: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise UserError(f"tree: expected a JSON object with 'tasks', 'points' and 'partitions'; got {type(data).__name__}")
        fmt = data.get("format", TREE_FORMAT)
        if fmt != TREE_FORMAT:
            raise UserError(f"tree: expected format '{TREE_FORMAT}'; got {fmt!r}")
        missing = [k for k in ("tasks", "points", "partitions") if k not in data]
        if missing:
            raise UserError(f"tree: the JSON object lacks {', '.join(repr(m) for m in missing)}")
        partitions = data["partitions"]
        if not isinstance(partitions, list) or not all(
            isinstance(p, list) and all(isinstance(g, list) for g in p) for p in partitions
        ):
            raise UserError("tree: 'partitions' must be a list (one per branch point) of lists of task-name lists")
        return cls(partitions, tasks=data["tasks"], points=data["points"])

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        from branchnas.rundir import atomic_write_json

        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Tree:
        """Read a tree written by :meth:`save`.

        Raises:
            UserError: the file is missing or does not hold a tree.
        """
        path = Path(path)
        if not path.exists():
            raise UserError(f"tree file {str(path)!r} does not exist; run `branchnas search` to write one")
        try:
            return cls.from_json(path.read_text())
        except UserError as err:
            raise UserError(f"{path}: {err}") from None

    # ------------------------------------------------------------------ networkx

    def to_networkx(self) -> Any:
        """The tree as a ``networkx.DiGraph`` from the stem to the task heads.

        Nodes: ``"stem"``; ``(d, group)`` for every group of ``P_d`` (``group`` a tuple of task
        indices), with attributes ``kind="block"``, ``point`` (the branch point's name) and
        ``tasks`` (names); ``("head", t)`` for every task, with ``kind="head"`` and ``task``.
        Edges run from a node to the nodes it feeds. The graph's ``tasks`` and ``points``
        attributes hold the names.
        """
        import networkx as nx

        graph = nx.DiGraph(tasks=list(self.tasks), points=list(self.points))
        graph.add_node(STEM, kind="stem", tasks=tuple(self.tasks))
        for d, partition in enumerate(self.partitions):
            for group in partition:
                graph.add_node((d, group), kind="block", depth=d, point=self.points[d],
                               tasks=tuple(self.tasks[t] for t in group))
                parent = STEM if d == 0 else (d - 1, self.group_of(group[0], d - 1))
                graph.add_edge(parent, (d, group))
        last = self.num_points - 1
        for t, name in enumerate(self.tasks):
            graph.add_node(("head", t), kind="head", task=name)
            graph.add_edge((last, self.group_of(t, last)), ("head", t))
        return graph

    @classmethod
    def from_networkx(cls, graph: Any) -> Tree:
        """Rebuild a tree from :meth:`to_networkx` output.

        Raises:
            UserError: the graph lacks the names, or its edges do not match its block nodes.
        """
        tasks = graph.graph.get("tasks")
        points = graph.graph.get("points")
        if tasks is None or points is None:
            raise UserError("tree graph: expected graph attributes 'tasks' and 'points' (as written by Tree.to_networkx)")
        partitions: list[list[tuple[int, ...]]] = [[] for _ in points]
        for node in graph.nodes:
            if isinstance(node, tuple) and len(node) == 2 and isinstance(node[0], int):
                d, group = node
                if not 0 <= d < len(points):
                    raise UserError(f"tree graph: node {node!r} names branch point {d}, but there are {len(points)}")
                partitions[d].append(tuple(group))
        tree = cls(partitions, tasks=tasks, points=points)
        expected = tree.to_networkx()
        if set(graph.edges) != set(expected.edges):
            extra = sorted(map(str, set(graph.edges) - set(expected.edges)))[:3]
            missing = sorted(map(str, set(expected.edges) - set(graph.edges)))[:3]
            raise UserError(
                f"tree graph: edges do not match its block nodes (unexpected: {extra or 'none'}; missing: {missing or 'none'})"
            )
        return tree

    # ------------------------------------------------------------------ rendering

    def render(self) -> str:
        """An ASCII/Unicode drawing for the terminal, in the style of the ``tree`` command.

        A line is one branch: the run of consecutive blocks that the same group of tasks
        shares (``layer2..layer4`` when the group does not split in between), then its tasks.
        ``→ name`` marks a branch that serves one task up to its head; a group that reaches the
        last block together lists its task heads below it.
        """
        lines = [f"stem: shared by all {self.num_tasks} task{'s' if self.num_tasks != 1 else ''}"]
        self._render_children(-1, tuple(range(self.num_tasks)), "", lines)
        return "\n".join(lines)

    def _render_children(self, d: int, group: tuple[int, ...], prefix: str, lines: list[str]) -> None:
        if d == self.num_points - 1:
            children: list[tuple[int, ...]] = [(t,) for t in group]
        else:
            children = [g for g in self.partitions[d + 1] if g[0] in group and set(g) <= set(group)]
        for i, child in enumerate(children):
            last = i == len(children) - 1
            branch, extend = ("└── ", "    ") if last else ("├── ", "│   ")
            if d == self.num_points - 1:
                lines.append(f"{prefix}{branch}{self.tasks[child[0]]}")
                continue
            end = d + 1
            while end + 1 < self.num_points and self.partitions[end + 1].count(child) == 1:
                end += 1
            span = self.points[d + 1] if end == d + 1 else f"{self.points[d + 1]}..{self.points[end]}"
            if len(child) == 1 and end == self.num_points - 1:
                lines.append(f"{prefix}{branch}{span} → {self.tasks[child[0]]}")
                continue
            lines.append(f"{prefix}{branch}{span} {{{', '.join(self.tasks[t] for t in child)}}}")
            self._render_children(end, child, prefix + extend, lines)

    def draw(self, path: str | Path, title: str | None = None) -> None:
        """Draw the tree as a PNG: stem on the left, one column per branch point, heads on the right.

        The x axis is labelled with the branch point names; the task names sit at the leaves.
        """
        from matplotlib.figure import Figure

        from branchnas.rundir import atomic_savefig

        order = self._leaf_order()
        ypos = {t: -i for i, t in enumerate(order)}

        def y_of(group: tuple[int, ...]) -> float:
            return sum(ypos[t] for t in group) / len(group)

        width = max(4.0, 1.3 * (self.num_points + 2) + 0.08 * max(len(t) for t in self.tasks))
        height = max(2.0, 0.32 * self.num_tasks + 1.0)
        fig = Figure(figsize=(width, height))
        ax = fig.add_subplot(1, 1, 1)
        root_y = y_of(tuple(range(self.num_tasks)))
        head_x = self.num_points + 1
        style = {"color": "#4c72b0", "lw": 1.5, "zorder": 1}
        for d, partition in enumerate(self.partitions):
            for group in partition:
                x, y = d + 1, y_of(group)
                if d == 0:
                    px, py = 0, root_y
                else:
                    px, py = d, y_of(self.group_of(group[0], d - 1))
                ax.plot([px, px + 0.5, px + 0.5, x], [py, py, y, y], **style)
                ax.scatter([x], [y], s=24 + 10 * len(group), color="#4c72b0", zorder=2)
        for t in range(self.num_tasks):
            group = self.group_of(t, self.num_points - 1)
            gx, gy = self.num_points, y_of(group)
            ax.plot([gx, gx + 0.5, gx + 0.5, head_x], [gy, gy, ypos[t], ypos[t]], color="#999999", lw=1, zorder=1)
            ax.scatter([head_x], [ypos[t]], marker="s", s=20, color="#dd8452", zorder=2)
            ax.annotate(self.tasks[t], (head_x, ypos[t]), xytext=(6, 0), textcoords="offset points",
                        va="center", fontsize=9)
        ax.scatter([0], [root_y], marker="D", s=40, color="#55a868", zorder=2)
        ax.set_xticks(range(self.num_points + 2))
        ax.set_xticklabels([STEM, *self.points, "heads"], rotation=30 if self.num_points > 6 else 0)
        ax.set_xlabel("branch point")
        ax.set_yticks([])
        ax.set_xlim(-0.3, head_x + 1.2)
        ax.set_ylim(-self.num_tasks + 0.4, 0.6)
        for side in ("left", "right", "top"):
            ax.spines[side].set_visible(False)
        groups = ", ".join(str(k) for k in self.groups_per_point())
        ax.set_title(title or f"{self.num_tasks} tasks; groups per branch point: {groups}")
        atomic_savefig(fig, path)

    def _leaf_order(self) -> list[int]:
        """Tasks in depth-first order, so that every branch's tasks are adjacent in a drawing."""
        order: list[int] = []

        def visit(d: int, group: tuple[int, ...]) -> None:
            if d == self.num_points - 1:
                order.extend(group)
                return
            for child in self.partitions[d + 1]:
                if set(child) <= set(group):
                    visit(d + 1, child)

        for group in self.partitions[0]:
            visit(0, group)
        return order


# ---------------------------------------------------------------------- validation helpers


def _is_index(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or getattr(getattr(value, "dtype", None), "kind", "") in ("i", "u")


def _check_sizes(num_tasks: int, num_points: int) -> None:
    if num_tasks < 1 or num_points < 1:
        raise UserError(f"tree: expected at least 1 task and 1 branch point; got {num_tasks} and {num_points}")


def _check_names(what: str, names: tuple[str, ...]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"tree: {what} name {name!r} appears twice; {what} names must be unique")
        seen.add(name)


def _task_index(task: Any, index: dict[str, int], tasks: tuple[str, ...], where: str) -> int:
    if _is_index(task):
        t = int(task)
        if not 0 <= t < len(tasks):
            raise UserError(f"tree: branch point {where!r} names task index {t}, but there are {len(tasks)} tasks (0..{len(tasks) - 1})")
        return t
    if isinstance(task, str) and task in index:
        return index[task]
    from branchnas.errors import unknown_choice

    raise UserError(f"tree: at branch point {where!r}: {unknown_choice('task', str(task), tasks)}")


def _validate_partition(groups: list[list[int]], tasks: tuple[str, ...], point: str) -> Partition:
    seen: dict[int, int] = {}
    for g, group in enumerate(groups):
        if not group:
            raise UserError(f"tree: branch point {point!r} has an empty group; remove it")
        for t in group:
            if t in seen:
                raise UserError(f"tree: task {tasks[t]!r} appears twice at branch point {point!r}; each task belongs to exactly one group")
            seen[t] = g
    missing = [tasks[t] for t in range(len(tasks)) if t not in seen]
    if missing:
        raise UserError(
            f"tree: branch point {point!r} misses task{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)}; every task must be in one group"
        )
    return canonical_partition(groups)


def _check_refines(fine: Partition, coarse: Partition, tasks: tuple[str, ...], point: str, previous: str) -> None:
    owner = {t: i for i, group in enumerate(coarse) for t in group}
    for group in fine:
        parents = {owner[t] for t in group}
        if len(parents) > 1:
            a = group[0]
            b = next(t for t in group if owner[t] != owner[a])
            raise UserError(
                f"tree: branch point {point!r} puts {tasks[a]!r} and {tasks[b]!r} in one group, but "
                f"{previous!r} before it separates them; a branch can split, never merge"
            )


def describe_partitions(partitions: Sequence[Sequence[Sequence[str]]], separator: str = " | ") -> str:
    """A tree on one line: its named groups in braces per branch point, points separated by ``|``."""
    return separator.join(" ".join("{" + ",".join(g) + "}" for g in part) for part in partitions)
