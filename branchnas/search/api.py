"""The public search: :func:`search`, :func:`pareto_front` and the enumeration references.

One DP pass answers every budget. The strategy (exact or scalable) builds the tables, then a
best-first search reads the best trees back in final ranking order: cost, then fewer params,
then fewer FLOPs, then the canonical tree order.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from branchnas.budget import format_size, parse_budget
from branchnas.cost import BlockCosts, as_count
from branchnas.errors import BudgetError, UserError, unknown_choice
from branchnas.search._base import SearchStrategy, _Engine
from branchnas.search.cost import _check_metric, _fold, _level_cost, dissimilarity
from branchnas.search.exact import EXACT_MAX_CELLS, EXACT_MAX_TASKS, ExactSearch, _exact_cells
from branchnas.search.lattice import _paths, count_trees, refinement_dag
from branchnas.search.result import ScoredTree, SearchResult
from branchnas.search.scalable import ScalableSearch, _CandidateEngine
from branchnas.tree import Partition, Tree

__all__ = [
    "EXACT_LIMIT",
    "MODES",
    "ENUMERATE_LIMIT",
    "search",
    "pareto_front",
    "rank_all_trees",
    "search_enumerate",
]

#: ``mode="auto"`` runs the exact search up to this many trees (10 tasks x 4 points: 4.2e9).
EXACT_LIMIT = 5_000_000_000
#: Search modes accepted by :func:`search`.
MODES = ("auto", "exact", "scalable")
#: :func:`search_enumerate` refuses more trees than this (it is the slow reference).
ENUMERATE_LIMIT = 20_000_000


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


def _best_first(engine: _Engine, sizes: BlockCosts, allowed: np.ndarray, top: int) -> list[tuple[float, float, float, tuple[Partition, ...]]]:
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
            points: tuple[str, ...], sizes: BlockCosts | None = None) -> tuple[ScoredTree, ...]:
    return tuple(ScoredTree(Tree(key, tasks=tasks, points=points), float(cost), as_count(p), as_count(f),
                            _latency(sizes, key))
                 for cost, p, f, key in found)


def _latency(sizes: BlockCosts | None, key: Sequence[Partition]) -> float | None:
    """A tree's latency (seconds per image) when the block costs carry a latency table."""
    if sizes is None or not sizes.has_latency:
        return None
    return float(sizes.metric_sizes(np.asarray([[len(p) for p in key]]), "latency")[0])


def _front_classes(engine: _Engine, sizes: BlockCosts, metric: str) -> list[tuple[float, np.ndarray]]:
    """The Pareto front over classes: (size, allowed mask of the classes that realise it)."""
    params, flops = sizes.sizes(engine.class_counts)
    size = sizes.metric_sizes(engine.class_counts, metric)
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


@dataclass(frozen=True)
class _Problem:
    dis: np.ndarray
    sizes: BlockCosts
    tasks: tuple[str, ...]
    points: tuple[str, ...]
    metric: str
    budget: float | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.dis.shape[1], self.dis.shape[0]

    def size_of(self, counts: Sequence[int]) -> int | float:
        # Through BlockCosts.sizes, as the DP computes class sizes, so that the two compare alike.
        return as_count(self.sizes.metric_sizes(np.asarray([counts]), self.metric)[0])


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
    sizes = BlockCosts.coerce(block_costs, num_points=num_points, tasks=tasks)
    largest = _Problem(dis, sizes, tasks, points, metric, None).size_of([n] * num_points)
    limit = None if budget is None or budget == "" else float(parse_budget(budget, reference=largest, metric=metric))
    problem = _Problem(dis, sizes, tasks, points, metric, limit)
    smallest = problem.size_of([1] * num_points)
    if limit is not None and limit < smallest:
        raise BudgetError(
            f"budget {format_size(limit, metric)} {metric} is below the smallest tree (all tasks share every block, "
            f"{smallest:,} {metric}); give a budget of at least {format_size(smallest, metric)} {metric}"
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
            fields, or a length-D list of block sizes); see :meth:`branchnas.cost.BlockCosts.coerce`.
        budget: the most ``metric`` a tree may have (``"10M"``, ``2.5e6``, ...); ``None`` or
            ``""`` for no limit.
        metric: ``"params"``, ``"flops"`` or ``"latency"`` (seconds per image; the block
            costs must carry a latency table, see :meth:`BlockCosts.with_latency`).
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
    size = problem.sizes.metric_sizes(engine.class_counts, problem.metric)
    allowed = np.ones(len(size), bool) if problem.budget is None else size <= problem.budget
    ranked = _scored(_best_first(engine, problem.sizes, allowed, top), problem.tasks, problem.points, problem.sizes)
    front = None
    if pareto:
        front = tuple(
            _scored(_best_first(engine, problem.sizes, mask, 1), problem.tasks, problem.points, problem.sizes)[0]
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
        budget=None if problem.budget is None else as_count(problem.budget),
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
    sizes = BlockCosts.coerce(block_costs, num_points=num_points, tasks=tasks)
    total = count_trees(n, num_points)
    if total > limit and max_trees is None:
        raise UserError(f"enumeration: {total:,} trees exceed the limit of {limit:,}; use search()")
    graph = refinement_dag(n, num_points, order_seed=order_seed)
    level = {node: _level_cost(node[1], dis[node[0]]) for node in graph if node != "stem"}
    chains = list(itertools.islice(_paths(graph, num_points), max_trees))
    # Sizes through BlockCosts.sizes, as the DP computes them, so that ties compare alike.
    counts = np.asarray([[len(p) for p in chain] for chain in chains], dtype=np.int64).reshape(-1, num_points)
    params, flops = sizes.sizes(counts)
    scored = [
        (_fold([level[(d, p)] for d, p in enumerate(chain)]), as_count(pa), as_count(fl), chain)
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
        latency = _latency(problem.sizes, chain)
        size = {"params": params, "flops": flops, "latency": latency}[problem.metric]
        if problem.budget is None or size <= problem.budget:
            ranked.append(ScoredTree(Tree(chain, tasks=problem.tasks, points=problem.points), cost, params, flops,
                                     latency))
            if len(ranked) == top:
                break
    return SearchResult(
        ranked=tuple(ranked), metric=problem.metric,
        budget=None if problem.budget is None else as_count(problem.budget), mode="enumerate",
        trees_considered=count_trees(n, num_points), seconds=time.perf_counter() - started,
        min_size=problem.size_of([1] * num_points), max_size=problem.size_of([n] * num_points),
        details={"tasks": n, "points": num_points, "strategy": "enumerate"},
    )
