"""Options and helpers shared by the commands."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click

F = Callable[..., Any]


def json_option(f: F) -> F:
    """``--json``: one JSON document on stdout and nothing else there."""
    return click.option(
        "--json", "as_json", is_flag=True,
        help="Print one JSON document on stdout and nothing else there (messages go to stderr; "
             "errors still exit 2 with one line on stderr).",
    )(f)


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With ``--json``: while the command works, what it prints goes to stderr, so stdout holds only the JSON."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: NaN and infinities become ``null``, paths strings, tuples lists."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy and torch values
        return jsonable(value.tolist())
    if hasattr(value, "to_json"):
        return jsonable(value.to_json())
    return str(value)


def emit_json(data: Any) -> None:
    """Print ``data`` as one JSON document on stdout (strict JSON: no NaN)."""
    import json

    click.echo(json.dumps(jsonable(data), indent=2, allow_nan=False))


def note(message: str) -> None:
    """A progress message on stderr, left out with ``branchnas --quiet``."""
    from branchnas.progress import is_quiet

    if not is_quiet():
        click.echo(message, err=True)


def recipe_argument(f: F) -> F:
    """Optional RECIPE argument: default ./branchnas.toml, else the built-in default recipe."""
    return click.argument("recipe", required=False, type=click.Path(dir_okay=False))(f)


def set_option(f: F) -> F:
    """``--set section.key=value``, repeatable; applied after the recipe file."""
    return click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override a recipe value, e.g. --set pretrain.epochs=2 (repeatable).",
    )(f)


def force_option(f: F) -> F:
    """``--force``: redo the stage even if its inputs are unchanged."""
    return click.option("--force", is_flag=True, help="Redo the stage even if its inputs are unchanged.")(f)


def recipe_options(f: F) -> F:
    """RECIPE plus --set."""
    return recipe_argument(set_option(f))


def load(recipe: str | None, overrides: tuple[str, ...]) -> Any:
    """Load and validate the recipe (built-in defaults, then the file, then --set)."""
    from branchnas.recipe import load_recipe

    return load_recipe(recipe, list(overrides))


def not_available(what: str, issue: str) -> None:
    """Fail clearly for a registered command whose implementation has not landed."""
    from branchnas.errors import NotAvailableYet

    raise NotAvailableYet(f"`branchnas {what}` is not available yet ({issue}); nothing was run")


def run_stage_command(recipe: Any, stage: str, *, force: bool, options: dict[str, Any] | None = None) -> Any:
    """Run ``stage`` (and what it needs, skipping what is done) after every needed check.

    Returns:
        ``(rundir, result of the stage)``.
    """
    from branchnas.pipeline import run_stages

    rundir, results = run_stages(recipe, [stage], force=[stage] if force else [], options={stage: options or {}})
    if results[stage].get("skipped"):
        click.echo(f"{stage}: already done with these inputs (use --force to redo)")
    return rundir, results[stage]
