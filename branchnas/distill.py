"""Fine-tuning objectives beyond the task losses: distillation and loss balancing.

Stage 1 already trained one single-task model per task. During fine-tuning each task's loss
can be pulled towards its own single-task model (its *teacher*), which keeps a task whose
shared encoder now starts from another task's weights from collapsing:

* **outputs** (``finetune.distill``, weight λ_o): for a class distribution (classification,
  segmentation per pixel) the KL divergence ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``
  (Hinton et al., 2015); for binary logits (attribute, edges) the same with a two-class
  softmax, i.e. BCE of ``σ(z_s/T)`` against ``σ(z_t/T)`` minus the teacher's entropy; for
  depth and regression the L1 distance, for normals ``1 − cos`` between the unit vectors;
* **features** (``finetune.distill_features``, weight λ_f): at every branch point, the mean
  squared difference between the node the task passes through and the teacher's block output.

The task's loss becomes ``s_t · (L_t + λ_o·D_t + λ_f·F_t)``, where ``s_t`` is ``1`` or, with
``finetune.balance = "single_task"``, ``1 / L_t^stl``: the inverse of the single-task model's
final training loss, so that every task starts near 1 and none dwarfs the others' gradients.
The loss weighting scheme (``finetune.weighting``) then combines the tasks as usual.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from branchnas.kinds import IGNORE_INDEX

__all__ = ["output_distillation", "feature_distillation", "Teachers", "FinetuneObjective"]


def output_distillation(kind: str, student: Tensor, teacher: Tensor, temperature: float = 2.0,
                        target: Tensor | None = None) -> Tensor:
    """How far the student's output is from the teacher's, for a task of ``kind`` (a scalar).

    Args:
        kind: The task kind.
        student: The student's output (the head's output format of that kind).
        teacher: The teacher's output, same shape (no gradient flows into it).
        temperature: ``T`` of the softened distributions (class and binary kinds only).
        target: The task's target; for segmentation, unlabelled pixels are left out.
    """
    teacher = teacher.detach().float()
    student = student.float()
    t = float(temperature)
    if kind in ("classification", "segmentation"):
        log_p = F.log_softmax(student / t, dim=1)
        q = F.softmax(teacher / t, dim=1)
        per = (q * (torch.log(q.clamp_min(1e-12)) - log_p)).sum(dim=1) * t * t
        if kind == "segmentation" and target is not None:
            valid = (target != IGNORE_INDEX).to(per.dtype)
            return (per * valid).sum() / valid.sum().clamp_min(1.0)
        return per.mean()
    if kind in ("attribute", "edges"):
        q = torch.sigmoid(teacher / t)
        per = F.binary_cross_entropy_with_logits(student / t, q, reduction="none")
        entropy = F.binary_cross_entropy(q, q, reduction="none")  # KL = BCE − H(q) ≥ 0
        return ((per - entropy) * t * t).mean()
    if kind == "normals":
        return (1 - F.cosine_similarity(student, teacher, dim=1, eps=1e-6)).mean()
    if kind in ("depth", "regression"):
        return (student - teacher).abs().mean()
    raise ValueError(f"no output distillation for task kind '{kind}'")


def feature_distillation(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Mean over branch points of the mean squared difference between feature maps."""
    terms = [F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()


class Teachers(nn.Module):
    """The frozen single-task models: ``{task: (backbone, head)}``, in eval mode.

    :meth:`forward` returns ``({task: output}, {task: [features after each block]})``.

    The teachers never change, so their outputs on the training images can be computed once
    instead of once per epoch: after :meth:`remember`, the first forward pass computes them for
    every training image (and its mirror, when training flips images) in a fixed order, and
    each batch whose images are all in that table (keyed by the image's bytes) is looked up. A
    batch with an image outside it is run through the teachers. Both paths give the same values
    whether a run is straight or resumed, so a resumed run still matches a straight one bit for
    bit. The table is filled only while it fits in ``cache_bytes``. Features are not remembered
    (they are far larger); asking for them runs the teachers.
    """

    def __init__(self, models: Mapping[str, tuple[nn.Module, nn.Module]], cache_bytes: int = 1 << 30) -> None:
        super().__init__()
        self.backbones = nn.ModuleDict({t: b for t, (b, _) in models.items()})
        self.heads = nn.ModuleDict({t: h for t, (_, h) in models.items()})
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        self.cache_bytes = int(cache_bytes)
        self._source: tuple[Callable[[], Iterable[Tensor]], bool] | None = None
        self._forget()

    def _forget(self) -> None:
        self._filled = False
        self._slots: dict[bytes, int] = {}  # image key -> row of the stores
        self._stores: dict[str, Tensor] = {}  # task -> (capacity, *output shape), grown by doubling
        self.cached_bytes = 0
        self.hits = 0
        self.misses = 0

    def remember(self, batches: Callable[[], Iterable[Tensor]], mirrored: bool = False) -> None:
        """Look up the outputs on the images that ``batches()`` yields (and their mirrors).

        ``batches`` is called once, at the next forward pass, and must yield the images exactly
        as training batches hold them (same normalisation), in a fixed order.
        """
        self._source = (batches, bool(mirrored))
        self._forget()

    def train(self, mode: bool = True) -> Teachers:  # teachers never leave eval mode
        return super().train(False)

    def _apply(self, fn: Any, recurse: bool = True) -> Teachers:  # moved or cast: compute the table again
        self._forget()
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def run(self, x: Tensor, features: bool = False) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
        """The teachers' outputs (and features) on ``x``, always computed."""
        outputs: dict[str, Tensor] = {}
        feats: dict[str, list[Tensor]] = {}
        for task, backbone in self.backbones.items():
            h = backbone.stem(x)
            per_block = []
            for block in backbone.blocks:
                h = block(h)
                per_block.append(h)
            outputs[task] = self.heads[task](h)
            if features:
                feats[task] = per_block
        return outputs, feats

    @torch.no_grad()
    def forward(self, x: Tensor, features: bool = False) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
        if features or self._source is None or self.cache_bytes <= 0:
            return self.run(x, features)
        if not self._filled:
            self._fill(x.device)
        slots = [self._slots.get(key) for key in _keys(x)]
        if any(slot is None for slot in slots):
            self.misses += len(slots)
            return self.run(x)
        self.hits += len(slots)
        rows = torch.tensor(slots, device=x.device)
        return {task: store[rows] for task, store in self._stores.items()}, {}

    def _fill(self, device: torch.device) -> None:
        self._filled = True
        batches, mirrored = self._source
        for images in batches():
            for view in (images, images.flip(-1)) if mirrored else (images,):
                view = view.to(device)
                if not self._remember(_keys(view), self.run(view)[0]):
                    return  # full: the rest is computed when it comes

    def _remember(self, keys: list[bytes], computed: Mapping[str, Tensor]) -> bool:
        """Store the outputs of images not stored yet; ``False`` once they no longer fit."""
        new: list[int] = []
        seen: set[bytes] = set()
        for i, key in enumerate(keys):  # an image repeated in the data is stored once
            if key not in self._slots and key not in seen:
                seen.add(key)
                new.append(i)
        row_bytes = sum(v[0].numel() * v.element_size() for v in computed.values())
        if self.cached_bytes + len(new) * row_bytes > self.cache_bytes:
            return False
        start, need = len(self._slots), len(self._slots) + len(new)
        at = torch.tensor(new, device=next(iter(computed.values())).device, dtype=torch.long)
        for task, value in computed.items():
            store = self._stores.get(task)
            if store is None or store.shape[0] < need:  # grow by doubling
                grown = value.new_empty((max(need, 2 * (store.shape[0] if store is not None else 0)), *value.shape[1:]))
                if store is not None:
                    grown[:start] = store[:start]
                self._stores[task] = store = grown
            store[start:need] = value[at]
        for offset, i in enumerate(new):
            self._slots[keys[i]] = start + offset
        self.cached_bytes += len(new) * row_bytes
        return True


def _keys(images: Tensor) -> list[bytes]:
    """One key per image: a hash of its fp32 bytes (a mirrored image is another image)."""
    rows = images.detach().to("cpu", torch.float32).contiguous()
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in rows]


class FinetuneObjective:
    """The trainer's objective hook for fine-tuning: distillation terms and loss balancing.

    Called by :class:`branchnas.training.Trainer` after the task losses of a batch, with the
    network's outputs and (when :attr:`wants_features`) its node features.

    Args:
        tasks: The network's tasks.
        teachers: The single-task models of the tasks to distil (``None`` when no distillation
            is asked for); tasks without a teacher get no distillation term.
        outputs: λ_o, the weight of output distillation.
        features: λ_f, the weight of feature distillation.
        temperature: T for class and binary kinds.
        scale: ``{task: s_t}`` loss scales (default 1).
        paths: ``{task: [node per branch point]}`` in the student (for feature distillation).
    """

    def __init__(self, tasks: Sequence[Any], teachers: Teachers | None = None, *, outputs: float = 0.0,
                 features: float = 0.0, temperature: float = 2.0, scale: Mapping[str, float] | None = None,
                 paths: Mapping[str, list[str]] | None = None) -> None:
        self.tasks = list(tasks)
        self.teachers = teachers
        self.outputs = float(outputs)
        self.features = float(features)
        self.temperature = float(temperature)
        self.scale = {t.name: float((scale or {}).get(t.name, 1.0)) for t in self.tasks}
        self.paths = dict(paths or {})
        if (self.outputs or self.features) and teachers is None:
            raise ValueError("distillation needs the teachers")
        for name, value in self.scale.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"loss scale of task '{name}' must be positive and finite; got {value}")

    @property
    def wants_features(self) -> bool:
        return self.features > 0

    def to(self, device: torch.device) -> FinetuneObjective:
        if self.teachers is not None:
            self.teachers.to(device)
        return self

    def __call__(self, images: Tensor, outputs: Mapping[str, Tensor], losses: Mapping[str, Tensor],
                 targets: Mapping[str, Tensor], features: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The per-task losses to optimise: ``s_t · (L_t + λ_o·D_t + λ_f·F_t)``."""
        out = dict(losses)
        if self.teachers is not None and (self.outputs or self.features):
            t_out, t_feat = self.teachers(images, features=self.wants_features)
            for task in self.tasks:
                name = task.name
                if name not in t_out:  # no teacher: it starts from its own weights
                    continue
                if self.outputs:
                    out[name] = out[name] + self.outputs * output_distillation(
                        task.kind, outputs[name], t_out[name], self.temperature, targets.get(task.target))
                if self.wants_features and features is not None:
                    student = [features[node] for node in self.paths[name]]
                    out[name] = out[name] + self.features * feature_distillation(student, t_feat[name])
        return {name: self.scale[name] * value for name, value in out.items()}
