"""Search results and their JSON form (branchnas.search.result)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from branchnas.cost import BlockCosts
from branchnas.errors import UserError
from branchnas.search import (
    SearchResult,
    search,
)


def test_search_result_json_round_trip_and_summary_fields(random_affinity, block_costs_like):
    rng = np.random.default_rng(4)
    affinity = random_affinity(rng, 4, 3)
    costs = block_costs_like(3, 4, rng)
    costs.head_params = dict(zip("abcd", costs.head_params.values(), strict=True))
    costs.head_flops = dict(zip("abcd", costs.head_flops.values(), strict=True))
    result = search(affinity, costs, "5k", top=2, pareto=True, tasks=list("abcd"), points=["l1", "l2", "l3"])
    assert result.budget == 5000 and result.metric == "params" and result.mode == "exact"
    assert result.min_size == BlockCosts.coerce(costs, tasks=list("abcd")).size([1, 1, 1], "params")
    assert result.max_size == BlockCosts.coerce(costs, tasks=list("abcd")).size([4, 4, 4], "params")
    assert result.tree.tasks == tuple("abcd") and result.tree.points == ("l1", "l2", "l3")
    back = SearchResult.from_json(json.loads(json.dumps(result.to_json())))
    assert back.ranked == result.ranked and back.pareto == result.pareto and back.budget == 5000
    with pytest.raises(UserError, match="expected format"):
        SearchResult.from_json({"ranked": []})
