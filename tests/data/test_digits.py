"""The built-in two-digit dataset built from scikit-learn's handwritten digits."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from branchnas.data import load_splits
from branchnas.data.digits import DigitsOptions, make_pairs, source_digits, source_pools


@pytest.fixture(scope="module")
def pairs():
    return make_pairs(200, seed=3, split="train")


def test_labels_are_those_of_the_source_digits(pairs):
    target = load_digits().target
    np.testing.assert_array_equal(pairs["left"], target[pairs["left_index"]])
    np.testing.assert_array_equal(pairs["right"], target[pairs["right_index"]])


def test_pair_properties(pairs):
    left, right = pairs["left"], pairs["right"]
    for i in range(len(left)):
        assert pairs["sum"][i] == left[i] + right[i]
        assert pairs["parity"][i] == float((left[i] + right[i]) % 2 == 1)
        assert pairs["greater"][i] == float(left[i] > right[i])
        assert pairs["same"][i] == float(left[i] == right[i])
    assert 0 < pairs["parity"].mean() < 1 and 0 < pairs["greater"].mean() < 1


def test_each_image_is_its_two_digits_pasted_at_their_offsets(pairs):
    digits, _ = source_digits(2)
    side = digits.shape[-1]
    for i in range(20):
        (ly, lx), (ry, rx) = pairs["left_offset"][i], pairs["right_offset"][i]
        left = np.zeros((24, 32), dtype=np.uint8)
        right = np.zeros((24, 32), dtype=np.uint8)
        left[ly:ly + side, lx:lx + side] = digits[pairs["left_index"][i]]
        right[ry:ry + side, rx:rx + side] = digits[pairs["right_index"][i]]
        np.testing.assert_array_equal(pairs["image"][i, 0], np.maximum(left, right))
    assert (pairs["left_offset"][:, 1] < pairs["right_offset"][:, 1]).all()


def test_splits_never_share_a_source_digit():
    pools = source_pools(0, 1797)
    assert sum(len(p) for p in pools.values()) == 1797
    used = {}
    for split in ("train", "val", "test"):
        made = make_pairs(300, seed=0, split=split)
        used[split] = set(made["left_index"]) | set(made["right_index"])
        assert used[split] <= set(pools[split].tolist())
    assert not used["train"] & used["test"] and not used["train"] & used["val"] and not used["val"] & used["test"]


def test_deterministic_and_seeded():
    a, b = make_pairs(30, 1, "val"), make_pairs(30, 1, "val")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["image"], make_pairs(30, 2, "val")["image"])


def test_scale_sets_the_canvas():
    assert make_pairs(2, 0, "train", DigitsOptions(scale=1))["image"].shape == (2, 1, 12, 16)


def test_loaded_splits(make_recipe):
    splits, tasks = load_splits(make_recipe("digits", num_train=20, num_val=5, num_test=5))
    assert [t.name for t in tasks] == ["left", "right", "parity", "greater"]
    images, targets = splits["test"].get_batch([0, 1, 2])
    assert images.shape == (3, 1, 24, 32)
    assert targets["left"].dtype.is_floating_point is False
    assert splits["train"].in_channels == 1 and not splits["train"].can_flip
