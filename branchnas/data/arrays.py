"""``arrays``: your own data, from a ``.npz`` file or a folder of images plus a CSV.

The recipe's ``[[tasks]]`` declare each target's kind (and classes); ``data.root`` names
the data. Two layouts (the full guide with a worked example is ``docs/custom-data.md``):

* ``data.root = "mydata.npz"``: an array ``images`` ``(N, H, W, C)`` or ``(N, H, W)`` of
  uint8, and one array per target, first axis N. Everything is loaded into memory and
  checked at once.
* ``data.root = "mydata/"``: ``mydata/labels.csv`` with a ``file`` column and one column
  per scalar target, images under ``mydata/images/``, and for each dense target a folder
  ``mydata/<target>/`` holding a file with the image's name (``.png`` or ``.npy``).
  Images are read per batch; each sample is checked when it is read.

An optional ``split`` column (CSV) or array (``.npz``) of ``train``/``val``/``test`` fixes
the splits; otherwise they are drawn at random with the recipe seed.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from branchnas.data._base import (
    IGNORE_LABEL,
    SPLITS,
    DatasetFamily,
    LoadRequest,
    MultiTaskDataset,
    TargetSpec,
    option,
)
from branchnas.data.io import read_image, read_npy
from branchnas.data.splits import seeded_rng, split_pool, take
from branchnas.data.storage import LazyDataset, TensorDataset, per_sample_reader
from branchnas.data.targets import check_values, standardise, unit_normals
from branchnas.data.transforms import channel_stats
from branchnas.errors import DataError, RecipeError
from branchnas.recipe import TaskConfig

__all__ = ["ArraysFamily", "ArraysOptions"]

_SPLIT_CODES = {"train": "train", "val": "val", "test": "test", "0": "train", "1": "val", "2": "test",
                "valid": "val", "validation": "val"}


@dataclass
class ArraysOptions:
    """``[data] options`` of the arrays dataset."""

    images: str = option("images", "folder layout: the subfolder of data.root that holds the images")
    labels: str = option("labels.csv", "folder layout: the CSV file in data.root, one row per image")
    file_column: str = option("file", "folder layout: the CSV column with each image's file name")
    split_column: str = option("split", "CSV column or .npz array of train/val/test; random splits when absent")
    channels: int = option(3, "folder layout: read images as RGB (3) or greyscale (1)", choices=(1, 3))
    flip: bool = option(True, "horizontal flips keep every target valid (false when a target depends on left/right)")
    depth_scale: float = option(1.0, "folder layout: 16-bit PNG depth is divided by this (1000 for millimetres)", min=1e-12)
    mean: list[float] = option([], "per-channel image mean on the 0..1 scale; [] = measured on the training images")
    std: list[float] = option([], "per-channel image std on the 0..1 scale; [] = measured on the training images")


class ArraysFamily(DatasetFamily):
    """Your own images and labels (see the module docstring and docs/custom-data.md)."""

    name = "arrays"
    summary = "your own data: a .npz of arrays, or a folder of images plus labels.csv"
    Options = ArraysOptions
    needs_root = True
    layout = "a .npz file (images + one array per target) or a folder with labels.csv and images/"

    def check_options(self, options: ArraysOptions) -> None:
        for key in ("mean", "std"):
            value = getattr(options, key)
            if value and len(value) not in (1, 3):
                raise RecipeError(f"data.options.{key}: expected [] or one value per channel; got {value}")
        if any(s <= 0 for s in options.std):
            raise RecipeError(f"data.options.std: expected positive values; got {options.std}")

    def targets(self, options: Any = None) -> dict[str, TargetSpec]:
        """None of its own: the recipe's ``[[tasks]]`` declare them."""
        return {}

    def default_tasks(self, options: Any = None) -> list[TaskConfig]:
        return []

    def resolve_targets(self, options: Any, tasks: Any) -> dict[str, TargetSpec]:
        """One target per distinct ``target`` of the tasks, with the kind the tasks declare."""
        specs: dict[str, TargetSpec] = {}
        for i, task in enumerate(tasks):
            target = task.target or task.name
            spec = TargetSpec(target, task.kind, task.num_classes, 3 if task.kind == "normals" else 1)
            old = specs.get(target)
            if old is not None:
                if old.kind != spec.kind:
                    raise RecipeError(
                        f"tasks[{i}].kind: target '{target}' is {old.kind} in another task; one target has one kind"
                    )
                if old.num_classes and spec.num_classes and old.num_classes != spec.num_classes:
                    raise RecipeError(
                        f"tasks[{i}].num_classes: target '{target}' has {old.num_classes} classes in another task; "
                        f"got {spec.num_classes}"
                    )
                spec = replace(spec, num_classes=old.num_classes or spec.num_classes)
            specs[target] = spec
        return specs

    def load(self, request: LoadRequest) -> dict[str, MultiTaskDataset]:
        if not request.root:
            raise DataError(
                f"data.root: the arrays dataset reads your data; set data.root to {self.layout} "
                "(see docs/custom-data.md)"
            )
        path = Path(request.root).expanduser()
        if path.is_dir():
            return _load_folder(path, request)
        if path.is_file():
            return _load_npz(path, request)
        raise DataError(f"data.root: {path} does not exist; expected {self.layout} (see docs/custom-data.md)")


# --------------------------------------------------------------------------- shared


def _infer_classes(specs: dict[str, TargetSpec], values: dict[str, np.ndarray]) -> dict[str, TargetSpec]:
    """Fill in what the tasks left open: classes (largest label + 1) and regression width."""
    out = {}
    for name, spec in specs.items():
        value = values.get(name)
        if spec.kind in ("classification", "segmentation") and spec.num_classes == 0 and value is not None:
            labels = value[value != IGNORE_LABEL] if spec.kind == "segmentation" else value
            top = int(np.nanmax(labels)) if labels.size and np.isfinite(labels).all() else 0
            spec = replace(spec, num_classes=max(top + 1, 1))
        if spec.kind == "regression" and value is not None:
            spec = replace(spec, channels=int(value.shape[1]))
        out[name] = spec
    return out


def _as_dtype(spec: TargetSpec, value: np.ndarray) -> np.ndarray:
    """Checked raw values -> the storage dtype of their kind."""
    if spec.kind == "normals":
        return unit_normals(value)
    if spec.kind == "classification" or (spec.kind == "segmentation" and not np.issubdtype(value.dtype, np.integer)):
        return value.astype(np.int64)
    if spec.kind == "segmentation":
        return value  # stored compactly later; an int64 copy of every map would be 8x the memory
    return value.astype(np.float32)


def _pools(
    split_values: np.ndarray | None, n: int, sizes: dict[str, int], seed: int, where: str, describe: Any
) -> dict[str, np.ndarray]:
    """Sample indices per split: from the split column/array when given, else at random."""
    rng = seeded_rng(seed, "arrays", "split")
    if split_values is None:
        return split_pool(np.arange(n), sizes, rng, where)
    codes = np.array([_SPLIT_CODES.get(str(v).strip().lower(), "") for v in split_values.tolist()])
    bad = np.flatnonzero(codes == "")
    if bad.size:
        raise DataError(f"{describe(int(bad[0]))}: split is {str(split_values[bad[0]])!r}; expected train, val or test")
    pools = {split: np.flatnonzero(codes == split) for split in SPLITS}
    for split in ("train", "test"):
        if not pools[split].size:
            raise DataError(
                f"{where}: the split column assigns no sample to '{split}'; give it some samples, "
                "or remove the column to split at random"
            )
    out = {}
    if not pools["val"].size:  # no val samples marked: carve val out of train, as for the benchmarks
        carved = split_pool(pools["train"], {"train": 0, "val": sizes["val"]}, rng,
                            f"the train part of {where}", splits=("train", "val"))
        pools["train"], out["val"] = carved["train"], np.sort(carved["val"])
    for split in SPLITS:
        if split not in out:
            out[split] = np.sort(take(pools[split], sizes[split], rng, f"num_{split}", f"the {split} part of {where}"))
    return {split: out[split] for split in SPLITS}


def _stats(options: ArraysOptions, measured: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The options' mean and std where given, else measured on the training images."""
    if options.mean and options.std:
        return tuple(options.mean), tuple(options.std)
    mean, std = measured()
    return tuple(options.mean) or mean, tuple(options.std) or std


def _fit_channels(values: tuple[float, ...], channels: int, key: str) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise RecipeError(f"data.options.{key}: the images have {channels} channel(s); got {len(values)} values")


# --------------------------------------------------------------------------- .npz


def _load_npz(path: Path, request: LoadRequest) -> dict[str, MultiTaskDataset]:
    where = path.name
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"data.root: cannot read {path} as a .npz file ({err}); see docs/custom-data.md") from None
    if not hasattr(archive, "files"):
        raise DataError(f"data.root: {path} holds a single array; expected a .npz with 'images' and one array per target")
    with archive:
        names = list(archive.files)
        if "images" not in names:
            raise DataError(
                f"{where}: no array 'images'; expected images (N, H, W, C) uint8 plus one array per target "
                f"(arrays in the file: {', '.join(names) or 'none'})"
            )
        images = archive["images"]
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[3] not in (1, 3):
            raise DataError(f"{where}: 'images' has shape {images.shape}; expected (N, H, W, C) with C = 1 or 3")
        if images.dtype != np.uint8:
            raise DataError(
                f"{where}: 'images' holds {images.dtype}; expected uint8 0..255 "
                "(convert with (x * 255).round().astype(np.uint8))"
            )
        n, hw = len(images), images.shape[1:3]
        raw = {}
        for name, spec in request.targets.items():
            if name not in names:
                raise DataError(
                    f"{where}: no array '{name}' for the {spec.kind} task that uses it "
                    f"(arrays in the file: {', '.join(names)})"
                )
            raw[name] = standardise(spec, archive[name], hw, where)
            if len(raw[name]) != n:
                raise DataError(f"{where}: '{name}' has {len(raw[name])} entries but 'images' has {n}")
        split_key = request.options.split_column
        split_values = archive[split_key] if split_key and split_key in names else None
    if split_values is not None and len(split_values) != n:
        raise DataError(f"{where}: '{split_key}' has {len(split_values)} entries but 'images' has {n}")

    def describe(i: int) -> str:
        return f"{where} sample {i}"

    specs = _infer_classes(request.targets, raw)
    for name, spec in specs.items():
        check_values(spec, raw[name], describe)
    values = {name: _as_dtype(specs[name], raw[name]) for name in specs}
    pools = _pools(split_values, n, request.sizes, request.seed, where, describe)
    images = images.transpose(0, 3, 1, 2)
    channels = images.shape[1]
    mean, std = _stats(request.options, lambda: channel_stats(images[pools["train"]]))
    mean, std = _fit_channels(mean, channels, "mean"), _fit_channels(std, channels, "std")
    return {
        split: TensorDataset(
            images[idx], {k: v[idx] for k, v in values.items()}, specs,
            mean=mean, std=std, can_flip=request.options.flip, name=f"arrays/{split}",
        )
        for split, idx in pools.items()
    }


# --------------------------------------------------------------------------- folder + CSV


def _load_folder(root: Path, request: LoadRequest) -> dict[str, MultiTaskDataset]:
    opts: ArraysOptions = request.options
    csv_path = root / opts.labels
    image_dir = root / opts.images
    layout = f"{opts.labels} with a '{opts.file_column}' column, and {opts.images}/ with the images"
    if not csv_path.is_file():
        raise DataError(f"data.root: expected {opts.labels} in {root} ({layout}); see docs/custom-data.md")
    if not image_dir.is_dir():
        raise DataError(f"data.root: expected the folder {opts.images}/ in {root} ({layout}); see docs/custom-data.md")
    header, rows = _read_csv(csv_path)
    if opts.file_column not in header:
        raise DataError(
            f"{csv_path.name}: no column '{opts.file_column}' naming the image files "
            f"(columns: {', '.join(header)}); set data.options.file_column"
        )
    files = [row[opts.file_column].strip() for row in rows]

    def describe_row(i: int) -> str:
        return f"{csv_path.name} line {i + 2} ({files[i] or 'no file'})"

    empty = [i for i, f in enumerate(files) if not f]
    if empty:
        raise DataError(f"{describe_row(empty[0])}: the '{opts.file_column}' cell is empty")

    specs = dict(request.targets)
    scalars: dict[str, np.ndarray] = {}
    dense_files: dict[str, list[Path]] = {}
    for name, spec in specs.items():
        if spec.dense:
            if spec.kind == "segmentation" and not spec.num_classes:
                raise RecipeError(
                    f"tasks: the segmentation target '{name}' is read from files; give its task num_classes"
                )
            dense_files[name] = _dense_files(root, name, spec, files)
        else:
            scalars[name], specs[name] = _scalar_column(spec, header, rows, describe_row, csv_path.name)
    specs = _infer_classes(specs, scalars)
    for name, value in scalars.items():
        check_values(specs[name], value, describe_row)
        scalars[name] = _as_dtype(specs[name], value)

    split_values = None
    if opts.split_column and opts.split_column in header:
        split_values = np.array([row[opts.split_column] for row in rows], dtype=object)
    pools = _pools(split_values, len(files), request.sizes, request.seed, csv_path.name, describe_row)
    mode = "RGB" if opts.channels == 3 else "L"
    first = read_image(image_dir / files[int(pools["train"][0])], describe_row(int(pools["train"][0])), mode)
    native = (first.shape[0], first.shape[1])
    mean, std = _stats(opts, lambda: _folder_stats(image_dir, files, pools["train"], mode, describe_row))
    mean, std = _fit_channels(mean, opts.channels, "mean"), _fit_channels(std, opts.channels, "std")

    def reader_for(split: str, idx: np.ndarray) -> Any:
        def describe(i: int) -> str:
            return f"arrays/{split} sample {i} ({opts.images}/{files[idx[i]]})"

        def read(i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            src = int(idx[i])
            image = read_image(image_dir / files[src], describe(i), mode)
            raw = {name: value[src] for name, value in scalars.items()}
            for name, paths in dense_files.items():
                raw[name] = _read_dense(specs[name], paths[src], describe(i), opts.depth_scale)
            return image, raw

        return per_sample_reader(read, specs, native_size=native, in_channels=opts.channels,
                                 describe=describe, uniform=False)

    return {
        split: LazyDataset(len(idx), reader_for(split, idx), specs, native_size=native, in_channels=opts.channels,
                           mean=mean, std=std, can_flip=opts.flip, name=f"arrays/{split}")
        for split, idx in pools.items()
    }


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the CSV file: {err}") from None
    if not rows:
        raise DataError(f"{path.name}: no rows; expected a header line and one line per image")
    return header, rows


def _scalar_column(
    spec: TargetSpec, header: list[str], rows: list[dict[str, str]], describe: Any, csv_name: str
) -> tuple[np.ndarray, TargetSpec]:
    """Parse a scalar target's CSV column(s); class names become indices in sorted order."""
    name = spec.name
    if spec.kind == "regression" and name not in header:
        columns = [c for c in header if c.startswith(f"{name}.") and c[len(name) + 1:].isdigit()]
        columns.sort(key=lambda c: int(c[len(name) + 1:]))
    else:
        columns = [name] if name in header else []
    if not columns:
        extra = f" (or {name}.0, {name}.1, ...)" if spec.kind == "regression" else ""
        raise DataError(f"{csv_name}: no column '{name}'{extra} for the {spec.kind} target (columns: {', '.join(header)})")
    cells = [[row[c].strip() for c in columns] for row in rows]
    for i, row in enumerate(cells):
        if "" in row:
            raise DataError(f"{describe(i)}: target '{name}' is empty; every image needs a value")
    if spec.kind == "classification" and not all(_is_number(c[0]) for c in cells):
        names = sorted({c[0] for c in cells})
        if spec.num_classes and len(names) > spec.num_classes:
            raise DataError(
                f"{csv_name}: target '{name}' has {len(names)} class names but its task declares "
                f"num_classes = {spec.num_classes}"
            )
        index = {n: i for i, n in enumerate(names)}
        values = np.array([index[c[0]] for c in cells], dtype=np.int64)
        listing = ", ".join(f"{n}={i}" for n, i in index.items())
        return values, replace(spec, num_classes=spec.num_classes or len(names), description=f"classes: {listing}")
    out = np.empty((len(cells), len(columns)), dtype=np.float64)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            try:
                out[i, j] = float(cell)
            except ValueError:
                raise DataError(f"{describe(i)}: target '{name}' is {cell!r}; expected a number") from None
    return (out if spec.kind == "regression" else out[:, 0]), spec


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _dense_files(root: Path, name: str, spec: TargetSpec, files: list[str]) -> list[Path]:
    """The file of target ``name`` for each image: ``<root>/<name>/<image stem>.png|.npy``."""
    folder = root / name
    if not folder.is_dir():
        raise DataError(
            f"data.root: expected the folder {name}/ in {root} holding the {spec.kind} target "
            "(one file per image, same name, .png or .npy); see docs/custom-data.md"
        )
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    out = []
    for file in files:
        stem = str(Path(file).with_suffix(""))
        for candidate in (file, f"{stem}.png", f"{stem}.npy"):
            if candidate in present:
                out.append(folder / candidate)
                break
        else:
            raise DataError(
                f"data.root: no {spec.kind} file for image {file}; expected {name}/{stem}.png or {name}/{stem}.npy in {root}"
            )
    return out


def _read_dense(spec: TargetSpec, path: Path, where: str, depth_scale: float) -> np.ndarray:
    """One dense target file -> raw values (checked later with the rest of the sample)."""
    if path.suffix == ".npy":
        return read_npy(path, where)
    if spec.kind == "normals":
        rgb = read_image(path, where, "RGB").astype(np.float32)
        return rgb / 127.5 - 1.0  # the usual 8-bit encoding: 0..255 -> -1..1
    value = read_image(path, where, mode=None)
    if value.ndim != 2:
        raise DataError(f"{where}: {path.name} has {value.shape[2]} channels; a {spec.kind} PNG must have one")
    if spec.kind == "depth":
        return value.astype(np.float32) / depth_scale
    if spec.kind == "edges" and value.max(initial=0) == 255:
        return (value > 0).astype(np.uint8)  # 0/255 masks are as common as 0/1
    return value


def _folder_stats(
    image_dir: Path, files: list[str], train: np.ndarray, mode: str, describe: Any, limit: int = 64
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Channel mean and std over the pixels of up to ``limit`` training images."""
    total = total_sq = None
    count = 0
    for i in train[:limit]:
        pixels = read_image(image_dir / files[int(i)], describe(int(i)), mode).reshape(-1, 1 if mode == "L" else 3)
        pixels = pixels.astype(np.float64) / 255
        total = pixels.sum(0) + (0 if total is None else total)
        total_sq = (pixels**2).sum(0) + (0 if total_sq is None else total_sq)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-6))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
