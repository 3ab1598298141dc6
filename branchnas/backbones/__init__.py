"""Backbones: shared encoders cut into a stem and D candidate branch points.

A :class:`Backbone` is a ``stem`` plus an ordered ``nn.ModuleList`` of ``blocks``; each
block declares its output channels and reduction in a :class:`BlockInfo` (as timm's
``feature_info``). :func:`build_backbone` builds one from a recipe's ``[backbone]`` section.

==============  ========================================================  =========  =========
name            what                                                      D (stage)  D (block)
==============  ========================================================  =========  =========
lenet5          LeNet-5 convolutions, for MultiMNIST-like digits          2          2
mobilenet_v2    torchvision MobileNetV2 ``features``                      4          16
resnet18        torchvision ResNet-18 without the classifier              4          8
resnet20        CIFAR-style ResNet-20 (0.27M params), CelebA in GatedMTL  3          9
resnet34        torchvision ResNet-34 without the classifier              4          16
resnet50        torchvision ResNet-50 without the classifier              4          16
==============  ========================================================  =========  =========

Weights start random; ``backbone.weights`` names a local file to start from instead
(:func:`load_weights`). Nothing is ever downloaded.

Example:
    >>> from branchnas.recipe import BackboneConfig
    >>> bb = build_backbone(BackboneConfig(name="resnet18", granularity="block"), 3, (64, 64))
    >>> bb.num_blocks, bb.block_info[-1]
    (8, BlockInfo(name='layer4.1', channels=512, reduction=32))

To add a backbone, write a builder ``(cfg, in_channels, image_size) -> Backbone`` in a new
module here, decorate it with :func:`register_backbone` and import the module below.
"""

from branchnas.backbones import lenet, mobilenet, resnet  # noqa: F401  (they register themselves)
from branchnas.backbones._base import (
    GRANULARITIES,
    Backbone,
    BlockInfo,
    ReferenceNames,
    as_image_size,
)
from branchnas.backbones._registry import (
    BackboneEntry,
    backbone_entry,
    build_backbone,
    list_backbones,
    register_backbone,
)
from branchnas.backbones._weights import load_weights

__all__ = [
    "GRANULARITIES",
    "Backbone",
    "BackboneEntry",
    "BlockInfo",
    "ReferenceNames",
    "as_image_size",
    "backbone_entry",
    "build_backbone",
    "list_backbones",
    "load_weights",
    "register_backbone",
]
