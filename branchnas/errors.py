"""One exception hierarchy for branchnas.

A :class:`UserError` means the input was wrong (a recipe, a path, a budget, a data file).
The command line prints it as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "BranchnasError",
    "UserError",
    "RecipeError",
    "BudgetError",
    "DataError",
    "RunDirLocked",
    "NotAvailableYet",
    "TrainingDiverged",
    "ExportMismatch",
    "did_you_mean",
    "unknown_choice",
]


class BranchnasError(Exception):
    """Base class of every error branchnas raises on purpose."""


class UserError(BranchnasError):
    """Bad input from the user. The message says what is wrong and how to fix it."""


class RecipeError(UserError):
    """A recipe key is unknown, missing or has a value of the wrong type or range."""


class BudgetError(UserError):
    """A budget string is malformed, or no tree fits the budget."""


class DataError(UserError):
    """A dataset root is missing or malformed, or a sample holds bad data."""


class RunDirLocked(UserError):
    """Another process holds the run directory's lock."""


class NotAvailableYet(UserError):
    """A registered command or option whose implementation has not landed."""


class TrainingDiverged(UserError):
    """A loss became NaN or infinite; the message names the task and the step."""


class ExportMismatch(BranchnasError):
    """The exported model does not reproduce the eager model's outputs."""


def did_you_mean(given: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(given), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_choice(what: str, given: str, choices: Iterable[str]) -> str:
    """Format the standard message for a name that is not in a registry.

    Example:
        >>> unknown_choice("backbone", "resnet5", ["lenet5", "resnet50"])
        "unknown backbone 'resnet5'; choose one of: lenet5, resnet50 (did you mean 'resnet50'?)"
    """
    choices = sorted(str(c) for c in choices)
    return (
        f"unknown {what} '{given}'; choose one of: {', '.join(choices)}"
        f"{did_you_mean(given, choices)}"
    )
