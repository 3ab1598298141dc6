"""The streaming RDM: :class:`CorrelationAccumulator` folds slices of the features into float64 sums.

It gives :func:`branchnas.affinity.functional.rdm` of features too large to hold at once: each
update takes all K images' values for some features, and the state is K x K, whatever F is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from branchnas.affinity.functional import _finish_rdm, _mark_constant

__all__ = ["CorrelationAccumulator"]

#: Upper bound on the float64 scratch copy :class:`CorrelationAccumulator` makes per update.
_SCRATCH_BYTES = 64 * 2**20


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
        >>> from branchnas.affinity.functional import rdm
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
