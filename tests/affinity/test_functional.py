"""Tests for branchnas.affinity.functional: RDMs, RSA affinity and the bootstrap, against numpy/scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from branchnas import affinity as aff


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _upper_np(matrix: np.ndarray) -> np.ndarray:
    rows, cols = np.triu_indices(matrix.shape[0], 1)
    return matrix[rows, cols]


def _spearman_reference(rdms: torch.Tensor) -> np.ndarray:
    """A[d, i, j] by scipy, one pair at a time (the slow, obvious way)."""
    n, d = rdms.shape[:2]
    out = np.empty((d, n, n))
    for p in range(d):
        for i in range(n):
            for j in range(n):
                out[p, i, j] = spearmanr(_upper_np(rdms[i, p].numpy()), _upper_np(rdms[j, p].numpy())).statistic
    return out


# --------------------------------------------------------------------------- rdm


def test_rdm_matches_numpy_corrcoef():
    x = torch.randn(7, 3, 4, 5, generator=_gen(), dtype=torch.float64)
    expected = 1.0 - np.corrcoef(x.reshape(7, -1).numpy())
    out = aff.rdm(x)
    assert out.shape == (7, 7) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    assert torch.equal(out, out.T)
    assert torch.equal(out.diagonal(), torch.zeros(7, dtype=torch.float64))


def test_rdm_marks_a_constant_image_nan():
    # 0.1 in float64 over 7 features: the mean rounds, so centring leaves a tiny constant
    # that would normalise to an arbitrary vector unless constant rows are caught exactly.
    x = torch.randn(4, 7, generator=_gen(), dtype=torch.float64)
    x[2] = 0.1
    assert (x[2] - x[2].mean()).abs().max() > 0
    out = aff.rdm(x)
    assert torch.isnan(out[2, [0, 1, 3]]).all() and torch.isnan(out[[0, 1, 3], 2]).all()
    assert torch.isfinite(out[:2, :2]).all()


def test_rdm_rejects_a_single_image():
    with pytest.raises(ValueError, match="K >= 2"):
        aff.rdm(torch.randn(1, 5))


# --------------------------------------------------------------------------- Spearman


def _random_rdms(n: int, d: int, k: int, seed: int, decimals: int | None = None) -> torch.Tensor:
    rdms = torch.rand(n, d, k, k, generator=_gen(seed), dtype=torch.float64) * 2
    if decimals is not None:
        rdms = rdms.round(decimals=decimals)  # many ties
    return rdms  # neither symmetric nor zero on the diagonal: only the strict upper part counts


@pytest.mark.parametrize("decimals", [None, 1])
def test_rsa_affinity_matches_scipy_spearman_on_strict_upper_triangles(decimals):
    rdms = _random_rdms(4, 3, 9, seed=2, decimals=decimals)
    if decimals is not None:
        assert len(np.unique(_upper_np(rdms[0, 0].numpy()))) < 36  # ties are really there
    out = aff.rsa_affinity(rdms)
    assert out.shape == (3, 4, 4)
    np.testing.assert_allclose(out.numpy(), _spearman_reference(rdms), rtol=0, atol=1e-12)


def test_rsa_affinity_ignores_the_diagonal_and_lower_triangle():
    rdms = _random_rdms(3, 2, 8, seed=3)
    changed = rdms.clone()
    lower = torch.ones(8, 8, dtype=torch.bool).tril()
    changed[..., lower] = torch.rand(int(lower.sum()), generator=_gen(9), dtype=torch.float64)
    assert torch.equal(aff.rsa_affinity(rdms), aff.rsa_affinity(changed))


def test_rsa_affinity_is_symmetric_with_a_unit_diagonal():
    out = aff.rsa_affinity(_random_rdms(5, 4, 12, seed=4, decimals=2))
    assert torch.equal(out, out.transpose(1, 2))
    assert torch.equal(out.diagonal(dim1=1, dim2=2), torch.ones(4, 5, dtype=torch.float64))
    assert (out.abs() <= 1).all()


def test_rsa_affinity_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N tasks, D points, K, K\)"):
        aff.rsa_affinity(torch.rand(3, 5, 5))
    rdms = _random_rdms(2, 2, 5, seed=5)
    rdms[1, 0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"rdms\[1, 0\]"):
        aff.rsa_affinity(rdms)
    with pytest.raises(ValueError, match=r"bootstrap_affinity: rdms\[1, 0\]"):
        aff.bootstrap_affinity(rdms, 2, seed=0)


def _latent_features(latent: torch.Tensor, features: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    """A random linear map of the latent (nearly preserves its geometry), plus noise."""
    g = _gen(seed)
    mixed = latent @ torch.randn(latent.shape[1], features, generator=g, dtype=torch.float64)
    return mixed + noise * torch.randn(latent.shape[0], features, generator=g, dtype=torch.float64)


def _structured_rdms(k: int, seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    """Tasks 0 and 1 see the same latent; task 2 sees an independent one. Shape (3, 1, K, K)."""
    shared = torch.randn(k, 8, generator=_gen(seed), dtype=torch.float64)
    other = torch.randn(k, 8, generator=_gen(seed + 100), dtype=torch.float64)
    feats = [_latent_features(shared, 3000, seed + 1, noise), _latent_features(shared, 3000, seed + 2, noise),
             _latent_features(other, 3000, seed + 3, noise)]
    return torch.stack([aff.rdm(f) for f in feats])[:, None]


def test_affinity_of_linear_transforms_of_one_latent_is_near_one_and_of_independent_near_zero():
    out = aff.rsa_affinity(_structured_rdms(40))[0]
    assert out[0, 1] > 0.95
    assert abs(out[0, 2]) < 0.2 and abs(out[1, 2]) < 0.2


# --------------------------------------------------------------------------- bootstrap


def test_resampled_affinity_equals_building_the_resample_and_dropping_repeated_pairs():
    rdms = _random_rdms(3, 2, 9, seed=6, decimals=1)
    indices = torch.tensor([0, 0, 1, 3, 3, 3, 5, 6, 8])
    expected = np.empty((2, 3, 3))
    rows, cols = np.triu_indices(len(indices), 1)
    distinct = indices.numpy()[rows] != indices.numpy()[cols]
    for d in range(2):
        vectors = []
        for t in range(3):
            resampled = rdms[t, d].numpy()[np.ix_(indices.numpy(), indices.numpy())]
            vectors.append(resampled[rows[distinct], cols[distinct]])
        for i in range(3):
            for j in range(3):
                expected[d, i, j] = spearmanr(vectors[i], vectors[j]).statistic
    np.testing.assert_allclose(aff.resampled_affinity(rdms, indices).numpy(), expected, rtol=0, atol=1e-12)


def test_resampled_affinity_without_repeats_is_rsa_affinity_of_the_subset():
    rdms = _random_rdms(3, 2, 10, seed=7)
    subset = torch.tensor([1, 2, 4, 7, 9])
    sub_rdms = rdms[:, :, subset][:, :, :, subset]
    np.testing.assert_allclose(aff.resampled_affinity(rdms, subset).numpy(),
                               aff.rsa_affinity(sub_rdms).numpy(), rtol=0, atol=1e-12)


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_images():
    widths = []
    for k in (15, 60):
        rdms = _structured_rdms(k, seed=k, noise=3.0)
        point = aff.rsa_affinity(rdms)
        mean, low, high = aff.bootstrap_affinity(rdms, 200, seed=0)
        assert mean.shape == low.shape == high.shape == point.shape
        off = ~torch.eye(3, dtype=torch.bool)
        assert (low[:, off] <= point[:, off]).all() and (point[:, off] <= high[:, off]).all()
        assert (low <= mean).all() and (mean <= high).all()
        assert torch.equal(low.diagonal(dim1=1, dim2=2), torch.ones(1, 3, dtype=torch.float64))
        widths.append((high - low)[:, off].mean().item())
    assert widths[1] < 0.7 * widths[0]


def test_bootstrap_is_seeded():
    rdms = _random_rdms(3, 1, 8, seed=8)
    first = aff.bootstrap_affinity(rdms, 20, seed=3)
    again = aff.bootstrap_affinity(rdms, 20, seed=3)
    other = aff.bootstrap_affinity(rdms, 20, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])
