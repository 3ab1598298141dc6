"""Checks that several stages share: the data layout, the device and its precision, optional packages.

Each raises a one-line :class:`~branchnas.errors.UserError` naming the problem and the fix,
and writes nothing. The data is opened once per recipe and check pass (:func:`splits_of`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from typing import Any

from branchnas.errors import UserError

__all__ = ["splits_of", "clear_cache", "check_device", "check_log", "check_package", "check_precision",
           "check_processes"]

_CACHE: dict[str, Any] = {}


def splits_of(recipe: Any) -> tuple[dict[str, Any], list[Any]]:
    """``load_splits(recipe)``, cached by the recipe's data, tasks and seed.

    Opening the data is what checks its layout (a missing root, a bad file, an unknown
    target); generated datasets are built in a second or so, on-disk ones only indexed.
    """
    from branchnas.data import load_splits
    from branchnas.rundir import fingerprint

    key = fingerprint(dataclasses.asdict(recipe.data), [dataclasses.asdict(t) for t in recipe.tasks], recipe.seed)
    if key not in _CACHE:
        _CACHE.clear()  # one recipe at a time: keep memory bounded
        _CACHE[key] = load_splits(recipe)
    return _CACHE[key]


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(value: str, key: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where torch sees a GPU."""
    if not _DEVICE.match(value):
        raise UserError(f"{key}: expected auto, cpu, cuda or cuda:N; got {value!r}")
    if value.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= count:
            raise UserError(f"{key}: {value!r} asked for, but torch sees {count} CUDA device(s); "
                            "use auto or cpu")


def check_precision(precision: str, device: str, key: str) -> None:
    """``precision = "bf16"`` only where ``device`` (a checked spec) does bf16 in hardware."""
    if precision != "bf16":
        return  # fp32 runs anywhere; auto falls back to fp32
    from branchnas.training.runtime import resolve_device, resolve_precision

    resolve_precision(precision, resolve_device(device), key)


def check_processes(recipe: Any, section: str, ddp: bool = True) -> None:
    """Under torchrun (several processes): refuse what they cannot run; nothing in one process.

    Args:
        recipe: The resolved recipe.
        section: ``pretrain`` or ``finetune``.
        ddp: Whether the models train under DDP (else each process trains models of its own).
    """
    from branchnas.training import distributed

    processes = distributed.world_size()
    if processes == 1:
        return
    cfg = getattr(recipe, section)
    if ":" in cfg.device:
        raise UserError(f"{section}.device: {cfg.device!r} names one GPU, but under torchrun each of the "
                        f"{processes} processes takes the GPU of its LOCAL_RANK; use auto or cuda")
    if not ddp:
        return
    if cfg.sync_bn and (cfg.device == "cpu" or not _cuda()):
        raise UserError(f"{section}.sync_bn: torch's SyncBatchNorm runs on GPUs only; "
                        f"set {section}.sync_bn = false to train on the CPU")
    distributed.check_batches(recipe.data.batch_size, len(splits_of(recipe)[0]["train"]))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_package(module: str, what: str, install: str) -> None:
    """``module`` is importable, else say what needs it and what to install."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the '{module}' package, which is not installed; {install}")


def check_log(log: str, key: str) -> None:
    """``log = "tensorboard"`` needs the tensorboard package."""
    if log == "tensorboard":
        check_package("tensorboard", f"{key} = 'tensorboard'",
                      "pip install 'branchnas[tensorboard]', or set it to 'csv'")


def clear_cache() -> None:
    """Forget the opened data (the pipeline calls it when a command ends)."""
    _CACHE.clear()
