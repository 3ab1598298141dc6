"""The scalable search (many tasks): nested clustering candidates per branch point, then the DP over them.

Candidate partitions per branch point come from complete-linkage clustering of that point's
dissimilarity (complete linkage minimises the within-group maximum that the cost uses) at
every cut, each also polished by single-task moves, made to nest by intersecting with every
candidate of the branch point before. The same DP then runs exactly over that candidate DAG,
with sparse labels (:class:`_CandidateEngine`).
"""

from __future__ import annotations

import math

import numpy as np

from branchnas.cost import BlockCosts
from branchnas.errors import UserError
from branchnas.search._base import SearchStrategy, _Engine
from branchnas.search.cost import _group_max, _row_level_costs
from branchnas.search.lattice import _CHUNK, _canonical_rgs, _unique_rows
from branchnas.tree import Partition

__all__ = ["MAX_CANDIDATES", "ScalableSearch"]

#: Candidate partitions kept per branch point in scalable mode (40 tasks x 4 points: ~7 s).
MAX_CANDIDATES = 5_000


class _CandidateEngine(_Engine):
    """The same DP over explicit candidate partitions per level, with sparse labels.

    A label is (node, code of the count vector below, best cost); labels whose smallest
    possible tree exceeds the budget are dropped on the way.
    """

    def __init__(self, dis: np.ndarray, levels: list[np.ndarray], sizes: BlockCosts,
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
        fixed, block = sizes.affine(metric)
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

    def build(self, dis: np.ndarray, sizes: BlockCosts, metric: str, budget: float | None) -> _Engine:
        levels, edges = _candidates(dis, self.max_candidates, self.recluster)
        return _CandidateEngine(dis, levels, sizes, metric, budget, None if self.all_edges else edges)

    def trees_considered(self, engine: _Engine, n: int, d: int) -> int:
        assert isinstance(engine, _CandidateEngine)
        return engine.chains()
