"""Where and how training runs: device choice, precision, seeds and feeding batches.

Everything here is about the runtime rather than the maths of a run: which device a spec
names, bf16 autocast on CUDA, channels-last inputs, the kernel settings of a fit
(deterministic on CPU, cuDNN benchmark on CUDA) and the seeds derived from the recipe's one.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from branchnas.errors import UserError

__all__ = ["derive_seed", "resolve_device"]


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


@contextlib.contextmanager
def _kernel_settings(device: torch.device) -> Iterator[None]:
    """Run a fit with its kernel settings, then put the caller's back (even on an error)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    deterministic_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cpu":
        # CPU kernels are deterministic at almost no cost; this catches any that are not.
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=deterministic_warn)
        torch.backends.cudnn.benchmark = cudnn_benchmark
