"""The backbone contract: a stem and an ordered list of blocks, the candidate branch points.

A :class:`Backbone` is an explicit ``stem`` followed by ``blocks`` (an ``nn.ModuleList``).
Each block is one of the D locations where a branched network may split the tasks, and it
declares its output channels and its reduction (cumulative stride relative to the input) in
a :class:`BlockInfo`, as timm's ``feature_info`` does. The branched model is assembled from
these modules directly, so no hooks are needed and the result stays scriptable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from branchnas.errors import UserError

__all__ = ["BlockInfo", "Backbone", "ReferenceNames", "as_image_size", "reference_names", "GRANULARITIES"]

#: ``stage``: one branch point per stage (resolution change); ``block``: one per residual
#: block (or inverted-residual block for MobileNetV2).
GRANULARITIES = ("stage", "block")


@dataclass(frozen=True)
class BlockInfo:
    """What a stem or block outputs.

    Attributes:
        name: A readable name, e.g. ``layer2`` or ``layer2.1``; used in plots and reports.
        channels: Channels of the output feature map.
        reduction: Input size divided by output size (the cumulative stride), e.g. 8 for
            a feature map of 8x8 from a 64x64 image. Dilated stages keep the reduction of
            the stage before them.
    """

    name: str
    channels: int
    reduction: int


@dataclass(frozen=True)
class ReferenceNames:
    """How a backbone's state-dict keys map to those of the model it was cut from.

    Lets :func:`branchnas.backbones.load_weights` read a checkpoint saved from the
    reference model (e.g. a torchvision ``resnet18`` state dict) as well as one saved from
    the backbone itself.

    Attributes:
        source: The reference model, for messages (e.g. ``torchvision resnet18``).
        names: Backbone key -> reference key, for every backbone key.
        ignored: Reference keys the backbone drops on purpose (the classifier).
    """

    source: str
    names: dict[str, str] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()


class Backbone(nn.Module):
    """A shared encoder cut into a stem and D blocks (the candidate branch points).

    ``forward(x)`` is ``blocks[-1](... blocks[0](stem(x)))``. Everything in the stem is always
    shared by all tasks; a tree decides, block by block, which tasks share each block.

    Attributes:
        name: The registry name (``resnet18``, ...).
        granularity: ``stage`` or ``block``: how the encoder was cut.
        in_channels: Channels of the input images.
        stem: The always-shared first layers.
        blocks: The D blocks, in order.
        stem_info: Channels and reduction of the stem's output.
        block_info: Channels and reduction of each block's output (length D).
        reference: Key mapping to the model the backbone was cut from, or ``None``.
    """

    # TorchScript would try (and fail) to type these plain-Python descriptions; the
    # scripted forward never reads them.
    __jit_ignored_attributes__ = ["stem_info", "block_info", "reference", "granularity", "name"]
    __jit_unused_properties__ = ["num_blocks", "out_channels", "reduction"]

    def __init__(
        self,
        name: str,
        granularity: str,
        in_channels: int,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        stem_info: BlockInfo,
        block_info: Sequence[BlockInfo],
        reference: ReferenceNames | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) != len(block_info):
            raise ValueError(f"{name}: {len(blocks)} blocks but {len(block_info)} BlockInfo entries")
        if not blocks:
            raise ValueError(f"{name}: a backbone needs at least one block")
        self.name = name
        self.granularity = granularity
        self.in_channels = in_channels
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.stem_info = stem_info
        self.block_info = list(block_info)
        self.reference = reference

    @property
    def num_blocks(self) -> int:
        """D, the number of candidate branch points."""
        return len(self.block_info)

    @property
    def out_channels(self) -> int:
        """Channels of the last block's output (what a head receives)."""
        return self.block_info[-1].channels

    @property
    def reduction(self) -> int:
        """Reduction of the last block's output."""
        return self.block_info[-1].reduction

    def forward(self, x: Tensor) -> Tensor:
        """Run the stem and every block; returns the last block's features."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x

    def features(self, x: Tensor) -> list[Tensor]:
        """The output of every block, in order (length D): the features at the branch points."""
        outputs: list[Tensor] = []
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def extra_repr(self) -> str:
        return f"name={self.name!r}, granularity={self.granularity!r}, D={self.num_blocks}"


def as_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise an image size to ``(height, width)``.

    Args:
        image_size: ``64`` or ``(64, 64)`` / ``[64, 64]``.

    Raises:
        UserError: not one or two positive integers.
    """
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size: tuple[int, ...] = (image_size, image_size)
    elif isinstance(image_size, str | bytes | bool):
        size = ()  # a string is a sequence too: "32" must not become (3, 2)
    else:
        try:
            size = tuple(int(s) for s in image_size)
        except (TypeError, ValueError):
            size = ()
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"image size: expected [height, width] of positive integers; got {image_size!r}")
    return size[0], size[1]


def reference_names(backbone: Backbone, model: nn.Module, source: str) -> ReferenceNames:
    """Map each of ``backbone``'s state-dict keys to ``model``'s key for the same tensor.

    ``backbone`` must be built from ``model``'s own modules (not copies). Keys of ``model``
    that the backbone does not use (its classifier) become :attr:`ReferenceNames.ignored`.
    """
    by_tensor = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    names = {}
    for key, tensor in backbone.state_dict(keep_vars=True).items():
        if id(tensor) not in by_tensor:
            raise ValueError(f"{backbone.name}: '{key}' is not a tensor of the reference {source}")
        names[key] = by_tensor[id(tensor)]
    ignored = frozenset(by_tensor.values()) - frozenset(names.values())
    return ReferenceNames(source, names, ignored)
