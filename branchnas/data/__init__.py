"""Dataset families, the splits they load, and the batches the trainer reads.

A *family* is registered by name (``[data] dataset = "shapes"``); it reads its own
``[data] options`` and provides named *targets* (:class:`TargetSpec`). :func:`load_splits`
turns a recipe into ``train``/``val``/``test`` splits (:class:`MultiTaskDataset`) and the
task objects; :func:`batches` iterates a split deterministically.

Example:
    >>> from branchnas.recipe import load_recipe
    >>> recipe = load_recipe(None, ["data.num_train=64", "data.num_val=16", "data.num_test=16",
    ...                             "data.options={size = 32}"])
    >>> splits, tasks = load_splits(recipe)                          # doctest: +SKIP
    >>> images, targets = next(batches(splits["train"], 32, shuffle=True, seed=0, epoch=0,
    ...                                augment=True))                 # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from branchnas.data._base import (
    DENSE_KINDS,
    IGNORE_LABEL,
    DatasetFamily,
    LoadRequest,
    MultiTaskDataset,
    TargetSpec,
)
from branchnas.data.storage import LazyDataset, TensorDataset
from branchnas.errors import RecipeError, UserError, unknown_choice

__all__ = [
    "DENSE_KINDS",
    "IGNORE_LABEL",
    "DatasetFamily",
    "LazyDataset",
    "LoadRequest",
    "MultiTaskDataset",
    "TargetSpec",
    "TensorDataset",
    "batches",
    "get_family",
    "list_families",
    "load_splits",
    "register_dataset",
]

_REGISTRY: dict[str, DatasetFamily] = {}


def register_dataset(family: type[DatasetFamily] | DatasetFamily) -> Any:
    """Register a dataset family under its ``name``; usable as a class decorator.

    Args:
        family: a :class:`DatasetFamily` subclass (instantiated with no arguments) or instance.

    Returns:
        ``family`` unchanged, so that ``@register_dataset`` leaves the class in place.

    Raises:
        ValueError: the name is empty or already registered.
    """
    instance = family() if isinstance(family, type) else family
    name = instance.name
    if not name:
        raise ValueError(f"{type(instance).__name__}.name is empty; a dataset family needs a name")
    if name in _REGISTRY:
        raise ValueError(
            f"dataset family '{name}' is already registered (by {type(_REGISTRY[name]).__name__}); "
            "choose another name"
        )
    _REGISTRY[name] = instance
    return family


def get_family(name: str) -> DatasetFamily:
    """The registered family called ``name``.

    Raises:
        UserError: no family has that name (the message lists them and suggests the closest).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(unknown_choice("dataset", name, _REGISTRY)) from None


def list_families() -> list[str]:
    """Names of the registered families, in registration order (the built-in default first)."""
    return list(_REGISTRY)


def load_splits(recipe: Any) -> tuple[dict[str, MultiTaskDataset], list[Any]]:
    """Load the recipe's dataset as three splits and build its tasks.

    The tasks are ``recipe.tasks``, or the family's default tasks when the recipe lists
    none. Only the targets the tasks use are loaded. Splits are fixed by ``recipe.seed``;
    their sizes come from ``data.num_train`` / ``num_val`` / ``num_test`` (0 = all
    available); a non-empty ``data.image_size`` resizes images (bilinear) and dense targets
    (bilinear for depth and normals, nearest for labels).

    Args:
        recipe: a :class:`branchnas.recipe.Recipe`.

    Returns:
        ``({"train": ..., "val": ..., "test": ...}, tasks)`` with tasks from
        :func:`branchnas.tasks.build_tasks`.

    Raises:
        RecipeError: an unknown dataset, option or target.
        DataError: a missing or malformed dataset, or bad data.
    """
    from branchnas.tasks import build_tasks

    data = recipe.data
    try:
        family = get_family(data.dataset)
    except UserError as err:
        raise RecipeError(f"data.dataset: {err}") from None
    options = family.parse_options(data.options)
    task_configs = list(recipe.tasks) or family.default_tasks(options)
    if not task_configs:
        raise RecipeError(
            f"tasks: the {family.name} dataset has no default tasks; add [[tasks]] entries with "
            "name, kind and target (see docs/custom-data.md)"
        )
    size = _image_size(data.image_size)
    request = LoadRequest(
        root=data.root,
        options=options,
        seed=recipe.seed,
        sizes={"train": data.num_train, "val": data.num_val, "test": data.num_test},
        targets=family.resolve_targets(options, task_configs),
        tasks=tuple(task_configs),
    )
    splits = family.load(request)
    if size is not None:
        splits = {name: split.resized(size) for name, split in splits.items()}
    return splits, build_tasks(task_configs, splits["train"].targets)


def _image_size(value: list[int]) -> tuple[int, int] | None:
    if not value:
        return None
    if len(value) != 2 or min(value) < 1:
        raise RecipeError(f"data.image_size: expected [] or [height, width] with positive sizes; got {value}")
    return int(value[0]), int(value[1])


def _generator(*words: int) -> torch.Generator:
    """A torch generator fixed by integer words (negative seeds allowed)."""
    state = np.random.SeedSequence([w & 0xFFFFFFFF for w in words]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def batches(
    dataset: MultiTaskDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    augment: bool,
    drop_last: bool = False,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Yield ``(images, targets)`` batches of one epoch, deterministically.

    The order depends only on ``(seed, epoch)`` and each batch's flips only on
    ``(seed, epoch, batch number)``, so a resumed epoch (``start`` > 0) yields exactly the
    batches an uninterrupted one would, without reading the skipped ones.

    Args:
        dataset: the split.
        batch_size: images per batch.
        shuffle: visit the samples in a seeded random order (else in index order).
        seed: the recipe seed.
        epoch: the epoch number.
        augment: random horizontal flips (where the dataset allows them).
        drop_last: leave out a last, smaller batch.
        start: first batch number to yield (to resume an interrupted epoch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    n = len(dataset)
    if shuffle:
        order = torch.randperm(n, generator=_generator(seed, epoch, 0x5F3759DF))
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for number, first in enumerate(range(0, stop, batch_size)):
        if number < start:
            continue
        rng = _generator(seed, epoch, number, 0xF11B) if augment else None
        yield dataset.get_batch(order[first:first + batch_size], augment=augment, rng=rng)


def _register_builtins() -> None:
    from branchnas.data.arrays import ArraysFamily
    from branchnas.data.celeba import CelebAFamily
    from branchnas.data.cifar100 import Cifar100Family
    from branchnas.data.cityscapes import CityscapesFamily
    from branchnas.data.digits import DigitsFamily
    from branchnas.data.multimnist import MultiMnistFamily
    from branchnas.data.nyuv2 import NYUv2Family
    from branchnas.data.shapes import ShapesFamily

    for family in (ShapesFamily, DigitsFamily, ArraysFamily, CelebAFamily, MultiMnistFamily,
                   Cifar100Family, NYUv2Family, CityscapesFamily):
        register_dataset(family)


_register_builtins()
