"""The backbone registry: names -> builders, refusing duplicates and explaining unknown names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from branchnas.backbones._base import GRANULARITIES, Backbone, as_image_size
from branchnas.backbones._weights import load_weights
from branchnas.errors import UserError, unknown_choice

if TYPE_CHECKING:
    from branchnas.recipe import BackboneConfig

__all__ = [
    "BackboneEntry",
    "Builder",
    "register_backbone",
    "build_backbone",
    "list_backbones",
    "backbone_entry",
    "check_width",
    "check_dilation",
]

#: ``builder(cfg, in_channels, (height, width)) -> Backbone``; the arguments are validated.
Builder = Callable[["BackboneConfig", int, tuple[int, int]], Backbone]


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone.

    Attributes:
        name: The registry name used in recipes.
        builder: Builds the backbone; see :data:`Builder`.
        summary: One line for ``branchnas backbones``.
        width: Whether ``backbone.width`` is supported.
        dilation: Whether ``backbone.dilation`` is supported.
    """

    name: str
    builder: Builder
    summary: str
    width: bool = True
    dilation: bool = False


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(
    name: str, *, summary: str, width: bool = True, dilation: bool = False
) -> Callable[[Builder], Builder]:
    """Register a builder under ``name`` (decorator).

    Raises:
        ValueError: ``name`` is already registered (as torchvision's ``register_model``).
    """

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"a backbone named '{name}' is already registered")
        _REGISTRY[name] = BackboneEntry(name, builder, summary, width, dilation)
        return builder

    return decorate


def list_backbones() -> list[str]:
    """The registered backbone names, sorted."""
    return sorted(_REGISTRY)


def backbone_entry(name: str) -> BackboneEntry:
    """The registry entry of ``name``.

    Raises:
        UserError: no backbone has that name; the message lists the valid ones.
    """
    if name not in _REGISTRY:
        raise UserError(unknown_choice("backbone", name, _REGISTRY))
    return _REGISTRY[name]


def check_width(cfg: BackboneConfig) -> None:
    """Refuse a width multiplier on a backbone that has a fixed width."""
    entry = backbone_entry(cfg.name)
    if not entry.width and cfg.width != 1.0:
        supported = ", ".join(n for n in list_backbones() if _REGISTRY[n].width)
        raise UserError(
            f"backbone.width: {cfg.name} has a fixed width (1.0); got {cfg.width:g} "
            f"(backbones with a width multiplier: {supported})"
        )


def check_dilation(cfg: BackboneConfig) -> None:
    """Refuse ``dilation = true`` on a backbone that cannot dilate its last stages."""
    entry = backbone_entry(cfg.name)
    if cfg.dilation and not entry.dilation:
        supported = ", ".join(n for n in list_backbones() if _REGISTRY[n].dilation)
        raise UserError(
            f"backbone.dilation: {cfg.name} has no dilated variant; set it to false or use one of: {supported}"
        )


def build_backbone(cfg: BackboneConfig, in_channels: int, image_size: int | Sequence[int]) -> Backbone:
    """Build the backbone a recipe's ``[backbone]`` section describes.

    Weights are random unless ``cfg.weights`` names a local file (see
    :func:`branchnas.backbones.load_weights`); nothing is downloaded.

    Args:
        cfg: ``name``, ``width``, ``granularity``, ``dilation`` and ``weights``.
        in_channels: Channels of the input images (3 for RGB, 1 for MNIST-like data).
        image_size: ``(height, width)`` of the input images (or one int for square ones).

    Returns:
        The :class:`Backbone`, in training mode.

    Raises:
        UserError: an unknown name or granularity, an option the backbone does not
            support, an image too small for it, or a weights file that does not fit.

    Example:
        >>> from branchnas.recipe import BackboneConfig
        >>> bb = build_backbone(BackboneConfig(name="resnet20"), 3, (32, 32))
        >>> [(b.name, b.channels, b.reduction) for b in bb.block_info]
        [('layer1', 16, 1), ('layer2', 32, 2), ('layer3', 64, 4)]
    """
    entry = backbone_entry(cfg.name)
    if cfg.granularity not in GRANULARITIES:
        raise UserError(unknown_choice("backbone granularity", cfg.granularity, GRANULARITIES))
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise UserError(f"in_channels: expected a positive integer; got {in_channels!r}")
    if not cfg.width > 0:
        raise UserError(f"backbone.width: expected a positive multiplier; got {cfg.width!r}")
    check_width(cfg)
    check_dilation(cfg)
    size = as_image_size(image_size)
    backbone = entry.builder(cfg, in_channels, size)
    if cfg.weights:
        load_weights(backbone, cfg.weights)
    return backbone
