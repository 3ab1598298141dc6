"""The scalable search (many tasks): the DP over a candidate DAG, then tree-level improvement.

:mod:`branchnas.search.candidates` builds nested candidate partitions per branch point
(proposals with a low sum of group diameters, made to nest); the same DP as the exact search
then runs exactly over that candidate DAG, with sparse labels (:class:`_CandidateEngine`).

With a budget, the best trees found are then improved across branch points, where the
per-point candidates are weakest (:mod:`branchnas.search.polish`): re-fitting each partition
to its neighbours at the same group counts, trying other candidates in place of one
partition, and moving or swapping single tasks. The partitions of the improved trees join
the DAG and the DP runs again (:meth:`ScalableSearch.build`).
"""

from __future__ import annotations

import math

import numpy as np

from branchnas.cost import BlockCosts
from branchnas.errors import UserError
from branchnas.search._base import SearchStrategy, _Engine
from branchnas.search.candidates import BEAM_WIDTH, CUTS_PER_COUNT, _candidates, _unique_rgs
from branchnas.search.cost import _row_level_costs
from branchnas.search.lattice import _CHUNK, _canonical_rgs, _unique_rows
from branchnas.search.polish import _diameters, _polish_tree, _refit_levels, _tree_value
from branchnas.tree import Partition

__all__ = ["MAX_CANDIDATES", "ScalableSearch"]

#: Candidate partitions kept per branch point in scalable mode (40 tasks x 4 points: ~2 s in all).
MAX_CANDIDATES = 5_000
#: Trees improved per round: the best of that many count vectors within the budget.
SEEDS = 8
#: The most rounds of improvement, each followed by the DP over the grown candidates.
ROUNDS = 3
#: Other candidates (the cheapest with the same group count) tried in place of each partition of a seed.
ALTERNATIVES = 10
#: Variants of a seed that are polished (the cheapest); the others join the DAG as they are.
POLISHED = 8


class _CandidateEngine(_Engine):
    """The same DP over explicit candidate partitions per level, with sparse labels.

    A label is (node, code of the count vector below, best cost); labels whose smallest
    possible tree exceeds the budget are dropped on the way.
    """

    def __init__(self, dis: np.ndarray, levels: list[np.ndarray], sizes: BlockCosts,
                 metric: str, budget: float | None,
                 kids: list[tuple[np.ndarray, np.ndarray]] | None = None,
                 cost: list[np.ndarray] | None = None):
        num_points, n, _ = dis.shape
        self.num_points, self.n = num_points, n
        self.radix = n + 1
        if (n + 1) ** max(1, num_points - 1) >= 2**62:
            raise UserError(f"scalable search supports up to {int(62 / math.log2(n + 1))} branch points for {n} tasks")
        self.levels = levels
        self.counts = [rows.max(axis=1).astype(np.int64) + 1 for rows in levels]
        self.cost = cost if cost is not None else [_row_level_costs(rows, dis[d]) for d, rows in enumerate(levels)]
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


def _variants(seed: np.ndarray, engine: _CandidateEngine, dis: np.ndarray, alternatives: int) -> list[np.ndarray]:
    """Trees with the seed's group counts: the seed re-fitted around each of its partitions, and
    around each of the ``alternatives`` cheapest candidates of the same count in its place."""
    variants = [seed, *_refit_levels(seed, dis)]
    for d in range(len(seed)):
        same = np.flatnonzero(engine.counts[d] == int(seed[d].max()) + 1)
        for row in engine.levels[d][same[np.argsort(engine.cost[d][same], kind="stable")[:alternatives]]]:
            other = seed.copy()
            other[d] = row
            variants.extend(_refit_levels(other, dis, anchors=[d]))
    return list({_canonical_rgs(tree).tobytes(): tree for tree in variants}.values())


def _fits(tree: np.ndarray, fixed: float, block: np.ndarray, budget: float) -> bool:
    """Whether a tree (``D x N`` labels) is within the budget, sized as :meth:`BlockCosts.sizes` does."""
    counts = np.array([len(np.unique(row)) for row in tree], dtype=np.float64)
    return bool(fixed + counts @ block <= budget)


def _best_trees(engine: _CandidateEngine, fixed: float, block: np.ndarray, budget: float,
                count: int) -> list[np.ndarray]:
    """The best tree of each of the ``count`` best count vectors that fit the budget (``D x N`` labels)."""
    node, _, value = engine.labels[0]
    counts = engine.class_counts[engine.root_class]
    fits = np.flatnonzero(fixed + counts.astype(np.float64) @ block <= budget)
    order = fits[np.lexsort((fits, value[fits]))]
    _, first = np.unique(engine.root_class[order], return_index=True)
    trees = []
    for root in order[np.sort(first)][:count].tolist():
        below = engine.class_counts[engine.root_class[root]]
        chain = [int(node[root])]
        for d in range(engine.num_points - 1):
            kids = engine.children(d, chain[-1], int(below[d + 1]))
            totals = engine.values(d + 1, kids, tuple(int(c) for c in below[d + 2:]))
            chain.append(int(kids[np.argmin(totals)]))
        trees.append(np.stack([engine.levels[d][c] for d, c in enumerate(chain)]).astype(np.int64))
    return trees


def _best_value(engine: _CandidateEngine, fixed: float, block: np.ndarray, budget: float) -> float:
    """The cost of the best tree of the DAG that fits the budget (inf if none)."""
    node, _, value = engine.labels[0]
    fits = fixed + engine.class_counts[engine.root_class].astype(np.float64) @ block <= budget
    return float(value[fits].min()) if fits.any() else np.inf


def _with_trees(levels: list[np.ndarray], edges: list[tuple[np.ndarray, np.ndarray]],
                trees: list[np.ndarray], loose: list[np.ndarray]
                ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Add the partitions of some trees to the candidate DAG.

    The new partitions of ``trees`` are linked to every candidate that they refine or that
    refines them; those of ``loose`` (many more, so cheaper to link) only to the other new
    partitions. Existing candidates keep their indices (new ones are appended), so every
    tree of the old DAG is still one of the new DAG, and so is every tree given.
    """
    grown, old, linked_all, where = [], [], [], []
    for d, rows in enumerate(levels):
        given = _canonical_rgs(np.stack([tree[d] for tree in [*trees, *loose]])).astype(rows.dtype)
        rich = np.arange(len(given)) < len(trees)
        known = set(map(bytes, rows))
        fresh = np.array([bytes(row) not in known for row in given], dtype=bool)
        new, inverse = _unique_rgs(given[fresh])
        full = np.zeros(len(new), dtype=bool)
        np.logical_or.at(full, inverse, rich[fresh])
        order = np.argsort(~full, kind="stable")  # the fully linked ones first
        grown.append(np.concatenate([rows, new[order]]))
        old.append(len(rows))
        linked_all.append(int(full.sum()))
        index = {bytes(row): i for i, row in enumerate(grown[-1])}
        where.append(np.array([index[bytes(row)] for row in given]))  # node of every given tree
    linked = []
    for d, (indptr, kids) in enumerate(edges):
        top, low = old[d], old[d + 1]
        rich_top, rich_low = top + linked_all[d], low + linked_all[d + 1]
        # The old edges, and every given tree as a chain.
        parent = [np.repeat(np.arange(top), np.diff(indptr)), where[d]]
        child = [kids, where[d + 1]]
        for (p0, p1), (k0, k1) in [((0, top), (low, rich_low)),  # old parents, fully linked new kids
                                   ((top, rich_top), (0, len(grown[d + 1]))),  # fully linked new parents, every kid
                                   ((rich_top, len(grown[d])), (low, len(grown[d + 1])))]:  # other new, new
            if p1 > p0 and k1 > k0:
                ip, kk = _refinement_edges(grown[d][p0:p1], grown[d + 1][k0:k1])
                parent.append(p0 + np.repeat(np.arange(p1 - p0), np.diff(ip)))
                child.append(k0 + kk)
        pairs, _ = _unique_rows(np.stack([np.concatenate(parent), np.concatenate(child)], axis=1))
        linked.append((np.searchsorted(pairs[:, 0], np.arange(len(grown[d]) + 1)), pairs[:, 1]))
    return grown, linked


class ScalableSearch(SearchStrategy):
    """The exact DP over a DAG of nested clustering candidates, then tree-level improvement.

    Per branch point, the candidates are proposals of partitions with a low sum of group
    diameters, ``cuts_per_count`` per group count: the states of a beam search over merges
    (``beam_width`` states per step), for that point and for every window of consecutive
    points that contains it, and complete-linkage cuts. They nest by intersecting every
    candidate of the previous point with every proposal; the cheapest ``max_candidates``
    per point are kept, spread over the group counts (:mod:`branchnas.search.candidates`).
    The DP then finds the best tree of that DAG for every count vector.

    With a budget, the best tree of each of the ``seeds`` best count vectors within it is
    then improved. Its variants with the same group counts, each partition in turn kept
    (itself, or one of the ``alternatives`` cheapest candidates with its count) and the
    others re-fitted to it (:func:`branchnas.search.polish._refit_levels`), the cheapest
    polished by moving and swapping single tasks (:func:`branchnas.search.polish._polish_tree`),
    join the DAG, and the DP runs again; up to ``rounds`` rounds, each from the seeds not
    yet tried. The result is the best tree of the final DAG (the first DAG if none is
    cheaper). Without a budget (the Pareto front), the first DAG is used as it is.

    Args:
        max_candidates: the most candidate partitions kept per branch point when the DAG is
            built (the improvement then adds the partitions of the trees it makes).
        recluster: also refine every parent by complete linkage inside each of its groups,
            cut at one common height (more candidates, slower, rarely better).
        all_edges: link every candidate to every candidate of the next point that refines
            it, not only to those it generated (more trees, slower).
        beam_width: states kept per step of the beams over merges.
        cuts_per_count: proposals per group count and branch point.
        seeds: trees improved per round (0: no improvement, only the DP over the candidates).
        rounds: the most rounds of improvement.
        alternatives: other candidates tried in place of each partition of a seed.
    """

    name = "scalable"

    def __init__(self, max_candidates: int = MAX_CANDIDATES, recluster: bool = False, all_edges: bool = False,
                 beam_width: int = BEAM_WIDTH, cuts_per_count: int = CUTS_PER_COUNT, seeds: int = SEEDS,
                 rounds: int = ROUNDS, alternatives: int = ALTERNATIVES):
        for name, value, least in [("max_candidates", max_candidates, 1), ("beam_width", beam_width, 1),
                                   ("cuts_per_count", cuts_per_count, 1), ("seeds", seeds, 0),
                                   ("rounds", rounds, 0), ("alternatives", alternatives, 0)]:
            if value < least:
                raise UserError(f"scalable search: {name} must be at least {least}; got {value}")
        self.max_candidates = max_candidates
        self.recluster = recluster
        self.all_edges = all_edges
        self.beam_width = beam_width
        self.cuts_per_count = cuts_per_count
        self.seeds = seeds
        self.rounds = rounds
        self.alternatives = alternatives

    def build(self, dis: np.ndarray, sizes: BlockCosts, metric: str, budget: float | None) -> _Engine:
        levels, edges = _candidates(dis, self.max_candidates, self.recluster, width=self.beam_width,
                                    per_count=self.cuts_per_count)
        if self.all_edges:
            edges = [_refinement_edges(levels[d], levels[d + 1]) for d in range(len(levels) - 1)]
        engine = first = _CandidateEngine(dis, levels, sizes, metric, budget, edges)
        if budget is None:
            return engine
        fixed, block = sizes.affine(metric)
        tried: set[bytes] = set()
        for _ in range(self.rounds if self.seeds else 0):
            polished, loose = [], []
            for seed in _best_trees(engine, fixed, block, budget, self.seeds):
                key = _canonical_rgs(seed).tobytes()
                if key in tried:
                    continue
                tried.add(key)
                variants = _variants(seed, engine, dis, self.alternatives)
                value = [_tree_value(*_diameters(tree, dis)) if _fits(tree, fixed, block, budget) else np.inf
                         for tree in variants]
                order = np.argsort(value, kind="stable").tolist()
                best = [i for i in order[:POLISHED] if np.isfinite(value[i])]  # polish only trees that fit
                polished.extend(_polish_tree(variants[i], dis, fixed, block, budget) for i in best)
                loose.extend(variants[i] for i in order if i not in best)
            if not polished:
                break
            levels, edges = _with_trees(levels, edges, polished, loose)
            cost = [np.concatenate([known, _row_level_costs(rows[len(known):], dis[d])])
                    for d, (known, rows) in enumerate(zip(engine.cost, levels, strict=True))]
            engine = _CandidateEngine(dis, levels, sizes, metric, budget, edges, cost)
        # Keep the grown DAG only if it holds a cheaper tree within the budget.
        return engine if _best_value(engine, fixed, block, budget) < _best_value(first, fixed, block, budget) else first

    def trees_considered(self, engine: _Engine, n: int, d: int) -> int:
        assert isinstance(engine, _CandidateEngine)
        return engine.chains()
