"""Local search over whole trees: re-fitting levels, moving and swapping tasks (branchnas.search.polish)."""

from __future__ import annotations

import numpy as np

from branchnas.search import clustering_cost, dissimilarity
from branchnas.search.polish import _diameters, _polish_tree, _refit_levels, _tree_value
from branchnas.tree import Tree


def _tree(labels):
    return Tree([[np.flatnonzero(row == g).tolist() for g in np.unique(row)] for row in labels])


def _random_tree(rng, n, d):
    """A random nested tree as ``D x N`` labels (each point splits some groups of the last)."""
    labels = np.zeros((d, n), dtype=np.int64)
    row = rng.integers(0, max(1, n // 2), n)
    for level in range(d):
        row = row * 2 + (rng.random(n) < 0.3)
        labels[level] = np.unique(row, return_inverse=True)[1]
    return labels


def test_polish_never_raises_the_cost_keeps_the_tree_valid_and_within_the_limit(random_affinity):
    rng = np.random.default_rng(5)
    improved = 0
    for _ in range(60):
        n, d = int(rng.integers(2, 11)), int(rng.integers(1, 5))
        affinity = random_affinity(rng, n, d)
        dis = dissimilarity(affinity)
        labels = _random_tree(rng, n, d)
        block = rng.integers(1, 20, d).astype(float)
        size = 3.0 + _tree(labels).groups_per_point() @ block
        limit = size + float(rng.integers(0, 40))
        before = clustering_cost(_tree(labels), affinity)
        polished = _polish_tree(labels, dis, 3.0, block, limit)
        tree = _tree(polished)  # raises if a partition does not refine the one before
        after = clustering_cost(tree, affinity)
        assert after <= before
        assert 3.0 + np.array(tree.groups_per_point()) @ block <= limit
        assert np.isclose(_tree_value(*_diameters(polished, dis)), after)
        improved += after < before
    assert improved > 10


def test_polish_swaps_tasks_when_no_single_move_fits_the_budget():
    # Two groups of three at one point, each with one misplaced task (2 and 5, far apart):
    # moving either into the other group makes it worse, alone it adds a group over the
    # limit; swapping them fixes both groups.
    dis = np.ones((1, 6, 6))
    for group in ([0, 1, 5], [3, 4, 2]):
        dis[0][np.ix_(group, group)] = 0.1
    dis[0][2, 5] = dis[0][5, 2] = 2.0
    dis[0][range(6), range(6)] = 0.0
    labels = np.array([[0, 0, 0, 1, 1, 1]])
    polished = _polish_tree(labels, dis, 0.0, np.array([1.0]), 2.0)
    assert _tree(polished) == Tree([[[0, 1, 5], [2, 3, 4]]])


def test_refit_keeps_group_counts_and_nesting_and_the_anchor(random_affinity):
    rng = np.random.default_rng(6)
    for _ in range(30):
        n, d = int(rng.integers(3, 12)), int(rng.integers(2, 5))
        dis = dissimilarity(random_affinity(rng, n, d))
        labels = _random_tree(rng, n, d)
        counts = _tree(labels).groups_per_point()
        variants = _refit_levels(labels, dis)
        assert len(variants) == d
        for anchor, variant in enumerate(variants):
            tree = _tree(variant)  # valid nesting
            assert tree.groups_per_point() == counts
            assert tree.partitions[anchor] == _tree(labels).partitions[anchor]
