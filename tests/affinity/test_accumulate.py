"""Tests for branchnas.affinity.accumulate: the streaming CorrelationAccumulator equals rdm()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from branchnas import affinity as aff


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- accumulator


@pytest.mark.parametrize("chunk", [1, 13, 60, 1000])
def test_accumulator_over_chunks_equals_rdm_on_the_full_matrix(chunk):
    # A large common offset is the case where naive raw moments lose digits.
    x = 1e4 + torch.randn(6, 60, generator=_gen(1), dtype=torch.float64)
    acc = aff.CorrelationAccumulator(6)
    for part in x.split(chunk, dim=1):
        acc.update(part)
    assert acc.num_features == 60
    np.testing.assert_allclose(acc.compute().numpy(), aff.rdm(x).numpy(), rtol=0, atol=1e-10)


def test_accumulator_flags_constant_images_and_checks_shapes():
    x = torch.randn(3, 20, generator=_gen(), dtype=torch.float64)
    x[1] = 0.7  # a value whose mean rounds (see the rdm test)
    acc = aff.CorrelationAccumulator(3)
    acc.update(x[:, :7])
    acc.update(x[:, 7:])
    assert acc.constant.tolist() == [False, True, False]
    assert torch.isnan(acc.compute()[1, 0])
    with pytest.raises(ValueError, match=r"\(3, f\)"):
        acc.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match="update"):
        aff.CorrelationAccumulator(3).compute()
