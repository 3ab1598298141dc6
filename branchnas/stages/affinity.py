"""Stage 2, ``affinity``: the task-affinity tensor of the pretrained single-task models.

Picks K held-out images (:func:`choose_images`), extracts every task's RDMs at each branch
point (:func:`branchnas.affinity.extract_rdms`, one checkpoint per task in ``rdms/`` so that a
killed run resumes), scores them (:func:`branchnas.affinity.rsa_affinity`, with optional
bootstrap intervals) and writes, in ``affinity/``: ``affinity.npz`` (``affinity`` D x N x N,
``tasks``, ``points``, ``images`` = K, ``indices``; with a bootstrap also ``mean``, ``low``,
``high``, ``level``), ``affinity.json``, one heatmap per branch point and ``depth.png``.
:func:`read_affinity` reads the tensor back.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from branchnas.errors import DataError, UserError
from branchnas.stages._base import Artifact, Stage, StageContext, get_stage, register_stage

__all__ = ["AffinityStage", "LEVEL", "choose_images", "read_affinity", "read_affinity_file", "heatmap_name"]

log = logging.getLogger(__name__)

#: Coverage of the stage's bootstrap intervals.
LEVEL = 0.95


@register_stage
class AffinityStage(Stage):
    name = "affinity"
    summary = "Stage 2: RSA task affinity at every branch point."
    requires = ("pretrain",)
    artifacts = (
        Artifact("affinity.npz", "affinity D x N x N, tasks, points, K, image indices (and bootstrap intervals)"),
        Artifact("affinity.json", "the same as JSON"),
        Artifact("heatmap_*.png", "one task-affinity heatmap per branch point"),
        Artifact("depth.png", "affinity of every task pair against depth"),
    )

    def config(self, recipe: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        """What the affinity depends on besides pretrain's fingerprint (not the batch size: speed only)."""
        data = dataclasses.asdict(recipe.data)
        for key in ("batch_size", "augment"):  # neither changes which images are read, or how
            data.pop(key, None)
        return {
            "images": recipe.affinity.images,
            "split": recipe.affinity.split,
            "bootstrap": recipe.affinity.bootstrap,
            "seed": recipe.seed,
            "data": data,
            "tasks": [task.name for task in recipe.tasks],
        }

    def check(self, recipe: Any, options: Mapping[str, Any]) -> None:
        from branchnas.stages._checks import check_device, splits_of

        check_device(recipe.pretrain.device, "pretrain.device")
        splits, _ = splits_of(recipe)
        available = len(splits[recipe.affinity.split])
        _check_count(available, recipe.affinity.images, recipe.affinity.split)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from branchnas.affinity.extract import DEFAULT_MAX_MEMORY

        max_memory = int(ctx.options.get("max_memory", DEFAULT_MAX_MEMORY))
        return compute_affinity(ctx.recipe, ctx.rundir, ctx.folder, max_memory, ctx.progress)


def _check_count(available: int, num_images: int, split: str) -> None:
    if num_images > available:
        raise UserError(
            f"affinity.images: expected at most {available} (the '{split}' split has {available} "
            f"images); got {num_images}; lower affinity.images or use a larger split"
        )


def choose_images(available: int, num_images: int, seed: int, split: str = "val") -> list[int]:
    """K distinct image indices out of ``available``, seeded, in increasing order."""
    _check_count(available, num_images, split)
    import torch

    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(available, generator=generator)[:num_images].tolist())



def compute_affinity(recipe: Any, rundir: Any, folder: Path, max_memory: int, progress: bool) -> dict[str, Any]:
    """Extract every task's RDMs at the branch points, score them and write ``folder``'s artifacts."""
    import numpy as np
    import torch

    from branchnas.affinity.extract import _point_names, extract_rdms
    from branchnas.affinity.functional import bootstrap_affinity, rsa_affinity
    from branchnas.affinity.present import format_affinity, plot_depth, plot_heatmap
    from branchnas.rundir import atomic_savefig, atomic_savez, atomic_torch_save, atomic_write_json
    from branchnas.stages._checks import splits_of
    from branchnas.stages.pretrain import load_single_task
    from branchnas.training import derive_seed, resolve_device

    cfg = recipe.affinity
    splits, tasks = splits_of(recipe)
    dataset = splits[cfg.split]
    indices = choose_images(len(dataset), cfg.images, derive_seed(recipe.seed, "affinity", "images"), cfg.split)
    device = resolve_device(recipe.pretrain.device, "pretrain.device")
    names = [task.name for task in tasks]

    def fetch(positions: list[int]) -> Any:
        return dataset.get_batch([indices[p] for p in positions], augment=False)[0]

    checkpoints = folder / "rdms"
    per_task, points = [], None
    for name in names:
        path = checkpoints / f"{name}.pt"
        backbone, _ = load_single_task(recipe, rundir, name)
        points = _point_names(backbone)
        if path.exists():  # a killed run resumes: same fingerprint, same images, same models
            per_task.append(torch.load(path, map_location="cpu", weights_only=True))
            continue
        task_rdms = extract_rdms([backbone], fetch, cfg.images, cfg.batch_size, device,
                                 max_memory=max_memory, names=[name], progress=progress)[0]
        atomic_torch_save(task_rdms, path)
        per_task.append(task_rdms)
        del backbone
    assert points is not None  # load_splits guarantees at least one task
    rdms = torch.stack(per_task)
    affinity = rsa_affinity(rdms)
    undefined = torch.isnan(affinity).nonzero()
    if len(undefined):
        d, i, j = (int(v) for v in undefined[0])
        flat = names[i] if torch.isnan(affinity[d, i]).sum() >= len(names) - 1 else names[j]
        raise DataError(
            f"affinity: task '{flat}' has the same dissimilarity for every image pair at branch point "
            f"'{points[d]}', so its rank correlation is undefined; check its pretrain checkpoint"
        )
    arrays: dict[str, Any] = {
        "affinity": affinity.numpy(),
        "tasks": np.array(names),
        "points": np.array(points),
        "images": np.array(cfg.images),
        "indices": np.array(indices),
    }
    summary: dict[str, Any] = {
        "tasks": names, "points": points, "images": cfg.images, "split": cfg.split,
        "affinity": affinity.tolist(),
    }
    low = high = None
    if cfg.bootstrap:
        seed = derive_seed(recipe.seed, "affinity", "bootstrap")
        mean, low, high = bootstrap_affinity(rdms, cfg.bootstrap, seed, LEVEL)
        arrays.update(mean=mean.numpy(), low=low.numpy(), high=high.numpy(), level=np.array(LEVEL))
        summary.update(bootstrap=cfg.bootstrap, level=LEVEL, mean=mean.tolist(), low=low.tolist(),
                       high=high.tolist())
    atomic_savez(folder / "affinity.npz", **arrays)
    atomic_write_json(folder / "affinity.json", summary)
    outputs = [folder / "affinity.npz", folder / "affinity.json"]
    for d, point in enumerate(points):
        path = folder / heatmap_name(point)
        atomic_savefig(plot_heatmap(affinity[d], names, point,
                                    None if low is None else low[d], None if high is None else high[d]), path)
        outputs.append(path)
    path = folder / "depth.png"
    atomic_savefig(plot_depth(affinity, names, points, low, high), path)
    outputs.append(path)
    log.info("affinity:\n%s", format_affinity(affinity, names, points, low, high))
    return {"outputs": [p.relative_to(folder) for p in outputs], "tasks": names, "points": points,
            "images": cfg.images, "bootstrap": cfg.bootstrap}



def heatmap_name(point: str) -> str:
    """The heatmap file of branch point ``point``."""
    return f"heatmap_{_slug(point)}.png"


def read_affinity(rundir: Any) -> dict[str, Any]:
    """Read ``affinity/affinity.npz``.

    Returns:
        ``{"affinity": (D, N, N) array, "tasks": [...], "points": [...], "images": K,
        "low": ..., "high": ...}``; ``low`` and ``high`` are ``None`` without a bootstrap.

    Raises:
        UserError: the affinity stage has not written its file yet, or it is damaged.
    """
    path = get_stage("affinity").path(rundir, "affinity.npz")
    if not path.exists():
        raise UserError(f"no affinity in {path.parent}; run `branchnas affinity` first")
    return _read_npz(path, f"run `branchnas affinity --force` to rebuild {path}")


def read_affinity_file(path: str | Path) -> dict[str, Any]:
    """Read an affinity ``.npz`` given by the user (``branchnas search --affinity FILE``).

    Raises:
        UserError: the file is missing, damaged, or lacks the ``affinity`` or ``tasks`` array.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--affinity: no file {str(path)!r}; give an affinity .npz written by `branchnas affinity`")
    return _read_npz(path, "give an affinity .npz written by `branchnas affinity`", where=f"--affinity {path}")


def _read_npz(path: Path, fix: str, where: str | None = None) -> dict[str, Any]:
    import zipfile

    import numpy as np

    where = where or str(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("affinity", "tasks") if key not in data]
            if missing:
                raise UserError(
                    f"{where}: missing array(s) {', '.join(missing)}; expected 'affinity' (D x N x N), "
                    "'tasks' and optionally 'points', as `branchnas affinity` writes them"
                )
            return {
                "affinity": np.asarray(data["affinity"], dtype=np.float64),
                "tasks": [str(t) for t in data["tasks"]],
                "points": [str(p) for p in data["points"]] if "points" in data else None,
                "images": int(data["images"]) if "images" in data else None,
                "low": data["low"] if "low" in data else None,
                "high": data["high"] if "high" in data else None,
            }
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"{where}: not a readable .npz file ({type(err).__name__}: {err}); {fix}") from None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
