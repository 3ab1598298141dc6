"""Tests for branchnas.affinity.extract: pass planning and RDM extraction from backbones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from branchnas import affinity as aff
from branchnas.errors import DataError, UserError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- extraction


def _direct_rdms(backbone: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """All features in memory, then rdm(). Same batches as the extraction, because a conv's
    float32 result depends (in the last bits) on the batch it runs in."""
    backbone.eval()
    per_point: list[list[torch.Tensor]] = [[] for _ in backbone.blocks]
    with torch.no_grad():
        for batch in images.split(batch_size):
            h = backbone.stem(batch)
            for d, block in enumerate(backbone.blocks):
                h = block(h)
                per_point[d].append(h)
    return torch.stack([aff.rdm(torch.cat(feats)) for feats in per_point])


# 400 of the 1536 + 512 + 7 features per image per pass (6 passes, some stopping early); all at once.
@pytest.mark.parametrize("max_memory", [10 * 4 * 400, 1 << 30])
def test_extract_rdms_equals_the_computation_with_all_features_in_memory(max_memory, tiny_backbone):
    assert len(aff.plan_passes([1536, 512, 7], max_memory // (10 * 4))) in (6, 1)
    images = torch.randn(12, 3, 16, 16, generator=_gen(10))
    backbones = [tiny_backbone(1), tiny_backbone(2)]
    for b in backbones:
        b.train()
    expected = torch.stack([_direct_rdms(b, images[:10], 3) for b in backbones])
    for b in backbones:
        b.train()
    out = aff.extract_rdms(backbones, images, 10, batch_size=3, max_memory=max_memory)
    assert out.shape == (2, 3, 10, 10) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=0, atol=1e-12)
    assert all(b.training for b in backbones)  # the caller's mode is given back


def test_extract_rdms_reads_datasets_and_callables(tiny_backbone):
    images = torch.randn(8, 3, 16, 16, generator=_gen(11))

    class Dataset:
        def __len__(self) -> int:
            return len(images)

        def get_batch(self, indices, augment=False, rng=None):
            assert augment is False
            return images[indices], {}

    backbone = tiny_backbone(3)
    from_tensor = aff.extract_rdms([backbone], images, 6, batch_size=4)
    from_dataset = aff.extract_rdms({"seg": backbone}, Dataset(), 6, batch_size=4)
    from_callable = aff.extract_rdms([backbone], lambda idx: images[idx], 6, batch_size=4)
    assert torch.equal(from_tensor, from_dataset) and torch.equal(from_tensor, from_callable)
    with pytest.raises(UserError, match="at least 9 images"):
        aff.extract_rdms([backbone], Dataset(), 9, batch_size=4)


def test_extract_rdms_names_the_image_with_constant_features():
    images = torch.randn(5, 3, 8, 8, generator=_gen(12))
    images[3] = 0.0  # bias-free convolutions keep it exactly zero
    backbone = nn.Module()
    backbone.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    backbone.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1, bias=False)])
    with pytest.raises(DataError, match="task 'depth' gives image 3 constant features at branch point 'block0'"):
        aff.extract_rdms({"depth": backbone}, images, 5, batch_size=2)


def test_plan_passes_covers_every_feature_once_within_capacity_deepest_first():
    sizes = [70, 30, 25]
    passes = aff.plan_passes(sizes, capacity=40)
    seen = {p: np.zeros(s, dtype=int) for p, s in enumerate(sizes)}
    for slices in passes:
        assert sum(stop - start for _, start, stop in slices) <= 40
        for point, start, stop in slices:
            seen[point][start:stop] += 1
    assert all((counts == 1).all() for counts in seen.values())
    assert len(passes) == 4  # ceil(125 / 40)
    assert [max(p for p, _, _ in s) for s in passes] == [2, 1, 0, 0]
    assert aff.plan_passes(sizes, capacity=1000) == [[(2, 0, 25), (1, 0, 30), (0, 0, 70)]]
