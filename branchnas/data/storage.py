"""The two storage flavours of a split, and the compact form targets are stored in.

:class:`TensorDataset` keeps compact arrays in memory (uint8 images, uint8 label maps) and
slices them per batch. :class:`LazyDataset` calls a reader that opens only the files of the
batch; on-disk benchmarks use it so that nothing is read into memory all at once.
:func:`per_sample_reader` builds such a reader from a function that reads one sample.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from branchnas.data._base import IGNORE_LABEL, Describe, MultiTaskDataset, TargetSpec
from branchnas.data.targets import check_values, standardise, unit_normals
from branchnas.data.transforms import resize_images, resize_target
from branchnas.errors import DataError

__all__ = [
    "BatchReader",
    "LazyDataset",
    "SampleReader",
    "TensorDataset",
    "per_sample_reader",
]


def _storage(spec: TargetSpec, array: np.ndarray) -> np.ndarray:
    """Compact in-memory form of a checked target (label maps as uint8 where they fit)."""
    if spec.kind == "segmentation":
        dtype = np.uint8 if max(spec.num_classes, IGNORE_LABEL + 1) <= 256 else np.int64
    elif spec.kind == "edges":
        dtype = np.uint8
    elif spec.kind == "classification":
        dtype = np.int64
    else:
        dtype = np.float32
    return np.ascontiguousarray(array, dtype=dtype)




class TensorDataset(MultiTaskDataset):
    """A split held in memory as compact arrays; a batch is a slice of them.

    Args:
        images: ``uint8 (N, C, H, W)``.
        targets: targets by name, each ``(N, ...)`` in the layout of :func:`standardise`
            and already checked; stored compactly (uint8 label maps).
        specs: what each target is.
        mean, std, can_flip, name: as in :class:`MultiTaskDataset`.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: dict[str, np.ndarray],
        specs: dict[str, TargetSpec],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        can_flip: bool,
        name: str,
    ):
        super().__init__(specs, tuple(images.shape[-2:]), images.shape[1], mean, std, can_flip=can_flip, name=name)
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.stored = {k: _storage(specs[k], v) for k, v in targets.items()}

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _load(self, index: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.images[index], {k: v[index] for k, v in self.stored.items()}

    def resized(self, size: tuple[int, int], chunk: int = 512) -> TensorDataset:
        """Resize everything once, in chunks so that the float copies stay small."""
        size = (int(size[0]), int(size[1]))
        if size == self.image_size:
            return self
        steps = range(0, len(self), chunk)
        images = np.concatenate([resize_images(self.images[i:i + chunk], size) for i in steps])
        stored = {
            name: np.concatenate([resize_target(self.targets[name], value[i:i + chunk], size) for i in steps])
            for name, value in self.stored.items()
        }
        return TensorDataset(images, stored, self.targets, mean=self.mean, std=self.std,
                             can_flip=self.can_flip, name=self.name)

    def subset(self, index: Any) -> TensorDataset:
        """A new in-memory split holding only the samples at ``index``."""
        images, stored = self._load(np.asarray(index, dtype=np.int64))
        return TensorDataset(images, stored, self.targets, mean=self.mean, std=self.std,
                             can_flip=self.can_flip, name=self.name)


#: reader(sample number within the source) -> (image (H, W, C) uint8 or float 0..1, {target: raw array})
SampleReader = Callable[[int], tuple[np.ndarray, dict[str, np.ndarray]]]
#: reader(indices, size or None) -> (fresh images (B, C, H, W), {target: stored (B, ...)})
BatchReader = Callable[[np.ndarray, tuple[int, int] | None], tuple[np.ndarray, dict[str, np.ndarray]]]

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """A shared thread pool for file reads (PIL and numpy release the GIL while decoding)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1)), thread_name_prefix="branchnas-data")
    return _POOL


class LazyDataset(MultiTaskDataset):
    """A split whose samples stay on disk; :meth:`get_batch` reads only the batch's files.

    Args:
        length: number of samples.
        reader: loads a batch (see :data:`BatchReader`); it gets the output size, or
            ``None`` for the native size.
        specs, in_channels, mean, std, can_flip, name: as in :class:`MultiTaskDataset`.
        native_size: ``(H, W)`` of the samples on disk.
        size: the output size, ``None`` = native.
    """

    def __init__(
        self,
        length: int,
        reader: BatchReader,
        specs: dict[str, TargetSpec],
        *,
        native_size: tuple[int, int],
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        can_flip: bool,
        name: str,
        size: tuple[int, int] | None = None,
    ):
        super().__init__(specs, size or native_size, in_channels, mean, std, can_flip=can_flip, name=name)
        self.length = length
        self.reader = reader
        self.native_size = (int(native_size[0]), int(native_size[1]))
        self.size = size

    def __len__(self) -> int:
        return self.length

    def _load(self, index: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.reader(index, self.size)

    def resized(self, size: tuple[int, int]) -> LazyDataset:
        size = (int(size[0]), int(size[1]))
        out = copy.copy(self)  # keeps a subclass and its extra attributes
        out.size = size  # also when it is the native size: it admits images of other sizes
        out.image_size = size
        return out


def per_sample_reader(
    read: SampleReader,
    specs: dict[str, TargetSpec],
    *,
    native_size: tuple[int, int],
    in_channels: int,
    describe: Describe,
    uniform: bool = True,
) -> BatchReader:
    """Turn a one-sample file reader into a :data:`BatchReader`.

    Files are read on a small thread pool. Each sample is checked as it is read: image
    shape, every target's layout and values. A bad one raises :class:`DataError` naming it.

    Args:
        read: sample position in the split -> raw image ``(H, W, C)`` and raw targets.
        specs: the targets to return.
        native_size: ``(H, W)`` of the dataset's images.
        in_channels: channels every image must have.
        describe: sample position -> how to name it (index and file).
        uniform: every image must be ``native_size``; when false, images of other sizes
            are accepted as long as a resize (``data.image_size``) brings them to one size.
    """

    def one(i: int, size: tuple[int, int] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        image, raw = read(i)
        where = describe(i)
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] != in_channels:
            raise DataError(f"{where}: image has shape {image.shape}; expected (H, W, {in_channels})")
        hw = (image.shape[0], image.shape[1])
        if hw != tuple(native_size) and (uniform or size is None):
            hint = "" if uniform else "; set data.image_size = [height, width] to resize every image"
            raise DataError(
                f"{where}: image is {hw[0]}x{hw[1]} but this dataset's images are "
                f"{native_size[0]}x{native_size[1]}{hint}"
            )
        if image.dtype != np.uint8:
            image = image.astype(np.float32)
            if not np.isfinite(image).all():
                raise DataError(f"{where}: image holds NaN or inf")
        img = np.ascontiguousarray(image.transpose(2, 0, 1))[None]
        stored = {}
        for name, spec in specs.items():
            value = standardise(spec, np.asarray(raw[name])[None], hw, where)
            check_values(spec, value, lambda _row, where=where: where)
            if spec.kind == "normals":
                value = unit_normals(value)
            stored[name] = _storage(spec, value)
        if size is not None and hw != tuple(size):
            img = resize_images(img, size)
            stored = {k: resize_target(specs[k], v, size) for k, v in stored.items()}
        return img, stored

    def read_batch(index: np.ndarray, size: tuple[int, int] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if not len(index):
            h, w = size or native_size
            return np.zeros((0, in_channels, h, w), dtype=np.uint8), {}
        samples = list(_pool().map(lambda i: one(int(i), size), index))
        images = [s[0] for s in samples]
        if len({img.dtype for img in images}) > 1:
            images = [img.astype(np.float32) / 255 if img.dtype == np.uint8 else img for img in images]
        return np.concatenate(images), {k: np.concatenate([s[1][k] for s in samples]) for k in specs}

    return read_batch
