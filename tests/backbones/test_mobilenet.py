"""MobileNetV2: composition with torchvision's ``features``, declared shapes, parameters."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from branchnas.backbones import build_backbone
from branchnas.cost import count_params
from branchnas.recipe import BackboneConfig


@pytest.mark.parametrize("granularity", ["stage", "block"])
def test_blocks_compose_to_torchvisions_features(tmp_path, granularity):
    reference = torchvision.models.mobilenet_v2(weights=None)
    gen = torch.Generator().manual_seed(2)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    path = tmp_path / "mbv2.pt"
    torch.save(reference.state_dict(), path)
    cfg = BackboneConfig(name="mobilenet_v2", granularity=granularity, weights=str(path))
    backbone = build_backbone(cfg, 3, (32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), reference.eval().features(x))


@pytest.mark.parametrize("granularity,depth_d", [("stage", 4), ("block", 16)])
def test_declared_shapes_match_a_forward_pass(check_declared_shapes, granularity, depth_d):
    for size in [(32, 32), (64, 32)]:
        backbone = build_backbone(BackboneConfig(name="mobilenet_v2", granularity=granularity), 3, size)
        assert backbone.num_blocks == depth_d
        check_declared_shapes(backbone, size)
    assert backbone.stem_info.reduction == 2 and backbone.block_info[-1].channels == 1280


def test_stage_granularity_groups_by_resolution():
    backbone = build_backbone(BackboneConfig(name="mobilenet_v2"), 3, (32, 32))
    assert [(b.name, b.channels, b.reduction) for b in backbone.block_info] == [
        ("features.2-3", 24, 4),
        ("features.4-6", 32, 8),
        ("features.7-13", 96, 16),
        ("features.14-18", 1280, 32),
    ]


@pytest.mark.parametrize("width", [1.0, 0.5])
def test_params_equal_torchvision_minus_the_classifier(width):
    reference = torchvision.models.mobilenet_v2(weights=None, width_mult=width)
    expected = sum(p.numel() for p in reference.features.parameters())
    assert expected == sum(p.numel() for p in reference.parameters()) - sum(
        p.numel() for p in reference.classifier.parameters()
    )
    for granularity in ("stage", "block"):
        cfg = BackboneConfig(name="mobilenet_v2", granularity=granularity, width=width)
        assert count_params(build_backbone(cfg, 3, (32, 32))) == expected


def test_width_multiplier_and_input_channels(check_declared_shapes):
    backbone = build_backbone(BackboneConfig(name="mobilenet_v2", width=0.5, granularity="block"), 1, (32, 32))
    assert backbone.block_info[0].channels == 16  # 24 * 0.5 rounded to a multiple of 8
    assert backbone.block_info[-1].channels == 1280  # torchvision keeps 1280 for width < 1
    check_declared_shapes(backbone, (32, 32), in_channels=1)
