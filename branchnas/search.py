"""Stage 3 library: the budget-constrained tree search of *Branched Multi-Task Networks*, Sec. 3.2.

A tree is a chain of task partitions ``P_0 >= P_1 >= ... >= P_{D-1}`` (each refines the one
before; see :class:`branchnas.tree.Tree`). Its clustering cost is the paper's

    C = sum_d C_d,   C_d = mean over the groups g of P_d of max_{i,j in g} (1 - A[d, i, j])

(0 for a singleton group), and its size is ``stem + sum_d |P_d| * block_d + heads`` in params
or FLOPs. The search returns the cheapest-cost tree whose size fits a budget, and the Pareto
front of cost against size.

How the exact search is fast. The size of a tree depends only on its *count vector*
``k = (|P_0|, ..., |P_{D-1}|)``, and the cost is a sum over branch points of a term that depends
only on ``P_d``. So a suffix dynamic programme over the partition-refinement DAG (nodes
``(d, P)``) keeps, per node, one label per count vector of the levels below it:
``W_d(P)[s] = C_d(P) + min { W_{d+1}(R)[s[1:]] : R refines P, |R| = s[0] }``. One label per
count vector is the (cost, size) label set of the node before dominance pruning; dominance is
applied once, at the end, across count vectors. The refinement DAG itself is never built: "the
best over all refinements R of P with ``|R| = j``" is computed through the *cover* relation of
the partition lattice (R is one split away from its parents), which has ``sum_P C(|P|, 2)`` edges
(1.15 million for 10 tasks) instead of the 16.7 million refinement pairs. The best trees are
then read back by a best-first search whose priorities are exact (the DP values), which also
yields the deterministic tie-break. Every budget is answered by the same pass, which is how
the Pareto front comes out.

Ties. Trees are ranked by (cost, params, flops, canonical tree key). Costs are compared as
floats, and every code path computes a tree's cost with the same operations in the same order
(:func:`clustering_cost`), so equal trees tie exactly and the ranking is stable.

Scalable mode (many tasks): candidate partitions per branch point come from complete-linkage
clustering of that point's dissimilarity (complete linkage minimises the within-group maximum
that the cost uses) at every cut, each also polished by single-task moves, made to nest by
intersecting with every candidate of the branch point before; the same DP then runs exactly
over that candidate DAG (see :class:`ScalableSearch`).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a = rng.uniform(-1, 1, (4, 5, 5)); a = (a + a.transpose(0, 2, 1)) / 2
    >>> result = search(a, [100, 200, 400, 800], budget=3000)
    >>> result.mode, result.trees_considered
    ('exact', 3455)
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from branchnas.budget import METRICS, format_count, parse_budget
from branchnas.errors import BudgetError, UserError, unknown_choice
from branchnas.tree import Partition, Tree, canonical_partition

__all__ = [
    "EXACT_LIMIT",
    "MAX_CANDIDATES",
    "MODES",
    "SEARCH_FORMAT",
    "SizeModel",
    "ScoredTree",
    "SearchResult",
    "SearchStrategy",
    "ExactSearch",
    "ScalableSearch",
    "dissimilarity",
    "level_costs",
    "clustering_cost",
    "count_trees",
    "enumerate_trees",
    "refinement_dag",
    "search",
    "search_enumerate",
    "rank_all_trees",
    "pareto_front",
    "format_pareto",
    "plot_pareto",
    "format_result",
]

#: ``mode="auto"`` runs the exact search up to this many trees (10 tasks x 4 points: 4.2e9).
EXACT_LIMIT = 5_000_000_000
#: Search modes accepted by :func:`search`.
MODES = ("auto", "exact", "scalable")
#: Cells (float64) of the exact DP's widest table that auto mode accepts (~200 MB).
EXACT_MAX_CELLS = 25_000_000
#: The exact search holds every partition of the tasks: Bell(11) = 678,570.
EXACT_MAX_TASKS = 11
#: Candidate partitions kept per branch point in scalable mode (40 tasks x 4 points: ~7 s).
MAX_CANDIDATES = 5_000
#: :func:`search_enumerate` refuses more trees than this (it is the slow reference).
ENUMERATE_LIMIT = 20_000_000

_SYMMETRY_TOL = 1e-6
_CHUNK = 2_000_000  # float64 cells per vectorised chunk (~16 MB): bounds the peak memory


# ====================================================================== inputs


def dissimilarity(affinity: Any) -> np.ndarray:
    """The ``D x N x N`` dissimilarity ``1 - A`` used by the cost, validated and symmetrised.

    Args:
        affinity: the affinity tensor ``A`` (branch points x tasks x tasks), Spearman
            correlations in [-1, 1].

    Returns:
        ``float64`` array with zero diagonal, symmetric, entries in [0, 2].

    Raises:
        UserError: wrong shape, a non-finite entry, an asymmetric matrix or a value outside
            [-1, 1].
    """
    a = np.asarray(affinity, dtype=np.float64)
    if a.ndim != 3 or a.shape[1] != a.shape[2] or 0 in a.shape:
        raise UserError(
            f"affinity: expected a D x N x N tensor (branch points x tasks x tasks); got shape {tuple(a.shape)}"
        )
    bad = np.argwhere(~np.isfinite(a))
    if len(bad):
        d, i, j = bad[0]
        raise UserError(f"affinity[{d}, {i}, {j}] is {a[d, i, j]}; re-run the affinity stage (a task's features may be constant)")
    gap = np.abs(a - a.transpose(0, 2, 1))
    if gap.max() > _SYMMETRY_TOL:
        d, i, j = np.unravel_index(int(gap.argmax()), gap.shape)
        raise UserError(
            f"affinity: expected symmetric matrices; affinity[{d}, {i}, {j}] = {a[d, i, j]:.6g} but "
            f"affinity[{d}, {j}, {i}] = {a[d, j, i]:.6g}"
        )
    if a.min() < -1 - _SYMMETRY_TOL or a.max() > 1 + _SYMMETRY_TOL:
        where = np.unravel_index(int(np.abs(a).argmax()), a.shape)
        raise UserError(f"affinity: expected correlations in [-1, 1]; affinity{list(map(int, where))} = {a[where]:.6g}")
    # Averaging is exact for an exactly symmetric input, so hand-made tensors keep their values.
    a = np.clip((a + a.transpose(0, 2, 1)) / 2, -1.0, 1.0)
    dis = 1.0 - a
    idx = np.arange(a.shape[1])
    dis[:, idx, idx] = 0.0
    return dis


def _num(value: float) -> int | float:
    """An int when the value is integral (sizes are counts), else the float."""
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**63 else value


@dataclass(frozen=True)
class SizeModel:
    """The size of a tree from measured per-block costs: ``stem + sum_d |P_d| * block_d + heads``.

    Build one from :class:`branchnas.cost.BlockCosts` (or anything with its fields) with
    :meth:`from_costs`. FLOPs follow fvcore: one multiply-add is one flop.
    """

    block_params: tuple[float, ...]
    block_flops: tuple[float, ...]
    stem_params: float = 0.0
    stem_flops: float = 0.0
    head_params: float = 0.0
    head_flops: float = 0.0

    @classmethod
    def from_costs(cls, costs: Any, num_points: int | None = None, tasks: Sequence[str] | None = None) -> SizeModel:
        """Read block costs from a ``BlockCosts``-like object, a mapping, or a plain array.

        Args:
            costs: a :class:`SizeModel`; an object or mapping with ``stem_params``,
                ``stem_flops``, ``block_params`` (D,), ``block_flops`` (D,), ``head_params`` and
                ``head_flops`` (per-task dicts or totals; missing fields count 0); or a plain
                length-D sequence of per-block sizes, used for both params and FLOPs with no
                stem or heads.
            num_points: the expected D (checked when given).
            tasks: the task names; per-task head dicts are summed over these (all entries
                when ``None``).

        Raises:
            UserError: a field has the wrong length, is negative or not finite, or a task
                has no head cost.
        """
        if isinstance(costs, SizeModel):
            model = costs
        elif isinstance(costs, Mapping) or hasattr(costs, "block_params"):
            get = costs.get if isinstance(costs, Mapping) else (lambda k, default=None: getattr(costs, k, default))
            if get("block_params") is None:
                raise UserError("block costs: expected a 'block_params' field (one value per branch point)")
            bp = _vector("block_params", get("block_params"))
            bf = _vector("block_flops", get("block_flops")) if get("block_flops") is not None else bp
            model = cls(
                block_params=bp, block_flops=bf,
                stem_params=_scalar("stem_params", get("stem_params", 0) or 0),
                stem_flops=_scalar("stem_flops", get("stem_flops", 0) or 0),
                head_params=_heads("head_params", get("head_params", 0) or 0, tasks),
                head_flops=_heads("head_flops", get("head_flops", 0) or 0, tasks),
            )
        else:
            sizes = _vector("block costs", costs)
            model = cls(block_params=sizes, block_flops=sizes)
        if len(model.block_params) != len(model.block_flops):
            raise UserError(
                f"block costs: block_params has {len(model.block_params)} entries but block_flops has {len(model.block_flops)}"
            )
        if num_points is not None and len(model.block_params) != num_points:
            raise UserError(
                f"block costs: expected one cost per branch point ({num_points}); got {len(model.block_params)}; "
                "the affinity and the backbone must use the same branch points"
            )
        return model

    @property
    def num_points(self) -> int:
        """D, the number of blocks (branch points)."""
        return len(self.block_params)

    def params(self, counts: Sequence[int]) -> int | float:
        """Parameters of a tree with ``counts[d]`` copies of block ``d``."""
        return _num(self.sizes(np.asarray([counts]))[0][0])

    def flops(self, counts: Sequence[int]) -> int | float:
        """FLOPs of a tree with ``counts[d]`` copies of block ``d``."""
        return _num(self.sizes(np.asarray([counts]))[1][0])

    def size(self, counts: Sequence[int], metric: str) -> int | float:
        """``params`` or ``flops`` of a tree with these group counts."""
        return self.params(counts) if _check_metric(metric) == "params" else self.flops(counts)

    def sizes(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Params and FLOPs (float64) for every row of a ``(C, D)`` count array."""
        counts = np.asarray(counts, dtype=np.float64)
        params = self.stem_params + self.head_params + counts @ np.asarray(self.block_params)
        flops = self.stem_flops + self.head_flops + counts @ np.asarray(self.block_flops)
        return params, flops


def _vector(name: str, value: Any) -> tuple[float, ...]:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise UserError(f"block costs: {name} must be a list with one number per branch point; got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise UserError(f"block costs: {name} must be finite and non-negative; got {arr.tolist()}")
    return tuple(float(x) for x in arr)


def _scalar(name: str, value: Any) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise UserError(f"block costs: {name} must be finite and non-negative; got {value}")
    return value


def _heads(name: str, value: Any, tasks: Sequence[str] | None) -> float:
    if isinstance(value, Mapping):
        if tasks is None:
            return _scalar(name, sum(float(v) for v in value.values()))
        missing = [t for t in tasks if t not in value]
        if missing:
            raise UserError(f"block costs: {name} has no entry for task {missing[0]!r}; it has: {', '.join(map(str, value))}")
        return _scalar(name, sum(float(value[t]) for t in tasks))
    return _scalar(name, value)


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise UserError(unknown_choice("metric", metric, METRICS))
    return metric


# ====================================================================== the cost


def _group_max(group: Sequence[int], dis_d: np.ndarray) -> float:
    """The largest dissimilarity inside a group (0 for a singleton)."""
    if len(group) < 2:
        return 0.0
    return float(dis_d[np.ix_(group, group)].max())


def _level_cost(partition: Partition, dis_d: np.ndarray) -> float:
    """``C_d``: the mean over the groups of their largest dissimilarity.

    The vectorised tables of the DP reproduce exactly these operations (sum of the group
    maxima in canonical group order, then one division), so that ties stay exact.
    """
    total = 0.0
    for group in partition:
        total += _group_max(group, dis_d)
    return total / len(partition)


def _fold(costs: Sequence[float]) -> float:
    """``C_0 + (C_1 + (... + C_{D-1}))``: the summation order that the suffix DP uses."""
    total = 0.0
    for cost in reversed(costs):
        total = cost + total
    return total


def _check_tree(tree: Tree, dis: np.ndarray) -> None:
    if dis.shape[0] != tree.num_points or dis.shape[1] != tree.num_tasks:
        raise UserError(
            f"tree has {tree.num_tasks} tasks and {tree.num_points} branch points but the affinity is "
            f"{dis.shape[0]} x {dis.shape[1]} x {dis.shape[2]} (points x tasks x tasks)"
        )


def level_costs(tree: Tree, affinity: Any) -> list[float]:
    """The per-branch-point clustering costs ``C_d`` of a tree (their sum is the cost)."""
    dis = dissimilarity(affinity)
    _check_tree(tree, dis)
    return [_level_cost(p, dis[d]) for d, p in enumerate(tree.partitions)]


def clustering_cost(tree: Tree, affinity: Any) -> float:
    """The paper's task clustering cost of a tree.

    ``C = sum_d C_d`` with ``C_d`` the mean, over the groups of ``P_d``, of the largest
    dissimilarity ``1 - A[d, i, j]`` between two tasks of the group (0 for a singleton).

    Example:
        >>> a = np.ones((1, 3, 3)); a[0, 0, 2] = a[0, 2, 0] = 0.5
        >>> clustering_cost(Tree([[[0, 1, 2]]]), a), clustering_cost(Tree([[[0, 1], [2]]]), a)
        (0.5, 0.0)
    """
    return _fold(level_costs(tree, affinity))


# ====================================================================== counting and enumeration


def count_trees(num_tasks: int, num_points: int) -> int:
    """The number of trees: chains of ``num_points`` partitions of ``num_tasks`` tasks, each refining the last.

    With ``f(n, D)`` the count, choosing the block of ``P_0`` that holds the first task gives
    ``f(n, D) = sum_k C(n-1, k-1) f(k, D-1) f(n-k, D)``, with ``f(0, D) = f(n, 0) = 1``.
    ``count_trees(n, 1)`` is the Bell number.

    Example:
        >>> count_trees(5, 4), count_trees(7, 4)
        (3455, 660665)
    """
    if num_tasks < 1 or num_points < 1:
        raise UserError(f"count_trees: expected at least 1 task and 1 branch point; got {num_tasks} and {num_points}")
    return _count(num_tasks, num_points)


@functools.cache
def _count(n: int, d: int) -> int:
    if n == 0 or d == 0:
        return 1
    return sum(math.comb(n - 1, k - 1) * _count(k, d - 1) * _count(n - k, d) for k in range(1, n + 1))


def _set_partitions(items: tuple[int, ...]) -> list[Partition]:
    """Every partition of ``items`` (canonical), by placing each item in turn."""
    if not items:
        return [()]
    return list(_set_partitions_cached(items))


@functools.lru_cache(maxsize=4096)
def _set_partitions_cached(items: tuple[int, ...]) -> tuple[Partition, ...]:
    result: list[list[list[int]]] = [[]]
    for item in items:
        grown = []
        for groups in result:
            for i in range(len(groups)):
                grown.append([*groups[:i], [*groups[i], item], *groups[i + 1:]])
            grown.append([*groups, [item]])
        result = grown
    return tuple(canonical_partition(g) for g in result)


@functools.lru_cache(maxsize=65536)
def _refinements(partition: Partition) -> tuple[Partition, ...]:
    """Every partition that refines ``partition`` (itself included)."""
    per_group = [_set_partitions(group) for group in partition]
    return tuple(
        canonical_partition(g for parts in combo for g in parts) for combo in itertools.product(*per_group)
    )


def enumerate_trees(num_tasks: int, num_points: int) -> Iterator[tuple[Partition, ...]]:
    """Yield every tree's partitions, in canonical (lexicographic) order.

    The plain reference: :func:`count_trees` of them. Only for small problems.
    """
    if num_tasks < 1 or num_points < 1:
        raise UserError(f"enumerate_trees: expected at least 1 task and 1 branch point; got {num_tasks} and {num_points}")

    def extend(chain: tuple[Partition, ...]) -> Iterator[tuple[Partition, ...]]:
        if len(chain) == num_points:
            yield chain
            return
        for nxt in sorted(_refinements(chain[-1])):
            yield from extend((*chain, nxt))

    for first in sorted(_set_partitions(tuple(range(num_tasks)))):
        yield from extend((first,))


def refinement_dag(num_tasks: int, num_points: int, *, order_seed: int | None = None) -> Any:
    """The partition-refinement DAG as a ``networkx.DiGraph``.

    Nodes: ``"stem"`` and ``(d, P)`` for every branch point ``d`` and partition ``P`` (with
    attribute ``groups = |P|``); edges: stem -> every ``(0, P)`` and ``(d, P) -> (d+1, R)``
    whenever ``R`` refines ``P``. Every stem-to-sink path is one tree. Only for small problems:
    10 tasks give 115,975 nodes per point and 16.7 million edges per pair of points.

    Args:
        num_tasks: N.
        num_points: D.
        order_seed: insert nodes and edges in a random order drawn from this seed (for
            checking that results do not depend on insertion order); ``None`` keeps
            canonical order.
    """
    import networkx as nx

    partitions = _set_partitions(tuple(range(num_tasks)))
    nodes: list[tuple[Any, dict[str, Any]]] = [("stem", {"groups": 1})]
    edges: list[tuple[Any, Any]] = []
    for d in range(num_points):
        for p in partitions:
            nodes.append(((d, p), {"groups": len(p), "depth": d}))
            if d == 0:
                edges.append(("stem", (0, p)))
            else:
                edges.extend(((d - 1, p), (d, r)) for r in _refinements(p))
    if order_seed is not None:
        rng = random.Random(order_seed)
        rng.shuffle(nodes)
        rng.shuffle(edges)
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from(edges)
    return graph


# ====================================================================== results


@dataclass(frozen=True)
class ScoredTree:
    """A tree with its clustering cost and its size in both metrics."""

    tree: Tree
    cost: float
    params: int | float
    flops: int | float

    def size(self, metric: str) -> int | float:
        """The size in ``params`` or ``flops``."""
        return self.params if _check_metric(metric) == "params" else self.flops

    def sort_key(self) -> tuple[Any, ...]:
        """The ranking: cost, then fewer params, then fewer FLOPs, then the canonical tree order."""
        return (self.cost, self.params, self.flops, self.tree.key())

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {
            "cost": self.cost,
            "params": self.params,
            "flops": self.flops,
            "groups_per_point": list(self.tree.groups_per_point()),
            "tree": self.tree.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScoredTree:
        """Inverse of :meth:`to_json`."""
        try:
            return cls(Tree.from_json(data["tree"]), float(data["cost"]), _num(data["params"]), _num(data["flops"]))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"search result: a tree entry is malformed ({err!r}); run `branchnas search --force`") from None


SEARCH_FORMAT = "branchnas.search/1"


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search` returns.

    Attributes:
        ranked: the best trees within the budget, best first (up to ``top``).
        metric: what the budget counts (``params`` or ``flops``).
        budget: the budget, or ``None`` for no limit.
        mode: the search that ran: ``exact``, ``scalable`` or ``enumerate``.
        trees_considered: trees covered by the search (exact: every tree; scalable: the
            chains of the candidate DAG).
        seconds: wall time of the search.
        min_size: size of the all-shared tree (the smallest), in ``metric``.
        max_size: size of the all-separate tree (the largest), in ``metric``.
        pareto: the Pareto front (cheapest cost for every budget), smallest first, when asked.
        details: counts describing the run (candidates per branch point, labels, ...).
    """

    ranked: tuple[ScoredTree, ...]
    metric: str
    budget: int | float | None
    mode: str
    trees_considered: int
    seconds: float
    min_size: int | float
    max_size: int | float
    pareto: tuple[ScoredTree, ...] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> ScoredTree:
        """The winning tree with its scores."""
        return self.ranked[0]

    @property
    def tree(self) -> Tree:
        """The winning tree."""
        return self.ranked[0].tree

    @property
    def cost(self) -> float:
        """The winning tree's clustering cost."""
        return self.ranked[0].cost

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (``search/tree.json``); ``pareto`` is included when present."""
        data: dict[str, Any] = {
            "format": SEARCH_FORMAT,
            "metric": self.metric,
            "budget": self.budget,
            "mode": self.mode,
            "trees_considered": self.trees_considered,
            "seconds": round(self.seconds, 6),
            "min_size": self.min_size,
            "max_size": self.max_size,
            "ranked": [s.to_json() for s in self.ranked],
            "details": self.details,
        }
        if self.pareto is not None:
            data["pareto"] = [s.to_json() for s in self.pareto]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SearchResult:
        """Inverse of :meth:`to_json`.

        Raises:
            UserError: the data is not a search result.
        """
        if not isinstance(data, Mapping) or data.get("format") != SEARCH_FORMAT:
            raise UserError(f"search result: expected format '{SEARCH_FORMAT}'; run `branchnas search --force` to rewrite it")
        try:
            return cls(
                ranked=tuple(ScoredTree.from_json(s) for s in data["ranked"]),
                metric=str(data["metric"]),
                budget=data["budget"],
                mode=str(data["mode"]),
                trees_considered=int(data["trees_considered"]),
                seconds=float(data["seconds"]),
                min_size=_num(data["min_size"]),
                max_size=_num(data["max_size"]),
                pareto=None if data.get("pareto") is None else tuple(ScoredTree.from_json(s) for s in data["pareto"]),
                details=dict(data.get("details", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"search result: malformed ({err!r}); run `branchnas search --force`") from None


# ====================================================================== the partition lattice


def _rgs_table(n: int) -> np.ndarray:
    """Every partition of ``n`` items as a restricted growth string (label of item i), ``(Bell(n), n)``."""
    rows = np.zeros((1, 1), dtype=np.int8)
    top = np.zeros(1, dtype=np.int8)
    for _ in range(1, n):
        reps = top.astype(np.int64) + 2
        src = np.repeat(np.arange(len(rows)), reps)
        starts = np.cumsum(reps) - reps
        new = (np.arange(src.size) - np.repeat(starts, reps)).astype(np.int8)
        rows = np.concatenate([rows[src], new[:, None]], axis=1)
        top = np.maximum(top[src], new)
    return rows


def _canonical_rgs(labels: np.ndarray) -> np.ndarray:
    """Relabel rows of arbitrary group labels to restricted growth strings (first seen = 0, ...)."""
    labels = np.asarray(labels)
    rows, n = labels.shape
    out = np.empty((rows, n), dtype=np.int16 if n > 127 else np.int8)
    step = max(1, _CHUNK // max(1, n * n))
    ar = np.arange(n)
    for lo in range(0, rows, step):
        x = labels[lo:lo + step]
        first = (x[:, :, None] == x[:, None, :]).argmax(axis=2)  # first item with the same label
        rank = np.cumsum(first == ar, axis=1) - 1
        out[lo:lo + step] = np.take_along_axis(rank, first, axis=1)
    return out


def _unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows in lexicographic order, and the index of every input row among them."""
    if len(rows) == 0:
        return rows, np.zeros(0, np.int64)
    order = np.lexsort(rows.T[::-1])
    ordered = rows[order]
    new = np.ones(len(rows), dtype=bool)
    new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    inverse = np.empty(len(rows), dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], inverse


class _Lattice:
    """All partitions of ``n`` items, grouped by block count, with the cover (merge) relation."""

    def __init__(self, n: int):
        self.n = n
        table = _rgs_table(n)
        counts = table.max(axis=1).astype(np.int64) + 1
        order = np.argsort(counts, kind="stable")
        self.rgs = table[order]
        self.counts = counts[order]
        self.offsets = np.searchsorted(self.counts, np.arange(n + 2))  # rows with k blocks: [off[k], off[k+1])
        self.powers = n ** np.arange(n, dtype=np.int64)
        codes = self.rgs.astype(np.int64) @ self.powers
        self.code_order = np.argsort(codes)
        self.codes_sorted = codes[self.code_order]
        bits = np.int64(1) << np.arange(n, dtype=np.int64)
        self.masks = np.zeros((len(self.rgs), n), dtype=np.int64)
        for g in range(n):
            self.masks[:, g] = ((self.rgs == g) * bits).sum(axis=1)
        # merges[k]: for each partition with k-1 blocks (parent), the partitions with k blocks
        # that one split away from it (children), as a CSR list sorted by parent.
        self.merges: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k in range(2, n + 1):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            kids = self.rgs[lo:hi].astype(np.int64)
            child_parts, parent_parts = [], []
            for a in range(k):
                for b in range(a + 1, k):
                    merged = kids.copy()
                    merged[merged == b] = a
                    merged[merged > b] -= 1  # still a restricted growth string
                    parent_parts.append(self.lookup(merged @ self.powers) - self.offsets[k - 1])
                    child_parts.append(np.arange(hi - lo))
            parent = np.concatenate(parent_parts)
            child = np.concatenate(child_parts)
            order = np.argsort(parent, kind="stable")
            starts = np.searchsorted(parent[order], np.arange(self.offsets[k] - self.offsets[k - 1]))
            self.merges[k] = (child[order].astype(np.int32), starts)

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """Row indices of partitions given by their codes (restricted growth strings in base n)."""
        pos = np.searchsorted(self.codes_sorted, codes)
        return self.code_order[pos]

    def block(self, k: int) -> slice:
        """The rows with ``k`` blocks."""
        return slice(int(self.offsets[k]), int(self.offsets[k + 1]))

    def partition(self, row: int) -> Partition:
        """The canonical tuple form of a row (labels are in order of each group's first item)."""
        labels = self.rgs[row]
        return tuple(tuple(int(i) for i in np.flatnonzero(labels == g)) for g in range(int(self.counts[row])))


@functools.lru_cache(maxsize=2)
def _lattice(n: int) -> _Lattice:
    return _Lattice(n)


@functools.lru_cache(maxsize=32)
def _partition_table(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every partition of ``n`` items (restricted growth strings, int64) and its block counts."""
    rgs = _rgs_table(n).astype(np.int64)
    return rgs, rgs.max(axis=1) + 1


def _subset_maxima(dis_d: np.ndarray) -> np.ndarray:
    """``m[mask]``: the largest dissimilarity inside every subset of the tasks (bit i = task i)."""
    n = len(dis_d)
    m = np.zeros(1 << n)
    for h in range(1, n):
        low = np.arange(1 << h)
        members = ((low[:, None] >> np.arange(h)) & 1).astype(bool)
        to_h = np.where(members, dis_d[h, :h][None, :], 0.0).max(axis=1)
        m[(1 << h) + low] = np.maximum(m[low], to_h)
    return m


def _row_level_costs(rgs: np.ndarray, dis_d: np.ndarray) -> np.ndarray:
    """``C_d`` for every row of a partition table (same operations as :func:`_level_cost`)."""
    rows, n = rgs.shape
    counts = rgs.max(axis=1).astype(np.int64) + 1
    out = np.empty(rows)
    step = max(1, _CHUNK // max(1, n * n))
    for lo in range(0, rows, step):
        lab = rgs[lo:lo + step].astype(np.int64)
        same = lab[:, :, None] == lab[:, None, :]
        rowmax = np.where(same, dis_d[None], 0.0).max(axis=2)
        total = np.zeros(len(lab))
        for g in range(n):
            total = total + np.where(lab == g, rowmax, 0.0).max(axis=1)
        out[lo:lo + step] = total / counts[lo:lo + step]
    return out


@functools.lru_cache(maxsize=64)
def _suffixes(n: int, length: int) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
    """Non-decreasing count vectors of ``length`` entries in 1..n, in lexicographic order, and their positions."""
    vectors = list(itertools.combinations_with_replacement(range(1, n + 1), length))
    return vectors, {v: i for i, v in enumerate(vectors)}


def _ncols(n: int, length: int, k: int) -> int:
    """How many of those vectors start at ``k`` or above (they are the tail of the list)."""
    return math.comb(n - k + length, length)


def _exact_cells(n: int, d: int) -> int:
    """Cells of the exact DP's widest table (the first branch point's)."""
    from math import comb

    stirling = _stirling_row(n)
    return sum(stirling[k] * comb(n - k + d - 1, d - 1) for k in range(1, n + 1))


@functools.cache
def _stirling_row(n: int) -> tuple[int, ...]:
    row = [1] + [0] * n  # S(0, k)
    for i in range(1, n + 1):
        row = [0] + [k * row[k] + row[k - 1] for k in range(1, i + 1)] + [0] * (n - i)
    return tuple(row)


# ====================================================================== DP engines


class _Engine:
    """The suffix DP tables, as the best-first read-out uses them.

    ``W_d(node)[s]`` is the cost of the best chain of levels ``d..D-1`` that starts at
    ``node`` and has the count vector ``s`` below it, summed as in :func:`_fold`.
    """

    num_points: int
    class_counts: np.ndarray  # (C, D): count vector of every class (size label)
    class_best: np.ndarray  # (C,): the cheapest cost within the class

    def roots(self, allowed: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Level-0 entries (node, class, value) with value <= threshold in allowed classes."""
        raise NotImplementedError

    def kth(self, allowed: np.ndarray, k: int) -> float:
        """The k-th smallest level-0 value in allowed classes (the largest when there are fewer)."""
        raise NotImplementedError

    def children(self, d: int, node: int, groups: int) -> np.ndarray:
        """Nodes at level d+1 that refine ``node`` and have ``groups`` groups."""
        raise NotImplementedError

    def values(self, d: int, nodes: np.ndarray, suffix: tuple[int, ...]) -> np.ndarray:
        """``W_d(node)[suffix]`` for every node (all with the same group count); inf if absent."""
        raise NotImplementedError

    def partition(self, d: int, node: int) -> Partition:
        raise NotImplementedError

    def level_cost(self, d: int, node: int) -> float:
        raise NotImplementedError


class _LatticeEngine(_Engine):
    """Exact DP over every partition: tables per level and per block count, dense in the count vectors."""

    def __init__(self, dis: np.ndarray):
        num_points, n, _ = dis.shape
        self.num_points, self.n = num_points, n
        lat = self.lat = _lattice(n)
        self.cost = np.empty((num_points, len(lat.rgs)))
        for d in range(num_points):
            maxima = _subset_maxima(dis[d])
            total = np.zeros(len(lat.rgs))
            for g in range(n):  # group order = canonical order: the same sums as _level_cost
                total = total + maxima[lat.masks[:, g]]
            self.cost[d] = total / lat.counts
        self.W: list[list[np.ndarray | None]] = [[] for _ in range(num_points)]
        self.W[-1] = [None] + [self.cost[-1, lat.block(k)][:, None] for k in range(1, n + 1)]
        for d in range(num_points - 2, -1, -1):
            self.W[d] = self._step(self.W[d + 1], d)
        vectors, _ = _suffixes(n, num_points - 1)
        counts, best, self.class_start = [], [], [0] * (n + 2)
        for k in range(1, n + 1):
            self.class_start[k] = len(counts)
            tail = vectors[len(vectors) - _ncols(n, num_points - 1, k):]
            counts.extend((k, *s) for s in tail)
            best.append(self.W[0][k].min(axis=0))
        self.class_start[n + 1] = len(counts)
        self.class_counts = np.asarray(counts, dtype=np.int64).reshape(-1, num_points)
        self.class_best = np.concatenate(best)

    def _step(self, below: list[np.ndarray | None], d: int) -> list[np.ndarray | None]:
        """``W_d`` from ``W_{d+1}``: the best refinement with each count, through the cover relation."""
        n, lat = self.n, self.lat
        out: list[np.ndarray | None] = [None] * (n + 1)
        finer: np.ndarray | None = None  # M for k+1 blocks: best over refinements, by count vector
        for k in range(n, 0, -1):
            same = below[k]  # refinement by itself: count vectors that start with k
            assert same is not None
            if finer is None:
                best = same
            else:
                best = np.concatenate([same, self._min_over_children(finer, k + 1)], axis=1)
            out[k] = self.cost[d, lat.block(k)][:, None] + best
            finer = best
        return out

    def _min_over_children(self, finer: np.ndarray, k: int) -> np.ndarray:
        """For every partition with k-1 blocks, the row-wise min of ``finer`` over its k-block covers."""
        child, starts = self.lat.merges[k]
        parents, cols = len(starts), finer.shape[1]
        out = np.empty((parents, cols))
        per_chunk = max(1, _CHUNK // cols)
        p0 = 0
        while p0 < parents:
            e0 = starts[p0]
            p1 = int(np.searchsorted(starts, e0 + per_chunk, side="right")) - 1
            p1 = min(max(p1, p0 + 1), parents)
            e1 = starts[p1] if p1 < parents else len(child)
            out[p0:p1] = np.minimum.reduceat(finer[child[e0:e1]], starts[p0:p1] - e0, axis=0)
            p0 = p1
        return out

    def _class_cols(self, k: int, allowed: np.ndarray) -> np.ndarray:
        return np.flatnonzero(allowed[self.class_start[k]:self.class_start[k + 1]])

    def roots(self, allowed: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nodes, classes, values = [], [], []
        for k in range(1, self.n + 1):
            cols = self._class_cols(k, allowed)
            if len(cols) == 0:
                continue
            table = self.W[0][k][:, cols]
            r, c = np.nonzero(table <= threshold)
            nodes.append(self.lat.offsets[k] + r)
            classes.append(self.class_start[k] + cols[c])
            values.append(table[r, c])
        if not nodes:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        return np.concatenate(nodes), np.concatenate(classes), np.concatenate(values)

    def kth(self, allowed: np.ndarray, k: int) -> float:
        smallest = []
        for blocks in range(1, self.n + 1):
            cols = self._class_cols(blocks, allowed)
            if len(cols):
                vals = self.W[0][blocks][:, cols].ravel()
                smallest.append(np.partition(vals, k - 1)[:k] if vals.size > k else vals)
        vals = np.sort(np.concatenate(smallest))
        return float(vals[min(k, vals.size) - 1])

    def children(self, d: int, node: int, groups: int) -> np.ndarray:
        lat = self.lat
        labels = lat.rgs[node]
        members = [np.flatnonzero(labels == g) for g in range(int(lat.counts[node]))]
        rest = np.cumsum([len(m) for m in members][::-1])[::-1]  # items from group i on
        parts = np.zeros((1, self.n), dtype=np.int64)
        made = np.zeros(1, dtype=np.int64)
        for i, items in enumerate(members):
            sub_rgs, sub_counts = _partition_table(len(items))
            later = len(members) - i - 1
            later_items = rest[i + 1] if i + 1 < len(members) else 0
            total = (made[:, None] + sub_counts[None, :]).ravel()
            # Each later group adds between 1 and its size blocks: prune what cannot reach `groups`.
            keep = np.flatnonzero((total + later <= groups) & (total + later_items >= groups))
            src, pick = keep // len(sub_rgs), keep % len(sub_rgs)
            parts = parts[src]
            parts[:, items] = sub_rgs[pick] + made[src][:, None]
            made = total[keep]
        rows = _canonical_rgs(parts).astype(np.int64)
        return np.sort(lat.lookup(rows @ lat.powers))

    def values(self, d: int, nodes: np.ndarray, suffix: tuple[int, ...]) -> np.ndarray:
        if len(nodes) == 0:
            return np.zeros(0)
        k = int(self.lat.counts[nodes[0]])
        vectors, pos = _suffixes(self.n, len(suffix))
        col = pos[tuple(suffix)] - (len(vectors) - _ncols(self.n, len(suffix), k))
        table = self.W[d][k]
        assert table is not None
        return table[nodes - self.lat.offsets[k], col]

    def partition(self, d: int, node: int) -> Partition:
        return self.lat.partition(int(node))

    def level_cost(self, d: int, node: int) -> float:
        return float(self.cost[d, node])


class _CandidateEngine(_Engine):
    """The same DP over explicit candidate partitions per level, with sparse labels.

    A label is (node, code of the count vector below, best cost); labels whose smallest
    possible tree exceeds the budget are dropped on the way.
    """

    def __init__(self, dis: np.ndarray, levels: list[np.ndarray], sizes: SizeModel,
                 metric: str, budget: float | None,
                 kids: list[tuple[np.ndarray, np.ndarray]] | None = None):
        num_points, n, _ = dis.shape
        self.num_points, self.n = num_points, n
        self.radix = n + 1
        if (n + 1) ** max(1, num_points - 1) >= 2**62:
            raise UserError(f"scalable search supports up to {int(62 / math.log2(n + 1))} branch points for {n} tasks")
        self.levels = levels
        self.counts = [rows.max(axis=1).astype(np.int64) + 1 for rows in levels]
        self.cost = [_row_level_costs(rows, dis[d]) for d, rows in enumerate(levels)]
        self.kids = kids if kids is not None else [
            _refinement_edges(levels[d], levels[d + 1]) for d in range(num_points - 1)]
        block = np.asarray(sizes.block_params if metric == "params" else sizes.block_flops)
        fixed = (sizes.stem_params + sizes.head_params) if metric == "params" else (sizes.stem_flops + sizes.head_flops)
        self.labels: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [None] * num_points  # type: ignore[list-item]
        last = len(levels[-1])
        node = np.arange(last)
        below = np.zeros(last)  # size of the levels below the node (none at the last level)
        self.labels[-1] = (node, np.zeros(last, np.int64), self.cost[-1].copy())
        self.label_count = last
        for d in range(num_points - 2, -1, -1):
            floor = None if budget is None else budget - fixed - block[:d].sum()
            self.labels[d], below = self._step(d, below, block, floor)
            self.label_count += len(self.labels[d][0])
        node, code, value = self.labels[0]
        full = self.counts[0][node] * self.radix ** (num_points - 1) + code
        keys, self.root_class = np.unique(full, return_inverse=True)
        digits = [(keys // self.radix ** (num_points - 1 - i)) % self.radix for i in range(num_points)]
        self.class_counts = np.stack(digits, axis=1).astype(np.int64)
        self.class_best = np.full(len(keys), np.inf)
        np.minimum.at(self.class_best, self.root_class, value)

    def _step(self, d: int, below: np.ndarray, block: np.ndarray, floor: float | None):
        node_b, code_b, value_b = self.labels[d + 1]
        digits_b = self.num_points - 2 - d  # entries in the codes of level d+1
        starts = np.searchsorted(node_b, np.arange(len(self.levels[d + 1]) + 1))
        indptr, kids = self.kids[d]
        nodes, codes, values, sizes = [], [], [], []
        parents = len(self.levels[d])
        # Parents in chunks so that the expanded (edge x label) arrays stay small.
        per_edge = np.concatenate([[0], np.cumsum(starts[kids + 1] - starts[kids])])
        per_parent = per_edge[indptr]
        lo = 0
        while lo < parents:
            hi = int(np.searchsorted(per_parent, per_parent[lo] + _CHUNK, side="right")) - 1
            hi = min(max(hi, lo + 1), parents)
            child = kids[indptr[lo]:indptr[hi]]
            parent = np.repeat(np.arange(lo, hi), np.diff(indptr[lo:hi + 1]))
            first, count = starts[child], starts[child + 1] - starts[child]
            total = int(count.sum())
            lo = hi
            if total == 0:
                continue
            idx = np.repeat(first - np.cumsum(count) + count, count) + np.arange(total)
            par = np.repeat(parent, count)
            kcount = np.repeat(self.counts[d + 1][child], count)
            code = kcount * self.radix ** digits_b + code_b[idx]
            size = kcount * block[d + 1] + below[idx]
            value = value_b[idx]
            if floor is not None:
                keep = self.counts[d][par] * block[d] + size <= floor
                par, code, size, value = par[keep], code[keep], size[keep], value[keep]
            order = np.lexsort((value, code, par))
            par, code, size, value = par[order], code[order], size[order], value[order]
            head = np.ones(len(par), dtype=bool)
            head[1:] = (par[1:] != par[:-1]) | (code[1:] != code[:-1])
            nodes.append(par[head])
            codes.append(code[head])
            values.append(self.cost[d][par[head]] + value[head])
            sizes.append(size[head])
        if not nodes:
            return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)), np.zeros(0)
        return (np.concatenate(nodes), np.concatenate(codes), np.concatenate(values)), np.concatenate(sizes)

    def chains(self) -> int:
        """How many trees the candidate DAG holds."""
        ways = np.ones(len(self.levels[-1]), dtype=object)
        for d in range(self.num_points - 2, -1, -1):
            indptr, kids = self.kids[d]
            ways = np.array([sum(ways[kids[indptr[i]:indptr[i + 1]]], 0) for i in range(len(self.levels[d]))],
                            dtype=object)
        return int(sum(ways))

    def roots(self, allowed: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        node, _, value = self.labels[0]
        keep = allowed[self.root_class] & (value <= threshold)
        return node[keep], self.root_class[keep], value[keep]

    def kth(self, allowed: np.ndarray, k: int) -> float:
        vals = np.sort(self.labels[0][2][allowed[self.root_class]])
        return float(vals[min(k, vals.size) - 1])

    def children(self, d: int, node: int, groups: int) -> np.ndarray:
        indptr, kids = self.kids[d]
        kids = kids[indptr[node]:indptr[node + 1]]
        return kids[self.counts[d + 1][kids] == groups]

    def values(self, d: int, nodes: np.ndarray, suffix: tuple[int, ...]) -> np.ndarray:
        node_l, code_l, value_l = self.labels[d]
        if len(node_l) == 0 or len(nodes) == 0:
            return np.full(len(nodes), np.inf)
        code = 0
        for s in suffix:
            code = code * self.radix + s
        span = self.radix ** len(suffix)
        keys = node_l * span + code_l  # sorted: labels are sorted by (node, code)
        want = np.asarray(nodes, dtype=np.int64) * span + code
        pos = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        return np.where(keys[pos] == want, value_l[pos], np.inf)

    def partition(self, d: int, node: int) -> Partition:
        labels = self.levels[d][node]
        return tuple(tuple(int(i) for i in np.flatnonzero(labels == g)) for g in range(int(self.counts[d][node])))

    def level_cost(self, d: int, node: int) -> float:
        return float(self.cost[d][node])


def _refinement_edges(coarse: np.ndarray, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR lists: for every coarse partition, the fine partitions that refine it."""
    n = coarse.shape[1]
    fine64 = fine.astype(np.int64)
    first = (fine64[:, :, None] == fine64[:, None, :]).argmax(axis=2)  # a representative per item
    coarse64 = coarse.astype(np.int64)
    step = max(1, _CHUNK // max(1, len(fine) * n))
    parents, children = [], []
    for lo in range(0, len(coarse), step):
        c = coarse64[lo:lo + step]
        # R refines Q iff every item has Q's label of its R-group's representative.
        ok = (c[:, first.ravel()].reshape(len(c), len(fine), n) == c[:, None, :]).all(axis=2)
        p, k = np.nonzero(ok)
        parents.append(p + lo)
        children.append(k)
    parent = np.concatenate(parents)
    indptr = np.searchsorted(parent, np.arange(len(coarse) + 1))
    return indptr, np.concatenate(children)


# ====================================================================== scalable candidates


def _linkage_cuts(dis_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Complete-linkage dendrogram cut at every level: (labels after m merges, merge heights)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    n = len(dis_d)
    labels = np.arange(n)
    states = [labels.copy()]
    if n == 1:
        return np.asarray(states), np.zeros(0)
    merges = linkage(squareform(dis_d, checks=False), method="complete")
    members = {i: [i] for i in range(n)}
    for r, (a, b, _, _) in enumerate(merges):
        joined = members.pop(int(a)) + members.pop(int(b))
        members[n + r] = joined
        labels[joined] = n + r
        states.append(labels.copy())
    return np.asarray(states), merges[:, 2]


def _improve_cut(labels: np.ndarray, dis_d: np.ndarray, max_sweeps: int = 20) -> np.ndarray:
    """Polish a partition for one branch point's cost: move single tasks between groups.

    The number of groups stays fixed and every move strictly lowers the sum of the group
    diameters (so ``C_d``); complete linkage is greedy and often misses the best split.
    """
    x = np.asarray(labels, dtype=np.int64).copy()
    k = int(x.max()) + 1
    sizes = np.bincount(x, minlength=k)
    diam = np.array([_group_max(np.flatnonzero(x == g), dis_d) for g in range(k)])
    for _ in range(max_sweeps):
        moved = False
        for i in range(len(x)):
            g = x[i]
            if sizes[g] == 1:
                continue
            rest = np.flatnonzero(x == g)
            rest = rest[rest != i]
            shrunk = _group_max(rest, dis_d)
            reach = np.zeros(k)
            np.maximum.at(reach, x, dis_d[i])
            grown = np.maximum(diam, reach)
            delta = grown - diam + (shrunk - diam[g])
            delta[g] = np.inf
            h = int(np.argmin(delta))
            if delta[h] < -1e-12:
                x[i] = h
                sizes[g] -= 1
                sizes[h] += 1
                diam[g], diam[h] = shrunk, grown[h]
                moved = True
        if not moved:
            break
    return x


def _recluster_within(parents: np.ndarray, dis_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Refinements of each parent: complete linkage inside every group, all cut at one common height.

    Returns the refinements (rows of labels) and the index of the parent of each.
    """
    n = dis_d.shape[0]
    cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # parents share many groups
    out, owner = [], []
    for p, row in enumerate(parents):
        groups = [np.flatnonzero(row == g) for g in range(int(row.max()) + 1)]
        per_group = []
        for items in groups:
            if len(items) == 1:
                per_group.append((items, np.zeros((1, 1), np.int64), np.zeros(0)))
                continue
            key = items.tobytes()
            if key not in cache:
                cache[key] = _linkage_cuts(dis_d[np.ix_(items, items)])
            per_group.append((items, *cache[key]))
        cuts = np.unique(np.concatenate([[-np.inf], *(h for _, _, h in per_group)]))
        labels = np.empty((len(cuts), n), dtype=np.int64)
        offset = 0
        for items, states, h in per_group:
            merged = np.searchsorted(h, cuts, side="right")  # merges at or below each height
            labels[:, items] = states[merged] + offset
            offset += 2 * len(items)
        out.append(labels)
        owner.append(np.full(len(cuts), p))
    return np.concatenate(out), np.concatenate(owner)


def _candidates(dis: np.ndarray, max_candidates: int, recluster: bool = False
                ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Nested candidate partitions per branch point for the scalable search.

    Returns the candidates per branch point and, between consecutive points, the CSR lists of
    the pairs (parent, refinement) that generated them.
    """
    num_points, n, _ = dis.shape
    levels: list[np.ndarray] = []
    edges: list[tuple[np.ndarray, np.ndarray]] = []
    for d in range(num_points):
        states, _ = _linkage_cuts(dis[d])
        states = _canonical_rgs(states).astype(np.int64)
        polished = np.array([_improve_cut(row, dis[d]) for row in states])
        cuts, _ = _unique_rows(_canonical_rgs(np.concatenate([states, polished])).astype(np.int64))
        if d == 0:
            cand, _ = _unique_rows(cuts)
        else:
            prev = levels[-1].astype(np.int64)
            rows = [(prev[:, None, :] * (2 * n) + cuts[None, :, :]).reshape(-1, n)]
            owner = [np.repeat(np.arange(len(prev)), len(cuts))]
            if recluster:
                more, whose = _recluster_within(prev, dis[d])
                rows.append(more)
                owner.append(whose)
            cand, inverse = _unique_rows(_canonical_rgs(np.concatenate(rows)))
            parent = np.concatenate(owner)
        if len(cand) > max_candidates:
            kept = _prune_candidates(cand, dis[d], max_candidates)
            remap = np.full(len(cand), -1)
            remap[kept] = np.arange(len(kept))
            cand = cand[kept]
            if d > 0:
                inverse = remap[inverse]
                parent, inverse = parent[inverse >= 0], inverse[inverse >= 0]
        if d > 0:
            pairs, _ = _unique_rows(np.stack([parent, inverse], axis=1))
            indptr = np.searchsorted(pairs[:, 0], np.arange(len(prev) + 1))
            edges.append((indptr, pairs[:, 1]))
        levels.append(cand)
    return levels, edges


def _prune_candidates(cand: np.ndarray, dis_d: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the cheapest candidates of every group count (so every size stays reachable)."""
    counts = cand.max(axis=1).astype(np.int64) + 1
    cost = _row_level_costs(cand, dis_d)
    quota = max(1, limit // int(counts.max()))
    keep = []
    for k in np.unique(counts):
        idx = np.flatnonzero(counts == k)
        keep.append(idx[np.lexsort((idx, cost[idx]))][:quota])
    return np.sort(np.concatenate(keep))


# ====================================================================== strategies


class SearchStrategy:
    """How the DP's node set is chosen. Subclasses: :class:`ExactSearch`, :class:`ScalableSearch`."""

    name = "base"

    def build(self, dis: np.ndarray, sizes: SizeModel, metric: str, budget: float | None) -> _Engine:
        """The DP tables for this problem (``budget`` may prune; ``None`` keeps every size)."""
        raise NotImplementedError

    def trees_considered(self, engine: _Engine, n: int, d: int) -> int:
        raise NotImplementedError


class ExactSearch(SearchStrategy):
    """Every tree: the DP over the whole partition lattice (practical up to about 10 tasks)."""

    name = "exact"

    def build(self, dis: np.ndarray, sizes: SizeModel, metric: str, budget: float | None) -> _Engine:
        num_points, n, _ = dis.shape
        if n > EXACT_MAX_TASKS:
            raise UserError(
                f"exact search supports up to {EXACT_MAX_TASKS} tasks (it holds every partition of the tasks); "
                f"got {n}; use mode 'scalable' or 'auto'"
            )
        cells = _exact_cells(n, num_points)
        if cells > 4 * EXACT_MAX_CELLS:
            raise UserError(
                f"exact search over {n} tasks and {num_points} branch points would need about "
                f"{cells * 8 * 3 / 1e9:.1f} GB; use mode 'scalable' or 'auto'"
            )
        return _LatticeEngine(dis)

    def trees_considered(self, engine: _Engine, n: int, d: int) -> int:
        return count_trees(n, d)


class ScalableSearch(SearchStrategy):
    """Complete-linkage candidates per branch point, made to nest, then the exact DP over them.

    Per branch point, the candidates are the complete-linkage dendrogram of that point's
    dissimilarity cut at every level, plus each cut polished by single-task moves (complete
    linkage is greedy; the polish often lowers ``C_d`` a lot). They nest by intersecting
    every candidate of the previous point with every cut; when a point has more than
    ``max_candidates``, the cheapest ones of every group count are kept.

    Args:
        max_candidates: the most candidate partitions kept per branch point.
        recluster: also refine every parent by complete linkage inside each of its groups,
            cut at one common height (more candidates, slower, rarely better).
        all_edges: link every candidate to every candidate of the next point that refines
            it, not only to those it generated (more trees, slower).
    """

    name = "scalable"

    def __init__(self, max_candidates: int = MAX_CANDIDATES, recluster: bool = False, all_edges: bool = False):
        if max_candidates < 1:
            raise UserError(f"scalable search: max_candidates must be at least 1; got {max_candidates}")
        self.max_candidates = max_candidates
        self.recluster = recluster
        self.all_edges = all_edges

    def build(self, dis: np.ndarray, sizes: SizeModel, metric: str, budget: float | None) -> _Engine:
        levels, edges = _candidates(dis, self.max_candidates, self.recluster)
        return _CandidateEngine(dis, levels, sizes, metric, budget, None if self.all_edges else edges)

    def trees_considered(self, engine: _Engine, n: int, d: int) -> int:
        assert isinstance(engine, _CandidateEngine)
        return engine.chains()


def _strategy(mode: str | SearchStrategy, n: int, d: int, exact_limit: int | float) -> SearchStrategy:
    if isinstance(mode, SearchStrategy):
        return mode
    if mode not in MODES:
        raise UserError(unknown_choice("search mode", str(mode), MODES))
    if mode == "exact":
        return ExactSearch()
    if mode == "scalable":
        return ScalableSearch()
    fits = n <= EXACT_MAX_TASKS and _exact_cells(n, d) <= EXACT_MAX_CELLS
    return ExactSearch() if fits and count_trees(n, d) <= exact_limit else ScalableSearch()


# ====================================================================== read-out


def _best_first(engine: _Engine, sizes: SizeModel, allowed: np.ndarray, top: int) -> list[tuple[float, float, float, tuple[Partition, ...]]]:
    """The ``top`` best trees among the allowed classes, ranked by (cost, params, flops, key).

    Best-first search from the first branch point down. A state's priority is the exact cost
    of its best completion (a DP value) with the class's sizes and the partial key, so states
    pop in final ranking order. ``tau`` is the top-th smallest level-0 value: each level-0
    entry stands for a distinct tree, so no top-ranked tree costs more and anything dearer is
    pruned.
    """
    params, flops = sizes.sizes(engine.class_counts)
    best = engine.class_best
    pool = np.flatnonzero(allowed)
    if len(pool) == 0:
        return []
    if len(pool) > top:
        # A class's best tree is a level-0 entry, so the top-th best class bounds every
        # top-ranked tree; dropping the classes above it keeps massive ties cheap.
        order = pool[np.lexsort((flops[pool], params[pool], best[pool]))]
        c = order[top - 1]
        allowed = allowed & ((best < best[c]) | ((best == best[c]) & (
            (params < params[c]) | ((params == params[c]) & (flops <= flops[c])))))
    tau = engine.kth(allowed, top)
    nodes, classes, values = engine.roots(allowed, tau)
    if len(values) > top:
        # Only entries ranked no lower than the top-th (on cost, params, flops) can matter.
        order = np.lexsort((flops[classes], params[classes], values))
        cut = order[top - 1]
        limit = (values[cut], params[classes[cut]], flops[classes[cut]])
        keep = (values < limit[0]) | ((values == limit[0]) & (
            (params[classes] < limit[1]) | ((params[classes] == limit[1]) & (flops[classes] <= limit[2]))))
        nodes, classes, values = nodes[keep], classes[keep], values[keep]
    heap: list[Any] = []
    tick = itertools.count()
    last = engine.num_points - 1
    for node, cls, value in zip(nodes.tolist(), classes.tolist(), values.tolist(), strict=True):
        counts = tuple(int(c) for c in engine.class_counts[cls])
        key = (engine.partition(0, node),)
        state = (0, node, counts[1:], (engine.level_cost(0, node),))
        heapq.heappush(heap, (value, params[cls], flops[cls], key, next(tick), state))
    found: list[tuple[float, float, float, tuple[Partition, ...]]] = []
    while heap and len(found) < top:
        value, p, f, key, _, (d, node, below, prefix) = heapq.heappop(heap)
        if d == last:
            found.append((value, p, f, key))
            continue
        kids = engine.children(d, node, below[0])
        totals = engine.values(d + 1, kids, below[1:])
        for cost in reversed(prefix):  # the prefix is added outside, as in _fold
            totals = cost + totals
        for kid, total in zip(kids[totals <= tau].tolist(), totals[totals <= tau].tolist(), strict=True):
            state = (d + 1, kid, below[1:], (*prefix, engine.level_cost(d + 1, kid)))
            heapq.heappush(heap, (total, p, f, (*key, engine.partition(d + 1, kid)), next(tick), state))
    return found


def _scored(found: list[tuple[float, float, float, tuple[Partition, ...]]], tasks: tuple[str, ...],
            points: tuple[str, ...]) -> tuple[ScoredTree, ...]:
    return tuple(ScoredTree(Tree(key, tasks=tasks, points=points), float(cost), _num(p), _num(f))
                 for cost, p, f, key in found)


def _front_classes(engine: _Engine, sizes: SizeModel, metric: str) -> list[tuple[float, np.ndarray]]:
    """The Pareto front over classes: (size, allowed mask of the classes that realise it)."""
    params, flops = sizes.sizes(engine.class_counts)
    size = params if metric == "params" else flops
    best = engine.class_best
    order = np.lexsort((flops, params, best, size))
    front = []
    record = np.inf
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and size[order[j]] == size[order[i]]:
            j += 1
        c = order[i]  # the best class of this size
        if best[c] < record:
            record = best[c]
            allowed = (size == size[c]) & (best == best[c]) & (params == params[c]) & (flops == flops[c])
            front.append((float(size[c]), allowed))
        i = j
    return front


# ====================================================================== public search


@dataclass(frozen=True)
class _Problem:
    dis: np.ndarray
    sizes: SizeModel
    tasks: tuple[str, ...]
    points: tuple[str, ...]
    metric: str
    budget: float | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.dis.shape[1], self.dis.shape[0]

    def size_of(self, counts: Sequence[int]) -> int | float:
        return self.sizes.size(counts, self.metric)


def _problem(affinity: Any, block_costs: Any, budget: Any, metric: str, tasks: Sequence[str] | None,
             points: Sequence[str] | None) -> _Problem:
    metric = _check_metric(metric)
    dis = dissimilarity(affinity)
    num_points, n, _ = dis.shape
    tasks = tuple(tasks) if tasks is not None else tuple(f"task{i}" for i in range(n))
    points = tuple(points) if points is not None else tuple(f"point{d}" for d in range(num_points))
    if len(tasks) != n:
        raise UserError(f"search: {len(tasks)} task names for an affinity over {n} tasks")
    if len(points) != num_points:
        raise UserError(f"search: {len(points)} branch point names for an affinity over {num_points} branch points")
    sizes = SizeModel.from_costs(block_costs, num_points=num_points, tasks=tasks)
    largest = _Problem(dis, sizes, tasks, points, metric, None).size_of([n] * num_points)
    limit = None if budget is None or budget == "" else float(parse_budget(budget, reference=largest))
    problem = _Problem(dis, sizes, tasks, points, metric, limit)
    smallest = problem.size_of([1] * num_points)
    if limit is not None and limit < smallest:
        raise BudgetError(
            f"budget {format_count(limit)} {metric} is below the smallest tree (all tasks share every block, "
            f"{smallest:,} {metric}); give a budget of at least {format_count(smallest)} {metric}"
            f" (or {math.ceil(1000 * smallest / largest) / 10:g}% of the all-separate size)"
        )
    return problem


def search(
    affinity: Any,
    block_costs: Any,
    budget: str | int | float | None = None,
    *,
    metric: str = "params",
    mode: str | SearchStrategy = "auto",
    top: int = 1,
    tasks: Sequence[str] | None = None,
    points: Sequence[str] | None = None,
    pareto: bool = False,
    exact_limit: int | float = EXACT_LIMIT,
) -> SearchResult:
    """Find the cheapest-cost tree whose size fits the budget.

    Args:
        affinity: the ``D x N x N`` affinity tensor ``A``.
        block_costs: per-block costs (:class:`branchnas.cost.BlockCosts`, anything with its
            fields, or a length-D list of block sizes); see :meth:`SizeModel.from_costs`.
        budget: the most ``metric`` a tree may have (``"10M"``, ``2.5e6``, ...); ``None`` or
            ``""`` for no limit.
        metric: ``"params"`` or ``"flops"``.
        mode: ``"exact"`` (every tree), ``"scalable"`` (clustering candidates), ``"auto"``
            (exact when :func:`count_trees` is at most ``exact_limit`` and the tables fit), or
            a :class:`SearchStrategy`.
        top: how many of the best trees to return.
        tasks: task names (default ``task0...``).
        points: branch point names (default ``point0...``).
        pareto: also return the Pareto front (the cheapest cost for every budget), from the
            same DP pass.
        exact_limit: see ``mode``.

    Returns:
        A :class:`SearchResult`; ``result.tree`` is the winner. Ties on cost go to fewer
        params, then fewer FLOPs, then the canonical tree order.

    Raises:
        BudgetError: the budget is malformed or below the all-shared tree's size (the message
            gives that minimum).
        UserError: a malformed affinity or block costs, an unknown metric or mode.
    """
    started = time.perf_counter()
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise UserError(f"search: top must be a positive integer; got {top!r}")
    problem = _problem(affinity, block_costs, budget, metric, tasks, points)
    n, num_points = problem.shape
    strategy = _strategy(mode, n, num_points, exact_limit)
    engine = strategy.build(problem.dis, problem.sizes, problem.metric, None if pareto else problem.budget)
    params, flops = problem.sizes.sizes(engine.class_counts)
    size = params if problem.metric == "params" else flops
    allowed = np.ones(len(size), bool) if problem.budget is None else size <= problem.budget
    ranked = _scored(_best_first(engine, problem.sizes, allowed, top), problem.tasks, problem.points)
    front = None
    if pareto:
        front = tuple(
            _scored(_best_first(engine, problem.sizes, mask, 1), problem.tasks, problem.points)[0]
            for _, mask in _front_classes(engine, problem.sizes, problem.metric)
        )
    details: dict[str, Any] = {"tasks": n, "points": num_points, "strategy": strategy.name}
    if isinstance(engine, _CandidateEngine):
        details["candidates_per_point"] = [len(level) for level in engine.levels]
        details["labels"] = engine.label_count
    else:
        details["partitions_per_point"] = len(engine.lat.rgs)  # type: ignore[attr-defined]
    details["count_vectors"] = len(engine.class_counts)
    return SearchResult(
        ranked=ranked,
        metric=problem.metric,
        budget=None if problem.budget is None else _num(problem.budget),
        mode=strategy.name,
        trees_considered=strategy.trees_considered(engine, n, num_points),
        seconds=time.perf_counter() - started,
        min_size=problem.size_of([1] * num_points),
        max_size=problem.size_of([n] * num_points),
        pareto=front,
        details=details,
    )


def pareto_front(
    affinity: Any,
    block_costs: Any,
    *,
    metric: str = "params",
    mode: str | SearchStrategy = "auto",
    tasks: Sequence[str] | None = None,
    points: Sequence[str] | None = None,
    exact_limit: int | float = EXACT_LIMIT,
) -> tuple[ScoredTree, ...]:
    """The cheapest cost at every budget: the non-dominated (size, cost) trees, smallest first.

    Each entry is what :func:`search` returns for a budget equal to its size; it stays the
    answer up to the next entry's size.
    """
    result = search(affinity, block_costs, None, metric=metric, mode=mode, tasks=tasks, points=points,
                    pareto=True, exact_limit=exact_limit)
    assert result.pareto is not None
    return result.pareto


def rank_all_trees(
    affinity: Any,
    block_costs: Any,
    *,
    tasks: Sequence[str] | None = None,
    order_seed: int | None = None,
    limit: int = ENUMERATE_LIMIT,
    max_trees: int | None = None,
) -> list[tuple[float, int | float, int | float, tuple[Partition, ...]]]:
    """Every tree as ``(cost, params, flops, partitions)``, best first: the plain reference.

    Walks every stem-to-sink path of :func:`refinement_dag` and sorts them all by the
    ranking of :func:`search` (cost, params, FLOPs, canonical order), with the same cost
    arithmetic. The answer of :func:`search` for any budget is the first entries that fit.

    Args:
        affinity: as for :func:`search`.
        block_costs: as for :func:`search`.
        tasks: task names (to pick per-task head costs).
        order_seed: see :func:`refinement_dag`.
        limit: refuse problems with more trees than this.
        max_trees: stop after this many paths (a partial ranking, for timing the enumeration).

    Raises:
        UserError: more than ``limit`` trees (and no ``max_trees``).
    """
    dis = dissimilarity(affinity)
    num_points, n, _ = dis.shape
    sizes = SizeModel.from_costs(block_costs, num_points=num_points, tasks=tasks)
    total = count_trees(n, num_points)
    if total > limit and max_trees is None:
        raise UserError(f"enumeration: {total:,} trees exceed the limit of {limit:,}; use search()")
    graph = refinement_dag(n, num_points, order_seed=order_seed)
    level = {node: _level_cost(node[1], dis[node[0]]) for node in graph if node != "stem"}
    chains = list(itertools.islice(_paths(graph, num_points), max_trees))
    # Sizes through SizeModel.sizes, as the DP computes them, so that ties compare alike.
    counts = np.asarray([[len(p) for p in chain] for chain in chains], dtype=np.int64).reshape(-1, num_points)
    params, flops = sizes.sizes(counts)
    scored = [
        (_fold([level[(d, p)] for d, p in enumerate(chain)]), _num(pa), _num(fl), chain)
        for chain, pa, fl in zip(chains, params.tolist(), flops.tolist(), strict=True)
    ]
    scored.sort()
    return scored


def search_enumerate(
    affinity: Any,
    block_costs: Any,
    budget: str | int | float | None = None,
    *,
    metric: str = "params",
    top: int = 1,
    tasks: Sequence[str] | None = None,
    points: Sequence[str] | None = None,
    order_seed: int | None = None,
    limit: int = ENUMERATE_LIMIT,
) -> SearchResult:
    """The reference search: rank every tree (:func:`rank_all_trees`), keep those within the budget.

    Same inputs, ranking and cost arithmetic as :func:`search`; only for small problems.

    Raises:
        BudgetError: as :func:`search`.
        UserError: more than ``limit`` trees.
    """
    started = time.perf_counter()
    problem = _problem(affinity, block_costs, budget, metric, tasks, points)
    n, num_points = problem.shape
    ranked = []
    for cost, params, flops, chain in rank_all_trees(affinity, problem.sizes, tasks=problem.tasks,
                                                     order_seed=order_seed, limit=limit):
        if problem.budget is None or (params if problem.metric == "params" else flops) <= problem.budget:
            ranked.append(ScoredTree(Tree(chain, tasks=problem.tasks, points=problem.points), cost, params, flops))
            if len(ranked) == top:
                break
    return SearchResult(
        ranked=tuple(ranked), metric=problem.metric,
        budget=None if problem.budget is None else _num(problem.budget), mode="enumerate",
        trees_considered=count_trees(n, num_points), seconds=time.perf_counter() - started,
        min_size=problem.size_of([1] * num_points), max_size=problem.size_of([n] * num_points),
        details={"tasks": n, "points": num_points, "strategy": "enumerate"},
    )


def _paths(graph: Any, num_points: int) -> Iterator[tuple[Partition, ...]]:
    """Every stem-to-sink path of the refinement DAG, as the tuple of its partitions."""
    stack: list[tuple[Any, tuple[Partition, ...]]] = [("stem", ())]
    succ = graph.succ
    while stack:
        node, chain = stack.pop()
        if len(chain) == num_points:
            yield chain
            continue
        for nxt in succ[node]:
            stack.append((nxt, (*chain, nxt[1])))


# ====================================================================== presenting results


def _short(tree: Tree, width: int = 70) -> str:
    text = repr(tree)[5:-1]
    return text if len(text) <= width else text[: width - 1] + "…"


def format_pareto(front: Sequence[ScoredTree], metric: str = "params", chosen: ScoredTree | None = None) -> str:
    """The Pareto front as a text table: one row per budget level, cheapest size first.

    Args:
        front: from :func:`pareto_front` or ``SearchResult.pareto``.
        metric: the metric the front is over.
        chosen: mark this entry (the tree picked for the budget) with ``*``.
    """
    other = "flops" if _check_metric(metric) == "params" else "params"
    header = ("", "#", f"{metric} ≤", other, "cost", "groups/point", "tree")
    rows = [
        ("*" if chosen is not None and s.tree == chosen.tree else "", str(i + 1), format_count(s.size(metric)),
         format_count(s.size(other)), f"{s.cost:.4f}", "-".join(map(str, s.tree.groups_per_point())), _short(s.tree))
        for i, s in enumerate(front)
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c in (0, 5, 6) else cell.rjust(w)
                       for c, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_pareto(front: Sequence[ScoredTree], path: str | Path, metric: str = "params",
                chosen: ScoredTree | None = None, budget: float | None = None) -> None:
    """Save the Pareto front (cost against size) as a PNG, written atomically."""
    from matplotlib.figure import Figure

    from branchnas.rundir import atomic_savefig

    _check_metric(metric)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    xs = [float(s.size(metric)) for s in front]
    ys = [s.cost for s in front]
    if xs:
        ax.step(xs + [xs[-1] * 1.05], ys + [ys[-1]], where="post", color="#4c72b0", lw=1.2, zorder=1)
        ax.scatter(xs, ys, color="#4c72b0", zorder=2, label="Pareto-optimal trees")
        for x, y, s in zip(xs, ys, front, strict=True):
            ax.annotate("-".join(map(str, s.tree.groups_per_point())), (x, y), xytext=(4, 4),
                        textcoords="offset points", fontsize=7, color="#555555")
    if chosen is not None:
        ax.scatter([float(chosen.size(metric))], [chosen.cost], s=120, facecolors="none", edgecolors="#c44e52",
                   lw=2, zorder=3, label="chosen tree")
    if budget is not None:
        ax.axvline(float(budget), color="#c44e52", ls="--", lw=1, label=f"budget {format_count(budget)}")
    unit = "parameters" if metric == "params" else "FLOPs (1 multiply-add = 1 flop)"
    ax.set_xlabel(f"tree size: {unit}")
    ax.set_ylabel("task clustering cost (lower is better)")
    ax.set_title("cheapest task clustering for every budget")
    ax.xaxis.set_major_formatter(_count_formatter())
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    atomic_savefig(fig, path)


def _count_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: format_count(x))


def format_result(result: SearchResult) -> str:
    """A few lines for the terminal: what ran, the winner's scores and its tree."""
    budget = "no budget" if result.budget is None else f"budget {format_count(result.budget)} {result.metric}"
    lines = [
        f"{result.mode} search over {result.trees_considered:,} trees in {result.seconds:.2f} s ({budget}; "
        f"sizes range {format_count(result.min_size)}..{format_count(result.max_size)} {result.metric})",
    ]
    for i, s in enumerate(result.ranked):
        lines.append(
            f"#{i + 1}: cost {s.cost:.4f}, {format_count(s.params)} params, {format_count(s.flops)} flops, "
            f"groups per branch point {'-'.join(map(str, s.tree.groups_per_point()))}"
        )
    lines.append(result.tree.render())
    return "\n".join(lines)


# ====================================================================== the stage

STAGE = "search"


def stage_config(recipe: Any, affinity_file: str | Path | None = None) -> dict[str, Any]:
    """What the search depends on: its recipe section, and what the cost model measures."""
    from dataclasses import asdict

    from branchnas.rundir import file_sha256

    config: dict[str, Any] = {
        "search": asdict(recipe.search),
        "backbone": asdict(recipe.backbone),
        "data": {"dataset": recipe.data.dataset, "image_size": recipe.data.image_size,
                 "options": recipe.data.options, "root": recipe.data.root},
        "tasks": [asdict(t) for t in recipe.tasks],
    }
    if affinity_file is not None:
        config["affinity_file"] = {"path": str(affinity_file), "sha256": file_sha256(affinity_file)}
    return config


def read_affinity_file(path: str | Path) -> dict[str, Any]:
    """Read an affinity ``.npz`` as written by the affinity stage (``affinity``, ``tasks``, ``points``).

    Raises:
        UserError: the file is missing or lacks one of those arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--affinity: no file {str(path)!r}; give an affinity .npz written by `branchnas affinity`")
    try:
        with np.load(path) as data:
            missing = [key for key in ("affinity", "tasks") if key not in data]
            if missing:
                raise UserError(
                    f"--affinity {path}: missing array(s) {', '.join(missing)}; expected 'affinity' (D x N x N), "
                    "'tasks' and optionally 'points', as `branchnas affinity` writes them"
                )
            affinity = np.asarray(data["affinity"], dtype=np.float64)
            tasks = [str(t) for t in data["tasks"]]
            points = [str(p) for p in data["points"]] if "points" in data else None
    except (OSError, ValueError) as err:
        raise UserError(f"--affinity {path}: not a readable .npz file ({err})") from None
    return {"affinity": affinity, "tasks": tasks, "points": points}


def _align(affinity: dict[str, Any], tasks: list[str], points: list[str], where: str) -> np.ndarray:
    """Reorder the affinity to the recipe's task order, checking names and branch points."""
    given = affinity["tasks"]
    if sorted(given) != sorted(tasks):
        extra = sorted(set(given) - set(tasks))
        absent = sorted(set(tasks) - set(given))
        raise UserError(
            f"{where}: its tasks ({', '.join(given)}) differ from the recipe's ({', '.join(tasks)})"
            + (f"; not in the recipe: {', '.join(extra)}" if extra else "")
            + (f"; missing: {', '.join(absent)}" if absent else "")
            + "; use the recipe the affinity was computed with"
        )
    matrix = np.asarray(affinity["affinity"], dtype=np.float64)
    if matrix.ndim != 3 or matrix.shape[0] != len(points):
        raise UserError(
            f"{where}: expected affinity at the backbone's {len(points)} branch points ({', '.join(points)}); "
            f"got shape {tuple(matrix.shape)}; check backbone.name and backbone.granularity"
        )
    order = [given.index(t) for t in tasks]
    return matrix[:, order][:, :, order]


def run(recipe: Any, rundir: Any, *, force: bool = False, affinity_file: str | Path | None = None,
        progress: bool = True) -> Any:
    """Stage 3: search the tree for the recipe's budget and write ``search/``.

    Runs the earlier stages first when they are not done, unless ``affinity_file`` gives the
    affinity tensor directly (then nothing is trained).

    Writes ``search/tree.json`` (the ranked trees, :class:`SearchResult` JSON),
    ``search/pareto.json``, ``search/tree.txt``, ``search/tree.png`` and ``search/pareto.png``.
    """
    from branchnas.cost import recipe_costs
    from branchnas.rundir import atomic_write_json, atomic_write_text

    if affinity_file is None:
        from branchnas.pipeline import ensure

        ensure(recipe, rundir, before=STAGE)
    depends = [] if affinity_file is not None else ["affinity"]

    def body(folder: Path) -> dict[str, Any]:
        costs, tasks, points = recipe_costs(recipe)
        if affinity_file is not None:
            matrix = _align(read_affinity_file(affinity_file), tasks, points, f"--affinity {affinity_file}")
        else:
            from branchnas.affinity import load_affinity

            matrix = _align(load_affinity(rundir), tasks, points, "affinity/affinity.npz")
        cfg = recipe.search
        result = search(matrix, costs, cfg.budget or None, metric=cfg.metric, mode=cfg.mode, top=cfg.top,
                        tasks=tasks, points=points, pareto=True, exact_limit=cfg.exact_limit)
        shared = Tree.all_shared(len(tasks), len(points), tasks=tasks, points=points)
        separate = Tree.all_separate(len(tasks), len(points), tasks=tasks, points=points)
        sizes = SizeModel.from_costs(costs, tasks=tasks)
        extremes = {
            name: {"cost": clustering_cost(tree, matrix),
                   "params": sizes.params(tree.groups_per_point()),
                   "flops": sizes.flops(tree.groups_per_point())}
            for name, tree in (("all_shared", shared), ("all_separate", separate))
        }
        data = result.to_json()
        pareto = data.pop("pareto")
        data["extremes"] = extremes
        data["block_costs"] = costs.to_dict()
        atomic_write_json(folder / "tree.json", data)
        atomic_write_json(folder / "pareto.json", {"metric": result.metric, "front": pareto})
        atomic_write_text(folder / "tree.txt", format_result(result) + "\n")
        result.tree.draw(folder / "tree.png", title=f"chosen tree ({format_count(result.best.params)} params)")
        plot_pareto(result.pareto or (), folder / "pareto.png", result.metric, chosen=result.best,
                    budget=result.budget)
        return {"outputs": [f"{STAGE}/{name}" for name in ("tree.json", "pareto.json", "tree.txt",
                                                          "tree.png", "pareto.png")],
                "mode": result.mode, "cost": result.cost}

    config = stage_config(recipe, affinity_file)
    return rundir.run_stage(STAGE, config, depends, body, force=force)


def load_result(rundir: Any) -> tuple[SearchResult, dict[str, Any]]:
    """The stage's :class:`SearchResult` (with its Pareto front) and the extremes it recorded."""
    import json

    folder = Path(rundir.path) / STAGE
    path = folder / "tree.json"
    if not path.exists():
        raise UserError(f"no search result in {folder}; run `branchnas search` first")
    data = json.loads(path.read_text())
    front = json.loads((folder / "pareto.json").read_text())["front"] if (folder / "pareto.json").exists() else None
    extremes = data.pop("extremes", {})
    data.pop("block_costs", None)
    data["pareto"] = front
    return SearchResult.from_json(data), extremes


def format_summary(result: SearchResult, extremes: Mapping[str, Any]) -> str:
    """The chosen tree next to the all-shared and all-separate extremes, for the terminal."""
    rows = [("tree", "params", "flops", "cost")]
    for name, label in (("all_shared", "all shared"), ("all_separate", "all separate")):
        if name in extremes:
            e = extremes[name]
            rows.append((label, format_count(e["params"]), format_count(e["flops"]), f"{e['cost']:.4f}"))
    for i, s in enumerate(result.ranked):
        rows.append((f"chosen #{i + 1}" if len(result.ranked) > 1 else "chosen", format_count(s.params),
                     format_count(s.flops), f"{s.cost:.4f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
