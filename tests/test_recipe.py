import tomllib

import pytest

from branchnas.errors import RecipeError
from branchnas.recipe import (
    Recipe,
    TaskConfig,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    recipe_to_toml,
)


def write(path, text):
    path.write_text(text)
    return path


def test_builtin_default_is_used_without_a_recipe_file(in_tmp):
    recipe = load_recipe(None)
    assert recipe == Recipe()
    assert recipe.run_dir.as_posix() == "runs/shapes"


def test_local_branchnas_toml_is_picked_up_when_no_recipe_is_named(in_tmp):
    write(in_tmp / "branchnas.toml", 'name = "mine"\n[pretrain]\nepochs = 3\n')
    recipe = load_recipe(None)
    assert recipe.name == "mine"
    assert recipe.pretrain.epochs == 3


def test_layering_defaults_then_file_then_overrides(in_tmp):
    path = write(
        in_tmp / "r.toml",
        'name = "x"\nseed = 4\n[pretrain]\nepochs = 3\nlr = 0.1\n[data]\nnum_train = 100\n',
    )
    recipe = load_recipe(path, ["pretrain.epochs=7", "data.image_size=[32, 32]", "search.budget=2.5M"])
    assert recipe.seed == 4  # from the file
    assert recipe.pretrain.lr == 0.1  # from the file
    assert recipe.pretrain.epochs == 7  # override wins over the file
    assert recipe.data.num_train == 100
    assert recipe.data.num_val == Recipe().data.num_val  # untouched default
    assert recipe.data.image_size == [32, 32]
    assert recipe.search.budget == "2.5M"  # not a TOML value: read as a string


def test_tasks_from_a_file_replace_the_default_list_and_can_be_overridden_by_index(in_tmp):
    path = write(
        in_tmp / "r.toml",
        '[[tasks]]\nname = "seg"\nkind = "segmentation"\n[[tasks]]\nname = "depth"\nkind = "depth"\n',
    )
    recipe = load_recipe(path, ["tasks[1].weight=2"])
    assert [t.name for t in recipe.tasks] == ["seg", "depth"]
    assert recipe.tasks[1].weight == 2.0
    assert recipe.task("seg").kind == "segmentation"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"tasks": [{"name": "a", "kind": "depth"}, {"name": "b", "kind": "depth"},
                       {"name": "c", "kind": "segmantation"}]},
            "tasks[2].kind: expected one of 'classification', 'attribute', 'segmentation', 'depth', "
            "'normals', 'edges', 'regression'; got 'segmantation' (did you mean 'segmentation'?)",
        ),
        ({"pretrain": {"epoch": 3}}, "pretrain.epoch: unknown key (did you mean 'epochs'?)"),
        ({"pretrain": {"epochs": "three"}}, "pretrain.epochs: expected an integer; got 'three'"),
        ({"pretrain": {"epochs": 0}}, "pretrain.epochs: expected a value >= 1; got 0"),
        ({"pretrain": {"lr": True}}, "pretrain.lr: expected a number; got true"),
        ({"search": {"metric": "flop"}}, "search.metric: expected one of 'params', 'flops', 'latency'; got 'flop' (did you mean 'flops'?)"),
        ({"search": {"budget": "ten"}}, "search.budget: expected a plain integer"),
        ({"backbone": "resnet20"}, "backbone: expected a table; got 'resnet20'"),
        ({"tasks": {"name": "a"}}, "tasks: expected a list of tables ([[tasks]])"),
        ({"tasks": [{"kind": "depth"}]}, "tasks[0].name: missing"),
        ({"tasks": [{"name": "a", "kind": "depth"}, {"name": "a", "kind": "edges"}]},
         "tasks[1].name: duplicate task name 'a' (also tasks[0])"),
        ({"data": {"image_size": [32, 32, 3]}}, "data.image_size: expected a list of 0 or 2 items; got 3"),
        ({"data": {"image_size": [32, "x"]}}, "data.image_size[1]: expected an integer; got 'x'"),
        ({"nmae": "x"}, "nmae: unknown key (did you mean 'name'?)"),
        ({"name": "a b"}, "name: expected letters, digits"),
        ({"tune": {"sparsity_min": 2.0, "sparsity_max": 1.0}}, "tune.sparsity_min: expected <= tune.sparsity_max"),
    ],
)
def test_validation_messages_name_the_key_the_expectation_and_the_value(raw, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    assert str(err.value).startswith(message)


def test_a_recipe_file_with_a_typo_in_a_task_kind_reads_as_the_issue_describes(in_tmp):
    path = write(
        in_tmp / "r.toml",
        "".join(f'[[tasks]]\nname = "t{i}"\nkind = "depth"\n' for i in range(2))
        + '[[tasks]]\nname = "t2"\nkind = "segmantation"\n',
    )
    with pytest.raises(RecipeError, match=r"^tasks\[2\]\.kind: .*got 'segmantation' \(did you mean 'segmentation'\?\)$"):
        load_recipe(path)


def test_override_errors(in_tmp):
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(None, ["pretrain.epochs"])
    with pytest.raises(RecipeError, match="index 0 is out of range"):
        load_recipe(None, ["tasks[0].weight=2"])
    with pytest.raises(RecipeError, match="pretrain.epochz: unknown key"):
        load_recipe(None, ["pretrain.epochz=2"])


def test_missing_and_malformed_files(in_tmp):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(in_tmp / "nope.toml")
    bad = write(in_tmp / "bad.toml", "name = \n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(bad)


def test_written_toml_reads_back_to_an_equal_recipe(in_tmp):
    recipe = load_recipe(None, ["data.options={n_shapes = 3}", "search.budget=10M"])
    recipe.tasks = [TaskConfig(name="seg", kind="segmentation", num_classes=4),
                    TaskConfig(name="d", kind="depth", weight=0.5, loss="mse")]
    text = recipe_to_toml(recipe)
    assert recipe_from_dict(tomllib.loads(text)) == recipe
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
