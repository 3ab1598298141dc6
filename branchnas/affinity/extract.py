"""Feature extraction: the RDMs of real backbones at every branch point, within a memory budget.

:func:`extract_rdms` runs each backbone's ``stem`` and ``blocks`` over K images and folds the
output of every block (a branch point) into a
:class:`~branchnas.affinity.accumulate.CorrelationAccumulator`; :func:`plan_passes` decides
which feature slices each pass keeps.

Why the extraction makes several passes over the images
--------------------------------------------------------
The Gram matrix of K images needs, for every feature, the values of *all K images* at once.
A batch of B images gives all features of B images, so one pass could only give the Gram
if it kept the K x F feature matrix: about 3.5 GB in float32 for ResNet-50's layer1 at
NYUv2 resolution with K = 500 (6.6 GB for all four stages). The ways out are:

* store the features on disk (exact in float32, but GBs of disk per task, and I/O);
* block Gram: keep A images' features as anchors and stream the rest past them
  (about K/(2A) passes, but each pass runs the network to the deepest point);
* feature slices (what :func:`extract_rdms` does): each pass runs all K images and keeps
  only a slice of the features -- all K images x at most ``max_memory`` bytes -- which
  :class:`CorrelationAccumulator` folds into per-image sums and the Gram in float64.

Feature slices are exact (every number comes from the float32 network output, every sum is
float64) and bounded by ``max_memory``. Their cost is recomputation: about
``K * 4 * sum_d F_d / max_memory`` passes. Two things keep it small: the slices are packed
deepest point first, so later passes stop the forward at an early block (the cheap part of
the network); and when everything fits in ``max_memory`` -- small backbones, small images --
there is exactly one pass. For ResNet-50 at 288x384 and K = 500, the default 384 MiB makes
17 passes costing about 7 full forward passes by FLOPs (more on a CPU, where the
high-resolution early blocks take more than their share of the time); 512 MiB makes 13
(5.3), 1 GiB 7 (3.0). An anchor scheme for the shallow points (each pass streams only the
images not yet paired with the anchors) could roughly halve that; it is not done.
``bench/affinity.py`` measures time and memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from branchnas.affinity.accumulate import CorrelationAccumulator
from branchnas.errors import DataError, UserError

__all__ = ["DEFAULT_MAX_MEMORY", "ImageSource", "extract_rdms", "plan_passes"]

log = logging.getLogger(__name__)

#: Default bytes of float32 features that :func:`extract_rdms` keeps per pass. With torch
#: itself (~0.75 GiB resident) and one batch of 16 ResNet-50 activations at 288x384 it keeps
#: the extraction under 2 GiB; more memory means fewer passes.
DEFAULT_MAX_MEMORY = 384 * 2**20

_FLOAT32_BYTES = 4


def plan_passes(feature_sizes: Sequence[int], capacity: int) -> list[list[tuple[int, int, int]]]:
    """Split the features of every point into passes that hold at most ``capacity`` each.

    Args:
        feature_sizes: features per image at each point (``C * H * W``), shallow to deep.
        capacity: features per image one pass may keep.

    Returns:
        One list of ``(point, start, stop)`` slices per pass. Deep points come first, so
        the later passes, which hold only shallow slices, stop the forward early.

    Example:
        >>> plan_passes([6, 4], capacity=5)
        [[(1, 0, 4), (0, 0, 1)], [(0, 1, 6)]]
    """
    if capacity < 1:
        raise ValueError(f"plan_passes: expected capacity >= 1; got {capacity}")
    passes: list[list[tuple[int, int, int]]] = [[]]
    room = capacity
    for point in reversed(range(len(feature_sizes))):
        start = 0
        while start < feature_sizes[point]:
            if room == 0:
                passes.append([])
                room = capacity
            stop = min(feature_sizes[point], start + room)
            passes[-1].append((point, start, stop))
            room -= stop - start
            start = stop
    return [p for p in passes if p]


ImageSource = Any  # a (K', C, H, W) tensor, a dataset with get_batch(indices), or a callable


def _image_fetcher(images: ImageSource, num_images: int) -> Callable[[list[int]], Tensor]:
    """A function from image indices to a float32 image batch, for any supported source."""
    if isinstance(images, torch.Tensor):
        available: int | None = images.shape[0]

        def fetch(indices: list[int]) -> Tensor:
            return images[indices]
    elif hasattr(images, "get_batch"):
        available = len(images)

        def fetch(indices: list[int]) -> Tensor:
            return images.get_batch(indices, augment=False)[0]
    elif callable(images):
        available = None
        fetch = images
    else:
        raise TypeError(
            "extract_rdms: expected images as a tensor, a dataset with get_batch() or a callable "
            f"from indices to images; got {type(images).__name__}"
        )
    if available is not None and available < num_images:
        raise UserError(f"affinity: expected at least {num_images} images; the source has {available}")
    return fetch


def extract_rdms(
    backbones: Sequence[nn.Module] | Mapping[str, nn.Module],
    images: ImageSource,
    num_images: int,
    batch_size: int,
    device: str | torch.device | None = None,
    *,
    max_memory: int = DEFAULT_MAX_MEMORY,
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> Tensor:
    """The RDM of every backbone at every branch point, within a memory budget.

    Each backbone follows the Backbone contract: ``stem`` then ``blocks`` (an
    ``nn.ModuleList``), run in order; the output of each block is a branch point. The
    features are read in slices (see the module notes): each pass runs the K images in
    batches as deep as its slices need and keeps at most ``max_memory`` bytes of float32
    features, which :class:`CorrelationAccumulator` folds into float64 statistics.

    Memory is about ``max_memory`` + one batch's activations + 64 MiB of float64 scratch,
    whatever K is; K and ``max_memory`` set the number of passes, ``batch_size`` the
    activations (about 25 MB per image for ResNet-50 at 288x384).

    Args:
        backbones: N backbones (or ``{task: backbone}``), each with the same D blocks.
        images: the first ``num_images`` images of a ``(K', C, H, W)`` tensor, of a
            dataset with ``get_batch(indices, augment=False) -> (images, targets)``, or of
            a callable ``indices -> images``.
        num_images: K >= 3.
        batch_size: images per forward pass (bounds the activation memory).
        device: where to run (default: CPU); the backbones are moved there in place.
        max_memory: bytes of features kept per pass; less means more passes.
        names: task names for error messages (default: ``task0``, ...).
        progress: show a progress bar (only on a terminal, see
            :func:`branchnas.progress.show_progress`).

    Returns:
        ``(N, D, K, K)`` float64 on the CPU.

    Raises:
        DataError: an image has constant features at some point (no correlation exists).
    """
    if isinstance(backbones, Mapping):
        names = list(backbones) if names is None else names
        backbones = list(backbones.values())
    if not backbones:
        raise ValueError("extract_rdms: expected at least one backbone; got none")
    for i, bb in enumerate(backbones):
        if not (hasattr(bb, "stem") and isinstance(getattr(bb, "blocks", None), torch.nn.ModuleList)):
            raise TypeError(
                f"extract_rdms: backbone {i} ({type(bb).__name__}) has no `stem` and `blocks` "
                "ModuleList; pass branchnas Backbone objects"
            )
    depth = len(backbones[0].blocks)
    if any(len(bb.blocks) != depth for bb in backbones):
        raise ValueError(
            f"extract_rdms: expected the same number of blocks in every backbone; got "
            f"{[len(bb.blocks) for bb in backbones]}"
        )
    if num_images < 3:
        raise ValueError(f"extract_rdms: expected num_images >= 3; got {num_images}")
    if batch_size < 1:
        raise ValueError(f"extract_rdms: expected batch_size >= 1; got {batch_size}")
    names = list(names) if names is not None else [f"task{i}" for i in range(len(backbones))]
    device = torch.device(device) if device is not None else torch.device("cpu")
    fetch = _image_fetcher(images, num_images)
    capacity = max(1, max_memory // (num_images * _FLOAT32_BYTES))
    out = torch.empty(len(backbones), depth, num_images, num_images, dtype=torch.float64)
    for t, backbone in enumerate(backbones):
        backbone.to(device)
        out[t] = _backbone_rdms(backbone, fetch, num_images, batch_size, device, capacity,
                                names[t], progress)
    return out


def _backbone_rdms(
    backbone: nn.Module,
    fetch: Callable[[list[int]], Tensor],
    num_images: int,
    batch_size: int,
    device: torch.device,
    capacity: int,
    name: str,
    progress: bool,
) -> Tensor:
    """``(D, K, K)`` RDMs of one backbone (see :func:`extract_rdms`)."""
    was_training = backbone.training
    backbone.eval()  # batch-norm statistics must not depend on the batch
    try:
        with torch.inference_mode():
            feature_sizes = _feature_sizes(backbone, fetch, device)
            passes = plan_passes(feature_sizes, capacity)
            accumulators = [CorrelationAccumulator(num_images, device) for _ in feature_sizes]
            log.info("%s: %d pass(es) over %d images for features %s", name, len(passes), num_images, feature_sizes)
            bar = _progress(len(passes) * -(-num_images // batch_size), f"affinity {name}", progress)
            # One buffer for every pass: allocating it per pass churns the allocator.
            width = max(sum(stop - start for _, start, stop in slices) for slices in passes)
            buffer = torch.empty(num_images, width, dtype=torch.float32, device=device)
            for slices in passes:
                _run_pass(backbone, fetch, slices, buffer, batch_size, bar)
                offset = 0
                for point, start, stop in slices:
                    accumulators[point].update(buffer[:, offset : offset + stop - start])
                    offset += stop - start
            del buffer
            bar.close()
    finally:
        backbone.train(was_training)
    for point, acc in enumerate(accumulators):
        constant = acc.constant
        if constant.any():
            raise DataError(
                f"affinity: task '{name}' gives image {int(constant.nonzero()[0])} constant features "
                f"at branch point '{_point_names(backbone)[point]}', so its correlation is undefined; "
                "check that image and the task's pretrain checkpoint (dead features?)"
            )
    return torch.stack([acc.compute().cpu() for acc in accumulators])


def _feature_sizes(backbone: nn.Module, fetch: Callable[[list[int]], Tensor], device: torch.device) -> list[int]:
    """Features per image at each block, from one image."""
    h = backbone.stem(fetch([0]).to(device).float())
    sizes = []
    for block in backbone.blocks:
        h = block(h)
        sizes.append(h[0].numel())
    return sizes


def _run_pass(
    backbone: nn.Module,
    fetch: Callable[[list[int]], Tensor],
    slices: list[tuple[int, int, int]],
    buffer: Tensor,
    batch_size: int,
    bar: Any = None,
) -> None:
    """Run the K images in batches as deep as ``slices`` need, writing the slices into
    ``buffer`` ``(K, >= their width)`` side by side.

    Each block's slices are copied out as soon as the block has run, so only the current
    activation of a batch is alive besides the buffer.
    """
    wanted: dict[int, list[tuple[int, int, int]]] = {}
    width = 0
    for point, start, stop in slices:
        wanted.setdefault(point, []).append((start, stop, width))
        width += stop - start
    until = max(wanted)
    num_images = buffer.shape[0]
    for first in range(0, num_images, batch_size):
        last = min(first + batch_size, num_images)
        h = backbone.stem(fetch(list(range(first, last))).to(buffer.device).float())
        for point in range(until + 1):
            h = backbone.blocks[point](h)
            flat = h.reshape(h.shape[0], -1)
            for start, stop, offset in wanted.get(point, ()):
                buffer[first:last, offset : offset + stop - start] = flat[:, start:stop]
        del h, flat
        if bar is not None:
            bar.update(1)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    from branchnas.progress import show_progress

    return tqdm(total=total, desc=desc, disable=not show_progress(enabled), leave=False)


def _point_names(backbone: Any) -> list[str]:
    """Block names from the backbone's BlockInfo, else ``block0``, ``block1``, ..."""
    info = getattr(backbone, "block_info", None)
    if info and len(info) == len(backbone.blocks):
        return [str(i.name) for i in info]
    return [f"block{d}" for d in range(len(backbone.blocks))]
