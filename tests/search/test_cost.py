"""The paper's clustering cost and the dissimilarity it uses (branchnas.search.cost)."""

from __future__ import annotations

import numpy as np
import pytest

from branchnas.errors import UserError
from branchnas.search import (
    clustering_cost,
    level_costs,
    search,
)
from branchnas.tree import Tree


def hand_affinity():
    a = np.ones((2, 4, 4))
    upper = {
        0: {(0, 1): 0.75, (0, 2): 0.5, (1, 2): 0.25, (0, 3): -0.5, (1, 3): 0.0, (2, 3): 0.5},
        1: {(0, 1): 0.5, (0, 2): 0.0, (1, 2): -0.25, (0, 3): -1.0, (1, 3): 0.25, (2, 3): 0.0},
    }
    for d, pairs in upper.items():
        for (i, j), v in pairs.items():
            a[d, i, j] = a[d, j, i] = v
    return a


def test_clustering_cost_matches_a_hand_computed_case():
    tree = Tree([[[0, 1, 2], [3]], [[0, 1], [2], [3]]])
    # point 0: groups {0,1,2} (max 1 - A = 1 - 0.25 = 0.75) and {3} (0): mean 0.375
    # point 1: groups {0,1} (1 - 0.5 = 0.5), {2}, {3}: mean 0.5 / 3
    assert level_costs(tree, hand_affinity()) == pytest.approx([0.375, 0.5 / 3], abs=1e-15)
    assert clustering_cost(tree, hand_affinity()) == pytest.approx(0.375 + 0.5 / 3, abs=1e-15)
    assert clustering_cost(Tree.all_separate(4, 2), hand_affinity()) == 0.0
    # all shared: point 0 max is 1 - (-0.5) = 1.5; point 1 max is 1 - (-1) = 2
    assert clustering_cost(Tree.all_shared(4, 2), hand_affinity()) == 3.5


def test_tiny_asymmetry_is_averaged_away():
    skewed = hand_affinity()
    skewed[0, 0, 1] += 1e-7
    skewed[0, 1, 0] -= 1e-7
    tree = Tree([[[0, 1], [2, 3]], [[0, 1], [2], [3]]])
    assert clustering_cost(tree, skewed) == clustering_cost(tree, hand_affinity())


def test_clustering_cost_checks_the_tree_against_the_affinity():
    with pytest.raises(UserError, match="3 tasks and 2 branch points"):
        clustering_cost(Tree.all_shared(3, 2), hand_affinity())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a[0], "D x N x N"),
        (lambda a: np.where(np.eye(4, dtype=bool), a, np.triu(a)), "symmetric"),
        (lambda a: a * 3, r"\[-1, 1\]"),
        (lambda a: np.where(np.arange(4)[None, :, None] == 1, np.nan, a), "re-run the affinity stage"),
    ],
)
def test_malformed_affinity_raises_a_user_error(change, message):
    with pytest.raises(UserError, match=message):
        search(change(hand_affinity()), [1, 1])
