"""Cityscapes adapter on a tiny copy of the torchvision layout."""

from __future__ import annotations

import numpy as np
import pytest

from branchnas.data import load_splits
from branchnas.data.cityscapes import BASELINE, FOCAL
from branchnas.errors import DataError

H, W = 4, 8
# label ids -> train ids: 7 road -> 0, 26 car -> 13, 0 unlabelled -> 255, 33 bicycle -> 18
LABEL_IDS = np.array([[7, 7, 26, 26, 0, 0, 33, 33]] * H, dtype=np.uint8)
TRAIN_IDS = np.array([[0, 0, 13, 13, 255, 255, 18, 18]] * H)
# disparity pixels: 0 missing, 1 (disparity 0) missing, 257 -> d = 1, 2561 -> d = 10
DISPARITY = np.array([[0, 1, 257, 257, 2561, 2561, 257, 0]] * H, dtype=np.uint16)
DEPTH = np.array([[0, 0, 1, 1, 0.1, 0.1, 1, 0]] * H) * BASELINE * FOCAL


def _cityscapes(tmp_path, png):
    root = tmp_path / "cityscapes"
    names = {"train": [("aachen", k) for k in range(5)] + [("bremen", k) for k in range(3)], "val": [("lindau", k) for k in range(3)]}
    number = 0
    for part, items in names.items():
        for city, k in items:
            stem = f"{city}/{city}_000000_{k:06d}"
            image = np.zeros((H, W, 3), dtype=np.uint8)
            image[..., 0] = 10 * number
            number += 1
            png(root / "leftImg8bit" / part / f"{stem}_leftImg8bit.png", image)
            png(root / "gtFine" / part / f"{stem}_gtFine_labelIds.png", LABEL_IDS)
            png(root / "disparity" / part / f"{stem}_disparity.png", DISPARITY)
    return root


def _load(make_recipe, root, **data):
    data = {"num_train": 0, "num_val": 2, "num_test": 0, **data}
    return load_splits(make_recipe("cityscapes", root=str(root), **data))


def test_segmentation_and_depth(tmp_path, png, make_recipe, pixels):
    root = _cityscapes(tmp_path, png)
    splits, tasks = _load(make_recipe, root)
    assert [t.name for t in tasks] == ["segmentation", "depth"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 2, 3]
    for split in splits.values():
        images, targets = split.get_batch(range(len(split)))
        assert images.shape[1:] == (3, H, W)
        np.testing.assert_array_equal(targets["segmentation"].numpy(), np.broadcast_to(TRAIN_IDS, (len(split), H, W)))
        np.testing.assert_allclose(targets["depth"][:, 0].numpy(), np.broadcast_to(DEPTH, (len(split), H, W)), rtol=1e-6)
    test_rows = np.rint(pixels(splits["test"], splits["test"].get_batch(range(3))[0])[:, 0, 0, 0] / 10)
    assert sorted(test_rows) == [8, 9, 10]  # the official val split is the test split


def test_max_depth_marks_far_pixels_missing(tmp_path, png, make_recipe):
    root = _cityscapes(tmp_path, png)
    splits, _ = _load(make_recipe, root, options={"max_depth": 100.0})
    depth = splits["val"].get_batch([0])[1]["depth"][0, 0].numpy()
    np.testing.assert_allclose(depth[0], np.where(DEPTH[0] > 100, 0, DEPTH[0]), rtol=1e-6)


def test_segmentation_alone_needs_no_disparity(tmp_path, png, make_recipe):
    import shutil

    root = _cityscapes(tmp_path, png)
    shutil.rmtree(root / "disparity")
    splits, _ = _load(make_recipe, root, tasks=[{"name": "segmentation", "kind": "segmentation"}])
    assert list(splits["train"].get_batch([0])[1]) == ["segmentation"]
    with pytest.raises(DataError, match=rf"^data\.root: expected disparity/train/ \(for depth\) in {root} \(leftImg8bit/<split>/<city>/"):
        _load(make_recipe, root)


def test_missing_counterpart_is_named(tmp_path, png, make_recipe):
    root = _cityscapes(tmp_path, png)
    (root / "gtFine" / "val" / "lindau" / "lindau_000000_000001_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match=rf"^data\.root: expected gtFine/val/lindau/lindau_000000_000001_gtFine_labelIds\.png in {root} to go with leftImg8bit/val/lindau/lindau_000000_000001_leftImg8bit\.png"):
        _load(make_recipe, root)


def test_bad_label_id_is_named_when_read(tmp_path, png, make_recipe):
    root = _cityscapes(tmp_path, png)
    splits, _ = _load(make_recipe, root)
    png(root / "gtFine" / "val" / "lindau" / "lindau_000000_000002_gtFine_labelIds.png", np.full((H, W), 200, dtype=np.uint8))
    with pytest.raises(DataError, match=r"^cityscapes/test sample 2 \(leftImg8bit/val/lindau/lindau_000000_000002_leftImg8bit\.png\): target 'segmentation' holds label id 200; expected 0\.\.33"):
        splits["test"].get_batch([2])


def test_empty_root(tmp_path, make_recipe):
    (tmp_path / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"holds no <city>/\*_leftImg8bit\.png images"):
        _load(make_recipe, tmp_path)
