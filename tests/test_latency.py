"""Latency budgets: time units, the latency metric of BlockCosts, tables and `branchnas profile`.

No test asserts on a measured time beyond it being positive.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from branchnas_cli.main import main

from branchnas.budget import Budget, format_seconds, format_size, parse_budget
from branchnas.cost import BlockCosts
from branchnas.errors import BudgetError, UserError

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")

TASKS = ('tasks=[{name="shape", kind="classification"}, {name="colour", kind="classification"}, '
         '{name="segmentation", kind="segmentation"}]')
NAMES = ["shape", "colour", "segmentation"]


def tiny(out, *extra):
    return [f"out={json.dumps(str(out))}", "name=tiny", TASKS, "data.num_train=8", "data.num_val=8",
            "data.num_test=8", "data.batch_size=4", "data.options={size = 16}", "backbone.width=0.25", *extra]


def sets(overrides):
    return [arg for item in overrides for arg in ("--set", item)]


def cli(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    return info.value.code, out.out + out.err


# --------------------------------------------------------------------------- budget units


@pytest.mark.parametrize(("text", "seconds"), [
    ("8ms", 0.008), ("500us", 0.0005), ("500µs", 0.0005), ("0.2s", 0.2), ("2.5 ms", 0.0025),
    ("250ns", 2.5e-7), ("1e-3s", 0.001), (0.004, 0.004),
])
def test_time_budgets_parse_to_seconds(text, seconds):
    assert math.isclose(parse_budget(text, metric="latency"), seconds, rel_tol=1e-12)
    assert math.isclose(Budget.parse(text, "latency").resolve(123.0), seconds, rel_tol=1e-12)


def test_a_share_of_the_all_separate_latency():
    assert math.isclose(parse_budget("50%", reference=0.02, metric="latency"), 0.01)
    assert math.isclose(Budget.parse("25%", "latency").resolve(0.008), 0.002)


@pytest.mark.parametrize("text", ["8", "10M", "8 m", "-1ms", "0ms", "ms", "8 hours"])
def test_bad_time_budgets_are_refused(text):
    with pytest.raises(BudgetError):
        parse_budget(text, metric="latency")


def test_a_time_is_refused_for_params_and_counts_stay_ints():
    with pytest.raises(BudgetError, match='search.metric = "latency"'):
        parse_budget("8ms")
    assert parse_budget("2.5M") == 2_500_000 and isinstance(parse_budget("2.5M"), int)
    assert parse_budget("50%", reference=3_000_001) == 1_500_000
    assert Budget.parse("10M").resolve(1.0) == 10_000_000


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0082, "8.2ms"), (0.0005, "500us"), (0.2, "200ms"), (1.5, "1.5s"), (2e-8, "20ns"), (0.012345, "12.3ms"),
])
def test_times_format_with_a_unit(seconds, text):
    assert format_seconds(seconds) == text
    assert format_size(seconds, "latency") == text
    assert format_size(2_516_000, "params") == "2.52M"


# --------------------------------------------------------------------------- the latency metric


def fabricated_costs():
    return BlockCosts(10, 100, (1, 2, 3), (10, 20, 30), {"a": 1, "b": 2}, {"a": 5, "b": 6},
                      stem_latency=0.001, block_latency=(0.002, 0.004, 0.008), head_latency={"a": 0.0001, "b": 0.0003})


def test_latency_size_is_the_hand_computed_sum():
    costs = fabricated_costs()
    # stem + 1*b0 + 2*b1 + 2*b2 + heads
    assert math.isclose(costs.size([1, 2, 2], "latency"), 0.001 + 0.002 + 2 * 0.004 + 2 * 0.008 + 0.0004)
    assert math.isclose(costs.single_task("a", "latency"), 0.001 + 0.014 + 0.0001)
    sizes = costs.metric_sizes(np.array([[1, 1, 1], [2, 2, 2]]), "latency")
    assert np.allclose(sizes, [0.0154, 0.0294])
    assert costs.size([1, 2, 2], "params") == 10 + 1 + 4 + 6 + 3  # unchanged
    assert BlockCosts.from_dict(costs.to_dict()) == costs
    assert BlockCosts.coerce(costs.to_dict(), tasks=["a", "b"]).size([2, 2, 2], "latency") == costs.size([2, 2, 2], "latency")


def test_latency_without_a_table_is_a_user_error():
    costs = BlockCosts.coerce([1, 2])
    assert not costs.has_latency and "block_latency" not in costs.to_dict()
    with pytest.raises(UserError, match="latency_table"):
        costs.size([1, 1], "latency")
    with_table = costs.with_latency({"stem": 1.0, "blocks": [2.0, 3.0], "heads": {}})
    assert with_table.size([2, 1], "latency") == 1.0 + 4.0 + 3.0


def test_search_on_latency_respects_the_budget():
    from branchnas.search import pareto_front, search, search_enumerate

    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (3, 4, 4))
    a = (a + a.transpose(0, 2, 1)) / 2
    a[:, range(4), range(4)] = 1
    costs = {"block_params": [5, 5, 5], "block_latency": [0.004, 0.002, 0.001], "stem_latency": 0.001}
    for budget in ("9ms", "12ms", "0.02s", "60%"):
        result = search(a, costs, budget, metric="latency", top=3)
        ref = search_enumerate(a, costs, budget, metric="latency", top=3)
        assert [s.tree for s in result.ranked] == [s.tree for s in ref.ranked]
        for s in result.ranked:
            assert s.latency is not None and s.size("latency") <= result.budget + 1e-15
    front = pareto_front(a, costs, metric="latency")
    assert [s.latency for s in front] == sorted(s.latency for s in front)
    with pytest.raises(BudgetError, match="below the smallest tree"):
        search(a, costs, "5ms", metric="latency")


# --------------------------------------------------------------------------- tables and the search stage


@pytest.fixture
def recipe_and_table(tmp_path):
    """The tiny recipe and a fabricated (never measured) table that fits it."""
    from branchnas.latency import FORMAT, recipe_identity
    from branchnas.recipe import load_recipe

    overrides = tiny(tmp_path / "runs")
    recipe = load_recipe(None, overrides)
    identity = recipe_identity(recipe)
    table = {"format": FORMAT, "unit": "seconds per image", **identity, "batch_size": 4, "threads": 1,
             "mode": "torchscript", "stem": 0.001, "blocks": [0.004, 0.002, 0.001],
             "heads": {"shape": 0.0001, "colour": 0.0001, "segmentation": 0.0005}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(table))
    return recipe, overrides, table, path


def test_table_validation(recipe_and_table, tmp_path):
    from branchnas.latency import check_table, load_table, recipe_identity

    recipe, _, table, path = recipe_and_table
    identity = recipe_identity(recipe)
    check_table(load_table(path), identity)
    with pytest.raises(UserError, match="no file .*branchnas profile"):
        load_table(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not a latency table"):
        load_table(tmp_path / "bad.json")
    for key, value, words in [("backbone", {**table["backbone"], "name": "lenet5"}, "backbone name=lenet5"),
                              ("image_size", [64, 64], "image size 64x64"),
                              ("tasks", ["shape", "colour"], "tasks"),
                              ("points", ["a", "b"], "branch points")]:
        with pytest.raises(UserError, match=words) as info:
            check_table({**table, key: value}, identity)
        assert "branchnas profile" in str(info.value) and "\n" not in str(info.value)


def _affinity_file(tmp_path, points):
    path = tmp_path / "affinity.npz"
    a = np.ones((len(points), 3, 3))
    a[:, 0, 2] = a[:, 2, 0] = 0.2
    a[:, 1, 2] = a[:, 2, 1] = 0.3
    np.savez(path, affinity=a, tasks=np.array(NAMES), points=np.array(points))
    return path


def test_search_with_a_saved_table_respects_the_latency_budget(recipe_and_table, tmp_path, capsys, monkeypatch):
    recipe, overrides, table, path = recipe_and_table
    monkeypatch.chdir(tmp_path)
    affinity = _affinity_file(tmp_path, table["points"])
    smallest = 0.001 + 0.007 + 0.0007
    code, output = cli(capsys, "search", *sets([*overrides, f'search.latency_table="{path}"']),
                       "--affinity", str(affinity), "--metric", "latency", "--budget", "12ms")
    assert code == 0, output
    data = json.loads((tmp_path / "runs" / "tiny" / "search" / "tree.json").read_text())
    assert data["metric"] == "latency" and math.isclose(data["budget"], 0.012)
    best = data["ranked"][0]
    assert smallest <= best["latency"] <= 0.012
    assert data["block_costs"]["block_latency"] == table["blocks"]
    assert data["latency_table"]["source"] == str(path)
    assert "ms" in output
    # Below the all-shared latency: refused before any work, naming the range.
    code, output = cli(capsys, "search", *sets([*overrides, f'search.latency_table="{path}"']),
                       "--affinity", str(affinity), "--metric", "latency", "--budget", "5ms")
    assert code == 2 and "below the smallest tree" in output and "8.7ms" in output, output


def test_a_mismatched_or_missing_table_is_refused_before_any_work(recipe_and_table, tmp_path, capsys, monkeypatch):
    recipe, overrides, table, path = recipe_and_table
    monkeypatch.chdir(tmp_path)
    affinity = _affinity_file(tmp_path, table["points"])
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**table, "image_size": [64, 64]}))
    for given, words in [(wrong, "image size 64x64"), (tmp_path / "missing.json", "no file")]:
        code, output = cli(capsys, "search", *sets([*overrides, f'search.latency_table="{given}"']),
                           "--affinity", str(affinity), "--metric", "latency", "--budget", "12ms")
        assert code == 2 and words in output and "branchnas profile" in output, output
        assert not (tmp_path / "runs").exists()


def test_profile_writes_a_valid_table(recipe_and_table, tmp_path, capsys, monkeypatch):
    from branchnas.latency import check_table, load_table, recipe_identity

    recipe, overrides, _, _ = recipe_and_table
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "measured.json"
    code, output = cli(capsys, "profile", *sets(overrides), "-o", str(out), "--threads", "1", "--batch-size", "2",
                       "--repeats", "1", "--iters", "1", "--warmup", "0")
    assert code == 0, output
    table = load_table(out)
    check_table(table, recipe_identity(recipe))
    assert table["batch_size"] == 2 and table["threads"] == 1 and table["mode"] in ("torchscript", "eager")
    assert table["machine"]["cpus"] and table["torch"]
    assert table["stem"] > 0 and all(t > 0 for t in table["blocks"]) and all(t > 0 for t in table["heads"].values())
    assert str(out) in output
