"""Budget strings such as ``10M``, ``2.5G`` or ``500k`` to numbers and back.

Suffixes are decimal: k = 1e3, M = 1e6, G = 1e9, T = 1e12. Params are counted one per
scalar weight; FLOPs follow fvcore, which counts one multiply-add as one flop.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from branchnas.errors import BudgetError

__all__ = ["Budget", "parse_budget", "is_relative", "format_count", "METRICS"]

METRICS = ("params", "flops")

_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "g": 10**9, "G": 10**9,
           "t": 10**12, "T": 10**12}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([kKmMgGtT]?)\s*$")
_FORMS = ("a plain integer (1500000), a number with k, M, G or T (500k, 10M, 2.5M, 1.2G), "
          "or a share of the all-separate size (50%)")


def is_relative(text: str | int | float | None) -> bool:
    """True for a relative budget such as ``"50%"`` (a share of the all-separate size)."""
    return isinstance(text, str) and text.strip().endswith("%")


def parse_budget(text: str | int | float, reference: float | None = None) -> int:
    """Parse a budget into an integer count.

    Args:
        text: ``"10M"``, ``"2.5M"``, ``"500k"``, ``"1.2G"``, ``"1500000"``, a number, or a
            percentage such as ``"50%"`` of ``reference``.
        reference: what a percentage is a share of (the size of N separate networks).

    Returns:
        The budget as an integer (rounded down).

    Raises:
        BudgetError: the text is not one of the accepted forms, or is not positive.

    Example:
        >>> parse_budget("2.5M")
        2500000
    """
    if isinstance(text, bool):
        raise BudgetError(f"budget: expected {_FORMS}; got {text!r}")
    if is_relative(text):
        share = str(text).strip()[:-1].strip()
        try:
            percent = float(share)
        except ValueError:
            percent = float("nan")
        if not math.isfinite(percent) or not 0 < percent <= 100:
            raise BudgetError(f"budget: a percentage must lie in (0, 100]%; got {text!r}")
        if reference is None:
            return 1  # validated only; the caller resolves it against the all-separate size
        return int(percent / 100 * reference)
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _PATTERN.match(str(text))
        if not match:
            raise BudgetError(f"budget: expected {_FORMS}; got {text!r}")
        mantissa, exponent, suffix = match.groups()
        try:
            value = float(f"{mantissa}e{exponent or 0}") * _SUFFIX[suffix]
        except OverflowError:  # an exponent too large for a float: as good as infinite
            value = math.inf
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"budget: expected a positive, finite number; got {text!r}")
    return int(value)


@dataclass(frozen=True)
class Budget:
    """A parsed budget: an absolute count, or a share of the all-separate size.

    The recipe keeps the budget as text (``search.budget``); this is that text parsed once,
    the form every consumer uses. ``Budget.parse("")`` is ``None`` (no limit).

    Example:
        >>> Budget.parse("50%").resolve(2_000_000)
        1000000
        >>> Budget.parse("2.5M").resolve(9e9)
        2500000
    """

    text: str
    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str | int | float | None) -> Budget | None:
        """Parse ``text`` (see :func:`parse_budget`); ``None`` or ``""`` mean no limit.

        Raises:
            BudgetError: the text is not one of the accepted forms.
        """
        if text is None or (isinstance(text, str) and not text.strip()):
            return None
        if is_relative(text):
            parse_budget(text)  # validates the range
            return cls(str(text).strip(), float(str(text).strip()[:-1]), True)
        return cls(str(text).strip(), float(parse_budget(text)), False)

    def resolve(self, all_separate: float) -> int:
        """The budget as a count; a share is taken of ``all_separate`` (N separate networks)."""
        if self.relative:
            return int(self.value / 100 * all_separate)
        return int(self.value)

    def __str__(self) -> str:
        return self.text


def format_count(value: float, digits: int = 3) -> str:
    """Format a count with a decimal suffix: ``format_count(2_516_000) == '2.52M'``."""
    value = float(value)
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g}{suffix}"
    return f"{value:.{digits}g}" if value != int(value) else str(int(value))
