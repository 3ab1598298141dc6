"""The training history as a CSV file a person can open (a spreadsheet, pandas, ``column -t``).

One row per epoch, from the history :meth:`branchnas.training.Trainer.fit` returns: ``epoch``,
``lr``, ``seconds``, ``images_per_s``, then each task's training loss (``train_loss/<task>``),
each task's validation metrics (``val/<task>/<metric>``) and whatever else the epoch recorded
(the loss weights ``weights/<task>``, a variant's ``regulariser``), nested names joined by
``/``. Numbers are written exactly (Python's shortest round-trip form), an absent value as an
empty cell. The file is written atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from branchnas.rundir import atomic_write_text

__all__ = ["HISTORY_CSV", "TENSORBOARD_DIR", "history_columns", "history_rows", "write_history_csv",
           "read_history_csv", "log_epoch_to_tensorboard"]

#: The folder, inside a stage's folder, of TensorBoard event files (``log = "tensorboard"``).
TENSORBOARD_DIR = "tensorboard"

#: The file name of one model's history in its output folder.
HISTORY_CSV = "history.csv"

#: The columns that come first, in this order, when the history has them.
_FIRST = ("epoch", "lr", "seconds", "images_per_s")
#: Then these groups, in this order; anything else follows.
_GROUPS = ("train_loss", "val")


def _flatten(entry: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if value is None:  # absent (no validation, no batches): an empty cell
            continue
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        elif hasattr(value, "item"):  # a 0-d tensor or numpy scalar
            flat[name] = value.item()
    return flat


def history_rows(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each epoch of ``history`` flattened to ``{column: value}`` (``val/shape/accuracy``)."""
    return [_flatten(entry) for entry in history]


def history_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The columns of :func:`history_rows`: the fixed ones, the losses, the metrics, the rest."""
    seen: list[str] = list(_FIRST)
    for row in rows:
        seen.extend(name for name in row if name not in seen)

    def rank(name: str) -> tuple[int, int]:
        if name in _FIRST:
            return 0, _FIRST.index(name)
        group = name.split("/", 1)[0]
        return (1 + _GROUPS.index(group) if group in _GROUPS and "/" in name else 1 + len(_GROUPS)), 0

    return sorted(seen, key=rank)  # stable: first-seen order within a group


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)  # repr of a float: it reads back as the same float


def write_history_csv(path: str | Path, history: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``history`` (one entry per epoch) to ``path`` as CSV, atomically."""
    rows = history_rows(history)
    columns = history_columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(name)) for name in columns])
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def _parse(text: str) -> float | str | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def read_history_csv(path: str | Path) -> list[dict[str, float | str | None]]:
    """The rows of a history CSV: numbers as floats, empty cells as ``None``."""
    with open(path, newline="") as fh:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def log_epoch_to_tensorboard(log_dir: str | Path, entry: Mapping[str, Any]) -> None:
    """Append one epoch of the history to TensorBoard event files in ``log_dir``.

    Every numeric column of :func:`history_columns` but ``epoch`` becomes a scalar (tag
    ``train_loss/shape``, ``val/shape/accuracy``, ...) at step ``epoch``. A resumed run appends
    the epochs it adds. Needs the ``tensorboard`` package (the stage checks before any work).
    """
    from torch.utils.tensorboard import SummaryWriter

    flat = _flatten(entry)
    step = int(flat.get("epoch", 0))
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for tag, value in flat.items():
            if tag != "epoch" and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                writer.add_scalar(tag, float(value), global_step=step)
    finally:
        writer.close()
