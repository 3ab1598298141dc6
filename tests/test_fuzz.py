"""Hypothesis fuzz of the recipe loader, the ``--set`` parser and the budget parser.

Whatever a user types, these raise nothing but the project's own user errors (which the
command line turns into one line and exit status 2), never a traceback.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from branchnas.budget import Budget, parse_budget
from branchnas.errors import UserError
from branchnas.recipe import Recipe, apply_override, load_recipe, recipe_from_dict, recipe_to_dict

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Real key paths, so that the fuzz reaches the value checks and not only "unknown key".
KEYS = sorted(
    [f"{section}.{key}" for section, table in recipe_to_dict(Recipe()).items() if isinstance(table, dict)
     for key in table]
    + [k for k, v in recipe_to_dict(Recipe()).items() if not isinstance(v, dict | list)]
    + ["tasks", "tasks[0].name", "tasks[0].kind", "tasks[3].weight", "data.options.size", "nope.key"]
)
VALUES = st.one_of(
    st.text(max_size=12),
    st.integers(-10**30, 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "[]", "[1, 2]", "{}", "{size = 16}", "\"50%\"", "1e999", "-1",
                     "[{name='a', kind='depth'}]", "[{name=1}]", "[1, 'a']", "inf", "nan", "'0.5'", "[[1]]"]),
)


def _only_user_errors(call, *args):
    try:
        return call(*args)
    except UserError:
        return None


@FUZZ
@given(st.one_of(st.text(alphabet=string.printable, max_size=20), st.integers(-10**40, 10**40),
                 st.floats(allow_nan=True, allow_infinity=True), st.booleans()))
def test_budget_parser_returns_a_positive_count_or_a_budget_error(text):
    value = _only_user_errors(parse_budget, text)
    assert value is None or (isinstance(value, int) and value >= 0)
    budget = _only_user_errors(Budget.parse, text)
    if budget is not None:
        assert budget.resolve(10**9) >= 0


@FUZZ
@given(st.sampled_from(KEYS), VALUES)
def test_set_parser_and_validation_raise_only_user_errors(key, value):
    _only_user_errors(load_recipe, None, [f"{key}={value}"])


@FUZZ
@given(st.text(max_size=40))
def test_malformed_assignments_raise_only_user_errors(assignment):
    raw = recipe_to_dict(Recipe())
    if _only_user_errors(apply_override, raw, assignment) is not None:
        _only_user_errors(recipe_from_dict, raw)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_recipe_files_raise_only_user_errors(tmp_path_factory, pairs):
    folder = tmp_path_factory.mktemp("fuzz")
    lines = [f"{key.replace('[0]', '').replace('[3]', '')} = {value}" for key, value in pairs]
    path = folder / "r.toml"
    path.write_text("\n".join(lines) + "\n")
    _only_user_errors(load_recipe, path)


@pytest.mark.parametrize("data", [b"\xff\xfe\x00", b"[data\nx=1", b"data = 5", b"tasks = 5", b"tasks = [5]",
                                  b"[[tasks]]\nname = 3", b"search = []"])
def test_hand_picked_broken_files_are_user_errors(tmp_path, data):
    path = tmp_path / "r.toml"
    path.write_bytes(data)
    with pytest.raises(UserError):
        load_recipe(path)
