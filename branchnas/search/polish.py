"""Local search over whole trees, for the scalable search: move one task at a time.

The candidate DAG of the scalable search holds, per branch point, partitions that are good
for that point (or a window of points) on their own. The best tree often differs from the
DAG's best by a few tasks placed differently, at one or several points at once, which no
candidate holds. :func:`_polish_tree` fixes that by *task reinsertion*: take one task out of
the tree (its groups shrink, and vanish where it was alone) and put it back where the tree
cost is lowest, among every place that keeps the partitions nested: sharing the groups of
another task at points ``0..e-1`` and alone from point ``e`` on, for every task and every
``e`` (``e = 0``: alone everywhere). Group counts, and so the size, change with the move;
only moves that keep the size within the limit are taken, and only strict improvements, so
the search stops.

A tree is held as a ``D x N`` array of group labels (any labels; row ``d`` is ``P_d``).
"""

from __future__ import annotations

import numpy as np

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
                 limit: float | None, max_sweeps: int = 50) -> np.ndarray:
    """Improve a tree by task reinsertion until no move helps (or ``max_sweeps`` passes).

    Args:
        labels: the tree, ``D x N`` group labels, each row refining the one before.
        dis: the ``D x N x N`` dissimilarity.
        fixed: the size of a tree with no blocks (stem and heads); see
            :meth:`branchnas.cost.BlockCosts.affine`.
        block: the size of one copy of each block (``D``).
        limit: the largest size allowed (``None``: any).

    Returns:
        The improved tree (labels in ``0..N-1``, not canonical), never costlier than the input,
        and within ``limit`` if the input was.
    """
    num_points, n = labels.shape
    tree = _relabel(labels)
    if n < 2:
        return tree
    diam, size = _diameters(tree, dis)
    limit_ = np.inf if limit is None else float(limit)
    tasks = np.arange(n)
    for _ in range(max_sweeps):
        moved = False
        for i in range(n):
            own = tree[:, i]
            others = tasks[tasks != i]
            # The tree without task i: its groups shrink, and vanish where it was alone.
            rest_diam = diam.copy()
            counts = (size > 0).sum(axis=1)
            for d in range(num_points):
                g = own[d]
                if size[d, g] == 1:
                    rest_diam[d, g] = 0.0
                    counts[d] -= 1
                else:
                    mates = others[tree[d, others] == g]
                    rest_diam[d, g] = dis[d][np.ix_(mates, mates)].max() if len(mates) > 1 else 0.0
            total = rest_diam.sum(axis=1)
            # Sharing the group of task j at point d: that group's diameter grows to reach i.
            grown = np.empty((num_points, n - 1))
            for d in range(num_points):
                reach = np.zeros(n)
                np.maximum.at(reach, tree[d, others], dis[d][i, others])
                g = tree[d, others]
                grown[d] = np.maximum(rest_diam[d, g], reach[g]) - rest_diam[d, g]
            shared = (total[:, None] + grown) / np.maximum(counts, 1)[:, None]
            alone = total / (counts + 1)
            # Option (e, j): share with j at points < e, alone from e on.
            value = (np.concatenate([np.zeros((1, n - 1)), np.cumsum(shared, axis=0)])
                     + np.concatenate([np.cumsum(alone[::-1])[::-1], [0.0]])[:, None])
            span = fixed + np.concatenate([[0.0], np.cumsum(block * counts)]) \
                + np.concatenate([np.cumsum((block * (counts + 1))[::-1])[::-1], [0.0]])
            value[span > limit_] = np.inf
            current = _tree_value(diam, size)
            e, j = np.unravel_index(int(np.argmin(value)), value.shape)
            if not value[e, j] < current - _GAIN * max(1.0, abs(current)):
                continue
            mate = others[j]
            for d in range(num_points):
                g = own[d]
                size[d, g] -= 1
                diam[d, g] = rest_diam[d, g]
                if d < e:
                    h = tree[d, mate]
                    mates = others[tree[d, others] == h]
                    diam[d, h] = max(rest_diam[d, h], float(dis[d][i, mates].max()))
                    tree[d, i] = h
                    size[d, h] += 1
                else:
                    free = int(np.flatnonzero(size[d] == 0)[0])
                    tree[d, i] = free
                    size[d, free] = 1
                    diam[d, free] = 0.0
            moved = True
        if not moved:
            break
    return tree
