"""The scalable search: clustering candidates, polishing and the DP over them (branchnas.search.scalable)."""

from __future__ import annotations

import numpy as np
import pytest

from branchnas.cost import BlockCosts
from branchnas.search import (
    ScalableSearch,
    clustering_cost,
    search,
)
from branchnas.tree import Tree


def planted(rng, partitions, n, noise):
    """Affinity that makes the nested ``partitions`` cheap: small dissimilarity inside groups only."""
    d = len(partitions)
    a = np.empty((d, n, n))
    for level, groups in enumerate(partitions):
        label = np.empty(n, int)
        for g, members in enumerate(groups):
            label[members] = g
        same = label[:, None] == label[None, :]
        dis = np.where(same, rng.uniform(0, noise, (n, n)), rng.uniform(0.7, 1.0, (n, n)))
        dis = (dis + dis.T) / 2
        np.fill_diagonal(dis, 0)
        a[level] = 1 - dis
    return a


def test_scalable_search_finds_a_planted_tree_that_exact_search_confirms():
    rng = np.random.default_rng(8)
    layout = [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1], [2, 3], [4, 5, 6, 7]], [[0, 1], [2], [3], [4, 5], [6, 7]]]
    affinity = planted(rng, layout, 8, noise=0.1)
    blocks = [100, 200, 400]
    tree = Tree(layout)
    budget = BlockCosts.coerce(blocks).size(tree.groups_per_point(), "params")
    assert search(affinity, blocks, budget, mode="exact").tree == tree
    assert search(affinity, blocks, budget, mode="scalable").tree == tree


def test_scalable_search_recovers_a_planted_tree_over_many_tasks():
    rng = np.random.default_rng(9)
    n = 30
    order = rng.permutation(n)
    coarse = [order[:10].tolist(), order[10:20].tolist(), order[20:].tolist()]
    fine = [order[:5].tolist(), order[5:10].tolist(), order[10:20].tolist(), order[20:24].tolist(), order[24:].tolist()]
    layout = [coarse, fine, fine]
    affinity = planted(rng, layout, n, noise=0.0)  # zero inside groups: the planted tree is the only cost-0 tree that fits
    blocks = [10, 20, 40]
    tree = Tree(layout)
    budget = BlockCosts.coerce(blocks).size(tree.groups_per_point(), "params")
    result = search(affinity, blocks, budget, mode="auto")
    assert result.mode == "scalable" and result.tree == tree and result.cost == 0.0


@pytest.mark.parametrize("options", [{}, {"recluster": True}, {"all_edges": True}, {"max_candidates": 8}])
def test_scalable_search_is_never_better_than_exact_and_reports_true_costs(options, random_affinity):
    rng = np.random.default_rng(len(options) + 17)
    for n, d in [(6, 3), (7, 4), (8, 2)]:
        affinity = random_affinity(rng, n, d)
        blocks = rng.integers(1, 20, d).tolist()
        lo, hi = sum(blocks), n * sum(blocks)
        for budget in (lo, (lo + hi) // 3, (lo + hi) // 2, hi):
            exact = search(affinity, blocks, budget, mode="exact")
            scal = search(affinity, blocks, budget, mode=ScalableSearch(**options))
            assert scal.mode == "scalable"
            assert scal.cost >= exact.cost
            assert scal.cost == clustering_cost(scal.tree, affinity) and scal.best.params <= budget
        assert search(affinity, blocks, hi, mode=ScalableSearch(**options)).cost == 0.0  # all separate fits


def test_scalable_search_polishes_greedy_complete_linkage_cuts():
    # On this instance the best 2- and 3-group splits are no complete-linkage cut; single-task
    # moves find them (without the polish the scalable cost is 2.77 instead of 1.50).
    rng = np.random.default_rng(2)
    a = rng.uniform(-1, 1, (2, 7, 7))
    a = (a + a.transpose(0, 2, 1)) / 2
    a[:, range(7), range(7)] = 1
    exact = search(a, [3, 5], 16, mode="exact")
    assert exact.cost == pytest.approx(1.5043, abs=1e-4)
    assert search(a, [3, 5], 16, mode="scalable").cost == exact.cost


def test_scalable_dp_is_exact_over_its_candidate_dag(random_affinity, canon):
    # The restricted search must return the best chain of its own candidate DAG.
    from branchnas.search import _candidates, dissimilarity

    rng = np.random.default_rng(21)
    affinity = random_affinity(rng, 7, 3, ties=True)
    dis = dissimilarity(affinity)
    levels, edges = _candidates(dis, 5000)

    def labels_to_partition(row):
        return canon([[i for i in range(len(row)) if row[i] == g] for g in range(row.max() + 1)])

    chains = [(p,) for p in range(len(levels[0]))]
    for indptr, kids in edges:
        chains = [(*c, int(k)) for c in chains for k in kids[indptr[c[-1]]:indptr[c[-1] + 1]]]
    blocks = [5, 7, 9]
    for budget in (21, 60, 100, 147):
        best = None
        for chain in chains:
            tree = Tree([labels_to_partition(levels[d][node]) for d, node in enumerate(chain)])
            size = sum(len(p) * b for p, b in zip(tree.partitions, blocks, strict=True))
            if size <= budget:
                key = (clustering_cost(tree, affinity), size, size, tree.key())
                best = key if best is None or key < best else best
        got = search(affinity, blocks, budget, mode="scalable")
        assert (got.cost, got.best.params, got.best.flops, got.tree.key()) == best
        assert got.trees_considered == len(chains)
