"""How much of one task's label each single-task encoder's features carry (a linear probe).

For a finished run directory, this fits a logistic regression of a classification task's label
on the pooled features after the last block of *each* task's single-task encoder (training
split), and reports its validation accuracy. A shared block that starts from encoder ``s`` gives
task ``t`` roughly what the probe of ``t`` on ``s`` finds; docs/why-a-task-collapses.md uses it.

Example::

    python bench/probe.py runs/shapes --task shape
"""

from __future__ import annotations

import argparse
import sys


def pooled_features(backbone, split, batch: int = 256):  # noqa: ANN001, ANN201
    """Global-average-pooled features after the last block, and the images' targets."""
    import torch

    feats, targets = [], {}
    with torch.no_grad():
        for start in range(0, len(split), batch):
            images, target = split.get_batch(list(range(start, min(start + batch, len(split)))), augment=False)
            h = backbone.stem(images)
            for block in backbone.blocks:
                h = block(h)
            feats.append(h.mean(dim=(2, 3)))
            for name, value in target.items():
                targets.setdefault(name, []).append(value)
    return torch.cat(feats), {k: torch.cat(v) for k, v in targets.items()}


def probe(train_x, train_y, val_x, val_y, classes: int, steps: int = 500) -> float:  # noqa: ANN001
    """Validation accuracy of a logistic regression fitted with Adam on standardised features."""
    import torch

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return float((linear(val_x).argmax(1) == val_y).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--task", required=True, help="a classification task of the run")
    args = parser.parse_args(argv)

    from pathlib import Path

    from branchnas.data import load_splits
    from branchnas.recipe import load_recipe
    from branchnas.rundir import RunDir
    from branchnas.stages.pretrain import load_single_task

    recipe = load_recipe(Path(args.run_dir) / "recipe.toml")
    rundir = RunDir(args.run_dir)
    splits, tasks = load_splits(recipe)
    by_name = {t.name: t for t in tasks}
    task = by_name[args.task]
    if task.kind != "classification":
        raise SystemExit(f"--task: '{task.name}' is a {task.kind} task; give a classification task")
    print(f"linear probe of '{task.name}' ({task.out_channels} classes) on each encoder's pooled last-block features")
    for source in by_name:
        backbone, _ = load_single_task(recipe, rundir, source)
        train_x, train_t = pooled_features(backbone, splits["train"])
        val_x, val_t = pooled_features(backbone, splits["val"])
        accuracy = probe(train_x, train_t[task.target], val_x, val_t[task.target], task.out_channels)
        print(f"    {source:<14} val accuracy {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
