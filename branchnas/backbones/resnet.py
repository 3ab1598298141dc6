"""ResNets: the CIFAR-style ResNet-20 and torchvision's ResNet-18/34/50.

Each is cut into a stem (everything before ``layer1``) and its residual layers. With
granularity ``stage`` every ``layerN`` is one branch point; with ``block`` every residual
block inside them is one.

=========  ===================================  ============  ============  ==============
backbone   stem                                 D (stage)     D (block)     last channels
=========  ===================================  ============  ============  ==============
resnet20   3x3 conv 16w, BN, ReLU (stride 1)    3             9             64w
resnet18   7x7 conv/2, BN, ReLU, max-pool/2     4             8             512
resnet34   7x7 conv/2, BN, ReLU, max-pool/2     4             16            512
resnet50   7x7 conv/2, BN, ReLU, max-pool/2     4             16            2048
=========  ===================================  ============  ============  ==============

ResNet-20 follows He et al. (2016, Sec. 4.2) as GatedMTL uses it for CelebA: three stages
of three basic blocks with 16, 32 and 64 channels (times ``backbone.width``) and
parameter-free "option A" shortcuts (stride-2 subsampling plus zero channel padding), which
gives the paper's 0.27M parameters with a 10-class linear head.

``backbone.dilation`` (ResNet-18/34/50) replaces the stride of ``layer3`` and ``layer4`` by
dilation, for an output stride of 8 (reductions 4, 8, 8, 8). ResNet-50 uses torchvision's
``replace_stride_with_dilation``. torchvision refuses dilation in its ``BasicBlock``, so for
ResNet-18/34 the same convention is applied to the built model: in a dilated layer the
first block's first 3x3 conv keeps the previous dilation and every other 3x3 conv takes the
layer's (2 in ``layer3``, 4 in ``layer4``), with padding equal to the dilation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from branchnas.backbones._base import Backbone, BlockInfo, reference_names
from branchnas.backbones._registry import register_backbone

if TYPE_CHECKING:
    from branchnas.recipe import BackboneConfig

__all__ = ["CifarResNet", "build_resnet20", "build_resnet18", "build_resnet34", "build_resnet50"]


# --------------------------------------------------------------------------- ResNet-20


class _PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: subsample by the stride, zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        # Split the zero channels on both sides, as the reference CIFAR implementations do.
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class _CifarBasicBlock(nn.Module):
    """3x3 conv, BN, ReLU, 3x3 conv, BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = (
            _PadShortcut(in_channels, out_channels, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-style ResNet-6n+2 of He et al. (2016), without its classifier.

    The reference model of ``resnet20`` (n = 3): its state-dict keys (``conv1.weight``,
    ``layer2.0.conv1.weight``, ...) do not depend on the granularity, so a checkpoint in
    this layout loads into either cut.

    Args:
        in_channels: Input channels.
        width: Width multiplier of the 16/32/64 channels.
        blocks_per_stage: n, the basic blocks per stage (3 for ResNet-20).
    """

    def __init__(self, in_channels: int = 3, width: float = 1.0, blocks_per_stage: int = 3) -> None:
        super().__init__()
        channels = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        layers = []
        previous = channels[0]
        for stage, out in enumerate(channels):
            stride = 1 if stage == 0 else 2
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(_CifarBasicBlock(previous, out, stride if i == 0 else 1))
                previous = out
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


# --------------------------------------------------------------------------- cutting


def _block_channels(block: nn.Module) -> int:
    # Bottleneck ends with conv3, BasicBlock (torchvision's and ours) with conv2.
    last = block.conv3 if hasattr(block, "conv3") else block.conv2
    return int(last.out_channels)


def _cut(
    name: str,
    cfg: BackboneConfig,
    in_channels: int,
    model: nn.Module,
    stem: list[tuple[str, nn.Module]],
    stem_reduction: int,
    source: str,
) -> Backbone:
    """Cut a ResNet-like ``model`` into a stem and ``layer1..`` stages or their blocks."""
    stem_module = nn.Sequential(OrderedDict(stem))
    stem_channels = int(stem[0][1].out_channels)
    layers = [(n, m) for n, m in model.named_children() if n.startswith("layer")]
    blocks: list[nn.Module] = []
    info: list[BlockInfo] = []
    reduction = stem_reduction
    for layer_name, layer in layers:
        for i, block in enumerate(layer):
            reduction *= int(block.stride)
            if cfg.granularity == "block":
                blocks.append(block)
                info.append(BlockInfo(f"{layer_name}.{i}", _block_channels(block), reduction))
        if cfg.granularity == "stage":
            blocks.append(layer)
            info.append(BlockInfo(layer_name, _block_channels(layer[-1]), reduction))
    backbone = Backbone(
        name, cfg.granularity, in_channels, stem_module, blocks,
        BlockInfo("stem", stem_channels, stem_reduction), info,
    )
    backbone.reference = reference_names(backbone, model, source)
    return backbone


@register_backbone(
    "resnet20",
    summary="CIFAR-style ResNet-20 (He et al. 2016; GatedMTL's CelebA encoder), 0.27M params; for 32x32 inputs",
    width=True,
    dilation=False,
)
def build_resnet20(cfg: BackboneConfig, in_channels: int, image_size: tuple[int, int]) -> Backbone:
    """ResNet-20 cut into its 3 stages or 9 basic blocks; stem = first conv, BN, ReLU."""
    model = CifarResNet(in_channels, cfg.width, blocks_per_stage=3)
    stem = [("conv1", model.conv1), ("bn1", model.bn1), ("relu", model.relu)]
    return _cut("resnet20", cfg, in_channels, model, stem, 1, "CifarResNet (resnet20)")


# --------------------------------------------------------------------------- torchvision


def _dilate(conv: nn.Conv2d, dilation: int) -> None:
    conv.stride = (1, 1)
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)


def _dilate_basic_layers(model: nn.Module) -> None:
    """Output stride 8 for BasicBlock ResNets, with torchvision's Bottleneck convention."""
    dilation = 1
    for layer in (model.layer3, model.layer4):
        previous, dilation = dilation, dilation * 2
        for i, block in enumerate(layer):
            _dilate(block.conv1, previous if i == 0 else dilation)
            _dilate(block.conv2, dilation)
            block.stride = 1
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)


def _torchvision_resnet(depth: int, cfg: BackboneConfig, in_channels: int) -> Backbone:
    # Imported here: torchvision takes a second to import and only these builders need it.
    import torchvision

    name = f"resnet{depth}"
    builder = getattr(torchvision.models, name)
    if depth >= 50:
        model = builder(weights=None, replace_stride_with_dilation=[False, cfg.dilation, cfg.dilation])
    else:
        model = builder(weights=None)
        if cfg.dilation:
            _dilate_basic_layers(model)
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_channels, old.out_channels, 7, 2, 3, bias=False)
        # The initialisation torchvision gives its own convolutions.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    stem = [("conv1", model.conv1), ("bn1", model.bn1), ("relu", model.relu), ("maxpool", model.maxpool)]
    return _cut(name, cfg, in_channels, model, stem, 4, f"torchvision {name}")


_TV_NOTE = "torchvision {}, no classifier; dilation gives output stride 8"


@register_backbone("resnet18", summary=_TV_NOTE.format("ResNet-18"), width=False, dilation=True)
def build_resnet18(cfg: BackboneConfig, in_channels: int, image_size: tuple[int, int]) -> Backbone:
    """torchvision's ResNet-18 cut into ``layer1..4`` or their 8 basic blocks."""
    return _torchvision_resnet(18, cfg, in_channels)


@register_backbone("resnet34", summary=_TV_NOTE.format("ResNet-34"), width=False, dilation=True)
def build_resnet34(cfg: BackboneConfig, in_channels: int, image_size: tuple[int, int]) -> Backbone:
    """torchvision's ResNet-34 cut into ``layer1..4`` or their 16 basic blocks."""
    return _torchvision_resnet(34, cfg, in_channels)


@register_backbone("resnet50", summary=_TV_NOTE.format("ResNet-50"), width=False, dilation=True)
def build_resnet50(cfg: BackboneConfig, in_channels: int, image_size: tuple[int, int]) -> Backbone:
    """torchvision's ResNet-50 cut into ``layer1..4`` or their 16 bottleneck blocks."""
    return _torchvision_resnet(50, cfg, in_channels)
