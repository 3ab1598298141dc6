"""A dataset with planted task structure, in branchnas's ``arrays`` (.npz) format.

Each 32x32 image shows one object on a striped background, drawn from four independent
latent factors. Two tasks read each of three factors, and one task reads the fourth alone:

| factor  | drives                                  | tasks (kind)                                  |
|---------|-----------------------------------------|-----------------------------------------------|
| form    | the object's outline                    | ``form`` (4 classes), ``round`` (attribute)   |
| place   | the object's cell in a 3x3 grid         | ``column`` (3 classes), ``row`` (3 classes)   |
| hue     | the object's colour                     | ``hue`` (4 classes), ``warm`` (attribute)     |
| texture | the background stripes' frequency       | ``texture`` (3 classes), alone                |

So the right answer to "which tasks should share?" is known: the pairs of a factor, with
``texture`` on its own. :func:`write` makes the file and :func:`recipe_overrides` the
``--set`` list that trains on it; ``bench/tree_quality.py --recipes planted`` uses both.

Example::

    python bench/planted.py out.npz --images 2000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

#: task -> (kind, classes), in the order the recipe lists them
TASKS = {
    "form": ("classification", 4), "round": ("attribute", 0),
    "column": ("classification", 3), "row": ("classification", 3),
    "hue": ("classification", 4), "warm": ("attribute", 0),
    "texture": ("classification", 3),
}
#: factor -> the tasks it drives (the planted structure)
FACTORS = {"form": ("form", "round"), "place": ("column", "row"), "hue": ("hue", "warm"), "texture": ("texture",)}
_HUES = np.array([[0.90, 0.20, 0.15], [0.95, 0.80, 0.10], [0.15, 0.70, 0.25], [0.20, 0.35, 0.95]])  # 2 warm, 2 cold
_SIZE = 32


def _object_mask(form: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float32)
    dy, dx = y - cy, x - cx
    if form == 0:  # square
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if form == 1:  # disc
        return dy**2 + dx**2 <= r**2
    if form == 2:  # diamond
        return np.abs(dy) + np.abs(dx) <= 1.3 * r
    return (np.abs(dy) <= r) & (np.abs(dx) <= r) & ~((np.abs(dy) <= r / 2) & (np.abs(dx) <= r / 2))  # ring square


def generate(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` images (uint8, N x 32 x 32 x 3) and one array per task."""
    rng = np.random.default_rng(seed)
    form = rng.integers(0, 4, n)
    column, row = rng.integers(0, 3, n), rng.integers(0, 3, n)
    hue = rng.integers(0, 4, n)
    texture = rng.integers(0, 3, n)
    images = np.empty((n, _SIZE, _SIZE, 3), dtype=np.uint8)
    y, x = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float32)
    for i in range(n):
        freq = (0.25, 0.6, 1.1)[texture[i]]
        phase = rng.uniform(0, 2 * np.pi)
        stripes = 0.35 + 0.12 * np.sin(freq * (x + y) + phase)
        image = np.repeat(stripes[..., None], 3, axis=2)
        cy = 6 + 10 * row[i] + rng.uniform(-1.5, 1.5)
        cx = 6 + 10 * column[i] + rng.uniform(-1.5, 1.5)
        mask = _object_mask(int(form[i]), cy, cx, rng.uniform(3.2, 4.2))
        colour = np.clip(_HUES[hue[i]] + rng.normal(0, 0.04, 3), 0, 1)
        image[mask] = colour
        image += rng.normal(0, 0.03, image.shape)
        images[i] = np.clip(image * 255, 0, 255).round().astype(np.uint8)
    return {
        "images": images, "form": form, "round": (form == 1).astype(np.int64),
        "column": column, "row": row, "hue": hue, "warm": (hue < 2).astype(np.int64), "texture": texture,
    }


def write(path: str | Path, n: int = 2400, seed: int = 0) -> Path:
    """Write the dataset to ``path`` (kept if it exists with the same size and seed)."""
    path = Path(path)
    stamp = path.with_suffix(".txt")
    if path.exists() and stamp.exists() and stamp.read_text() == f"{n} {seed}":
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **generate(n, seed))
    stamp.write_text(f"{n} {seed}")
    return path


def recipe_overrides(path: str | Path) -> list[str]:
    """The ``--set`` list that trains branchnas on the file (no flips: column is left/right)."""
    tasks = ", ".join(f'{{name="{t}", kind="{k}"' + (f", num_classes={c}}}" if c else "}")
                      for t, (k, c) in TASKS.items())
    return ['name="planted"', 'data.dataset="arrays"', f'data.root="{Path(path).resolve()}"',
            "data.options={flip = false}", f"tasks=[{tasks}]"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write(args.path, args.images, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
