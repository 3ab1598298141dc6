"""Helpers shared by the backbone tests."""

from __future__ import annotations

import pytest
import torch


def _check_declared_shapes(backbone, size, in_channels=3):
    """Run the backbone once and compare every output with its declared BlockInfo."""
    height, width = size
    backbone.eval()
    with torch.no_grad():
        x = torch.randn(2, in_channels, height, width)
        stem = backbone.stem(x)
        features = backbone.features(x)
    assert len(features) == backbone.num_blocks == len(backbone.blocks)
    declared = [backbone.stem_info, *backbone.block_info]
    for info, out in zip(declared, [stem, *features], strict=True):
        assert out.shape[0] == 2
        assert out.shape[1] == info.channels, info
        assert (height / out.shape[2], width / out.shape[3]) == (info.reduction, info.reduction), info


@pytest.fixture
def check_declared_shapes():
    """``check(backbone, (h, w), in_channels=3)``: declared channels/reductions match a forward pass."""
    return _check_declared_shapes
