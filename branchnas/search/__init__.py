"""Stage 3 library: the budget-constrained tree search of *Branched Multi-Task Networks*, Sec. 3.2.

A tree is a chain of task partitions ``P_0 >= P_1 >= ... >= P_{D-1}`` (each refines the one
before; see :class:`branchnas.tree.Tree`). Its clustering cost is the paper's

    C = sum_d C_d,   C_d = mean over the groups g of P_d of max_{i,j in g} (1 - A[d, i, j])

(0 for a singleton group), and its size is ``stem + sum_d |P_d| * block_d + heads`` in params
or FLOPs (the one size model, :class:`branchnas.cost.BlockCosts`). The search returns the cheapest-cost tree whose size fits a budget, and the Pareto
front of cost against size.

How the exact search is fast. The size of a tree depends only on its *count vector*
``k = (|P_0|, ..., |P_{D-1}|)``, and the cost is a sum over branch points of a term that depends
only on ``P_d``. So a suffix dynamic programme over the partition-refinement DAG (nodes
``(d, P)``) keeps, per node, one label per count vector of the levels below it:
``W_d(P)[s] = C_d(P) + min { W_{d+1}(R)[s[1:]] : R refines P, |R| = s[0] }``. One label per
count vector is the (cost, size) label set of the node before dominance pruning; dominance is
applied once, at the end, across count vectors. The refinement DAG itself is never built: "the
best over all refinements R of P with ``|R| = j``" is computed through the *cover* relation of
the partition lattice (R is one split away from its parents), which has ``sum_P C(|P|, 2)`` edges
(1.15 million for 10 tasks) instead of the 16.7 million refinement pairs. The best trees are
then read back by a best-first search whose priorities are exact (the DP values), which also
yields the deterministic tie-break. Every budget is answered by the same pass, which is how
the Pareto front comes out.

Ties. Trees are ranked by (cost, params, flops, canonical tree key). Costs are compared as
floats, and every code path computes a tree's cost with the same operations in the same order
(:func:`clustering_cost`), so equal trees tie exactly and the ranking is stable.

Scalable mode (many tasks): candidate partitions per branch point are proposals with a low
sum of group diameters (a beam search over merges, for the point and for every window of
consecutive points, and complete-linkage cuts), made to nest by intersecting with the
candidates of the branch point before; the same DP then runs exactly over that candidate DAG.
With a budget, the best trees are then improved across branch points (re-fitting each
partition to its neighbours, trying other candidates in place of one, moving and swapping
single tasks), their partitions join the DAG and the DP runs again (see :class:`ScalableSearch`).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a = rng.uniform(-1, 1, (4, 5, 5)); a = (a + a.transpose(0, 2, 1)) / 2
    >>> result = search(a, [100, 200, 400, 800], budget=3000)
    >>> result.mode, result.trees_considered
    ('exact', 3455)

Layout: :mod:`~branchnas.search.cost` (the cost), :mod:`~branchnas.search.lattice` (partitions,
counting, RGS tables), :mod:`~branchnas.search._base` (strategy and engine contracts),
:mod:`~branchnas.search.exact` and :mod:`~branchnas.search.scalable` (the two strategies; the
scalable one builds on :mod:`~branchnas.search.proposals`, :mod:`~branchnas.search.candidates`
and :mod:`~branchnas.search.polish`),
:mod:`~branchnas.search.api` (:func:`search` and the read-out), :mod:`~branchnas.search.result`,
:mod:`~branchnas.search.present` (text and PNG). The stage that runs it is :mod:`branchnas.stages.search`.
"""

from __future__ import annotations

from branchnas.search._base import SearchStrategy
from branchnas.search.api import (
    ENUMERATE_LIMIT,
    EXACT_LIMIT,
    MODES,
    pareto_front,
    rank_all_trees,
    search,
    search_enumerate,
)
from branchnas.search.cost import clustering_cost, dissimilarity, level_costs
from branchnas.search.exact import EXACT_MAX_CELLS, EXACT_MAX_TASKS, ExactSearch
from branchnas.search.lattice import count_trees, enumerate_trees, refinement_dag
from branchnas.search.present import format_pareto, format_result, format_summary, plot_pareto
from branchnas.search.result import SEARCH_FORMAT, ScoredTree, SearchResult
from branchnas.search.scalable import MAX_CANDIDATES, ScalableSearch, _candidates

__all__ = [
    "EXACT_LIMIT",
    "EXACT_MAX_CELLS",
    "EXACT_MAX_TASKS",
    "ENUMERATE_LIMIT",
    "MAX_CANDIDATES",
    "MODES",
    "SEARCH_FORMAT",
    "ScoredTree",
    "SearchResult",
    "SearchStrategy",
    "ExactSearch",
    "ScalableSearch",
    "dissimilarity",
    "level_costs",
    "clustering_cost",
    "count_trees",
    "enumerate_trees",
    "refinement_dag",
    "search",
    "search_enumerate",
    "rank_all_trees",
    "pareto_front",
    "format_pareto",
    "plot_pareto",
    "format_result",
    "format_summary",
    # Private, re-exported for the tests that check the scalable DP against its candidates.
    "_candidates",
]
