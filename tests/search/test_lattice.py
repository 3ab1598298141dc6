"""The partition lattice: counting, enumerating and the refinement DAG (branchnas.search.lattice)."""

from __future__ import annotations

import pytest

from branchnas.errors import UserError
from branchnas.search import (
    count_trees,
    enumerate_trees,
    refinement_dag,
)


def test_count_trees_gives_the_numbers_quoted_in_the_issue_and_bell_numbers():
    assert count_trees(5, 4) == 3455
    assert count_trees(7, 4) == 660665
    assert [count_trees(n, 1) for n in range(1, 11)] == [1, 2, 5, 15, 52, 203, 877, 4140, 21147, 115975]


@pytest.mark.parametrize(("n", "d"), [(1, 3), (2, 4), (3, 3), (4, 2), (4, 3), (5, 2)])
def test_count_and_enumeration_match_a_brute_force_filter_of_all_partition_tuples(n, d, brute_force_trees):
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
