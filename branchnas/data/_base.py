"""The dataset contract shared by every family: targets, splits, and the family base class.

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

The contract lives here; the helpers the families build on live beside it:

* :mod:`branchnas.data.storage`: the two storage flavours of a split, :class:`TensorDataset`
  (compact arrays in memory) and :class:`LazyDataset` (reads only the files of a batch).
* :mod:`branchnas.data.targets`: raw target arrays into the contract's layout, checked.
* :mod:`branchnas.data.transforms`: flip, resize, paste, normalisation statistics.
* :mod:`branchnas.data.splits`: seeded randomness and train/val/test splitting.
* :mod:`branchnas.data.io`: reading image and ``.npy`` files.

Their names stay importable from this module as well (looked up on first use).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from branchnas.data.transforms import hflip
from branchnas.errors import DataError, RecipeError, did_you_mean
from branchnas.kinds import DENSE_KINDS, IGNORE_INDEX
from branchnas.recipe import TaskConfig, _build

__all__ = [
    "IGNORE_LABEL",
    "DENSE_KINDS",
    "SPLITS",
    "Describe",
    "TargetSpec",
    "MultiTaskDataset",
    "DatasetFamily",
    "LoadRequest",
    "NoOptions",
    "option",
]

#: Segmentation label that the loss and the metrics ignore.
IGNORE_LABEL = IGNORE_INDEX
#: Kinds whose target is a map at the image resolution.
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


def _to_contract(spec: TargetSpec, stored: np.ndarray) -> torch.Tensor:
    """Stored batch -> a tensor in the dtype of the tensor contract."""
    dtype = np.int64 if spec.kind in ("segmentation", "classification") else np.float32
    return torch.from_numpy(np.ascontiguousarray(stored, dtype=dtype))


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
