"""Stage 3, ``search``: the tree with the least clustering cost within the budget.

The work is :func:`branchnas.search.search` on the affinity tensor of stage 2 (or on a file
given with ``branchnas search --affinity FILE``, which trains nothing) and the cost model of
the recipe's network (:func:`branchnas.cost.recipe_costs`). The budget is checked against the
sizes of the all-shared and all-separate trees before any work: sizes do not depend on
training.

Artifacts in ``search/``: ``tree.json`` (the ranked trees, the extremes and the block costs),
``pareto.json``, ``tree.txt``, ``tree.png`` and ``pareto.png``.

With ``search.metric = "latency"`` the block costs carry a per-part latency table
(:mod:`branchnas.latency`): read from ``search.latency_table`` (checked against the recipe
before any work), or measured on this machine once and kept as ``search/latency.json``, which
a rerun reuses while the network, ``data.batch_size`` and the thread count are unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from branchnas.errors import BudgetError, UserError
from branchnas.stages._base import Artifact, Stage, StageContext, get_stage, register_stage

__all__ = ["SearchStage", "feasible_budget", "read_result", "read_ranked", "read_tree", "read_block_costs", "read_runners_up"]


#: Trees after the chosen one that the search records, for the report's "how much to trust it".
RUNNERS_UP = 5


@register_stage
class SearchStage(Stage):
    name = "search"
    summary = "Stage 3: find the cheapest-cost tree within a budget."
    requires = ("affinity",)
    artifacts = (
        Artifact("tree.json", "the ranked trees with cost, params and FLOPs; the extremes; the block costs"),
        Artifact("pareto.json", "the Pareto front of clustering cost against size"),
        Artifact("tree.txt", "the chosen tree as text"),
        Artifact("tree.png", "the chosen tree as a picture"),
        Artifact("pareto.png", "the Pareto front as a picture"),
        Artifact("latency.json", "search.metric latency: the per-part latency table the search used"),
    )

    def dependencies(self, recipe: Any, options: Mapping[str, Any]) -> tuple[str, ...]:
        return () if options.get("affinity_file") else self.requires

    def config(self, recipe: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        """Its recipe section and what the cost model measures (and a given affinity file's hash)."""
        from branchnas.rundir import file_sha256

        config: dict[str, Any] = {
            "search": dataclasses.asdict(recipe.search),
            "backbone": dataclasses.asdict(recipe.backbone),
            "data": {"dataset": recipe.data.dataset, "image_size": recipe.data.image_size,
                     "options": recipe.data.options, "root": recipe.data.root},
            "tasks": [dataclasses.asdict(t) for t in recipe.tasks],
        }
        table = recipe.search.latency_table
        if table and Path(table).is_file():
            config["latency_table"] = {"path": str(table), "sha256": file_sha256(table)}
        path = options.get("affinity_file")
        if path:
            config["affinity_file"] = {"path": str(path), "sha256": file_sha256(path)}
        return config

    def check(self, recipe: Any, options: Mapping[str, Any]) -> None:
        costs, tasks, points, _ = recipe_costs_with_latency(recipe, measure=False)
        if recipe.search.metric != "latency" or costs.has_latency:
            # A latency budget without a given table is checked once the table is measured (in run).
            feasible_budget(recipe, costs)
        path = options.get("affinity_file")
        if path:
            from branchnas.stages.affinity import read_affinity_file

            _align(read_affinity_file(path), tasks, points, f"--affinity {path}")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        return _search(ctx.recipe, ctx.rundir, ctx.folder, ctx.options.get("affinity_file"))


def recipe_costs_with_latency(recipe: Any, rundir: Any = None, folder: Path | None = None,
                              measure: bool = True) -> tuple[Any, list[str], list[str], dict[str, Any] | None]:
    """The recipe's cost model, with a latency table attached where the recipe wants one.

    The table is ``search.latency_table`` when set (validated against the recipe); else, with
    ``search.metric = "latency"`` and ``measure``, the one kept in ``rundir``'s ``search/latency.json``
    if it still fits (same network, batch size and thread count), else one measured now
    (:func:`branchnas.latency.recipe_table`). It is written to ``folder/latency.json``.

    Returns:
        ``(costs, task names, branch point names, table or None)``.
    """
    from branchnas.cost import recipe_costs

    costs, tasks, points = recipe_costs(recipe)
    cfg = recipe.search
    if not cfg.latency_table and (cfg.metric != "latency" or not measure):
        return costs, tasks, points, None
    from branchnas import latency

    identity = latency.recipe_identity(recipe)
    if cfg.latency_table:
        table = latency.load_table(cfg.latency_table)
        latency.check_table(table, identity)
    else:
        import torch

        table = None
        stored = get_stage("search").path(rundir, "latency.json") if rundir is not None else None
        if stored is not None and stored.exists():
            try:
                old = latency.load_table(stored, where=str(stored))
                latency.check_table(old, identity, where=str(stored))
                if latency.matches_settings(old, recipe.data.batch_size, torch.get_num_threads()):
                    table = old
            except UserError:
                table = None
        if table is None:
            table = latency.recipe_table(recipe)
    if folder is not None:
        from branchnas.rundir import atomic_write_json

        atomic_write_json(folder / "latency.json", table)
    return costs.with_latency(table), tasks, points, table


def feasible_budget(recipe: Any, costs: Any) -> int | float | None:
    """The recipe's budget as a count, checked against the smallest and largest tree.

    Raises:
        BudgetError: no tree fits: the budget is below the all-shared size. The message
            gives the feasible range, absolute and as a share of the all-separate size.
    """
    from functools import partial

    from branchnas.budget import Budget, format_size

    metric = recipe.search.metric
    budget = Budget.parse(recipe.search.budget, metric)
    if budget is None:
        return None
    fmt = partial(format_size, metric=metric)

    depth = costs.num_blocks
    n = len(costs.head_params)
    smallest, largest = costs.size([1] * depth, metric), costs.size([n] * depth, metric)
    limit = budget.resolve(largest)
    if limit < smallest:
        share = 100 * smallest / largest
        raise BudgetError(
            f"search.budget {budget} = {fmt(limit)} {metric} is below the smallest tree "
            f"(all tasks sharing every block: {fmt(smallest)}); no tree fits. Choose a budget from "
            f"{fmt(smallest)} ({share:.0f}%) to {fmt(largest)} (100%, all separate)"
            + ("; with a single task there is only one tree, so leave the budget empty (search.budget=\"\")"
               if n == 1 else "")
        )
    return limit


def _align(affinity: dict[str, Any], tasks: list[str], points: list[str], where: str) -> Any:
    """Reorder the affinity to the recipe's task order, checking names and branch points."""
    import numpy as np

    given = affinity["tasks"]
    if sorted(given) != sorted(tasks):
        extra = sorted(set(given) - set(tasks))
        absent = sorted(set(tasks) - set(given))
        raise UserError(
            f"{where}: its tasks ({', '.join(given)}) differ from the recipe's ({', '.join(tasks)})"
            + (f"; not in the recipe: {', '.join(extra)}" if extra else "")
            + (f"; missing: {', '.join(absent)}" if absent else "")
            + "; use the recipe the affinity was computed with"
        )
    matrix = np.asarray(affinity["affinity"], dtype=np.float64)
    if matrix.ndim != 3 or matrix.shape[0] != len(points):
        raise UserError(
            f"{where}: expected affinity at the backbone's {len(points)} branch points ({', '.join(points)}); "
            f"got shape {tuple(matrix.shape)}; check backbone.name and backbone.granularity"
        )
    order = [given.index(t) for t in tasks]
    return matrix[:, order][:, :, order]


def _search(recipe: Any, rundir: Any, folder: Path, affinity_file: str | None) -> dict[str, Any]:
    from branchnas.budget import format_count
    from branchnas.rundir import atomic_write_json, atomic_write_text
    from branchnas.search import clustering_cost, format_result, plot_pareto, search
    from branchnas.stages.affinity import read_affinity, read_affinity_file
    from branchnas.tree import Tree

    costs, tasks, points, table = recipe_costs_with_latency(recipe, rundir, folder)
    if affinity_file:
        matrix = _align(read_affinity_file(affinity_file), tasks, points, f"--affinity {affinity_file}")
    else:
        matrix = _align(read_affinity(rundir), tasks, points, "affinity/affinity.npz")
    cfg = recipe.search
    # The runners-up (how close the pick is to its alternatives) come from the same pass.
    wide = search(matrix, costs, feasible_budget(recipe, costs), metric=cfg.metric, mode=cfg.mode,
                  top=max(cfg.top, RUNNERS_UP + 1), tasks=tasks, points=points, pareto=True,
                  exact_limit=cfg.exact_limit)
    result = dataclasses.replace(wide, ranked=wide.ranked[: cfg.top])
    shared = Tree.all_shared(len(tasks), len(points), tasks=tasks, points=points)
    separate = Tree.all_separate(len(tasks), len(points), tasks=tasks, points=points)
    extremes = {
        name: {"cost": clustering_cost(tree, matrix),
               "params": costs.size(tree.groups_per_point(), "params"),
               "flops": costs.size(tree.groups_per_point(), "flops"),
               **({"latency": costs.size(tree.groups_per_point(), "latency")} if costs.has_latency else {})}
        for name, tree in (("all_shared", shared), ("all_separate", separate))
    }
    data = result.to_json()
    pareto = data.pop("pareto")
    data["extremes"] = extremes
    data["runners_up"] = [scored.to_json() for scored in wide.ranked[1: RUNNERS_UP + 1]]
    data["block_costs"] = costs.to_dict()
    if table:
        data["latency_table"] = {k: table.get(k) for k in ("batch_size", "threads", "mode", "torch", "machine")}
        data["latency_table"]["source"] = cfg.latency_table or "measured on this machine"
    atomic_write_json(folder / "tree.json", data)
    atomic_write_json(folder / "pareto.json", {"metric": result.metric, "front": pareto})
    atomic_write_text(folder / "tree.txt", format_result(result) + "\n")
    result.tree.draw(folder / "tree.png", title=f"chosen tree ({format_count(result.best.params)} params)")
    plot_pareto(result.pareto or (), folder / "pareto.png", result.metric, chosen=result.best, budget=result.budget)
    outputs = ["tree.json", "pareto.json", "tree.txt", "tree.png", "pareto.png"] + (["latency.json"] if table else [])
    return {"outputs": outputs,
            "mode": result.mode, "cost": result.cost}


# --------------------------------------------------------------------------- readers


def _read_json(rundir: Any, name: str) -> Any:
    return get_stage("search").read_json(rundir, name)


def read_result(rundir: Any) -> tuple[Any, dict[str, Any]]:
    """The :class:`~branchnas.search.SearchResult` (with its Pareto front) and the extremes."""
    from branchnas.search import SearchResult

    data = _read_json(rundir, "tree.json")
    pareto = get_stage("search").path(rundir, "pareto.json")
    front = _read_json(rundir, "pareto.json")["front"] if pareto.exists() else None
    extremes = data.pop("extremes", {})
    data.pop("block_costs", None)
    data.pop("runners_up", None)
    data["pareto"] = front
    return SearchResult.from_json(data), extremes


def read_runners_up(rundir: Any) -> list[Any]:
    """The next-best trees after the chosen one (:class:`~branchnas.search.ScoredTree`), best first."""
    from branchnas.search import ScoredTree

    return [ScoredTree.from_json(s) for s in _read_json(rundir, "tree.json").get("runners_up", [])]


def read_ranked(rundir: Any) -> list[Any]:
    """The searched trees, best first (one unless ``search.top`` > 1)."""
    from branchnas.finetune import load_ranked

    return load_ranked(get_stage("search").require(rundir, "tree.json"))


def read_tree(rundir: Any) -> Any:
    """The chosen (best) tree."""
    return read_ranked(rundir)[0]


def read_block_costs(rundir: Any) -> Any:
    """The :class:`~branchnas.cost.BlockCosts` the search used, or ``None`` if it recorded none."""
    from branchnas.cost import BlockCosts

    data = _read_json(rundir, "tree.json")
    return BlockCosts.from_dict(data["block_costs"]) if "block_costs" in data else None
