"""``multimnist``: MultiMNIST built from MNIST's raw idx files (Sener & Koltun style).

``data.root`` holds MNIST's four files, plain or gzipped, directly or in torchvision's
``MNIST/raw/`` subfolder::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

Every image overlays two digits on a ``28 + 2*jitter`` square canvas: the ``left`` one
shifted towards the top left, the ``right`` one towards the bottom right, each by a random
0..``jitter`` pixels, strokes combined by maximum. One image is made per source digit
(it is the left digit; its partner is drawn from the same split), so ``0`` images means
as many as the split has digits. The test split comes from MNIST's test files; train and
val divide MNIST's training digits between them, so no source digit is shared between
splits. Images are composed per batch from the source digits (plain idx files are
memory-mapped; gzipped ones have to be decompressed into memory). A flip would mirror
the digits, so these splits never flip.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from branchnas.data._base import DatasetFamily, LoadRequest, MultiTaskDataset, TargetSpec, option
from branchnas.data.splits import seeded_rng, split_pool, take
from branchnas.data.storage import LazyDataset, _storage
from branchnas.data.targets import check_values
from branchnas.data.transforms import paste_max, resize_images
from branchnas.errors import DataError

__all__ = ["MultiMnistFamily", "MultiMnistOptions", "MultiMnistSplit", "read_idx"]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_LAYOUT = (
    "MNIST's raw files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
    "and t10k-labels-idx1-ubyte (optionally .gz)"
)
_MAGIC = {3: 2051, 1: 2049}  # idx magic numbers: unsigned bytes, 3 or 1 dimensions


@dataclass
class MultiMnistOptions:
    """``[data] options`` of the multimnist dataset."""

    jitter: int = option(4, "largest random shift of each digit in pixels; the canvas is 28 + 2*jitter", min=0)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file (``.gz`` or plain, which is memory-mapped) as a uint8 array.

    Raises:
        DataError: the file is not an idx file of ``ndim`` dimensions or is truncated.
    """
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: cannot decompress: {err}") from None
        buffer = np.frombuffer(data, dtype=np.uint8)
    else:
        try:
            buffer = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read: {err}") from None
    header = 4 * (1 + ndim)
    if len(buffer) < header:
        raise DataError(f"{path.name}: too short for an idx file ({len(buffer)} bytes)")
    magic, *dims = (int(v) for v in np.frombuffer(buffer[:header].tobytes(), dtype=">i4"))
    if magic != _MAGIC[ndim]:
        kind = "images (idx3)" if ndim == 3 else "labels (idx1)"
        raise DataError(f"{path.name}: not an MNIST {kind} file (magic number {magic}, expected {_MAGIC[ndim]})")
    expected = header + int(np.prod(dims))
    if len(buffer) != expected:
        raise DataError(f"{path.name}: {len(buffer)} bytes but its header announces {expected}; the file is truncated or corrupt")
    return buffer[header:].reshape(dims)


def _find(root: Path, name: str, family: DatasetFamily) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return family.expect(root / name, f"{name} (or {name}.gz)", root)


class MultiMnistFamily(DatasetFamily):
    """Two overlapping MNIST digits per image (see the module docstring)."""

    name = "multimnist"
    summary = "MultiMNIST: two overlapping MNIST digits per image (paper benchmark; MNIST raw files)"
    Options = MultiMnistOptions
    needs_root = True
    layout = _LAYOUT

    def targets(self, options: Any = None) -> dict[str, TargetSpec]:
        return {
            "left": TargetSpec("left", "classification", 10, description="the digit shifted to the top left"),
            "right": TargetSpec("right", "classification", 10, description="the digit shifted to the bottom right"),
        }

    def load(self, request: LoadRequest) -> dict[str, MultiTaskDataset]:
        root = self.root_dir(request.root)
        sources = {}
        for part, (image_name, label_name) in _FILES.items():
            image_path, label_path = _find(root, image_name, self), _find(root, label_name, self)
            images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
            if len(images) != len(labels):
                raise DataError(f"{image_path.name} has {len(images)} images but {label_path.name} has {len(labels)} labels")
            spec = TargetSpec("digit", "classification", 10)
            check_values(spec, np.asarray(labels), lambda i, p=label_path.name: f"{p} entry {i}")
            sources[part] = (images, np.asarray(labels, dtype=np.int64), image_path.name)
        if sources["train"][0].shape[1:] != sources["test"][0].shape[1:]:
            raise DataError("MNIST's train and test images differ in size; expected 28x28 in both")

        # Val is carved out of MNIST's training digits; test is MNIST's test set. Each split
        # keeps its whole pool for drawing partners, so no digit crosses splits.
        rng = seeded_rng(request.seed, "multimnist", "split")
        sizes = request.sizes
        partners = split_pool(np.arange(len(sources["train"][1])), {"train": 0, "val": sizes["val"]}, rng,
                              "MNIST's training files", splits=("train", "val"))
        partners["test"] = np.arange(len(sources["test"][1]))
        firsts = {
            "train": take(partners["train"], sizes["train"], rng, "num_train", "MNIST's training digits left after val"),
            "val": partners["val"],
            "test": take(partners["test"], sizes["test"], rng, "num_test", "MNIST's test files"),
        }

        jitter = request.options.jitter
        splits: dict[str, MultiTaskDataset] = {}
        mean = std = None
        for split in ("train", "val", "test"):
            images, labels, _ = sources["test" if split == "test" else "train"]
            pair_rng = seeded_rng(request.seed, "multimnist", "pairs", split)
            left = np.sort(firsts[split])
            right = partners[split][pair_rng.integers(0, len(partners[split]), size=len(left))]
            offsets = np.concatenate(
                [pair_rng.integers(0, jitter + 1, size=(len(left), 2)),
                 jitter + pair_rng.integers(0, jitter + 1, size=(len(left), 2))], axis=1
            )
            reader = _reader(images, labels, left, right, offsets, jitter, request.targets)
            if mean is None:
                sample = reader(np.arange(min(1024, len(left))), None)[0].astype(np.float32) / 255
                mean, std = (float(sample.mean()),), (max(float(sample.std()), 1e-3),)
            side = images.shape[1] + 2 * jitter
            splits[split] = MultiMnistSplit(len(left), reader, request.targets, native_size=(side, side),
                                            in_channels=1, mean=mean, std=std, can_flip=False,
                                            name=f"multimnist/{split}")
            splits[split].pairs = {"left": left, "right": right, "offsets": offsets,
                                   "source": "test" if split == "test" else "train"}
        return splits


class MultiMnistSplit(LazyDataset):
    """A MultiMNIST split; ``pairs`` tells which source digits make each image.

    Attributes:
        pairs: ``left`` and ``right`` (rows of the MNIST file named by ``source``, "train"
            or "test") and ``offsets`` ``(N, 4)``: the (y, x) of the left then the right digit.
    """

    pairs: dict[str, Any]


def _reader(
    images: np.ndarray, labels: np.ndarray, left: np.ndarray, right: np.ndarray,
    offsets: np.ndarray, jitter: int, specs: dict[str, TargetSpec],
) -> Any:
    """Compose a batch of pairs from the source digits, vectorised."""
    h, w = images.shape[1:]

    def read(index: np.ndarray, size: tuple[int, int] | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        canvas = np.zeros((len(index), h + 2 * jitter, w + 2 * jitter), dtype=np.uint8)
        a, b = left[index], right[index]
        # Fancy indexing reads only the batch's rows, also from a memory-mapped file.
        paste_max(canvas, np.asarray(images[a]), offsets[index, :2])
        paste_max(canvas, np.asarray(images[b]), offsets[index, 2:])
        out = canvas[:, None]
        if size is not None:
            out = resize_images(out, size)
        values = {"left": labels[a], "right": labels[b]}
        return out, {name: _storage(specs[name], values[name]) for name in specs}

    return read
