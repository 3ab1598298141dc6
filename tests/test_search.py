import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest

from branchnas.budget import format_count
from branchnas.errors import BudgetError, UserError
from branchnas.search import (
    ExactSearch,
    ScalableSearch,
    SearchResult,
    SizeModel,
    clustering_cost,
    count_trees,
    enumerate_trees,
    format_pareto,
    level_costs,
    pareto_front,
    plot_pareto,
    rank_all_trees,
    refinement_dag,
    search,
    search_enumerate,
)
from branchnas.tree import Tree

# ---------------------------------------------------------------------------- helpers


def random_affinity(rng, n, d, ties=False):
    """A symmetric affinity tensor; with ``ties`` its values are multiples of 1/4 (many equal costs)."""
    a = rng.uniform(-1, 1, (d, n, n))
    a = (a + a.transpose(0, 2, 1)) / 2
    if ties:
        a = np.round(a * 4) / 4
    idx = np.arange(n)
    a[:, idx, idx] = 1.0
    return a


def set_partitions(items):
    """Every partition of ``items`` (independent of the library's generator)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in set_partitions(rest):
        yield [[first], *smaller]
        for i in range(len(smaller)):
            yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1:]]


def refines(fine, coarse):
    return all(any(set(g) <= set(h) for h in coarse) for g in fine)


def canon(partition):
    return tuple(sorted(tuple(sorted(g)) for g in partition))


def brute_force_trees(n, d):
    parts = [canon(p) for p in set_partitions(list(range(n)))]
    return {
        chain for chain in itertools.product(parts, repeat=d)
        if all(refines(chain[i + 1], chain[i]) for i in range(d - 1))
    }


# ---------------------------------------------------------------------------- counting


def test_count_trees_gives_the_numbers_quoted_in_the_issue_and_bell_numbers():
    assert count_trees(5, 4) == 3455
    assert count_trees(7, 4) == 660665
    assert [count_trees(n, 1) for n in range(1, 11)] == [1, 2, 5, 15, 52, 203, 877, 4140, 21147, 115975]


@pytest.mark.parametrize(("n", "d"), [(1, 3), (2, 4), (3, 3), (4, 2), (4, 3), (5, 2)])
def test_count_and_enumeration_match_a_brute_force_filter_of_all_partition_tuples(n, d):
    expected = brute_force_trees(n, d)
    listed = list(enumerate_trees(n, d))
    assert count_trees(n, d) == len(expected)
    assert len(listed) == len(set(listed)) and set(listed) == expected
    assert listed == sorted(listed)
    dag = refinement_dag(n, d)
    sinks = [node for node in dag if dag.out_degree(node) == 0]
    assert sum(len(list(nx_paths(dag, s))) for s in sinks) == len(expected)


def nx_paths(dag, sink):
    import networkx as nx

    return nx.all_simple_paths(dag, "stem", sink)


def test_count_trees_rejects_empty_problems():
    with pytest.raises(UserError, match="at least 1 task"):
        count_trees(0, 3)


# ---------------------------------------------------------------------------- the cost


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


# ---------------------------------------------------------------------------- sizes and budgets


def block_costs_like(d, n, rng):
    return SimpleNamespace(
        stem_params=1000, stem_flops=50_000,
        block_params=rng.integers(100, 1000, d), block_flops=rng.integers(10_000, 100_000, d),
        head_params={f"task{i}": 10 + i for i in range(n)}, head_flops={f"task{i}": 100 for i in range(n)},
    )


def test_size_model_reads_block_costs_objects_mappings_and_plain_arrays():
    costs = SimpleNamespace(stem_params=7, stem_flops=70, block_params=[10, 20], block_flops=[100, 200],
                            head_params={"a": 1, "b": 2, "c": 99}, head_flops={"a": 5, "b": 5, "c": 5})
    model = SizeModel.from_costs(costs, num_points=2, tasks=["a", "b"])
    assert model.params([1, 2]) == 7 + 10 + 40 + 3
    assert model.flops([2, 2]) == 70 + 600 + 10
    assert SizeModel.from_costs(vars(costs)).params([1, 1]) == 7 + 30 + 102
    plain = SizeModel.from_costs([5, 6])
    assert plain.params([2, 1]) == 16 and plain.flops([2, 1]) == 16
    with pytest.raises(UserError, match="no entry for task 'z'"):
        SizeModel.from_costs(costs, tasks=["a", "z"])
    with pytest.raises(UserError, match="one cost per branch point \\(3\\)"):
        SizeModel.from_costs(costs, num_points=3)
    with pytest.raises(UserError, match="non-negative"):
        SizeModel.from_costs([5, -1])


def test_budget_below_the_all_shared_tree_names_the_minimum_and_the_metric():
    rng = np.random.default_rng(0)
    costs = block_costs_like(3, 4, rng)
    smallest = SizeModel.from_costs(costs, tasks=[f"task{i}" for i in range(4)]).flops([1, 1, 1])
    with pytest.raises(BudgetError) as err:
        search(random_affinity(rng, 4, 3), costs, smallest - 1, metric="flops")
    message = str(err.value)
    assert format_count(smallest) in message and "flops" in message and f"{smallest:,}" in message
    result = search(random_affinity(rng, 4, 3), costs, smallest, metric="flops")
    assert result.tree == Tree.all_shared(4, 3) and result.best.flops == smallest


def test_bad_budget_metric_mode_and_top_are_user_errors():
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


# ---------------------------------------------------------------------------- exact DP == enumeration


def instances():
    """(n, d, instances): a few hundred (instance, budget) cases, every n in 2..6 and d in 1..4."""
    for n in range(2, 7):
        for d in range(1, 5):
            trees = count_trees(n, d)
            yield n, d, 6 if trees <= 5000 else (2 if trees <= 20000 else 1)


def test_exact_dp_equals_plain_enumeration_on_random_instances_incl_ties_and_budgets():
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


def test_exact_search_is_stable_across_calls_input_types_and_dag_insertion_order():
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


def test_exact_costs_are_bitwise_the_clustering_cost_of_the_returned_trees():
    rng = np.random.default_rng(11)
    affinity = random_affinity(rng, 7, 4)
    result = search(affinity, [3, 5, 8, 13], 60, mode="exact", top=5)
    for s in result.ranked:
        assert s.cost == clustering_cost(s.tree, affinity)
        assert s.params <= 60
    assert [s.sort_key() for s in result.ranked] == sorted(s.sort_key() for s in result.ranked)


# ---------------------------------------------------------------------------- Pareto front


@pytest.mark.parametrize(("n", "d", "metric"), [(5, 3, "params"), (4, 4, "flops"), (6, 2, "params")])
def test_pareto_front_equals_a_brute_force_non_dominated_filter(n, d, metric):
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


def test_format_and_plot_pareto(tmp_path):
    rng = np.random.default_rng(3)
    affinity = random_affinity(rng, 5, 3)
    costs = block_costs_like(3, 5, rng)
    result = search(affinity, costs, costs.stem_params + 3 * sum(costs.block_params) + 60, pareto=True)
    table = format_pareto(result.pareto, "params", chosen=result.best)
    lines = table.splitlines()
    assert "params ≤" in lines[0] and "cost" in lines[0] and "flops" in lines[0]
    assert len(lines) == 2 + len(result.pareto)
    assert sum(line.startswith("*") for line in lines) == 1
    assert format_count(result.pareto[0].params) in lines[2]
    path = tmp_path / "pareto.png"
    plot_pareto(result.pareto, path, "params", chosen=result.best, budget=result.budget)
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- results


def test_search_result_json_round_trip_and_summary_fields():
    rng = np.random.default_rng(4)
    affinity = random_affinity(rng, 4, 3)
    costs = block_costs_like(3, 4, rng)
    costs.head_params = dict(zip("abcd", costs.head_params.values(), strict=True))
    costs.head_flops = dict(zip("abcd", costs.head_flops.values(), strict=True))
    result = search(affinity, costs, "5k", top=2, pareto=True, tasks=list("abcd"), points=["l1", "l2", "l3"])
    assert result.budget == 5000 and result.metric == "params" and result.mode == "exact"
    assert result.min_size == SizeModel.from_costs(costs, tasks=list("abcd")).params([1, 1, 1])
    assert result.max_size == SizeModel.from_costs(costs, tasks=list("abcd")).params([4, 4, 4])
    assert result.tree.tasks == tuple("abcd") and result.tree.points == ("l1", "l2", "l3")
    back = SearchResult.from_json(json.loads(json.dumps(result.to_json())))
    assert back.ranked == result.ranked and back.pareto == result.pareto and back.budget == 5000
    with pytest.raises(UserError, match="expected format"):
        SearchResult.from_json({"ranked": []})


# ---------------------------------------------------------------------------- scalable and auto


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
    budget = SizeModel.from_costs(blocks).params(tree.groups_per_point())
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
    budget = SizeModel.from_costs(blocks).params(tree.groups_per_point())
    result = search(affinity, blocks, budget, mode="auto")
    assert result.mode == "scalable" and result.tree == tree and result.cost == 0.0


@pytest.mark.parametrize("options", [{}, {"recluster": True}, {"all_edges": True}, {"max_candidates": 8}])
def test_scalable_search_is_never_better_than_exact_and_reports_true_costs(options):
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


def test_scalable_dp_is_exact_over_its_candidate_dag():
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


def test_auto_mode_picks_exact_for_few_trees_and_scalable_beyond_the_limit():
    rng = np.random.default_rng(6)
    small = random_affinity(rng, 5, 4)
    assert search(small, [1, 2, 3, 4]).mode == "exact"
    assert search(small, [1, 2, 3, 4], exact_limit=3454).mode == "scalable"
    assert search(small, [1, 2, 3, 4], mode=ExactSearch(), exact_limit=1).mode == "exact"
    big = random_affinity(rng, 12, 2)
    assert search(big, [1, 2]).mode == "scalable"
    with pytest.raises(UserError, match="up to 11 tasks"):
        search(big, [1, 2], mode="exact")
