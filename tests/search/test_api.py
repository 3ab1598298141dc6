"""search(), its inputs and budgets, strategy choice and the Pareto front (branchnas.search.api)."""

from __future__ import annotations

import numpy as np
import pytest

from branchnas.budget import format_count
from branchnas.cost import BlockCosts
from branchnas.errors import BudgetError, UserError
from branchnas.search import (
    ExactSearch,
    pareto_front,
    rank_all_trees,
    search,
)
from branchnas.tree import Tree


def test_budget_below_the_all_shared_tree_names_the_minimum_and_the_metric(random_affinity, block_costs_like):
    rng = np.random.default_rng(0)
    costs = block_costs_like(3, 4, rng)
    smallest = BlockCosts.coerce(costs, tasks=[f"task{i}" for i in range(4)]).size([1, 1, 1], "flops")
    with pytest.raises(BudgetError) as err:
        search(random_affinity(rng, 4, 3), costs, smallest - 1, metric="flops")
    message = str(err.value)
    assert format_count(smallest) in message and "flops" in message and f"{smallest:,}" in message
    result = search(random_affinity(rng, 4, 3), costs, smallest, metric="flops")
    assert result.tree == Tree.all_shared(4, 3) and result.best.flops == smallest


def test_bad_budget_metric_mode_and_top_are_user_errors(random_affinity):
    a = random_affinity(np.random.default_rng(1), 3, 2)
    with pytest.raises(BudgetError, match="budget"):
        search(a, [1, 1], "ten")
    with pytest.raises(UserError, match="did you mean 'flops'"):
        search(a, [1, 1], metric="flop")
    with pytest.raises(UserError, match="did you mean 'exact'"):
        search(a, [1, 1], mode="exakt")
    with pytest.raises(UserError, match="top must be a positive integer"):
        search(a, [1, 1], top=0)
    with pytest.raises(UserError, match="3 task names"):
        search(a[:, :2, :2], [1, 1], tasks=["a", "b", "c"])


@pytest.mark.parametrize(("n", "d", "metric"), [(5, 3, "params"), (4, 4, "flops"), (6, 2, "params")])
def test_pareto_front_equals_a_brute_force_non_dominated_filter(n, d, metric, random_affinity, block_costs_like):
    rng = np.random.default_rng(n * 10 + d)
    affinity = random_affinity(rng, n, d, ties=(d == 4))
    costs = block_costs_like(d, n, rng)
    everything = rank_all_trees(affinity, costs)
    points = {((p if metric == "params" else f), c) for c, p, f, _ in everything}
    non_dominated = sorted(
        (s, c) for s, c in points if not any(s2 <= s and c2 <= c and (s2, c2) != (s, c) for s2, c2 in points)
    )
    front = pareto_front(affinity, costs, metric=metric, mode="exact")
    assert [(s.size(metric), s.cost) for s in front] == non_dominated
    for entry in front:
        assert entry == search(affinity, costs, entry.size(metric), metric=metric, mode="exact").best
    same = search(affinity, costs, metric=metric, mode="exact", pareto=True)
    assert same.pareto == front


def test_auto_mode_picks_exact_for_few_trees_and_scalable_beyond_the_limit(random_affinity):
    rng = np.random.default_rng(6)
    small = random_affinity(rng, 5, 4)
    assert search(small, [1, 2, 3, 4]).mode == "exact"
    assert search(small, [1, 2, 3, 4], exact_limit=3454).mode == "scalable"
    assert search(small, [1, 2, 3, 4], mode=ExactSearch(), exact_limit=1).mode == "exact"
    big = random_affinity(rng, 12, 2)
    assert search(big, [1, 2]).mode == "scalable"
    with pytest.raises(UserError, match="up to 11 tasks"):
        search(big, [1, 2], mode="exact")
