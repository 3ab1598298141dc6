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
from branchnas.search.cost import _row_level_costs
from branchnas.search.lattice import _CHUNK, _canonical_rgs, _unique_rows
from branchnas.search.polish import _diameters, _polish_tree, _refit_levels, _tree_value
from branchnas.search.proposals import _beam_merges, _linkage_cuts
from branchnas.tree import Partition

__all__ = ["MAX_CANDIDATES", "ScalableSearch"]

#: Candidate partitions kept per branch point in scalable mode (40 tasks x 4 points: ~7 s).
MAX_CANDIDATES = 5_000
#: States kept per step of the beam over merges (:func:`branchnas.search.proposals._beam_merges`).
BEAM_WIDTH = 5
#: Proposals per group count and branch point that are made to nest.
CUTS_PER_COUNT = 3
#: Trees improved per round (the best of that many count vectors within the budget).
SEEDS = 5
#: The most rounds of polish, each followed by the DP over the grown candidates.
ROUNDS = 3
COARSEN = 0
TOP_FACTOR = 1
ANCHORS = 0
REFIT_WIDTH = 5
POLISH_TOP = 1000
KEEP_WHOLE = True
TOP_ONLY_MAX_D = 99
KEEP_C = 1
CW = 5


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


def _pack_rgs(rows: np.ndarray) -> np.ndarray:
    """Restricted growth strings packed into int64 words, most significant first (same order)."""
    count, n = rows.shape
    bits = max(1, (n - 1).bit_length())
    per = 63 // bits
    words = -(-n // per)
    padded = np.zeros((count, words * per), dtype=np.int64)
    padded[:, :n] = rows
    weights = np.int64(1) << (bits * np.arange(per - 1, -1, -1, dtype=np.int64))
    return padded.reshape(count, words, per) @ weights


def _unique_rgs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_unique_rows` for restricted growth strings, sorting a few packed words instead of N columns."""
    if len(rows) == 0:
        return rows, np.zeros(0, np.int64)
    keys = _pack_rgs(rows)
    order = np.lexsort(keys.T[::-1])
    ordered = keys[order]
    new = np.ones(len(rows), dtype=bool)
    new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    inverse = np.empty(len(rows), dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return rows[order[new]], inverse


def _windows(num_points: int) -> list[tuple[int, int]]:
    """The windows ``[s, e]`` of consecutive branch points that get their own proposals.

    All of them up to 4 points long, and every suffix: a tree usually keeps a partition
    over a few consecutive points, and very often down to the last one.
    """
    return [(s, e) for s in range(num_points) for e in range(s, num_points)
            if e - s < 4 or e == num_points - 1]


def _ranked(found: np.ndarray, value: np.ndarray) -> np.ndarray:
    """The rank of every row among the rows of its group count, by ``value`` (then order)."""
    counts = found.max(axis=1)
    order = np.lexsort((np.arange(len(found)), value, counts))
    rank = np.empty(len(found))
    rank[order] = np.arange(len(found)) - np.searchsorted(counts[order], counts[order])
    return rank


def _merge_ranked(parts: list[tuple[np.ndarray, np.ndarray]], per_count: int) -> np.ndarray:
    """Distinct rows taken by rank (ties: in the order of ``parts``), at most ``per_count`` per group count.

    Returns them in that priority order.
    """
    rows = np.concatenate([r for r, _ in parts])
    rank = np.concatenate([k for _, k in parts])
    order = np.argsort(rank, kind="stable")
    distinct, inverse = _unique_rgs(rows[order])
    first = np.full(len(distinct), len(order))
    np.minimum.at(first, inverse, np.arange(len(order)))
    distinct = distinct[np.argsort(first)]
    counts = distinct.max(axis=1)
    by_count = np.argsort(counts, kind="stable")
    within = np.arange(len(distinct)) - np.searchsorted(counts[by_count], counts[by_count])
    return distinct[np.sort(by_count[within < per_count])]


def _point_cuts(dis: np.ndarray, width: int, per_count: int, coarsen: int = 0) -> list[np.ndarray]:
    """The proposals of every branch point, in priority order.

    Per point ``d``, at most ``per_count`` per group count: the beam states of every window
    that contains ``d`` (:func:`_beam_merges`), taken in turn by their rank within the count
    (so every window gets its best proposal in before any gets its second best), and the
    complete-linkage cut of ``d``.

    Then, with ``coarsen``, lookahead: the best tree often shares a group at ``d`` that is
    no good at ``d`` alone but splits well at ``d+1``. So, from the last point up, the first
    ``coarsen`` proposals of every count at ``d+1`` are coarsened for ``d`` (a beam over
    merges of their groups), and the coarsenings ranked by ``C_d`` plus the ``C_{d+1}`` of
    what they coarsen join the proposals of ``d`` (``coarsen`` more per count).
    """
    num_points, n, _ = dis.shape
    beams = {w: _beam_merges(dis[w[0]:w[1] + 1], width) for w in _windows(num_points)}
    pools = []
    for d in range(num_points):
        cuts = _canonical_rgs(_linkage_cuts(dis[d])[0]).astype(np.int64)
        parts = [(cuts, np.full(len(cuts), 1.5))]  # after the windows' second best
        for (s, e), (found, score) in beams.items():
            if s <= d <= e:
                parts.append((found, _ranked(found, score)))
        pools.append(_merge_ranked(parts, per_count * (TOP_FACTOR if d == 0 else 1)))
    for d in range(num_points - 2, -1, -1) if coarsen else ():
        if d > TOP_ONLY_MAX_D:
            continue
        finer = pools[d + 1]
        seeds = finer[_ranked(finer, np.zeros(len(finer))) < coarsen]  # pools are in priority order
        below = _row_level_costs(seeds, dis[d + 1])
        found, value = [], []
        for seed, cost in zip(seeds, below.tolist(), strict=True):
            rows, score = _beam_merges(dis[d:d + 1], CW, seed)
            found.append(rows[1:])
            value.append(score[1:] / (rows[1:].max(axis=1) + 1) + cost)
        if found:
            found_all = np.concatenate(found)
            coarse = _merge_ranked([(found_all, _ranked(found_all, np.concatenate(value)))], KEEP_C)
            pools[d] = _merge_ranked([(pools[d], np.zeros(len(pools[d]))), (coarse, np.ones(len(coarse)))],
                                     per_count + KEEP_C)
    return pools


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (MurmurHash3's): spreads the bits of a sum of task keys."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


class _GroupTables:
    """How every cut splits every distinct group of the previous point's candidates.

    An intersection ``Q & C`` has the groups ``q & c`` (``q`` in ``Q``, ``c`` in ``C``); its
    sum of group diameters is ``sum_q (sum of the diameters of C's parts of q)``, and the
    candidates of a point share most of their groups. So the parts of each distinct group
    under each cut are worked out once (``O(cuts * |q|^2)`` per group), and then every
    intersection costs ``O(groups)`` to score, instead of ``O(N^2)``; only the kept ones
    are written out. The same goes for a
    label-free 64-bit key of the intersection (the wrapping sum, over its groups, of a mix
    of the sum of its tasks' random keys), which finds the pairs that make the same
    partition without writing them all out.

    Attributes:
        slots: ``(P, K)``, the distinct-group ids of every previous candidate's groups
            (padded to the largest count ``K`` with an empty group's id).
        diam: ``(G + 1, C)``, sum of the diameters of the parts of each group under each cut.
        parts: ``(G + 1, C)``, their number.
        key: ``(G + 1, C)``, the key of the parts.
    """

    def __init__(self, prev: np.ndarray, cuts: np.ndarray, dis_d: np.ndarray):
        count, n = prev.shape
        ncuts = len(cuts)
        labels = prev.astype(np.int64)
        k = labels.max(axis=1) + 1
        owner = np.repeat(np.arange(count), k)
        slot = np.arange(len(owner)) - np.repeat(np.cumsum(k) - k, k)
        masks = np.packbits(labels[owner] == slot[:, None], axis=1)
        _, first, gid = np.unique(masks, axis=0, return_index=True, return_inverse=True)
        groups = len(first)
        members = [np.flatnonzero(labels[owner[f]] == slot[f]) for f in first.tolist()]
        self.slots = np.full((count, int(k.max())), groups, dtype=np.int64)
        self.slots[owner, slot] = gid.ravel()
        self.size = np.array([len(m) for m in members] + [0])
        task_key = np.random.default_rng(0x5EED).integers(0, 2**63, n, dtype=np.uint64)
        dis32 = dis_d.astype(np.float32)
        self.diam = np.zeros((groups + 1, ncuts))
        self.parts = np.zeros((groups + 1, ncuts), dtype=np.int64)
        self.key = np.zeros((groups + 1, ncuts), dtype=np.uint64)
        for s in np.unique(self.size[:-1]).tolist():
            ids = np.flatnonzero(self.size[:-1] == s)
            items = np.stack([members[g] for g in ids.tolist()])  # (G, s)
            step = max(1, _CHUNK // max(1, ncuts * s * s))
            for lo in range(0, len(ids), step):
                gs, it = ids[lo:lo + step], items[lo:lo + step]
                lab = np.moveaxis(cuts[:, it], 0, 1)  # (G, C, s)
                same = lab[..., :, None] == lab[..., None, :]
                head = same.argmax(axis=-1)  # local index of the first task of each task's part
                flat = (np.arange(head.size).reshape(head.shape) - np.arange(s) + head).ravel()
                sums = np.zeros(head.size, dtype=np.uint64)
                np.add.at(sums, flat, np.broadcast_to(task_key[it][:, None, :], head.shape).ravel())
                is_head = (head == np.arange(s)).ravel()
                self.key[gs] = np.where(is_head, _mix(sums), np.uint64(0)).reshape(head.shape).sum(
                    axis=-1, dtype=np.uint64)
                self.parts[gs] = is_head.reshape(head.shape).sum(axis=-1)
                if s > 1:
                    # Float32 is plenty to rank candidates; the DP recomputes exact costs.
                    sub = dis32[it[:, :, None], it[:, None, :]][:, None]  # (G, 1, s, s)
                    reach = np.where(same, sub, np.float32(0)).max(axis=-1)  # farthest part-mate
                    width = np.zeros(head.size, dtype=np.float32)
                    np.maximum.at(width, flat, reach.ravel())  # part diameter, at its head
                    self.diam[gs] = width.reshape(head.shape).sum(axis=-1, dtype=np.float64)

    def scores(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sum of group diameters, group count and key of every intersection, ``(P, C)`` each."""
        total = np.zeros((len(self.slots), self.diam.shape[1]))
        parts = np.zeros(total.shape, dtype=np.int64)
        key = np.zeros(total.shape, dtype=np.uint64)
        for j in range(self.slots.shape[1]):
            total += self.diam[self.slots[:, j]]
            parts += self.parts[self.slots[:, j]]
            key += self.key[self.slots[:, j]]
        return total, parts, key


def _nest(prev: np.ndarray, cuts: np.ndarray, dis_d: np.ndarray, limit: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cheapest intersections of a candidate of the previous point with a cut.

    Every (candidate, cut) pair is scored (:class:`_GroupTables`); per group count, the
    ``limit // (largest count)`` distinct cheapest intersections are kept (as
    :func:`_prune_candidates` does), with every pair that makes one of them.

    Returns the kept intersections (sorted) and, for every (parent, intersection) pair
    made, the parent index and the intersection index.
    """
    tables = _GroupTables(prev, cuts, dis_d)
    total, parts, key = tables.scores()
    cost, parts, key = (total / parts).ravel(), parts.ravel(), key.ravel()
    quota = max(1, limit // int(parts.max()))
    ncuts = len(cuts)
    # A cut that refines the parent is the intersection itself; those are always kept, so
    # that chains of proposals (a coarsening above what it coarsens) survive.
    whole = (parts.reshape(-1, ncuts) == cuts.max(axis=1) + 1).ravel() if KEEP_WHOLE else np.zeros(len(parts), bool)
    # Rows grouped by intersection (count, key), cheapest first within each group.
    order = np.lexsort((np.arange(len(cost)), cost, key, parts))
    start = np.ones(len(order), dtype=bool)
    start[1:] = (parts[order][1:] != parts[order][:-1]) | (key[order][1:] != key[order][:-1])
    group = np.empty(len(order), dtype=np.int64)
    group[order] = np.cumsum(start) - 1
    head = order[start]  # the cheapest row of every distinct intersection
    # Distinct intersections by (count, cost); keep the first ``quota`` of every count.
    ranked = np.lexsort((key[head], cost[head], parts[head]))
    counts = parts[head][ranked]
    rank = np.empty(len(head), dtype=np.int64)
    rank[ranked] = np.arange(len(head)) - np.searchsorted(counts, counts)
    keep = (rank < quota) | (np.bincount(group, weights=whole, minlength=len(head)) > 0)
    index = np.cumsum(keep) - 1
    best = head[keep]
    pairs = np.flatnonzero(keep[group])  # every pair that makes a kept intersection
    n = prev.shape[1]
    cand = _canonical_rgs(prev[best // ncuts].astype(np.int64) * (2 * n) + cuts[best % ncuts]).astype(np.int64)
    child = index[group[pairs]]
    parent = pairs // ncuts
    # A key collision could pair a parent with a partition that does not refine it: check.
    head = (cand[:, :, None] == cand[:, None, :]).argmax(axis=2)[child]
    ok = (np.take_along_axis(prev[parent], head, axis=1) == prev[parent]).all(axis=1)
    cand, again = _unique_rgs(cand)
    return cand, parent[ok], again[child[ok]]


def _candidates(dis: np.ndarray, max_candidates: int, recluster: bool = False, *,
                width: int | None = None, per_count: int | None = None,
                ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Nested candidate partitions per branch point for the scalable search.

    The proposals of every point (:func:`_point_cuts`) are made to nest by intersecting each
    with every candidate of the point before; at most ``max_candidates`` per point are kept,
    the cheapest of every group count.

    Returns the candidates per branch point and, between consecutive points, the CSR lists of
    the pairs (parent, refinement) that generated them.
    """
    num_points, n, _ = dis.shape
    point_cuts = _point_cuts(dis, width or BEAM_WIDTH, per_count or CUTS_PER_COUNT, COARSEN)
    levels: list[np.ndarray] = []
    edges: list[tuple[np.ndarray, np.ndarray]] = []
    for d in range(num_points):
        cuts = point_cuts[d]
        if d == 0:
            cand, _ = _unique_rgs(cuts)
        else:
            prev = levels[-1]
            cand, parent, inverse = _nest(prev, cuts, dis[d], max_candidates)
            if recluster:
                more, whose = _recluster_within(prev.astype(np.int64), dis[d])
                cand, again = _unique_rgs(np.concatenate([cand, _canonical_rgs(more).astype(np.int64)]))
                parent = np.concatenate([parent, whose])
                inverse = np.concatenate([again[:len(again) - len(more)][inverse], again[len(again) - len(more):]])
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


def _fits(tree: np.ndarray, fixed: float, block: np.ndarray, budget: float) -> bool:
    counts = np.array([len(np.unique(row)) for row in tree], dtype=np.float64)
    return bool(fixed + counts @ block <= budget)


def _best_value(engine: _CandidateEngine, fixed: float, block: np.ndarray, budget: float) -> float:
    """The cost of the best tree of the DAG that fits the budget (inf if none)."""
    node, _, value = engine.labels[0]
    fits = fixed + engine.class_counts[engine.root_class].astype(np.float64) @ block <= budget
    return float(value[fits].min()) if fits.any() else np.inf


def _with_trees(levels: list[np.ndarray], edges: list[tuple[np.ndarray, np.ndarray]],
                trees: list[np.ndarray], loose: list[np.ndarray] = ()
                ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Add the partitions of some trees to the candidates.

    The partitions of ``trees`` are linked to every candidate that they refine or that
    refines them; those of ``loose`` (many more, so cheaper to link) only to the other new
    partitions. Existing candidates keep their indices (new ones are appended), so every
    tree of the old DAG is still one of the new DAG.
    """
    grown, start, rich = [], [], []
    for d, rows in enumerate(levels):
        new = np.concatenate([_canonical_rgs(np.stack([t[d] for t in group])).astype(rows.dtype)
                              for group in (trees, loose) if len(group)])
        known = set(map(bytes, rows))
        fresh = np.array([bytes(r) not in known for r in new], dtype=bool)
        first = np.concatenate([np.ones(len(trees), dtype=bool), np.zeros(len(loose), dtype=bool)])
        new, inverse = _unique_rgs(new[fresh])
        linked_all = np.zeros(len(new), dtype=bool)
        np.logical_or.at(linked_all, inverse, first[fresh])
        order = np.argsort(~linked_all, kind="stable")  # fully linked ones first
        grown.append(np.concatenate([rows, new[order]]))
        start.append(len(rows))
        rich.append(int(linked_all.sum()))
    linked = []
    for d, (indptr, kids) in enumerate(edges):
        old_p, old_k = start[d], start[d + 1]
        parent = [np.repeat(np.arange(old_p), np.diff(indptr))]
        child = [kids]
        if rich[d + 1]:  # old parents -> fully linked new kids
            ip, kk = _refinement_edges(levels[d], grown[d + 1][old_k:old_k + rich[d + 1]])
            parent.append(np.repeat(np.arange(old_p), np.diff(ip)))
            child.append(kk + old_k)
        if rich[d]:  # fully linked new parents -> every kid
            ip, kk = _refinement_edges(grown[d][old_p:old_p + rich[d]], grown[d + 1])
            parent.append(np.repeat(np.arange(old_p, old_p + rich[d]), np.diff(ip)))
            child.append(kk)
        if len(grown[d]) > old_p + rich[d] and len(grown[d + 1]) > old_k:  # other new parents -> new kids
            ip, kk = _refinement_edges(grown[d][old_p + rich[d]:], grown[d + 1][old_k:])
            parent.append(np.repeat(np.arange(old_p + rich[d], len(grown[d])), np.diff(ip)))
            child.append(kk + old_k)
        pairs, _ = _unique_rows(np.stack([np.concatenate(parent), np.concatenate(child)], axis=1))
        linked.append((np.searchsorted(pairs[:, 0], np.arange(len(grown[d]) + 1)), pairs[:, 1]))
    return grown, linked


class ScalableSearch(SearchStrategy):
    """Clustering candidates per branch point, made to nest, the exact DP over them, then tree polish.

    Per branch point, the candidates are proposals of partitions with a low sum of group
    diameters (:func:`_point_cuts`): a beam search over merges, for that point and for every
    window of consecutive points that contains it, and complete-linkage cuts, at most
    ``cuts_per_count`` per group count. They nest by intersecting every candidate of the
    previous point with every proposal; when a point would have more than ``max_candidates``,
    the cheapest ones of every group count are kept (:func:`_nest`). The DP then finds the
    best tree of that candidate DAG for every count vector.

    With a budget, the trees are then improved where the DAG is weakest, across branch
    points: the best tree of each of the ``seeds`` best count vectors that fit is re-fitted
    level by level (:func:`branchnas.search.polish._refit_levels`) and every variant is
    polished by task reinsertion and swaps (:func:`branchnas.search.polish._polish_tree`).
    Their partitions join the candidates (linked to every candidate they refine or that
    refines them) and the DP runs again, up to ``rounds`` times, while the best tree within
    the budget gets cheaper. The result is the best tree of the final DAG. Without a budget
    (the Pareto front) the first DAG is used as it is.

    Args:
        max_candidates: the most candidate partitions kept per branch point.
        recluster: also refine every parent by complete linkage inside each of its groups,
            cut at one common height (more candidates, slower, rarely better).
        all_edges: link every candidate to every candidate of the next point that refines
            it, not only to those it generated (more trees, slower).
        beam_width: states kept per step of the beams over merges.
        cuts_per_count: proposals per group count and branch point.
        seeds: trees improved per round (0: none).
        rounds: the most rounds of improvement.
    """

    name = "scalable"

    def __init__(self, max_candidates: int = MAX_CANDIDATES, recluster: bool = False, all_edges: bool = False,
                 beam_width: int = BEAM_WIDTH, cuts_per_count: int = CUTS_PER_COUNT, seeds: int = SEEDS,
                 rounds: int = ROUNDS):
        for name, value, least in [("max_candidates", max_candidates, 1), ("beam_width", beam_width, 1),
                                   ("cuts_per_count", cuts_per_count, 1), ("seeds", seeds, 0), ("rounds", rounds, 0)]:
            if value < least:
                raise UserError(f"scalable search: {name} must be at least {least}; got {value}")
        self.max_candidates = max_candidates
        self.recluster = recluster
        self.all_edges = all_edges
        self.beam_width = beam_width
        self.cuts_per_count = cuts_per_count
        self.seeds = seeds
        self.rounds = rounds

    def build(self, dis: np.ndarray, sizes: BlockCosts, metric: str, budget: float | None) -> _Engine:
        levels, edges = _candidates(dis, self.max_candidates, self.recluster, width=self.beam_width,
                                    per_count=self.cuts_per_count)
        if self.all_edges:
            edges = [_refinement_edges(levels[d], levels[d + 1]) for d in range(len(levels) - 1)]
        engine = _CandidateEngine(dis, levels, sizes, metric, budget, edges)
        if budget is None or self.seeds == 0:
            return engine
        fixed, block = sizes.affine(metric)
        first = engine
        tried: set[bytes] = set()
        for _ in range(self.rounds):
            found, loose = [], []
            for seed in _best_trees(engine, fixed, block, budget, self.seeds):
                key = _canonical_rgs(seed).tobytes()
                if key in tried:
                    continue
                tried.add(key)
                variants = [seed, *_refit_levels(seed, dis, REFIT_WIDTH)]
                for a in range(len(levels)) if ANCHORS else ():
                    k = int(seed[a].max()) + 1
                    rows = levels[a][engine.counts[a] == k]
                    cheap = rows[np.argsort(engine.cost[a][engine.counts[a] == k], kind="stable")[:ANCHORS]]
                    for row in cheap:
                        other = seed.copy()
                        other[a] = row
                        variants.extend(_refit_levels(other, dis, REFIT_WIDTH, anchors=[a]))
                variants = list({_canonical_rgs(t).tobytes(): t for t in variants}.values())
                value = [_tree_value(*_diameters(t, dis)) if _fits(t, fixed, block, budget) else np.inf for t in variants]
                order = np.argsort(value, kind="stable")
                found.extend(_polish_tree(variants[i], dis, fixed, block, budget) for i in order[:POLISH_TOP])
                loose.extend(variants[i] for i in order[POLISH_TOP:])
            if not found:
                break
            levels, edges = _with_trees(levels, edges, found, loose)
            cost = [np.concatenate([c, _row_level_costs(rows[len(c):], dis[d])])
                    for d, (c, rows) in enumerate(zip(engine.cost, levels, strict=True))]
            engine = _CandidateEngine(dis, levels, sizes, metric, budget, edges, cost)
        # The grown DAG only if it holds a cheaper tree within the budget.
        return engine if _best_value(engine, fixed, block, budget) < _best_value(first, fixed, block, budget) else first

    def trees_considered(self, engine: _Engine, n: int, d: int) -> int:
        assert isinstance(engine, _CandidateEngine)
        return engine.chains()
