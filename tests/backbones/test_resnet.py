"""ResNet-20 and the torchvision ResNets: composition, declared shapes, parameter counts."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from branchnas.backbones import build_backbone
from branchnas.backbones.resnet import CifarResNet
from branchnas.cost import count_params
from branchnas.heads import build_head
from branchnas.recipe import BackboneConfig
from branchnas.tasks import Task


def _randomise_bn_stats(model: nn.Module) -> None:
    # Non-default running statistics make the comparison check the buffers as well.
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _torchvision(depth: int, dilation: bool) -> nn.Module:
    builder = getattr(torchvision.models, f"resnet{depth}")
    if dilation:
        return builder(weights=None, replace_stride_with_dilation=[False, True, True])
    return builder(weights=None)


@pytest.mark.parametrize(
    "depth,granularity,dilation",
    # ResNet-50 (a 100 MB state dict) once, with dilation, to keep the folder fast.
    [(18, "stage", False), (18, "block", False), (34, "stage", False), (50, "block", True)],
)
def test_blocks_compose_to_the_torchvision_feature_extractor(tmp_path, depth, granularity, dilation):
    reference = _torchvision(depth, dilation)
    _randomise_bn_stats(reference)
    path = tmp_path / "tv.pt"
    torch.save(reference.state_dict(), path)  # the full model, classifier included
    cfg = BackboneConfig(name=f"resnet{depth}", granularity=granularity, dilation=dilation, weights=str(path))
    # Dilated nets keep 4x4 maps at 32x32 (16x the FLOPs of layer4); 16x16 keeps them fast.
    size = 16 if dilation else 32
    backbone = build_backbone(cfg, 3, size).eval()
    # torchvision's forward up to layer4: every child but avgpool and fc.
    extractor = nn.Sequential(*list(reference.children())[:-2]).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = extractor(x)
        assert torch.equal(backbone(x), expected)
        assert torch.equal(backbone.features(x)[-1], expected)


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_params_equal_torchvision_minus_the_classifier(depth):
    reference = torchvision.models.get_model(f"resnet{depth}", weights=None)
    expected = sum(p.numel() for p in reference.parameters()) - sum(p.numel() for p in reference.fc.parameters())
    # Dilation changes no weight shape; each granularity is checked once, one of them dilated.
    for granularity, dilation in (("stage", False), ("block", True)):
        cfg = BackboneConfig(name=f"resnet{depth}", granularity=granularity, dilation=dilation)
        assert count_params(build_backbone(cfg, 3, (32, 32))) == expected


@pytest.mark.parametrize("granularity,depth_d", [("stage", 4), ("block", 8)])
@pytest.mark.parametrize("dilation", [False, True])
def test_resnet18_declared_shapes_match_a_forward_pass(check_declared_shapes, granularity, depth_d, dilation):
    for size in [(32, 32), (64, 32)]:
        cfg = BackboneConfig(name="resnet18", granularity=granularity, dilation=dilation)
        backbone = build_backbone(cfg, 3, size)
        assert backbone.num_blocks == depth_d
        check_declared_shapes(backbone, size)
    reductions = [b.reduction for b in backbone.block_info]
    assert reductions[-1] == (8 if dilation else 32)


@pytest.mark.parametrize("granularity,depth_d", [("stage", 4), ("block", 16)])
@pytest.mark.parametrize("dilation", [False, True])
def test_resnet50_declared_shapes(check_declared_shapes, granularity, depth_d, dilation):
    cfg = BackboneConfig(name="resnet50", granularity=granularity, dilation=dilation)
    size = (16, 16) if dilation else (32, 32)  # output stride 8: 2x2 maps, like 1x1 at 32x32
    backbone = build_backbone(cfg, 3, size)
    assert backbone.num_blocks == depth_d
    check_declared_shapes(backbone, size)
    expected = [256, 512, 1024, 2048] if granularity == "stage" else [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert [b.channels for b in backbone.block_info] == expected


def test_resnet34_block_names_follow_torchvision():
    backbone = build_backbone(BackboneConfig(name="resnet34", granularity="block"), 3, (32, 32))
    names = [b.name for b in backbone.block_info]
    assert names[:4] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert names[-1] == "layer4.2" and len(names) == 16


def test_dilated_basic_blocks_follow_torchvisions_convention():
    backbone = build_backbone(BackboneConfig(name="resnet18", granularity="block", dilation=True), 3, (32, 32))
    layer3_0, layer3_1, layer4_0, layer4_1 = list(backbone.blocks)[4:]
    assert (layer3_0.conv1.dilation, layer3_0.conv2.dilation, layer3_1.conv1.dilation) == ((1, 1), (2, 2), (2, 2))
    assert (layer4_0.conv1.dilation, layer4_0.conv2.dilation, layer4_1.conv2.dilation) == ((2, 2), (4, 4), (4, 4))
    assert layer3_0.conv1.stride == (1, 1) and layer3_0.downsample[0].stride == (1, 1)


def test_other_input_channels_replace_the_first_conv(check_declared_shapes):
    backbone = build_backbone(BackboneConfig(name="resnet18"), 1, (32, 32))
    assert backbone.stem.conv1.in_channels == 1 and backbone.in_channels == 1
    check_declared_shapes(backbone, (32, 32), in_channels=1)


# --------------------------------------------------------------------------- ResNet-20


@pytest.mark.parametrize("granularity,names", [
    ("stage", ["layer1", "layer2", "layer3"]),
    ("block", [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]),
])
def test_resnet20_declared_shapes(check_declared_shapes, granularity, names):
    for size in [(32, 32), (64, 64), (16, 32)]:
        backbone = build_backbone(BackboneConfig(name="resnet20", granularity=granularity), 3, size)
        check_declared_shapes(backbone, size)
    assert [b.name for b in backbone.block_info] == names
    assert [b.reduction for b in backbone.block_info][-1] == 4
    assert backbone.stem_info.channels == 16 and backbone.stem_info.reduction == 1


def test_resnet20_has_the_papers_parameter_count():
    # He et al. (2016), Table 6: ResNet-20 has 0.27M parameters; with option-A shortcuts and a
    # 10-class linear head the exact count is 269,722 (the reference CIFAR implementations').
    backbone = build_backbone(BackboneConfig(name="resnet20"), 3, (32, 32))
    head = build_head(Task("cifar", "classification", "label", num_classes=10), 64, 4, (32, 32))
    assert count_params(backbone) + count_params(head) == 269_722


def test_resnet20_width_multiplier_scales_the_channels(check_declared_shapes):
    backbone = build_backbone(BackboneConfig(name="resnet20", width=0.5), 3, (32, 32))
    assert [b.channels for b in backbone.block_info] == [8, 16, 32]
    check_declared_shapes(backbone, (32, 32))
    # Convolution weights scale with the square of the width.
    full = count_params(build_backbone(BackboneConfig(name="resnet20"), 3, (32, 32)))
    assert 0.2 < count_params(backbone) / full < 0.3


@pytest.mark.parametrize("granularity", ["stage", "block"])
def test_resnet20_blocks_compose_to_the_reference_model(granularity):
    torch.manual_seed(0)
    reference = CifarResNet(3, 1.0).eval()
    _randomise_bn_stats(reference)
    backbone = build_backbone(BackboneConfig(name="resnet20", granularity=granularity), 3, (32, 32)).eval()
    mapping = backbone.reference.names
    backbone.load_state_dict({k: reference.state_dict()[v] for k, v in mapping.items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), reference(x))


def test_resnet20_option_a_shortcut_has_no_parameters():
    backbone = build_backbone(BackboneConfig(name="resnet20", granularity="block"), 3, (32, 32))
    first_of_stage2 = backbone.blocks[3]
    assert count_params(first_of_stage2.shortcut) == 0
    x = torch.randn(1, 16, 8, 8)
    out = first_of_stage2.shortcut(x)
    # Subsampled by 2 and padded with 8 zero channels on each side.
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
