"""Task heads: the small task-specific decoders that sit on the last block's features.

The paper assumes each task decoder is "significantly smaller in size compared to the
encoder" (Sec. 3.1), and the search only decides how the encoder is shared, so the heads
here are deliberately light:

* ``classification``, ``attribute``, ``regression``: global average pooling and one linear
  layer (an attribute head drops the channel dimension to return one logit per image);
* ``segmentation``, ``depth``, ``normals``, ``edges``: a 1x1 conv to ``min(C, 128)``
  channels, a 3x3 conv, each with BN and ReLU, a 1x1 conv to the task's channels, and a
  bilinear resize to the input resolution.

With ResNet-20 at 32x32 a dense head has about 41k parameters against the encoder's 269k,
a linear head 65 per output. Output shapes follow ``docs/internals.md``:

==============  =====================
kind            output
==============  =====================
classification  ``(B, num_classes)``
attribute       ``(B,)``
regression      ``(B, K)``
segmentation    ``(B, num_classes, H, W)``
depth / edges   ``(B, 1, H, W)``
normals         ``(B, 3, H, W)``
==============  =====================

Every head is an explicit module that ``torch.jit.script`` compiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from branchnas.backbones._base import as_image_size
from branchnas.errors import UserError, unknown_choice
from branchnas.kinds import GLOBAL_KINDS

__all__ = ["LinearHead", "DenseHead", "build_head", "DENSE_HIDDEN_CHANNELS"]

#: Upper bound of a dense head's hidden channels: keeps the decoder small next to wide
#: encoders (2048 channels for ResNet-50) while narrow ones keep their own width.
DENSE_HIDDEN_CHANNELS = 128



class TaskLike(Protocol):
    """What :func:`build_head` reads from a task (``branchnas.tasks.Task``)."""

    name: str
    kind: str

    @property
    def out_channels(self) -> int: ...

    @property
    def dense(self) -> bool: ...


class LinearHead(nn.Module):
    """Global average pooling, then a linear layer.

    Args:
        in_channels: Channels of the incoming features.
        out_features: Outputs per image.
        squeeze: Return ``(B,)`` instead of ``(B, 1)`` (attribute logits).
    """

    def __init__(self, in_channels: int, out_features: int, squeeze: bool = False) -> None:
        super().__init__()
        self.squeeze = squeeze
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, out_features)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(self.pool(x).flatten(1))
        if self.squeeze:
            out = out.squeeze(1)
        return out


class DenseHead(nn.Module):
    """A light per-pixel decoder: 1x1 reduce, 3x3 conv, 1x1 predict, bilinear resize.

    Args:
        in_channels: Channels of the incoming features.
        out_channels: Output channels (classes, 1 for depth and edges, 3 for normals).
        image_size: ``(height, width)`` of the output, the input image size.
        hidden_channels: Width of the decoder; ``min(in_channels, 128)`` by default.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: tuple[int, int],
        hidden_channels: int | None = None,
    ) -> None:
        super().__init__()
        hidden = hidden_channels or min(in_channels, DENSE_HIDDEN_CHANNELS)
        self.size = (int(image_size[0]), int(image_size[1]))
        self.decoder = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        # Resizing to the stored size (not by a scale factor) gives exactly H x W even when
        # the image size is not a multiple of the backbone's reduction.
        return F.interpolate(self.decoder(x), size=self.size, mode="bilinear", align_corners=False)


def build_head(
    task: TaskLike, in_channels: int, reduction: int, image_size: int | Sequence[int]
) -> nn.Module:
    """Build the head of ``task`` on features with ``in_channels`` channels.

    Args:
        task: A :class:`branchnas.tasks.Task` (its ``kind``, ``out_channels`` and ``dense``).
        in_channels: Channels of the last block's output.
        reduction: The last block's reduction. The dense decoder resizes to ``image_size``
            whatever it is, so it is only checked here; it documents the expected input.
        image_size: ``(height, width)`` of the input images (dense outputs match it).

    Returns:
        A :class:`LinearHead` or :class:`DenseHead`.

    Raises:
        UserError: the task kind has no head.
        ValueError: ``in_channels`` or ``reduction`` is not positive.

    Example:
        >>> import torch
        >>> from branchnas.tasks import Task
        >>> head = build_head(Task("seg", "segmentation", "seg", num_classes=5), 64, 4, (32, 32))
        >>> head(torch.zeros(2, 64, 8, 8)).shape
        torch.Size([2, 5, 32, 32])
    """
    if in_channels < 1 or reduction < 1:
        raise ValueError(f"head of task '{task.name}': in_channels and reduction must be >= 1; "
                         f"got {in_channels} and {reduction}")
    size = as_image_size(image_size)
    if task.dense:
        return DenseHead(in_channels, task.out_channels, size)
    if task.kind not in GLOBAL_KINDS:
        raise UserError(unknown_choice(f"kind of task '{task.name}'", task.kind, GLOBAL_KINDS))
    return LinearHead(in_channels, task.out_channels, squeeze=task.kind == "attribute")
