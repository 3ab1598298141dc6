"""The one trainer: single-task pre-training and multi-task fine-tuning.

:class:`Trainer` trains either one model on its tasks (multi-task fine-tuning) or several
independent single-task models together (stage 1, see :mod:`branchnas.training.concurrent`).
What a run does, epoch by epoch:

* data order and flips come from :func:`branchnas.data.batches` with ``(seed, epoch)``;
* each step, the model's :class:`~branchnas.weighting.LossWeighting` does the backward pass,
  gradients are clipped per model (``grad_clip``), the optimizer (sgd, adam or adamw) steps
  at the learning rate of a per-step cosine (or constant) schedule with linear warm-up;
* the forward passes run in ``cfg.precision``: fp32, or under bf16 autocast with the outputs
  cast back to fp32 before the losses and metrics (:func:`~branchnas.training.runtime.resolve_precision`);
* a NaN or infinite loss stops the run with :class:`~branchnas.errors.TrainingDiverged`;
* after each epoch the model is evaluated on the validation split, the best epoch is kept
  (by the primary metric) and, with ``patience`` > 0, training stops early and the best
  epoch's weights are restored;
* a checkpoint is written atomically: model, optimizer, schedule, weighting, RNG state,
  history and best state. A run killed at any point resumes from the last finished epoch
  and ends with the same weights, bit for bit on CPU, as a run that was never stopped;
* under torchrun (several processes, :mod:`branchnas.training.distributed`) each model
  trains under DDP: each process takes its contiguous share of every batch, DDP averages
  the gradients, the training losses and validation metrics are summed over the processes
  so that every process agrees, and rank 0 alone writes the checkpoints (every process
  resumes from them) and draws the progress bar.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from branchnas.errors import TrainingDiverged, UserError
from branchnas.rundir import atomic_torch_save
from branchnas.training import distributed
from branchnas.training.concurrent import CONCURRENT_MODES, _Stack, _stackable
from branchnas.training.evaluation import _evaluate_members
from branchnas.training.member import _CHECKPOINT_VERSION, _better, _Member, _score, _state_to_cpu
from branchnas.training.optim import _section, lr_factor
from branchnas.training.runtime import (
    _autocast,
    _batches,
    _float_outputs,
    _kernel_settings,
    _num_batches,
    _to_device,
    derive_seed,
    resolve_device,
    resolve_precision,
)

__all__ = ["Trainer"]

#: Name of the single model's checkpoint file (several models: one file per task).
_SINGLE = "model"


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(vars(cfg))


class Trainer:
    """Train one model, or several independent single-task models on shared batches.

    Args:
        model: One model mapping images to ``{task: output}`` for every task in ``tasks``;
            or ``{task name: model}``, one single-task model per task, trained together
            (see :mod:`branchnas.training.concurrent`).
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
        progress: Show a progress bar (stderr); drawn only where
            :func:`branchnas.progress.show_progress` allows it (a terminal, not ``--quiet``).
        on_step: Called after every optimizer step with ``{"epoch", "batch", "step"}``
            (0-based epoch and batch, 1-based step); a hook for tests and monitors.
        objective: One model only: called as ``objective(images, outputs, losses, targets,
            features)`` after each batch's task losses and returning the per-task losses to
            optimise (distillation, balancing: :class:`branchnas.distill.FinetuneObjective`).
            When ``objective.wants_features`` the model's ``forward_features`` runs instead of
            its forward, and ``features`` are its node outputs.
        reference: ``{task: {metric: value}}`` that each epoch's validation metrics are
            scored against (the mean relative change of the primary metrics: Δ_MTL against the
            single-task models); default: the first validated epoch.
        keep_best: End with the weights of the best-scoring epoch, not the last one.
        variant: One model only: the fine-tuning variant (:mod:`branchnas.variants`). Its
            ``regulariser(model)`` is added to each step's loss (its gradient reaches only
            the parameters it depends on, so every loss weighting stays as it is), its
            ``optimizers(model)`` own their parameters and step on the same schedule (each
            group's ``base_lr`` times the schedule's factor), and its ``state_dict`` is
            saved in the checkpoints.
        callbacks: Called after each validated epoch (once its checkpoint is written) with
            ``{"epoch" (1-based), "val", "score", "history"}``; ``score`` is what the best
            epoch is chosen by (Δ_MTL against ``reference`` when given). An exception
            raised there stops training (tuning prunes trials this way).

    Several processes (torchrun; :func:`branchnas.training.distributed.world_size` > 1):
    every process builds the same trainer and calls :meth:`fit`; each model trains under
    DDP (``concurrent`` is ``shared``), on the GPU of the process's ``LOCAL_RANK`` when the
    device is CUDA, with ``cfg.sync_bn`` turning its BatchNorm layers into SyncBatchNorm.

    Raises:
        UserError: a bad device, precision (bf16 where the hardware has none), optimizer or
            concurrent mode; under DDP, a loss weighting that cannot train there, or
            ``sync_bn`` on the CPU.
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
        objective: Any = None,
        reference: Mapping[str, Mapping[str, float]] | None = None,
        keep_best: bool = False,
        variant: Any = None,
        callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
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
        self.objective = objective
        self.keep_best = bool(keep_best)
        self.variant = variant
        self.callbacks = list(callbacks)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.device = resolve_device(cfg.device, f"{self.section}.device")
        self.world = distributed.world_size()
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())  # this process's GPU (LOCAL_RANK)
        self.precision = resolve_precision(getattr(cfg, "precision", "fp32"), self.device, f"{self.section}.precision")
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
            self.members.append(_Member(name, module, member_tasks, member_weighting, cfg, self.seed, self.device,
                                        variant=variant))
        if variant is not None and not self.single:
            raise ValueError("variant: one model only (fine-tuning)")
        if objective is not None:
            if not self.single:
                raise ValueError("objective: one model only (fine-tuning)")
            objective.to(self.device)
        if reference is not None:
            for member in self.members:  # score epochs against it (Δ_MTL vs single-task) instead of epoch 1
                member.reference = {k: dict(v) for k, v in reference.items()}
        self.stack_reason = _stackable(self.members)
        if self.world > 1:
            self.stack_reason = "under DDP each model trains as its own replica"
            self._replicate(getattr(cfg, "sync_bn", False))
        if not self.stack_reason and self.precision == "bf16" and self.device.type == "cpu":
            # Measured: the vmapped convolutions come out fp32 under CPU autocast (it has no
            # rule for aten::convolution, which vmap lowers conv2d to); CUDA's has one.
            self.stack_reason = "bf16 on CPU does not reach the stacked (vmapped) convolutions"
        if concurrent == "stacked" and self.stack_reason and len(self.members) > 1:
            raise UserError(f"concurrent='stacked' is not possible here: {self.stack_reason}; use 'shared'")
        if concurrent == "auto":
            concurrent = "stacked" if self.device.type == "cuda" and not self.stack_reason else "shared"
        self.concurrent = concurrent

    def _replicate(self, sync_bn: bool) -> None:
        """Wrap each model in DDP (the same order on every process), refusing what cannot train there."""
        if sync_bn and self.device.type != "cuda":
            raise UserError(f"{self.section}.sync_bn: torch's SyncBatchNorm runs on GPUs only; "
                            f"set {self.section}.sync_bn = false to train on the CPU")
        for member in self.members:
            conflict = getattr(member.weighting, "ddp_conflict", "")
            if conflict:
                raise UserError(f"loss weighting '{member.weighting.name}' cannot train under DDP: {conflict}; "
                                "choose another one, or train in one process")
            conflict = getattr(member.variant, "ddp_conflict", "") if member.variant is not None else ""
            if conflict:
                raise UserError(f"fine-tuning variant '{member.variant.name}' cannot train under DDP: {conflict}; "
                                "choose another one, or train in one process")
        for member in self.members:
            member.replica = distributed.replicate(member.model, member.extra, self.device, sync_bn)

    # -- checkpoints

    def _config(self) -> dict[str, Any]:
        cfg = _cfg_dict(self.cfg)
        for key in ("device", "concurrent", "parallel", "log"):  # where and how it runs and logs, not what it computes
            cfg.pop(key, None)
        if not cfg.get("sync_bn"):  # checkpoints from before the key existed still resume
            cfg.pop("sync_bn", None)
        for key in [k for k in cfg if k.startswith("compare_")]:  # read only by `branchnas compare`
            cfg.pop(key)
        cfg["precision"] = self.precision  # what it computes in: auto as resolved on this machine
        return {"train": cfg, "batch_size": self.batch_size, "seed": self.seed, "augment": self.augment}

    def _checkpoint_path(self, member: _Member) -> Path | None:
        if self.checkpoint is None:
            return None
        return self.checkpoint / f"{member.name}.pt"

    def _resume(self) -> None:
        config = self._config()
        for member in self.members:
            # Rank 0 reads the checkpoint and every process resumes from what it read.
            state, error = self._read_checkpoint(member, config) if distributed.is_main() else (None, None)
            state, error = distributed.broadcast_object((state, error))
            if error:
                raise UserError(error)
            if state is not None:
                member.load(state)

    def _read_checkpoint(self, member: _Member, config: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """``(the member's checkpoint or None, None)``, or ``(None, why it cannot be resumed from)``."""
        path = self._checkpoint_path(member)
        if path is None or not path.exists():
            return None, None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
            return None, f"checkpoint {path} cannot be read ({type(err).__name__}); delete it to start that model afresh"
        if state.get("version") != _CHECKPOINT_VERSION or state.get("member") != member.name:
            return None, f"checkpoint {path} is not a checkpoint of '{member.name}'; delete it to start afresh"
        old = state.get("config", {})
        if old != config:
            key = _first_difference(old, config)
            return None, (f"checkpoint {path} was written with other settings ({key}); "
                          f"delete {path.parent} to start afresh, or restore the old settings")
        return state, None

    def _save(self, member: _Member) -> None:
        path = self._checkpoint_path(member)
        if path is not None and distributed.is_main():
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

        from branchnas.progress import show_progress

        distributed.check_batches(self.batch_size, len(train))
        self._resume()
        epochs = int(self.cfg.epochs)
        steps_per_epoch = _num_batches(len(train), self.batch_size)
        self.total_steps = epochs * steps_per_epoch
        self.warmup_steps = int(self.cfg.warmup_epochs) * steps_per_epoch
        pending = [m for m in self.members if not m.done(epochs)]
        start = min((m.epoch for m in pending), default=epochs)
        with _kernel_settings(self.device):
            shown = show_progress(self.progress) and distributed.is_main()  # one bar: rank 0's
            bar = tqdm(total=(epochs - start) * steps_per_epoch, desc=self.desc, unit="batch",
                       disable=not shown, dynamic_ncols=True, leave=True, mininterval=0.5)
            try:
                for epoch in range(start, epochs):
                    group = [m for m in self.members if not m.done(epochs) and m.epoch == epoch]
                    if not group:
                        continue
                    self._epoch(group, train, val, epoch, bar)
            finally:
                bar.close()
        if self.cfg.patience > 0 or self.keep_best:
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
            m.epoch_regulariser = 0.0
        stack = _Stack(group, self.cfg) if self.concurrent == "stacked" and not _stackable(group) else None
        images_seen = 0
        batches = 0
        weights: dict[str, dict[str, float]] = {}
        try:
            for index, (images, targets) in enumerate(_batches(
                train, self.batch_size, shuffle=True, seed=self.seed, epoch=epoch, augment=self.augment
            )):
                count = images.shape[0]
                share = 1.0
                if self.world > 1:
                    images, targets, share = distributed.share_batch(images, targets)
                images, targets = _to_device(images, targets, self.device, self.channels_last)
                lr = self.cfg.lr * lr_factor(group[0].step, self.total_steps, self.warmup_steps, self.cfg.schedule)
                if stack is None:
                    weights = self._step_shared(group, images, targets, epoch, index, lr, share)
                else:
                    weights = self._step_stacked(stack, images, targets, epoch, index, lr)
                images_seen += count
                batches += 1
                seconds = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix_str(self._postfix(group, epoch, images_seen / max(seconds, 1e-9)), refresh=False)
                if self.on_step is not None:
                    self.on_step({"epoch": epoch, "batch": index, "step": group[0].step})
        finally:
            if stack is not None:
                stack.write_back()
        for m in group:
            if m.replica is not None:
                distributed.sync_buffers(m.model)
        train_seconds = time.perf_counter() - started
        metrics = _evaluate_members([(m.model, m.tasks) for m in group], val, self.batch_size,
                                    self.device, self.channels_last, self.precision) if val is not None else None
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
            if m.variant is not None:
                entry["regulariser"] = m.epoch_regulariser / max(batches, 1)
            m.history.append(entry)
            score = self._track_best(m, metrics[i], epoch) if metrics is not None else None
            self._save(m)
            if metrics is not None:
                for callback in self.callbacks:
                    callback({"epoch": epoch + 1, "val": metrics[i], "score": score, "history": m.history})
        bar.set_postfix_str(self._postfix(group, epoch, images_seen / max(train_seconds, 1e-9)), refresh=True)

    def _track_best(self, m: _Member, metrics: dict[str, dict[str, float]], epoch: int) -> float:
        if m.reference is None:
            m.reference = metrics
        score = _score(m.tasks, metrics, m.reference)
        if _better(score, m.best["score"] if m.best else None):
            keep = self.cfg.patience > 0 or self.keep_best  # the weights are needed only to restore them
            m.best = {"epoch": epoch + 1, "score": score, "val": metrics,
                      "state": _state_to_cpu(m.model.state_dict()) if keep else None}
            m.bad_epochs = 0
        else:
            m.bad_epochs += 1
        if self.cfg.patience > 0 and m.bad_epochs >= self.cfg.patience and m.epoch < self.cfg.epochs:
            # This model is done: it keeps its best weights while the others go on.
            m.stopped = True
            m.restore_best()
        return score

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
        values = torch.stack([v.detach().float() for _, _, v in flat])  # one sync per step
        if self.world > 1:
            # Each process's losses are weighted by its share of the batch (share_batch), so
            # their mean over the processes is the whole batch's; every process sees the same
            # values and stops together on a NaN.
            values = distributed.all_reduce_sum(values) / self.world
        values = values.tolist()
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
                     epoch: int, index: int, lr: float, share: float = 1.0) -> dict[str, dict[str, float]]:
        all_losses, weights = [], {}
        for m in group:
            with m.rng():
                m.optimizer.zero_grad(set_to_none=True)
                for opt in m.owned:
                    opt.zero_grad(set_to_none=True)
                features = None
                with _autocast(self.device, self.precision):
                    if self.objective is not None and self.objective.wants_features:
                        outputs, features = m.forward(images, features=True)
                    else:
                        outputs = m.forward(images)
                outputs = _float_outputs(outputs)  # losses (and distillation) in fp32
                losses = m.losses(outputs, targets)
                if self.objective is not None:
                    losses = self.objective(images, outputs, losses, targets, features)
                if share != 1.0:  # an uneven share of the last batch (see share_batch)
                    losses = {name: loss * share for name, loss in losses.items()}
                if m.variant is not None:  # the variant's backward (by default the weighting's)
                    progress = m.step / max(self.total_steps, 1)
                    weights[m.name] = m.variant.backward(m.model, losses, m.weighting, m.shared, progress)
                else:
                    weights[m.name] = m.weighting.backward(losses, m.shared)
                if m.variant is not None:
                    regulariser = m.variant.regulariser(m.model)
                    if regulariser is not None:
                        if regulariser.requires_grad and m.replica is not None:
                            _add_gradient(regulariser, m.params + [p for opt in m.owned for g in opt.param_groups
                                                                    for p in g["params"]])
                        elif regulariser.requires_grad:
                            regulariser.backward()
                        m.epoch_regulariser += float(regulariser.detach())
            all_losses.append(losses)
        self._check_finite(group, all_losses, epoch, index)
        for m in group:
            factor = lr_factor(m.step, self.total_steps, self.warmup_steps, self.cfg.schedule)
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(m.params, self.cfg.grad_clip)
            for g in m.optimizer.param_groups:
                g["lr"] = lr
            m.optimizer.step()
            for opt in m.owned:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
                opt.step()
            m.step += 1
        return weights

    def _step_stacked(self, stack: _Stack, images: Tensor, targets: dict[str, Tensor],
                      epoch: int, index: int, lr: float) -> dict[str, dict[str, float]]:
        group = stack.members
        stack.optimizer.zero_grad(set_to_none=True)  # holds every head's parameters too
        with _autocast(self.device, self.precision):
            features = stack.forward(images)
        # Cut the graph at the encoder output: each weighting backpropagates its own losses
        # into its head and its slice of the features, then one backward pass runs through
        # the stacked encoders with every slice's gradient at once.
        cuts = [features[i].detach().requires_grad_() for i in range(len(group))]
        all_losses, weights = [], {}
        for m, cut in zip(group, cuts, strict=True):
            with m.rng():
                with _autocast(self.device, self.precision):
                    output = m.model.head(cut)
                losses = m.losses(_float_outputs({m.model.task: output}), targets)
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


def _add_gradient(term: Tensor, params: Sequence[Tensor]) -> None:
    """Add ``term``'s gradient to the ``.grad`` of ``params`` without a second backward pass.

    Under DDP a forward pass allows one backward pass. A variant's regulariser depends on the
    parameters alone, so its gradient is the same on every process and needs no averaging.
    """
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(term, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def _first_difference(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    return f"{path or 'config'} was {old!r}, now {new!r}"
