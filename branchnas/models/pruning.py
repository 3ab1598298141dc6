"""Structured pruning of a layer's output channels: smaller modules that compute a subset exactly.

:func:`prune_outputs` returns a module whose output is ``layer(x)[:, keep]`` computed with
real, smaller weights wherever the layer's structure allows it, so that fvcore counts the
parameters and FLOPs that a deployed network really has:

* a residual block (branchnas's CIFAR basic block, torchvision's ``BasicBlock`` and
  ``Bottleneck``): the rows of its last conv and BatchNorm and of a projection shortcut; an
  identity or zero-padding shortcut is sliced;
* an ``nn.Sequential`` ending in a conv followed only by channel-wise modules (BatchNorm,
  ReLU, pooling, dropout), as LeNet's conv blocks: the conv's rows and the BatchNorm's;
* anything else: the whole layer runs and its output is sliced (no saving, and the cost
  model counts the whole layer: the figure stays honest).

Every pruned module is built from plain ``torch.nn`` modules plus :class:`Residual` and
:class:`Select`, so a pruned network scripts and loads where branchnas is not installed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["prune_outputs", "prune_shortcut", "prunable", "layer_units", "Residual", "Select", "SelectAfter"]

#: Channel-wise modules: the output channel c depends only on the input channel c.
_CHANNELWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Identity, nn.MaxPool2d,
                nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Dropout2d)


class Select(nn.Module):
    """``x[:, keep]`` (a fixed channel subset)."""

    def __init__(self, keep: Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", keep.clone().long())

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.keep)


class SelectAfter(nn.Module):
    """``module(x)[:, keep]``: the whole module runs (no structure to prune)."""

    def __init__(self, module: nn.Module, keep: Tensor) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("keep", keep.clone().long())

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x).index_select(1, self.keep)


class Residual(nn.Module):
    """``relu(body(x) + shortcut(x))``: a residual block rebuilt from pruned parts."""

    def __init__(self, body: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _conv_rows(conv: nn.Conv2d, keep: Tensor) -> nn.Conv2d:
    if conv.groups != 1:
        raise ValueError("grouped convolutions are not pruned by rows")
    out = nn.Conv2d(conv.in_channels, len(keep), conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        out.weight.copy_(conv.weight[keep])
        if conv.bias is not None:
            out.bias.copy_(conv.bias[keep])
    return out.to(conv.weight.device)


def _bn_rows(bn: nn.BatchNorm2d, keep: Tensor) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    with torch.no_grad():
        if bn.affine:
            out.weight.copy_(bn.weight[keep])
            out.bias.copy_(bn.bias[keep])
        if bn.track_running_stats:
            out.running_mean.copy_(bn.running_mean[keep])
            out.running_var.copy_(bn.running_var[keep])
            out.num_batches_tracked.copy_(bn.num_batches_tracked)
    return out.to(bn.weight.device if bn.affine else bn.running_mean.device)


def prune_shortcut(module: nn.Module | None, keep: Tensor) -> nn.Module:
    """The shortcut's output channels ``keep``: a projection loses rows, anything else is sliced."""
    if module is None or isinstance(module, nn.Identity):
        return Select(keep)
    if (isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d)
            and isinstance(module[1], nn.BatchNorm2d) and module[0].groups == 1):
        return nn.Sequential(_conv_rows(module[0], keep), _bn_rows(module[1], keep))
    return SelectAfter(copy.deepcopy(module), keep)


def layer_units(layer: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """A layer cut after each conv + BatchNorm (+ ReLU): ``(units, shortcut)``.

    A residual block (branchnas's CIFAR block, torchvision's ``BasicBlock`` and ``Bottleneck``)
    is ``relu(units[-1](...units[0](x)) + shortcut(x))``; any other layer is one unit with no
    shortcut (``None``). The units hold the layer's own modules (not copies). The gated variant
    puts its gates after every unit.
    """
    name = type(layer).__name__
    if name in ("_CifarBasicBlock", "BasicBlock") and hasattr(layer, "conv2"):
        shortcut = layer.shortcut if name == "_CifarBasicBlock" else layer.downsample
        return ([nn.Sequential(layer.conv1, layer.bn1, nn.ReLU()), nn.Sequential(layer.conv2, layer.bn2)],
                shortcut if shortcut is not None else nn.Identity())
    if name == "Bottleneck" and hasattr(layer, "conv3"):
        return ([nn.Sequential(layer.conv1, layer.bn1, nn.ReLU()), nn.Sequential(layer.conv2, layer.bn2, nn.ReLU()),
                 nn.Sequential(layer.conv3, layer.bn3)],
                layer.downsample if layer.downsample is not None else nn.Identity())
    return [layer], None


def _sequential_tail(layer: nn.Module) -> int | None:
    """Index of the last conv of a Sequential followed only by BatchNorm and channel-wise modules."""
    if not isinstance(layer, nn.Sequential):
        return None
    convs = [i for i, m in enumerate(layer) if isinstance(m, nn.Conv2d)]
    if not convs or layer[convs[-1]].groups != 1:
        return None
    tail = list(layer)[convs[-1] + 1:]
    if all(isinstance(m, (nn.BatchNorm2d, *_CHANNELWISE)) for m in tail):
        return convs[-1]
    return None


def prunable(layer: nn.Module) -> bool:
    """Whether :func:`prune_outputs` really shrinks ``layer`` (else it slices its output)."""
    return layer_units(layer)[1] is not None or _sequential_tail(layer) is not None


def prune_outputs(layer: nn.Module, keep: Sequence[int] | Tensor) -> nn.Module:
    """A module computing ``layer(x)[:, keep]`` (eval mode), smaller where the structure allows.

    Args:
        layer: The layer (left untouched; the result holds copies).
        keep: The output channels to keep, in increasing order.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    device = next((p.device for p in layer.parameters()), torch.device("cpu"))
    keep_dev = keep.to(device)
    units, shortcut = layer_units(layer)
    if shortcut is not None:
        body = nn.Sequential(*[copy.deepcopy(u) for u in units[:-1]], prune_outputs(units[-1], keep_dev))
        return Residual(body, prune_shortcut(shortcut, keep_dev)).to(device)
    last = _sequential_tail(layer)
    if last is not None:
        modules: list[nn.Module] = [copy.deepcopy(m) for m in list(layer)[:last]]
        modules.append(_conv_rows(layer[last], keep_dev))
        for m in list(layer)[last + 1:]:
            modules.append(_bn_rows(m, keep_dev) if isinstance(m, nn.BatchNorm2d) else copy.deepcopy(m))
        return nn.Sequential(*modules).to(device)
    return SelectAfter(copy.deepcopy(layer), keep_dev)
