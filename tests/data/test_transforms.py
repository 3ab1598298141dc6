"""Array transforms: the flip augmentation and the resizing of dense targets."""

from __future__ import annotations

import numpy as np

from branchnas.data import TargetSpec
from branchnas.data.transforms import hflip, resize_target


def test_flipping_twice_is_the_identity():
    rng = np.random.default_rng(0)
    specs = {"n": TargetSpec("n", "normals", channels=3), "s": TargetSpec("s", "segmentation", 5),
             "c": TargetSpec("c", "classification", 3)}
    images = rng.random((4, 3, 5, 7)).astype(np.float32)
    targets = {"n": rng.normal(size=(4, 3, 5, 7)).astype(np.float32),
               "s": rng.integers(0, 5, (4, 5, 7)), "c": np.array([0, 1, 2, 0])}
    copies = images.copy(), {k: v.copy() for k, v in targets.items()}
    mask = np.array([True, False, True, True])
    hflip(images, targets, specs, mask)
    assert not np.array_equal(images, copies[0])
    np.testing.assert_array_equal(targets["n"][0, 0], -copies[1]["n"][0, 0, :, ::-1])  # x negated
    np.testing.assert_array_equal(targets["n"][0, 1], copies[1]["n"][0, 1, :, ::-1])
    np.testing.assert_array_equal(targets["n"][1], copies[1]["n"][1])  # not in the mask
    hflip(images, targets, specs, mask)
    np.testing.assert_array_equal(images, copies[0])
    for k in targets:
        np.testing.assert_array_equal(targets[k], copies[1][k])


def test_nearest_resize_of_labels_repeats_pixels():
    spec = TargetSpec("s", "segmentation", 4)
    labels = np.random.default_rng(0).integers(0, 4, (2, 3, 5)).astype(np.uint8)
    up = resize_target(spec, labels, (6, 10))
    np.testing.assert_array_equal(up, labels.repeat(2, axis=1).repeat(2, axis=2))


def test_depth_resize_never_mixes_missing_and_valid_depth():
    spec = TargetSpec("d", "depth")
    depth = np.full((1, 1, 8, 8), 5.0, dtype=np.float32)
    depth[0, 0, 2:5, 3:6] = 0.0  # a hole of missing depth
    for size in ((4, 4), (5, 7), (16, 16)):
        out = resize_target(spec, depth, size)
        assert set(np.unique(np.round(out, 5))) == {0.0, 5.0}, size
