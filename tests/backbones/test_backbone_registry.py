"""The backbone registry and build_backbone's checks of its arguments."""

from __future__ import annotations

import pytest
import torch

from branchnas.backbones import (
    Backbone,
    BlockInfo,
    build_backbone,
    list_backbones,
    register_backbone,
)
from branchnas.backbones._registry import _REGISTRY
from branchnas.errors import UserError
from branchnas.recipe import BackboneConfig

EXPECTED_D = {
    "lenet5": (2, 2),
    "mobilenet_v2": (4, 16),
    "resnet18": (4, 8),
    "resnet20": (3, 9),
    "resnet34": (4, 16),
    "resnet50": (4, 16),
}


def test_every_documented_backbone_is_registered():
    assert list_backbones() == sorted(EXPECTED_D)


@pytest.mark.parametrize("name", sorted(EXPECTED_D))
def test_branch_points_per_granularity(name):
    depths = tuple(
        build_backbone(BackboneConfig(name=name, granularity=g), 3, (32, 32)).num_blocks for g in ("stage", "block")
    )
    assert depths == EXPECTED_D[name]


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        register_backbone("resnet18", summary="again")(lambda cfg, c, s: None)
    assert _REGISTRY["resnet18"].summary != "again"


def test_a_new_backbone_can_be_registered_and_built():
    @register_backbone("tiny", summary="one conv")
    def build_tiny(cfg, in_channels, image_size):
        conv = torch.nn.Conv2d(in_channels, 4, 3, padding=1)
        return Backbone("tiny", cfg.granularity, in_channels, torch.nn.Identity(), [conv],
                        BlockInfo("stem", in_channels, 1), [BlockInfo("conv", 4, 1)])

    try:
        backbone = build_backbone(BackboneConfig(name="tiny"), 2, 8)
        assert backbone(torch.zeros(1, 2, 8, 8)).shape == (1, 4, 8, 8)
        assert "tiny" in list_backbones()
    finally:
        _REGISTRY.pop("tiny", None)


def test_unknown_name_lists_the_choices_and_suggests_one():
    with pytest.raises(UserError) as err:
        build_backbone(BackboneConfig(name="resnet5"), 3, (32, 32))
    message = str(err.value)
    assert message.startswith("unknown backbone 'resnet5'; choose one of: lenet5, mobilenet_v2, resnet18")
    assert "(did you mean 'resnet50'?)" in message


def test_unknown_granularity_is_a_user_error():
    with pytest.raises(UserError, match="unknown backbone granularity 'stages'.*did you mean 'stage'"):
        build_backbone(BackboneConfig(granularity="stages"), 3, (32, 32))


def test_width_on_a_fixed_width_backbone_is_refused():
    with pytest.raises(UserError, match=r"backbone.width: resnet18 has a fixed width \(1.0\); got 0.5"):
        build_backbone(BackboneConfig(name="resnet18", width=0.5), 3, (32, 32))


@pytest.mark.parametrize("name", ["resnet20", "lenet5", "mobilenet_v2"])
def test_dilation_on_a_backbone_without_it_is_refused(name):
    with pytest.raises(UserError, match=f"backbone.dilation: {name} has no dilated variant.*resnet18, resnet34, resnet50"):
        build_backbone(BackboneConfig(name=name, dilation=True), 3, (32, 32))


@pytest.mark.parametrize("size", [(0, 32), (32,), "big", "32", (32, -1), True])
def test_bad_image_sizes_are_user_errors(size):
    with pytest.raises(UserError, match="image size: expected"):
        build_backbone(BackboneConfig(), 3, size)


@pytest.mark.parametrize("channels", [0, -1, 1.5, True])
def test_bad_input_channels_are_user_errors(channels):
    with pytest.raises(UserError, match="in_channels: expected a positive integer"):
        build_backbone(BackboneConfig(), channels, (32, 32))


def test_an_int_image_size_means_a_square():
    backbone = build_backbone(BackboneConfig(name="lenet5"), 1, 8)
    assert backbone(torch.zeros(1, 1, 8, 8)).shape == (1, 20, 2, 2)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*is deprecated:FutureWarning")
def test_backbone_is_scriptable_with_the_same_output():
    backbone = build_backbone(BackboneConfig(name="resnet20", granularity="block"), 3, (32, 32)).eval()
    scripted = torch.jit.script(backbone)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(scripted(x), backbone(x))


def test_mismatched_block_info_is_a_programming_error():
    with pytest.raises(ValueError, match="2 blocks but 1 BlockInfo"):
        Backbone("x", "stage", 3, torch.nn.Identity(), [torch.nn.Identity(), torch.nn.Identity()],
                 BlockInfo("stem", 3, 1), [BlockInfo("a", 3, 1)])
