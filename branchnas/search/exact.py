"""The exact search: the suffix DP over the whole partition lattice (practical up to about 10 tasks).

``W_d(P)[s] = C_d(P) + min { W_{d+1}(R)[s[1:]] : R refines P, |R| = s[0] }``, one value per
count vector ``s`` of the levels below. "The best over all refinements with ``j`` groups" is
taken through the cover relation of the lattice (one split at a time), never through the
full refinement DAG.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from branchnas.cost import BlockCosts
from branchnas.errors import UserError
from branchnas.search._base import SearchStrategy, _Engine
from branchnas.search.cost import _subset_maxima
from branchnas.search.lattice import _CHUNK, _canonical_rgs, _lattice, _partition_table, count_trees
from branchnas.tree import Partition

__all__ = ["EXACT_MAX_CELLS", "EXACT_MAX_TASKS", "ExactSearch"]

#: Cells (float64) of the exact DP's widest table that auto mode accepts (~200 MB).
EXACT_MAX_CELLS = 25_000_000
#: The exact search holds every partition of the tasks: Bell(11) = 678,570.
EXACT_MAX_TASKS = 11


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


class ExactSearch(SearchStrategy):
    """Every tree: the DP over the whole partition lattice (practical up to about 10 tasks)."""

    name = "exact"

    def build(self, dis: np.ndarray, sizes: BlockCosts, metric: str, budget: float | None) -> _Engine:
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
