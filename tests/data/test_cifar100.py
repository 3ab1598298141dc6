"""Multi-task CIFAR-100 adapter on tiny pickles in the cifar-100-python layout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from branchnas.data import load_splits
from branchnas.data.cifar100 import COARSE_CLASSES
from branchnas.errors import DataError


def _part(n: int, offset: int) -> dict:
    """Image i has red value offset + i everywhere; coarse label (offset + i) % 20."""
    rows = offset + np.arange(n)
    data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    data[:, 0] = rows[:, None, None]
    return {b"data": data.reshape(n, 3072), b"coarse_labels": (rows % 20).tolist(),
            b"fine_labels": (rows % 100).tolist()}


def _cifar(tmp_path, train=None):
    folder = tmp_path / "cifar" / "cifar-100-python"
    folder.mkdir(parents=True)
    parts = {"train": train or _part(30, 0), "test": _part(10, 100),
             "meta": {b"coarse_label_names": [c.encode() for c in COARSE_CLASSES]}}
    for name, content in parts.items():
        (folder / name).write_bytes(pickle.dumps(content))
    return tmp_path / "cifar", folder


def _load(make_recipe, root, **data):
    data = {"num_train": 0, "num_val": 6, "num_test": 0, **data}
    return load_splits(make_recipe("cifar100", root=str(root), **data))


def test_binary_coarse_class_tasks(tmp_path, make_recipe, pixels):
    root, _ = _cifar(tmp_path)
    splits, tasks = _load(make_recipe, root)
    assert [t.name for t in tasks] == list(COARSE_CLASSES)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [24, 6, 10]
    seen = []
    for split in splits.values():
        images, targets = split.get_batch(range(len(split)))
        assert images.shape[1:] == (3, 32, 32)
        rows = np.rint(pixels(split, images)[:, 0, 5, 5]).astype(int)
        seen += rows.tolist()
        for k, name in enumerate(COARSE_CLASSES):
            np.testing.assert_array_equal(targets[name].numpy(), (rows % 20 == k).astype(np.float32))
    assert sorted(seen) == list(range(30)) + list(range(100, 110))


def test_class_subset_and_reference_targets(tmp_path, make_recipe, pixels):
    root, folder = _cifar(tmp_path)
    recipe = make_recipe("cifar100", root=str(folder), num_train=5, num_val=5, num_test=5,
                         tasks=[{"name": "fish", "kind": "attribute"}, {"name": "coarse", "kind": "classification"},
                                {"name": "fine", "kind": "classification"}])
    splits, tasks = load_splits(recipe)
    assert [t.num_classes for t in tasks] == [0, 20, 100]
    images, targets = splits["test"].get_batch(range(5))
    rows = np.rint(pixels(splits["test"], images)[:, 0, 0, 0]).astype(int)
    np.testing.assert_array_equal(targets["coarse"].numpy(), rows % 20)
    np.testing.assert_array_equal(targets["fine"].numpy(), rows % 100)
    splits, tasks = load_splits(make_recipe("cifar100", root=str(root), num_train=5, num_val=5, num_test=5,
                                            options={"classes": ["fish", "trees"]}))
    assert [t.name for t in tasks] == ["fish", "trees"]


def test_missing_files_are_named(tmp_path, make_recipe):
    root, folder = _cifar(tmp_path)
    (folder / "meta").unlink()
    with pytest.raises(DataError, match=rf"^data\.root: expected cifar-100-python/meta in {root} \(cifar-100-python/ with the files train, test and meta"):
        _load(make_recipe, root)
    with pytest.raises(DataError, match=r"^data\.root: expected the folder cifar-100-python/ in "):
        _load(make_recipe, tmp_path)


def test_malformed_pickles(tmp_path, make_recipe):
    bad = _part(30, 0)
    bad[b"coarse_labels"][13] = 25
    root, folder = _cifar(tmp_path, train=bad)
    with pytest.raises(DataError, match=r"^train image 13: target 'coarse' holds label 25, outside \[0, 20\)"):
        _load(make_recipe, root)
    (folder / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"train: cannot read the CIFAR-100 pickle"):
        _load(make_recipe, root)
    (folder / "train").write_bytes(pickle.dumps({b"data": np.zeros((3, 100), dtype=np.uint8)}))
    with pytest.raises(DataError, match=r"train: no b'fine_labels' entry"):
        _load(make_recipe, root)
