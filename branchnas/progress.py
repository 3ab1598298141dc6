"""Whether to draw progress bars: only when asked for, on a terminal, and not ``--quiet``.

Every progress bar (the trainer's, the affinity extraction's) asks :func:`show_progress`, so a
bar is never written into a log file, a pipe or a captured stream, and ``branchnas --quiet``
turns them all off. This module imports nothing heavy (the command line imports it for
``--quiet`` without loading torch).
"""

from __future__ import annotations

import sys

__all__ = ["show_progress", "set_quiet", "is_quiet"]

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar (and the command line's progress messages) off, or back on."""
    _state["quiet"] = bool(quiet)


def is_quiet() -> bool:
    """True after ``set_quiet(True)`` (``branchnas --quiet``)."""
    return _state["quiet"]


def show_progress(requested: bool = True) -> bool:
    """Draw a progress bar: ``requested``, not quiet, and stderr (where bars go) is a terminal."""
    if not requested or _state["quiet"]:
        return False
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
