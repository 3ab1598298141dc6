"""THE task-kind table: what each kind of task is, with no torch import.

Every other module derives its kind lists from :data:`KIND_INFO` (the recipe's choices, the
dense/global split of heads and datasets, how targets are resized), so a new kind is added
here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["IGNORE_INDEX", "KindInfo", "KIND_INFO", "TASK_KINDS", "DENSE_KINDS", "GLOBAL_KINDS", "NEAREST_KINDS"]

#: Segmentation label that marks a pixel as unlabelled; it counts in no loss and no metric.
IGNORE_INDEX = 255

@dataclass(frozen=True)
class KindInfo:
    """What a task kind is: its losses, metrics and tensor formats.

    Attributes:
        kind: The kind's name.
        losses: Loss names the kind accepts; the first is the default.
        metrics: ``(metric, higher_is_better)`` pairs; the first is the primary metric.
        dense: Whether outputs and targets are per-pixel maps.
        output: The head output, for people.
        target: The target tensor, for people.
        loss_doc: The default loss, for people.
        target_kinds: Dataset target kinds a task of this kind can learn from.
    """

    kind: str
    losses: tuple[str, ...]
    metrics: tuple[tuple[str, bool], ...]
    dense: bool
    output: str
    target: str
    loss_doc: str
    target_kinds: tuple[str, ...]


#: Every task kind. ``target_kinds`` is the compatibility table of
#: :func:`build_tasks`: only pairs whose target tensors have the same format are allowed,
#: because nothing converts a target from one format to another.
KIND_INFO: Mapping[str, KindInfo] = {
    info.kind: info
    for info in (
        KindInfo(
            "classification", ("cross_entropy",), (("accuracy", True),), False,
            "logits (B, C)", "int64 (B,) class index", "cross-entropy",
            ("classification",),
        ),
        KindInfo(
            "attribute", ("bce",), (("accuracy", True),), False,
            "logit (B,)", "float32 (B,) in {0, 1}", "binary cross-entropy with logits",
            ("attribute",),
        ),
        KindInfo(
            "segmentation", ("cross_entropy",), (("miou", True), ("pixel_acc", True)), True,
            "logits (B, C, H, W)", f"int64 (B, H, W); {IGNORE_INDEX} = unlabelled",
            f"cross-entropy over labelled pixels (ignores {IGNORE_INDEX})",
            ("segmentation",),
        ),
        KindInfo(
            "depth", ("l1", "mse"), (("abs_err", False), ("rmse", False)), True,
            "(B, 1, H, W)", "float32 (B, 1, H, W); 0 = missing", "L1 over valid pixels (loss = 'mse' for squared error)",
            ("depth",),
        ),
        KindInfo(
            "normals", ("cosine",), (("mean_angle", False), ("median_angle", False)), True,
            "(B, 3, H, W)", "float32 (B, 3, H, W) unit vectors; all-zero = missing",
            "1 - cos(normalised prediction, target) over valid pixels",
            ("normals",),
        ),
        KindInfo(
            "edges", ("balanced_bce",), (("fscore", True), ("precision", True), ("recall", True)), True,
            "logits (B, 1, H, W)", "float32 (B, 1, H, W) in {0, 1}",
            "class-balanced BCE with logits (HED weighting per batch)",
            ("edges",),
        ),
        KindInfo(
            "regression", ("l1", "mse"), (("mae", False), ("rmse", False)), False,
            "(B, K)", "float32 (B, K)", "L1 (loss = 'mse' for squared error)",
            ("regression",),
        ),
    )
}

#: The task kinds, in the order the docs list them.
TASK_KINDS: tuple[str, ...] = tuple(KIND_INFO)
#: Kinds whose outputs and targets are per-pixel maps.
DENSE_KINDS: frozenset[str] = frozenset(k for k, info in KIND_INFO.items() if info.dense)
#: Kinds with one output per image (a global head on pooled features).
GLOBAL_KINDS: tuple[str, ...] = tuple(k for k, info in KIND_INFO.items() if not info.dense)
#: Dense kinds whose targets are labels: resized with nearest neighbour, never blended.
NEAREST_KINDS: frozenset[str] = frozenset({"segmentation", "edges"})


