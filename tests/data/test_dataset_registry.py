"""The dataset registry, options validation and load_splits."""

from __future__ import annotations

import pytest

from branchnas.data import _REGISTRY as REGISTRY
from branchnas.data import (
    DatasetFamily,
    TargetSpec,
    get_family,
    list_families,
    load_splits,
    register_dataset,
)
from branchnas.errors import DataError, RecipeError, UserError

BUILTINS = ["shapes", "digits", "arrays", "celeba", "multimnist", "cifar100", "nyuv2", "cityscapes"]


def test_builtins_are_registered_with_the_default_first():
    assert list_families()[: len(BUILTINS)] == BUILTINS


def test_unknown_name_lists_the_families_and_suggests_one():
    with pytest.raises(UserError) as err:
        get_family("shape")
    message = str(err.value)
    assert message.startswith("unknown dataset 'shape'; choose one of: arrays, celeba")
    assert "(did you mean 'shapes'?)" in message


class _Toy(DatasetFamily):
    name = "toy"
    summary = "a toy"

    def targets(self, options=None):
        return {"y": TargetSpec("y", "classification", 2)}

    def load(self, request):  # pragma: no cover - never loaded
        raise NotImplementedError


def test_register_and_refuse_a_duplicate(monkeypatch):
    monkeypatch.setattr("branchnas.data._REGISTRY", dict(REGISTRY))
    assert register_dataset(_Toy) is _Toy
    assert get_family("toy").summary == "a toy"
    with pytest.raises(ValueError, match="dataset family 'toy' is already registered"):
        register_dataset(_Toy)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(get_family("shapes"))


def test_options_are_validated_like_recipes():
    family = get_family("shapes")
    with pytest.raises(RecipeError, match=r"^data\.options\.siz: unknown key \(did you mean 'size'\?\); valid keys here: size"):
        family.parse_options({"siz": 32})
    with pytest.raises(RecipeError, match=r"^data\.options\.size: expected an integer; got 'big'"):
        family.parse_options({"size": "big"})
    assert family.parse_options({"size": 32}).size == 32
    with pytest.raises(RecipeError, match=r"^data\.options: the nyuv2 dataset takes no options; got foo$"):
        get_family("nyuv2").parse_options({"foo": 1})


def test_load_splits_uses_the_default_tasks_and_only_their_targets(make_recipe):
    splits, tasks = load_splits(make_recipe(num_train=12, num_val=5, num_test=6, options={"size": 16}))
    assert sorted(splits) == ["test", "train", "val"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [12, 5, 6]
    names = [t.name for t in tasks]
    assert names == ["segmentation", "depth", "normals", "edges", "shape", "colour", "count"]
    assert list(splits["train"].targets) == names
    assert splits["train"].mean == splits["test"].mean  # normalised with the training statistics


def test_load_splits_with_recipe_tasks_loads_just_those(make_recipe):
    recipe = make_recipe(num_train=4, num_val=2, num_test=2, options={"size": 16},
                         tasks=[{"name": "shape_id", "kind": "classification", "target": "shape"},
                                {"name": "depth", "kind": "depth"}])
    splits, tasks = load_splits(recipe)
    assert [t.name for t in tasks] == ["shape_id", "depth"]
    assert sorted(splits["val"].targets) == ["depth", "shape"]
    _, targets = splits["val"].get_batch([0, 1])
    assert sorted(targets) == ["depth", "shape"]


def test_splits_are_fixed_by_the_seed(make_recipe):
    import torch

    def first_images(seed):
        splits, _ = load_splits(make_recipe(seed=seed, num_train=4, num_val=4, num_test=4, options={"size": 16}))
        return {s: splits[s].get_batch([0, 1])[0] for s in splits}

    a, b, c = first_images(0), first_images(0), first_images(1)
    assert all(torch.equal(a[s], b[s]) for s in a)
    assert not torch.equal(a["train"], c["train"])
    assert not torch.equal(a["train"], a["val"]) and not torch.equal(a["val"], a["test"])


def test_unknown_dataset_in_a_recipe(make_recipe):
    with pytest.raises(RecipeError, match=r"^data\.dataset: unknown dataset 'digit'.*did you mean 'digits'"):
        load_splits(make_recipe("digit"))


def test_a_task_naming_a_missing_target(make_recipe):
    recipe = make_recipe(tasks=[{"name": "x", "kind": "depth", "target": "dpeth"}], options={"size": 16})
    with pytest.raises(RecipeError, match=r"^tasks\[0\]\.target: the shapes dataset has no target 'dpeth'.*did you mean 'depth'"):
        load_splits(recipe)


def test_generated_datasets_need_a_number_of_images(make_recipe):
    with pytest.raises(DataError, match=r"^data\.num_val: 0 means 'all available', but the shapes dataset is generated"):
        load_splits(make_recipe(num_val=0))


def test_bad_image_size(make_recipe):
    with pytest.raises(RecipeError, match=r"^data\.image_size: expected \[\] or \[height, width\] with positive sizes"):
        load_splits(make_recipe(image_size=[0, 4], num_train=2, num_val=2, num_test=2, options={"size": 16}))
