"""Several processes, one run: torchrun, DistributedDataParallel and rank 0.

``torchrun --nproc_per_node=K -m branchnas run`` starts K processes (see
``docs/distributed.md``). The command line calls :func:`init_from_env` once: it joins the
process group that torchrun's environment describes (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), gloo carrying CPU tensors and NCCL CUDA
ones, and gives each process the GPU of its ``LOCAL_RANK``. Without torchrun nothing here
does anything: :func:`world_size` is 1 and :func:`is_main` is true.

What the rest of branchnas asks of this module, all of it torch.distributed's own machinery:

* where this process stands: :func:`world_size`, :func:`rank`, :func:`is_main`; inside
  :func:`alone` a process works by itself (rank 0 running a stage that does not train, or a
  process training its own share of the tasks);
* rank 0's word to every process: :func:`broadcast_object`; results to rank 0:
  :func:`gather_objects`; sums that every process must agree on (training losses, metric
  counts): :func:`all_reduce_sum` and :func:`all_gather_objects`;
* each process's contiguous share of a global batch (:func:`share_batch`) and the model
  wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (:func:`replicate`), which
  averages the gradients;
* :func:`check_batches`: what cannot be split over the processes, refused before any work.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from branchnas.errors import UserError

__all__ = [
    "TIMEOUT",
    "init_from_env",
    "shutdown",
    "launched",
    "world_size",
    "rank",
    "local_rank",
    "is_main",
    "alone",
    "barrier",
    "broadcast_object",
    "gather_objects",
    "all_gather_objects",
    "all_reduce_sum",
    "share",
    "share_batch",
    "check_batches",
    "replicate",
    "sync_buffers",
]

#: How long a process waits in one collective. Rank 0 alone runs the stages that do not
#: train (affinity, search, compare, tune, export) while the others wait for its word, which
#: can take hours. A process that dies is noticed by torchrun, which stops the others, so a
#: long wait loses nothing.
TIMEOUT = datetime.timedelta(days=7)

_state = {"alone": 0}


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1) > 1
    except ValueError:
        return False


def local_rank() -> int:
    """This process's number on its machine (``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK") or 0)


def init_from_env() -> bool:
    """Join the process group that torchrun's environment describes; ``False`` when there is none.

    gloo carries CPU tensors; where CUDA is available NCCL carries CUDA ones
    (``"cpu:gloo,cuda:nccl"``) and the process takes GPU ``LOCAL_RANK``.

    Raises:
        UserError: more processes on this machine than it has GPUs.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank() >= count:
            raise UserError(
                f"torchrun started process {local_rank()} on a machine with {count} GPU(s); start at most "
                f"{count} per machine (--nproc_per_node={count}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) "
                "to train on the CPU"
            )
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=TIMEOUT)
    return True


def shutdown() -> None:
    """Leave the process group (nothing when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _grouped() -> bool:
    return _state["alone"] == 0 and dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """How many processes train together (1 without a process group, and inside :func:`alone`)."""
    return dist.get_world_size() if _grouped() else 1


def rank() -> int:
    """This process's number among them (0 without a process group, and inside :func:`alone`)."""
    return dist.get_rank() if _grouped() else 0


def is_main() -> bool:
    """Rank 0: the process that holds the run directory's lock and writes every artifact."""
    return rank() == 0


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside, this process works by itself: :func:`world_size` is 1 and no collective runs.

    For the work one process does on its own while the others wait or do theirs: rank 0
    running a stage that does not train, or a process training its share of the tasks.
    """
    _state["alone"] += 1
    try:
        yield
    finally:
        _state["alone"] -= 1


def barrier() -> None:
    """Wait until every process is here."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every process (picklable; ``obj`` itself in one process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` in rank order, on rank 0; ``None`` on the others."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` in rank order, on every process."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the processes, on every process (``tensor`` itself in one)."""
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def share(n: int) -> tuple[int, int]:
    """``(start, stop)`` of this process's contiguous share of ``n`` items, in rank order.

    The shares differ in size by at most one.

    Example:
        >>> share(64)  # one process
        (0, 64)
    """
    w, r = world_size(), rank()
    return r * n // w, (r + 1) * n // w


def share_batch(images: Tensor, targets: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], float]:
    """This process's share of a global batch, and the weight of its losses.

    A loss is a mean over the images of a share; DDP averages the processes' gradients. With
    the weight ``share size × processes / batch size`` (exactly 1 when the batch splits
    evenly) that average is the gradient of the mean over the whole batch, also for a last
    batch that does not split evenly.
    """
    n = int(images.shape[0])
    start, stop = share(n)
    weight = (stop - start) * world_size() / n
    return images[start:stop], {k: v[start:stop] for k, v in targets.items()}, weight


def check_batches(batch_size: int, num_train: int) -> None:
    """Refuse batches that cannot be split over :func:`world_size` processes (nothing in one process).

    Raises:
        UserError: ``data.batch_size`` is not a multiple of the processes, or the last batch
            of an epoch holds fewer images than there are processes.
    """
    w = world_size()
    if w == 1:
        return
    if batch_size % w:
        raise UserError(
            f"data.batch_size: {batch_size} images per batch do not split evenly over {w} processes; "
            f"set it to a multiple of {w} (it is the global batch: each process takes batch_size / {w})"
        )
    last = num_train % batch_size
    if 0 < last < w:
        raise UserError(
            f"data.num_train: the last batch of each epoch holds {last} image(s), fewer than the {w} processes; "
            f"choose data.num_train so that num_train % data.batch_size is 0 or at least {w}"
        )


class _Replica(nn.Module):
    """What DDP wraps: the model, the loss weighting's learnable parameters (so that DDP
    averages their gradients too) and the forward a training step needs."""

    def __init__(self, model: nn.Module, extra: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.model = model
        self.extra = nn.ParameterList(extra)

    def forward(self, images: Tensor, features: bool = False) -> Any:
        return self.model.forward_features(images) if features else self.model(images)


def replicate(model: nn.Module, extra: Sequence[Tensor], device: torch.device,
              sync_bn: bool = False) -> nn.parallel.DistributedDataParallel:
    """``model`` (and the learnable parameters ``extra`` of its loss weighting) under DDP.

    Call it in the same order on every process. DDP copies rank 0's weights and buffers to
    every process, averages the gradients in the backward pass and, in each forward pass,
    copies rank 0's buffers (BatchNorm's running statistics) to the others. Call the result
    as ``replica(images)``, or ``replica(images, features=True)`` for
    ``model.forward_features(images)``.

    The graph is static (``static_graph=True``): every step runs the same forward, so DDP
    learns in the first step which parameters get no gradient (the gated network's empty
    mixing weights) and which get theirs outside the model's forward (the loss weighting's).

    Args:
        model: The model, on ``device``.
        extra: The loss weighting's learnable parameters (``nn.Parameter``).
        device: This process's device.
        sync_bn: Turn the model's BatchNorm layers into :class:`~torch.nn.SyncBatchNorm`
            (in place): batch statistics over the whole global batch. CUDA only.
    """
    loose = [p for p in extra if not isinstance(p, nn.Parameter)]
    if loose:
        raise TypeError("replicate: a loss weighting's learnable tensors must be nn.Parameter for DDP to average them")
    if sync_bn:
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BatchNorm children in place
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(_Replica(model, list(extra)), device_ids=ids, static_graph=True)


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers to every process (nothing in one process).

    After a training step each process holds the BatchNorm running statistics of its own
    share of the batch (DDP copies rank 0's only at the next forward pass); with this, what
    is validated and saved is rank 0's model everywhere.
    """
    if world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
