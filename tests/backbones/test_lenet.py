"""LeNet-5: two conv blocks behind an identity stem, on small digit-sized inputs."""

from __future__ import annotations

import pytest
import torch

from branchnas.backbones import build_backbone
from branchnas.cost import count_params
from branchnas.errors import UserError
from branchnas.recipe import BackboneConfig


@pytest.mark.parametrize("granularity", ["stage", "block"])
@pytest.mark.parametrize("size", [(28, 28), (16, 32), (32, 32), (4, 4)])
def test_declared_shapes_match_a_forward_pass(check_declared_shapes, granularity, size):
    backbone = build_backbone(BackboneConfig(name="lenet5", granularity=granularity), 1, size)
    assert [(b.name, b.channels, b.reduction) for b in backbone.block_info] == [("conv1", 10, 2), ("conv2", 20, 4)]
    assert (backbone.stem_info.channels, backbone.stem_info.reduction) == (1, 1)
    check_declared_shapes(backbone, size, in_channels=1)


def test_stem_is_the_identity_and_blocks_hold_the_convolutions():
    backbone = build_backbone(BackboneConfig(name="lenet5"), 1, (28, 28))
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(backbone.stem(x), x)
    # conv1: 10 * (1*25) + 10; conv2: 20 * (10*25) + 20.
    assert count_params(backbone) == 260 + 5020


def test_width_multiplier_and_rgb_input(check_declared_shapes):
    backbone = build_backbone(BackboneConfig(name="lenet5", width=2.0), 3, (32, 32))
    assert [b.channels for b in backbone.block_info] == [20, 40]
    check_declared_shapes(backbone, (32, 32))


def test_too_small_input_is_refused_with_the_minimum():
    with pytest.raises(UserError, match=r"at least 4x4; got 3x8"):
        build_backbone(BackboneConfig(name="lenet5"), 1, (3, 8))
