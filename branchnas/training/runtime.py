"""Where and how training runs: device choice, precision, seeds and feeding batches.

Everything here is about the runtime rather than the maths of a run: which device a spec
names, its numeric precision (fp32, or bf16 autocast on CPU and CUDA alike), channels-last
inputs, the kernel settings of a fit (deterministic on CPU, cuDNN benchmark on CUDA) and the
seeds derived from the recipe's one.

Precision: ``bf16`` runs the forward passes under ``torch.autocast(device, bfloat16)`` (convs
and matmuls in bf16, the weights, optimizer state and gradients stay fp32), and the model
outputs are cast back to fp32 before any loss or metric sees them. ``auto`` is bf16 where the
hardware does bf16 natively (:func:`bf16_supported`), else fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from branchnas.errors import UserError

__all__ = ["PRECISIONS", "bf16_supported", "derive_seed", "resolve_device", "resolve_precision"]

#: The values of ``pretrain.precision`` and ``finetune.precision``.
PRECISIONS = ("fp32", "bf16", "auto")


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


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` does bf16 arithmetic in hardware (not emulated in fp32 units).

    CUDA: :func:`torch.cuda.is_bf16_supported` without emulation (Ampere and later). CPU:
    AVX-512 BF16 or AMX-BF16 (x86), or the BF16 extension (ARM), *and* oneDNN's bf16 kernels
    usable. ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` alone is not enough: it is true on
    any AVX-512 CPU, where oneDNN emulates bf16 more slowly than fp32.
    """
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(device):
            try:
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # torch < 2.3 has no including_emulation (and no emulation)
                return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    return _cpu_bf16_native() and _mkldnn_bf16()


def _cpu_bf16_native() -> bool:
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:  # torch >= 2.9
        caps = capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("bf16"))
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _mkldnn_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device, section: str = "precision") -> str:
    """``fp32`` or ``bf16``: what a run on ``device`` computes in for the recipe's ``precision``.

    ``auto`` is bf16 where :func:`bf16_supported`, else fp32.

    Raises:
        UserError: an unknown value, or ``bf16`` where the hardware has no native bf16.
    """
    if precision not in PRECISIONS:
        raise UserError(f"{section}: expected one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp32":
        return "fp32"
    supported = bf16_supported(device)
    if precision == "auto":
        return "bf16" if supported else "fp32"
    if not supported:
        what = "this CPU has neither AVX-512 BF16 nor AMX" if device.type == "cpu" else f"{device} has no native bf16"
        raise UserError(f"{section}: 'bf16' asked for, but {what}; use auto (bf16 where supported) or fp32")
    return "bf16"


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for a resolved ``precision`` of ``bf16``; nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _float_outputs(outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The outputs in fp32 for the losses and metrics (a no-op, the same tensors, when they are)."""
    return {name: value.float() for name, value in outputs.items()}


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
