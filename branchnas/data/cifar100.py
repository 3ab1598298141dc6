"""``cifar100``: multi-task CIFAR-100, one binary task per coarse class.

``data.root`` holds ``cifar-100-python/`` (or is that folder), CIFAR-100's Python
version::

    cifar-100-python/train   pickled dict: b"data" (50000, 3072) uint8, b"fine_labels", b"coarse_labels"
    cifar-100-python/test    the same with 10000 images
    cifar-100-python/meta    b"coarse_label_names", b"fine_label_names"

Targets: one ``attribute`` per coarse class, named after it (``aquatic_mammals``,
``fish``, ...): "does the image belong to this coarse class"; plus ``coarse`` (20
classes) and ``fine`` (100 classes) for reference. Test is CIFAR's test set; val is
carved out of its training set by the recipe seed.

The pickles can only be read whole; after reading, only the selected images are kept.
They are pickles, so read only copies you trust (the official archive).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from branchnas.data._base import DatasetFamily, LoadRequest, MultiTaskDataset, TargetSpec, option
from branchnas.data.splits import seeded_rng, split_pool, take
from branchnas.data.storage import TensorDataset
from branchnas.data.targets import check_values
from branchnas.errors import DataError, RecipeError, did_you_mean

__all__ = ["Cifar100Family", "Cifar100Options", "COARSE_CLASSES"]

COARSE_CLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
)
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_LAYOUT = "cifar-100-python/ with the files train, test and meta (CIFAR-100's Python version)"


@dataclass
class Cifar100Options:
    """``[data] options`` of the cifar100 dataset."""

    classes: list[str] = option([], "coarse classes whose binary tasks are the default tasks; [] = all 20")


class Cifar100Family(DatasetFamily):
    """CIFAR-100 as 20 binary coarse-class tasks (see the module docstring)."""

    name = "cifar100"
    summary = "multi-task CIFAR-100: one binary task per coarse class (paper benchmark; python pickles)"
    Options = Cifar100Options
    needs_root = True
    layout = _LAYOUT

    def check_options(self, options: Cifar100Options) -> None:
        for i, name in enumerate(options.classes):
            if name not in COARSE_CLASSES:
                raise RecipeError(
                    f"data.options.classes[{i}]: unknown coarse class '{name}'{did_you_mean(name, COARSE_CLASSES)}; "
                    "see `branchnas datasets cifar100`"
                )

    def targets(self, options: Any = None) -> dict[str, TargetSpec]:
        specs = {c: TargetSpec(c, "attribute", description=f"1 if the image is one of the {c.replace('_', ' ')}")
                 for c in COARSE_CLASSES}
        specs["coarse"] = TargetSpec("coarse", "classification", 20, description="the coarse class (20)")
        specs["fine"] = TargetSpec("fine", "classification", 100, description="the fine class (100)")
        return specs

    def default_tasks(self, options: Cifar100Options | None = None) -> list[Any]:
        from branchnas.recipe import TaskConfig

        names = (options.classes if options is not None else []) or COARSE_CLASSES
        return [TaskConfig(name=n, kind="attribute", target=n) for n in names]

    def load(self, request: LoadRequest) -> dict[str, MultiTaskDataset]:
        root = self.root_dir(request.root)
        folder = root if root.name == "cifar-100-python" else root / "cifar-100-python"
        self.expect(folder, "the folder cifar-100-python/", root)
        for name in ("train", "test", "meta"):
            self.expect(folder / name, f"cifar-100-python/{name}", root)
        names = _unpickle(folder / "meta").get(b"coarse_label_names")
        if names is None or [n.decode() for n in names] != list(COARSE_CLASSES):
            raise DataError(f"{folder / 'meta'}: expected b'coarse_label_names' with CIFAR-100's 20 coarse classes")
        rng = seeded_rng(request.seed, "cifar100", "split")
        train = _read_part(folder / "train")
        test = _read_part(folder / "test")
        sizes = request.sizes
        pools = split_pool(np.arange(len(train[0])), {"train": 0, "val": sizes["val"]}, rng,
                           "CIFAR-100's training set", splits=("train", "val"))
        chosen = {
            "train": np.sort(take(pools["train"], sizes["train"], rng, "num_train", "CIFAR-100's training set left after val")),
            "val": np.sort(pools["val"]),
            "test": np.sort(take(np.arange(len(test[0])), sizes["test"], rng, "num_test", "CIFAR-100's test set")),
        }
        splits: dict[str, MultiTaskDataset] = {}
        for split, idx in chosen.items():
            images, fine, coarse = test if split == "test" else train
            values = {"coarse": coarse[idx], "fine": fine[idx]}
            for k, cname in enumerate(COARSE_CLASSES):
                values[cname] = (coarse[idx] == k).astype(np.float32)
            splits[split] = TensorDataset(
                images[idx].reshape(-1, 3, 32, 32), {n: values[n] for n in request.targets}, request.targets,
                mean=MEAN, std=STD, can_flip=True, name=f"cifar100/{split}",
            )
        return splits


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            data = pickle.load(fh, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise DataError(f"{path}: cannot read the CIFAR-100 pickle: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a pickled dict; got {type(data).__name__}")
    return data


def _read_part(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images (N, 3072) uint8, fine labels, coarse labels)`` of one pickle, checked."""
    data = _unpickle(path)
    for key in (b"data", b"fine_labels", b"coarse_labels"):
        if key not in data:
            raise DataError(f"{path}: no {key!r} entry; is this CIFAR-100's python version?")
    images = np.asarray(data[b"data"])
    if images.ndim != 2 or images.shape[1] != 3072 or images.dtype != np.uint8:
        raise DataError(f"{path}: b'data' is {images.dtype} {images.shape}; expected uint8 (N, 3072) (32x32 RGB rows)")
    fine = np.asarray(data[b"fine_labels"], dtype=np.int64)
    coarse = np.asarray(data[b"coarse_labels"], dtype=np.int64)
    if len(fine) != len(images) or len(coarse) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(fine)} fine and {len(coarse)} coarse labels")
    check_values(TargetSpec("fine", "classification", 100), fine, lambda i: f"{path.name} image {i}")
    check_values(TargetSpec("coarse", "classification", 20), coarse, lambda i: f"{path.name} image {i}")
    return images, fine, coarse
