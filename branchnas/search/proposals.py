"""Partitions proposed for one branch point, or for a window of consecutive points, by clustering.

The scalable search needs, at every branch point ``d`` and for every group count ``k``, a few
partitions whose cost ``C_d`` is low; it then makes them nest. For a fixed count, ``C_d`` is
the sum of the group diameters divided by ``k``, so the proposals minimise the *sum of group
diameters*. A tree often keeps a partition over several consecutive points; for such a
window ``[s, e]`` of points a partition costs ``sum_{d=s..e} sum_g diam_d(g)``, and the same
proposals are made for that objective.

Three families, each cheap and deterministic:

* complete-linkage cuts of one point's dissimilarity at every level (complete linkage merges
  by the largest pairwise dissimilarity, the diameter of the merged group), each polished by
  single-task moves (:func:`_improve_cut`);
* a beam search over agglomerative merges for the window objective (:func:`_beam_merges`):
  every step merges two groups, and the ``width`` best distinct states are kept, so every
  count gets up to ``width`` proposals. Greedy linkage fails on this objective in a typical
  way: the best ``k`` groups are often one or two tight groups plus singletons, which
  greedy merging of the closest pair rarely reaches;
* (per point) the union of these, ranked within each count by the window objective.
"""

from __future__ import annotations

import numpy as np

from branchnas.search.cost import _group_max
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


def _beam_merges(stack: np.ndarray, width: int, start: np.ndarray | None = None,
                 within: np.ndarray | None = None, stop: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Beam search over agglomerative merges for ``sum_g sum_w diam_w(g)`` (``stack`` is ``W x N x N``).

    From all singletons, every step merges two groups of every kept state; the ``width``
    distinct states of lowest objective survive. Candidates are ranked by (objective, state,
    pair), so the result is deterministic.

    Returns:
        ``(rows, score)``: every kept state as a restricted growth string (``N`` columns,
        counts ``N`` down to 1, distinct) and its objective.
    """
    num, n, _ = stack.shape
    if start is None:
        labels = np.arange(n)[None, :]
        diam = np.zeros((1, num, n))
        dist = stack[None].copy()
    else:
        labels = _canonical_rgs(np.asarray(start)[None, :]).astype(np.int64)
        # Largest dissimilarity between (or within) atoms: max over member pairs, columns then rows.
        order = np.argsort(labels[0], kind="stable")
        cuts = np.flatnonzero(np.diff(labels[0][order], prepend=-1))
        block = np.maximum.reduceat(stack[:, :, order], cuts, axis=2)
        block = np.maximum.reduceat(block[:, order, :], cuts, axis=1)
        diam = np.diagonal(block, axis1=1, axis2=2)[None].copy()
        dist = block[None]
    score = np.array([diam[0].sum()])
    rows, scores = [labels[0].copy()], [float(score[0])]
    if within is not None:
        # Parent group of every current group (all of its tasks share one).
        owner = np.zeros((1, int(labels.max()) + 1), dtype=np.int64)
        owner[0, labels[0]] = within
    for k in range(int(labels.max()) + 1, max(1, stop), -1):
        iu, ju = np.triu_indices(k, 1)
        da, db = diam[:, :, iu], diam[:, :, ju]
        inc = (np.maximum(np.maximum(da, db), dist[:, :, iu, ju]) - da - db).sum(axis=1)
        if within is not None:
            inc = np.where(owner[:, iu] == owner[:, ju], inc, np.inf)
            if not np.isfinite(inc).any():
                break
        total = (score[:, None] + inc).ravel()
        order = np.argsort(total, kind="stable")
        picked: list[tuple[int, int, int, np.ndarray, float]] = []
        seen: set[bytes] = set()
        for idx in order.tolist():
            if not np.isfinite(total[idx]):
                break
            b, p = divmod(idx, len(iu))
            a, c = int(iu[p]), int(ju[p])
            merged = np.where(labels[b] == c, a, labels[b])
            merged = np.where(merged > c, merged - 1, merged)
            # Group ids stay in the order of their first task, so the labels are canonical.
            key = merged.astype(np.int16).tobytes()
            if key in seen:
                continue
            seen.add(key)
            picked.append((b, a, c, merged, float(total[idx])))
            if len(picked) == width:
                break
        new_labels, new_diam, new_dist, new_score, new_owner = [], [], [], [], []
        keep_all = np.arange(k)
        for b, a, c, merged, value in picked:
            keep = keep_all[keep_all != c]
            dd = diam[b].copy()
            dd[:, a] = np.maximum(np.maximum(dd[:, a], dd[:, c]), dist[b][:, a, c])
            mm = dist[b].copy()
            mm[:, a, :] = np.maximum(mm[:, a, :], mm[:, c, :])
            mm[:, :, a] = mm[:, a, :]
            new_labels.append(merged)
            new_diam.append(dd[:, keep])
            new_dist.append(mm[:, keep][:, :, keep])
            new_score.append(value)
            if within is not None:
                new_owner.append(owner[b][keep])
        labels = np.asarray(new_labels)
        diam, dist, score = np.asarray(new_diam), np.asarray(new_dist), np.asarray(new_score)
        if within is not None:
            owner = np.asarray(new_owner)
        rows.extend(labels)
        scores.extend(score.tolist())
    return np.asarray(rows, dtype=np.int64), np.asarray(scores)

