"""Stage 2: RSA task affinity at every branch point (Sec. 3.1 and Algorithm 1 of the paper).

For each task's single-task model and each branch point d, the features of K held-out
images give a representation dissimilarity matrix (RDM)::

    RDM_t[d][a, b] = 1 - Pearson(features_a, features_b)                 (K x K)

and two tasks are as related at d as their RDMs are alike::

    A[d, i, j] = Spearman(triu(RDM_i[d]), triu(RDM_j[d]))               (D x N x N)

over the strict upper triangles, with average ranks for ties (what ``scipy.stats.spearmanr``
and ``rsatoolbox.rdm.compare(method='spearman')`` compute).

The formulas are plain tensor functions (:func:`rdm`, :func:`rsa_affinity`,
:func:`resampled_affinity`, :func:`bootstrap_affinity`); :class:`CorrelationAccumulator`
streams the K x K correlation over slices of the features; :func:`extract_rdms` reads the
features of real backbones within a memory budget; :func:`run` is the pipeline stage.

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

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from branchnas.errors import DataError, UserError
from branchnas.rundir import (
    RunDir,
    StageResult,
    atomic_savefig,
    atomic_savez,
    atomic_torch_save,
    atomic_write_json,
)

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "LEVEL",
    "CorrelationAccumulator",
    "rdm",
    "rsa_affinity",
    "resampled_affinity",
    "bootstrap_affinity",
    "extract_rdms",
    "plan_passes",
    "stage_config",
    "run",
    "load_affinity",
    "choose_images",
    "format_affinity",
    "plot_heatmap",
    "plot_depth",
]

log = logging.getLogger(__name__)

#: Default bytes of float32 features that :func:`extract_rdms` keeps per pass. With torch
#: itself (~0.75 GiB resident) and one batch of 16 ResNet-50 activations at 288x384 it keeps
#: the extraction under 2 GiB; more memory means fewer passes.
DEFAULT_MAX_MEMORY = 384 * 2**20

#: Coverage of the stage's bootstrap intervals.
LEVEL = 0.95

#: Upper bound on the float64 scratch copy :class:`CorrelationAccumulator` makes per update.
_SCRATCH_BYTES = 64 * 2**20

_FLOAT32_BYTES = 4


# --------------------------------------------------------------------------- RDMs


def rdm(features: Tensor) -> Tensor:
    """Representation dissimilarity matrix: 1 - Pearson correlation between K feature vectors.

    Args:
        features: ``(K, ...)``; row ``k`` (flattened) is image ``k``'s feature vector.

    Returns:
        ``(K, K)`` float64, symmetric, with an exact zero diagonal and values in [0, 2].
        A row with constant features has no defined correlation: its off-diagonal entries
        are NaN.

    This materialises a float64 copy of ``features``; for large features use
    :class:`CorrelationAccumulator`, which gives the same matrix from slices.

    Example:
        >>> rdm(torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 2.0, 1.0]])).round(decimals=9)
        tensor([[0., 0., 2.],
                [0., 0., 2.],
                [2., 2., 0.]], dtype=torch.float64)
    """
    if features.dim() < 2 or features.shape[0] < 2:
        raise ValueError(f"rdm: expected features of shape (K, ...) with K >= 2; got {tuple(features.shape)}")
    x = features.reshape(features.shape[0], -1).to(torch.float64)
    constant = x.amax(dim=1) == x.amin(dim=1)
    # Centre and normalise first (two-pass): more accurate than raw moments.
    x = x - x.mean(dim=1, keepdim=True)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return _finish_rdm(_mark_constant(x @ x.T, constant))


def _mark_constant(corr: Tensor, constant: Tensor) -> Tensor:
    """NaN in the rows and columns of constant images. Tested exactly (max == min), because
    rounding leaves a constant row a tiny nonzero spread that would normalise to noise."""
    corr[constant, :] = float("nan")
    corr[:, constant] = float("nan")
    return corr


def _finish_rdm(corr: Tensor) -> Tensor:
    """1 - correlation, symmetrised, clipped to [0, 2], with an exact zero diagonal."""
    corr = (corr + corr.T) / 2
    out = 1.0 - corr.clamp(-1.0, 1.0)
    out.fill_diagonal_(0.0)
    return out


class CorrelationAccumulator:
    """Streams the K x K correlation (and RDM) over slices of the feature dimension.

    Each :meth:`update` takes all K images' values for some features, ``(K, f)``; the K x F
    feature matrix is never held. The state is float64: per-image sums, and the Gram
    matrix (whose diagonal holds the sums of squares), so :meth:`compute` gives
    :func:`rdm` of the concatenated slices to float64 precision.

    Args:
        num_images: K.
        device: where the state lives; default: the first chunk's device.

    Example:
        >>> acc = CorrelationAccumulator(4)
        >>> x = torch.randn(4, 1000)
        >>> for chunk in x.split(300, dim=1):
        ...     acc.update(chunk)
        >>> torch.allclose(acc.compute(), rdm(x), atol=1e-12)
        True
    """

    def __init__(self, num_images: int, device: str | torch.device | None = None) -> None:
        if num_images < 2:
            raise ValueError(f"CorrelationAccumulator: expected num_images >= 2; got {num_images}")
        self.num_images = num_images
        self.num_features = 0
        self._state: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None
        if device is not None:
            # Allocated up front, the long-lived state does not land between the short-lived
            # activations of a forward pass, where it would keep freed memory from the OS.
            self._allocate(torch.device(device))

    def _allocate(self, device: torch.device) -> None:
        k = self.num_images
        f64 = {"dtype": torch.float64, "device": device}
        self._state = (
            torch.zeros(k, 1, **f64),  # shift: a rough per-image mean, set by the first columns
            torch.zeros(k, 1, **f64),  # sum of shifted features
            torch.zeros(k, k, **f64),  # Gram matrix of shifted features
            torch.full((k,), float("inf"), **f64),  # minimum, to spot constant images exactly
            torch.full((k,), float("-inf"), **f64),  # maximum
        )

    def update(self, chunk: Tensor) -> None:
        """Add features ``(K, f)``: every image's values for the same f features."""
        if chunk.dim() != 2 or chunk.shape[0] != self.num_images:
            raise ValueError(
                f"CorrelationAccumulator.update: expected a chunk of shape ({self.num_images}, f); "
                f"got {tuple(chunk.shape)}"
            )
        if chunk.shape[1] == 0:
            return
        if self._state is None:
            self._allocate(chunk.device)
        assert self._state is not None
        shift, total, gram, low, high = self._state
        # Bound the float64 copy: convert and multiply a few thousand columns at a time.
        # (Reductions on the whole chunk would not be bounded: a float64 mean of a strided
        # slice can materialise a float64 copy of it.)
        columns = max(1, _SCRATCH_BYTES // (8 * self.num_images))
        for part in chunk.split(columns, dim=1):
            x = part.to(device=gram.device, dtype=torch.float64, copy=True)  # never the caller's
            if self.num_features == 0:
                # Correlation ignores a per-image shift; subtracting a rough per-image mean
                # keeps the raw moments small, avoiding the cancellation in
                # Gram - sum sum^T / F when features have a large mean (shifted-data algorithm).
                shift.copy_(x.mean(dim=1, keepdim=True))
            part_low, part_high = x.aminmax(dim=1)
            torch.minimum(low, part_low, out=low)
            torch.maximum(high, part_high, out=high)
            x -= shift
            total += x.sum(dim=1, keepdim=True)
            gram.addmm_(x, x.T)
            self.num_features += part.shape[1]

    @property
    def constant(self) -> Tensor:
        """``(K,)`` bool: images whose features seen so far are all equal (no correlation)."""
        if self.num_features == 0 or self._state is None:
            raise ValueError("CorrelationAccumulator: no features yet; call update() first")
        return self._state[3] == self._state[4]

    def correlation(self) -> Tensor:
        """The ``(K, K)`` Pearson correlation of the features seen so far (float64)."""
        if self.num_features == 0 or self._state is None:
            raise ValueError("CorrelationAccumulator: no features yet; call update() first")
        _, total, gram, _, _ = self._state
        cov = gram - (total @ total.T) / self.num_features
        std = cov.diagonal().clamp(min=0.0).sqrt()
        return _mark_constant(cov / (std[:, None] * std[None, :]), self.constant)

    def compute(self) -> Tensor:
        """The ``(K, K)`` float64 RDM, equal to :func:`rdm` on all features seen so far."""
        return _finish_rdm(self.correlation())


# --------------------------------------------------------------------------- Spearman


def _upper(rdms: Tensor) -> Tensor:
    """The strict upper triangles of ``(..., K, K)`` as ``(..., K(K-1)/2)``, row by row."""
    k = rdms.shape[-1]
    rows, cols = torch.triu_indices(k, k, offset=1, device=rdms.device)
    return rdms[..., rows, cols]


def _ties(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort each row once and find, for every sorted position, its tie group's first and last.

    Returns ``(order, first, last)``, each ``(R, M)`` int64: ``values[r, order[r, p]]`` is the
    p-th smallest value of row r, and positions ``first[r, p] .. last[r, p]`` hold its ties.
    """
    if values.device.type == "cpu":
        # numpy's SIMD quicksort is about twice torch's CPU sort; stability is not needed,
        # since every member of a tie group gets the group's average rank.
        order = torch.from_numpy(np.argsort(values.detach().numpy(), axis=-1))
        sorted_values = values.gather(-1, order)
    else:
        sorted_values, order = values.sort(dim=-1)
    m = values.shape[-1]
    position = torch.arange(m, device=values.device).expand_as(order)
    differs = sorted_values[..., 1:] != sorted_values[..., :-1]
    if bool(differs.all()):  # no ties (the usual case with continuous RDMs): groups of one
        return order, position, position
    is_first = torch.ones_like(order, dtype=torch.bool)
    is_first[..., 1:] = differs
    is_last = torch.ones_like(is_first)
    is_last[..., :-1] = differs
    # A running max of "position where a group starts" is the start of the current group;
    # the same from the right (a running min, on the flipped rows) gives its end.
    first = torch.where(is_first, position, 0).cummax(dim=-1).values
    last = torch.where(is_last, position, m).flip(-1).cummin(dim=-1).values.flip(-1)
    return order, first, last


def _rank_affinity(values: Tensor, weights: Tensor | None = None, ties: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Spearman correlation between the rows of ``values`` ``(N, D, M)`` at each d: ``(D, N, N)``.

    With ``weights`` ``(M,)`` (non-negative integers), entry m counts ``weights[m]`` times, as
    if the vectors were expanded with repeats; this is how a bootstrap resample is scored
    without building it. Ranks are average ranks over ties, as in ``scipy.stats.rankdata``.
    """
    n, d, m = values.shape
    flat = values.reshape(n * d, m)
    order, first, last = ties if ties is not None else _ties(flat)
    if weights is None:
        # Average rank (1-based) of a tie group spanning sorted positions first..last.
        sorted_rank = (first + last).to(torch.float64) / 2 + 1
        w = None
    else:
        w_sorted = weights.to(torch.float64)[order]
        cum = w_sorted.cumsum(dim=-1)
        before = cum.gather(-1, first) - w_sorted.gather(-1, first)
        group = cum.gather(-1, last) - before
        sorted_rank = before + (group + 1) / 2
        w = weights.to(torch.float64)
    ranks = torch.empty_like(sorted_rank).scatter_(-1, order, sorted_rank)
    if w is None:
        z = ranks - (m + 1) / 2  # the mean of average ranks is exactly (M + 1) / 2
    else:
        mean = (ranks * w).sum(dim=-1, keepdim=True) / w.sum()
        z = (ranks - mean) * w.sqrt()
    z = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    z = z.reshape(n, d, m).transpose(0, 1)  # (D, N, M): one matrix product per point
    corr = torch.bmm(z, z.transpose(1, 2))
    corr = ((corr + corr.transpose(1, 2)) / 2).clamp(-1.0, 1.0)
    corr.diagonal(dim1=1, dim2=2).fill_(1.0)
    return corr


def _triangles(rdms: Tensor, where: str) -> Tensor:
    """The checked float64 strict upper triangles ``(N, D, M)`` of ``(N, D, K, K)`` RDMs."""
    if rdms.dim() != 4 or rdms.shape[-1] != rdms.shape[-2] or rdms.shape[-1] < 3 or rdms.shape[0] < 1:
        raise ValueError(
            f"{where}: expected RDMs of shape (N tasks, D points, K, K) with K >= 3; got {tuple(rdms.shape)}"
        )
    values = _upper(rdms.to(torch.float64))
    if not bool(torch.isfinite(values).all()):
        n, d = (int(i) for i in (~torch.isfinite(values)).any(dim=-1).nonzero()[0])
        raise ValueError(
            f"{where}: rdms[{n}, {d}] holds NaN or inf dissimilarities; an image with "
            "constant features has no correlation -- drop that image or check the model"
        )
    return values


def rsa_affinity(rdms: Tensor) -> Tensor:
    """Task affinity: Spearman correlation between the tasks' RDMs at each branch point.

    ``out[d, i, j]`` is the Spearman rank correlation between the strict upper triangles of
    ``rdms[i, d]`` and ``rdms[j, d]``, with average ranks for ties -- equal to
    ``scipy.stats.spearmanr`` on those vectors. Each vector is ranked once (one sort), and
    the correlations at a point are one matrix product of the standardised ranks.

    Args:
        rdms: ``(N, D, K, K)``: N tasks, D branch points, K >= 3 images.

    Returns:
        ``(D, N, N)`` float64, symmetric, with a diagonal of exactly 1. An entry is NaN
        when one of the two triangles is constant (its ranks have no variance).

    Raises:
        ValueError: a wrong shape, or a NaN/inf in an upper triangle (as in the two below).
    """
    return _rank_affinity(_triangles(rdms, "rsa_affinity"))


def resampled_affinity(rdms: Tensor, indices: Tensor) -> Tensor:
    """:func:`rsa_affinity` of the RDMs restricted to images ``indices`` (repeats allowed).

    A repeated image a, a' gives a pair with dissimilarity exactly 0 in *every* task's
    RDM; keeping such pairs would add agreement that says nothing about the tasks (and
    inflate the affinity), so they are dropped -- as ``rsatoolbox`` does when it bootstraps
    patterns. Every other pair (a, b) is kept as often as it occurs, ``count_a * count_b``
    times; the expanded vectors are never built, the ranks carry those counts as weights.

    Args:
        rdms: ``(N, D, K, K)``.
        indices: ``(K',)`` int64 image indices into ``range(K)``.

    Returns:
        ``(D, N, N)`` float64.
    """
    values = _triangles(rdms, "resampled_affinity")
    return _rank_affinity(values, _pair_weights(indices, rdms.shape[-1]).to(values.device))


def _pair_weights(indices: Tensor, k: int) -> Tensor:
    """How often each upper-triangle pair (a < b) occurs among distinct positions of ``indices``."""
    counts = torch.bincount(indices.reshape(-1).to(torch.int64).cpu(), minlength=k).to(torch.float64)
    return _upper(counts[:, None] * counts[None, :])


def bootstrap_affinity(
    rdms: Tensor, num_samples: int, seed: int, level: float = 0.95
) -> tuple[Tensor, Tensor, Tensor]:
    """Bootstrap confidence intervals of the affinity, resampling the K images.

    Each resample draws K images with replacement and scores them with
    :func:`resampled_affinity` (the same rows and columns of every RDM; pairs of a repeated
    image are dropped). The interval is the percentile interval of the resamples. Each
    resample costs a few passes over the sorted triangles (sorted once, not per resample).

    Args:
        rdms: ``(N, D, K, K)``.
        num_samples: B resamples, >= 1.
        seed: seed of the resampling.
        level: coverage of the interval.

    Returns:
        ``(mean, low, high)``, each ``(D, N, N)`` float64: the mean over resamples (not the
        point estimate, which is :func:`rsa_affinity`), and the ``(1 - level) / 2`` and
        ``(1 + level) / 2`` percentiles. Resamples whose ranks are constant (possible only
        with very few images) are left out.
    """
    values = _triangles(rdms, "bootstrap_affinity")
    if num_samples < 1:
        raise ValueError(f"bootstrap_affinity: expected num_samples >= 1; got {num_samples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_affinity: expected 0 < level < 1; got {level}")
    k = rdms.shape[-1]
    n, d, m = values.shape
    ties = _ties(values.reshape(n * d, m))
    generator = torch.Generator().manual_seed(seed)
    samples = torch.empty(num_samples, d, n, n, dtype=torch.float64)
    for b in range(num_samples):
        indices = torch.randint(k, (k,), generator=generator)
        samples[b] = _rank_affinity(values, _pair_weights(indices, k).to(values.device), ties).cpu()
    alpha = (1.0 - level) / 2
    quantiles = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    low, high = torch.nanquantile(samples, quantiles, dim=0)
    return samples.nanmean(dim=0), low, high


# --------------------------------------------------------------------------- extraction


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
        progress: show a progress bar.

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

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _point_names(backbone: Any) -> list[str]:
    """Block names from the backbone's BlockInfo, else ``block0``, ``block1``, ..."""
    info = getattr(backbone, "block_info", None)
    if info and len(info) == len(backbone.blocks):
        return [str(i.name) for i in info]
    return [f"block{d}" for d in range(len(backbone.blocks))]


# --------------------------------------------------------------------------- the stage


def stage_config(recipe: Any) -> dict[str, Any]:
    """What the affinity stage depends on (besides the pretrain stage's fingerprint).

    The batch size is left out: it changes speed and memory, not the result.
    """
    data = dataclasses.asdict(recipe.data)
    for key in ("batch_size", "augment"):  # neither changes which images are read, or how
        data.pop(key, None)
    return {
        "images": recipe.affinity.images,
        "split": recipe.affinity.split,
        "bootstrap": recipe.affinity.bootstrap,
        "seed": recipe.seed,
        "data": data,
        "tasks": [task.name for task in recipe.tasks],
    }


def _with_options(recipe: Any, images: int | None, bootstrap: int | None) -> Any:
    """The recipe with ``--images`` / ``--bootstrap`` applied (they are part of the fingerprint)."""
    changes = {}
    if images is not None:
        if images < 3:
            raise UserError(f"--images: expected at least 3 images; got {images}")
        changes["images"] = images
    if bootstrap is not None:
        if bootstrap < 0:
            raise UserError(f"--bootstrap: expected 0 (off) or more resamples; got {bootstrap}")
        changes["bootstrap"] = bootstrap
    if not changes:
        return recipe
    return dataclasses.replace(recipe, affinity=dataclasses.replace(recipe.affinity, **changes))


def choose_images(available: int, num_images: int, seed: int, split: str = "val") -> list[int]:
    """K distinct image indices out of ``available``, seeded, in increasing order."""
    if num_images > available:
        raise UserError(
            f"affinity.images: expected at most {available} (the '{split}' split has {available} "
            f"images); got {num_images}; lower affinity.images or use a larger split"
        )
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(available, generator=generator)[:num_images].tolist())


def run(
    recipe: Any,
    rundir: RunDir,
    *,
    force: bool = False,
    images: int | None = None,
    bootstrap: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = True,
) -> StageResult:
    """Stage 2: the affinity tensor of the pretrained single-task models.

    Runs the pretrain stage first if it is not done (:func:`branchnas.pipeline.ensure`).
    Reads ``pretrain/`` through :func:`branchnas.pretrain.load_single_task` and writes
    ``affinity/affinity.npz`` (``affinity`` D x N x N, ``tasks``, ``points``, ``images`` = K,
    ``indices``; with a bootstrap also ``mean``, ``low``, ``high`` and ``level``),
    ``affinity/affinity.json``, one heatmap per branch point and an affinity-vs-depth plot.
    Each task's RDMs are kept in ``affinity/rdms/`` so that a killed run resumes.

    Args:
        recipe: the resolved recipe.
        rundir: the run directory.
        force: redo the stage even if its inputs are unchanged.
        images: K, overriding ``affinity.images``.
        bootstrap: resamples, overriding ``affinity.bootstrap`` (0 = no intervals).
        max_memory: bytes of features kept per extraction pass.
        progress: show progress bars.
    """
    from branchnas.pipeline import ensure

    recipe = _with_options(recipe, images, bootstrap)
    ensure(recipe, rundir, before="affinity")
    config = stage_config(recipe)
    return rundir.run_stage(
        "affinity", config, ["pretrain"],
        lambda folder: _stage_body(recipe, rundir, folder, max_memory, progress), force,
    )


def _stage_body(recipe: Any, rundir: RunDir, folder: Path, max_memory: int, progress: bool) -> dict[str, Any]:
    from branchnas.data import load_splits
    from branchnas.pretrain import load_single_task
    from branchnas.training import derive_seed, resolve_device

    cfg = recipe.affinity
    splits, tasks = load_splits(recipe)
    dataset = splits[cfg.split]
    indices = choose_images(len(dataset), cfg.images, derive_seed(recipe.seed, "affinity", "images"), cfg.split)
    device = resolve_device(recipe.pretrain.device, "pretrain.device")
    names = [task.name for task in tasks]

    def fetch(positions: list[int]) -> Tensor:
        return dataset.get_batch([indices[p] for p in positions], augment=False)[0]

    checkpoints = folder / "rdms"
    per_task, points = [], None
    for name in names:
        path = checkpoints / f"{name}.pt"
        backbone, _ = load_single_task(recipe, rundir, name)
        points = _point_names(backbone)
        if path.exists():  # a killed run resumes: same fingerprint, same images, same models
            per_task.append(torch.load(path, map_location="cpu", weights_only=True))
            continue
        task_rdms = extract_rdms([backbone], fetch, cfg.images, cfg.batch_size, device,
                                 max_memory=max_memory, names=[name], progress=progress)[0]
        atomic_torch_save(task_rdms, path)
        per_task.append(task_rdms)
        del backbone
    assert points is not None  # load_splits guarantees at least one task
    rdms = torch.stack(per_task)
    affinity = rsa_affinity(rdms)
    undefined = torch.isnan(affinity).nonzero()
    if len(undefined):
        d, i, j = (int(v) for v in undefined[0])
        flat = names[i] if torch.isnan(affinity[d, i]).sum() >= len(names) - 1 else names[j]
        raise DataError(
            f"affinity: task '{flat}' has the same dissimilarity for every image pair at branch point "
            f"'{points[d]}', so its rank correlation is undefined; check its pretrain checkpoint"
        )
    arrays: dict[str, Any] = {
        "affinity": affinity.numpy(),
        "tasks": np.array(names),
        "points": np.array(points),
        "images": np.array(cfg.images),
        "indices": np.array(indices),
    }
    summary: dict[str, Any] = {
        "tasks": names, "points": points, "images": cfg.images, "split": cfg.split,
        "affinity": affinity.tolist(),
    }
    low = high = None
    if cfg.bootstrap:
        seed = derive_seed(recipe.seed, "affinity", "bootstrap")
        mean, low, high = bootstrap_affinity(rdms, cfg.bootstrap, seed, LEVEL)
        arrays.update(mean=mean.numpy(), low=low.numpy(), high=high.numpy(), level=np.array(LEVEL))
        summary.update(bootstrap=cfg.bootstrap, level=LEVEL, mean=mean.tolist(), low=low.tolist(),
                       high=high.tolist())
    atomic_savez(folder / "affinity.npz", **arrays)
    atomic_write_json(folder / "affinity.json", summary)
    outputs = [folder / "affinity.npz", folder / "affinity.json"]
    for d, point in enumerate(points):
        path = folder / f"heatmap_{_slug(point)}.png"
        atomic_savefig(plot_heatmap(affinity[d], names, point,
                                    None if low is None else low[d], None if high is None else high[d]), path)
        outputs.append(path)
    path = folder / "depth.png"
    atomic_savefig(plot_depth(affinity, names, points, low, high), path)
    outputs.append(path)
    log.info("affinity:\n%s", format_affinity(affinity, names, points, low, high))
    return {"outputs": [p.relative_to(rundir.path) for p in outputs], "tasks": names, "points": points,
            "images": cfg.images, "bootstrap": cfg.bootstrap}


def load_affinity(rundir: RunDir) -> dict[str, Any]:
    """Read ``affinity/affinity.npz``.

    Returns:
        ``{"affinity": (D, N, N) array, "tasks": [...], "points": [...], "images": K,
        "low": ..., "high": ...}``; ``low`` and ``high`` are ``None`` without a bootstrap.

    Raises:
        UserError: the affinity stage has not written its file yet.
    """
    path = rundir.path / "affinity" / "affinity.npz"
    if not path.exists():
        raise UserError(f"no affinity in {path.parent}; run `branchnas affinity` first")
    with np.load(path) as data:
        return {
            "affinity": data["affinity"],
            "tasks": [str(t) for t in data["tasks"]],
            "points": [str(p) for p in data["points"]],
            "images": int(data["images"]),
            "low": data["low"] if "low" in data else None,
            "high": data["high"] if "high" in data else None,
        }


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# --------------------------------------------------------------------------- reporting


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=float)


def format_affinity(
    affinity: Any,
    tasks: Sequence[str],
    points: Sequence[str],
    low: Any = None,
    high: Any = None,
) -> str:
    """A compact table per branch point, for the terminal.

    Args:
        affinity: ``(D, N, N)`` tensor or array.
        tasks: the N task names.
        points: the D branch-point names.
        low, high: optional ``(D, N, N)`` interval bounds, shown as ``[low, high]``.

    Example:
        >>> print(format_affinity(torch.eye(2)[None], ["seg", "depth"], ["layer1"]))
        layer1
                 seg  depth
        seg     1.00   0.00
        depth   0.00   1.00
    """
    a = _as_array(affinity)
    lo = None if low is None else _as_array(low)
    hi = None if high is None else _as_array(high)
    label = max(len(t) for t in tasks)
    blocks = []
    for d, point in enumerate(points):
        cells = [[_cell(a[d, i, j], lo, hi, d, i, j) for j in range(len(tasks))] for i in range(len(tasks))]
        width = max(max(len(t) for t in tasks), *(len(c) for row in cells for c in row))
        lines = [str(point), " " * label + "".join(f"  {t:>{width}}" for t in tasks)]
        for task, row in zip(tasks, cells, strict=True):
            lines.append(f"{task:<{label}}" + "".join(f"  {c:>{width}}" for c in row))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _cell(value: float, lo: Any, hi: Any, d: int, i: int, j: int) -> str:
    text = f"{value:.2f}"
    if lo is not None and hi is not None and i != j:
        text += f" [{lo[d, i, j]:.2f}, {hi[d, i, j]:.2f}]"
    return text


def _figure(width: float, height: float) -> Any:
    # A bare Figure on the Agg canvas: headless, and no pyplot global state to leak.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


#: Heatmaps of more tasks than this show colours only, no numbers in the cells.
ANNOTATE_MAX_TASKS = 12


def plot_heatmap(affinity: Any, tasks: Sequence[str], point: str, low: Any = None, high: Any = None) -> Any:
    """A heatmap of one branch point's ``(N, N)`` affinity, values written in the cells.

    Returns:
        A matplotlib ``Figure`` (save it with :func:`branchnas.rundir.atomic_savefig`).
    """
    a = _as_array(affinity)
    n = len(tasks)
    fig = _figure(1.6 + 0.9 * n, 1.2 + 0.8 * n)
    ax = fig.add_subplot()
    image = ax.imshow(a, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    ax.set_xticks(range(n), labels=list(tasks), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(tasks))
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    ax.set_title(f"RSA task affinity at {point}")
    lo = None if low is None else _as_array(low)
    hi = None if high is None else _as_array(high)
    # Past a dozen tasks the numbers no longer fit their cells, and drawing them dominates
    # the stage's time (about 10 s per heatmap at 40 tasks): the colours say it all.
    for i in range(n if n <= ANNOTATE_MAX_TASKS else 0):
        for j in range(n):
            text = f"{a[i, j]:.2f}"
            if lo is not None and hi is not None and i != j:
                text += f"\n[{lo[i, j]:.2f}, {hi[i, j]:.2f}]"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if abs(a[i, j]) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="Spearman correlation of RDMs")
    return fig


def plot_depth(affinity: Any, tasks: Sequence[str], points: Sequence[str], low: Any = None, high: Any = None) -> Any:
    """Affinity against depth (the paper's Fig. 4): one line per task pair, plus their mean.

    Returns:
        A matplotlib ``Figure``.
    """
    a = _as_array(affinity)
    lo = None if low is None else _as_array(low)
    hi = None if high is None else _as_array(high)
    n = len(tasks)
    x = list(range(len(points)))
    fig = _figure(max(5.0, 1.2 * len(points)), 4.0)
    ax = fig.add_subplot()
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    # Bands for every pair turn into fog beyond a few pairs; then only the lines are drawn.
    bands = lo is not None and hi is not None and len(pairs) <= 4
    for i, j in pairs:
        line = ax.plot(x, a[:, i, j], marker="o", markersize=4, linewidth=1, alpha=0.8,
                       label=f"{tasks[i]} / {tasks[j]}")[0]
        if bands:
            ax.fill_between(x, lo[:, i, j], hi[:, i, j], color=line.get_color(), alpha=0.15)
    if pairs:
        mean = np.mean([a[:, i, j] for i, j in pairs], axis=0)
        ax.plot(x, mean, color="black", linewidth=2.5, label="mean over pairs")
    ax.set_xticks(x, labels=list(points))
    ax.set_xlabel("branch point (shallow → deep)")
    ax.set_ylabel("task affinity (Spearman)")
    ax.set_ylim(min(-0.05, float(np.nanmin(a)) - 0.05), 1.05)
    ax.set_title("Task affinity against depth" + (" (shaded: bootstrap interval)" if bands else ""))
    ax.grid(alpha=0.3)
    if pairs:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(pairs) // 24)
    return fig

