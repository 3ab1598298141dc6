"""The affinity formulas as plain tensor functions: RDMs and their rank (Spearman) comparison.

For one task and branch point, the features of K images give a representation dissimilarity
matrix (RDM)::

    RDM_t[d][a, b] = 1 - Pearson(features_a, features_b)                 (K x K)

and two tasks are as related at d as their RDMs are alike::

    A[d, i, j] = Spearman(triu(RDM_i[d]), triu(RDM_j[d]))               (D x N x N)

over the strict upper triangles, with average ranks for ties (what ``scipy.stats.spearmanr``
and ``rsatoolbox.rdm.compare(method='spearman')`` compute). :func:`rdm`, :func:`rsa_affinity`,
:func:`resampled_affinity` and :func:`bootstrap_affinity` hold no state and read no files;
the streaming version of :func:`rdm` is :class:`branchnas.affinity.accumulate.CorrelationAccumulator`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["rdm", "rsa_affinity", "resampled_affinity", "bootstrap_affinity"]


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
