"""The paper's task clustering cost: the dissimilarity, each branch point's ``C_d`` and their sum.

``C = sum_d C_d``, ``C_d`` = mean over the groups ``g`` of ``P_d`` of ``max_{i,j in g} (1 - A[d, i, j])``
(0 for a singleton group). Besides the plain per-tree form (:func:`level_costs`,
:func:`clustering_cost`), this module holds the vectorised tables the DP engines use
(:func:`_subset_maxima`, :func:`_row_level_costs`). They reproduce exactly the operations of
:func:`_level_cost`, and every sum over levels is folded as :func:`_fold` does, so that equal
trees tie exactly whichever code path scored them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from branchnas.budget import METRICS
from branchnas.errors import UserError, unknown_choice
from branchnas.search.lattice import _CHUNK
from branchnas.tree import Partition, Tree

__all__ = ["dissimilarity", "level_costs", "clustering_cost"]

_SYMMETRY_TOL = 1e-6


def dissimilarity(affinity: Any) -> np.ndarray:
    """The ``D x N x N`` dissimilarity ``1 - A`` used by the cost, validated and symmetrised.

    Args:
        affinity: the affinity tensor ``A`` (branch points x tasks x tasks), Spearman
            correlations in [-1, 1].

    Returns:
        ``float64`` array with zero diagonal, symmetric, entries in [0, 2].

    Raises:
        UserError: wrong shape, a non-finite entry, an asymmetric matrix or a value outside
            [-1, 1].
    """
    a = np.asarray(affinity, dtype=np.float64)
    if a.ndim != 3 or a.shape[1] != a.shape[2] or 0 in a.shape:
        raise UserError(
            f"affinity: expected a D x N x N tensor (branch points x tasks x tasks); got shape {tuple(a.shape)}"
        )
    bad = np.argwhere(~np.isfinite(a))
    if len(bad):
        d, i, j = bad[0]
        raise UserError(f"affinity[{d}, {i}, {j}] is {a[d, i, j]}; re-run the affinity stage (a task's features may be constant)")
    gap = np.abs(a - a.transpose(0, 2, 1))
    if gap.max() > _SYMMETRY_TOL:
        d, i, j = np.unravel_index(int(gap.argmax()), gap.shape)
        raise UserError(
            f"affinity: expected symmetric matrices; affinity[{d}, {i}, {j}] = {a[d, i, j]:.6g} but "
            f"affinity[{d}, {j}, {i}] = {a[d, j, i]:.6g}"
        )
    if a.min() < -1 - _SYMMETRY_TOL or a.max() > 1 + _SYMMETRY_TOL:
        where = np.unravel_index(int(np.abs(a).argmax()), a.shape)
        raise UserError(f"affinity: expected correlations in [-1, 1]; affinity{list(map(int, where))} = {a[where]:.6g}")
    # Averaging is exact for an exactly symmetric input, so hand-made tensors keep their values.
    a = np.clip((a + a.transpose(0, 2, 1)) / 2, -1.0, 1.0)
    dis = 1.0 - a
    idx = np.arange(a.shape[1])
    dis[:, idx, idx] = 0.0
    return dis


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise UserError(unknown_choice("metric", metric, METRICS))
    return metric


def _group_max(group: Sequence[int], dis_d: np.ndarray) -> float:
    """The largest dissimilarity inside a group (0 for a singleton)."""
    if len(group) < 2:
        return 0.0
    return float(dis_d[np.ix_(group, group)].max())


def _level_cost(partition: Partition, dis_d: np.ndarray) -> float:
    """``C_d``: the mean over the groups of their largest dissimilarity.

    The vectorised tables of the DP reproduce exactly these operations (sum of the group
    maxima in canonical group order, then one division), so that ties stay exact.
    """
    total = 0.0
    for group in partition:
        total += _group_max(group, dis_d)
    return total / len(partition)


def _fold(costs: Sequence[float]) -> float:
    """``C_0 + (C_1 + (... + C_{D-1}))``: the summation order that the suffix DP uses."""
    total = 0.0
    for cost in reversed(costs):
        total = cost + total
    return total


def _check_tree(tree: Tree, dis: np.ndarray) -> None:
    if dis.shape[0] != tree.num_points or dis.shape[1] != tree.num_tasks:
        raise UserError(
            f"tree has {tree.num_tasks} tasks and {tree.num_points} branch points but the affinity is "
            f"{dis.shape[0]} x {dis.shape[1]} x {dis.shape[2]} (points x tasks x tasks)"
        )


def level_costs(tree: Tree, affinity: Any) -> list[float]:
    """The per-branch-point clustering costs ``C_d`` of a tree (their sum is the cost)."""
    dis = dissimilarity(affinity)
    _check_tree(tree, dis)
    return [_level_cost(p, dis[d]) for d, p in enumerate(tree.partitions)]


def clustering_cost(tree: Tree, affinity: Any) -> float:
    """The paper's task clustering cost of a tree.

    ``C = sum_d C_d`` with ``C_d`` the mean, over the groups of ``P_d``, of the largest
    dissimilarity ``1 - A[d, i, j]`` between two tasks of the group (0 for a singleton).

    Example:
        >>> a = np.ones((1, 3, 3)); a[0, 0, 2] = a[0, 2, 0] = 0.5
        >>> clustering_cost(Tree([[[0, 1, 2]]]), a), clustering_cost(Tree([[[0, 1], [2]]]), a)
        (0.5, 0.0)
    """
    return _fold(level_costs(tree, affinity))


def _subset_maxima(dis_d: np.ndarray) -> np.ndarray:
    """``m[mask]``: the largest dissimilarity inside every subset of the tasks (bit i = task i)."""
    n = len(dis_d)
    m = np.zeros(1 << n)
    for h in range(1, n):
        low = np.arange(1 << h)
        members = ((low[:, None] >> np.arange(h)) & 1).astype(bool)
        to_h = np.where(members, dis_d[h, :h][None, :], 0.0).max(axis=1)
        m[(1 << h) + low] = np.maximum(m[low], to_h)
    return m


def _row_level_costs(rgs: np.ndarray, dis_d: np.ndarray) -> np.ndarray:
    """``C_d`` for every row of a partition table (same operations as :func:`_level_cost`)."""
    rows, n = rgs.shape
    counts = rgs.max(axis=1).astype(np.int64) + 1
    out = np.empty(rows)
    step = max(1, _CHUNK // max(1, n * n))
    for lo in range(0, rows, step):
        lab = rgs[lo:lo + step].astype(np.int64)
        same = lab[:, :, None] == lab[:, None, :]
        rowmax = np.where(same, dis_d[None], 0.0).max(axis=2)
        total = np.zeros(len(lab))
        for g in range(n):
            total = total + np.where(lab == g, rowmax, 0.0).max(axis=1)
        out[lo:lo + step] = total / counts[lo:lo + step]
    return out
