"""Is the chosen tree better than random trees of the same size?

For each recipe (default: shapes, digits and ``planted``, a dataset with known structure from
``bench/planted.py``) and each seed (``--seeds 0,1``) this trains the single-task models and
measures the task affinity once, then, at each of several parameter budgets:

1. searches the tree with the least clustering cost that fits the budget (what branchnas picks);
2. draws ``--random`` random trees within ±``--tolerance`` of the picked tree's parameters
   (:func:`branchnas.compare.random_trees_of_similar_size`; the picked tree and the two
   extremes excluded, as in ``branchnas compare``);
3. fine-tunes every one of them with the same recipe (same epochs, same seeds:
   :func:`branchnas.finetune.finetune_tree`) and ranks the picked tree's test Δ_MTL among them.

Budgets are fractions of the way from the all-shared size to the all-separate size
(``--budgets 0.25,0.5,0.75``), so they mean the same on every recipe, or parameter counts
(``--budgets digits=12k,17k,21k``: for one recipe only). A recipe with few tree sizes (digits:
4 tasks on LeNet-5's 2 branch points make 60 trees in 10 size classes) needs budgets that
land in different classes.

It then reports, over every fine-tuned tree, the Spearman correlation between a tree's
clustering cost and its Δ_MTL, for the paper's cost and two alternatives (:data:`COSTS`):
published work found RSA affinity a poor predictor of multi-task outcomes, so this is
measured, not assumed.

Deterministic and resumable: every random choice takes the recipe seed, and everything is
written under ``--out`` (one run directory per recipe, with the fine-tuned trees in
``<run dir>/tree_quality/<config>/<tree>/``). Run the same command again after a kill and
it continues where it stopped; finished fine-tunings are read back, not redone.

Examples::

    python bench/tree_quality.py                                   # defaults below
    python bench/tree_quality.py --recipes digits --random 7 --finetune-epochs 4
    python bench/tree_quality.py --set shapes:data.options.size=16 --set backbone.width=0.5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def recipe_overrides(args: argparse.Namespace, name: str) -> list[str]:
    """The ``--set`` list of one recipe: the sizes and epochs of the command line, then ``--set``."""
    sets = [
        f'out="{args.out}"',
        f"data.num_train={args.num_train}",
        f"data.num_val={args.num_val}",
        f"data.num_test={args.num_test}",
        f"data.batch_size={args.batch_size}",
        f"pretrain.epochs={args.pretrain_epochs}",
        f"finetune.epochs={args.finetune_epochs}",
        f"affinity.images={min(args.affinity_images, args.num_val)}",
        f'pretrain.device="{args.device}"',
        f'finetune.device="{args.device}"',
        "export.check=false",
    ]
    if args.width is not None:
        sets.append(f"backbone.width={args.width}")
    for item in args.sets:
        prefix, sep, rest = item.partition(":")
        if sep and "=" not in prefix:  # "recipe:key=value" applies to that recipe only
            if prefix == name:
                sets.append(rest)
        else:
            sets.append(item)
    return sets


def tree_label(tree: Any) -> str:
    """A tree on one line: groups in braces per branch point, points separated by ``|``."""
    from branchnas.tree import describe_partitions

    return describe_partitions(tree.named_partitions())


def budget_values(specs: Sequence[str], name: str, smallest: int, largest: int) -> list[tuple[int, str]]:
    """``(budget in params, label)`` for recipe ``name`` from the ``--budgets`` options.

    A spec is ``LIST`` (every recipe) or ``RECIPE=LIST`` (that recipe; it wins). Items up to 1 are
    fractions of the way from ``smallest`` to ``largest``; others are counts such as ``12k``.
    """
    from branchnas.budget import parse_budget

    general = [spec for spec in specs if "=" not in spec]
    own = [spec.partition("=")[2] for spec in specs if spec.partition("=")[0] == name]
    text = (own or general or [""])[-1]
    items = [item.strip() for item in text.split(",") if item.strip()]
    out = []
    for item in items:
        try:
            fraction = float(item)
        except ValueError:
            fraction = None
        if fraction is not None and 0 <= fraction <= 1:
            out.append((int(smallest + fraction * (largest - smallest)), f"{fraction:g} of the way"))
        else:
            out.append((int(parse_budget(item, reference=largest)), item))
    return out


#: Clustering costs compared as predictors of Δ_MTL: the paper's and alternatives (all from A).
COSTS = ("paper", "size_weighted", "mean_pairwise")


def tree_cost(tree: Any, affinity: Any, kind: str) -> float:
    """A tree's clustering cost: ``paper`` is Σ_d mean_g max (1 − A) (the search's); the others
    weight each group by its share of the tasks (``size_weighted``: its max, ``mean_pairwise``:
    its mean pairwise dissimilarity)."""
    import itertools

    import numpy as np

    from branchnas.search import clustering_cost

    if kind == "paper":
        return clustering_cost(tree, affinity)
    n = len(tree.tasks)
    total = 0.0
    for d, partition in enumerate(tree.partitions):
        for group in partition:
            if len(group) < 2:
                continue
            dis = [1 - float(affinity[d, i, j]) for i, j in itertools.combinations(group, 2)]
            total += len(group) / n * (max(dis) if kind == "size_weighted" else float(np.mean(dis)))
    return total


def best_tree(kind: str, affinity: Any, costs: Any, budget: int, names: Sequence[str],
              points: Sequence[str], limit: int = 400_000) -> Any:
    """The tree with the least ``kind`` cost within ``budget`` params, by enumeration (None if too many)."""
    from branchnas.search import count_trees, enumerate_trees
    from branchnas.tree import Tree

    n, depth = len(names), costs.num_blocks
    if count_trees(n, depth) > limit:
        return None
    best, best_key = None, None
    for chain in enumerate_trees(n, depth):
        size = costs.size([len(p) for p in chain], "params")
        if size > budget:
            continue
        tree = Tree([[list(g) for g in p] for p in chain], tasks=list(names), points=list(points))
        key = (tree_cost(tree, affinity, kind), size)
        if best_key is None or key < best_key:
            best, best_key = tree, key
    return best


def spearman(costs: Sequence[float], deltas: Sequence[float]) -> float:
    """Spearman correlation of cost and Δ_MTL (negative: lower cost, better network)."""
    from scipy.stats import spearmanr

    return float(spearmanr(costs, deltas).statistic) if len(set(costs)) > 1 and len(set(deltas)) > 1 else float("nan")


def rank_of(picked: float, others: Sequence[float]) -> int:
    """1-based rank of ``picked`` among ``picked`` and ``others`` (higher is better; ties favour none)."""
    return 1 + sum(value > picked for value in others)


def bench_recipe(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Pretrain and affinity once, then the picked and random trees at every budget."""
    import numpy as np

    from branchnas.compare import random_trees_of_similar_size
    from branchnas.cost import recipe_costs
    from branchnas.data import load_splits
    from branchnas.finetune import finetune_tree
    from branchnas.pipeline import run_pipeline
    from branchnas.recipe import load_recipe
    from branchnas.rundir import fingerprint
    from branchnas.search import search
    from branchnas.stages import get_stage
    from branchnas.stages.affinity import read_affinity
    from branchnas.stages.pretrain import read_metrics
    from branchnas.tree import Tree

    base, seed = name.split("@") if "@" in name else (name, "0")
    dataset = base
    sets = recipe_overrides(args, base) + [f"seed={seed}", f'name="{base}-seed{seed}"']
    if base == "planted":  # generated here: the structure is known (bench/planted.py)
        sys.path.insert(0, str(ROOT / "bench"))
        import planted

        path = planted.write(Path(args.out) / "planted.npz", args.num_train + args.num_val + args.num_test)
        sets = [*planted.recipe_overrides(path), *sets]
        base = "shapes"  # the rest of the default recipe (backbone, training settings)
    recipe = load_recipe(ROOT / "recipes" / f"{base}.toml", sets)
    started = time.perf_counter()
    rundir, _ = run_pipeline(recipe, until="affinity")
    print(f"\n[{name}] run directory {rundir.path}; pretrain + affinity {time.perf_counter() - started:.0f} s",
          flush=True)
    metrics = read_metrics(rundir)["tasks"]
    print(f"[{name}] single-task test metrics (chance = best constant prediction):")
    for task, entry in metrics.items():
        metric = entry["metric"]
        arrow = "↑" if entry["higher_is_better"] else "↓"
        print(f"    {task:<14} {metric} {arrow}  test {entry['test'][metric]:.4f}   "
              f"chance {entry.get('chance', {}).get(metric, float('nan')):.4f}")

    costs, names, points = recipe_costs(recipe)
    data = read_affinity(rundir)
    order = [data["tasks"].index(t) for t in names]
    matrix = np.asarray(data["affinity"], dtype=np.float64)[:, order][:, :, order]
    depth = costs.num_blocks
    smallest, largest = costs.size([1] * depth), costs.size([len(names)] * depth)
    shared = Tree.all_shared(len(names), depth, tasks=names, points=points)
    separate = Tree.all_separate(len(names), depth, tasks=names, points=points)

    # Fine-tunings are kept per configuration: a changed recipe never reuses a stale one.
    pretrain_fp = rundir.stage_entry("pretrain")["fingerprint"]
    folder = rundir.path / "tree_quality" / fingerprint(get_stage("finetune").config(recipe, {}), pretrain_fp)
    splits = load_splits(recipe)
    done: dict[Any, float] = {}

    def delta(tree: Any) -> float:
        if tree.partitions not in done:
            out = folder / fingerprint([[list(g) for g in p] for p in tree.partitions])
            tick = time.perf_counter()
            fresh = not (out / "report.json").exists()
            report = finetune_tree(recipe, rundir, tree, out, desc=f"{name} tree", splits=splits)
            done[tree.partitions] = float(report["delta_mtl"])
            if fresh:
                print(f"    fine-tuned {tree_label(tree)}: Δ_MTL {100 * report['delta_mtl']:+.2f}% "
                      f"({time.perf_counter() - tick:.0f} s)", flush=True)
        return done[tree.partitions]

    rows = []
    with rundir.locked():
        for index, (budget, label) in enumerate(budget_values(args.budgets, dataset, smallest, largest)):
            result = search(matrix, costs, budget, metric="params", mode=recipe.search.mode, tasks=names,
                            points=points, exact_limit=recipe.search.exact_limit)
            picked = result.tree
            randoms = random_trees_of_similar_size(
                names, costs, result.best.params, args.random, seed=recipe.seed + index, points=points,
                tolerance=args.tolerance, exclude=[picked, shared, separate],
            )
            print(f"[{name}] budget {budget} ({label}): picked {tree_label(picked)} "
                  f"({result.best.params} params); {len(randoms)} random trees", flush=True)
            picked_delta = delta(picked)
            random_deltas = sorted((delta(t) for t in randoms), reverse=True)
            median = statistics.median(random_deltas) if random_deltas else float("nan")
            trees = [picked, *randoms]
            alternatives = {}
            for kind in COSTS[1:]:  # what each other cost would have picked, ranked on the same trees
                other = best_tree(kind, matrix, costs, budget, names, points)
                if other is None:
                    continue
                other_delta = delta(other)
                alternatives[kind] = {"tree": tree_label(other), "delta": other_delta,
                                      "rank": rank_of(other_delta, random_deltas),
                                      "beats_median": bool(random_deltas) and other_delta > median}
            rows.append({
                "alternatives": alternatives,
                "costs": {kind: [tree_cost(t, matrix, kind) for t in trees] for kind in COSTS},
                "deltas": [picked_delta, *(done[t.partitions] for t in randoms)],
                "budget": budget, "label": label, "picked": tree_label(picked),
                "picked_params": result.best.params, "picked_cost": result.cost,
                "picked_delta": picked_delta, "random_deltas": random_deltas,
                "random_trees": [tree_label(t) for t in randoms],
                "median_random": median, "rank": rank_of(picked_delta, random_deltas),
                "out_of": 1 + len(random_deltas),
                "beats_median": bool(random_deltas) and picked_delta > median,
            })
    return rows


def format_table(name: str, rows: Sequence[dict[str, Any]]) -> str:
    """The per-recipe table: one line per budget."""
    header = ["budget", "picked tree (groups per branch point)", "picked Δ_MTL", "random Δ_MTLs (sorted, %)",
              "median random", "rank", "beats median"]
    body = []
    for row in rows:
        body.append([
            f"{row['budget']:,}", row["picked"], f"{100 * row['picked_delta']:+.2f}%",
            " ".join(f"{100 * d:+.2f}" for d in row["random_deltas"]) or "-",
            f"{100 * row['median_random']:+.2f}%", f"{row['rank']}/{row['out_of']}",
            "yes" if row["beats_median"] else "no",
        ])
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    lines = [f"== {name} ==", "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="shapes,digits,planted",
                        help="comma-separated recipe names in recipes/, or planted (bench/planted.py)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated recipe seeds (data, weights, random trees)")
    parser.add_argument("--out", default="runs-bench/tree-quality", help="parent of the run directories (reused)")
    parser.add_argument("--budgets", action="append", default=[], metavar="[RECIPE=]LIST",
                        help="comma-separated fractions of the way from the all-shared to the all-separate "
                             "params, or counts (12k); RECIPE= limits it to one recipe (repeatable; "
                             "default 0.25,0.5,0.75)")
    parser.add_argument("--random", type=int, default=5, help="random trees per budget")
    parser.add_argument("--tolerance", type=float, default=0.1, help="size band of the random trees (0.1 = ±10%%)")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--affinity-images", type=int, default=200)
    parser.add_argument("--width", type=float, default=None, help="backbone.width of every recipe")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="[RECIPE:]KEY=VALUE",
                        help="extra recipe override, for every recipe or for one (shapes:data.options.size=16)")
    args = parser.parse_args(argv)
    args.budgets = args.budgets or ["0.25,0.5,0.75"]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        for seed in seeds:
            results[f"{name}@{seed}"] = bench_recipe(f"{name}@{seed}", args)
    print(f"\nsettings: {' '.join(sys.argv[1:]) or '(defaults)'}; wall time {time.perf_counter() - started:.0f} s")
    for name, rows in results.items():
        print()
        print(format_table(name, rows))
    rows = [row for r in results.values() for row in r]
    wins = sum(row["beats_median"] for row in rows)
    print(f"\npicked beats the median random tree at {wins} of {len(rows)} budgets (the paper's cost)")
    for kind in COSTS[1:]:
        alt = [row["alternatives"][kind] for row in rows if kind in row.get("alternatives", {})]
        if alt:
            print(f"    with the {kind} cost: {sum(a['beats_median'] for a in alt)} of {len(alt)} budgets; ranks "
                  + " ".join(f"{a['rank']}" for a in alt))
    print("\nSpearman correlation of clustering cost with Δ_MTL over every fine-tuned tree "
          "(negative = lower cost, better network; per run: pooled over its budgets):")
    for kind in COSTS:
        per = []
        for name, rs in results.items():
            costs = [c for r in rs for c in r["costs"][kind]]
            deltas = [d for r in rs for d in r["deltas"]]
            per.append(f"{name} {spearman(costs, deltas):+.2f}")
        within = [spearman(r["costs"][kind], r["deltas"]) for r in rows]
        mean_within = sum(w for w in within if w == w) / max(1, sum(1 for w in within if w == w))
        print(f"    {kind:<14} per run: {', '.join(per)}; mean within a budget {mean_within:+.2f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tree_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
