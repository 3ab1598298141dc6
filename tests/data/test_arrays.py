"""The arrays family: your own data from a .npz file or a folder of images plus a CSV."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from branchnas.data import load_splits
from branchnas.errors import DataError, RecipeError

N = 20
TASKS = [
    {"name": "label", "kind": "classification"},
    {"name": "seg", "kind": "segmentation", "num_classes": 4},
    {"name": "depth", "kind": "depth"},
    {"name": "flag", "kind": "attribute"},
    {"name": "box", "kind": "regression"},
]


def _npz_arrays(n: int = N) -> dict[str, np.ndarray]:
    """Every sample encodes its row: image pixel (0, 0, 0) = row, and each target derives from it."""
    rows = np.arange(n)
    images = np.zeros((n, 6, 8, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = rows
    seg = np.broadcast_to((rows % 4)[:, None, None], (n, 6, 8)).astype(np.uint8).copy()
    seg[:, 0, :] = 255  # ignored pixels are fine
    return {
        "images": images,
        "label": rows % 3,
        "seg": seg,
        "depth": np.broadcast_to((rows + 1.0)[:, None, None], (n, 6, 8)).astype(np.float32),
        "flag": (rows % 2).astype(np.float32),
        "box": np.stack([rows, -rows], axis=1).astype(np.float32),
    }


def _save(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def _rows(split, pixels) -> np.ndarray:
    images, _ = split.get_batch(range(len(split)))
    return np.rint(pixels(split, images)[:, 0, 0, 0]).astype(int)


def test_npz_round_trip(tmp_path, make_recipe, pixels):
    root = _save(tmp_path, **_npz_arrays())
    splits, tasks = load_splits(make_recipe("arrays", root=root, tasks=TASKS, num_train=0, num_val=4, num_test=4))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert tasks[0].num_classes == 3  # inferred from the labels
    assert splits["train"].targets["box"].channels == 2
    seen = []
    for split in splits.values():
        rows = _rows(split, pixels)
        seen += rows.tolist()
        _, targets = split.get_batch(range(len(split)))
        np.testing.assert_array_equal(targets["label"].numpy(), rows % 3)
        np.testing.assert_array_equal(targets["seg"][:, 1, 1].numpy(), rows % 4)
        assert (targets["seg"][:, 0] == 255).all()
        np.testing.assert_array_equal(targets["depth"][:, 0, 2, 2].numpy(), rows + 1.0)
        np.testing.assert_array_equal(targets["flag"].numpy(), rows % 2)
        np.testing.assert_array_equal(targets["box"].numpy(), np.stack([rows, -rows], 1))
    assert sorted(seen) == list(range(N))  # disjoint splits that cover the file


def test_npz_split_array_fixes_the_splits(tmp_path, make_recipe, pixels):
    arrays = _npz_arrays()
    arrays["split"] = np.array(["train"] * 10 + ["val"] * 5 + ["test"] * 5)
    root = _save(tmp_path, **arrays)
    splits, _ = load_splits(make_recipe("arrays", root=root, tasks=TASKS[:1], num_train=0, num_val=0, num_test=0))
    assert sorted(_rows(splits["val"], pixels)) == list(range(10, 15))
    assert sorted(_rows(splits["test"], pixels)) == list(range(15, 20))


def test_npz_bad_data_names_the_sample_and_target(tmp_path, make_recipe):
    def load(**changes):
        arrays = {**_npz_arrays(), **changes}
        return load_splits(make_recipe("arrays", root=_save(tmp_path, **arrays), tasks=TASKS,
                                       num_train=0, num_val=4, num_test=4))

    depth = _npz_arrays()["depth"].copy()
    depth[7, 2, 3] = np.nan
    with pytest.raises(DataError, match=r"^data\.npz sample 7: target 'depth' holds NaN or inf"):
        load(depth=depth)
    seg = _npz_arrays()["seg"].copy()
    seg[5, 3, 3] = 4
    with pytest.raises(DataError, match=r"^data\.npz sample 5: target 'seg' holds label 4, outside \[0, 4\) and not 255"):
        load(seg=seg)
    flag = _npz_arrays()["flag"].copy()
    flag[2] = 0.5
    with pytest.raises(DataError, match=r"^data\.npz sample 2: target 'flag' holds 0\.5; expected 0 or 1"):
        load(flag=flag)
    with pytest.raises(DataError, match=r"'images' has shape \(20, 6, 8, 5\); expected \(N, H, W, C\)"):
        load(images=np.zeros((N, 6, 8, 5), dtype=np.uint8))
    with pytest.raises(DataError, match=r"'images' holds float32; expected uint8"):
        load(images=np.zeros((N, 6, 8, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"target 'seg' is 5x8 but the images are 6x8"):
        load(seg=np.zeros((N, 5, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"'label' has 19 entries but 'images' has 20"):
        load(label=np.arange(19))


def test_npz_missing_pieces(tmp_path, make_recipe):
    arrays = _npz_arrays()
    del arrays["depth"]
    root = _save(tmp_path, **arrays)
    with pytest.raises(DataError, match=r"data\.npz: no array 'depth' for the depth task that uses it \(arrays in the file: images, label"):
        load_splits(make_recipe("arrays", root=root, tasks=TASKS, num_val=4, num_test=4, num_train=0))
    with pytest.raises(DataError, match=r"^data\.root: .*nowhere\.npz does not exist"):
        load_splits(make_recipe("arrays", root=str(tmp_path / "nowhere.npz"), tasks=TASKS))
    with pytest.raises(DataError, match=r"^data\.root: the arrays dataset reads your data; set data\.root"):
        load_splits(make_recipe("arrays", tasks=TASKS))
    with pytest.raises(RecipeError, match=r"^tasks: the arrays dataset has no default tasks"):
        load_splits(make_recipe("arrays", root=root))


def test_sizes_larger_than_the_data_are_refused(tmp_path, make_recipe):
    root = _save(tmp_path, **_npz_arrays())
    with pytest.raises(DataError, match=r"num_train=1600 \+ num_val=500 \+ num_test=500 needs more images than data\.npz holds \(20\)"):
        load_splits(make_recipe("arrays", root=root, tasks=TASKS))


# --------------------------------------------------------------------------- folder layout


def _folder(tmp_path, png, n: int = 12, sizes=None):
    """images/ with PNGs whose red pixel (0, 0) is the row, labels.csv, seg/ PNGs, depth/ .npy."""
    root = tmp_path / "mydata"
    lines = ["file,animal,score,split"]
    for i in range(n):
        h, w = (sizes or {}).get(i, (6, 8))
        image = np.zeros((h, w, 3), dtype=np.uint8)
        image[0, 0, 0] = 10 * i
        png(root / "images" / f"img{i}.png", image)
        png(root / "seg" / f"img{i}.png", np.full((h, w), i % 3, dtype=np.uint8))
        (root / "depth").mkdir(exist_ok=True)
        np.save(root / "depth" / f"img{i}.npy", np.full((h, w), i + 0.5, dtype=np.float32))
        split = "test" if i >= n - 2 else "val" if i >= n - 4 else "train"
        lines.append(f"img{i}.png,{['cat', 'dog'][i % 2]},{i / 2},{split}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


FOLDER_TASKS = [
    {"name": "animal", "kind": "classification"},
    {"name": "score", "kind": "regression"},
    {"name": "seg", "kind": "segmentation", "num_classes": 3},
    {"name": "depth", "kind": "depth"},
]


def _load_folder(root, make_recipe, tasks=FOLDER_TASKS, **data):
    data = {"num_train": 0, "num_val": 0, "num_test": 0, **data}
    return load_splits(make_recipe("arrays", root=str(root), tasks=tasks, **data))


def test_folder_round_trip(tmp_path, png, make_recipe, pixels):
    root = _folder(tmp_path, png)
    splits, tasks = _load_folder(root, make_recipe)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    assert tasks[0].num_classes == 2  # class names become indices in sorted order
    assert "cat=0, dog=1" in splits["train"].targets["animal"].description
    for split in splits.values():
        images, targets = split.get_batch(range(len(split)))
        rows = np.rint(pixels(split, images)[:, 0, 0, 0] / 10).astype(int)
        np.testing.assert_array_equal(targets["animal"].numpy(), rows % 2)
        np.testing.assert_allclose(targets["score"][:, 0].numpy(), rows / 2)
        np.testing.assert_array_equal(targets["seg"][:, 2, 2].numpy(), rows % 3)
        np.testing.assert_allclose(targets["depth"][:, 0, 1, 1].numpy(), rows + 0.5)
    assert sorted(np.rint(pixels(splits["test"], splits["test"].get_batch([0, 1])[0])[:, 0, 0, 0] / 10)) == [10, 11]


def test_folder_reads_images_only_when_a_batch_needs_them(tmp_path, png, make_recipe):
    root = _folder(tmp_path, png)
    splits, _ = _load_folder(root, make_recipe)
    for i in range(12):
        (root / "images" / f"img{i}.png").unlink()
    with pytest.raises(DataError, match=r"^arrays/val sample 0 \(images/img\d+\.png\): file .* is missing"):
        splits["val"].get_batch([0])


def test_folder_bad_data(tmp_path, png, make_recipe):
    root = _folder(tmp_path, png)
    np.save(root / "depth" / "img10.npy", np.full((6, 8), np.inf, dtype=np.float32))
    splits, _ = _load_folder(root, make_recipe)
    with pytest.raises(DataError, match=r"^arrays/test sample 0 \(images/img10\.png\): target 'depth' holds NaN or inf"):
        splits["test"].get_batch([0, 1])
    png(root / "seg" / "img11.png", np.full((6, 8), 7, dtype=np.uint8))
    with pytest.raises(DataError, match=r"^arrays/test sample 1 \(images/img11\.png\): target 'seg' holds label 7, outside \[0, 3\)"):
        splits["test"].get_batch([1])


def test_folder_label_out_of_range_in_the_csv(tmp_path, png, make_recipe):
    root = _folder(tmp_path, png)
    text = (root / "labels.csv").read_text().replace("img3.png,dog,1.5", "img3.png,dog,oops")
    (root / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=r"^labels\.csv line 5 \(img3\.png\): target 'score' is 'oops'; expected a number"):
        _load_folder(root, make_recipe)
    lines = ["file,kind"] + [f"img{i}.png,{i % 3}" for i in range(12)]
    (root / "labels.csv").write_text("\n".join(lines))
    tasks = [{"name": "kind", "kind": "classification", "num_classes": 2}]
    with pytest.raises(DataError, match=r"^labels\.csv line 4 \(img2\.png\): target 'kind' holds label 2, outside \[0, 2\)"):
        _load_folder(root, make_recipe, tasks=tasks)


def test_folder_images_of_another_size(tmp_path, png, make_recipe):
    root = _folder(tmp_path, png, sizes={9: (10, 12)})
    splits, _ = _load_folder(root, make_recipe, tasks=FOLDER_TASKS[:1])
    with pytest.raises(DataError, match=r"image is 10x12 but this dataset's images are 6x8; set data\.image_size"):
        splits["val"].get_batch([0, 1])
    resized, _ = _load_folder(root, make_recipe, image_size=[6, 8])
    images, targets = resized["val"].get_batch([0, 1])
    assert images.shape == (2, 3, 6, 8) and targets["depth"].shape == (2, 1, 6, 8)


def test_folder_layout_errors(tmp_path, png, make_recipe):
    root = _folder(tmp_path, png)
    (root / "depth" / "img4.npy").unlink()
    with pytest.raises(DataError, match=r"no depth file for image img4\.png; expected depth/img4\.png or depth/img4\.npy"):
        _load_folder(root, make_recipe)
    with pytest.raises(DataError, match=r"^labels\.csv: no column 'weight' \(or weight\.0, weight\.1, \.\.\.\) for the regression target \(columns: file, animal"):
        _load_folder(root, make_recipe, tasks=[{"name": "weight", "kind": "regression"}])
    with pytest.raises(RecipeError, match=r"segmentation target 'seg' is read from files; give its task num_classes"):
        _load_folder(root, make_recipe, tasks=[{"name": "seg", "kind": "segmentation"}])
    (root / "labels.csv").unlink()
    with pytest.raises(DataError, match=r"^data\.root: expected labels\.csv in .*mydata \(labels\.csv with a 'file' column"):
        _load_folder(root, make_recipe)


def test_flip_option(tmp_path, make_recipe):
    root = _save(tmp_path, **_npz_arrays())
    recipe = make_recipe("arrays", root=root, tasks=TASKS[:1], num_train=0, num_val=4, num_test=4,
                         options={"flip": False})
    splits, _ = load_splits(recipe)
    plain, _ = splits["train"].get_batch(range(12))
    flipped, _ = splits["train"].get_batch(range(12), augment=True, rng=torch.Generator().manual_seed(0))
    assert torch.equal(plain, flipped)


def test_split_column_without_val_carves_val_out_of_train(tmp_path, make_recipe, pixels):
    arrays = _npz_arrays()
    arrays["split"] = np.array([0] * 16 + [2] * 4)  # codes 0/1/2 work as well as names
    root = _save(tmp_path, **arrays)
    splits, _ = load_splits(make_recipe("arrays", root=root, tasks=TASKS[:1], num_train=0, num_val=3, num_test=0))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [13, 3, 4]
    assert set(_rows(splits["val"], pixels)) < set(range(16))
    assert sorted(_rows(splits["test"], pixels)) == [16, 17, 18, 19]
    arrays["split"] = np.array(["train"] * 16 + ["exam"] * 4)
    with pytest.raises(DataError, match=r"^data\.npz sample 16: split is 'exam'; expected train, val or test"):
        load_splits(make_recipe("arrays", root=_save(tmp_path, **arrays), tasks=TASKS[:1]))
