"""Text tables and the Pareto PNG (branchnas.search.present)."""

from __future__ import annotations

import numpy as np

from branchnas.budget import format_count
from branchnas.search import (
    format_pareto,
    plot_pareto,
    search,
)


def test_format_and_plot_pareto(tmp_path, random_affinity, block_costs_like):
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
