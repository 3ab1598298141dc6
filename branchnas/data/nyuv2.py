"""``nyuv2``: NYUv2 indoor scenes in the preprocessed layout of MTAN (Liu et al.).

``data.root`` holds::

    train/image/0.npy ...   float32 (288, 384, 3), RGB in 0..1
    train/label/0.npy ...   (288, 384) 13-class segmentation, -1 = unlabelled
    train/depth/0.npy ...   (288, 384, 1) depth in metres, 0 = missing
    train/normal/0.npy ...  (288, 384, 3) surface normals in -1..1
    val/...                 the same for MTAN's 654 evaluation images

Targets: ``segmentation`` (13 classes; -1 becomes the ignore label 255), ``depth`` and
``normals`` (scaled to unit length; zero vectors stay missing). MTAN's ``val`` folder is
the test split here; val is carved out of ``train`` by the recipe seed. Only the folders
of the targets the tasks use are needed. Files are read per batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from branchnas.data._base import (
    IGNORE_LABEL,
    DatasetFamily,
    LoadRequest,
    MultiTaskDataset,
    NoOptions,
    TargetSpec,
)
from branchnas.data.io import read_npy
from branchnas.data.splits import seeded_rng, split_pool, take
from branchnas.data.storage import LazyDataset, per_sample_reader
from branchnas.errors import DataError

__all__ = ["NYUv2Family"]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_FOLDERS = {"segmentation": "label", "depth": "depth", "normals": "normal"}
_LAYOUT = "train/ and val/, each with image/, label/, depth/ and normal/ folders of <i>.npy (the MTAN NYUv2 layout)"


class NYUv2Family(DatasetFamily):
    """NYUv2 segmentation, depth and normals (see the module docstring)."""

    name = "nyuv2"
    summary = "NYUv2 indoor scenes: 13-class segmentation, depth, normals (paper benchmark; MTAN .npy layout)"
    Options = NoOptions
    needs_root = True
    layout = _LAYOUT

    def targets(self, options: Any = None) -> dict[str, TargetSpec]:
        return {
            "segmentation": TargetSpec("segmentation", "segmentation", 13, description="13 NYUv2 classes, 255 = unlabelled"),
            "depth": TargetSpec("depth", "depth", description="depth in metres, 0 = missing"),
            "normals": TargetSpec("normals", "normals", channels=3, description="unit surface normals"),
        }

    def load(self, request: LoadRequest) -> dict[str, MultiTaskDataset]:
        root = self.root_dir(request.root)
        parts = {part: _index(root, part, request.targets, self) for part in ("train", "val")}
        rng = seeded_rng(request.seed, "nyuv2", "split")
        sizes = request.sizes
        pools = split_pool(np.arange(len(parts["train"])), {"train": 0, "val": sizes["val"]}, rng,
                           "NYUv2's train folder", splits=("train", "val"))
        chosen = {
            "train": take(pools["train"], sizes["train"], rng, "num_train", "NYUv2's train folder left after val"),
            "val": pools["val"],
            "test": take(np.arange(len(parts["val"])), sizes["test"], rng, "num_test", "NYUv2's val folder (the test split)"),
        }
        first = read_npy(root / "train" / "image" / f"{parts['train'][0]}.npy", "nyuv2 train/image")
        native = (int(first.shape[0]), int(first.shape[1]))
        splits: dict[str, MultiTaskDataset] = {}
        for split, idx in chosen.items():
            folder = root / ("val" if split == "test" else "train")
            stems = parts["val" if split == "test" else "train"]
            idx = np.sort(idx)
            splits[split] = LazyDataset(
                len(idx), _reader(split, folder, [stems[i] for i in idx], request.targets, native),
                request.targets, native_size=native, in_channels=3, mean=MEAN, std=STD,
                can_flip=True, name=f"nyuv2/{split}",
            )
        return splits


def _index(root: Path, part: str, specs: dict[str, TargetSpec], family: DatasetFamily) -> list[str]:
    """Sample names (file stems) of one MTAN folder, checking every needed target has them."""
    image_dir = family.expect(root / part / "image", f"{part}/image/", root)
    stems = sorted((p.stem for p in image_dir.glob("*.npy")), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    if not stems:
        raise DataError(f"data.root: {image_dir} holds no .npy images ({_LAYOUT}); see docs/datasets.md")
    for target in specs:
        folder = family.expect(root / part / _FOLDERS[target], f"{part}/{_FOLDERS[target]}/ (for {target})", root)
        present = {p.stem for p in folder.glob("*.npy")}
        missing = [s for s in stems if s not in present]
        if missing:
            raise DataError(f"data.root: expected {part}/{_FOLDERS[target]}/{missing[0]}.npy in {root} to go with {part}/image/{missing[0]}.npy")
    return stems


def _reader(split: str, folder: Path, stems: list[str], specs: dict[str, TargetSpec], native: tuple[int, int]) -> Any:
    def describe(i: int) -> str:
        return f"nyuv2/{split} sample {i} ({folder.name}/image/{stems[i]}.npy)"

    def read(i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        where = describe(i)
        image = read_npy(folder / "image" / f"{stems[i]}.npy", where)
        raw = {}
        for target in specs:
            value = read_npy(folder / _FOLDERS[target] / f"{stems[i]}.npy", where)
            if target == "segmentation":
                value = np.where(value == -1, IGNORE_LABEL, value)
            raw[target] = value
        return image, raw

    return per_sample_reader(read, specs, native_size=native, in_channels=3, describe=describe)
