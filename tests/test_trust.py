"""The report's "how much to trust the pick" section (branchnas.trust), on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from branchnas.search import ScoredTree, clustering_cost, search
from branchnas.tree import Tree
from branchnas.trust import cost_band, cost_vs_delta, deciding_pairs, trust_section

TASKS = ["a", "b", "c"]
POINTS = ["p0", "p1"]


def affinity() -> np.ndarray:
    a = np.ones((2, 3, 3))
    a[0] = [[1, 0.9, 0.5], [0.9, 1, 0.4], [0.5, 0.4, 1]]
    a[1] = [[1, 0.8, 0.2], [0.8, 1, 0.1], [0.2, 0.1, 1]]
    return a


def test_deciding_pairs_are_the_splits_and_each_groups_least_related_pair():
    tree = Tree([[["a", "b", "c"]], [["a", "b"], ["c"]]], tasks=TASKS, points=POINTS)
    rows = deciding_pairs(tree, affinity())
    # p0: one group of three: its least related pair is b/c (0.4); nothing is split yet.
    # p1: c leaves: a/c and b/c are split; a/b stay together (0.8).
    assert [(r["point"], r["pair"], r["role"], r["affinity"]) for r in rows] == [
        ("p0", ("b", "c"), "kept together", 0.4),
        ("p1", ("a", "c"), "split", 0.2),
        ("p1", ("b", "c"), "split", 0.1),
        ("p1", ("a", "b"), "kept together", 0.8),
    ]


def test_cost_band_is_half_the_cost_spread_between_the_bounds():
    tree = Tree([[["a", "b", "c"]], [["a", "b"], ["c"]]], tasks=TASKS, points=POINTS)
    low, high = affinity() - 0.1, np.minimum(affinity() + 0.05, 1)
    # cost = (1 - 0.4) + (1 - 0.8)/2 at the estimate; every affinity moves by the same step
    expected = abs(clustering_cost(tree, low) - clustering_cost(tree, high)) / 2
    assert cost_band(tree, low, high) == pytest.approx(expected)
    assert expected == pytest.approx((0.1 + 0.05) * (1 + 0.5) / 2)


def test_cost_vs_delta_is_spearman_over_the_compared_trees():
    rows = [
        {"name": "shared", "partitions": [[["a", "b", "c"]], [["a", "b", "c"]]], "delta_mtl": -0.10},
        {"name": "mixed", "partitions": [[["a", "b", "c"]], [["a", "b"], ["c"]]], "delta_mtl": -0.02},
        {"name": "separate", "partitions": [[["a"], ["b"], ["c"]], [["a"], ["b"], ["c"]]], "delta_mtl": 0.0},
        {"name": "nan", "partitions": [[["a", "c"], ["b"]], [["a", "c"], ["b"]]], "delta_mtl": float("nan")},
    ]
    costs, rho = cost_vs_delta(rows, affinity(), TASKS, POINTS)
    assert [name for name, _, _ in costs] == ["shared", "mixed", "separate"]  # NaN Δ left out
    expected = spearmanr([c for _, c, _ in costs], [d for _, _, d in costs]).statistic
    assert rho == pytest.approx(expected) and rho == pytest.approx(-1.0)
    assert cost_vs_delta(rows[:2], affinity(), TASKS, POINTS)[1] is None


def test_trust_section_marks_runners_up_within_the_bootstrap_band():
    a = affinity()
    result = search(a, [10, 10], None, tasks=TASKS, points=POINTS, top=4)
    best, others = result.ranked[0], list(result.ranked[1:])
    low, high = a - 0.3, np.minimum(a + 0.3, 1)
    band = cost_band(best.tree, low, high)
    lines = "\n".join(trust_section(result, others, {"affinity": a, "tasks": TASKS, "low": low, "high": high}, None))
    near = sum(1 for s in others if s.cost - best.cost <= band)
    assert f"{near} of {len(others)} runners-up are within noise" in lines
    assert "The affinities that decided the split" in lines and "[" in lines
    # Each runner-up is one row of six cells: the tree's own " | " between branch points is escaped.
    import re

    rows = [line for line in lines.splitlines() if re.match(r"^\| \d+ ", line)]
    assert len(rows) == len(others) and others[0].tree.num_points > 1
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 7 for row in rows), rows
    without = "\n".join(trust_section(result, others, {"affinity": a, "tasks": TASKS}, None))
    assert "--bootstrap" in without and "| ?" in without
    assert isinstance(others[0], ScoredTree)


def test_trust_section_names_the_tasks_whose_single_task_model_learned_nothing_first():
    a = affinity()
    result = search(a, [10, 10], None, tasks=TASKS, points=POINTS, top=2)
    why = "val accuracy 0.510 against 0.500 for a constant prediction (2 s.e. = 0.045)"
    lines = trust_section(result, list(result.ranked[1:]), {"affinity": a, "tasks": TASKS}, None, {TASKS[1]: why})
    assert lines[:2] == ["## How much to trust the pick", ""]
    assert lines[2].startswith("**Single-task models that learned nothing**")
    assert lines[4] == f"- `{TASKS[1]}`: {why}"
    assert not any("learned nothing" in line
                   for line in trust_section(result, list(result.ranked[1:]), {"affinity": a, "tasks": TASKS}, None))
