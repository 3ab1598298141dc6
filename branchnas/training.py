"""The one trainer: single-task pre-training and multi-task fine-tuning.

:class:`Trainer` trains either one model on its tasks (multi-task fine-tuning) or several
independent single-task models *together* (stage 1), and :func:`evaluate` measures a model.
A model maps an image batch to ``{task name: output}`` (see ``docs/internals.md``).

What a run does, epoch by epoch:

* data order and flips come from :func:`branchnas.data.batches` with ``(seed, epoch)``;
* each step, the model's :class:`~branchnas.weighting.LossWeighting` does the backward pass,
  gradients are clipped per model (``grad_clip``), the optimizer (sgd, adam or adamw) steps
  at the learning rate of a per-step cosine (or constant) schedule with linear warm-up;
* a NaN or infinite loss stops the run with :class:`~branchnas.errors.TrainingDiverged`;
* after each epoch the model is evaluated on the validation split, the best epoch is kept
  (by the primary metric) and, with ``patience`` > 0, training stops early and the best
  epoch's weights are restored;
* a checkpoint is written atomically: model, optimizer, schedule, weighting, RNG state,
  history and best state. A run killed at any point resumes from the last finished epoch
  and ends with the same weights, bit for bit on CPU, as a run that was never stopped.

Several models trained together
-------------------------------
``Trainer({"a": model_a, "b": model_b}, ...)`` trains independent single-task models on the
same batches: one data load and one augmentation per batch serve every model. Each model
keeps everything that could couple it to the others to itself: its optimizer, schedule, RNG
stream (dropout), gradient-norm clipping, best epoch and early stopping (a model that stopped
is frozen with its best weights while the others go on). Training them together is therefore
the same computation as training each alone. Two ways to run them (``concurrent``):

* ``"shared"``: the models run one after another on each shared batch; bit-identical to
  training each model alone.
* ``"stacked"``: the identical encoders run as one batched computation
  (``torch.func.stack_module_state`` + ``vmap``, which becomes grouped convolutions); the
  heads, which differ per task, run per model. The same maths as ``"shared"``; the floats
  can differ in the last bits because a grouped kernel sums in another order.

``"auto"`` picks ``"stacked"`` on CUDA, where small models leave the GPU idle and one
batched kernel replaces N small ones, and ``"shared"`` on CPU. There one model's step
already keeps the cores busy (ResNet-20, 32x32, batch 64: ~100 ms per model and step against
<1 ms to load and flip the batch), and oneDNN's grouped convolutions, which ``vmap`` lowers
to, measured 1.2-1.4x slower than N separate ones (``bench/pretrain.py``).

Example:
    >>> trainer = Trainer(model, tasks, recipe.finetune, batch_size=64, seed=0,
    ...                   checkpoint="runs/x/finetune/ckpt")        # doctest: +SKIP
    >>> result = trainer.fit(splits["train"], splits["val"])          # doctest: +SKIP
    >>> evaluate(model, tasks, splits["test"], 64)                    # doctest: +SKIP
    {'shape': {'accuracy': 0.93}}
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from branchnas.errors import TrainingDiverged, UserError
from branchnas.rundir import atomic_torch_save

__all__ = [
    "Trainer",
    "SingleTaskModel",
    "evaluate",
    "evaluate_models",
    "lr_factor",
    "resolve_device",
    "derive_seed",
    "CONCURRENT_MODES",
]

#: How several models are trained together (see the module docstring).
CONCURRENT_MODES = ("auto", "shared", "stacked")

_CHECKPOINT_VERSION = 1
#: Name of the single model's checkpoint file (several models: one file per task).
_SINGLE = "model"


# --------------------------------------------------------------------------- small helpers


def derive_seed(seed: int, *tags: str | int) -> int:
    """A 63-bit seed fixed by ``seed`` and a purpose, stable across runs and platforms.

    Example:
        >>> derive_seed(0, "pretrain", "shape") == derive_seed(0, "pretrain", "shape")
        True
    """
    text = ":".join(str(t) for t in (seed, *tags))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def resolve_device(spec: str, section: str = "device") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` as given.

    Raises:
        UserError: the spec is malformed, or names CUDA where there is none.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"{section}: expected auto, cpu, cuda or cuda:N; got {spec!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{section}: expected auto, cpu, cuda or cuda:N; got {spec!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{section}: {spec!r} was asked for but CUDA is not available; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"{section}: {spec!r} was asked for but there are {torch.cuda.device_count()} CUDA devices"
            )
    return device


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of the peak.

    Linear warm-up from ``1/warmup_steps`` to 1 over the first ``warmup_steps`` steps, then
    ``0.5 (1 + cos(pi (step - warmup) / (total - warmup)))`` for ``cosine`` (1 at the end of
    the warm-up, tending to 0 at ``total_steps``) or 1 for ``constant``.

    Example:
        >>> lr_factor(0, 100), lr_factor(50, 100), lr_factor(1, 100, warmup_steps=4)
        (1.0, 0.5, 0.5)
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _section(cfg: Any) -> str:
    """The recipe section a TrainConfig came from (PretrainConfig -> 'pretrain'), for messages."""
    name = type(cfg).__name__.removesuffix("Config").lower()
    return name if name not in ("train", "") else "train"


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(vars(cfg))


class SingleTaskModel(nn.Module):
    """A single-task network: an encoder (the backbone) and the task's head.

    Its forward is ``{task: head(backbone(images))}``; the trainer runs the encoders of
    several such models as one stacked computation when they are identical in structure.

    Args:
        backbone: The encoder (a :class:`branchnas.backbones.Backbone` or any module).
        head: The task head, fed with the backbone's output.
        task: The task's name (the key of the output).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, task: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.task = task

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return {self.task: self.head(self.backbone(images))}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters."""
        return list(self.backbone.parameters())


def _batches(dataset: Any, batch_size: int, **kwargs: Any) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    from branchnas.data import batches

    return iter(batches(dataset, batch_size, **kwargs))


def _num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def _to_device(images: Tensor, targets: Mapping[str, Tensor], device: torch.device,
               channels_last: bool) -> tuple[Tensor, dict[str, Tensor]]:
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, {k: v.to(device, non_blocking=non_blocking) for k, v in targets.items()}


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _make_optimizer(cfg: Any, decayed: list[Tensor], plain: list[Tensor]) -> torch.optim.Optimizer:
    """The recipe's optimizer; ``plain`` parameters (loss-weighting ones) get no weight decay."""
    groups = [{"params": decayed, "weight_decay": cfg.weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"{_section(cfg)}.optimizer: expected one of 'sgd', 'adam', 'adamw'; got {cfg.optimizer!r}")


def _clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    # As torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6), never up.
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def _score(tasks: Sequence[Any], metrics: Mapping[str, Mapping[str, float]],
           reference: Mapping[str, Mapping[str, float]] | None) -> float:
    """Larger is better. One task: its primary metric (negated when lower is better).

    Several tasks: the mean relative change of the primary metrics against ``reference``
    (the first validated epoch), as Δ_MTL does, so that tasks on different scales count alike.
    """
    if len(tasks) == 1:
        task = tasks[0]
        value = float(metrics[task.name][task.primary_metric])
        return value if task.higher_is_better(task.primary_metric) else -value
    terms = []
    for task in tasks:
        metric = task.primary_metric
        value = float(metrics[task.name][metric])
        base = float(reference[task.name][metric]) if reference else 0.0
        sign = 1.0 if task.higher_is_better(metric) else -1.0
        change = (value - base) / abs(base) if base and math.isfinite(base) else value - base
        terms.append(sign * change)
    return float(np.mean(terms))


def _better(score: float, best: float | None) -> bool:
    if best is None:
        return True
    if math.isnan(score):
        return False
    return math.isnan(best) or score > best


def _state_to_cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# --------------------------------------------------------------------------- one model's state


class _Member:
    """One independently trained model and everything that belongs to it alone."""

    def __init__(self, name: str, model: nn.Module, tasks: list[Any], weighting: Any,
                 cfg: Any, seed: int, device: torch.device) -> None:
        self.name = name
        self.model = model
        self.tasks = tasks
        self.weighting = weighting
        self.seed = seed
        self.device = device
        shared = model.shared_parameters() if hasattr(model, "shared_parameters") else model.parameters()
        self.shared = list(shared)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.extra = [p for p in weighting.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(cfg, self.params, self.extra)
        self.step = 0
        self.epoch = 0  # finished epochs
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.reference: dict[str, dict[str, float]] | None = None
        self.bad_epochs = 0
        self.stopped = False
        # Each model draws from its own torch RNG stream (dropout, random weightings), so
        # that training it next to others draws exactly what training it alone draws.
        gen = torch.Generator().manual_seed(derive_seed(seed, "rng", name))
        self.rng_cpu = gen.get_state()
        self.rng_cuda: Tensor | None = None
        self.last_losses: dict[str, float] = {}
        self.epoch_loss_sums: dict[str, float] = {}

    @contextlib.contextmanager
    def rng(self) -> Iterator[None]:
        """Run with this model's RNG stream as torch's global one, then put the outer one back."""
        outer_cpu = torch.get_rng_state()
        cuda = self.device.type == "cuda"
        if cuda:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            if self.rng_cuda is None:
                torch.cuda.manual_seed(derive_seed(self.seed, "rng-cuda", self.name))
                self.rng_cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.rng_cuda, self.device)
        torch.set_rng_state(self.rng_cpu)
        try:
            yield
        finally:
            self.rng_cpu = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if cuda:
                self.rng_cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def done(self, epochs: int) -> bool:
        """Stopped early, or trained for every epoch."""
        return self.stopped or self.epoch >= epochs

    def losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {t.name: t.loss(outputs[t.name], targets[t.target]) for t in self.tasks}

    def state(self, config: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": _CHECKPOINT_VERSION,
            "member": self.name,
            "config": config,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.step},
            "weighting": self.weighting.state_dict() if hasattr(self.weighting, "state_dict") else {},
            "rng": {"cpu": self.rng_cpu, "cuda": self.rng_cuda},
            "history": self.history,
            "best": self.best,
            "reference": self.reference,
            "bad_epochs": self.bad_epochs,
            "stopped": self.stopped,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("weighting") and hasattr(self.weighting, "load_state_dict"):
            self.weighting.load_state_dict(state["weighting"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.rng_cpu = state["rng"]["cpu"]
        self.rng_cuda = state["rng"].get("cuda")
        self.history = list(state["history"])
        self.best = state["best"]
        self.reference = state["reference"]
        self.bad_epochs = int(state["bad_epochs"])
        self.stopped = bool(state["stopped"])

    def restore_best(self) -> None:
        if self.best is not None and self.best.get("state") is not None:
            self.model.load_state_dict(self.best["state"])

    def result(self) -> dict[str, Any]:
        best = self.best or {}
        return {
            "history": self.history,
            "best_epoch": best.get("epoch"),
            "best_val": best.get("val"),
            "epochs": self.epoch,
            "steps": self.step,
            "stopped_early": self.stopped,
        }


# --------------------------------------------------------------------------- stacked encoders


def _stackable(members: Sequence[_Member]) -> str:
    """Why ``members`` cannot run as one stacked computation ('' when they can)."""
    if len(members) < 2:
        return "fewer than two models"
    if not all(isinstance(m.model, SingleTaskModel) for m in members):
        return "not all models are SingleTaskModel (encoder + head)"
    first = members[0].model.backbone
    shapes = [(k, tuple(v.shape), v.dtype) for k, v in first.state_dict().items()]
    for m in members[1:]:
        other = m.model.backbone
        if type(other) is not type(first) or repr(other) != repr(first):
            return "the encoders differ in structure"
        if [(k, tuple(v.shape), v.dtype) for k, v in other.state_dict().items()] != shapes:
            return "the encoders differ in their tensors"
    for module in first.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return "the encoder has dropout (random per model)"
    if any(m.extra for m in members):
        return "a loss weighting has learnable parameters"
    return ""


class _Stack:
    """The encoders of several models as one batched (vmapped) computation, for one epoch.

    At the start of an epoch the models' encoder weights, BN buffers and optimizer state are
    stacked along a new leading dimension; one optimizer (the same kind and settings, all
    element-wise, so the same maths) steps the stacked tensors and every head. At the end of
    the epoch everything is copied back into each model, which stays the source of truth
    for checkpoints and evaluation.
    """

    def __init__(self, members: Sequence[_Member], cfg: Any) -> None:
        from torch.func import functional_call, stack_module_state, vmap

        self.members = list(members)
        backbones = [m.model.backbone for m in self.members]
        self.names = [name for name, p in backbones[0].named_parameters() if p.requires_grad]
        params, buffers = stack_module_state(backbones)
        self.params = {k: params[k] for k in self.names}
        self.frozen = {k: v for k, v in params.items() if k not in self.params}
        self.buffers = buffers
        base = copy.deepcopy(backbones[0]).to("meta")
        base.train()

        def encode(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(base, ({**p, **self.frozen}, b), (x,))

        # randomness="error": an encoder that draws random numbers would draw the same
        # numbers for every model here, unlike separate training; _stackable rules it out.
        self._forward = vmap(encode, in_dims=(0, 0, None), randomness="error")
        self.heads = [list(m.model.head.parameters()) for m in self.members]
        head_params = [p for ps in self.heads for p in ps if p.requires_grad]
        self.optimizer = _make_optimizer(cfg, list(self.params.values()) + head_params, [])
        self._load_optimizer_state()

    def forward(self, images: Tensor) -> Tensor:
        return self._forward(self.params, self.buffers, images)

    def _member_params(self, member: _Member) -> dict[str, Tensor]:
        return dict(member.model.backbone.named_parameters())

    def _load_optimizer_state(self) -> None:
        for name, stacked in self.params.items():
            states = [m.optimizer.state.get(self._member_params(m)[name]) for m in self.members]
            if not any(states):
                continue
            if not all(states):
                raise RuntimeError("stacked training: models are at different optimizer steps")
            merged = {}
            for key, value in states[0].items():
                if torch.is_tensor(value) and value.shape == stacked.shape[1:] and value.dim() > 0:
                    merged[key] = torch.stack([s[key] for s in states])
                elif torch.is_tensor(value):
                    merged[key] = value.clone()
                else:
                    merged[key] = value
            self.optimizer.state[stacked] = merged
        for member, params in zip(self.members, self.heads, strict=True):
            for p in params:
                if p in member.optimizer.state:
                    self.optimizer.state[p] = member.optimizer.state[p]

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the stacked weights, buffers and optimizer state back into each model."""
        for i, member in enumerate(self.members):
            own = self._member_params(member)
            for name, stacked in self.params.items():
                own[name].copy_(stacked[i])
                state = self.optimizer.state.get(stacked)
                if state:
                    member.optimizer.state[own[name]] = {
                        k: (v[i].clone() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(self.members)
                            and v.shape[1:] == own[name].shape else
                            v.clone() if torch.is_tensor(v) else v)
                        for k, v in state.items()
                    }
            own_buffers = dict(member.model.backbone.named_buffers())
            for name, stacked in self.buffers.items():
                own_buffers[name].copy_(stacked[i])
            for p in self.heads[i]:
                if p in self.optimizer.state:
                    member.optimizer.state[p] = self.optimizer.state[p]

    def grad_norms(self) -> Tensor:
        """Each model's gradient norm over its encoder slice and its head, shape (N,)."""
        squares = torch.zeros(len(self.members), device=next(iter(self.params.values())).device)
        for p in self.params.values():
            if p.grad is not None:
                squares = squares + p.grad.detach().float().flatten(1).square().sum(1)
        for i, params in enumerate(self.heads):
            for p in params:
                if p.grad is not None:
                    squares[i] = squares[i] + p.grad.detach().float().square().sum()
        return squares.sqrt()

    def clip(self, max_norm: float) -> None:
        coef = _clip_coefficient(self.grad_norms(), max_norm)
        for p in self.params.values():
            if p.grad is not None:
                p.grad.mul_(coef.view(-1, *([1] * (p.grad.dim() - 1))).to(p.grad.dtype))
        for i, params in enumerate(self.heads):
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef[i].to(p.grad.dtype))


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Train one model, or several independent single-task models on shared batches.

    Args:
        model: One model mapping images to ``{task: output}`` for every task in ``tasks``;
            or ``{task name: model}``, one single-task model per task, trained together
            (see the module docstring).
        tasks: The tasks (:class:`branchnas.tasks.Task`).
        cfg: A :class:`branchnas.recipe.TrainConfig` (``[pretrain]`` or ``[finetune]``).
        batch_size: Images per batch.
        seed: Seed of the data order, the flips and every model's RNG stream.
        checkpoint: A folder for the per-epoch checkpoints (``model.pt`` for one model, one
            ``<task>.pt`` per model otherwise); a run finds its checkpoints there and resumes.
            ``None``: no checkpoints.
        weighting: The :class:`~branchnas.weighting.LossWeighting` of the model (default
            :class:`~branchnas.weighting.Uniform`); for several models, ``{task: weighting}``.
        augment: Random horizontal flips of the training batches.
        desc: Label of the progress bar.
        concurrent: How several models run: ``auto``, ``shared`` or ``stacked``.
        progress: Show a progress bar (stderr).
        on_step: Called after every optimizer step with ``{"epoch", "batch", "step"}``
            (0-based epoch and batch, 1-based step); a hook for tests and monitors.

    Raises:
        UserError: a bad device, optimizer or concurrent mode.
        ValueError: models and tasks do not match.
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, nn.Module],
        tasks: Sequence[Any],
        cfg: Any,
        *,
        batch_size: int,
        seed: int,
        checkpoint: str | Path | None = None,
        weighting: Any = None,
        augment: bool = True,
        desc: str = "train",
        concurrent: str = "auto",
        progress: bool = True,
        on_step: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        from branchnas.weighting import Uniform

        if concurrent not in CONCURRENT_MODES:
            raise UserError(f"concurrent: expected one of {', '.join(CONCURRENT_MODES)}; got {concurrent!r}")
        if batch_size < 1:
            raise UserError(f"batch_size: expected a positive integer; got {batch_size}")
        self.cfg = cfg
        self.section = _section(cfg)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.augment = augment
        self.desc = desc
        self.progress = progress
        self.on_step = on_step
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.device = resolve_device(cfg.device, f"{self.section}.device")
        self.channels_last = self.device.type == "cuda"
        self.tasks = list(tasks)
        by_name = {t.name: t for t in self.tasks}
        if len(by_name) != len(self.tasks):
            raise ValueError("tasks: task names must be unique")
        self.single = not isinstance(model, Mapping)
        if self.single:
            if isinstance(weighting, Mapping):
                raise ValueError("weighting: give one LossWeighting for one model")
            models = {_SINGLE: (model, self.tasks, weighting or Uniform(self.tasks, seed=self.seed))}
        else:
            unknown = [k for k in model if k not in by_name]
            missing = [k for k in by_name if k not in model]
            if unknown or missing:
                raise ValueError(f"models: expected one model per task; unknown {unknown}, missing {missing}")
            if weighting is not None and not isinstance(weighting, Mapping):
                raise ValueError("weighting: give {task: LossWeighting} for several models")
            weightings = dict(weighting or {})
            models = {
                name: (m, [by_name[name]], weightings.get(name) or Uniform([by_name[name]], seed=self.seed))
                for name, m in model.items()
            }
        self.members: list[_Member] = []
        for name, (module, member_tasks, member_weighting) in models.items():
            module.to(self.device)
            if self.channels_last:
                module.to(memory_format=torch.channels_last)
            if hasattr(member_weighting, "to"):
                member_weighting.to(self.device)
            self.members.append(_Member(name, module, member_tasks, member_weighting, cfg, self.seed, self.device))
        self.stack_reason = _stackable(self.members)
        if concurrent == "stacked" and self.stack_reason and len(self.members) > 1:
            raise UserError(f"concurrent='stacked' is not possible here: {self.stack_reason}; use 'shared'")
        if concurrent == "auto":
            concurrent = "stacked" if self.device.type == "cuda" and not self.stack_reason else "shared"
        self.concurrent = concurrent

    # -- checkpoints

    def _config(self) -> dict[str, Any]:
        cfg = _cfg_dict(self.cfg)
        for key in ("device", "concurrent"):  # where and how it runs, not what it computes
            cfg.pop(key, None)
        return {"train": cfg, "batch_size": self.batch_size, "seed": self.seed, "augment": self.augment}

    def _checkpoint_path(self, member: _Member) -> Path | None:
        if self.checkpoint is None:
            return None
        return self.checkpoint / f"{member.name}.pt"

    def _resume(self) -> None:
        config = self._config()
        for member in self.members:
            path = self._checkpoint_path(member)
            if path is None or not path.exists():
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
                raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}); delete it to start that model afresh") from None
            if state.get("version") != _CHECKPOINT_VERSION or state.get("member") != member.name:
                raise UserError(f"checkpoint {path} is not a checkpoint of '{member.name}'; delete it to start afresh")
            old = state.get("config", {})
            if old != config:
                key = _first_difference(old, config)
                raise UserError(
                    f"checkpoint {path} was written with other settings ({key}); "
                    f"delete {path.parent} to start afresh, or restore the old settings"
                )
            member.load(state)

    def _save(self, member: _Member) -> None:
        path = self._checkpoint_path(member)
        if path is not None:
            atomic_torch_save(member.state(self._config()), path)

    # -- the loop

    def fit(self, train: Any, val: Any = None) -> dict[str, Any]:
        """Train to ``cfg.epochs`` (or until early stopping), resuming from the checkpoints.

        Args:
            train: The training split (a :class:`branchnas.data.MultiTaskDataset`).
            val: The validation split, for the per-epoch metrics, the best epoch and early
                stopping; ``None`` skips validation.

        Returns:
            ``{"history": [per epoch: epoch, train_loss {task: mean}, val {task: {metric}},
            lr, seconds, images_per_s, weights], "best_epoch", "best_val", "epochs",
            "steps", "stopped_early"}``; for several models, that dict per task.

        Raises:
            TrainingDiverged: a loss became NaN or infinite.
        """
        from tqdm.auto import tqdm

        self._resume()
        epochs = int(self.cfg.epochs)
        steps_per_epoch = _num_batches(len(train), self.batch_size)
        self.total_steps = epochs * steps_per_epoch
        self.warmup_steps = int(self.cfg.warmup_epochs) * steps_per_epoch
        pending = [m for m in self.members if not m.done(epochs)]
        start = min((m.epoch for m in pending), default=epochs)
        deterministic = torch.are_deterministic_algorithms_enabled()
        deterministic_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        cudnn_benchmark = torch.backends.cudnn.benchmark
        if self.device.type == "cpu":
            # CPU kernels are deterministic at almost no cost; this catches any that are not.
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = True
        bar = tqdm(total=(epochs - start) * steps_per_epoch, desc=self.desc, unit="batch",
                   disable=not self.progress, dynamic_ncols=True, leave=True, mininterval=0.5)
        try:
            for epoch in range(start, epochs):
                group = [m for m in self.members if not m.done(epochs) and m.epoch == epoch]
                if not group:
                    continue
                self._epoch(group, train, val, epoch, bar)
        finally:
            bar.close()
            torch.use_deterministic_algorithms(deterministic, warn_only=deterministic_warn)
            torch.backends.cudnn.benchmark = cudnn_benchmark
        if self.cfg.patience > 0:
            for member in self.members:
                member.restore_best()
        results = {m.name: m.result() for m in self.members}
        return results[_SINGLE] if self.single else results

    def _epoch(self, group: list[_Member], train: Any, val: Any, epoch: int, bar: Any) -> None:
        # numpy/python RNGs are re-seeded per epoch, so a resumed epoch draws what the
        # uninterrupted one drew (torch's come from each model's saved stream).
        random.seed(derive_seed(self.seed, "python", epoch))
        np.random.seed(derive_seed(self.seed, "numpy", epoch) % 2**32)
        started = time.perf_counter()
        for m in group:
            m.model.train()
            m.weighting.start_epoch(epoch, [h["train_loss"] for h in m.history])
            m.epoch_loss_sums = {t.name: 0.0 for t in m.tasks}
        stack = _Stack(group, self.cfg) if self.concurrent == "stacked" and not _stackable(group) else None
        images_seen = 0
        batches = 0
        weights: dict[str, dict[str, float]] = {}
        try:
            for index, (images, targets) in enumerate(_batches(
                train, self.batch_size, shuffle=True, seed=self.seed, epoch=epoch, augment=self.augment
            )):
                images, targets = _to_device(images, targets, self.device, self.channels_last)
                lr = self.cfg.lr * lr_factor(group[0].step, self.total_steps, self.warmup_steps, self.cfg.schedule)
                if stack is None:
                    weights = self._step_shared(group, images, targets, epoch, index, lr)
                else:
                    weights = self._step_stacked(stack, images, targets, epoch, index, lr)
                images_seen += images.shape[0]
                batches += 1
                seconds = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix_str(self._postfix(group, epoch, images_seen / max(seconds, 1e-9)), refresh=False)
                if self.on_step is not None:
                    self.on_step({"epoch": epoch, "batch": index, "step": group[0].step})
        finally:
            if stack is not None:
                stack.write_back()
        train_seconds = time.perf_counter() - started
        metrics = _evaluate_members([(m.model, m.tasks) for m in group], val, self.batch_size,
                                    self.device, self.channels_last) if val is not None else None
        seconds = time.perf_counter() - started
        for i, m in enumerate(group):
            m.epoch = epoch + 1
            entry = {
                "epoch": epoch + 1,
                "train_loss": {k: v / max(batches, 1) for k, v in m.epoch_loss_sums.items()},
                "val": metrics[i] if metrics is not None else None,
                "lr": lr if batches else None,
                "seconds": round(seconds, 3),
                "images_per_s": round(images_seen / max(train_seconds, 1e-9), 1),
                "weights": weights.get(m.name, {}),
            }
            m.history.append(entry)
            if metrics is not None:
                self._track_best(m, metrics[i], epoch)
            self._save(m)
        bar.set_postfix_str(self._postfix(group, epoch, images_seen / max(train_seconds, 1e-9)), refresh=True)

    def _track_best(self, m: _Member, metrics: dict[str, dict[str, float]], epoch: int) -> None:
        if m.reference is None:
            m.reference = metrics
        score = _score(m.tasks, metrics, m.reference)
        if _better(score, m.best["score"] if m.best else None):
            keep = self.cfg.patience > 0  # the weights are needed only to restore them
            m.best = {"epoch": epoch + 1, "score": score, "val": metrics,
                      "state": _state_to_cpu(m.model.state_dict()) if keep else None}
            m.bad_epochs = 0
        else:
            m.bad_epochs += 1
        if self.cfg.patience > 0 and m.bad_epochs >= self.cfg.patience and m.epoch < self.cfg.epochs:
            # This model is done: it keeps its best weights while the others go on.
            m.stopped = True
            m.restore_best()

    def _postfix(self, group: list[_Member], epoch: int, images_per_s: float) -> str:
        losses = [v for m in group for v in m.last_losses.values()]
        loss = f"{np.mean(losses):.3g}" if losses else "-"
        vals = []
        for m in group:
            last = m.history[-1] if m.history else None
            if last and last.get("val"):
                for t in m.tasks:
                    vals.append(f"{t.name} {last['val'][t.name][t.primary_metric]:.3g}")
        val = f" | val {', '.join(vals[:4])}{' …' if len(vals) > 4 else ''}" if vals else ""
        return f"epoch {epoch + 1}/{self.cfg.epochs} | loss {loss}{val} | {images_per_s:.0f} img/s"

    def _check_finite(self, group: list[_Member], losses: list[dict[str, Tensor]], epoch: int, index: int) -> None:
        flat = [(m, name, value) for m, ls in zip(group, losses, strict=True) for name, value in ls.items()]
        values = torch.stack([v.detach().float() for _, _, v in flat]).tolist()  # one sync per step
        for (m, name, _), value in zip(flat, values, strict=True):
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"task '{name}': the training loss became {value} at step {m.step + 1} "
                    f"(epoch {epoch + 1}, batch {index + 1}); lower {self.section}.lr (now {self.cfg.lr:g}) "
                    f"or set {self.section}.grad_clip, e.g. --set {self.section}.lr={self.cfg.lr / 10:g}"
                )
            m.last_losses[name] = value
            m.epoch_loss_sums[name] += value

    def _step_shared(self, group: list[_Member], images: Tensor, targets: dict[str, Tensor],
                     epoch: int, index: int, lr: float) -> dict[str, dict[str, float]]:
        all_losses, weights = [], {}
        for m in group:
            with m.rng():
                m.optimizer.zero_grad(set_to_none=True)
                with _autocast(self.device):
                    outputs = m.model(images)
                losses = m.losses(outputs, targets)
                weights[m.name] = m.weighting.backward(losses, m.shared)
            all_losses.append(losses)
        self._check_finite(group, all_losses, epoch, index)
        for m in group:
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(m.params, self.cfg.grad_clip)
            for g in m.optimizer.param_groups:
                g["lr"] = lr
            m.optimizer.step()
            m.step += 1
        return weights

    def _step_stacked(self, stack: _Stack, images: Tensor, targets: dict[str, Tensor],
                      epoch: int, index: int, lr: float) -> dict[str, dict[str, float]]:
        group = stack.members
        stack.optimizer.zero_grad(set_to_none=True)  # holds every head's parameters too
        with _autocast(self.device):
            features = stack.forward(images)
        # Cut the graph at the encoder output: each weighting backpropagates its own losses
        # into its head and its slice of the features, then one backward pass runs through
        # the stacked encoders with every slice's gradient at once.
        cuts = [features[i].detach().requires_grad_() for i in range(len(group))]
        all_losses, weights = [], {}
        for m, cut in zip(group, cuts, strict=True):
            with m.rng():
                with _autocast(self.device):
                    output = m.model.head(cut)
                losses = m.losses({m.model.task: output}, targets)
                weights[m.name] = m.weighting.backward(losses, [cut])
            all_losses.append(losses)
        grads = torch.stack([c.grad if c.grad is not None else torch.zeros_like(c) for c in cuts])
        features.backward(grads)
        self._check_finite(group, all_losses, epoch, index)
        if self.cfg.grad_clip > 0:
            stack.clip(self.cfg.grad_clip)
        for g in stack.optimizer.param_groups:
            g["lr"] = lr
        stack.optimizer.step()
        for m in group:
            m.step += 1
        return weights


def _first_difference(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    return f"{path or 'config'} was {old!r}, now {new!r}"


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _evaluate_members(models: Sequence[tuple[nn.Module, Sequence[Any]]], dataset: Any, batch_size: int,
                      device: torch.device, channels_last: bool) -> list[dict[str, dict[str, float]]]:
    """Evaluate several models on one pass over ``dataset`` (each batch is loaded once)."""
    meters = [{t.name: t.meter() for t in tasks} for _, tasks in models]
    modes = [model.training for model, _ in models]
    for model, _ in models:
        model.eval()
    try:
        for images, targets in _batches(dataset, batch_size, shuffle=False, seed=0, epoch=0, augment=False):
            images, targets = _to_device(images, targets, device, channels_last)
            for (model, tasks), meter in zip(models, meters, strict=True):
                with _autocast(device):
                    outputs = model(images)
                for t in tasks:
                    meter[t.name].update(outputs[t.name].float(), targets[t.target])
    finally:
        for (model, _), mode in zip(models, modes, strict=True):
            model.train(mode)
    return [{name: m.compute() for name, m in meter.items()} for meter in meters]


def evaluate_models(models: Sequence[tuple[nn.Module, Sequence[Any]]], dataset: Any, batch_size: int,
                    device: str | torch.device | None = None) -> list[dict[str, dict[str, float]]]:
    """:func:`evaluate` for several models in one pass over ``dataset`` (each batch loaded once).

    Args:
        models: ``(model, tasks)`` pairs.
        dataset: A :class:`branchnas.data.MultiTaskDataset` split.
        batch_size: Images per forward pass.
        device: Where to run; ``None`` keeps each model where it is (the first model's device).

    Returns:
        ``{task: {metric: value}}`` per model, in order.
    """
    if not models:
        return []
    if device is None:
        target = _model_device(models[0][0])
    else:
        target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    for model, _ in models:
        model.to(target)
    return _evaluate_members([(m, list(t)) for m, t in models], dataset, batch_size, target, target.type == "cuda")


def evaluate(model: nn.Module, tasks: Sequence[Any], dataset: Any, batch_size: int,
             device: str | torch.device | None = None) -> dict[str, dict[str, float]]:
    """Every metric of every task of ``model`` on ``dataset``.

    Args:
        model: Maps images to ``{task: output}``.
        tasks: The tasks to measure.
        dataset: A :class:`branchnas.data.MultiTaskDataset` split.
        batch_size: Images per forward pass.
        device: Where to run; ``None`` keeps the model where it is. The model is moved there.

    Returns:
        ``{task: {metric: value}}``; the model keeps its train/eval mode.
    """
    return evaluate_models([(model, tasks)], dataset, batch_size, device)[0]
