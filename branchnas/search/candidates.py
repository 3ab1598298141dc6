"""The candidate DAG of the scalable search: proposals per branch point, made to nest.

Per branch point, the proposals (:func:`_point_cuts`) are partitions with a low sum of group
diameters, from :mod:`branchnas.search.proposals`: the beam over merges for every window of
consecutive points that contains the point, and the complete-linkage cuts. The candidates of
point 0 are its proposals; those of point ``d`` are the intersections of a candidate of
``d-1`` with a proposal of ``d`` (so each refines its parent), the cheapest per group count
(:func:`_nest`). The pairs (parent, intersection) are the DAG's edges.

Scoring every (parent, proposal) pair is the hot spot (5,000 parents x 80 proposals for 40
tasks): :class:`_GroupTables` scores them from per-group tables, and only the kept
intersections are written out.
"""

from __future__ import annotations

import numpy as np

from branchnas.search.cost import _row_level_costs
from branchnas.search.lattice import _CHUNK, _canonical_rgs, _unique_rows
from branchnas.search.proposals import _beam_merges, _linkage_cuts

__all__: list[str] = []

#: States kept per step of the beams over merges (:func:`branchnas.search.proposals._beam_merges`).
BEAM_WIDTH = 8
#: Proposals per group count and branch point that are made to nest.
CUTS_PER_COUNT = 2


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


def _point_cuts(dis: np.ndarray, width: int, per_count: int) -> list[np.ndarray]:
    """The proposals of every branch point, in priority order.

    Per point ``d``, at most ``per_count`` per group count: the states of the beam over
    merges (:func:`branchnas.search.proposals._beam_merges`) of every window that contains
    ``d``, taken in turn by their rank within the count (so that every window gets its best
    proposal in before any gets its second best), and the complete-linkage cut of ``d``
    after the windows' second best.
    """
    num_points, n, _ = dis.shape
    beams = {w: _beam_merges(dis[w[0]:w[1] + 1], width) for w in _windows(num_points)}
    pools = []
    for d in range(num_points):
        cuts = _canonical_rgs(_linkage_cuts(dis[d])[0]).astype(np.int64)
        parts = [(cuts, np.full(len(cuts), 1.5))]
        for (s, e), (found, score) in beams.items():
            if s <= d <= e:
                parts.append((found, _ranked(found, score)))
        pools.append(_merge_ranked(parts, per_count))
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
    intersection costs ``O(groups)`` to score instead of ``O(N^2)``. The same goes for a
    label-free 64-bit key of the intersection (the wrapping sum, over its groups, of a mix
    of the sum of its tasks' random keys): it finds the pairs that make the same partition
    without writing them out; only the kept intersections are.

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
    # A proposal that refines the parent is the intersection itself; those are always kept,
    # so that the proposals of a window survive as they are at each of its points.
    whole = (parts.reshape(-1, ncuts) == cuts.max(axis=1) + 1).ravel()
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
    first = (cand[:, :, None] == cand[:, None, :]).argmax(axis=2)[child]  # first task of each task's group
    ok = (np.take_along_axis(prev[parent], first, axis=1) == prev[parent]).all(axis=1)
    cand, again = _unique_rgs(cand)
    return cand, parent[ok], again[child[ok]]


def _candidates(dis: np.ndarray, max_candidates: int, recluster: bool = False, *,
                width: int = BEAM_WIDTH, per_count: int = CUTS_PER_COUNT,
                ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Nested candidate partitions per branch point for the scalable search.

    The proposals of every point (:func:`_point_cuts`, ``width`` and ``per_count`` as there)
    are made to nest by intersecting each with every candidate of the point before
    (:func:`_nest`); at most ``max_candidates`` per point are kept, the cheapest of every
    group count. With ``recluster``, every candidate is also refined by complete linkage
    inside each of its groups (:func:`_recluster_within`).

    Returns the candidates per branch point and, between consecutive points, the CSR lists of
    the pairs (parent, refinement) that generated them.
    """
    num_points, n, _ = dis.shape
    point_cuts = _point_cuts(dis, width, per_count)
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
