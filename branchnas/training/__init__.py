"""Training and evaluation: the one trainer, several models side by side, metrics, runtime.

:class:`Trainer` trains either one model on its tasks (multi-task fine-tuning) or several
independent single-task models *together* (stage 1), and :func:`evaluate` measures a model.
A model maps an image batch to ``{task name: output}`` (see ``docs/internals.md``).

Modules, one concern each:

* :mod:`~branchnas.training.loop`: :class:`Trainer`, the fit loop (schedule, NaN detection,
  best epoch and early stopping, per-epoch checkpoints and exact resume);
* :mod:`~branchnas.training.member`: one model's own training state and its checkpoint;
* :mod:`~branchnas.training.concurrent`: :class:`SingleTaskModel` and several models on
  shared batches, one after another or with their encoders stacked (``CONCURRENT_MODES``);
* :mod:`~branchnas.training.optim`: the optimizer, :func:`lr_factor` and gradient clipping;
* :mod:`~branchnas.training.evaluation`: :func:`evaluate` and :func:`evaluate_models`;
* :mod:`~branchnas.training.runtime`: :func:`resolve_device`, autocast, channels-last,
  kernel settings and :func:`derive_seed`;
* :mod:`~branchnas.training.distributed`: several processes under torchrun (DDP, rank 0,
  the shares of each batch).

Example:
    >>> trainer = Trainer(model, tasks, recipe.finetune, batch_size=64, seed=0,
    ...                   checkpoint="runs/x/finetune/ckpt")        # doctest: +SKIP
    >>> result = trainer.fit(splits["train"], splits["val"])          # doctest: +SKIP
    >>> evaluate(model, tasks, splits["test"], 64)                    # doctest: +SKIP
    {'shape': {'accuracy': 0.93}}
"""

from branchnas.training.concurrent import CONCURRENT_MODES, SingleTaskModel
from branchnas.training.evaluation import evaluate, evaluate_models
from branchnas.training.loop import Trainer
from branchnas.training.optim import lr_factor
from branchnas.training.runtime import derive_seed, resolve_device

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
