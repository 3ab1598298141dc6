"""How much to trust the picked tree: the report section that says so, with its evidence.

Three pieces, each from artifacts the run already has:

* **runners-up within noise**: the search records the trees after the chosen one
  (``search/tree.json``, ``runners_up``). With a bootstrap of the affinity
  (``branchnas affinity --bootstrap B``), the chosen tree's cost is also evaluated on the lower
  and upper 95% bounds of every affinity; a runner-up whose cost lies within half that spread
  of the chosen one is *within noise*: the data do not tell them apart;
* **the affinities that decided the split**: at each branch point, the pairs that the tree
  separates there (they shared the block before) and the least related pair kept together
  in each group, with their bootstrap intervals;
* **clustering cost against Δ_MTL** when ``branchnas compare`` fine-tuned several trees: the
  Spearman correlation over them (lower cost should mean higher Δ_MTL, so a good cost gives a
  negative correlation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["cost_band", "deciding_pairs", "cost_vs_delta", "trust_section"]


def cost_band(tree: Any, low: np.ndarray, high: np.ndarray) -> float:
    """Half the spread of ``tree``'s clustering cost between the affinity's bootstrap bounds."""
    from branchnas.search import clustering_cost

    return abs(clustering_cost(tree, low) - clustering_cost(tree, high)) / 2


def deciding_pairs(tree: Any, affinity: np.ndarray, low: np.ndarray | None = None,
                   high: np.ndarray | None = None) -> list[dict[str, Any]]:
    """At each branch point: the pairs split apart there, and each group's least related pair.

    Returns:
        Rows ``{"point", "pair", "role", "affinity", "low", "high"}`` (``low``/``high`` None
        without a bootstrap); ``role`` is ``"split"`` or ``"kept together"``.
    """
    rows = []
    names = tree.tasks
    for d, partition in enumerate(tree.partitions):
        before = tree.partitions[d - 1] if d else (tuple(range(len(names))),)

        def add(i: int, j: int, role: str, d: int = d) -> None:
            rows.append({
                "point": tree.points[d], "pair": (names[i], names[j]), "role": role,
                "affinity": float(affinity[d, i, j]),
                "low": None if low is None else float(low[d, i, j]),
                "high": None if high is None else float(high[d, i, j]),
            })

        group_of = {t: g for g in partition for t in g}
        for parent in before:
            for a in range(len(parent)):
                for b in range(a + 1, len(parent)):
                    i, j = parent[a], parent[b]
                    if group_of[i] != group_of[j]:
                        add(i, j, "split")
        for group in partition:
            if len(group) > 1:
                i, j = min(((i, j) for x, i in enumerate(group) for j in group[x + 1:]),
                           key=lambda p: affinity[d, p[0], p[1]])
                add(i, j, "kept together")
    return rows


def cost_vs_delta(rows: Sequence[dict[str, Any]], affinity: np.ndarray, tasks: Sequence[str],
                  points: Sequence[str]) -> tuple[list[tuple[str, float, float]], float | None]:
    """Each compared tree's clustering cost and Δ_MTL, and their Spearman correlation.

    Args:
        rows: ``compare.json``'s rows (``name``, ``partitions`` by task name, ``delta_mtl``).

    Returns:
        ``([(name, cost, Δ_MTL)], rho)``; ``rho`` is None with fewer than 3 trees or no spread.
    """
    from scipy.stats import spearmanr

    from branchnas.search import clustering_cost
    from branchnas.tree import Tree

    out = []
    for row in rows:
        tree = Tree(row["partitions"], tasks=list(tasks), points=list(points))
        delta = float(row["delta_mtl"])
        if np.isfinite(delta):
            out.append((row["name"], clustering_cost(tree, affinity), delta))
    costs, deltas = [c for _, c, _ in out], [d for _, _, d in out]
    if len(out) < 3 or len(set(costs)) < 2 or len(set(deltas)) < 2:
        return out, None
    return out, float(spearmanr(costs, deltas).statistic)


def _interval(row: dict[str, Any]) -> str:
    if row["low"] is None:
        return f"{row['affinity']:.3f}"
    return f"{row['affinity']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"


def trust_section(result: Any, runners_up: Sequence[Any], affinity: dict[str, Any] | None,
                  comparison: dict[str, Any] | None, unlearned: Mapping[str, str] | None = None) -> list[str]:
    """The report's "How much to trust the pick" section, as Markdown lines.

    ``unlearned``: ``{task: evidence}`` for the tasks whose single-task model learned nothing
    (:func:`branchnas.pretrain.unlearned_tasks`); their affinities may be noise, and the
    section says so first.
    """
    from tabulate import tabulate

    from branchnas.budget import format_count
    from branchnas.tasks import format_delta
    from branchnas.tree import describe_partitions

    out = ["## How much to trust the pick", ""]
    tree = result.tree
    if unlearned:
        out += ["**Single-task models that learned nothing** (their affinities may be noise, so where the "
                "tree puts these tasks is not evidence; more pretraining, `pretrain.epochs`, or a look at "
                "their labels may help):", ""]
        out += [f"- `{task}`: {why}" for task, why in unlearned.items()] + [""]
    matrix = low = high = None
    if affinity is not None:
        order = [list(affinity["tasks"]).index(t) for t in tree.tasks]
        pick = np.ix_(range(affinity["affinity"].shape[0]), order, order)
        matrix = np.asarray(affinity["affinity"], dtype=np.float64)[pick]
        if affinity.get("low") is not None:
            low = np.asarray(affinity["low"], dtype=np.float64)[pick]
            high = np.asarray(affinity["high"], dtype=np.float64)[pick]
    band = cost_band(tree, low, high) if low is not None else None
    if runners_up:
        rows = []
        for rank, scored in enumerate(runners_up, 2):
            gap = scored.cost - result.cost
            near = "yes" if band is not None and gap <= band else ("no" if band is not None else "?")
            # A Markdown table cell: its branch-point separators escaped, so they do not split the row.
            label = describe_partitions(scored.tree.named_partitions(), separator=" \\| ")
            rows.append((rank, label, format_count(scored.params), f"{scored.cost:.4f}", f"+{gap:.4f}", near))
        note = (f"the chosen tree's cost moves by ±{band:.4f} between the affinities' 95% bootstrap bounds"
                if band is not None else
                "run `branchnas affinity --bootstrap 200` to know which of them are within noise")
        out += [f"The next-best trees within the budget ({note}):", "",
                tabulate(rows, headers=("rank", "tree", "params", "cost", "Δ cost", "within noise"),
                         tablefmt="github", disable_numparse=True), ""]
        if band is not None:
            close = sum(1 for s in runners_up if s.cost - result.cost <= band)
            out += [f"{close} of {len(runners_up)} runners-up are within noise of the chosen tree"
                    + (": the affinity does not single it out; `branchnas compare` tells them apart by "
                       "fine-tuning." if close else "."), ""]
    if matrix is not None:
        pairs = deciding_pairs(tree, matrix, low, high)
        if pairs:
            rows = [(r["point"], f"{r['pair'][0]} / {r['pair'][1]}", r["role"], _interval(r)) for r in pairs]
            out += ["The affinities that decided the split (affinity [95% bootstrap interval]):", "",
                    tabulate(rows, headers=("branch point", "tasks", "", "affinity"), tablefmt="github",
                             disable_numparse=True), ""]
    if comparison is not None and matrix is not None:
        costs, rho = cost_vs_delta(comparison["rows"], matrix, tree.tasks, tree.points)
        rows = [(name, f"{cost:.4f}", format_delta(delta)) for name, cost, delta in sorted(costs, key=lambda r: r[1])]
        verdict = ("too few trees for a correlation" if rho is None else
                   f"Spearman ρ(cost, Δ_MTL) = {rho:+.2f} over {len(costs)} trees "
                   + ("(lower cost went with better networks, as the method assumes)" if rho < 0 else
                      "(lower cost did **not** go with better networks here)"))
        out += ["Clustering cost against the fine-tuned result (`branchnas compare`): " + verdict + ".", "",
                tabulate(rows, headers=("model", "clustering cost", "Δ_MTL"), tablefmt="github",
                         disable_numparse=True), ""]
    return out if len(out) > 2 else []
