"""Every ready recipe in recipes/ runs `branchnas run` end to end.

The benchmark recipes read files: each gets a fabricated miniature of its on-disk layout
(MNIST idx files, CIFAR-100 pickles, CelebA JPEGs and lists, MTAN .npy folders, Cityscapes
PNG trees), written with the helpers of the dataset tests in tests/data where they fit, and
passed with ``--set data.root=...``. digits and shapes need no files. Sizes, epochs, image
size and backbone width are cut down through ``--set``; the export check (a clean process
reloading the TorchScript file) stays on.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from branchnas.data.celeba import ATTRIBUTES
from branchnas.data.cifar100 import COARSE_CLASSES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DATA_TESTS = Path(__file__).resolve().parent / "data"
STAGES = ["pretrain", "affinity", "search", "finetune", "export"]


@functools.cache
def _data_test_module(name: str) -> ModuleType:
    """A module of tests/data, loaded by path (its fabrication helpers are reused as they are)."""
    path = DATA_TESTS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_e2e_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png(path: Path, array) -> None:
    _data_test_module("conftest").save_png(path, array)


# Each fabricator writes a miniature of the dataset's layout under ``tmp`` and returns the
# data.root to pass. They reuse the writers of tests/data, with more samples and with every
# class present in the test split: a stage-1 model of one epoch on a handful of images may
# predict one class everywhere, and a test split without that class would give it accuracy
# (or mIoU) 0, a single-task baseline that Δ_MTL cannot divide by.


def _multimnist(tmp: Path) -> Path:
    """MNIST idx files (tests/data/test_multimnist.py's writer): 100 train, 50 test digits, 0..9 in turn."""
    idx = _data_test_module("test_multimnist")._idx
    root = tmp / "mnist"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 100), ("t10k", 50)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(idx(images))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(np.arange(n) % 10))
    return root


def _cifar100(tmp: Path) -> Path:
    """cifar-100-python pickles (tests/data/test_cifar100.py's rows): 80 train, 40 test images."""
    part = _data_test_module("test_cifar100")._part
    folder = tmp / "cifar" / "cifar-100-python"
    folder.mkdir(parents=True)
    meta = {b"coarse_label_names": [c.encode() for c in COARSE_CLASSES]}
    for name, content in (("train", part(80, 0)), ("test", part(40, 20)), ("meta", meta)):
        (folder / name).write_bytes(pickle.dumps(content))
    return folder.parent


def _celeba(tmp: Path) -> Path:
    """The torchvision CelebA layout with tests/data/test_celeba.py's attribute pattern: 6/3/8 images."""
    from PIL import Image

    values = _data_test_module("test_celeba")._values
    folder = tmp / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    partition = [0] * 6 + [1] * 3 + [2] * 8
    files = [f"{i:06d}.jpg" for i in range(1, len(partition) + 1)]
    for i, name in enumerate(files):
        Image.fromarray(np.full((9, 7, 3), 12 * i, dtype=np.uint8)).save(folder / "img_align_celeba" / name)
    lines = [str(len(files)), " ".join(ATTRIBUTES)]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in values(i)) for i, name in enumerate(files)]
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (folder / "list_eval_partition.txt").write_text(
        "\n".join(f"{n} {p}" for n, p in zip(files, partition, strict=True)) + "\n")
    return tmp


def _nyuv2(tmp: Path) -> Path:
    """MTAN's .npy folders: 12 train, 4 test samples of 8x13 pixels, each showing all 13 classes."""
    root = tmp / "nyuv2"
    for part, numbers in (("train", range(12)), ("val", range(4))):
        for i in numbers:
            folder = root / part
            label = np.tile(np.arange(13, dtype=np.float32), (8, 1))
            label[0] = -1  # an unlabelled row
            image = np.stack([label / 13, np.full_like(label, i / 12), np.zeros_like(label)], -1)
            depth = (1.0 + label[..., None] + i).clip(0)
            normal = np.zeros((8, 13, 3), dtype=np.float32)
            normal[..., 2] = -1.0
            for name, value in (("image", image), ("label", label), ("depth", depth), ("normal", normal)):
                (folder / name).mkdir(parents=True, exist_ok=True)
                np.save(folder / name / f"{i}.npy", value.astype(np.float32))
    return root


def _cityscapes(tmp: Path) -> Path:
    """The torchvision Cityscapes layout: 8 train, 3 test frames of 8x38, each showing all 19 classes."""
    from branchnas.data.cityscapes import label_ids_to_train_ids

    ids = np.array([i for i in range(34) if label_ids_to_train_ids(np.array([i]))[0] != 255], dtype=np.uint8)
    label_ids = np.repeat(np.tile(ids, (8, 1)), 2, axis=1)  # 8 x 38: every class in two columns
    disparity = (257 + 256 * (label_ids.astype(np.uint16) % 5)).astype(np.uint16)
    disparity[:, 0] = 0  # missing depth
    root = tmp / "cityscapes"
    frames = {"train": [("aachen", k) for k in range(5)] + [("bremen", k) for k in range(3)],
              "val": [("lindau", k) for k in range(3)]}
    for number, (part, city, k) in enumerate((p, c, k) for p, items in frames.items() for c, k in items):
        stem = f"{city}/{city}_000000_{k:06d}"
        image = np.stack([label_ids * 7, np.full_like(label_ids, 10 * number), label_ids], -1).astype(np.uint8)
        _png(root / "leftImg8bit" / part / f"{stem}_leftImg8bit.png", image)
        _png(root / "gtFine" / part / f"{stem}_gtFine_labelIds.png", label_ids)
        _png(root / "disparity" / part / f"{stem}_disparity.png", disparity)
    return root


TINY_TRAINING = [
    "pretrain.epochs=1", "finetune.epochs=1", 'pretrain.device="cpu"', 'finetune.device="cpu"',
    "export.check=true",
]

#: recipe -> (fabricator or None, overrides, number of tasks)
CASES: dict[str, tuple[Callable[[Path], Path] | None, list[str], int]] = {
    "multimnist": (_multimnist, [
        "data.num_train=40", "data.num_val=40", "data.num_test=0", "data.batch_size=10", "affinity.images=10",
    ], 2),
    "cifar100-mtl": (_cifar100, [
        # Width 1/4 shrinks every tree ~16x: the recipe's 1M would exceed the all-separate size.
        "data.num_train=40", "data.num_val=20", "data.num_test=0", "data.batch_size=8", "affinity.images=10",
        "backbone.width=0.25", 'search.budget="50%"',
    ], 20),
    "celeba": (_celeba, [
        # 8 of the 40 attributes: drawing the 40x40 affinity heatmaps alone takes most of a minute.
        'data.options={attributes=["5_o_Clock_Shadow", "Bangs", "Eyeglasses", "Male", "Smiling", "Wavy_Hair", '
        '"Wearing_Hat", "Young"]}',
        "data.batch_size=6", "affinity.images=3", "backbone.width=0.25", 'search.budget="50%"',
    ], 8),
    "nyuv2": (_nyuv2, [
        "data.image_size=[16, 16]", "data.num_train=0", "data.num_val=3", "data.num_test=0",
        "data.batch_size=3", "affinity.images=3", "affinity.batch_size=3",
    ], 3),
    "cityscapes": (_cityscapes, [
        "data.image_size=[16, 32]", "data.num_train=0", "data.num_val=3", "data.num_test=0",
        "data.batch_size=3", "affinity.images=3", "affinity.batch_size=3",
    ], 2),
    "digits": (None, [
        "data.num_train=32", "data.num_val=16", "data.num_test=64", "data.batch_size=16", "affinity.images=16",
    ], 4),
    "shapes": (None, [
        "data.options={size=16}", "data.num_train=32", "data.num_val=16", "data.num_test=16",
        "data.batch_size=16", "affinity.images=16", "backbone.width=0.25",
    ], 7),
}


def test_every_ready_recipe_has_a_case():
    assert sorted(p.stem for p in (ROOT / "recipes").glob("*.toml")) == sorted(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_recipe_runs_end_to_end_on_its_miniature(name, tmp_path, monkeypatch, one_thread):
    from branchnas_cli.main import cli
    from click.testing import CliRunner

    from branchnas.budget import parse_budget
    from branchnas.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    fabricate, overrides, num_tasks = CASES[name]
    sets = [*TINY_TRAINING, *overrides, f'out="{tmp_path / "runs"}"']
    if fabricate is not None:
        sets.append(f'data.root="{fabricate(tmp_path / "layout")}"')
    recipe_path = ROOT / "recipes" / f"{name}.toml"
    args = ["run", str(recipe_path)]
    for item in sets:
        args += ["--set", item]

    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]

    recipe = load_recipe(recipe_path, sets)
    run_dir = tmp_path / "runs" / name
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert list(manifest) == STAGES
    assert all(entry["status"] == "done" for entry in manifest.values()), manifest
    if fabricate is not None:
        assert (run_dir / "recipe.toml").read_text().count(str(tmp_path / "layout")) == 1

    # Every task of the recipe was trained alone, measured, and fine-tuned in the tree.
    pretrain = json.loads((run_dir / "pretrain" / "metrics.json").read_text())["tasks"]
    assert len(pretrain) == num_tasks
    report = json.loads((run_dir / "finetune" / "report.json").read_text())
    assert sorted(report["test"]) == sorted(pretrain)
    assert math.isfinite(report["delta_mtl"])

    # The chosen tree fits the budget and is what was fine-tuned.
    tree = json.loads((run_dir / "search" / "tree.json").read_text())
    chosen = tree["ranked"][0]
    budget = parse_budget(recipe.search.budget, reference=tree["max_size"])
    assert tree["min_size"] <= chosen["params"] <= budget
    assert report["params"] == chosen["params"], "fvcore on the built network should match the search's size"
    assert report["tree"]["partitions"] == chosen["tree"]["partitions"]
    if recipe.search.mode != "auto":
        assert tree["mode"] == recipe.search.mode

    # The export was written and checked in a clean process.
    export = manifest["export"]
    assert export["checked"] and Path(export["path"]).is_file()
    worst = max(export["max_abs_diff"].values()) if isinstance(export["max_abs_diff"], dict) else export["max_abs_diff"]
    assert worst <= recipe.export.atol
    assert f"Exported model: {export['path']}" in result.output
