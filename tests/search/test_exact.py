"""The exact DP against plain enumeration: same trees, same ranking, same ties (branchnas.search.exact)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from branchnas.errors import BudgetError
from branchnas.search import (
    clustering_cost,
    count_trees,
    rank_all_trees,
    search,
    search_enumerate,
)
from branchnas.tree import Tree


def instances():
    """(n, d, instances): a few hundred (instance, budget) cases, every n in 2..6 and d in 1..4."""
    for n in range(2, 7):
        for d in range(1, 5):
            trees = count_trees(n, d)
            yield n, d, 6 if trees <= 5000 else (2 if trees <= 20000 else 1)


def test_exact_dp_equals_plain_enumeration_on_random_instances_incl_ties_and_budgets(random_affinity, block_costs_like):
    rng = np.random.default_rng(2024)
    cases = 0
    for n, d, count in instances():
        for k in range(count):
            ties = k % 2 == 0
            affinity = random_affinity(rng, n, d, ties=ties)
            if k % 3 == 0:  # equal blocks: many count vectors tie on size as well
                costs = SimpleNamespace(block_params=[50] * d, block_flops=[7] * d, stem_params=3)
            else:
                costs = block_costs_like(d, n, rng)
            metric = ("params", "flops")[k % 2]
            ranked = rank_all_trees(affinity, costs)
            sizes = [(params if metric == "params" else flops) for _, params, flops, _ in ranked]
            lo, hi = min(sizes), max(sizes)
            budgets = [lo - 1, lo, *rng.integers(lo, hi + 1, 3).tolist(), hi, None]
            for i, budget in enumerate(budgets):
                top = 1 if i % 2 else 3
                if budget is not None and budget < lo:
                    with pytest.raises(BudgetError):
                        search(affinity, costs, budget, metric=metric, mode="exact")
                    continue
                got = search(affinity, costs, budget, metric=metric, mode="exact", top=top)
                want = [r for r, s in zip(ranked, sizes, strict=True) if budget is None or s <= budget][:top]
                assert [(s.cost, s.params, s.flops, s.tree.partitions) for s in got.ranked] == want, (n, d, k, budget)
                assert got.trees_considered == count_trees(n, d) and got.mode == "exact"
                cases += 1
    assert cases >= 500


def test_exact_search_is_stable_across_calls_input_types_and_dag_insertion_order(random_affinity):
    rng = np.random.default_rng(5)
    affinity = random_affinity(rng, 5, 3, ties=True)
    costs = [10, 10, 10]
    first = search(affinity, costs, 90, mode="exact", top=4)
    assert search(affinity.tolist(), costs, "90", mode="exact", top=4).ranked == first.ranked
    shuffled = [search_enumerate(affinity, costs, 90, top=4, order_seed=seed).ranked for seed in (1, 2, 3)]
    assert all(r == first.ranked for r in shuffled)
    assert rank_all_trees(affinity, costs, order_seed=7) == rank_all_trees(affinity, costs)


def test_ties_on_cost_go_to_fewer_params_then_flops_then_canonical_order():
    # Every dissimilarity is 0: every tree costs 0, so the ranking is by size, then the key.
    affinity = np.ones((3, 4, 4))
    costs = SimpleNamespace(block_params=[1, 1, 1], block_flops=[5, 1, 1])
    got = search(affinity, costs, mode="exact", top=6).ranked
    assert got[0].tree == Tree.all_shared(4, 3)
    keys = [s.sort_key() for s in got]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert got[1].params == 4 and got[1].flops == 8  # one extra copy of the cheapest-flop block
    assert got[1].tree.groups_per_point() == (1, 1, 2)
    assert got[1].tree.partitions[2] == ((0,), (1, 2, 3))  # the canonical first of the 2-splits
    want = [(s.cost, s.params, s.flops, s.tree.partitions) for s in got]
    assert want == rank_all_trees(affinity, costs)[:6]


def test_exact_costs_are_bitwise_the_clustering_cost_of_the_returned_trees(random_affinity):
    rng = np.random.default_rng(11)
    affinity = random_affinity(rng, 7, 4)
    result = search(affinity, [3, 5, 8, 13], 60, mode="exact", top=5)
    for s in result.ranked:
        assert s.cost == clustering_cost(s.tree, affinity)
        assert s.params <= 60
    assert [s.sort_key() for s in result.ranked] == sorted(s.sort_key() for s in result.ranked)
