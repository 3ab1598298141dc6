"""Datasets in use: get_batch, batches(), flips, resizing, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from branchnas.data import TargetSpec, TensorDataset, batches, load_splits

SHAPE_TASKS = ["segmentation", "depth", "normals", "edges", "shape", "colour", "count", "floor", "distance"]


@pytest.fixture(scope="module")
def shapes_train():
    from branchnas.recipe import Recipe, recipe_from_dict, recipe_to_dict

    raw = recipe_to_dict(Recipe())
    raw["data"].update(num_train=40, num_val=8, num_test=8, options={"size": 16})
    kinds = {"segmentation": "segmentation", "depth": "depth", "normals": "normals", "edges": "edges",
             "floor": "attribute", "distance": "regression"}
    raw["tasks"] = [{"name": n, "kind": kinds.get(n, "classification")} for n in SHAPE_TASKS]
    splits, _ = load_splits(recipe_from_dict(raw))
    return splits["train"]


def _indexed(n: int = 10) -> TensorDataset:
    """A dataset whose 'id' target is the sample index, to see which samples a batch holds."""
    images = np.random.default_rng(0).integers(0, 256, size=(n, 3, 4, 6), dtype=np.uint8)
    specs = {"id": TargetSpec("id", "classification", n)}
    return TensorDataset(images, {"id": np.arange(n)}, specs, mean=(0.5,) * 3, std=(0.25,) * 3,
                         can_flip=True, name="test/train")


def _epoch(dataset, **kw):
    return list(batches(dataset, 4, seed=kw.pop("seed", 0), epoch=kw.pop("epoch", 0), **kw))


def test_batches_are_fixed_by_seed_and_epoch(shapes_train):
    one = _epoch(shapes_train, shuffle=True, augment=True)
    two = _epoch(shapes_train, shuffle=True, augment=True)
    for (xa, ya), (xb, yb) in zip(one, two, strict=True):
        assert torch.equal(xa, xb)
        assert all(torch.equal(ya[k], yb[k]) for k in ya)
    other = _epoch(shapes_train, shuffle=True, augment=True, epoch=1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(one, other, strict=True))


def test_an_epoch_visits_every_sample_once():
    dataset = _indexed(10)
    seen = torch.cat([y["id"] for _, y in _epoch(dataset, shuffle=True, augment=False)])
    assert sorted(seen.tolist()) == list(range(10))
    assert seen.tolist() != list(range(10))  # shuffled
    in_order = torch.cat([y["id"] for _, y in _epoch(dataset, shuffle=False, augment=False)])
    assert in_order.tolist() == list(range(10))
    other_seed = torch.cat([y["id"] for _, y in _epoch(dataset, shuffle=True, augment=False, seed=1)])
    assert other_seed.tolist() != seen.tolist()


def test_drop_last_and_batch_sizes():
    dataset = _indexed(10)
    assert [len(y["id"]) for _, y in _epoch(dataset, shuffle=True, augment=False)] == [4, 4, 2]
    assert [len(y["id"]) for _, y in _epoch(dataset, shuffle=True, augment=False, drop_last=True)] == [4, 4]


def test_resuming_at_a_batch_yields_the_same_remaining_batches(shapes_train):
    full = _epoch(shapes_train, shuffle=True, augment=True, epoch=3)
    resumed = list(batches(shapes_train, 4, shuffle=True, seed=0, epoch=3, augment=True, start=4))
    assert len(resumed) == len(full) - 4
    for (xa, ya), (xb, yb) in zip(full[4:], resumed, strict=True):
        assert torch.equal(xa, xb) and all(torch.equal(ya[k], yb[k]) for k in ya)


def test_batches_follow_the_tensor_contract(shapes_train):
    images, targets = shapes_train.get_batch([0, 1, 2])
    assert images.dtype == torch.float32 and images.shape == (3, 3, 16, 16)
    expected = {
        "segmentation": (torch.int64, (3, 16, 16)), "depth": (torch.float32, (3, 1, 16, 16)),
        "normals": (torch.float32, (3, 3, 16, 16)), "edges": (torch.float32, (3, 1, 16, 16)),
        "shape": (torch.int64, (3,)), "colour": (torch.int64, (3,)), "count": (torch.int64, (3,)),
        "floor": (torch.float32, (3,)), "distance": (torch.float32, (3, 1)),
    }
    assert {k: (v.dtype, tuple(v.shape)) for k, v in targets.items()} == expected


def test_images_are_normalised_with_the_dataset_statistics():
    dataset = _indexed(4)
    images, _ = dataset.get_batch([2, 0])
    raw = dataset.images[[2, 0]].astype(np.float32) / 255
    np.testing.assert_allclose(images.numpy(), (raw - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


def _mirror(value: torch.Tensor, normals: bool = False) -> torch.Tensor:
    out = value.flip(-1).clone()
    if normals:
        out[:, 0] = -out[:, 0]
    return out


def test_augment_flips_image_and_every_dense_target_together(shapes_train):
    index = list(range(24))
    plain_x, plain_y = shapes_train.get_batch(index)
    aug_x, aug_y = shapes_train.get_batch(index, augment=True, rng=torch.Generator().manual_seed(1))
    flipped = []
    for i in index:
        is_flipped = torch.equal(aug_x[i], plain_x[i].flip(-1))
        assert is_flipped or torch.equal(aug_x[i], plain_x[i])
        flipped.append(is_flipped)
        for name in ("segmentation", "depth", "edges"):
            want = plain_y[name][i].flip(-1) if is_flipped else plain_y[name][i]
            assert torch.equal(aug_y[name][i], want), name
        want = _mirror(plain_y["normals"][i:i + 1], normals=True)[0] if is_flipped else plain_y["normals"][i]
        assert torch.equal(aug_y["normals"][i], want)
        for name in ("shape", "colour", "count", "floor", "distance"):
            assert torch.equal(aug_y[name][i], plain_y[name][i]), name
    assert 0 < sum(flipped) < len(index)


def test_datasets_that_cannot_flip_ignore_augment(make_recipe):
    splits, _ = load_splits(make_recipe("digits", num_train=16, num_val=4, num_test=4))
    train = splits["train"]
    assert not train.can_flip
    plain, _ = train.get_batch(range(16))
    for seed in range(3):
        aug, _ = train.get_batch(range(16), augment=True, rng=torch.Generator().manual_seed(seed))
        assert torch.equal(plain, aug)


def test_resize_keeps_labels_labels_and_normals_unit(shapes_train):
    small = shapes_train.resized((12, 20))
    assert small.image_size == (12, 20) and len(small) == len(shapes_train)
    images, targets = small.get_batch(range(8))
    assert images.shape == (8, 3, 12, 20)
    original = shapes_train.get_batch(range(8))[1]
    assert set(targets["segmentation"].unique().tolist()) <= set(original["segmentation"].unique().tolist())
    assert set(targets["edges"].unique().tolist()) <= {0.0, 1.0}
    norms = targets["normals"].norm(dim=1)
    assert torch.all((norms - 1).abs() < 1e-4)
    assert targets["depth"].min() >= original["depth"].min() - 1e-4
    assert torch.equal(targets["shape"], original["shape"])


def test_load_splits_resizes_every_split(make_recipe):
    splits, _ = load_splits(make_recipe(num_train=8, num_val=4, num_test=4, image_size=[8, 12], options={"size": 16}))
    for split in splits.values():
        images, targets = split.get_batch([0, 1])
        assert images.shape == (2, 3, 8, 12)
        assert targets["segmentation"].shape == (2, 8, 12)
