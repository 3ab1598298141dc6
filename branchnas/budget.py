"""Budget strings such as ``10M``, ``2.5G``, ``500k`` or ``8ms`` to numbers and back.

Suffixes are decimal: k = 1e3, M = 1e6, G = 1e9, T = 1e12. Params are counted one per
scalar weight; FLOPs follow fvcore, which counts one multiply-add as one flop. A latency
budget (``metric="latency"``) is a time per image with a unit: ``s``, ``ms``, ``us`` (or
``µs``) or ``ns``, e.g. ``8ms``, ``500us``, ``0.2s``; it parses to seconds (a float).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from branchnas.errors import BudgetError

__all__ = ["Budget", "parse_budget", "is_relative", "format_count", "format_seconds", "format_size", "METRICS"]

METRICS = ("params", "flops", "latency")

_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_TIME_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*(s|ms|us|µs|μs|ns)\s*$")
_TIME_FORMS = ("a time per image with a unit (8ms, 500us, 0.2s) or a share of the all-separate "
               "latency (50%)")

_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "g": 10**9, "G": 10**9,
           "t": 10**12, "T": 10**12}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([kKmMgGtT]?)\s*$")
_FORMS = ("a plain integer (1500000), a number with k, M, G or T (500k, 10M, 2.5M, 1.2G), "
          "or a share of the all-separate size (50%)")


def is_relative(text: str | int | float | None) -> bool:
    """True for a relative budget such as ``"50%"`` (a share of the all-separate size)."""
    return isinstance(text, str) and text.strip().endswith("%")


def parse_budget(text: str | int | float, reference: float | None = None, metric: str = "params") -> int | float:
    """Parse a budget into an integer count (or, for ``metric="latency"``, seconds).

    Args:
        text: ``"10M"``, ``"2.5M"``, ``"500k"``, ``"1.2G"``, ``"1500000"``, a number, or a
            percentage such as ``"50%"`` of ``reference``. For ``metric="latency"``: a time
            such as ``"8ms"``, ``"500us"``, ``"0.2s"``, a number of seconds, or a percentage.
        reference: what a percentage is a share of (the size of N separate networks).
        metric: ``params``, ``flops`` or ``latency``.

    Returns:
        The budget as an integer (rounded down); for latency, seconds as a float.

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
        if metric == "latency":
            return percent / 100 * float(reference)
        return int(percent / 100 * reference)
    if metric == "latency":
        return _parse_seconds(text)
    if isinstance(text, str) and _TIME_PATTERN.match(text):
        raise BudgetError(f"budget: {text!r} is a time; a latency budget needs search.metric = \"latency\" "
                          f"(now {metric!r})")
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


def _parse_seconds(text: str | int | float) -> float:
    """A latency budget in seconds: ``"8ms"`` -> 0.008; a bare number is seconds."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _TIME_PATTERN.match(str(text))
        if not match:
            raise BudgetError(f"budget: expected {_TIME_FORMS}; got {text!r}")
        mantissa, exponent, unit = match.groups()
        try:
            value = float(f"{mantissa}e{exponent or 0}") * _TIME_UNITS[unit]
        except OverflowError:
            value = math.inf
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"budget: expected a positive, finite time; got {text!r}")
    return value


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
    metric: str = "params"

    @classmethod
    def parse(cls, text: str | int | float | None, metric: str = "params") -> Budget | None:
        """Parse ``text`` (see :func:`parse_budget`); ``None`` or ``""`` mean no limit.

        Raises:
            BudgetError: the text is not one of the accepted forms.
        """
        if text is None or (isinstance(text, str) and not text.strip()):
            return None
        if is_relative(text):
            parse_budget(text, metric=metric)  # validates the range
            return cls(str(text).strip(), float(str(text).strip()[:-1]), True, metric)
        return cls(str(text).strip(), float(parse_budget(text, metric=metric)), False, metric)

    def resolve(self, all_separate: float) -> int | float:
        """The budget as a count (seconds for latency); a share is taken of ``all_separate``."""
        if self.metric == "latency":
            return self.value / 100 * float(all_separate) if self.relative else self.value
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


def format_seconds(value: float, digits: int = 3) -> str:
    """Format a time in seconds with a unit: ``format_seconds(0.0082) == '8.2ms'``."""
    value = float(value)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g}{unit}"
    return f"{value / 1e-9:.{digits}g}ns"


def format_size(value: float, metric: str, digits: int = 3) -> str:
    """A size in ``metric``: a time for ``latency`` (:func:`format_seconds`), else a count."""
    return format_seconds(value, digits) if metric == "latency" else format_count(value, digits)
