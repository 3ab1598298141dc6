"""Task kinds: loss, metrics, direction and output shape; ``build_tasks``; ``delta_mtl``.

A :class:`Task` is one prediction problem on one dataset target. Its kind (one of
:data:`branchnas.recipe.TASK_KINDS`) fixes the head output, the loss and the metrics:

==============  ======================  ==================  ========================================
kind            head output             loss                metrics (primary first, ↑ higher better)
==============  ======================  ==================  ========================================
classification  logits ``(B, C)``       cross-entropy       accuracy ↑
attribute       logit ``(B,)``          BCE with logits     accuracy ↑
segmentation    logits ``(B, C, H, W)`` CE, ignores 255     miou ↑, pixel_acc ↑
depth           ``(B, 1, H, W)``        L1 (or mse)         abs_err ↓, rmse ↓  (valid: target > 0)
normals         ``(B, 3, H, W)``        1 - cos             mean_angle ↓, median_angle ↓ (degrees)
edges           logits ``(B, 1, H, W)`` class-balanced BCE  fscore ↑, precision ↑, recall ↑
regression      ``(B, K)``              L1 (or mse)         mae ↓, rmse ↓
==============  ======================  ==================  ========================================

Losses are scalar means over the valid entries of a batch. Metrics are exact over the whole
evaluated set: a :class:`Meter` accumulates sums and counts (a confusion matrix, TP/FP/FN
counts, a fine histogram for the median angle), never means of batch means. Rates (accuracy,
IoU, F-score) are fractions in [0, 1], not percentages.

Example:
    >>> task = Task("seg", "segmentation", "seg", num_classes=3)
    >>> meter = task.meter()
    >>> meter.update(logits, labels)            # once per batch
    >>> meter.compute()                         # {"miou": ..., "pixel_acc": ...}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from branchnas.errors import DataError, RecipeError, UserError, did_you_mean, unknown_choice
from branchnas.kinds import IGNORE_INDEX, KIND_INFO, KindInfo

if TYPE_CHECKING:
    from branchnas.recipe import TaskConfig

__all__ = [
    "IGNORE_INDEX",
    "MEDIAN_BIN_DEGREES",
    "KIND_INFO",
    "format_delta",
    "KindInfo",
    "Task",
    "Meter",
    "build_tasks",
    "delta_mtl",
    "balanced_bce_with_logits",
]

#: Bin width of the angular-error histogram behind ``median_angle``. The reported median is
#: within half a bin (0.0005 degrees) of the exact median of the float64 angular errors.
MEDIAN_BIN_DEGREES = 1e-3


class TargetLike(Protocol):
    """What :func:`build_tasks` reads from a dataset target (``branchnas.data.TargetSpec``)."""

    name: str
    kind: str
    num_classes: int
    channels: int


# --------------------------------------------------------------------------- losses


def _check_shapes(task: Task, output: Tensor, target: Tensor, expected_output: tuple[int, ...]) -> None:
    # Broadcasting would turn a (B, H, W) vs (B, 1, H, W) mix-up into a silently wrong loss.
    if tuple(output.shape) != expected_output:
        raise ValueError(
            f"task '{task.name}' ({task.kind}): expected a head output of shape {expected_output} "
            f"for a target of shape {tuple(target.shape)}; got {tuple(output.shape)}"
        )


def _zero(output: Tensor) -> Tensor:
    """A zero loss that stays on the graph, so backward() works on a batch with nothing valid."""
    return output.sum() * 0.0


def _masked_mean(values: Tensor, valid: Tensor, output: Tensor) -> Tensor:
    count = valid.sum()
    if not bool(count):
        return _zero(output)
    return values[valid].sum() / count


def balanced_bce_with_logits(logits: Tensor, target: Tensor) -> Tensor:
    """Class-balanced binary cross-entropy (Xie & Tu, HED, eq. 2), averaged over pixels.

    With ``beta = |Y-| / |Y|`` the fraction of negative pixels in the batch (no gradient)::

        loss = mean_j [ beta * y_j * -log(sigmoid(x_j)) + (1 - beta) * (1 - y_j) * -log(1 - sigmoid(x_j)) ]

    HED sums over pixels; we take the mean so that the loss does not grow with the image
    size. Edges are rare, so positives get the large weight ``beta``. A batch with no edge
    pixel at all has ``beta = 1`` and a zero loss, as the formula says.

    Args:
        logits: Edge logits of any shape.
        target: Same shape, 1 on edges and 0 elsewhere.

    Returns:
        A scalar tensor.
    """
    target = target.to(logits.dtype)
    with torch.no_grad():
        beta = 1.0 - target.mean()
    weight = torch.where(target > 0.5, beta, 1.0 - beta)
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="mean")


def _valid_normals(target: Tensor) -> Tensor:
    """(B, H, W) mask of pixels whose target normal is not the all-zero 'missing' vector."""
    return target.abs().sum(dim=1) > 0


def _cosine(output: Tensor, target: Tensor) -> Tensor:
    """(B, H, W) cosine between the predicted and the target normal."""
    # Normalising the target too keeps the cosine exact for slightly non-unit targets.
    return (F.normalize(output, dim=1, eps=1e-12) * F.normalize(target, dim=1, eps=1e-12)).sum(dim=1)


# --------------------------------------------------------------------------- task


@dataclass(frozen=True)
class Task:
    """One task: a kind applied to a dataset target.

    Attributes:
        name: The task's name in the recipe, outputs and reports.
        kind: One of ``TASK_KINDS``.
        target: The dataset target it predicts.
        num_classes: Classes of a classification or segmentation task; 0 otherwise.
        channels: Output channels of a regression task (K); 3 for normals; 1 otherwise.
        weight: Loss weight in multi-task training (see :mod:`branchnas.weighting`).
        loss_name: The loss, one of ``KIND_INFO[kind].losses``; "" means the kind's default.
    """

    name: str
    kind: str
    target: str
    num_classes: int = 0
    channels: int = 1
    weight: float = 1.0
    loss_name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KIND_INFO:
            raise ValueError(unknown_choice("task kind", self.kind, KIND_INFO))
        info = KIND_INFO[self.kind]
        if self.loss_name and self.loss_name not in info.losses:
            raise ValueError(
                f"task '{self.name}': a {self.kind} task takes the loss {' or '.join(info.losses)}; "
                f"got '{self.loss_name}'"
            )
        if self.kind in ("classification", "segmentation") and self.num_classes < 2:
            raise ValueError(f"task '{self.name}': a {self.kind} task needs num_classes >= 2; got {self.num_classes}")
        if self.kind == "normals" and self.channels != 3:
            raise ValueError(f"task '{self.name}': a normals task has 3 channels; got {self.channels}")

    @property
    def info(self) -> KindInfo:
        """The kind's :class:`KindInfo`."""
        return KIND_INFO[self.kind]

    @property
    def dense(self) -> bool:
        """Whether the task predicts a map at the input resolution."""
        return self.info.dense

    @property
    def out_channels(self) -> int:
        """Channels the head outputs (dim 1 of the output; 1 for an attribute's ``(B,)`` logit)."""
        if self.kind in ("classification", "segmentation"):
            return self.num_classes
        if self.kind in ("regression", "normals"):
            return self.channels
        return 1

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics :meth:`meter` computes; the first is the primary metric."""
        return tuple(name for name, _ in self.info.metrics)

    @property
    def primary_metric(self) -> str:
        """The metric that model selection, early stopping and Δ_MTL use."""
        return self.info.metrics[0][0]

    @property
    def resolved_loss(self) -> str:
        """``loss_name``, or the kind's default loss when it is empty."""
        return self.loss_name or self.info.losses[0]

    def higher_is_better(self, metric: str) -> bool:
        """Whether a larger value of ``metric`` is better.

        Raises:
            UserError: ``metric`` is not one of :attr:`metric_names`.
        """
        for name, higher in self.info.metrics:
            if name == metric:
                return higher
        raise UserError(unknown_choice(f"metric of {self.kind} task '{self.name}'", metric, self.metric_names))

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The task loss of one batch: a scalar, the mean over the valid entries.

        A batch with no valid entry (all pixels unlabelled or missing) gives a zero that
        stays on the autograd graph.

        Raises:
            ValueError: ``output`` does not have the head output shape that ``target`` implies.
        """
        kind = self.kind
        if kind == "classification":
            _check_shapes(self, output, target, (target.shape[0], self.num_classes))
            return F.cross_entropy(output.float(), target)
        if kind == "attribute":
            output = _attribute_logits(output)
            _check_shapes(self, output, target, tuple(target.shape))
            return F.binary_cross_entropy_with_logits(output.float(), target.float())
        if kind == "segmentation":
            b, h, w = target.shape
            _check_shapes(self, output, target, (b, self.num_classes, h, w))
            per_pixel = F.cross_entropy(output.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
            return _masked_mean(per_pixel, target != IGNORE_INDEX, output)
        if kind == "depth":
            _check_shapes(self, output, target, tuple(target.shape))
            diff = output.float() - target.float()
            err = diff.abs() if self.resolved_loss == "l1" else diff.square()
            return _masked_mean(err, target > 0, output)
        if kind == "normals":
            _check_shapes(self, output, target, tuple(target.shape))
            cos = _cosine(output.float(), target.float())
            return _masked_mean(1.0 - cos, _valid_normals(target), output)
        if kind == "edges":
            _check_shapes(self, output, target, tuple(target.shape))
            return balanced_bce_with_logits(output.float(), target.float())
        # regression
        _check_shapes(self, output, target, tuple(target.shape))
        diff = output.float() - target.float()
        return diff.abs().mean() if self.resolved_loss == "l1" else diff.square().mean()

    def meter(self) -> Meter:
        """A fresh :class:`Meter` for this task's metrics."""
        return _METERS[self.kind](self)


def _attribute_logits(output: Tensor) -> Tensor:
    # A (B, 1) logit from a linear head is the same prediction as the contract's (B,).
    if output.dim() == 2 and output.shape[1] == 1:
        return output[:, 0]
    return output


# --------------------------------------------------------------------------- meters


class Meter:
    """Accumulates one task's metrics over batches; :meth:`compute` gives set-level values.

    Sums and counts live on the device of the first batch, so :meth:`update` never waits
    for the GPU. A metric with nothing to measure (no valid pixel, no class present) is NaN.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._state: dict[str, Tensor] = {}

    def _add(self, key: str, value: Tensor) -> None:
        if key in self._state:
            self._state[key] = self._state[key] + value
        else:
            self._state[key] = value

    def _get(self, key: str) -> Tensor | None:
        value = self._state.get(key)
        return None if value is None else value.detach().cpu()

    def state(self) -> dict[str, Tensor]:
        """The sums and counts so far, on the CPU (what :meth:`merge` adds to another meter)."""
        return {key: value.detach().cpu() for key, value in self._state.items()}

    def merge(self, state: Mapping[str, Tensor]) -> None:
        """Add another meter's :meth:`state`, as if its batches had been added here."""
        for key, value in state.items():
            self._add(key, value)

    @torch.no_grad()
    def update(self, output: Tensor, target: Tensor) -> None:
        """Add one batch of head outputs and targets."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """The metrics over every batch added since the last :meth:`reset`."""
        raise NotImplementedError


def _ratio(num: Tensor | None, den: Tensor | None) -> float:
    if num is None or den is None or float(den) == 0:
        return math.nan
    return float(num.double() / den.double())


class _AccuracyMeter(Meter):
    @torch.no_grad()
    def update(self, output: Tensor, target: Tensor) -> None:
        if self.task.kind == "classification":
            correct = output.argmax(dim=1) == target
        else:
            # sigmoid(x) >= 0.5 exactly when x >= 0
            correct = (_attribute_logits(output) >= 0) == (target >= 0.5)
        self._add("correct", correct.sum())
        self._add("count", torch.tensor(correct.numel(), device=correct.device))

    def compute(self) -> dict[str, float]:
        return {"accuracy": _ratio(self._get("correct"), self._get("count"))}


class _SegmentationMeter(Meter):
    """Confusion matrix (rows: target, columns: prediction) over labelled pixels."""

    @torch.no_grad()
    def update(self, output: Tensor, target: Tensor) -> None:
        n = self.task.num_classes
        valid = target != IGNORE_INDEX
        labels = target[valid]
        # bincount would file an out-of-range label under another class without a word.
        lo, hi = (int(v) for v in labels.aminmax()) if labels.numel() else (0, 0)
        if lo < 0 or hi >= n:
            bad = hi if hi >= n else lo
            raise DataError(
                f"task '{self.task.name}': target '{self.task.target}' holds label {bad}; "
                f"expected 0..{n - 1} or {IGNORE_INDEX} (unlabelled)"
            )
        pred = output.argmax(dim=1)[valid]
        cm = torch.bincount(labels * n + pred, minlength=n * n).reshape(n, n)
        self._add("confusion", cm)

    def confusion(self) -> Tensor:
        """The accumulated ``(C, C)`` confusion matrix (int64, rows = target)."""
        cm = self._get("confusion")
        n = self.task.num_classes
        return torch.zeros(n, n, dtype=torch.long) if cm is None else cm

    def compute(self) -> dict[str, float]:
        cm = self.confusion().double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        # A class absent from both target and prediction over the whole set has no IoU.
        present = union > 0
        miou = float((tp[present] / union[present]).mean()) if bool(present.any()) else math.nan
        total = cm.sum()
        return {"miou": miou, "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan}


class _ErrorMeter(Meter):
    """Mean absolute and root-mean-square error over valid entries (depth, regression)."""

    @torch.no_grad()
    def update(self, output: Tensor, target: Tensor) -> None:
        diff = output.double() - target.double()
        if self.task.kind == "depth":
            diff = diff[target > 0]
        self._add("abs", diff.abs().sum())
        self._add("sq", diff.square().sum())
        self._add("count", torch.tensor(diff.numel(), device=diff.device))

    def compute(self) -> dict[str, float]:
        count = self._get("count")
        mae = _ratio(self._get("abs"), count)
        mse = _ratio(self._get("sq"), count)
        first = "abs_err" if self.task.kind == "depth" else "mae"
        return {first: mae, "rmse": math.sqrt(mse) if not math.isnan(mse) else math.nan}


class _NormalsMeter(Meter):
    """Mean and median angular error in degrees over valid pixels.

    The mean is exact (a float64 sum). The median comes from a histogram of the angles with
    :data:`MEDIAN_BIN_DEGREES` wide bins (180 000 int64 counters, 1.4 MB) instead of every
    pixel's error, so memory does not grow with the set; it is within half a bin of the exact
    median (for an even count, the mean of the two middle values, as ``numpy.median``).
    """

    _BINS = round(180 / MEDIAN_BIN_DEGREES)

    @torch.no_grad()
    def update(self, output: Tensor, target: Tensor) -> None:
        valid = _valid_normals(target)
        # float64: in float32, arccos near cos = 1 cannot resolve angles below ~0.02 degrees.
        cos = _cosine(output.double(), target.double())[valid].clamp(-1.0, 1.0)
        angle = torch.rad2deg(torch.arccos(cos))
        bins = (angle / MEDIAN_BIN_DEGREES).floor().long().clamp(0, self._BINS - 1)
        self._add("hist", torch.bincount(bins, minlength=self._BINS))
        self._add("sum", angle.sum())
        self._add("count", torch.tensor(angle.numel(), device=angle.device))

    def compute(self) -> dict[str, float]:
        count = self._get("count")
        n = 0 if count is None else int(count)
        if n == 0:
            return {"mean_angle": math.nan, "median_angle": math.nan}
        cum = torch.cumsum(self._get("hist"), 0)
        # 0-based ranks of the middle value(s); the bin holding rank r is the first with cum > r.
        ranks = torch.tensor([(n - 1) // 2, n // 2])
        bins = torch.searchsorted(cum, ranks, right=True)
        centres = (bins.double() + 0.5) * MEDIAN_BIN_DEGREES
        return {"mean_angle": _ratio(self._get("sum"), count), "median_angle": float(centres.mean())}


class _EdgeMeter(Meter):
    """F-score, precision and recall of ``sigmoid(logit) >= 0.5`` from set-level TP/FP/FN."""

    @torch.no_grad()
    def update(self, output: Tensor, target: Tensor) -> None:
        pred = output >= 0  # sigmoid(x) >= 0.5 exactly when x >= 0
        truth = target >= 0.5
        self._add("tp", (pred & truth).sum())
        self._add("fp", (pred & ~truth).sum())
        self._add("fn", (~pred & truth).sum())

    def compute(self) -> dict[str, float]:
        tp, fp, fn = (self._get(k) for k in ("tp", "fp", "fn"))
        if tp is None:
            return {"fscore": math.nan, "precision": math.nan, "recall": math.nan}
        tp, fp, fn = float(tp), float(fp), float(fn)
        # 0 when undefined (no edge predicted or none present), as sklearn's zero_division=0.
        return {
            "fscore": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
        }


_METERS: dict[str, type[Meter]] = {
    "classification": _AccuracyMeter,
    "attribute": _AccuracyMeter,
    "segmentation": _SegmentationMeter,
    "depth": _ErrorMeter,
    "normals": _NormalsMeter,
    "edges": _EdgeMeter,
    "regression": _ErrorMeter,
}


# --------------------------------------------------------------------------- build_tasks


def build_tasks(task_configs: Sequence[TaskConfig], targets: Mapping[str, TargetLike]) -> list[Task]:
    """Resolve the recipe's ``[[tasks]]`` against a dataset's targets.

    ``target`` defaults to the task name, ``num_classes = 0`` to the target's, and an empty
    ``loss`` to the kind's default.

    Args:
        task_configs: The recipe's task entries (:class:`branchnas.recipe.TaskConfig`).
        targets: The dataset's targets by name (``branchnas.data.TargetSpec`` or any object
            with ``name``, ``kind``, ``num_classes`` and ``channels``).

    Returns:
        One :class:`Task` per entry, in order.

    Raises:
        RecipeError: A target is unknown, does not fit the task kind, has fewer classes than
            asked for, or a loss does not fit the kind.
    """
    tasks = []
    for i, cfg in enumerate(task_configs):
        where = f"tasks[{i}]"
        if cfg.kind not in KIND_INFO:
            raise RecipeError(f"{where}.kind: {unknown_choice('task kind', cfg.kind, KIND_INFO)}")
        info = KIND_INFO[cfg.kind]
        target_name = cfg.target or cfg.name
        if target_name not in targets:
            implied = " (target defaults to the task name)" if not cfg.target else ""
            raise RecipeError(
                f"{where}.target: the dataset has no target '{target_name}'{implied}; "
                f"choose one of: {', '.join(sorted(targets))}{did_you_mean(target_name, targets)}"
            )
        spec = targets[target_name]
        if spec.kind not in info.target_kinds:
            fits = sorted(k for k, v in KIND_INFO.items() if spec.kind in v.target_kinds)
            raise RecipeError(
                f"{where}.kind: target '{target_name}' is a {spec.kind} target and cannot be learned "
                f"as a {cfg.kind} task; use kind = {' or '.join(repr(k) for k in fits) or '(none)'}"
            )
        num_classes = _resolve_classes(where, cfg, spec)
        loss = cfg.loss or info.losses[0]
        if loss not in info.losses and len(info.losses) == 1:
            raise RecipeError(
                f"{where}.loss: a {cfg.kind} task has one loss ({info.loss_doc}); "
                f"remove loss = {loss!r}"
            )
        if loss not in info.losses:
            raise RecipeError(
                f"{where}.loss: a {cfg.kind} task takes {' or '.join(repr(x) for x in info.losses)}; "
                f"got {loss!r}{did_you_mean(loss, info.losses)}"
            )
        if cfg.kind == "regression":
            channels = int(spec.channels)
        elif cfg.kind == "normals":
            channels = 3
        else:
            channels = 1
        tasks.append(Task(
            name=cfg.name, kind=cfg.kind, target=target_name, num_classes=num_classes,
            channels=channels, weight=float(cfg.weight), loss_name=loss,
        ))
    return tasks


def _resolve_classes(where: str, cfg: TaskConfig, spec: TargetLike) -> int:
    if cfg.kind not in ("classification", "segmentation"):
        if cfg.num_classes:
            raise RecipeError(
                f"{where}.num_classes: only classification and segmentation tasks take num_classes; "
                f"got {cfg.num_classes} for a {cfg.kind} task (remove it)"
            )
        return 0
    available = int(spec.num_classes)
    if cfg.num_classes == 0:
        if available < 2:
            raise RecipeError(
                f"{where}.num_classes: target '{spec.name}' does not say how many classes it has; "
                f"set num_classes (>= 2)"
            )
        return available
    if cfg.num_classes < max(available, 2):
        raise RecipeError(
            f"{where}.num_classes: target '{spec.name}' has {available} classes; "
            f"expected 0 (the target's) or at least {max(available, 2)}; got {cfg.num_classes}"
        )
    return int(cfg.num_classes)


# --------------------------------------------------------------------------- delta_mtl


def delta_mtl(
    metrics: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    tasks: Iterable[Task],
    *,
    undefined: str = "raise",
) -> float:
    """Multi-task performance Δ_MTL relative to single-task baselines, as a fraction.

    GatedMTL eq. 6 (after Maninis et al. 2019), on each task's primary metric::

        Δ_MTL = (1/T) Σ_t (-1)^{l_t} (M_t - M_t^b) / M_t^b,   l_t = 1 when lower is better

    One metric per task (the primary one); the average is over tasks, not metrics. Positive
    means better than the single-task models. Multiply by 100 for the papers' percentages.

    Args:
        metrics: ``{task: {metric: value}}`` of the multi-task model.
        baseline: ``{task: {metric: value}}`` of the single-task models.
        tasks: The tasks to average over.
        undefined: What a baseline of 0 does (the relative change is undefined): ``"raise"``,
            or ``"nan"`` to return NaN, so that a finished fine-tuning still writes its report.

    Raises:
        UserError: A task's primary metric is missing from either mapping, or its baseline is 0
            and ``undefined`` is ``"raise"``.

    Example:
        >>> delta_mtl({"a": {"accuracy": 0.9}}, {"a": {"accuracy": 0.8}}, [task_a])
        0.125
    """
    terms = []
    for task in tasks:
        metric = task.primary_metric
        values = []
        for what, source in (("model", metrics), ("single-task baseline", baseline)):
            if task.name not in source or metric not in source[task.name]:
                have = ", ".join(sorted(source)) or "no task"
                raise UserError(
                    f"Δ_MTL: the {what} metrics have no '{metric}' for task '{task.name}'; they cover: {have}"
                )
            values.append(float(source[task.name][metric]))
        value, base = values
        if base == 0:
            if undefined == "nan":
                return float("nan")
            raise UserError(
                f"Δ_MTL: the single-task baseline of task '{task.name}' has {metric} = 0, "
                f"so its relative change is undefined"
            )
        sign = 1.0 if task.higher_is_better(metric) else -1.0
        terms.append(sign * (value - base) / base)
    if not terms:
        raise UserError("Δ_MTL: no tasks to compare")
    return sum(terms) / len(terms)


def format_delta(value: float, digits: int = 2, percent: str = "%") -> str:
    """A Δ (a fraction) as a signed percentage, or a word saying why it is undefined.

    Δ is undefined (NaN) when a single-task baseline metric is 0: a relative change from 0
    has no value. It is never printed as ``nan``.

    Example:
        >>> format_delta(-0.0123), format_delta(float("nan"))
        ('-1.23%', 'undefined (a baseline metric is 0)')
    """
    value = float(value)
    if math.isnan(value):
        return "undefined (a baseline metric is 0)"
    return f"{100 * value:+.{digits}f}{percent}"
