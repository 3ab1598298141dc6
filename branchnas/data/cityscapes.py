"""``cityscapes``: Cityscapes street scenes, segmentation and depth (torchvision layout).

``data.root`` holds::

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png     RGB 2048x1024
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png      label ids 0..33
    disparity/<split>/<city>/<city>_<seq>_<frame>_disparity.png         16-bit disparity

for ``<split>`` in ``train`` and ``val`` (the official test labels are withheld, so the
official ``val`` is the test split here, and val is carved out of ``train`` by the seed).

Targets: ``segmentation`` with the 19 train classes (every other label id becomes the
ignore label 255) and ``depth`` in metres from disparity: a pixel value ``p > 0`` is the
disparity ``d = (p - 1) / 256``, and ``depth = baseline * focal / d`` with Cityscapes'
camera (baseline 0.209313 m, focal 2262.52 px); ``p = 0`` (or ``d = 0``) is missing depth
(0). Only the folders of the targets the tasks use are needed. Files are read per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from branchnas.data._base import (
    IGNORE_LABEL,
    DatasetFamily,
    LoadRequest,
    MultiTaskDataset,
    TargetSpec,
    option,
)
from branchnas.data.io import read_image
from branchnas.data.splits import seeded_rng, split_pool, take
from branchnas.data.storage import LazyDataset, per_sample_reader
from branchnas.errors import DataError

__all__ = ["CityscapesFamily", "CityscapesOptions", "TRAIN_CLASSES", "label_ids_to_train_ids", "disparity_to_depth"]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BASELINE, FOCAL = 0.209313, 2262.52
#: label id -> train id of the 19 evaluated classes (Cityscapes' labels.py)
_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
TRAIN_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                 "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                 "motorcycle", "bicycle")
_LUT = np.full(256, IGNORE_LABEL, dtype=np.uint8)
for _id, _train in _TRAIN_ID.items():
    _LUT[_id] = _train
_MAX_LABEL_ID = 33
_SUFFIX = {"image": ("leftImg8bit", "_leftImg8bit.png"), "segmentation": ("gtFine", "_gtFine_labelIds.png"),
           "depth": ("disparity", "_disparity.png")}
_LAYOUT = (
    "leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine/.../*_gtFine_labelIds.png and "
    "disparity/.../*_disparity.png for split train and val (the torchvision Cityscapes layout)"
)


@dataclass
class CityscapesOptions:
    """``[data] options`` of the cityscapes dataset."""

    max_depth: float = option(0.0, "depth beyond this many metres is marked missing (0 = keep all)", min=0.0)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map Cityscapes label ids (0..33) to the 19 train ids; every other id becomes 255."""
    return _LUT[label_ids]


def disparity_to_depth(pixels: np.ndarray, max_depth: float = 0.0) -> np.ndarray:
    """16-bit disparity PNG values -> depth in metres (0 where the disparity is missing)."""
    disparity = (pixels.astype(np.float64) - 1.0) / 256.0
    valid = (pixels > 0) & (disparity > 0)
    depth = np.where(valid, BASELINE * FOCAL / np.where(valid, disparity, 1.0), 0.0)
    if max_depth > 0:
        depth = np.where(depth > max_depth, 0.0, depth)
    return depth.astype(np.float32)


class CityscapesFamily(DatasetFamily):
    """Cityscapes segmentation and depth (see the module docstring)."""

    name = "cityscapes"
    summary = "Cityscapes street scenes: 19-class segmentation and depth (paper benchmark; torchvision layout)"
    Options = CityscapesOptions
    needs_root = True
    layout = _LAYOUT

    def targets(self, options: Any = None) -> dict[str, TargetSpec]:
        return {
            "segmentation": TargetSpec("segmentation", "segmentation", 19, description="19 train classes, 255 = ignored"),
            "depth": TargetSpec("depth", "depth", description="metres from disparity, 0 = missing"),
        }

    def load(self, request: LoadRequest) -> dict[str, MultiTaskDataset]:
        root = self.root_dir(request.root)
        parts = {part: _index(root, part, request.targets, self) for part in ("train", "val")}
        rng = seeded_rng(request.seed, "cityscapes", "split")
        sizes = request.sizes
        pools = split_pool(np.arange(len(parts["train"])), {"train": 0, "val": sizes["val"]}, rng,
                           "Cityscapes' train split", splits=("train", "val"))
        chosen = {
            "train": take(pools["train"], sizes["train"], rng, "num_train", "Cityscapes' train split left after val"),
            "val": pools["val"],
            "test": take(np.arange(len(parts["val"])), sizes["test"], rng, "num_test", "Cityscapes' val split (the test split)"),
        }
        first = parts["train"][0]
        image = read_image(_path(root, "train", first, "image"), f"cityscapes {first}")
        native = (int(image.shape[0]), int(image.shape[1]))
        splits: dict[str, MultiTaskDataset] = {}
        for split, idx in chosen.items():
            part = "val" if split == "test" else "train"
            names = [parts[part][i] for i in np.sort(idx)]
            splits[split] = LazyDataset(
                len(names), _reader(split, root, part, names, request.targets, native, request.options.max_depth),
                request.targets, native_size=native, in_channels=3, mean=MEAN, std=STD,
                can_flip=True, name=f"cityscapes/{split}",
            )
        return splits


def _path(root: Path, part: str, name: str, what: str) -> Path:
    """The file of ``what`` for sample ``name`` (``<city>/<city>_<seq>_<frame>``)."""
    folder, suffix = _SUFFIX[what]
    return root / folder / part / f"{name}{suffix}"


def _index(root: Path, part: str, specs: dict[str, TargetSpec], family: DatasetFamily) -> list[str]:
    """Sample names of one official split, checking each needed target file exists."""
    image_root = family.expect(root / "leftImg8bit" / part, f"leftImg8bit/{part}/", root)
    suffix = _SUFFIX["image"][1]
    names = sorted(p.relative_to(image_root).as_posix()[: -len(suffix)] for p in image_root.glob(f"*/*{suffix}"))
    if not names:
        raise DataError(f"data.root: {image_root} holds no <city>/*{suffix} images ({_LAYOUT}); see docs/datasets.md")
    for target in specs:
        folder, target_suffix = _SUFFIX[target]
        target_root = family.expect(root / folder / part, f"{folder}/{part}/ (for {target})", root)
        present = {p.relative_to(target_root).as_posix() for p in target_root.glob(f"*/*{target_suffix}")}
        missing = [n for n in names if f"{n}{target_suffix}" not in present]
        if missing:
            raise DataError(
                f"data.root: expected {folder}/{part}/{missing[0]}{target_suffix} in {root} to go with "
                f"leftImg8bit/{part}/{missing[0]}{suffix}"
            )
    return names


def _reader(
    split: str, root: Path, part: str, names: list[str], specs: dict[str, TargetSpec],
    native: tuple[int, int], max_depth: float,
) -> Any:
    def describe(i: int) -> str:
        return f"cityscapes/{split} sample {i} (leftImg8bit/{part}/{names[i]}{_SUFFIX['image'][1]})"

    def read(i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        where = describe(i)
        image = read_image(_path(root, part, names[i], "image"), where)
        raw = {}
        if "segmentation" in specs:
            ids = read_image(_path(root, part, names[i], "segmentation"), where, mode=None)
            if ids.ndim != 2:
                raise DataError(f"{where}: the labelIds PNG has {ids.shape[2]} channels; expected one")
            if ids.max(initial=0) > _MAX_LABEL_ID:
                raise DataError(f"{where}: target 'segmentation' holds label id {int(ids.max())}; expected 0..{_MAX_LABEL_ID}")
            raw["segmentation"] = label_ids_to_train_ids(ids)
        if "depth" in specs:
            pixels = read_image(_path(root, part, names[i], "depth"), where, mode=None)
            if pixels.ndim != 2:
                raise DataError(f"{where}: the disparity PNG has {pixels.shape[2]} channels; expected one (16-bit)")
            raw["depth"] = disparity_to_depth(pixels, max_depth)
        return image, raw

    return per_sample_reader(read, specs, native_size=native, in_channels=3, describe=describe)
