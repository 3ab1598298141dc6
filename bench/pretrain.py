"""Stage 1 throughput: the N single-task models trained one after another vs together.

Trains the same N models (same initial weights, same data, same seed) in one process:

* ``sequential``: N separate trainers, one model each (N data loads per batch);
* ``shared``: one trainer, every batch loaded and augmented once for all N models;
* ``stacked``: one trainer, the N encoders run as one vmapped (grouped) computation.

Repeats are interleaved so that slow drifts of a shared machine hit every way alike; the
ratio is taken per repeat against that repeat's sequential time, and the median is printed.
Each way also reports how far its weights end from the sequential ones (0 = bit-identical).

Examples:
    python bench/pretrain.py                                  # default shapes data, tiny epochs
    python bench/pretrain.py --size 32 --num-train 512 --repeats 5 --threads 1
    python bench/pretrain.py --device cuda --num-train 4096   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=None, help="recipe file (default: the built-in shapes recipe)")
    parser.add_argument("--size", type=int, default=None, help="shapes image side (default: the recipe's, 64)")
    parser.add_argument("--num-train", type=int, default=256, help="training images per epoch")
    parser.add_argument("--num-val", type=int, default=64, help="validation images per epoch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=float, default=None, help="backbone.width (default: the recipe's)")
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    parser.add_argument("--modes", default="shared,stacked", help="concurrent ways to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    args = parser.parse_args(argv)

    import torch

    from branchnas.data import load_splits
    from branchnas.pretrain import build_single_task
    from branchnas.recipe import load_recipe
    from branchnas.training import Trainer, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [
        f"data.num_train={args.num_train}", f"data.num_val={args.num_val}", "data.num_test=16",
        f"pretrain.epochs={args.epochs}", f"data.batch_size={args.batch_size}", f"pretrain.device={args.device}",
        *args.overrides,
    ]
    if args.size is not None:
        overrides.append(f"data.options.size={args.size}")
    if args.width is not None:
        overrides.append(f"backbone.width={args.width}")
    recipe = load_recipe(args.recipe, overrides)
    splits, tasks = load_splits(recipe)
    if args.tasks:
        wanted = args.tasks.split(",")
        tasks = [t for t in tasks if t.name in wanted]
    train, val = splits["train"], splits["val"]
    device = resolve_device(recipe.pretrain.device)
    initial = {t.name: build_single_task(recipe, t, train.in_channels, train.image_size) for t in tasks}
    cfg, batch = recipe.pretrain, recipe.data.batch_size

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def sequential() -> dict:
        models = copy.deepcopy(initial)
        for t in tasks:
            Trainer({t.name: models[t.name]}, [t], cfg, batch_size=batch, seed=recipe.seed, augment=recipe.data.augment,
                    concurrent="shared", progress=False).fit(train, val)
        return models

    def together(mode: str) -> dict:
        models = copy.deepcopy(initial)
        Trainer(models, tasks, cfg, batch_size=batch, seed=recipe.seed, augment=recipe.data.augment,
                concurrent=mode, progress=False).fit(train, val)
        return models

    ways = {"sequential": sequential}
    for mode in args.modes.split(","):
        ways[mode] = lambda mode=mode: together(mode)

    h, w = train.image_size
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {len(tasks)} models "
          f"({recipe.backbone.name} width {recipe.backbone.width}), {len(train)} train + {len(val)} val images "
          f"{h}x{w}, batch {batch}, {args.epochs} epoch(s), {args.repeats} repeats", flush=True)
    # Warm-up (allocator, oneDNN/cuDNN kernel choice) on a slice, untimed.
    warm_cfg = copy.deepcopy(cfg)
    warm_cfg.epochs = 1
    for mode in ways:
        models = copy.deepcopy(initial)
        Trainer(models, tasks, warm_cfg, batch_size=batch, seed=recipe.seed,
                concurrent="shared" if mode == "sequential" else mode, progress=False).fit(
                    train.subset(range(min(len(train), 2 * batch))) if hasattr(train, "subset") else train)
    times: dict[str, list[float]] = {name: [] for name in ways}
    finals: dict[str, dict] = {}
    for repeat in range(args.repeats):
        order = list(ways) if repeat % 2 == 0 else list(reversed(ways))
        for name in order:
            sync()
            started = time.perf_counter()
            finals[name] = ways[name]()
            sync()
            times[name].append(time.perf_counter() - started)
        print("  repeat", repeat + 1, " ".join(f"{n} {times[n][-1]:.2f}s" for n in ways), flush=True)

    print(f"\n{'way':<12}{'median s':>10}{'min s':>9}{'ratio':>8}  max |w - w_sequential|")
    for name in ways:
        ratios = [t / s for t, s in zip(times[name], times["sequential"], strict=True)]
        diff = max(
            (a - b).abs().max().item()
            for t in tasks
            for a, b in zip(finals[name][t.name].state_dict().values(),
                            finals["sequential"][t.name].state_dict().values(), strict=True)
            if a.is_floating_point()
        )
        print(f"{name:<12}{statistics.median(times[name]):>10.2f}{min(times[name]):>9.2f}"
              f"{statistics.median(ratios):>8.3f}  {diff:.2e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
