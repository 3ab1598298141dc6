"""Raw target arrays into the contract: the layouts a target may come in and the values it may hold.

A family reads a target in whatever layout its files use; :func:`standardise` brings it into
the layout of the tensor contract (``docs/internals.md``), :func:`check_values` refuses bad
values naming the sample, and :func:`unit_normals` scales normal maps to unit length.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from branchnas.data._base import IGNORE_LABEL, Describe, TargetSpec
from branchnas.errors import DataError

__all__ = ["check_values", "standardise", "unit_normals"]


def standardise(spec: TargetSpec, array: Any, hw: tuple[int, int] | None, where: str) -> np.ndarray:
    """Bring a batch of raw target values ``(N, ...)`` into the contract's layout.

    Accepts the usual on-disk layouts: ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``
    for dense targets; ``(N,)`` or ``(N, 1)`` for scalar ones.

    Args:
        spec: the target.
        array: ``N`` samples of the target.
        hw: the image size the dense target must have, or ``None`` to accept any.
        where: how to name the data in an error, e.g. ``"images.npz"``.

    Raises:
        DataError: the array's shape does not fit the target's kind.
    """
    array = np.asarray(array)
    shape = tuple(array.shape)
    n = shape[0] if shape else 0
    if spec.dense:
        channels = 3 if spec.kind == "normals" else 1
        if array.ndim == 3 and channels == 1:
            out = array[:, None]
        elif array.ndim == 4 and array.shape[1] == channels:
            out = array
        elif array.ndim == 4 and array.shape[3] == channels:
            out = np.moveaxis(array, 3, 1)
        else:
            layout = "(N, H, W)" if channels == 1 else "(N, H, W, 3)"
            raise DataError(f"{where}: target '{spec.name}' has shape {shape}; expected {layout} for a {spec.kind} target")
        if hw is not None and tuple(out.shape[2:]) != tuple(hw):
            raise DataError(
                f"{where}: target '{spec.name}' is {out.shape[2]}x{out.shape[3]} but the images are "
                f"{hw[0]}x{hw[1]}; a {spec.kind} target must have the image's height and width"
            )
        return out[:, 0] if spec.kind == "segmentation" else out
    if spec.kind == "regression":
        if array.ndim == 1:
            return array.reshape(n, 1)
        if array.ndim == 2:
            return array
        raise DataError(f"{where}: target '{spec.name}' has shape {shape}; expected (N,) or (N, K) for a regression target")
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(f"{where}: target '{spec.name}' has shape {shape}; expected (N,) for a {spec.kind} target")
    return array


def check_values(spec: TargetSpec, array: np.ndarray, describe: Describe) -> None:
    """Raise :class:`DataError` naming the first sample whose target value is invalid.

    Vectorised over the batch: ``array`` is ``(N, ...)`` in the layout of :func:`standardise`.

    Args:
        spec: the target.
        array: the values of ``N`` samples.
        describe: sample position in ``array`` -> how to name it (``"sample 3 (a.png)"``).
    """
    if array.size == 0:
        return
    flat = array.reshape(array.shape[0], -1)
    is_float = np.issubdtype(flat.dtype, np.floating)
    if not (is_float or np.issubdtype(flat.dtype, np.integer) or flat.dtype == np.bool_):
        raise DataError(f"{describe(0)}: target '{spec.name}' holds {flat.dtype} values; expected numbers")
    if is_float:
        _first_bad(spec, ~np.isfinite(flat), flat, describe, "holds NaN or inf; every value must be finite")
    if spec.kind in ("classification", "segmentation"):
        if is_float:
            _first_bad(spec, flat != np.round(flat), flat, describe, "holds {value}, which is not a whole number (class index)")
        valid = (flat >= 0) & (flat < spec.num_classes)
        if spec.kind == "segmentation":
            valid |= flat == IGNORE_LABEL
            rule = f"outside [0, {spec.num_classes}) and not {IGNORE_LABEL} (ignore)"
        else:
            rule = f"outside [0, {spec.num_classes})"
        _first_bad(spec, ~valid, flat, describe, "holds label {value}, " + rule)
    elif spec.kind in ("attribute", "edges"):
        _first_bad(spec, (flat != 0) & (flat != 1), flat, describe, "holds {value}; expected 0 or 1")
    elif spec.kind == "depth":
        _first_bad(spec, flat < 0, flat, describe, "holds {value}; depth must be >= 0 (0 = missing)")


def _first_bad(spec: TargetSpec, bad: np.ndarray, flat: np.ndarray, describe: Describe, problem: str) -> None:
    rows = np.flatnonzero(bad.any(axis=1))
    if rows.size:
        row = int(rows[0])
        value = flat[row][bad[row]][0]
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # "label 12", not "label 12.0"
        raise DataError(f"{describe(row)}: target '{spec.name}' " + problem.format(value=value))


def unit_normals(normals: np.ndarray) -> np.ndarray:
    """Scale normal vectors ``(N, 3, H, W)`` to unit length; (near-)zero vectors stay zero (missing)."""
    norm = np.sqrt((normals.astype(np.float32) ** 2).sum(axis=1, keepdims=True))
    safe = np.where(norm > 1e-6, norm, 1.0)
    return np.where(norm > 1e-6, normals / safe, 0.0).astype(np.float32)
