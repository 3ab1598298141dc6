"""Partitions proposed for one branch point, or for a window of consecutive points, by merging.

The scalable search needs, at every branch point ``d`` and for every group count ``k``, a few
partitions whose cost ``C_d`` is low. For a fixed count, ``C_d`` is the sum of the group
diameters divided by ``k``, so the proposals minimise the *sum of group diameters*; for a
window ``[s, e]`` of points over which a tree keeps one partition, the sum over the window.

* :func:`_beam_merges`: a beam search over agglomerative merges for that objective. Every
  step merges two groups of every kept state, and the ``width`` best distinct states
  survive, so every count gets up to ``width`` proposals. Greedy linkage fails here in a
  typical way: the best ``k`` groups are often one or two tight groups plus singletons,
  which merging the closest pair first rarely reaches; a beam of a few states does.
* :func:`_greedy_merges`: the same with width 1, for one point, much faster, which can also
  start from a partition (coarsening it) or merge only inside the groups of another
  (refining it); the tree-level refit of :mod:`branchnas.search.polish` uses it.
* :func:`_linkage_cuts`: complete-linkage cuts (complete linkage merges by the largest
  pairwise dissimilarity, the diameter of the merged group).
"""

from __future__ import annotations

import numpy as np

from branchnas.search.lattice import _canonical_rgs

__all__: list[str] = []


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


def _beam_merges(stack: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Beam search over agglomerative merges for ``sum_g sum_w diam_w(g)`` (``stack`` is ``W x N x N``).

    From all singletons, every step merges two groups of every kept state; the ``width``
    distinct states of lowest objective survive. Candidates are ranked by (objective, state,
    pair), so the result is deterministic.

    Returns:
        ``(rows, score)``: every kept state as a restricted growth string (``N`` columns,
        counts ``N`` down to 1, distinct) and its objective.
    """
    num, n, _ = stack.shape
    labels = np.arange(n)[None, :]
    diam = np.zeros((1, num, n))  # per state, window point and group
    dist = stack[None].copy()  # largest dissimilarity between two groups
    score = np.zeros(1)
    rows, scores = [labels[0].copy()], [0.0]
    for k in range(n, 1, -1):
        iu, ju = np.triu_indices(k, 1)
        da, db = diam[:, :, iu], diam[:, :, ju]
        total = (score[:, None] + (np.maximum(np.maximum(da, db), dist[:, :, iu, ju]) - da - db).sum(axis=1)).ravel()
        picked: list[tuple[int, int, int, np.ndarray, float]] = []
        seen: set[bytes] = set()
        for idx in np.argsort(total, kind="stable").tolist():
            b, p = divmod(idx, len(iu))
            a, c = int(iu[p]), int(ju[p])
            merged = np.where(labels[b] == c, a, labels[b])
            merged = np.where(merged > c, merged - 1, merged)
            # Groups stay numbered in the order of their first task, so the labels are canonical.
            key = merged.astype(np.int16).tobytes()
            if key in seen:
                continue
            seen.add(key)
            picked.append((b, a, c, merged, float(total[idx])))
            if len(picked) == width:
                break
        keep_all = np.arange(k)
        new_diam, new_dist = [], []
        for b, a, c, _, _ in picked:
            keep = keep_all[keep_all != c]
            dd = diam[b].copy()
            dd[:, a] = np.maximum(np.maximum(dd[:, a], dd[:, c]), dist[b][:, a, c])
            mm = dist[b].copy()
            mm[:, a, :] = np.maximum(mm[:, a, :], mm[:, c, :])
            mm[:, :, a] = mm[:, a, :]
            new_diam.append(dd[:, keep])
            new_dist.append(mm[:, keep][:, :, keep])
        labels = np.asarray([merged for _, _, _, merged, _ in picked])
        diam, dist = np.asarray(new_diam), np.asarray(new_dist)
        score = np.asarray([value for *_, value in picked])
        rows.extend(labels)
        scores.extend(score.tolist())
    return np.asarray(rows, dtype=np.int64), np.asarray(scores)


def _greedy_merges(dis_d: np.ndarray, stop: int, start: np.ndarray | None = None,
                   within: np.ndarray | None = None) -> np.ndarray:
    """Greedy merging for one point's sum of group diameters (:func:`_beam_merges` with width 1).

    From the groups of ``start`` (default: all singletons), merges the pair of groups that
    adds the least to the sum of diameters, with the beam's tie-break, until ``stop`` groups
    are left or no pair may merge (with ``within``, only groups inside one group of it may).
    Keeps the pair costs up to date instead of recomputing them: ``O(N^2)`` per merge.

    Returns:
        The partition reached, as a restricted growth string.
    """
    n = len(dis_d)
    labels = np.arange(n) if start is None else _canonical_rgs(np.asarray(start)[None, :])[0].astype(np.int64)
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order], prepend=-1))
    block = np.maximum.reduceat(np.maximum.reduceat(dis_d[:, order], cuts, axis=1)[order], cuts, axis=0)
    atoms = len(cuts)
    diam = np.diagonal(block).copy()
    dist = block.copy()
    allowed = ~np.eye(atoms, dtype=bool)
    if within is not None:
        owner = np.zeros(atoms, dtype=np.int64)
        owner[labels] = within
        allowed &= owner[:, None] == owner[None, :]
    cost = np.where(allowed, np.maximum(np.maximum(diam[:, None], diam[None, :]), dist)
                    - diam[:, None] - diam[None, :], np.inf)
    for _ in range(atoms - max(1, stop)):
        a, c = divmod(int(np.argmin(cost)), atoms)  # row-major: a < c, as the beam's pair order
        if not np.isfinite(cost[a, c]):
            break
        diam[a] = max(diam[a], diam[c], dist[a, c])
        dist[a] = np.maximum(dist[a], dist[c])
        dist[:, a] = dist[a]
        labels[labels == c] = a
        allowed[c] = False
        allowed[:, c] = False
        cost[c] = np.inf
        cost[:, c] = np.inf
        cost[a] = np.where(allowed[a], np.maximum(np.maximum(diam[a], diam), dist[a]) - diam[a] - diam, np.inf)
        cost[:, a] = cost[a]
    return _canonical_rgs(labels[None, :])[0].astype(np.int64)
