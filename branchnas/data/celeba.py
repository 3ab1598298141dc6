"""``celeba``: CelebA's 40 binary face attributes, read from the torchvision layout.

``data.root`` holds (directly, or in a ``celeba/`` subfolder as torchvision downloads it)::

    img_align_celeba/000001.jpg ...   the aligned 178x218 (W x H) face crops
    list_attr_celeba.txt              line 1: image count; line 2: the 40 attribute names;
                                      then "<file> <40 values of -1 or 1>" per image
    list_eval_partition.txt           "<file> <0 train | 1 val | 2 test>" per image

Each attribute is one ``attribute`` target (0/1), named as in the file (``Smiling``,
``Wearing_Hat``, ...). The official partition gives the splits. Images are read per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from branchnas.data._base import (
    SPLITS,
    DatasetFamily,
    LoadRequest,
    MultiTaskDataset,
    TargetSpec,
    option,
)
from branchnas.data.io import read_image
from branchnas.data.splits import seeded_rng, take
from branchnas.data.storage import LazyDataset, per_sample_reader
from branchnas.errors import DataError, RecipeError, did_you_mean

__all__ = ["CelebAFamily", "CelebAOptions", "ATTRIBUTES"]

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)
#: ImageNet statistics, the usual normalisation for CelebA models.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_LAYOUT = "img_align_celeba/, list_attr_celeba.txt and list_eval_partition.txt (the torchvision CelebA layout)"


@dataclass
class CelebAOptions:
    """``[data] options`` of the celeba dataset."""

    attributes: list[str] = option([], "attribute names to load as targets (e.g. [\"Smiling\", \"Male\"]); [] = all 40")


class CelebAFamily(DatasetFamily):
    """CelebA face attributes (see the module docstring)."""

    name = "celeba"
    summary = "CelebA faces, 40 binary attributes (paper benchmark; torchvision layout)"
    Options = CelebAOptions
    needs_root = True
    layout = _LAYOUT

    def check_options(self, options: CelebAOptions) -> None:
        for i, name in enumerate(options.attributes):
            if name not in ATTRIBUTES:
                raise RecipeError(
                    f"data.options.attributes[{i}]: unknown CelebA attribute '{name}'{did_you_mean(name, ATTRIBUTES)}; "
                    "see `branchnas datasets celeba`"
                )

    def targets(self, options: CelebAOptions | None = None) -> dict[str, TargetSpec]:
        names = (options.attributes if options is not None else []) or ATTRIBUTES
        return {n: TargetSpec(n, "attribute", description=f"1 if the face shows {n.replace('_', ' ')}") for n in names}

    def load(self, request: LoadRequest) -> dict[str, MultiTaskDataset]:
        root = self.root_dir(request.root)
        if not (root / "list_attr_celeba.txt").exists() and (root / "celeba").is_dir():
            root = root / "celeba"  # torchvision's CelebA(root) keeps its files in root/celeba
        attr_path = self.expect(root / "list_attr_celeba.txt", "list_attr_celeba.txt", root)
        part_path = self.expect(root / "list_eval_partition.txt", "list_eval_partition.txt", root)
        image_dir = self.expect(root / "img_align_celeba", "the folder img_align_celeba/", root)
        files, names, values = _read_attributes(attr_path)
        partition = _read_partition(part_path, files)
        wanted = list(request.targets)
        columns = [names.index(n) for n in wanted]
        labels = (values[:, columns] > 0).astype(np.float32)
        native = _image_size(image_dir / files[0], f"{image_dir.name}/{files[0]}")
        rng = seeded_rng(request.seed, "celeba", "split")
        splits: dict[str, MultiTaskDataset] = {}
        for code, split in enumerate(SPLITS):
            idx = np.sort(take(np.flatnonzero(partition == code), request.sizes[split], rng,
                               f"num_{split}", f"the CelebA {split} partition"))
            splits[split] = LazyDataset(
                len(idx), _reader(split, idx, files, labels, wanted, image_dir, request.targets, native),
                request.targets, native_size=native, in_channels=3, mean=MEAN, std=STD,
                can_flip=True, name=f"celeba/{split}",
            )
        return splits


def _reader(
    split: str, idx: np.ndarray, files: list[str], labels: np.ndarray, wanted: list[str],
    image_dir: Path, specs: dict[str, TargetSpec], native: tuple[int, int],
) -> Any:
    def describe(i: int) -> str:
        return f"celeba/{split} sample {i} ({image_dir.name}/{files[idx[i]]})"

    def read(i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        src = int(idx[i])
        image = read_image(image_dir / files[src], describe(i))
        return image, {name: labels[src, j] for j, name in enumerate(wanted)}

    return per_sample_reader(read, specs, native_size=native, in_channels=3, describe=describe)


def _image_size(path: Path, where: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except FileNotFoundError:
        raise DataError(f"{where}: file {path} is missing (listed in list_attr_celeba.txt)") from None
    except OSError as err:
        raise DataError(f"{where}: cannot read image {path}: {err}") from None


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None


def _read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(files, attribute names, values (N, 40) of -1/1)``, every line checked."""
    lines = _lines(path)
    if len(lines) < 3:
        raise DataError(f"{path.name}: expected a count line, a line of attribute names and one line per image")
    names = lines[1].split()
    missing = [a for a in ATTRIBUTES if a not in names]
    if missing:
        raise DataError(f"{path.name} line 2: attribute '{missing[0]}' is missing from the names; is this CelebA's file?")
    files, rows = [], []
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise DataError(f"{path.name} line {number}: expected a file name and {len(names)} values; got {len(parts)} fields")
        files.append(parts[0])
        rows.append(parts[1:])
    try:
        values = np.array(rows, dtype=np.int64)
    except ValueError:
        bad = next(i for i, r in enumerate(rows) if not all(_is_int(v) for v in r))
        raise DataError(f"{path.name} line {bad + 3} ({files[bad]}): values must be -1 or 1") from None
    wrong = ~np.isin(values, (-1, 1))
    if wrong.any():
        row, col = np.argwhere(wrong)[0]
        raise DataError(
            f"{path.name} line {row + 3} ({files[row]}): attribute '{names[col]}' is {values[row, col]}; expected -1 or 1"
        )
    return files, names, values


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _read_partition(path: Path, files: list[str]) -> np.ndarray:
    """Partition code (0 train, 1 val, 2 test) of every file of the attribute list."""
    codes: dict[str, str] = {}
    for number, line in enumerate(_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path.name} line {number}: expected '<file> <0, 1 or 2>'; got {line.strip()!r}")
        codes[parts[0]] = parts[1]
    missing = [f for f in files if f not in codes]
    if missing:
        raise DataError(f"{path.name}: no partition for {missing[0]} (listed in list_attr_celeba.txt)")
    return np.array([int(codes[f]) for f in files], dtype=np.int64)
