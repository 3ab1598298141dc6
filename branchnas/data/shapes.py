"""``shapes``: the built-in dataset, procedurally generated scenes of a few shapes.

Each image shows 1 to ``max_objects`` shapes (circle, square, triangle, diamond, cross), each
a tilted plane at its own depth in front of a tilted background plane, lit from the upper
left and dimmed with distance. The scene is drawn from independent *factors*; each target
is a function of only some of them, so tasks that share a factor are related and tasks that
share none are less so (task affinity has real structure):

========  ====================================================  ===========================================
factor    what is drawn                                         targets whose value depends on it
========  ====================================================  ===========================================
shape     each object's shape class (distinct in a scene)       segmentation, edges, depth, normals, shape
layout    each object's position and size, and its place in     segmentation, edges, depth, normals
          the occlusion order (nearer hides farther)
count     the number of objects                                 segmentation, edges, depth, normals, count
tilt      each object's tilt, and the background's: a floor     depth, normals, floor
          receding upwards or a wall facing the camera
distance  each object's depth, and the background's             depth, distance
colour    each object's colour class, independent of shape      colour
========  ====================================================  ===========================================

A target depends on a factor when changing that factor alone, every other draw held, can
change the target. ``edges`` is exactly the boundary map of ``segmentation`` (the shape
classes in a scene are distinct), so the two read the same factors; ``normals`` reads only
the tilts, not the depths. The ``shape`` and ``colour`` labels report the main object, which
is the largest visible object in every scene that passes the layout checks; the layout
decides where a model must look for it, but not the label's value. The values of the
per-image labels ``shape``, ``colour``, ``count``, ``floor`` and ``distance`` are independent
draws of different factors. The colour jitter, the background's grey level and the pixel
noise reach only the image. :data:`FACTORS` holds the table as data; docs/datasets.md says
how it was checked.

Generation is vectorised numpy, in fixed chunks of 256 scenes seeded by ``(seed, split,
chunk)``: the first ``n`` images of a split do not depend on how many are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from branchnas.data._base import DatasetFamily, LoadRequest, MultiTaskDataset, TargetSpec, option
from branchnas.data.splits import require_count, seeded_rng
from branchnas.data.storage import TensorDataset
from branchnas.data.transforms import channel_stats
from branchnas.errors import RecipeError
from branchnas.recipe import TaskConfig

__all__ = ["ShapesFamily", "ShapesOptions", "FACTORS", "SHAPES", "COLOURS", "generate"]

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
#: colour class -> RGB prototype (0..1); each object gets its prototype plus a small jitter
COLOURS = {
    "red": (0.90, 0.15, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "cyan": (0.10, 0.80, 0.85),
}
#: factor -> the targets whose values depend on it (see the module docstring); a target may
#: be under several factors
FACTORS: dict[str, tuple[str, ...]] = {
    "shape": ("segmentation", "edges", "depth", "normals", "shape"),
    "layout": ("segmentation", "edges", "depth", "normals"),
    "count": ("segmentation", "edges", "depth", "normals", "count"),
    "tilt": ("depth", "normals", "floor"),
    "distance": ("depth", "distance"),
    "colour": ("colour",),
}

_CHUNK = 256
# One main object per scene is clearly larger than the others, so that "the largest visible
# object" (whose shape and colour are the labels) is obvious to a small network.
_MAIN_RADIUS = (0.18, 0.24)  # as a fraction of the image side
_RADIUS = (0.09, 0.14)
_EXTENT = 1.56  # farthest reach of any shape in units of its radius (the triangle's apex)
_SLOPE = 0.8  # |d depth / d x| of an object plane, x in image widths
_DEPTH_GAP = 1.5  # depth between consecutive objects: planes never cross, so occlusion is by order
_NEAR = 1.5
_BG_CENTRE = (10.0, 13.0)  # background depth at the image centre (the `distance` target)
_FLOOR_SLOPE = (-3.0, -1.5)  # a background receding upwards (a floor)
_WALL_SLOPE = (-0.5, 0.5)  # a background nearly facing the camera (a wall)
_LIGHT = np.array([-0.4, -0.6, -1.0]) / np.linalg.norm([-0.4, -0.6, -1.0])
_MIN_VISIBLE = 0.5  # an object must show at least half of itself (else counting is guesswork)
_DOMINANCE = 1.2  # the largest object is at least this much larger than the next one


@dataclass
class ShapesOptions:
    """``[data] options`` of the shapes dataset."""

    size: int = option(32, "side of the generated square images in pixels (64 shows finer detail; 4x slower)", min=16)
    min_objects: int = option(1, "fewest shapes in an image", min=1)
    max_objects: int = option(4, "most shapes in an image (at most 5)", min=1)
    noise: float = option(0.03, "standard deviation of the pixel noise (image scale 0..1)", min=0.0)


def _shape_masks(cls: np.ndarray, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """Inside-masks ``(N, K, S, S)`` of every object; every shape has the area of its circle.

    ``du`` is ``(N, K, 1, S)`` and ``dv`` ``(N, K, S, 1)``: pixel offsets from the object's
    centre in units of its radius. Each class is evaluated only on the objects of that class.
    """
    n, k, _, s = du.shape
    mask = np.zeros((n, k, s, s), dtype=bool)
    for c in range(len(SHAPES)):
        sel = cls == c
        if not sel.any():
            continue
        u, v = du[sel], dv[sel]
        au, av = np.abs(u), np.abs(v)
        if c == 0:  # circle
            inside = u * u + v * v <= 1.0
        elif c == 1:  # square of area pi
            inside = np.maximum(au, av) <= 0.8862
        elif c == 2:  # equilateral triangle of area pi, apex up, centred on its centroid
            inside = (v <= 0.7775) & (au <= (v + 1.5551) * 0.57735)
        elif c == 3:  # diamond of area pi
            inside = au + av <= 1.2533
        else:  # plus-shaped cross of area pi
            inside = ((au <= 0.4431) & (av <= 1.1078)) | ((av <= 0.4431) & (au <= 1.1078))
        mask[sel] = inside
    return mask


def _draw_identity(rng: np.random.Generator, m: int, opts: ShapesOptions) -> dict[str, np.ndarray]:
    """Draw what a scene is made of: count, shapes, colours and the background.

    These draws are never redrawn, so their distributions are exactly the ones drawn here
    (uniform and mutually independent) whatever the layout checks reject.
    """
    k = opts.max_objects
    floor = rng.random(m) < 0.5
    return {
        "count": rng.integers(opts.min_objects, opts.max_objects + 1, size=m),
        "shape": np.argsort(rng.random((m, len(SHAPES))), axis=1)[:, :k],  # distinct within a scene
        "colour": rng.integers(0, len(COLOURS), size=(m, k)),  # independent of shape by construction
        "jitter": rng.uniform(-0.06, 0.06, size=(m, k, 3)),
        "floor": floor,
        "bg_slope": np.where(floor, rng.uniform(*_FLOOR_SLOPE, size=m), rng.uniform(*_WALL_SLOPE, size=m)),
        "bg_depth": rng.uniform(*_BG_CENTRE, size=m),
        "bg_grey": rng.uniform(0.5, 0.6, size=m),
    }


def _draw_geometry(rng: np.random.Generator, count: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Draw where the objects are: sizes, positions, tilts and depths (slots ordered near to far)."""
    m = len(count)
    main = rng.integers(0, count)[:, None] == np.arange(k)[None, :]  # any depth rank can be the main one
    radius = np.where(main, rng.uniform(*_MAIN_RADIUS, size=(m, k)), rng.uniform(*_RADIUS, size=(m, k)))
    # Centres keep the object's disc inside the image; corners of a shape may be cut off,
    # which the visibility check counts as hidden.
    cx = radius + (1 - 2 * radius) * rng.random((m, k))
    cy = radius + (1 - 2 * radius) * rng.random((m, k))
    ax = rng.uniform(-_SLOPE, _SLOPE, size=(m, k))
    ay = rng.uniform(-_SLOPE, _SLOPE, size=(m, k))
    # Sorted uniform offsets plus a fixed gap: object planes never cross each other or the
    # background, so a nearer object always occludes a farther one and every occlusion
    # boundary is a depth jump.
    active = np.arange(k)[None, :] < count[:, None]
    nearest_background = _BG_CENTRE[0] + 0.5 * _FLOOR_SLOPE[0]
    farthest_start = nearest_background - 0.3 - 2 * _SLOPE * _EXTENT * _MAIN_RADIUS[1]
    free = farthest_start - _NEAR - _DEPTH_GAP * (count - 1)
    offsets = np.sort(np.where(active, rng.random((m, k)), 2.0), axis=1)
    z0 = _NEAR + free[:, None] * offsets + _DEPTH_GAP * np.arange(k)[None, :]
    return {"radius": radius, "cx": cx, "cy": cy, "ax": ax, "ay": ay, "z0": z0, "active": active}


def _layout(g: dict[str, np.ndarray], shape: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Which surface each pixel shows, and each object's full and visible area.

    Returns ``vis`` as ``(m, S, S)`` indices into the flattened ``(m * (k + 1))``
    per-slot arrays (slot ``k`` is the background), so that a single ``np.take`` gathers
    per-pixel values.
    """
    m, k = g["radius"].shape
    grid = ((np.arange(size) + 0.5) / size).astype(np.float32)
    r = g["radius"].astype(np.float32)[:, :, None, None]
    du = (grid[None, None, None, :] - g["cx"].astype(np.float32)[:, :, None, None]) / r
    dv = (grid[None, None, :, None] - g["cy"].astype(np.float32)[:, :, None, None]) / r
    mask = _shape_masks(np.where(g["active"], shape, -1), du, dv)
    base = ((k + 1) * np.arange(m, dtype=np.intp))[:, None, None]  # intp: np.take needs no conversion
    # Nearest covering slot wins: paint from far to near (slots are sorted near to far).
    vis = np.broadcast_to(base + k, (m, size, size)).copy()
    for slot in range(k - 1, -1, -1):
        np.copyto(vis, base + slot, where=mask[:, slot])
    areas = np.bincount(vis.ravel(), minlength=m * (k + 1)).reshape(m, k + 1)[:, :k]
    # Every shape has the area of its circle, pi r^2; parts cut off by the border count as hidden.
    return {"vis": vis, "areas": areas, "full": np.pi * (g["radius"] * size) ** 2}


def _rejected(active: np.ndarray, lay: dict[str, np.ndarray]) -> np.ndarray:
    """Scenes where an object is mostly hidden or no object is clearly the largest."""
    areas, full = lay["areas"], lay["full"]
    hidden = (active & (areas < _MIN_VISIBLE * np.maximum(full, 1))).any(axis=1)
    top = np.sort(np.where(active, areas, 0), axis=1)[:, ::-1]
    second = top[:, 1] if top.shape[1] > 1 else np.zeros(len(top))
    return hidden | (top[:, 0] < _DOMINANCE * second)


def _place(rng: np.random.Generator, ident: dict[str, np.ndarray], k: int, size: int) -> tuple[dict, dict]:
    """Draw layouts until every scene passes :func:`_rejected` at full resolution.

    Candidates are screened at a coarse resolution first (four times cheaper at 64 px),
    then confirmed at full size. Only the geometry is ever redrawn, never the count,
    shapes or colours, so the rejection leaves their distributions untouched.
    """
    count, shape = ident["count"], ident["shape"]
    geom = _draw_geometry(rng, count, k)
    coarse = min(size, 32)
    todo = np.arange(len(count))
    for _ in range(1000):
        while todo.size:  # screen at the coarse size
            todo = todo[_rejected(geom["active"][todo], _layout(_subset(geom, todo), shape[todo], coarse))]
            _assign(geom, _draw_geometry(rng, count[todo], k), todo)
        lay = _layout(geom, shape, size)
        todo = np.flatnonzero(_rejected(geom["active"], lay))
        if not todo.size:
            return geom, lay
        _assign(geom, _draw_geometry(rng, count[todo], k), todo)
    raise RuntimeError("shapes: could not place the objects; lower data.options.max_objects")  # pragma: no cover


def _subset(d: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {key: value[rows] for key, value in d.items()}


def _assign(dst: dict[str, np.ndarray], src: dict[str, np.ndarray], rows: np.ndarray) -> None:
    for key, value in src.items():
        dst[key][rows] = value


def _render(
    ident: dict[str, np.ndarray], g: dict[str, np.ndarray], lay: dict[str, np.ndarray],
    noise: float, rng: np.random.Generator, out: dict[str, np.ndarray],
) -> None:
    """Write the images and dense targets of placed scenes into the arrays of ``out``."""
    m, k = g["radius"].shape
    vis = lay["vis"]
    size = vis.shape[-1]
    grid = ((np.arange(size) + 0.5) / size).astype(np.float32)

    # Per-slot surfaces, background last: depth = b + ax * x + ay * y (x, y in image widths).
    ax = np.concatenate([g["ax"], np.zeros((m, 1))], axis=1)
    ay = np.concatenate([g["ay"], ident["bg_slope"][:, None]], axis=1)
    cx = np.concatenate([g["cx"], np.full((m, 1), 0.5)], axis=1)
    cy = np.concatenate([g["cy"], np.full((m, 1), 0.5)], axis=1)
    z0 = np.concatenate([g["z0"], ident["bg_depth"][:, None]], axis=1)
    b = z0 - ax * cx - ay * cy
    # The normal of z(x, y) that faces the camera is (dz/dx, dz/dy, -1), normalised.
    normal = np.stack([ax, ay, -np.ones_like(ax)], axis=1)  # (m, 3, k + 1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    lambert = np.clip(np.einsum("mcs,c->ms", normal, _LIGHT), 0.0, 1.0)
    protos = np.array(list(COLOURS.values()))
    base = np.clip(protos[ident["colour"]] + ident["jitter"], 0.0, 1.0)
    base = np.concatenate([base, np.repeat(ident["bg_grey"][:, None, None], 3, axis=2)], axis=1)
    shaded = (base * (0.35 + 0.65 * lambert)[..., None]).transpose(0, 2, 1)  # (m, 3, k + 1)
    cls = np.where(g["active"], ident["shape"] + 1, 0)
    seg_of_slot = np.concatenate([cls, np.zeros((m, 1), dtype=cls.dtype)], axis=1).astype(np.uint8)

    def gather(per_slot: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
        """Per-slot values (m, k + 1) -> per-pixel values (m, S, S), one flat take."""
        return np.take(np.ascontiguousarray(per_slot, dtype=dst.dtype if dst is not None else np.float32).reshape(-1),
                       vis, out=dst)

    depth = out["depth"][:, 0]
    gather(b, depth)
    depth += gather(ax) * grid[None, None, :]
    depth += gather(ay) * grid[:, None]
    for c in range(3):
        gather(normal[:, c], out["normals"][:, c])
    dim = 1.0 - 0.035 * (depth - _NEAR)  # farther surfaces are dimmer: a depth cue
    for c in range(3):
        value = gather(shaded[:, c]) * dim
        if noise > 0:  # uniform noise with standard deviation `noise`
            value += (rng.random(value.shape, dtype=np.float32) - 0.5) * np.float32(noise * 12**0.5)
        np.clip(value * 255 + 0.5, 0, 255, out=value)
        out["image"][:, c] = value
    gather(seg_of_slot, out["segmentation"])

    # Edges: both pixels of every pair of 4-neighbours that show different surfaces.
    edges = out["edges"][:, 0].view(bool)
    edges[...] = False
    step = vis[:, :, 1:] != vis[:, :, :-1]
    edges[:, :, 1:] |= step
    edges[:, :, :-1] |= step
    step = vis[:, 1:, :] != vis[:, :-1, :]
    edges[:, 1:, :] |= step
    edges[:, :-1, :] |= step


def _chunk(seed: int, split: str, index: int, opts: ShapesOptions, out: dict[str, np.ndarray]) -> None:
    """Generate chunk ``index`` of a split into the arrays of ``out`` (one chunk's rows)."""
    m = len(out["image"])
    rng = seeded_rng(seed, "shapes", split, index)
    ident = _draw_identity(rng, m, opts)
    geom, lay = _place(rng, ident, opts.max_objects, opts.size)
    _render(ident, geom, lay, opts.noise, rng, out)
    slot = np.argmax(np.where(geom["active"], lay["areas"], -1), axis=1)
    rows = np.arange(m)
    out["shape"][:] = ident["shape"][rows, slot]
    out["colour"][:] = ident["colour"][rows, slot]
    out["count"][:] = ident["count"] - opts.min_objects
    out["floor"][:] = ident["floor"]
    out["distance"][:, 0] = ident["bg_depth"]


def _allocate(n: int, size: int) -> dict[str, np.ndarray]:
    return {
        "image": np.empty((n, 3, size, size), np.uint8),
        "segmentation": np.empty((n, size, size), np.uint8),
        "depth": np.empty((n, 1, size, size), np.float32),
        "normals": np.empty((n, 3, size, size), np.float32),
        "edges": np.empty((n, 1, size, size), np.uint8),
        "shape": np.empty(n, np.int64),
        "colour": np.empty(n, np.int64),
        "count": np.empty(n, np.int64),
        "floor": np.empty(n, np.float32),
        "distance": np.empty((n, 1), np.float32),
    }


def generate(n: int, seed: int, split: str = "train", options: ShapesOptions | None = None) -> dict[str, np.ndarray]:
    """Generate ``n`` scenes: ``image`` uint8 ``(n, 3, S, S)`` and one array per target.

    Targets are in the layout of the tensor contract (dense maps ``(n, C, S, S)``, the
    segmentation ``(n, S, S)``, classes ``(n,)``, ``distance`` ``(n, 1)``), with compact
    dtypes (uint8 label maps).

    Args:
        n: number of scenes.
        seed: the recipe seed.
        split: a name mixed into the seed, so that splits differ.
        options: the dataset options (defaults when ``None``).

    Example:
        >>> data = generate(8, seed=0, options=ShapesOptions(size=32))
        >>> data["image"].shape, data["depth"].shape
        ((8, 3, 32, 32), (8, 1, 32, 32))
    """
    opts = options or ShapesOptions()
    out = _allocate(n, opts.size)
    for index, start in enumerate(range(0, n, _CHUNK)):
        rows = {key: value[start:start + _CHUNK] for key, value in out.items()}
        if len(rows["image"]) == _CHUNK:
            _chunk(seed, split, index, opts, rows)
        else:  # a whole chunk is drawn even for a few images: the first n never depend on n
            whole = _allocate(_CHUNK, opts.size)
            _chunk(seed, split, index, opts, whole)
            for key, value in rows.items():
                value[...] = whole[key][:len(value)]
    return out


class ShapesFamily(DatasetFamily):
    """The built-in generated dataset (see the module docstring)."""

    name = "shapes"
    summary = "generated scenes of shapes with depth, normals, edges and per-scene labels (built in)"
    Options = ShapesOptions
    generated = True

    def check_options(self, options: ShapesOptions) -> None:
        if options.max_objects > 5:
            raise RecipeError(f"data.options.max_objects: expected a value <= 5; got {options.max_objects}")
        if options.min_objects > options.max_objects:
            raise RecipeError(
                f"data.options.min_objects: expected <= data.options.max_objects ({options.max_objects}); "
                f"got {options.min_objects}"
            )

    def targets(self, options: ShapesOptions | None = None) -> dict[str, TargetSpec]:
        opts = options or ShapesOptions()
        counts = opts.max_objects - opts.min_objects + 1
        return {
            "segmentation": TargetSpec("segmentation", "segmentation", len(SHAPES) + 1,
                                       description="shape class per pixel: 0 background, 1.." + str(len(SHAPES)) + " " + ", ".join(SHAPES)),
            "depth": TargetSpec("depth", "depth", description="distance of the visible surface (background 8.5..14.5)"),
            "normals": TargetSpec("normals", "normals", channels=3, description="unit surface normal facing the camera (x right, y down)"),
            "edges": TargetSpec("edges", "edges", description="1 on both sides of every occlusion boundary"),
            "shape": TargetSpec("shape", "classification", len(SHAPES), description="shape class of the largest visible object"),
            "colour": TargetSpec("colour", "classification", len(COLOURS), description="colour class of the largest visible object: " + ", ".join(COLOURS)),
            "count": TargetSpec("count", "classification", counts, description=f"number of objects minus {opts.min_objects}"),
            "floor": TargetSpec("floor", "attribute", description="1 if the background is a floor receding upwards, 0 if a wall"),
            "distance": TargetSpec("distance", "regression", description="background depth at the image centre (10..13)"),
        }

    def default_tasks(self, options: Any = None) -> list[TaskConfig]:
        names = ("segmentation", "depth", "normals", "edges", "shape", "colour", "count")
        specs = self.targets(options)
        return [TaskConfig(name=n, kind=specs[n].kind, target=n) for n in names]

    def load(self, request: LoadRequest) -> dict[str, MultiTaskDataset]:
        require_count(request.sizes, self.name)
        opts = request.options
        specs = request.targets
        splits: dict[str, MultiTaskDataset] = {}
        mean = std = None
        for split in ("train", "val", "test"):
            data = generate(request.sizes[split], request.seed, split, opts)
            if mean is None:
                mean, std = channel_stats(data["image"])
            splits[split] = TensorDataset(
                data["image"], {k: data[k] for k in specs}, specs,
                mean=mean, std=std, can_flip=True, name=f"shapes/{split}",
            )
        return splits
