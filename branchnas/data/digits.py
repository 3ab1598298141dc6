"""``digits``: two real handwritten digits side by side (MultiMNIST-style), built in.

The digits are scikit-learn's bundled 8x8 handwriting (``sklearn.datasets.load_digits``,
1797 images), upsampled by ``scale`` and placed on a ``12*scale x 16*scale`` canvas: the
left digit near the left edge, the right digit near the right edge, each with random
jitter, overlapping by up to half a digit (pixels combine by maximum).

The 1797 source digits are first divided (by the recipe seed) into train/val/test pools
of 70/15/15%, and each split draws its pairs only from its own pool, so no source image
is shared between splits. (The source set does not record its writers, so a writer may
appear in more than one pool.)

A horizontal flip would mirror the digits and swap left and right, so these splits never
flip (``can_flip = False``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from branchnas.data._base import DatasetFamily, LoadRequest, MultiTaskDataset, TargetSpec, option
from branchnas.data.splits import require_count, seeded_rng, split_pool
from branchnas.data.storage import TensorDataset
from branchnas.data.transforms import channel_stats, paste_max
from branchnas.recipe import TaskConfig

__all__ = ["DigitsFamily", "DigitsOptions", "make_pairs", "source_digits"]

_POOLS = {"train": 0.70, "val": 0.15}  # test gets the rest


@dataclass
class DigitsOptions:
    """``[data] options`` of the digits dataset."""

    scale: int = option(2, "upsampling of the 8x8 digits; the canvas is 12*scale x 16*scale", min=1)


@functools.lru_cache(maxsize=4)
def source_digits(scale: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits upsampled by ``scale``: ``uint8 (1797, 8*scale, 8*scale)`` and labels.

    Cached (read-only arrays): every split and every load reuses them.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    pixels = (images[:, 0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    labels = bunch.target.astype(np.int64)
    pixels.flags.writeable = labels.flags.writeable = False
    return pixels, labels


def source_pools(seed: int, n: int) -> dict[str, np.ndarray]:
    """Disjoint pools of source-digit indices per split, fixed by the seed."""
    rng = seeded_rng(seed, "digits", "pools")
    sizes = {"train": int(round(n * _POOLS["train"])), "val": int(round(n * _POOLS["val"]))}
    sizes["test"] = n - sizes["train"] - sizes["val"]
    return split_pool(np.arange(n), sizes, rng, "the digits source set")


def make_pairs(
    n: int, seed: int, split: str, options: DigitsOptions | None = None
) -> dict[str, np.ndarray]:
    """Compose ``n`` two-digit images of one split.

    Returns:
        ``image`` uint8 ``(n, 1, 12s, 16s)``, ``left_index``/``right_index`` (rows of
        scikit-learn's digits), ``left_offset``/``right_offset`` (``(n, 2)`` y, x pixels)
        and the targets ``left``, ``right``, ``sum``, ``parity``, ``greater``, ``same``.
    """
    opts = options or DigitsOptions()
    s = opts.scale
    digits, labels = source_digits(s)
    pool = source_pools(seed, len(digits))[split]
    rng = seeded_rng(seed, "digits", split)
    left_index = pool[rng.integers(0, len(pool), size=n)]
    right_index = pool[rng.integers(0, len(pool), size=n)]
    left_offset = np.stack([rng.integers(0, 4 * s + 1, size=n), rng.integers(0, 2 * s + 1, size=n)], axis=1)
    right_offset = np.stack([rng.integers(0, 4 * s + 1, size=n), rng.integers(6 * s, 8 * s + 1, size=n)], axis=1)
    image = np.zeros((n, 12 * s, 16 * s), dtype=np.uint8)
    paste_max(image, digits[left_index], left_offset)
    paste_max(image, digits[right_index], right_offset)
    left, right = labels[left_index], labels[right_index]
    return {
        "image": image[:, None],
        "left_index": left_index,
        "right_index": right_index,
        "left_offset": left_offset,
        "right_offset": right_offset,
        "left": left,
        "right": right,
        "sum": left + right,
        "parity": ((left + right) % 2).astype(np.float32),
        "greater": (left > right).astype(np.float32),
        "same": (left == right).astype(np.float32),
    }


class DigitsFamily(DatasetFamily):
    """Pairs of scikit-learn's handwritten digits (see the module docstring)."""

    name = "digits"
    summary = "two real handwritten 8x8 digits side by side (MultiMNIST-style, built in)"
    Options = DigitsOptions
    generated = True

    def targets(self, options: Any = None) -> dict[str, TargetSpec]:
        return {
            "left": TargetSpec("left", "classification", 10, description="the left digit"),
            "right": TargetSpec("right", "classification", 10, description="the right digit"),
            "sum": TargetSpec("sum", "classification", 19, description="left + right"),
            "parity": TargetSpec("parity", "attribute", description="1 if left + right is odd"),
            "greater": TargetSpec("greater", "attribute", description="1 if left > right"),
            "same": TargetSpec("same", "attribute", description="1 if left == right (rare: about 1 in 10)"),
        }

    def default_tasks(self, options: Any = None) -> list[TaskConfig]:
        specs = self.targets(options)
        return [TaskConfig(name=n, kind=specs[n].kind, target=n) for n in ("left", "right", "parity", "greater")]

    def load(self, request: LoadRequest) -> dict[str, MultiTaskDataset]:
        require_count(request.sizes, self.name)
        splits: dict[str, MultiTaskDataset] = {}
        mean = std = None
        for split in ("train", "val", "test"):
            data = make_pairs(request.sizes[split], request.seed, split, request.options)
            if mean is None:
                mean, std = channel_stats(data["image"])
            splits[split] = TensorDataset(
                data["image"], {k: data[k] for k in request.targets}, request.targets,
                mean=mean, std=std, can_flip=False, name=f"digits/{split}",
            )
        return splits
