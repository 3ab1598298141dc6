"""MobileNetV2: torchvision's ``features``, cut at its inverted-residual blocks.

torchvision's ``mobilenet_v2().features`` is a 3x3 conv (stride 2), 17 inverted-residual
blocks and a final 1x1 conv to 1280 channels. The stem is the first conv plus the first
inverted-residual block (expansion 1, 16 channels, still at reduction 2): that block is too
small to be worth branching at. The rest is cut

* ``stage`` (D = 4): by resolution, like a ResNet's ``layer1..4``: reductions 4, 8, 16, 32
  (``features.2-3``, ``features.4-6``, ``features.7-13``, ``features.14-18``);
* ``block`` (D = 16): one point per inverted-residual block ``features.2`` ...
  ``features.17``; the final 1x1 conv joins the last one (``features.17-18``).

The last output has 1280 channels (``1280 * width`` when width > 1) at reduction 32.
``backbone.width`` is torchvision's ``width_mult``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from branchnas.backbones._base import Backbone, BlockInfo, reference_names
from branchnas.backbones._registry import register_backbone

if TYPE_CHECKING:
    from branchnas.recipe import BackboneConfig

__all__ = ["build_mobilenet_v2"]


def _span(first: int, last: int) -> str:
    return f"features.{first}" if first == last else f"features.{first}-{last}"


@register_backbone(
    "mobilenet_v2",
    summary="torchvision MobileNetV2 features (width = width_mult); stage = resolution, block = inverted residual",
    width=True,
    dilation=False,
)
def build_mobilenet_v2(cfg: BackboneConfig, in_channels: int, image_size: tuple[int, int]) -> Backbone:
    """MobileNetV2 cut into 4 resolution stages or 16 inverted-residual blocks."""
    # Imported here: torchvision takes a second to import and only this builder needs it.
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None, width_mult=cfg.width)
    features = model.features
    if in_channels != 3:
        old = features[0][0]
        features[0][0] = nn.Conv2d(in_channels, old.out_channels, 3, 2, 1, bias=False)
        # The initialisation torchvision gives its own convolutions.
        nn.init.kaiming_normal_(features[0][0].weight, mode="fan_out")
    stem = nn.Sequential(features[0], features[1])
    stem_info = BlockInfo("features.0-1", int(features[1].out_channels), 2)

    # Groups of indices into `features`: a new group where a block halves the resolution
    # (stage) or at every block (block); the final 1x1 conv (index 18) joins the last group.
    last = len(features) - 1
    groups: list[list[int]] = []
    reductions: list[int] = []
    reduction = 2
    for index in range(2, last):
        stride = int(features[index].stride)
        reduction *= stride
        if cfg.granularity == "block" or not groups or stride > 1:
            groups.append([index])
            reductions.append(reduction)
        else:
            groups[-1].append(index)
    groups[-1].append(last)

    blocks: list[nn.Module] = []
    info: list[BlockInfo] = []
    for group, red in zip(groups, reductions, strict=True):
        modules = [features[i] for i in group]
        blocks.append(modules[0] if len(modules) == 1 else nn.Sequential(*modules))
        info.append(BlockInfo(_span(group[0], group[-1]), int(modules[-1].out_channels), red))
    backbone = Backbone("mobilenet_v2", cfg.granularity, in_channels, stem, blocks, stem_info, info)
    backbone.reference = reference_names(backbone, model, "torchvision mobilenet_v2")
    return backbone
