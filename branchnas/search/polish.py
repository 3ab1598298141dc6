"""Local search over whole trees, for the scalable search: re-fit levels, move and swap tasks.

The candidate DAG of the scalable search holds, per branch point, partitions that are good
for that point (or a window of points) on their own. The best tree often differs from the
DAG's best across points, which no candidate holds. Two kinds of moves fix that:

* :func:`_refit_levels` keeps one partition of a tree and re-fits the others to it, at the
  same group counts: the ones above by greedily coarsening the one below, the ones below by
  greedily refining the one above. This is the lookahead the per-point proposals lack (a
  group that is poor at ``d`` alone but splits well at ``d+1`` is found from ``d+1``).
* :func:`_polish_tree` takes the best of all *task reinsertions* (take one task out of the
  tree, its groups shrink and vanish where it was alone, and put it back where the cost is
  lowest among every place that keeps the partitions nested: sharing the groups of another
  task at points ``0..e-1`` and alone from point ``e`` on) and all *swaps* (two tasks trade
  places; the shape stays), one move at a time. Reinsertion changes group counts, so only
  moves that keep the size within the limit are taken, and only strict improvements.

A tree is held as a ``D x N`` array of group labels (any labels; row ``d`` is ``P_d``).
"""

from __future__ import annotations

import numpy as np

from branchnas.search.proposals import _greedy_merges

__all__: list[str] = []

# A move must lower the cost by more than this (relative) to be taken: float noise must not
# make the search cycle.
_GAIN = 1e-12


def _relabel(labels: np.ndarray) -> np.ndarray:
    """The same tree with labels ``0..N-1`` per point (so that a free label always exists)."""
    return np.stack([np.unique(row, return_inverse=True)[1] for row in labels]).astype(np.int64)


def _diameters(labels: np.ndarray, dis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per point and label: the group's diameter and its size (labels are in ``0..N-1``)."""
    num_points, n = labels.shape
    diam = np.zeros((num_points, n))
    size = np.zeros((num_points, n), dtype=np.int64)
    for d in range(num_points):
        size[d] = np.bincount(labels[d], minlength=n)
        same = labels[d][:, None] == labels[d][None, :]
        np.maximum.at(diam[d], labels[d], np.where(same, dis[d], 0.0).max(axis=1))
    return diam, size


def _tree_value(diam: np.ndarray, size: np.ndarray) -> float:
    """``sum_d (sum of the group diameters) / (number of groups)``."""
    return float((diam.sum(axis=1) / (size > 0).sum(axis=1)).sum())


def _polish_tree(labels: np.ndarray, dis: np.ndarray, fixed: float, block: np.ndarray,
                 limit: float | None, max_moves: int | None = None) -> np.ndarray:
    """Improve a tree by the best task reinsertion or swap, one move at a time, until none helps.

    Args:
        labels: the tree, ``D x N`` group labels, each row refining the one before.
        dis: the ``D x N x N`` dissimilarity.
        fixed: the size of a tree with no blocks (stem and heads); see
            :meth:`branchnas.cost.BlockCosts.affine`.
        block: the size of one copy of each block (``D``).
        limit: the largest size allowed (``None``: any).
        max_moves: stop after this many moves (default ``4 N``).

    Returns:
        The improved tree (labels in ``0..N-1``, not canonical), never costlier than the input,
        and within ``limit`` if the input was.
    """
    num_points, n = labels.shape
    tree = _relabel(labels)
    if n < 2:
        return tree
    limit_ = np.inf if limit is None else float(limit)
    for _ in range(4 * n if max_moves is None else max_moves):
        diam, size = _diameters(tree, dis)
        tables = [_level_tables(tree[d], dis[d]) for d in range(num_points)]
        if not (_reinsert(tree, dis, tables, diam, size, fixed, block, limit_) or _swap(tree, tables, diam, size)):
            break
    return tree


def _level_tables(lab: np.ndarray, dis_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one point: ``far[i, j]``, the farthest task from ``i`` in ``j``'s group other than
    ``j`` (0 if none), and ``rest[i]``, the diameter of ``i``'s group without ``i``.

    ``O(N^2)``: per task and group, the farthest member and the second farthest (for when
    the farthest is ``j`` itself).
    """
    n = len(lab)
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]
    starts = np.flatnonzero(np.diff(sorted_lab, prepend=-1))
    group = np.cumsum(np.diff(sorted_lab, prepend=-1) != 0) - 1  # group index of each sorted column
    cols = dis_d[:, order]
    top = np.maximum.reduceat(cols, starts, axis=1)  # (task, group): farthest member
    position = np.arange(n)
    is_top = cols == top[:, group]
    first_top = n - np.maximum.reduceat(np.where(is_top, n - position, 0), starts, axis=1)  # its column
    second = np.maximum.reduceat(np.where(position == first_top[:, group], 0.0, cols), starts, axis=1)
    where = np.empty(n, dtype=np.int64)
    where[order] = position  # sorted column of every task
    g = group[where]  # group index of every task
    far = np.where(first_top[:, g] == where[None, :], second[:, g], top[:, g])
    mates = (lab[:, None] == lab[None, :]) & ~np.eye(n, dtype=bool)
    rest = np.where(mates, far.T, 0.0).max(axis=1)
    return far, rest


def _reinsert(tree: np.ndarray, dis: np.ndarray, tables: list[tuple[np.ndarray, np.ndarray]], diam: np.ndarray,
              size: np.ndarray, fixed: float, block: np.ndarray, limit: float) -> bool:
    """Apply the best task reinsertion that lowers the cost within the size limit; ``False`` if none does."""
    num_points, n = tree.shape
    counts = (size > 0).sum(axis=1)
    total = diam.sum(axis=1)
    shared = np.empty((num_points, n, n))  # level cost with i in j's group, i taken out first
    alone = np.empty((num_points, n))  # level cost with i alone
    kept = np.empty((num_points, n))  # group count without i
    for d, (far, rest) in enumerate(tables):
        lab = tree[d]
        # Farthest task of j's group from i: the others of it, and j itself.
        near = np.maximum(far, dis[d])
        own = diam[d][lab]
        single = size[d][lab] == 1
        kept[d] = counts[d] - single
        without = total[d] - own + rest  # sum of diameters without i
        grown = np.where(lab[None, :] == lab[:, None], (own - rest)[:, None],
                         np.maximum(own[None, :], near) - own[None, :])
        shared[d] = (without[:, None] + grown) / np.maximum(kept[d], 1)[:, None]
        alone[d] = without / (kept[d] + 1)
    # Option (i, e, j): share j's groups at points < e, alone from e on.
    value = (np.concatenate([np.zeros((1, n, n)), np.cumsum(shared, axis=0)])
             + np.concatenate([np.cumsum(alone[::-1], axis=0)[::-1], np.zeros((1, n))])[:, :, None])
    value[:, np.arange(n), np.arange(n)] = np.inf
    span = fixed + np.concatenate([np.zeros((1, n)), np.cumsum(block[:, None] * kept, axis=0)]) \
        + np.concatenate([np.cumsum((block[:, None] * (kept + 1))[::-1], axis=0)[::-1], np.zeros((1, n))])
    value[span > limit] = np.inf
    current = _tree_value(diam, size)
    e, i, j = np.unravel_index(int(np.argmin(value)), value.shape)
    if not value[e, i, j] < current - _GAIN * max(1.0, abs(current)):
        return False
    for d in range(num_points):
        if d < e:
            tree[d, i] = tree[d, j]
        elif size[d, tree[d, i]] > 1:  # else i is alone already and keeps its label
            tree[d, i] = np.flatnonzero(size[d] == 0)[0]
    return True


def _swap(tree: np.ndarray, tables: list[tuple[np.ndarray, np.ndarray]], diam: np.ndarray,
          size: np.ndarray) -> bool:
    """Exchange the places of the two tasks that lowers the cost most; ``False`` if none does.

    The tree's shape, so its group counts and size, stay the same.
    """
    num_points, n = tree.shape
    delta = np.zeros((n, n))
    for d, (far, rest) in enumerate(tables):
        lab = tree[d]
        grown = np.maximum(rest[:, None], far.T)  # i's group with j in place of i
        own = diam[d][lab]
        change = grown + grown.T - own[:, None] - own[None, :]
        delta += np.where(lab[:, None] == lab[None, :], 0.0, change) / (size[d] > 0).sum()
    i, j = np.unravel_index(int(np.argmin(delta)), delta.shape)
    current = _tree_value(diam, size)
    if not delta[i, j] < -_GAIN * max(1.0, abs(current)):
        return False
    tree[:, [i, j]] = tree[:, [j, i]]
    return True


def _refit_levels(tree: np.ndarray, dis: np.ndarray, anchors: list[int] | None = None) -> list[np.ndarray]:
    """Variants of a tree with the same group counts, each partition re-fitted to its neighbour.

    For every point ``a`` (or those in ``anchors``), ``P_a`` is kept; above it, each ``P_d``
    becomes the greedy coarsening of the new ``P_{d+1}`` to ``|P_d|`` groups, and below it
    the greedy refinement of the new ``P_{d-1}`` (merges inside its groups), both for the sum
    of the diameters at ``d`` (:func:`branchnas.search.proposals._greedy_merges`). This is the
    lookahead that per-point proposals lack: a group that is poor at ``d`` alone but splits
    well at ``d+1`` is found from ``d+1``.
    """
    num_points, _ = tree.shape
    counts = [len(np.unique(row)) for row in tree]
    variants = []
    for anchor in range(num_points) if anchors is None else anchors:
        chain = tree.copy()
        for d in range(anchor - 1, -1, -1):
            chain[d] = _greedy_merges(dis[d], counts[d], start=chain[d + 1])
        for d in range(anchor + 1, num_points):
            chain[d] = _greedy_merges(dis[d], counts[d], within=chain[d - 1])
        variants.append(chain)
    return variants
