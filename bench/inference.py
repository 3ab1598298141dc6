"""Inference speed of a branched network against the models it replaces, measured in one run.

Three ways to serve the same N tasks, timed side by side on the same input batch:

* **branched**: the exported (TorchScript) branched network of a tree, one call for all tasks;
* **single-task x N**: the N single-task models (stem + every block + head), scripted and run
  one after another, as a deployment without branchnas would;
* **all-shared**: the exported branched network of the all-shared tree (the MTL baseline).

Next to each measured speed-up over the N single-task models it prints the speed-up that the
FLOP count predicts (ratio of fvcore FLOPs per image, one multiply-add = one flop, from
``branchnas.cost``), and their ratio; the target is a branched speed-up within 15% of the
prediction. Timing: fixed ``torch.set_num_threads``, warm-up passes, then ``--repeats``
rounds in which every model (and every part, below) runs ``--iters`` batches in turn
(interleaved, so that load from other processes hits all of them alike); the median round
counts.

FLOPs are not time: on a CPU a narrow convolution at high resolution (ResNet-20's first
stage at 64x64) costs two to three times more per FLOP than a wide one at low resolution, and
the stem more still. So the bench also times the stem, every block and every head on their
own (scripted, same batch, in the same rounds) and predicts each speed-up from those per-block latencies
(``stem + sum_d |P_d| * t_block_d + heads``, as the size formula but in seconds). A branched
network that matches the latency prediction has no overhead of its own; the gap between the
two predictions is what FLOPs miss.

Latency table check (``--trees K``, default 5; 0 skips it): measures the per-part latency
table with the library (:func:`branchnas.latency.measure_parts`, the table that
``search.metric = "latency"`` and ``branchnas profile`` use), then builds and exports the
chosen tree and K random trees (:func:`branchnas.compare.random_chain`, distinct, not the
chosen one), times them in the same interleaved rounds as the parts, and prints per tree the latency per image
predicted from the table, the measured one and their ratio; the target is within 10% for
every tree.

Weights are random unless ``--run`` names a finished run (speed does not depend on them).
The tree is ``--tree`` (a tree JSON file), else the run's ``search/tree.json``, else the
default recipe's run if it exists, else a stand-in: all tasks share the first half of the
blocks, dense and global tasks split there, every task separates at the last block.

Run::

    python bench/inference.py                         # default recipe, random weights
    python bench/inference.py --run runs/shapes       # a finished run's models and tree
    python bench/inference.py --batch-size 64 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=None, help="recipe file (default: the built-in default recipe)")
    parser.add_argument("--run", default=None, help="a run directory: use its trained models and tree")
    parser.add_argument("--tree", default=None, help="a tree JSON file (search/tree.json or Tree.save)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5, help="batches per model per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trees", type=int, default=5, help="random trees for the latency-table check (0: skip it)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser.parse_args()


def _resolve(args: argparse.Namespace):
    """The recipe, a tiny load of its data (tasks, channels, size) and the run directory."""
    from branchnas.data import load_splits
    from branchnas.recipe import load_recipe
    from branchnas.rundir import RunDir

    if args.run:
        rundir = RunDir(args.run)
        recipe = load_recipe(rundir.path / "recipe.toml")
    else:
        recipe = load_recipe(args.recipe)
        rundir = RunDir(recipe.run_dir) if (recipe.run_dir / "search" / "tree.json").exists() else None
    # Only the task list, channels and image size are needed: load a handful of images.
    tiny = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, num_train=4, num_val=4, num_test=4))
    splits, tasks = load_splits(tiny)
    return recipe, rundir, tasks, splits["train"]


def _stand_in_tree(tasks, depth: int, points):
    from branchnas.tree import Tree

    names = [t.name for t in tasks]
    dense = [t.name for t in tasks if t.dense]
    other = [t.name for t in tasks if not t.dense]
    middle = [g for g in (dense, other) if g]
    half = max(1, depth // 2)
    partitions = [[names]] * half + [middle] * (depth - half - 1) + [[[n] for n in names]]
    if depth == 1:
        partitions = [middle]
    return Tree(partitions[:depth], tasks=names, points=points)


def _models(args, recipe, rundir, tasks, data):
    """(single-task models, branched net, all-shared net, tree, cost model), all in eval mode."""
    import torch
    from torch import nn

    from branchnas.backbones import build_backbone
    from branchnas.cost import block_costs
    from branchnas.heads import build_head
    from branchnas.models import BranchedNet
    from branchnas.tree import Tree

    names = [t.name for t in tasks]
    size = tuple(data.image_size)
    if rundir is not None and (rundir.path / "pretrain").exists() and args.run:
        from branchnas.stages.pretrain import load_single_task

        pairs = {n: load_single_task(recipe, rundir, n) for n in names}
        backbones = {n: pairs[n][0] for n in names}
        heads = {n: pairs[n][1] for n in names}
        weights = f"trained ({rundir.path})"
    else:
        torch.manual_seed(args.seed)
        backbone = build_backbone(dataclasses.replace(recipe.backbone, weights=""), data.in_channels, size)
        heads = {t.name: build_head(t, backbone.out_channels, backbone.reduction, size) for t in tasks}
        backbones = {n: copy.deepcopy(backbone) for n in names}
        weights = "random"
    first = backbones[names[0]]
    points = [info.name for info in first.block_info]
    from branchnas.finetune import load_tree

    if args.tree:
        tree, source = load_tree(args.tree), args.tree
    elif rundir is not None and (rundir.path / "search" / "tree.json").exists():
        tree, source = load_tree(rundir.path / "search" / "tree.json"), str(rundir.path / "search" / "tree.json")
    else:
        tree, source = _stand_in_tree(tasks, first.num_blocks, points), "stand-in (no run found)"
    branched = BranchedNet.from_single_task(tree, backbones, heads, tasks=names).eval()
    shared = BranchedNet.from_single_task(Tree.all_shared(len(names), first.num_blocks, names, points),
                                          backbones, heads, tasks=names).eval()
    singles = {n: nn.Sequential(backbones[n], heads[n]).eval() for n in names}
    costs = block_costs(first, heads, size, data.in_channels)
    return singles, branched, shared, tree, source, costs, weights, first, heads


def _export(net, data, tasks, folder: Path, name: str):
    """Export through branchnas.export (as `branchnas export` does) and load the file back."""
    import torch

    from branchnas.export import build_metadata, export_model

    info = {
        "tasks": [{f: getattr(t, f) for f in ("name", "kind", "target", "num_classes", "channels", "weight", "loss_name")}
                  for t in tasks],
        "in_channels": data.in_channels, "image_size": list(data.image_size),
        "mean": list(data.mean), "std": list(data.std), "partitions": net.partitions(),
    }
    path = folder / f"{name}.pt"
    export_model(net, path, build_metadata(net, info), check=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _parts(backbone, heads, x) -> dict[str, tuple[object, object]]:
    """The stem, each block and each head, scripted, each with the input it gets in the network."""
    import torch

    parts = {"stem": _script(backbone.stem)}
    parts.update({f"block{d}": _script(block) for d, block in enumerate(backbone.blocks)})
    parts.update({f"head:{name}": _script(head) for name, head in heads.items()})
    out, h = {}, x
    with torch.inference_mode():
        for name in ["stem"] + [f"block{d}" for d in range(len(backbone.blocks))]:
            out[name] = (parts[name], h)
            h = parts[name](h)
    for name in heads:
        out[f"head:{name}"] = (parts[f"head:{name}"], h)
    return out


def _time_interleaved(runners: dict[str, tuple[object, object]], args) -> dict[str, list[float]]:
    """Seconds per call of every ``(fn, input)``, per round; each round runs every one in turn.

    Interleaving makes load from other processes hit every runner alike, so the ratios hold
    even where the absolute speeds drift.
    """
    import torch

    rounds: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for fn, inputs in runners.values():
            for _ in range(args.warmup):
                fn(inputs)
        for _ in range(args.repeats):
            for name, (fn, inputs) in runners.items():
                start = time.perf_counter()
                for _ in range(args.iters):
                    fn(inputs)
                rounds[name].append((time.perf_counter() - start) / args.iters)
    return rounds


def _latency_size(latency, counts) -> float:
    return latency["stem"] + sum(n * t for n, t in zip(counts, latency["blocks"], strict=True)) + sum(latency["heads"].values())


def _script(module):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


def main() -> None:
    import torch

    args = _parse()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    recipe, rundir, tasks, data = _resolve(args)
    singles, branched, shared, tree, source, costs, weights, backbone, heads = _models(args, recipe, rundir, tasks, data)
    names = [t.name for t in tasks]

    with tempfile.TemporaryDirectory() as tmp:
        exported = _export(branched, data, tasks, Path(tmp), "branched")
        exported_shared = _export(shared, data, tasks, Path(tmp), "shared")
    scripted_singles = [_script(singles[n]) for n in names]

    def run_singles(x):
        return [m(x) for m in scripted_singles]

    x = torch.randn(args.batch_size, data.in_channels, *data.image_size, generator=torch.Generator().manual_seed(0))
    models = {"branched (exported)": exported, f"single-task x {len(names)}": run_singles,
              "all-shared (exported)": exported_shared}
    parts = _parts(backbone, {n: heads[n] for n in names}, x)
    rounds = _time_interleaved({**{k: (fn, x) for k, fn in models.items()}, **parts}, args)
    median = {k: statistics.median(v) for k, v in rounds.items()}
    latency = {"stem": median["stem"], "blocks": [median[f"block{d}"] for d in range(costs.num_blocks)],
               "heads": {n: median[f"head:{n}"] for n in names}}
    speed = {k: args.batch_size / median[k] for k in models}
    spread = {k: (max(rounds[k]) - min(rounds[k])) / median[k] for k in models}

    single_key = f"single-task x {len(names)}"
    flops = {
        "branched (exported)": costs.size(list(tree.groups_per_point()), "flops"),
        single_key: sum(costs.single_task(n, "flops") for n in names),
        "all-shared (exported)": costs.size([1] * costs.num_blocks, "flops"),
    }
    params = {
        "branched (exported)": costs.size(list(tree.groups_per_point()), "params"),
        single_key: sum(costs.single_task(n, "params") for n in names),
        "all-shared (exported)": costs.size([1] * costs.num_blocks, "params"),
    }
    depth, n = costs.num_blocks, len(names)
    seconds = {
        "branched (exported)": _latency_size(latency, tree.groups_per_point()),
        single_key: _latency_size(latency, [n] * depth) + (n - 1) * latency["stem"],
        "all-shared (exported)": _latency_size(latency, [1] * depth),
    }
    rows = []
    for key in models:
        measured = speed[key] / speed[single_key]
        predicted = flops[single_key] / flops[key]
        by_latency = seconds[single_key] / seconds[key]
        rows.append({"model": key, "params": params[key], "flops_per_image": flops[key],
                     "images_per_s": speed[key], "round_spread": spread[key],
                     "speedup_measured": measured, "speedup_flops": predicted, "ratio": measured / predicted,
                     "speedup_latency": by_latency, "ratio_latency": measured / by_latency})
    _print(args, recipe, tree, source, weights, data, rows, latency, costs)
    check = _table_check(args, tree, backbones_for_trees(backbone, names), heads, tasks, data, costs, x)
    branched_row = rows[0]
    if args.json:
        Path(args.json).write_text(json.dumps({
            "recipe": recipe.name, "tree": tree.to_json(), "tree_source": source, "weights": weights,
            "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats, "iters": args.iters,
            "image_size": list(data.image_size), "torch": torch.__version__, "rows": rows,
            "part_seconds_per_batch": latency,
            "branched_within_15_percent": abs(branched_row["ratio"] - 1) <= 0.15,
            "latency_table_check": check,
        }, indent=2) + "\n")


def backbones_for_trees(backbone, names):
    """One copy of the backbone per task (random weights: the speed does not depend on them)."""
    return {n: copy.deepcopy(backbone) for n in names}


def _table_check(args, chosen, backbones, heads, tasks, data, costs, x):
    """Predicted (library latency table) against measured latency of the chosen and random trees."""
    import random

    from tabulate import tabulate

    from branchnas.budget import format_seconds
    from branchnas.compare import random_chain
    from branchnas.latency import measure_parts
    from branchnas.models import BranchedNet
    from branchnas.tree import Tree

    if args.trees < 1:
        return None
    names = [t.name for t in tasks]
    points = list(chosen.points)
    rng = random.Random(args.seed)
    trees, seen = [("chosen", chosen)], {chosen.partitions}
    for _ in range(10_000):
        if len(trees) > args.trees:
            break
        chain = random_chain(len(names), costs.num_blocks, rng)
        if chain not in seen:
            seen.add(chain)
            trees.append((f"random {len(trees)}", Tree(chain, tasks=names, points=points)))
    with tempfile.TemporaryDirectory() as tmp:
        nets = {label: _export(BranchedNet.from_single_task(t, backbones, heads, tasks=names).eval(), data,
                               tasks, Path(tmp), f"tree{i}")
                for i, (label, t) in enumerate(trees)}
    # The table's parts and the built trees run in the same interleaved rounds: machine drift
    # between two separate passes (10-20% on a shared 2-core box) would otherwise dominate.
    table = measure_parts(backbones[names[0]], {n: heads[n] for n in names}, tuple(data.image_size), data.in_channels,
                          batch_size=args.batch_size, threads=args.threads, repeats=args.repeats, iters=args.iters,
                          warmup=args.warmup, extra=nets)
    timed = costs.with_latency(table)
    rows = []
    for label, t in trees:
        predicted = timed.size(list(t.groups_per_point()), "latency")
        measured = table["extra"][label]
        rows.append({"tree": label, "groups_per_point": list(t.groups_per_point()), "partitions": t.to_json(),
                     "predicted_s": predicted, "measured_s": measured, "ratio": measured / predicted,
                     "within_10_percent": abs(measured / predicted - 1) <= 0.10})
    print(f"\nlatency table check: per-part table by branchnas.latency.measure_parts ({table['mode']}, batch "
          f"{table['batch_size']}, threads {table['threads']}), each tree exported and timed in the same "
          f"interleaved rounds; seconds per image")
    print(tabulate([[r["tree"], "-".join(map(str, r["groups_per_point"])), format_seconds(r["predicted_s"]),
                     format_seconds(r["measured_s"]), f"{r['ratio']:.3f}", "yes" if r["within_10_percent"] else "NO"]
                    for r in rows],
                   headers=["tree", "groups/point", "predicted", "measured", "meas./pred.", "within 10%"],
                   disable_numparse=True, colalign=("left", "left", "right", "right", "right", "left")))
    missed = [r["tree"] for r in rows if not r["within_10_percent"]]
    print(f"{len(rows) - len(missed)} of {len(rows)} trees within 10% of the table's prediction"
          + (f"; missed: {', '.join(missed)}" if missed else ""))
    for label, t in trees[1:]:
        print(f"  {label}: {repr(t)[5:-1]}")
    return {"table": {k: v for k, v in table.items() if k != "extra"}, "trees": rows}


def _print(args, recipe, tree, source, weights, data, rows, latency, costs) -> None:
    import torch
    from tabulate import tabulate

    from branchnas.budget import format_count

    print(f"recipe {recipe.name}: backbone {recipe.backbone.name}, {len(tree.tasks)} tasks, "
          f"images {data.in_channels}x{data.image_size[0]}x{data.image_size[1]}; weights {weights}")
    print(f"tree ({source}): groups per branch point {list(tree.groups_per_point())}")
    print(tree.render())
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
          f"batch {args.batch_size}, {args.repeats} rounds x {args.iters} batches, median round\n")
    parts = [("stem", costs.stem_flops, latency["stem"])]
    parts += [(f"block {d}", f, t) for d, (f, t) in enumerate(zip(costs.block_flops, latency["blocks"], strict=True))]
    parts += [(f"head {n}", costs.head_flops[n], t) for n, t in latency["heads"].items()]
    print(tabulate([[name, format_count(f), f"{1000 * t:.2f}", f"{1e9 * t / (args.batch_size * f):.3f}" if f else "-"]
                    for name, f, t in parts],
                   headers=["part", "FLOPs/img", "ms/batch", "ns/FLOP"], disable_numparse=True,
                   colalign=("left", "right", "right", "right")))
    print()
    table = [[r["model"], format_count(r["params"]), format_count(r["flops_per_image"]),
              f"{r['images_per_s']:.1f}", f"{100 * r['round_spread']:.0f}%", f"{r['speedup_measured']:.2f}x",
              f"{r['speedup_flops']:.2f}x", f"{r['ratio']:.2f}", f"{r['speedup_latency']:.2f}x",
              f"{r['ratio_latency']:.2f}"] for r in rows]
    print(tabulate(table, headers=["model", "params", "FLOPs/img", "images/s", "spread", "speed-up",
                                   "by FLOPs", "meas./FLOPs", "by block latency", "meas./latency"],
                   disable_numparse=True, colalign=("left",) + ("right",) * 9))
    branched = rows[0]
    verdict = "within" if abs(branched["ratio"] - 1) <= 0.15 else "NOT within"
    print(f"\nbranched speed-up over the single-task models: {branched['speedup_measured']:.2f}x measured, "
          f"{branched['speedup_flops']:.2f}x predicted by FLOPs ({verdict} 15%: measured/predicted = "
          f"{branched['ratio']:.2f}), {branched['speedup_latency']:.2f}x predicted by per-block latency "
          f"(measured/predicted = {branched['ratio_latency']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
