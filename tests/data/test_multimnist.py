"""MultiMNIST adapter on tiny MNIST idx files (plain and gzipped)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from branchnas.data import load_splits
from branchnas.data.multimnist import read_idx
from branchnas.errors import DataError

N_TRAIN, N_TEST = 30, 10


def _idx(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n)


def _mnist(tmp_path, gz_test: bool = True):
    """Train files plain (memory-mapped), test files gzipped, as both occur in the wild."""
    root = tmp_path / "mnist"
    root.mkdir()
    sources = {"train": _digits(N_TRAIN, 0), "test": _digits(N_TEST, 1)}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = sources[part]
        for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx(array)
            if part == "test" and gz_test:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root, sources


def _load(make_recipe, root, **data):
    data = {"num_train": 12, "num_val": 6, "num_test": 0, **data}
    return load_splits(make_recipe("multimnist", root=str(root), **data))


def test_images_and_labels_come_from_their_source_digits(tmp_path, make_recipe, pixels):
    root, sources = _mnist(tmp_path)
    splits, tasks = _load(make_recipe, root)
    assert [t.name for t in tasks] == ["left", "right"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [12, 6, N_TEST]
    for split in splits.values():
        images, labels = sources[split.pairs["source"]]
        batch, targets = split.get_batch(range(len(split)))
        assert batch.shape[1:] == (1, 36, 36)
        left, right, offsets = split.pairs["left"], split.pairs["right"], split.pairs["offsets"]
        np.testing.assert_array_equal(targets["left"].numpy(), labels[left])
        np.testing.assert_array_equal(targets["right"].numpy(), labels[right])
        for i in range(len(split)):
            canvas = np.zeros((2, 36, 36))
            (ly, lx, ry, rx) = offsets[i]
            canvas[0, ly:ly + 28, lx:lx + 28] = images[left[i]]
            canvas[1, ry:ry + 28, rx:rx + 28] = images[right[i]]
            np.testing.assert_allclose(pixels(split, batch[i:i + 1])[0, 0], canvas.max(0), atol=1e-3)
        assert (offsets[:, :2] <= 4).all() and (offsets[:, 2:] >= 4).all()


def test_train_and_val_share_no_source_digit(tmp_path, make_recipe):
    root, _ = _mnist(tmp_path)
    splits, _ = _load(make_recipe, root)
    used = {s: set(splits[s].pairs["left"]) | set(splits[s].pairs["right"]) for s in ("train", "val")}
    assert not used["train"] & used["val"]
    assert len(set(splits["train"].pairs["left"])) == 12  # one image per source digit


def test_flat_layout_under_mnist_raw_and_determinism(tmp_path, make_recipe):
    root, _ = _mnist(tmp_path, gz_test=False)
    nested = tmp_path / "tv" / "MNIST" / "raw"
    nested.parent.mkdir(parents=True)
    root.rename(nested)
    a, _ = _load(make_recipe, tmp_path / "tv")
    b, _ = _load(make_recipe, tmp_path / "tv")
    assert np.array_equal(a["train"].pairs["right"], b["train"].pairs["right"])
    assert np.array_equal(a["train"].get_batch([0, 1])[0].numpy(), b["train"].get_batch([0, 1])[0].numpy())


def test_missing_file_is_named(tmp_path, make_recipe):
    root, _ = _mnist(tmp_path)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=rf"^data\.root: expected t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte\.gz\) in {root} \(MNIST's raw files"):
        _load(make_recipe, root)


def test_malformed_idx_files(tmp_path, make_recipe):
    root, _ = _mnist(tmp_path)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"^train-images-idx3-ubyte: \d+ bytes but its header announces \d+; the file is truncated"):
        _load(make_recipe, root)
    labels = root / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.arange(N_TRAIN).reshape(N_TRAIN, 1, 1)))
    with pytest.raises(DataError, match=r"^train-labels-idx1-ubyte: not an MNIST labels \(idx1\) file"):
        read_idx(labels, 1)


def test_label_out_of_range(tmp_path, make_recipe):
    root, _ = _mnist(tmp_path)
    labels = np.zeros(N_TRAIN, dtype=np.uint8)
    labels[17] = 12
    (root / "train-labels-idx1-ubyte").write_bytes(_idx(labels))
    with pytest.raises(DataError, match=r"^train-labels-idx1-ubyte entry 17: target 'digit' holds label 12, outside \[0, 10\)"):
        _load(make_recipe, root)
