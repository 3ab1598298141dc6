"""Per-part latency tables: the stem, each block and each head timed on this machine.

A latency table predicts a tree's time per image the way :mod:`branchnas.cost` predicts its
size (``stem + sum_d |P_d| * t_block_d + sum_t head_t``); ``bench/inference.py`` checks the
prediction against built networks. Parts are timed as follows:

* in eval mode, under ``torch.inference_mode`` (no autograd), on a random batch of
  ``batch_size`` images of the recipe's size; each part gets the tensor that reaches it in
  the network (every block at the resolution it runs at; every head on the last block's
  output);
* scripted with TorchScript (``mode = "torchscript"``), or eager if a part cannot be
  scripted (``mode = "eager"``, then for all parts);
* with ``torch.set_num_threads(threads)`` (restored afterwards);
* ``warmup`` calls of every part, then ``repeats`` rounds in which every part runs ``iters``
  batches in turn (interleaved, so that load from other processes hits all parts alike);
  a part's time is the median round, divided by the batch size.

Times are **seconds per image** at that batch size and thread count; both are recorded in
the table (``batch_size``, ``threads``), as are the machine and the torch version, so a table
measured on the deployment machine (``branchnas profile -o profile.json``) can drive a search
elsewhere (``search.latency_table``). torch is imported only by the functions that measure.

Table (JSON)::

    {"format": "branchnas.latency/1", "unit": "seconds per image",
     "backbone": {"name", "width", "granularity", "dilation"}, "points": [...], "tasks": [...],
     "image_size": [H, W], "in_channels": C, "batch_size": B, "threads": T, "mode": "torchscript",
     "repeats", "iters", "warmup", "machine": {...}, "torch": "2.x",
     "stem": s, "blocks": [s, ...], "heads": {task: s}}
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from branchnas.errors import UserError

__all__ = ["FORMAT", "measure_parts", "recipe_identity", "recipe_table", "load_table", "check_table", "machine_info"]

FORMAT = "branchnas.latency/1"


def machine_info() -> dict[str, Any]:
    """A short description of this machine (for the table's ``machine`` field)."""
    return {"node": platform.node(), "system": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def _script_all(modules: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """TorchScript every module, or (if any fails) keep them all eager."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return {k: torch.jit.script(m) for k, m in modules.items()}, "torchscript"
    except Exception:  # noqa: BLE001 - any scripting failure falls back to eager timing
        return dict(modules), "eager"


def time_interleaved(runners: Mapping[str, tuple[Any, Any]], *, repeats: int, iters: int,
                     warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every ``(fn, input)``, one entry per round; each round runs all in turn."""
    import torch

    rounds: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for fn, x in runners.values():
            for _ in range(warmup):
                fn(x)
        for _ in range(repeats):
            for name, (fn, x) in runners.items():
                start = time.perf_counter()
                for _ in range(iters):
                    fn(x)
                rounds[name].append((time.perf_counter() - start) / iters)
    return rounds


def measure_parts(
    backbone: Any,
    heads: Mapping[str, Any],
    image_size: Sequence[int],
    in_channels: int,
    *,
    batch_size: int,
    threads: int | None = None,
    repeats: int = 7,
    iters: int = 3,
    warmup: int = 3,
    script: bool = True,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Time the stem, each block and each head (see the module doc for how).

    Args:
        backbone: a :class:`branchnas.backbones.Backbone` (``stem``, ``blocks``).
        heads: task name -> head module.
        image_size: ``(height, width)``.
        in_channels: input channels.
        batch_size: images per call; times are divided by it.
        threads: ``torch.set_num_threads`` while timing (default: the current setting).
        repeats, iters, warmup: rounds, calls per part per round, warm-up calls per part.
        script: TorchScript the parts (else eager).
        extra: more callables (name -> fn taking the input batch), timed in the same
            interleaved rounds; their seconds per image come back under ``"extra"`` (for
            checking the table against whole networks without drift between two passes).

    Returns:
        ``{"stem", "blocks", "heads"}`` in seconds per image, with ``batch_size``, ``threads``,
        ``mode``, ``repeats``, ``iters``, ``warmup`` and ``torch``.
    """
    import torch

    from branchnas.cost import _eval_mode

    if batch_size < 1 or repeats < 1 or iters < 1 or warmup < 0:
        raise UserError("latency: batch size, repeats and iters must be positive, warm-up non-negative")
    before = torch.get_num_threads()
    threads = before if threads is None else int(threads)
    if threads < 1:
        raise UserError(f"latency: threads must be at least 1; got {threads}")
    torch.set_num_threads(threads)
    try:
        with contextlib.ExitStack() as stack:
            for module in (backbone, *heads.values()):
                stack.enter_context(_eval_mode(module))
            modules: dict[str, Any] = {"stem": backbone.stem}
            modules.update({f"block{d}": block for d, block in enumerate(backbone.blocks)})
            modules.update({f"head:{t}": head for t, head in heads.items()})
            parts, mode = _script_all(modules) if script else (modules, "eager")
            first = next(backbone.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(batch_size, in_channels, *image_size, generator=gen).to(device)
            runners: dict[str, tuple[Any, Any]] = {}
            with torch.inference_mode():
                h = x
                for name in ["stem"] + [f"block{d}" for d in range(len(backbone.blocks))]:
                    runners[name] = (parts[name], h)
                    h = parts[name](h)
                for t in heads:
                    runners[f"head:{t}"] = (parts[f"head:{t}"], h)
            for name, fn in (extra or {}).items():
                runners[f"extra:{name}"] = (fn, x)
            rounds = time_interleaved(runners, repeats=repeats, iters=iters, warmup=warmup)
    finally:
        torch.set_num_threads(before)
    per_image = {k: statistics.median(v) / batch_size for k, v in rounds.items()}
    table = {
        "stem": per_image["stem"],
        "blocks": [per_image[f"block{d}"] for d in range(len(backbone.blocks))],
        "heads": {t: per_image[f"head:{t}"] for t in heads},
        "batch_size": batch_size, "threads": threads, "mode": mode,
        "repeats": repeats, "iters": iters, "warmup": warmup, "torch": torch.__version__,
    }
    if extra:
        table["extra"] = {name: per_image[f"extra:{name}"] for name in extra}
    return table


def _network(recipe: Any) -> tuple[Any, dict[str, Any], Any, list[str]]:
    """The recipe's untrained backbone and heads, its training split (metadata) and task names."""
    import dataclasses

    from branchnas.backbones import build_backbone
    from branchnas.data import load_splits
    from branchnas.heads import build_head

    splits, tasks = load_splits(recipe)
    train = splits["train"]
    backbone = build_backbone(dataclasses.replace(recipe.backbone, weights=""), train.in_channels, train.image_size)
    heads = {t.name: build_head(t, backbone.out_channels, backbone.reduction, train.image_size) for t in tasks}
    return backbone, heads, train, [t.name for t in tasks]


def _identity(recipe: Any, backbone: Any, train: Any, tasks: Sequence[str]) -> dict[str, Any]:
    b = recipe.backbone
    return {"backbone": {"name": b.name, "width": b.width, "granularity": b.granularity, "dilation": b.dilation},
            "points": [info.name for info in backbone.block_info], "tasks": list(tasks),
            "image_size": list(train.image_size), "in_channels": int(train.in_channels)}


def recipe_identity(recipe: Any) -> dict[str, Any]:
    """What a table must match to serve ``recipe``: backbone, branch points, tasks, image size, channels."""
    backbone, _, train, tasks = _network(recipe)
    return _identity(recipe, backbone, train, tasks)


def recipe_table(recipe: Any, *, batch_size: int | None = None, threads: int | None = None,
                 **options: Any) -> dict[str, Any]:
    """Measure the latency table of ``recipe``'s network on this machine (random weights).

    Args:
        recipe: the recipe (backbone, tasks, data for the image size).
        batch_size: default ``recipe.data.batch_size``.
        threads: default the current ``torch.get_num_threads()``.
        options: ``repeats``, ``iters``, ``warmup``, ``script`` for :func:`measure_parts`.
    """
    import torch

    torch.manual_seed(0)
    backbone, heads, train, tasks = _network(recipe)
    parts = measure_parts(backbone, heads, tuple(train.image_size), train.in_channels,
                          batch_size=batch_size or recipe.data.batch_size, threads=threads, **options)
    return {"format": FORMAT, "unit": "seconds per image", **_identity(recipe, backbone, train, tasks),
            "machine": machine_info(), **parts}


def load_table(path: str | Path, where: str = "search.latency_table") -> dict[str, Any]:
    """Read a latency table written by ``branchnas profile``.

    Raises:
        UserError: no such file, not JSON, or not a latency table (one line naming the fix).
    """
    path = Path(path)
    fix = f"measure one with `branchnas profile RECIPE -o {path}` on the deployment machine"
    if not path.is_file():
        raise UserError(f"{where}: no file {path}; {fix}")
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{where}: {path} is not readable JSON ({err}); {fix}") from None
    if not isinstance(table, Mapping) or table.get("format") != FORMAT:
        raise UserError(f"{where}: {path} is not a latency table (expected format '{FORMAT}'); {fix}")
    for key in ("stem", "blocks", "heads", "batch_size", "threads"):
        if key not in table:
            raise UserError(f"{where}: {path} has no '{key}' field; {fix}")
    return dict(table)


def check_table(table: Mapping[str, Any], expected: Mapping[str, Any], where: str = "search.latency_table") -> None:
    """Check that ``table`` was measured for the network ``expected`` (:func:`recipe_identity`).

    Raises:
        UserError: a different backbone, branch points, tasks, image size or channels.
    """
    fix = "measure it again with `branchnas profile RECIPE -o FILE` using this recipe"
    labels = {"backbone": "backbone", "points": "branch points", "tasks": "tasks",
              "image_size": "image size", "in_channels": "input channels"}
    for key, label in labels.items():
        got, want = table.get(key), expected[key]
        if key == "tasks" and isinstance(got, list) and sorted(got) == sorted(want):
            continue
        if got != want:
            raise UserError(f"{where}: the table was measured for {label} {_show(got)} but the recipe has "
                            f"{_show(want)}; {fix}")
    blocks = table.get("blocks")
    if not isinstance(blocks, list) or len(blocks) != len(expected["points"]):
        raise UserError(f"{where}: the table has {len(blocks) if isinstance(blocks, list) else 'no'} block times "
                        f"for {len(expected['points'])} branch points; {fix}")
    missing = [t for t in expected["tasks"] if t not in (table.get("heads") or {})]
    if missing:
        raise UserError(f"{where}: the table has no head time for task {missing[0]!r}; {fix}")


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return "x".join(map(str, value)) if all(isinstance(v, int) for v in value) else "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def matches_settings(table: Mapping[str, Any], batch_size: int, threads: int) -> bool:
    """Whether a stored table was measured at this batch size and thread count."""
    return table.get("batch_size") == batch_size and table.get("threads") == threads
