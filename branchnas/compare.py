"""``branchnas compare``: single-task, all-shared, the chosen tree and random trees side by side.

The table follows the paper's Tables 1 and 2: one row per model, with its parameters, FLOPs
(fvcore, one multiply-add = one flop, per image), every task's primary test metric and
Δ_MTL against the single-task models.

* **single-task**: the stage-1 models' test metrics as they are; the size is that of the
  all-separate tree (the stem counted once, as in every tree);
* **all-shared**: the usual multi-task baseline, fine-tuned here;
* **chosen**: the tree of the search stage, as fine-tuned by stage 4 (not trained again);
* **rank-k**: with ``search.top`` > 1, the search's runners-up, fine-tuned here;
* **random-k**: ``finetune.compare_random`` random trees within ±10% of the chosen tree's
  parameters (:func:`random_trees_of_similar_size`), fine-tuned here; they show what the
  affinity-based choice is worth at that size.

Every fine-tuning goes through :func:`branchnas.finetune.finetune_tree` into its own folder
under ``compare/`` (resumable), so the models differ only in their tree. Artifacts:
``compare/compare.json`` and ``compare/compare.md``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchnas.rundir import RunDir
from branchnas.tree import Partition, Tree, canonical_partition, describe_partitions

if TYPE_CHECKING:
    from branchnas.cost import BlockCosts
    from branchnas.recipe import Recipe

__all__ = [
    "compare_trees",
    "random_trees_of_similar_size",
    "random_chain",
    "comparison_table",
    "comparison_markdown",
    "check_weightings",
    "plot_weightings",
    "weighting_names",
]

#: Trees enumerated at most before sampling takes over (N tasks and D blocks grow fast).
ENUMERATION_LIMIT = 200_000


def compare_trees(recipe: Recipe, rundir: RunDir, folder: Path) -> dict[str, Any]:
    from branchnas.budget import format_count
    from branchnas.data import load_splits
    from branchnas.finetune import finetune_tree, single_task_metrics
    from branchnas.stages.finetune import read_report
    from branchnas.stages.search import read_ranked
    from branchnas.stages.tune import read_tuned
    from branchnas.tasks import delta_mtl

    chosen = read_report(rundir)
    chosen_tree = Tree.from_json(chosen["tree"])
    splits, tasks = load_splits(recipe)
    names = [t.name for t in tasks]
    costs = _costs(recipe, rundir)
    n, depth = len(names), costs.num_blocks
    points = list(chosen_tree.points)
    shared = Tree.all_shared(n, depth, tasks=names, points=points)
    separate = Tree.all_separate(n, depth, tasks=names, points=points)
    baseline = single_task_metrics(rundir, "test")

    rows: list[dict[str, Any]] = [{
        "name": "single-task", "kind": "single-task", "partitions": separate.named_partitions(),
        "params": costs.size([n] * depth, "params"), "flops": costs.size([n] * depth, "flops"),
        "flops_per_task": _mean_pass(_separate_passes(recipe, rundir, separate, splits["train"])),
        "test": {t: dict(baseline[t]) for t in names}, "delta_mtl": 0.0,
        "delta_per_task": {t: 0.0 for t in names},
        "note": "stage-1 models; size of the all-separate tree",
    }]
    # Keyed by layout and variant: a tree that equals another row's is fine-tuned once.
    main = recipe.finetune.variant
    reports: dict[Any, dict[str, Any]] = {(chosen_tree.partitions, main, None): chosen}

    def add(name: str, kind: str, tree: Tree, variant: str = main, where: str = "", weighting: Any = None,
            trained: dict[str, Any] | None = None) -> None:
        key = (tree.partitions, variant, _weighting_key(weighting)) if trained is None else ("tuned",)
        run_recipe = recipe if weighting is None else dataclasses.replace(
            recipe, finetune=dataclasses.replace(recipe.finetune, weighting=weighting))
        if trained is not None:
            reports[key] = trained
        if key not in reports:
            reports[key] = finetune_tree(run_recipe, rundir, tree, folder / (where or name), desc=f"compare {name}",
                                         splits=(splits, tasks), variant=variant)
        report = reports[key]
        same = tree.partitions == chosen_tree.partitions and kind not in ("chosen", "variant", "tuned")
        budget = report.get("budget") or {}
        notes = ["the chosen tree"] if same else []
        if budget.get("within") is False:
            notes.append(f"over the budget ({format_count(budget['size'])} > {format_count(budget['limit'])} "
                         f"{budget['metric']})")
        rows.append({
            "name": name, "kind": kind, "variant": variant, "partitions": tree.named_partitions(),
            "params": report["params"], "flops": report["flops"],
            "flops_per_task": _mean_pass(report.get("flops_per_task_pass")),
            "test": report["test"], "delta_mtl": delta_mtl(report["test"], baseline, tasks, undefined="nan"),
            "delta_per_task": {t.name: delta_mtl(report["test"], baseline, [t], undefined="nan") for t in tasks},
            "within_budget": budget.get("within"),
            "weighting": _weighting_key(weighting) or _weighting_key(recipe.finetune.weighting),
            "seconds_per_epoch": _seconds_per_epoch(report),
            "note": "; ".join(notes),
        })

    add("all-shared", "all-shared", shared)
    add("chosen" if main == "plain" else f"chosen ({main})", "chosen", chosen_tree)
    # The chosen tree under the other fine-tuning variants (finetune.compare_variants).
    for variant in recipe.finetune.compare_variants:
        if variant != main:
            add(f"chosen ({variant})", "variant", chosen_tree, variant, where=f"chosen-{variant}")
    # The tuned network (`branchnas tune`: the best trial within the budget), as trained there.
    tuned = read_tuned(rundir, recipe)
    if tuned is not None:
        add(f"tuned (gated, trial {tuned['tuned']['trial']})", "tuned", chosen_tree, "gated", trained=tuned)
    # The chosen tree under other loss weightings (finetune.compare_weightings), same seeds.
    for weighting in recipe.finetune.compare_weightings:
        if weighting != _weighting_key(recipe.finetune.weighting):
            add(f"chosen ({weighting})", "weighting", chosen_tree, where=f"weighting-{weighting}", weighting=weighting)
    # With search.top > 1 the search ranks several trees; the runners-up are compared too.
    for rank, tree in enumerate(read_ranked(rundir)[1:], 2):
        add(f"rank-{rank}", "ranked", tree)
    count = recipe.finetune.compare_random
    if count:
        target = costs.size(list(chosen_tree.groups_per_point()), "params")
        randoms = random_trees_of_similar_size(
            names, costs, target, count, seed=recipe.seed, points=points,
            exclude=[chosen_tree, shared, separate],
        )
        for k, tree in enumerate(randoms, 1):
            add(f"random-{k}", "random", tree)
    return {
        "tasks": [{"name": t.name, "metric": t.primary_metric, "higher_is_better": t.higher_is_better(t.primary_metric)}
                  for t in tasks],
        "split": "test",
        "units": "params: parameters; flops: fvcore FLOPs per image (one multiply-add = one flop)",
        "random_requested": count,
        "rows": rows,
    }


def _mean_pass(passes: Mapping[str, int] | None) -> float | None:
    """The mean FLOPs of one task's pass alone (``None`` for a report from before they were counted)."""
    return sum(passes.values()) / len(passes) if passes else None


def _separate_passes(recipe: Recipe, rundir: RunDir, separate: Tree, data: Any) -> dict[str, int]:
    """Each single-task model's FLOPs: a task's pass through the all-separate tree (the stem counted once)."""
    import torch

    from branchnas.cost import task_pass_flops
    from branchnas.finetune import build_branched

    net = build_branched(recipe, rundir, separate, init="first").eval()
    return task_pass_flops(net, torch.zeros(1, data.in_channels, *data.image_size))


def _weighting_key(weighting: Any) -> str | None:
    """A loss weighting as one string: its name, or its table as JSON when it has options."""
    if weighting is None:
        return None
    if isinstance(weighting, Mapping):
        return weighting["name"] if set(weighting) == {"name"} else json.dumps(dict(weighting), sort_keys=True)
    return str(weighting)


def _seconds_per_epoch(report: Mapping[str, Any]) -> float | None:
    """Mean wall seconds of a fine-tuning's epochs (training and validation), from its history."""
    history = (report.get("training") or {}).get("history") or []
    seconds = [float(h["seconds"]) for h in history if h.get("seconds") is not None]
    return sum(seconds) / len(seconds) if seconds else None


def weighting_names() -> list[str]:
    """Every loss weighting the recipe accepts (read from the schema: no torch import)."""
    from branchnas.recipe import FinetuneConfig

    field = next(f for f in dataclasses.fields(FinetuneConfig) if f.name == "weighting")
    return list(field.metadata["choices"])


def check_weightings(names: Sequence[str]) -> None:
    """Refuse an unknown name in ``finetune.compare_weightings`` before any work."""
    from branchnas.errors import RecipeError, unknown_choice

    valid = weighting_names()
    for name in names:
        if name not in valid:
            raise RecipeError(f"finetune.compare_weightings: {unknown_choice('loss weighting', name, valid)}")


def plot_weightings(data: Mapping[str, Any], path: str | Path) -> None:
    """Test Δ_MTL of the chosen tree under each loss weighting (bars), with seconds per epoch."""
    from matplotlib.figure import Figure

    from branchnas.rundir import atomic_savefig

    rows = [r for r in data["rows"] if r["kind"] in ("chosen", "weighting")]
    rows.sort(key=lambda r: r["delta_mtl"])
    fig = Figure(figsize=(6.5, 1.2 + 0.38 * len(rows)))
    ax = fig.add_subplot(1, 1, 1)
    values = [100 * r["delta_mtl"] for r in rows]
    colours = ["#c44e52" if r["kind"] == "chosen" else "#4c72b0" for r in rows]
    ax.barh(range(len(rows)), values, color=colours)
    ax.set_yticks(range(len(rows)), labels=[r.get("weighting") or r["name"] for r in rows], fontsize=8)
    for i, r in enumerate(rows):
        seconds = r.get("seconds_per_epoch")
        label = f"{values[i]:+.2f}%" + (f"  {seconds:.0f} s/epoch" if seconds else "")
        ax.annotate(label, (values[i], i), xytext=(4 if values[i] >= 0 else -4, 0), textcoords="offset points",
                    va="center", ha="left" if values[i] >= 0 else "right", fontsize=7)
    ax.axvline(0, color="#999999", lw=0.8)
    ax.set_xlabel("Δ_MTL vs single-task (%), test — higher is better")
    ax.set_title("the chosen tree under each loss weighting (red: the recipe's)", fontsize=9)
    ax.margins(x=0.45)
    atomic_savefig(fig, path)


def _costs(recipe: Recipe, rundir: RunDir) -> BlockCosts:
    """The cost model the search used (``search/tree.json``), else the recipe's, measured now."""
    from branchnas.cost import recipe_costs
    from branchnas.stages.search import read_block_costs

    return read_block_costs(rundir) or recipe_costs(recipe)[0]


# --------------------------------------------------------------------------- random trees


def random_chain(num_tasks: int, depth: int, rng: random.Random) -> tuple[Partition, ...]:
    """A random tree's partitions, for when there are too many trees to enumerate.

    Not exactly uniform over trees. Each branch point after the first keeps the partition
    before it with probability 1/2 (so shared prefixes stay likely); otherwise every group
    is split into ``k`` pieces, ``k`` uniform in ``1..|group|``, by assigning its tasks to
    pieces at random. The first partition is such a split of all tasks.
    """
    chain: list[Partition] = []
    for d in range(depth):
        if d and rng.random() < 0.5:
            chain.append(chain[-1])
            continue
        groups: list[list[int]] = []
        for group in chain[-1] if chain else [tuple(range(num_tasks))]:
            k = rng.randint(1, len(group))
            pieces: list[list[int]] = [[] for _ in range(k)]
            for task in group:
                pieces[rng.randrange(k)].append(task)
            groups.extend(p for p in pieces if p)
        chain.append(canonical_partition(groups))
    return tuple(chain)


def random_trees_of_similar_size(
    tasks: Sequence[str],
    costs: BlockCosts,
    target: float,
    count: int,
    *,
    seed: int,
    metric: str = "params",
    tolerance: float = 0.1,
    exclude: Iterable[Any] = (),
    points: Sequence[str] | None = None,
    attempts: int = 20_000,
) -> list[Tree]:
    """``count`` distinct random trees whose size is within ``tolerance`` of ``target``.

    When there are at most :data:`ENUMERATION_LIMIT` trees over ``tasks``
    (:func:`branchnas.search.count_trees`), the trees in the size band are drawn uniformly
    without replacement from :func:`branchnas.search.enumerate_trees`; otherwise
    :func:`random_chain` proposals are accepted until ``count`` distinct ones fall in the
    band or ``attempts`` run out. Sizes follow the cost model (:meth:`BlockCosts.size`).

    Args:
        tasks: The task names, in order.
        costs: The cost model of the backbone and heads (its D is the trees' depth).
        target: The reference size, e.g. the chosen tree's parameters.
        count: How many trees.
        seed: Seed of the draw.
        metric: ``params`` or ``flops``.
        tolerance: Relative half-width of the size band (0.1 = ±10%).
        exclude: Trees not to return (e.g. the chosen tree and the two extremes), as
            :class:`~branchnas.tree.Tree` objects over ``tasks`` or lists of partitions.
        points: Branch point names of the returned trees.
        attempts: Proposals tried when sampling.

    Returns:
        :class:`~branchnas.tree.Tree` objects; fewer than ``count`` when the band does not
        hold that many.

    Example:
        >>> trees = random_trees_of_similar_size(names, costs, costs.size([1, 2, 3]), 5, seed=0)
    """
    from branchnas.search import count_trees, enumerate_trees
    from branchnas.tree import Tree

    if count < 1:
        return []
    names = list(tasks)
    n, depth = len(names), costs.num_blocks
    excluded = {(t if isinstance(t, Tree) else Tree(t, tasks=names)).partitions for t in exclude}
    low, high = (1 - tolerance) * target, (1 + tolerance) * target

    def fits(chain: tuple[Partition, ...]) -> bool:
        return chain not in excluded and low <= costs.size([len(p) for p in chain], metric) <= high

    rng = random.Random(seed)
    if count_trees(n, depth) <= ENUMERATION_LIMIT:
        band = [c for c in enumerate_trees(n, depth) if fits(c)]
        found = rng.sample(band, min(count, len(band)))
    else:
        found = []
        for _ in range(attempts):
            chain = random_chain(n, depth, rng)
            if fits(chain) and chain not in found:
                found.append(chain)
                if len(found) == count:
                    break
    return [Tree(c, tasks=names, points=points) for c in found]


# --------------------------------------------------------------------------- tables


def comparison_table(data: Mapping[str, Any], markdown: bool = False) -> str:
    """The comparison as an aligned table (``markdown``: a GitHub table)."""
    from tabulate import tabulate

    from branchnas.budget import format_count
    from branchnas.tasks import format_delta

    tasks = data["tasks"]
    headers = ["model", "#params", "FLOPs", "FLOPs/task"]
    headers += [f"{t['name']} {t['metric']} {'↑' if t['higher_is_better'] else '↓'}" for t in tasks]
    headers += ["Δ_MTL (%) ↑", "s/epoch"]
    rows = []
    for row in data["rows"]:
        per_task = row.get("flops_per_task")
        cells = [row["name"], format_count(row["params"]), format_count(row["flops"]),
                 format_count(per_task) if per_task else "-"]
        cells += [f"{row['test'][t['name']][t['metric']]:.4f}" for t in tasks]
        cells.append(format_delta(row['delta_mtl'], percent=""))
        seconds = row.get("seconds_per_epoch")
        cells.append(f"{seconds:.0f}" if seconds else "-")
        rows.append(cells)
    align = ("left",) + ("right",) * (len(headers) - 1)
    return tabulate(rows, headers=headers, tablefmt="github" if markdown else "simple",
                    disable_numparse=True, colalign=align)


def comparison_markdown(data: Mapping[str, Any]) -> str:
    lines = [
        "# branchnas compare",
        "",
        f"Test split. {data['units']}; FLOPs/task: the mean FLOPs of one task's pass alone (the attentive "
        "variant runs one pass per task, so its FLOPs are the stem plus every task's pass). Δ_MTL against the "
        "single-task models (GatedMTL eq. 6).",
        "",
        comparison_table(data, markdown=True),
        "",
    ]
    if any(row["kind"] == "weighting" for row in data["rows"]):
        lines += ["s/epoch: mean wall seconds of a fine-tuning epoch (training and validation) on this machine.",
                  "", "![the chosen tree under each loss weighting](weightings.png)", ""]
    lines += ["## Trees", ""]
    for row in data["rows"]:
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"- **{row['name']}**: `{describe_partitions(row['partitions'])}`{note}")
    if data["random_requested"] and sum(r["kind"] == "random" for r in data["rows"]) < data["random_requested"]:
        lines += ["", f"Only {sum(r['kind'] == 'random' for r in data['rows'])} of the {data['random_requested']} "
                  "requested random trees fit within ±10% of the chosen tree's parameters."]
    return "\n".join(lines) + "\n"
