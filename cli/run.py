"""`branchnas run`: registered, implementation pending."""

from __future__ import annotations

import click
from branchnas_cli._options import not_available, recipe_options


@click.command(name="run", context_settings={"ignore_unknown_options": True})
@recipe_options
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def command(recipe: str | None, overrides: tuple[str, ...], extra: tuple[str, ...]) -> None:
    """Not available yet: this command lands with its stage."""
    not_available("run", "it lands with its stage")
