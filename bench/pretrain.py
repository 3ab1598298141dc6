"""Stage 1 throughput: the N single-task models trained one after another vs together.

Trains the same N models (same initial weights, same data, same seed) in one process:

* ``sequential``: N separate trainers, one model each (N data loads per batch);
* ``shared``: one trainer, every batch loaded and augmented once for all N models;
* ``stacked``: one trainer, the N encoders run as one vmapped (grouped) computation.

Repeats are interleaved so that slow drifts of a shared machine hit every way alike; the
ratio is taken per repeat against that repeat's sequential time, and the median is printed.
Each way also reports how far its weights end from the sequential ones (0 = bit-identical).

``--precision`` times the stage-1 training instead (the N models together, as
``branchnas pretrain`` trains them) in fp32 and in bf16 autocast, interleaved the same way,
and prints the bf16:fp32 throughput ratio. It also measures this machine's matmul peak
(a 2048x2048 fp32 and bf16 matmul) and states each precision's training throughput as a share
of its peak. FLOPs are real ones (a multiply-add is 2): a training step counts 3 forward
passes (forward, and a backward of about twice its cost), each 2x fvcore's multiply-adds.

Examples:
    python bench/pretrain.py                                  # default shapes data, tiny epochs
    python bench/pretrain.py --size 32 --num-train 512 --repeats 5 --threads 1
    python bench/pretrain.py --device cuda --num-train 4096   # on a GPU
    python bench/pretrain.py --precision --size 32 --num-train 512 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
    parser.add_argument("--precision", action="store_true",
                        help="time stage-1 training in fp32 vs bf16 and against the matmul peak (instead of --modes)")
    parser.add_argument("--peak-size", type=int, default=2048, help="--precision: side of the square peak matmul")
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

    if args.precision:
        _precision(args, recipe, tasks, train, initial, device, sync)
        return

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


def _matmul_gflops(n: int, dtype, device, sync, seconds: float = 0.3) -> float:
    """Best GFLOP/s (2 n^3 per product) of an n x n matmul over about ``seconds``, after a warm-up."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: kernel choice, AMX tile set-up
    best = float("inf")
    spent, runs = 0.0, 0
    while runs < 3 or spent < seconds:
        sync()
        started = time.perf_counter()
        torch.mm(a, b)
        sync()
        elapsed = time.perf_counter() - started
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return 2 * n**3 / best / 1e9


def _precision(args, recipe, tasks, train, initial, device, sync) -> None:
    """fp32 vs bf16 stage-1 training throughput, interleaved, and each against its matmul peak."""
    import torch

    from branchnas.cost import count_flops
    from branchnas.training import Trainer
    from branchnas.training.runtime import resolve_precision

    resolve_precision("bf16", device, "--precision")  # a one-line reason where bf16 is not native
    batch = recipe.data.batch_size
    h, w = train.image_size
    # fvcore counts a multiply-add as one flop: x2 for real FLOPs, x3 for forward + backward.
    forward = sum(count_flops(m, torch.zeros(1, train.in_channels, h, w)) for m in initial.values())
    per_image = 3 * 2 * forward
    configs = {p: dataclasses.replace(recipe.pretrain, precision=p) for p in ("fp32", "bf16")}

    def train_once(cfg) -> tuple[dict, float]:
        models = copy.deepcopy(initial)
        trainer = Trainer(models, tasks, cfg, batch_size=batch, seed=recipe.seed, augment=recipe.data.augment,
                          progress=False)
        sync()
        started = time.perf_counter()
        trainer.fit(train)
        sync()
        return models, time.perf_counter() - started

    concurrent = Trainer(copy.deepcopy(initial), tasks, configs["bf16"], batch_size=batch, seed=recipe.seed,
                         progress=False).concurrent
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {len(tasks)} models "
          f"({recipe.backbone.name} width {recipe.backbone.width}, concurrent {concurrent}), {len(train)} train "
          f"images {h}x{w}, batch {batch}, {args.epochs} epoch(s), {args.repeats} repeats; "
          f"{per_image / 1e9:.3f} GFLOP per training image (all models)", flush=True)
    warm = train.subset(range(min(len(train), 2 * batch))) if hasattr(train, "subset") else train
    for precision in configs:  # untimed: allocator, oneDNN/cuDNN kernel choice
        Trainer(copy.deepcopy(initial), tasks, dataclasses.replace(configs[precision], epochs=1), batch_size=batch,
                seed=recipe.seed, progress=False).fit(warm)
    images = len(train) * args.epochs
    rates: dict[str, list[float]] = {p: [] for p in configs}
    peaks: dict[str, list[float]] = {p: [] for p in configs}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    finals: dict[str, dict] = {}
    for repeat in range(args.repeats):
        order = list(configs) if repeat % 2 == 0 else list(reversed(configs))
        for precision in order:
            finals[precision], seconds = train_once(configs[precision])
            rates[precision].append(images / seconds)
            peaks[precision].append(_matmul_gflops(args.peak_size, dtypes[precision], device, sync))
        print("  repeat", repeat + 1, " ".join(
            f"{p} {rates[p][-1]:.1f} img/s (peak {peaks[p][-1]:.0f} GFLOP/s)" for p in configs), flush=True)

    peak = {p: max(v) for p, v in peaks.items()}
    print(f"\n{'precision':<10}{'img/s':>10}{'GFLOP/s':>10}{'matmul peak':>13}{'of peak':>9}")
    for precision in configs:
        rate = statistics.median(rates[precision])
        gflops = rate * per_image / 1e9
        print(f"{precision:<10}{rate:>10.1f}{gflops:>10.1f}{peak[precision]:>13.0f}{gflops / peak[precision]:>9.1%}")
    ratios = [b / f for b, f in zip(rates["bf16"], rates["fp32"], strict=True)]
    diff = max(
        (a.float() - b.float()).abs().max().item()
        for t in tasks
        for a, b in zip(finals["bf16"][t.name].state_dict().values(),
                        finals["fp32"][t.name].state_dict().values(), strict=True)
        if a.is_floating_point()
    )
    print(f"bf16:fp32 training throughput {statistics.median(ratios):.2f} (median of {len(ratios)} repeats; "
          f"range {min(ratios):.2f}-{max(ratios):.2f}); matmul peak bf16:fp32 {peak['bf16'] / peak['fp32']:.2f}; "
          f"max |w_bf16 - w_fp32| {diff:.2e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
