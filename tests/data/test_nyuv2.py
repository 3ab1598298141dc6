"""NYUv2 adapter on a tiny copy of the MTAN .npy layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from branchnas.data import load_splits
from branchnas.errors import DataError

H, W = 6, 8


def _sample(folder, i: int) -> None:
    image = np.full((H, W, 3), i / 20, dtype=np.float32)
    label = np.full((H, W), float(i % 13), dtype=np.float32)
    label[0] = -1  # unlabelled row
    depth = np.full((H, W, 1), 1.0 + i, dtype=np.float32)
    depth[:, 0] = 0  # missing depth column
    normal = np.zeros((H, W, 3), dtype=np.float32)
    normal[..., 0], normal[..., 2] = 0.6, -0.8 * 2  # not unit: (0.6, 0, -1.6)
    for name, value in (("image", image), ("label", label), ("depth", depth), ("normal", normal)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        np.save(folder / name / f"{i}.npy", value)


def _nyu(tmp_path):
    root = tmp_path / "nyuv2"
    for i in range(12):
        _sample(root / "train", i)
    for i in range(4):
        _sample(root / "val", 12 + i)
    return root


def _load(make_recipe, root, **data):
    data = {"num_train": 0, "num_val": 3, "num_test": 0, **data}
    return load_splits(make_recipe("nyuv2", root=str(root), **data))


def test_targets_follow_the_files(tmp_path, make_recipe, pixels):
    root = _nyu(tmp_path)
    splits, tasks = _load(make_recipe, root)
    assert [t.name for t in tasks] == ["segmentation", "depth", "normals"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [9, 3, 4]
    for name, split in splits.items():
        images, targets = split.get_batch(range(len(split)))
        assert images.shape[1:] == (3, H, W)
        rows = np.rint(pixels(split, images)[:, 0, 2, 2] / 255 * 20).astype(int)
        if name == "test":
            assert sorted(rows) == [12, 13, 14, 15]  # MTAN's val folder is the test split
        seg = targets["segmentation"]
        assert (seg[:, 0] == 255).all()
        np.testing.assert_array_equal(seg[:, 3, 3].numpy(), rows % 13)
        np.testing.assert_allclose(targets["depth"][:, 0, 2, 2].numpy(), 1.0 + rows)
        assert (targets["depth"][:, 0, :, 0] == 0).all()
        expected = torch.tensor([0.6, 0.0, -1.6]) / np.hypot(0.6, 1.6)
        assert torch.allclose(targets["normals"][:, :, 3, 3], expected.float().expand(len(split), 3), atol=1e-6)


def test_only_the_needed_folders_are_required(tmp_path, make_recipe):
    import shutil

    root = _nyu(tmp_path)
    for part in ("train", "val"):
        shutil.rmtree(root / part / "normal")
    splits, _ = _load(make_recipe, root, tasks=[{"name": "depth", "kind": "depth"}])
    assert list(splits["train"].targets) == ["depth"]
    with pytest.raises(DataError, match=rf"^data\.root: expected train/normal/ \(for normals\) in {root} \(train/ and val/, each with image/"):
        _load(make_recipe, root)


def test_missing_sample_file_and_missing_root(tmp_path, make_recipe):
    root = _nyu(tmp_path)
    (root / "val" / "depth" / "13.npy").unlink()
    with pytest.raises(DataError, match=rf"^data\.root: expected val/depth/13\.npy in {root} to go with val/image/13\.npy"):
        _load(make_recipe, root)
    with pytest.raises(DataError, match=r"^data\.root: expected train/image/ in .*empty"):
        (tmp_path / "empty").mkdir()
        _load(make_recipe, tmp_path / "empty")


def test_bad_samples_are_named_when_read(tmp_path, make_recipe):
    root = _nyu(tmp_path)
    splits, _ = _load(make_recipe, root)
    depth = np.load(root / "val" / "depth" / "14.npy")
    depth[2, 2] = np.nan
    np.save(root / "val" / "depth" / "14.npy", depth)
    with pytest.raises(DataError, match=r"^nyuv2/test sample 2 \(val/image/14\.npy\): target 'depth' holds NaN or inf"):
        splits["test"].get_batch([2])
    np.save(root / "val" / "label" / "15.npy", np.full((H, W), 13.0, dtype=np.float32))
    with pytest.raises(DataError, match=r"^nyuv2/test sample 3 \(val/image/15\.npy\): target 'segmentation' holds label 13, outside \[0, 13\)"):
        splits["test"].get_batch([3])
    np.save(root / "val" / "image" / "12.npy", np.zeros((H + 1, W, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"^nyuv2/test sample 0 \(val/image/12\.npy\): image is 7x8 but this dataset's images are 6x8$"):
        splits["test"].get_batch([0])
