"""The ready recipes in recipes/: each one validates against the schema, its dataset family,
its backbone and the budget it states; recipes/shapes.toml is exactly the built-in default.

(The end-to-end run of each benchmark recipe on a fabricated miniature of its on-disk layout
is a later step; see the note at the end of this file.)
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from branchnas.recipe import Recipe, TaskConfig, _toml_value, load_recipe, recipe_to_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
SHAPES = ROOT / "recipes" / "shapes.toml"

#: recipe -> (dataset, backbone, dilation, number of tasks, image size): the papers' settings
EXPECTED = {
    "shapes": ("shapes", "resnet20", False, 7, None),
    "digits": ("digits", "lenet5", False, 4, None),
    "multimnist": ("multimnist", "lenet5", False, 2, None),
    "cifar100-mtl": ("cifar100", "resnet20", False, 20, None),
    "celeba": ("celeba", "resnet20", False, 40, [32, 32]),
    "nyuv2": ("nyuv2", "resnet50", True, 3, [288, 384]),
    "cityscapes": ("cityscapes", "resnet50", True, 2, [256, 512]),
}


def _ids(path: Path) -> str:
    return path.stem


def _tasks(recipe: Recipe) -> tuple[object, list[TaskConfig]]:
    """The family's parsed options and the task configs a run would use."""
    from branchnas.data import get_family

    family = get_family(recipe.data.dataset)
    options = family.parse_options(recipe.data.options)
    return options, list(recipe.tasks) or family.default_tasks(options)


def test_the_ready_recipes_are_all_there():
    assert sorted(p.stem for p in RECIPES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", RECIPES, ids=_ids)
def test_recipe_validates_and_names_its_run_after_the_file(path, in_tmp):
    recipe = load_recipe(path)
    assert recipe.name == path.stem, "the run directory runs/<name> should match the recipe file"


@pytest.mark.parametrize("path", RECIPES, ids=_ids)
def test_recipe_matches_the_papers_setting(path, in_tmp):
    recipe = load_recipe(path)
    dataset, backbone, dilation, num_tasks, image_size = EXPECTED[path.stem]
    _, tasks = _tasks(recipe)
    assert (recipe.data.dataset, recipe.backbone.name, recipe.backbone.dilation, len(tasks)) == (
        dataset, backbone, dilation, num_tasks)
    if image_size is not None:
        assert recipe.data.image_size == image_size


@pytest.mark.parametrize("path", RECIPES, ids=_ids)
def test_recipe_fits_its_dataset_family_and_backbone(path, in_tmp):
    """Options, targets, task kinds and classes, data.root and the backbone's abilities."""
    from branchnas.backbones import GRANULARITIES, backbone_entry
    from branchnas.data import get_family
    from branchnas.tasks import build_tasks

    recipe = load_recipe(path)
    family = get_family(recipe.data.dataset)
    options, task_configs = _tasks(recipe)
    targets = family.resolve_targets(options, task_configs)
    tasks = build_tasks(task_configs, targets)
    assert [t.name for t in tasks] == [t.name for t in task_configs]
    if family.needs_root:
        assert recipe.data.root, f"{family.name} reads files: data.root needs a placeholder path and a comment"
    if family.generated:
        sizes = (recipe.data.num_train, recipe.data.num_val, recipe.data.num_test)
        assert min(sizes) > 0, "a generated dataset has no 'all available' (0)"
    entry = backbone_entry(recipe.backbone.name)
    assert recipe.backbone.granularity in GRANULARITIES
    assert entry.dilation or not recipe.backbone.dilation
    assert entry.width or recipe.backbone.width == 1.0
    assert not recipe.backbone.weights, "a ready recipe cannot name a weights file the user does not have"


@pytest.mark.parametrize("path", RECIPES, ids=_ids)
def test_affinity_images_fit_in_their_split(path, in_tmp):
    recipe = load_recipe(path)
    available = {"train": recipe.data.num_train, "val": recipe.data.num_val, "test": recipe.data.num_test}
    size = available[recipe.affinity.split]
    if size:  # 0 = all available: only the data can tell
        assert recipe.affinity.images <= size


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem != "shapes"], ids=_ids)
def test_benchmark_recipe_sets_a_budget(path, in_tmp):
    """With no budget the least-cost tree is always the all-separate one: nothing to search."""
    from branchnas.budget import parse_budget

    recipe = load_recipe(path)
    assert recipe.search.budget and parse_budget(recipe.search.budget) > 0


# --------------------------------------------------------------------------- budgets vs sizes


def _native_size(recipe: Recipe, options: object) -> tuple[int, int]:
    """The image size of the generated families, as their modules document it."""
    if recipe.data.image_size:
        return tuple(recipe.data.image_size)
    sizes = {
        "shapes": lambda o: (o.size, o.size),
        "digits": lambda o: (12 * o.scale, 16 * o.scale),
        "multimnist": lambda o: (28 + 2 * o.jitter, 28 + 2 * o.jitter),
        "cifar100": lambda o: (32, 32),
    }
    return sizes[recipe.data.dataset](options)


_IN_CHANNELS = {"digits": 1, "multimnist": 1}
_SLOW = {"nyuv2", "cityscapes"}  # building and tracing ResNet-50 takes seconds


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in _SLOW else p for p in RECIPES], ids=_ids
)
def test_budget_lies_between_the_smallest_and_largest_tree_as_the_comment_says(path, in_tmp):
    """The stated range "between X (all shared) and Y ..." is what the cost model measures."""
    from branchnas.backbones import build_backbone
    from branchnas.budget import format_count, parse_budget
    from branchnas.cost import block_costs
    from branchnas.data import get_family
    from branchnas.heads import build_head
    from branchnas.tasks import build_tasks

    recipe = load_recipe(path)
    family = get_family(recipe.data.dataset)
    options, task_configs = _tasks(recipe)
    tasks = build_tasks(task_configs, family.resolve_targets(options, task_configs))
    size = _native_size(recipe, options)
    if recipe.search.metric == "params":  # parameters do not depend on the image size: measure small
        size = (min(size[0], 64), min(size[1], 64))
    backbone = build_backbone(recipe.backbone, _IN_CHANNELS.get(recipe.data.dataset, 3), size)
    last = backbone.block_info[-1]
    heads = {t.name: build_head(t, last.channels, last.reduction, size) for t in tasks}
    costs = block_costs(backbone, heads, size)
    metric = recipe.search.metric
    depth = len(backbone.block_info)
    smallest, largest = costs.size([1] * depth, metric), costs.size([len(tasks)] * depth, metric)

    stated = re.search(r"between (\S+) \(all shared\) and (\S+?) (?:parameters|FLOPs)", path.read_text())
    assert stated, "the [search] comment should state the range of tree sizes"
    assert stated.groups() == (format_count(smallest), format_count(largest))
    if recipe.search.budget:
        assert smallest <= parse_budget(recipe.search.budget, reference=largest) < largest


# --------------------------------------------------------------------------- shapes.toml


def test_shapes_recipe_is_exactly_the_builtin_default(in_tmp):
    assert not Path("branchnas.toml").exists()
    assert load_recipe(SHAPES) == load_recipe(None) == Recipe()


def test_shapes_recipe_spells_out_every_key():
    raw = tomllib.loads(SHAPES.read_text())
    defaults = recipe_to_dict(Recipe())
    assert "tasks" not in raw, "tasks must stay unset: [] means the dataset's default tasks"
    assert set(raw) == set(defaults) - {"tasks"}
    for section, value in defaults.items():
        if isinstance(value, dict):
            assert list(raw[section]) == list(value), f"[{section}] should list every key, in the schema's order"


def test_shapes_recipe_comment_shows_the_default_tasks():
    """The commented-out [[tasks]] entries are the shapes family's default tasks."""
    from branchnas.data import get_family

    text = SHAPES.read_text()
    start = re.search(r"^# \[\[tasks\]\]$", text, re.M).start()
    block = []
    for line in text[start:].splitlines():
        if not line.startswith("#"):
            break
        block.append(line[2:] if line.startswith("# ") else line[1:])
    shown = tomllib.loads("\n".join(block))["tasks"]
    defaults = get_family("shapes").default_tasks()
    assert [(t["name"], t["kind"]) for t in shown] == [(t.name, t.kind) for t in defaults]
    for entry in shown:  # each one is a valid task entry
        assert set(entry) <= {f.name for f in dataclasses.fields(TaskConfig)}


def test_shapes_recipe_comment_shows_every_dataset_option():
    from branchnas.data import get_family

    text = SHAPES.read_text()
    for name, default, _ in get_family("shapes").describe_options():
        assert re.search(rf"^#\s+{name} = {re.escape(_toml_value(default))}\s", text, re.M), (
            f"shapes.toml should show data.options.{name} = {_toml_value(default)} in a comment")


# Later step, the end-to-end run of every benchmark recipe on a fabricated miniature of its
# on-disk layout (--set data.root=<tmp> plus small sizes, epochs and images), can reuse the
# builders of tests/data: the fake MNIST idx files of test_multimnist.py, the CIFAR-100
# pickles of test_cifar100.py, the CelebA attribute/partition lists and JPEGs of
# test_celeba.py, the MTAN .npy folders of test_nyuv2.py and the Cityscapes PNG trees of
# test_cityscapes.py (best moved into tests/data/conftest.py as fixtures first).
