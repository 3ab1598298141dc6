"""The dataset contract shared by every family, and the helpers the families build on.

A *family* (:class:`DatasetFamily`) turns the recipe's ``[data]`` section into three
:class:`MultiTaskDataset` splits. A split hands out batches through
:meth:`MultiTaskDataset.get_batch` in the tensor conventions of ``docs/internals.md``:

========================  ==========================================================
kind                      target in a batch
========================  ==========================================================
classification            ``int64 (B,)``
attribute                 ``float32 (B,)`` in {0, 1}
segmentation              ``int64 (B, H, W)``, 255 = ignore
depth                     ``float32 (B, 1, H, W)``, 0 = missing
normals                   ``float32 (B, 3, H, W)`` unit vectors, all-zero = missing
edges                     ``float32 (B, 1, H, W)`` in {0, 1}
regression                ``float32 (B, K)``
========================  ==========================================================

Two storage flavours exist. :class:`TensorDataset` keeps compact arrays in memory (uint8
images, uint8 label maps) and slices them per batch. :class:`LazyDataset` calls a reader
that opens only the files of the batch; on-disk benchmarks use it so that nothing is read
into memory all at once.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from branchnas.errors import DataError, RecipeError, did_you_mean
from branchnas.recipe import TaskConfig, _build

__all__ = [
    "IGNORE_LABEL",
    "DENSE_KINDS",
    "SPLITS",
    "TargetSpec",
    "MultiTaskDataset",
    "TensorDataset",
    "LazyDataset",
    "DatasetFamily",
    "LoadRequest",
    "NoOptions",
    "option",
]

#: Segmentation label that the loss and the metrics ignore.
IGNORE_LABEL = 255
#: Kinds whose target is a map at the image resolution.
DENSE_KINDS = frozenset({"segmentation", "depth", "normals", "edges"})
#: Dense kinds resized with nearest neighbours (labels must stay labels).
_NEAREST_KINDS = frozenset({"segmentation", "edges"})
SPLITS = ("train", "val", "test")

Describe = Callable[[int], str]


@dataclass(frozen=True)
class TargetSpec:
    """What one target of a dataset is.

    Attributes:
        name: the target's name; a task's ``target`` refers to it.
        kind: one of :data:`branchnas.recipe.TASK_KINDS`.
        num_classes: classes of a classification or segmentation target, else 0.
        channels: channels of a dense target (3 for normals) or K of a regression target.
        description: one line for ``branchnas datasets``.
    """

    name: str
    kind: str
    num_classes: int = 0
    channels: int = 1
    description: str = ""

    @property
    def dense(self) -> bool:
        """True for targets that are maps at the image resolution."""
        return self.kind in DENSE_KINDS


def option(default: Any, doc: str, **extra: Any) -> Any:
    """A dataclass field for a family's ``[data] options`` (same metadata as the recipe's)."""
    if isinstance(default, list | dict):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"doc": doc, **extra})
    return dataclasses.field(default=default, metadata={"doc": doc, **extra})


@dataclass
class NoOptions:
    """Options of a family that takes none."""


# --------------------------------------------------------------------------- target storage


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


def _to_contract(spec: TargetSpec, stored: np.ndarray) -> torch.Tensor:
    """Stored batch -> a tensor in the dtype of the tensor contract."""
    dtype = np.int64 if spec.kind in ("segmentation", "classification") else np.float32
    return torch.from_numpy(np.ascontiguousarray(stored, dtype=dtype))


def standardise(spec: TargetSpec, array: Any, hw: tuple[int, int] | None, where: str) -> np.ndarray:
    """Bring a batch of raw target values ``(N, ...)`` into the contract's layout.

    Accepts the usual on-disk layouts: ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``
    for dense targets; ``(N,)`` or ``(N, 1)`` for scalar ones.

    Args:
        spec: the target.
        array: ``N`` samples of the target.
        hw: the image size the dense target must have, or ``None`` to accept any.
        where: how to name the data in an error, e.g. ``"images.npz"``.

    Raises:
        DataError: the array's shape does not fit the target's kind.
    """
    array = np.asarray(array)
    shape = tuple(array.shape)
    n = shape[0] if shape else 0
    if spec.dense:
        channels = 3 if spec.kind == "normals" else 1
        if array.ndim == 3 and channels == 1:
            out = array[:, None]
        elif array.ndim == 4 and array.shape[1] == channels:
            out = array
        elif array.ndim == 4 and array.shape[3] == channels:
            out = np.moveaxis(array, 3, 1)
        else:
            layout = "(N, H, W)" if channels == 1 else "(N, H, W, 3)"
            raise DataError(f"{where}: target '{spec.name}' has shape {shape}; expected {layout} for a {spec.kind} target")
        if hw is not None and tuple(out.shape[2:]) != tuple(hw):
            raise DataError(
                f"{where}: target '{spec.name}' is {out.shape[2]}x{out.shape[3]} but the images are "
                f"{hw[0]}x{hw[1]}; a {spec.kind} target must have the image's height and width"
            )
        return out[:, 0] if spec.kind == "segmentation" else out
    if spec.kind == "regression":
        if array.ndim == 1:
            return array.reshape(n, 1)
        if array.ndim == 2:
            return array
        raise DataError(f"{where}: target '{spec.name}' has shape {shape}; expected (N,) or (N, K) for a regression target")
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(f"{where}: target '{spec.name}' has shape {shape}; expected (N,) for a {spec.kind} target")
    return array


def check_values(spec: TargetSpec, array: np.ndarray, describe: Describe) -> None:
    """Raise :class:`DataError` naming the first sample whose target value is invalid.

    Vectorised over the batch: ``array`` is ``(N, ...)`` in the layout of :func:`standardise`.

    Args:
        spec: the target.
        array: the values of ``N`` samples.
        describe: sample position in ``array`` -> how to name it (``"sample 3 (a.png)"``).
    """
    if array.size == 0:
        return
    flat = array.reshape(array.shape[0], -1)
    is_float = np.issubdtype(flat.dtype, np.floating)
    if not (is_float or np.issubdtype(flat.dtype, np.integer) or flat.dtype == np.bool_):
        raise DataError(f"{describe(0)}: target '{spec.name}' holds {flat.dtype} values; expected numbers")
    if is_float:
        _first_bad(spec, ~np.isfinite(flat), flat, describe, "holds NaN or inf; every value must be finite")
    if spec.kind in ("classification", "segmentation"):
        if is_float:
            _first_bad(spec, flat != np.round(flat), flat, describe, "holds {value}, which is not a whole number (class index)")
        valid = (flat >= 0) & (flat < spec.num_classes)
        if spec.kind == "segmentation":
            valid |= flat == IGNORE_LABEL
            rule = f"outside [0, {spec.num_classes}) and not {IGNORE_LABEL} (ignore)"
        else:
            rule = f"outside [0, {spec.num_classes})"
        _first_bad(spec, ~valid, flat, describe, "holds label {value}, " + rule)
    elif spec.kind in ("attribute", "edges"):
        _first_bad(spec, (flat != 0) & (flat != 1), flat, describe, "holds {value}; expected 0 or 1")
    elif spec.kind == "depth":
        _first_bad(spec, flat < 0, flat, describe, "holds {value}; depth must be >= 0 (0 = missing)")


def _first_bad(spec: TargetSpec, bad: np.ndarray, flat: np.ndarray, describe: Describe, problem: str) -> None:
    rows = np.flatnonzero(bad.any(axis=1))
    if rows.size:
        row = int(rows[0])
        value = flat[row][bad[row]][0]
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # "label 12", not "label 12.0"
        raise DataError(f"{describe(row)}: target '{spec.name}' " + problem.format(value=value))


def paste_max(canvas: np.ndarray, patches: np.ndarray, offsets: np.ndarray) -> None:
    """Max-combine square ``patches`` ``(N, P, P)`` into ``canvas`` ``(N, H, W)`` at ``(y, x)`` offsets.

    Vectorised over the batch; overlapping strokes keep the brighter pixel.
    """
    side = patches.shape[-1]
    rows = offsets[:, 0, None, None] + np.arange(side)[None, :, None]
    cols = offsets[:, 1, None, None] + np.arange(side)[None, None, :]
    batch = np.arange(len(canvas))[:, None, None]
    canvas[batch, rows, cols] = np.maximum(canvas[batch, rows, cols], patches)


def unit_normals(normals: np.ndarray) -> np.ndarray:
    """Scale normal vectors ``(N, 3, H, W)`` to unit length; (near-)zero vectors stay zero (missing)."""
    norm = np.sqrt((normals.astype(np.float32) ** 2).sum(axis=1, keepdims=True))
    safe = np.where(norm > 1e-6, norm, 1.0)
    return np.where(norm > 1e-6, normals / safe, 0.0).astype(np.float32)


# --------------------------------------------------------------------------- flip and resize


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
    if spec.kind in _NEAREST_KINDS:
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


# --------------------------------------------------------------------------- datasets


class MultiTaskDataset(abc.ABC):
    """One split of a dataset: images plus one tensor per target.

    Attributes:
        targets: the targets this split serves, by name.
        image_size: ``(H, W)`` of the images in a batch.
        in_channels: image channels (3 for RGB, 1 for grey).
        mean: per-channel mean the images are normalised with (on the 0..1 scale).
        std: per-channel standard deviation, likewise.
        can_flip: whether a horizontal flip keeps every target valid; ``augment`` is a
            no-op where it does not (two-digit images would swap and mirror their digits).
        name: ``"<family>/<split>"``, used in messages.
    """

    targets: dict[str, TargetSpec]
    image_size: tuple[int, int]
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    can_flip: bool
    name: str

    def __init__(
        self,
        targets: dict[str, TargetSpec],
        image_size: tuple[int, int],
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        can_flip: bool,
        name: str,
    ):
        self.targets = dict(targets)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.in_channels = int(in_channels)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.can_flip = can_flip
        self.name = name
        std_ = np.array(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply and one subtract per pixel
        self._scale = {np.dtype(np.uint8): 1.0 / (255.0 * std_), np.dtype(np.float32): 1.0 / std_}
        self._shift = np.array(self.mean, dtype=np.float32).reshape(1, -1, 1, 1) / std_

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _load(self, index: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Images ``(B, C, H, W)`` (uint8, or float32 in 0..1) and stored targets of ``index``.

        The arrays must be fresh copies: :meth:`get_batch` flips them in place.
        """

    @abc.abstractmethod
    def resized(self, size: tuple[int, int]) -> MultiTaskDataset:
        """The same split with images and dense targets at ``size`` = ``(H, W)``."""

    def get_batch(
        self, indices: Any, augment: bool = False, rng: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return normalised images and targets for ``indices``.

        Args:
            indices: sample positions (a sequence, array or tensor of ints).
            augment: mirror a random half of the samples (image and every dense target)
                when the dataset allows it (:attr:`can_flip`).
            rng: draws the flips; ``None`` uses torch's global generator.

        Returns:
            ``(images float32 (B, C, H, W), {target: tensor})`` in the contract's dtypes.
        """
        # The batch is assembled in numpy: single-threaded, so it never competes with the
        # model's threads, and as fast as torch for arrays this small.
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"{self.name}: indices must lie in [0, {len(self)}); got {index.min()}..{index.max()}")
        images, stored = self._load(index)
        scale = self._scale[np.dtype(np.uint8) if images.dtype == np.uint8 else np.dtype(np.float32)]
        pixels = images.astype(np.float32)
        pixels *= scale
        pixels -= self._shift
        if augment and self.can_flip and index.size:
            flips = (torch.rand(index.size, generator=rng) < 0.5).numpy()
            hflip(pixels, stored, self.targets, flips)
        targets = {name: _to_contract(self.targets[name], value) for name, value in stored.items()}
        return torch.from_numpy(pixels), targets

    def __repr__(self) -> str:
        h, w = self.image_size
        return (
            f"<{type(self).__name__} {self.name}: {len(self)} images {self.in_channels}x{h}x{w}, "
            f"targets {', '.join(self.targets)}>"
        )


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


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class LoadRequest:
    """What :meth:`DatasetFamily.load` is asked for.

    Attributes:
        root: ``data.root`` as given ("" when unset).
        options: the family's validated options dataclass.
        seed: the recipe seed; every random choice (split, generation) derives from it.
        sizes: images wanted per split (``0`` = all available).
        targets: the targets the tasks use; a family loads only these.
        tasks: the task configs (the ``arrays`` family reads kinds from them).
    """

    root: str
    options: Any
    seed: int
    sizes: dict[str, int]
    targets: dict[str, TargetSpec]
    tasks: tuple[TaskConfig, ...] = ()


class DatasetFamily(abc.ABC):
    """A kind of dataset: its options, its targets and how to load its splits.

    Subclasses set the class attributes and implement :meth:`targets` and :meth:`load`;
    :func:`branchnas.data.register_dataset` makes one available by name.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs_root: ClassVar[bool] = False
    #: what data.root must hold, one line (shown in errors and by ``branchnas datasets``)
    layout: ClassVar[str] = ""
    #: generated families make images on demand: "0 = all available" has no meaning there
    generated: ClassVar[bool] = False

    def parse_options(self, raw: dict[str, Any] | None) -> Any:
        """Validate ``[data] options`` into :attr:`Options` (recipe-style errors)."""
        if raw and not dataclasses.fields(self.Options):
            raise RecipeError(f"data.options: the {self.name} dataset takes no options; got {', '.join(raw)}")
        options = _build(self.Options, raw or {}, "data.options")
        self.check_options(options)
        return options

    def check_options(self, options: Any) -> None:
        """Cross-field checks of the options; raise :class:`RecipeError`. None by default."""
        return None

    @abc.abstractmethod
    def targets(self, options: Any = None) -> dict[str, TargetSpec]:
        """Every target this family provides under ``options`` (defaults when ``None``)."""

    def default_tasks(self, options: Any = None) -> list[TaskConfig]:
        """The tasks used when the recipe lists none: by default one per target."""
        return [TaskConfig(name=name, kind=spec.kind, target=name) for name, spec in self.targets(options).items()]

    def resolve_targets(self, options: Any, tasks: Sequence[TaskConfig]) -> dict[str, TargetSpec]:
        """The targets ``tasks`` use, checking that each one exists.

        Raises:
            RecipeError: a task names a target this family does not have.
        """
        available = self.targets(options)
        out = {}
        for i, task in enumerate(tasks):
            target = task.target or task.name
            if target not in available:
                key = "target" if task.target else "name"
                raise RecipeError(
                    f"tasks[{i}].{key}: the {self.name} dataset has no target '{target}'; "
                    f"choose one of: {', '.join(available)}{did_you_mean(target, available)}"
                )
            out[target] = available[target]
        return out

    @abc.abstractmethod
    def load(self, request: LoadRequest) -> dict[str, MultiTaskDataset]:
        """The ``train``, ``val`` and ``test`` splits at the family's native size."""

    def describe_options(self) -> list[tuple[str, Any, str]]:
        """``(option, default, doc)`` rows for ``branchnas datasets``."""
        rows = []
        for f in dataclasses.fields(self.Options):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f.name, default, f.metadata.get("doc", "")))
        return rows

    # -- helpers for subclasses

    def root_dir(self, root: str) -> Path:
        """``data.root`` as an existing folder, or a :class:`DataError` that says what to put there."""
        if not root:
            raise DataError(
                f"data.root: the {self.name} dataset is read from disk; set data.root to a folder "
                f"holding {self.layout}; see docs/datasets.md"
            )
        path = Path(root).expanduser()
        if not path.is_dir():
            state = "is not a folder" if path.exists() else "does not exist"
            raise DataError(f"data.root: {path} {state}; expected a folder holding {self.layout}; see docs/datasets.md")
        return path

    def expect(self, path: Path, what: str, root: Path) -> Path:
        """``path`` if it exists, else a :class:`DataError` naming ``what`` and where it was expected."""
        if not path.exists():
            raise DataError(
                f"data.root: expected {what} in {root} ({self.layout}); see docs/datasets.md"
            )
        return path


# --------------------------------------------------------------------------- seeds and splits


def seeded_rng(seed: int, *tags: str | int) -> np.random.Generator:
    """A numpy generator fixed by the recipe seed and a purpose (tags), stable across runs."""
    words = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF]
    words += [zlib.crc32(t.encode()) if isinstance(t, str) else int(t) & 0xFFFFFFFF for t in tags]
    return np.random.default_rng(np.random.SeedSequence(words))


def take(pool: np.ndarray, n: int, rng: np.random.Generator, key: str, what: str) -> np.ndarray:
    """``n`` entries of ``pool`` in a seeded random order (``n = 0``: all of them).

    Raises:
        DataError: ``pool`` holds fewer than ``n`` entries.
    """
    if n > len(pool):
        raise DataError(
            f"data.{key}: asked for {n} images but {what} has {len(pool)}; "
            f"lower data.{key} (0 = all available)"
        )
    order = rng.permutation(pool)
    return order if n == 0 else order[:n]


def split_pool(
    pool: np.ndarray, sizes: dict[str, int], rng: np.random.Generator, what: str, splits: Iterable[str] = SPLITS
) -> dict[str, np.ndarray]:
    """Divide one pool of samples into disjoint seeded splits.

    A split asked for 0 images gets 10% of the pool if it is ``val`` or ``test``, and
    everything left over if it is ``train``.

    Raises:
        DataError: the sizes asked for add up to more than the pool holds.
    """
    splits = list(splits)
    order = rng.permutation(pool)
    wanted = {s: sizes[s] or (0 if s == "train" else max(1, len(pool) // 10)) for s in splits}
    fixed = sum(wanted.values())
    if fixed > len(order) or (sizes.get("train", 1) == 0 and fixed >= len(order)):
        asked = " + ".join(f"num_{s}={sizes[s]}" for s in splits)
        raise DataError(
            f"data: {asked} needs more images than {what} holds ({len(order)}); lower them "
            "(0 = all remaining for train, 10% for val and test)"
        )
    out, start = {}, 0
    for s in sorted(splits, key=lambda s: s == "train"):
        n = wanted[s] if wanted[s] else len(order) - start
        out[s] = order[start:start + n]
        start += n
    return out


def channel_stats(images: np.ndarray, limit: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) of uint8 images ``(N, C, H, W)``, from at most ``limit`` of them."""
    sample = images[:limit].astype(np.float32) / 255
    mean = sample.mean(axis=(0, 2, 3))
    std = sample.std(axis=(0, 2, 3))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)


def require_count(sizes: dict[str, int], family: str) -> None:
    """Generated families make as many images as asked for; 0 ("all") has no meaning there."""
    for split in SPLITS:
        if sizes[split] <= 0:
            raise DataError(
                f"data.num_{split}: 0 means 'all available', but the {family} dataset is generated; "
                "give a number of images (e.g. 2000)"
            )


# --------------------------------------------------------------------------- file readers


def read_image(path: Path, where: str, mode: str | None = "RGB") -> np.ndarray:
    """Decode an image file into ``(H, W, C)`` (uint8 for 8-bit files).

    Args:
        path: the file.
        where: how to name the sample in an error.
        mode: PIL mode to convert to (``"RGB"``, ``"L"``), or ``None`` to keep the file's
            own values (label maps, 16-bit disparity).

    Raises:
        DataError: the file is missing or cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if mode is not None and img.mode != mode:
                img = img.convert(mode)
            array = np.array(img)
    except FileNotFoundError:
        raise DataError(f"{where}: file {path} is missing") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{where}: cannot read image {path}: {err}") from None
    return array[:, :, None] if array.ndim == 2 and mode is not None else array


def read_npy(path: Path, where: str) -> np.ndarray:
    """Load a ``.npy`` array (no pickles), turning I/O errors into :class:`DataError`."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{where}: file {path} is missing") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: cannot read {path}: {err}") from None
