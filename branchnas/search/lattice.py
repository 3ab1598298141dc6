"""The partition lattice: set partitions, refinements, tree counts and the tables built on them.

A tree is a chain of partitions of the tasks, each refining the one before. Here are the
plain forms (:func:`count_trees`, :func:`enumerate_trees`, :func:`refinement_dag`, for
reference and small problems) and the vectorised tables of the exact DP: every partition of
``n`` items as a restricted growth string (RGS), grouped by block count, with the cover
(one-split) relation (:class:`_Lattice`).
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np

from branchnas.errors import UserError
from branchnas.tree import Partition, canonical_partition

__all__ = ["count_trees", "enumerate_trees", "refinement_dag"]

_CHUNK = 2_000_000  # float64 cells per vectorised chunk (~16 MB): bounds the peak memory


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
