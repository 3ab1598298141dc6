"""Options and helpers shared by the commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]


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
