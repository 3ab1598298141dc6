"""CelebA adapter on a tiny copy of the torchvision layout."""

from __future__ import annotations

import numpy as np
import pytest

from branchnas.data import load_splits
from branchnas.data.celeba import ATTRIBUTES
from branchnas.errors import DataError, RecipeError

FILES = [f"{i:06d}.jpg" for i in range(1, 8)]
PARTITION = [0, 0, 0, 1, 1, 2, 2]


def _values(i: int) -> list[int]:
    """Attribute j of image i is 1 when (i + j) is even, else -1."""
    return [1 if (i + j) % 2 == 0 else -1 for j in range(len(ATTRIBUTES))]


def _celeba(tmp_path, png, nested: bool = True):
    from PIL import Image

    root = tmp_path / "data"
    folder = root / "celeba" if nested else root
    (folder / "img_align_celeba").mkdir(parents=True)
    for i, name in enumerate(FILES):
        Image.fromarray(np.full((9, 7, 3), 20 * i, dtype=np.uint8)).save(folder / "img_align_celeba" / name)
    lines = [str(len(FILES)), " ".join(ATTRIBUTES)]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in _values(i)) for i, name in enumerate(FILES)]
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(f"{n} {p}" for n, p in zip(FILES, PARTITION, strict=True)))
    return root, folder


def _recipe(make_recipe, root, **data):
    data = {"num_train": 0, "num_val": 0, "num_test": 0, "options": {"attributes": ["Smiling", "Male"]}, **data}
    return make_recipe("celeba", root=str(root), **data)


def test_targets_and_splits_follow_the_files(tmp_path, png, make_recipe, pixels):
    root, _ = _celeba(tmp_path, png)
    splits, tasks = load_splits(_recipe(make_recipe, root))
    assert [t.name for t in tasks] == ["Smiling", "Male"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 2, 2]
    smiling, male = ATTRIBUTES.index("Smiling"), ATTRIBUTES.index("Male")
    for split in splits.values():
        images, targets = split.get_batch(range(len(split)))
        assert images.shape[1:] == (3, 9, 7)
        rows = np.rint(pixels(split, images)[:, 0, 4, 3] / 20).astype(int)  # JPEG: flat images survive
        expected_smiling = [(_values(i)[smiling] + 1) // 2 for i in rows]
        expected_male = [(_values(i)[male] + 1) // 2 for i in rows]
        np.testing.assert_array_equal(targets["Smiling"].numpy(), expected_smiling)
        np.testing.assert_array_equal(targets["Male"].numpy(), expected_male)
    test_rows = np.rint(pixels(splits["test"], splits["test"].get_batch([0, 1])[0])[:, 0, 4, 3] / 20)
    assert sorted(test_rows) == [5, 6]


def test_all_forty_attributes_by_default_and_the_root_itself(tmp_path, png, make_recipe):
    _, folder = _celeba(tmp_path, png, nested=False)
    splits, tasks = load_splits(_recipe(make_recipe, folder, options={}))
    assert len(tasks) == 40 and len(splits["val"].targets) == 40


@pytest.mark.parametrize("missing", ["list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"])
def test_a_missing_piece_is_named(tmp_path, png, make_recipe, missing):
    import shutil

    root, folder = _celeba(tmp_path, png, nested=False)
    target = folder / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DataError, match=rf"^data\.root: expected .*{missing.split('.')[0]}.* in {folder} \(img_align_celeba/, list_attr_celeba\.txt and list_eval_partition\.txt \(the torchvision CelebA layout\)\); see docs/datasets\.md"):
        load_splits(_recipe(make_recipe, folder))


def test_missing_or_empty_root(tmp_path, make_recipe):
    with pytest.raises(DataError, match=r"^data\.root: the celeba dataset is read from disk; set data\.root"):
        load_splits(_recipe(make_recipe, ""))
    with pytest.raises(DataError, match=r"^data\.root: .*nothing does not exist; expected a folder holding img_align_celeba/"):
        load_splits(_recipe(make_recipe, tmp_path / "nothing"))


def test_malformed_attribute_file(tmp_path, png, make_recipe):
    _, folder = _celeba(tmp_path, png, nested=False)
    path = folder / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:-2] + " 2"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"^list_attr_celeba\.txt line 5 \(000003\.jpg\): attribute 'Young' is 2; expected -1 or 1"):
        load_splits(_recipe(make_recipe, folder))
    lines[4] = "000003.jpg 1 1"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"^list_attr_celeba\.txt line 5: expected a file name and 40 values; got 3 fields"):
        load_splits(_recipe(make_recipe, folder))


def test_a_missing_image_is_named_when_read(tmp_path, png, make_recipe):
    _, folder = _celeba(tmp_path, png, nested=False)
    splits, _ = load_splits(_recipe(make_recipe, folder))
    (folder / "img_align_celeba" / "000006.jpg").unlink()
    with pytest.raises(DataError, match=r"^celeba/test sample 0 \(img_align_celeba/000006\.jpg\): file .* is missing"):
        splits["test"].get_batch([0, 1])


def test_unknown_attribute_option(make_recipe):
    from branchnas.data import get_family

    with pytest.raises(RecipeError, match=r"^data\.options\.attributes\[1\]: unknown CelebA attribute 'smiling' \(did you mean 'Smiling'\?\)"):
        get_family("celeba").parse_options({"attributes": ["Male", "smiling"]})


def test_too_many_images_asked_for(tmp_path, png, make_recipe):
    _, folder = _celeba(tmp_path, png, nested=False)
    with pytest.raises(DataError, match=r"^data\.num_train: asked for 5 images but the CelebA train partition has 3"):
        load_splits(_recipe(make_recipe, folder, num_train=5))
