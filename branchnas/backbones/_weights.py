"""Loading backbone weights from a local file the user names (nothing is ever downloaded)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from branchnas.backbones._base import Backbone
from branchnas.errors import UserError

__all__ = ["load_weights"]

# Checkpoint layouts that wrap the state dict one level down (training scripts, Lightning,
# branchnas's own pretrain/<task>.pt).
_WRAPPER_KEYS = ("state_dict", "model", "backbone")


def _shorten(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    for _ in range(2):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(
            f"backbone.weights: {str(path)!r} holds no state dict of tensors; save one with "
            f"torch.save(model.state_dict(), path)"
        )
    # nn.DataParallel / DistributedDataParallel prefix every key with 'module.'.
    if all(str(k).startswith("module.") for k in obj):
        return {str(k)[len("module."):]: v for k, v in obj.items()}
    return {str(k): v for k, v in obj.items()}


def _is_optional(key: str) -> bool:
    # Old torchvision checkpoints predate BatchNorm's num_batches_tracked buffer; it only
    # matters with momentum=None, so a file without it is still complete.
    return key.endswith("num_batches_tracked")


def load_weights(backbone: Backbone, path: str | Path) -> Backbone:
    """Load a local state-dict file into ``backbone`` (in place) and return it.

    The file may hold the backbone's own state dict (``stem.*``, ``blocks.*``), or, for
    backbones cut from a torchvision model, that model's state dict (``conv1.weight``,
    ``layer1.0.conv1.weight``, ...; its classifier is ignored). A dict wrapping the state
    dict under ``state_dict``, ``model`` or ``backbone`` and a ``module.`` prefix are
    accepted too. Files are read with ``torch.load(weights_only=True)``.

    Args:
        backbone: The backbone to fill.
        path: A local ``.pt``/``.pth`` file.

    Raises:
        UserError: the file is missing or unreadable, or its keys or shapes do not match.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"backbone.weights: file {str(path)!r} does not exist; give a local state-dict file "
            f"(nothing is downloaded) or leave backbone.weights empty"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"backbone.weights: cannot read {str(path)!r} as a PyTorch file: {first_line}") from None
    state = _unwrap(obj, path)

    own = backbone.state_dict()
    ref = backbone.reference
    to_own = {v: k for k, v in ref.names.items()} if ref is not None else {}
    own_hits = sum(k in own for k in state)
    ref_hits = sum(k in to_own for k in state)
    if ref is not None and ref_hits > own_hits:
        layout = f"{ref.source} layout"
        unexpected = [k for k in state if k not in to_own and k not in ref.ignored]
        state = {to_own[k]: v for k, v in state.items() if k in to_own}
        name_in_file = ref.names
    else:
        layout = f"branchnas {backbone.name} layout"
        unexpected = [k for k in state if k not in own]
        state = {k: v for k, v in state.items() if k in own}
        name_in_file = {k: k for k in own}
    if not state:
        own_example = next(iter(own))
        hint = f" (or {ref.source}'s {ref.names[own_example]!r})" if ref is not None else ""
        raise UserError(
            f"backbone.weights: none of the {len(unexpected)} keys in {str(path)!r} belong to backbone "
            f"'{backbone.name}' (the file has {_shorten(unexpected)}); expected keys such as "
            f"{own_example!r}{hint}"
        )
    missing = [name_in_file[k] for k in own if k not in state and not _is_optional(k)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_shorten(missing)}")
        if unexpected:
            parts.append(f"unexpected {_shorten(unexpected)}")
        raise UserError(
            f"backbone.weights: {str(path)!r} does not match backbone '{backbone.name}' "
            f"({backbone.granularity} granularity, read in the {layout}): {'; '.join(parts)}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(
                f"backbone.weights: {name_in_file[key]!r} in {str(path)!r} has shape {tuple(value.shape)} "
                f"but backbone '{backbone.name}' (in_channels={backbone.in_channels}) expects "
                f"{tuple(own[key].shape)}; check backbone.name, backbone.width and the input channels"
            )
    # strict=False only because optional num_batches_tracked buffers may be absent; every
    # other key was checked above.
    backbone.load_state_dict(state, strict=False)
    return backbone
