"""Array operations on image batches: flip (augmentation), resize, paste, normalisation statistics.

They work in numpy on the stored layout (images ``(B, C, H, W)``, dense targets as
:func:`branchnas.data.targets.standardise` lays them out). The normalisation itself happens in
:meth:`branchnas.data.MultiTaskDataset.get_batch`, which also applies :func:`hflip`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from branchnas.kinds import NEAREST_KINDS

if TYPE_CHECKING:
    # only for annotations: _base imports hflip from here, so a run-time import would be circular
    from branchnas.data._base import TargetSpec

__all__ = ["channel_stats", "hflip", "paste_max", "resize_images", "resize_target"]

#: Dense kinds resized with nearest neighbours (labels must stay labels).


def hflip(images: np.ndarray, targets: dict[str, np.ndarray], specs: dict[str, TargetSpec], mask: np.ndarray) -> None:
    """Mirror, in place, the samples where ``mask`` is true: image and every dense target.

    A mirrored normal map also has its x component negated (the surface now faces the
    other way). Scalar targets do not change. Mirroring twice restores the input.
    """
    rows = np.flatnonzero(mask)
    if not rows.size:
        return
    images[rows] = images[rows][..., ::-1]
    for name, value in targets.items():
        spec = specs[name]
        if spec.dense:
            mirrored = value[rows][..., ::-1]  # a copy: fancy indexing
            if spec.kind == "normals":
                mirrored[:, 0] *= -1
            value[rows] = mirrored


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(B, C, H, W)`` images (antialiased when shrinking); keeps the dtype."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    out = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink).numpy()
    if images.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def resize_target(spec: TargetSpec, value: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a stored dense target: nearest for labels, masked bilinear for depth and normals.

    Depth and normals are averaged over valid pixels only; an output pixel that draws on a
    missing input pixel is itself marked missing, so holes never leak into valid values.
    """
    if not spec.dense or tuple(value.shape[-2:]) == tuple(size):
        return value
    if spec.kind in NEAREST_KINDS:
        x = value[:, None] if spec.kind == "segmentation" else value
        out = F.interpolate(torch.from_numpy(x.astype(np.float32)), size=size, mode="nearest-exact").numpy()
        out = out.astype(value.dtype)
        return out[:, 0] if spec.kind == "segmentation" else out
    x = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    valid = (x != 0).any(dim=1, keepdim=True).float()
    num = F.interpolate(x * valid, size=size, mode="bilinear", align_corners=False)
    cover = F.interpolate(valid, size=size, mode="bilinear", align_corners=False)
    ok = cover > 1 - 1e-4
    out = torch.where(ok, num / cover.clamp_min(1e-6), torch.zeros(()))
    if spec.kind == "normals":
        norm = out.norm(dim=1, keepdim=True)
        out = torch.where(norm > 1e-6, out / norm.clamp_min(1e-6), torch.zeros(()))
    return out.numpy()


def paste_max(canvas: np.ndarray, patches: np.ndarray, offsets: np.ndarray) -> None:
    """Max-combine square ``patches`` ``(N, P, P)`` into ``canvas`` ``(N, H, W)`` at ``(y, x)`` offsets.

    Vectorised over the batch; overlapping strokes keep the brighter pixel.
    """
    side = patches.shape[-1]
    rows = offsets[:, 0, None, None] + np.arange(side)[None, :, None]
    cols = offsets[:, 1, None, None] + np.arange(side)[None, None, :]
    batch = np.arange(len(canvas))[:, None, None]
    canvas[batch, rows, cols] = np.maximum(canvas[batch, rows, cols], patches)


def channel_stats(images: np.ndarray, limit: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) of uint8 images ``(N, C, H, W)``, from at most ``limit`` of them."""
    sample = images[:limit].astype(np.float32) / 255
    mean = sample.mean(axis=(0, 2, 3))
    std = sample.std(axis=(0, 2, 3))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)
