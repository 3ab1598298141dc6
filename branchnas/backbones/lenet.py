"""LeNet-5's convolutional part, the encoder the MultiMNIST literature shares between tasks.

Two branch points, the same at both granularities:

==========  ==============================================  ========  =========
block       layers                                          channels  reduction
==========  ==============================================  ========  =========
``conv1``   5x5 conv (padding 2), ReLU, 2x2 max-pool        10w       2
``conv2``   5x5 conv (padding 2), ReLU, 2x2 max-pool        20w       4
==========  ==============================================  ========  =========

The stem is empty (an identity), so tasks may branch right after the input. The widths
10 and 20 are those of the LeNet that Sener & Koltun (2018) and later MultiMNIST work
share between the left- and right-digit tasks (times ``backbone.width``). Unlike the
original LeNet-5, both convolutions pad by 2 so that the reductions are exactly 2 and 4 and
any input of at least 4x4 works (28x28 MNIST, 16x32 or 36x36 MultiMNIST, 32x32); the fully
connected layers are left to the task heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from branchnas.backbones._base import Backbone, BlockInfo
from branchnas.backbones._registry import register_backbone
from branchnas.errors import UserError

if TYPE_CHECKING:
    from branchnas.recipe import BackboneConfig

__all__ = ["build_lenet5"]

#: Two 2x2 max-pools need at least 4 pixels per side.
MIN_SIZE = 4


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


@register_backbone(
    "lenet5",
    summary="LeNet-5 convolutions (10w and 20w channels) for MultiMNIST-like digits; any input >= 4x4",
    width=True,
    dilation=False,
)
def build_lenet5(cfg: BackboneConfig, in_channels: int, image_size: tuple[int, int]) -> Backbone:
    """LeNet-5's two conv-ReLU-pool blocks behind an identity stem (D = 2 at both granularities)."""
    if min(image_size) < MIN_SIZE:
        raise UserError(
            f"lenet5 needs images of at least {MIN_SIZE}x{MIN_SIZE}; got {image_size[0]}x{image_size[1]} "
            f"(resize them with data.image_size)"
        )
    c1, c2 = (max(1, round(c * cfg.width)) for c in (10, 20))
    blocks = [_conv_block(in_channels, c1), _conv_block(c1, c2)]
    info = [BlockInfo("conv1", c1, 2), BlockInfo("conv2", c2, 4)]
    return Backbone(
        "lenet5", cfg.granularity, in_channels, nn.Identity(), blocks,
        BlockInfo("stem", in_channels, 1), info,
    )
