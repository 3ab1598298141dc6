"""Run the stages in order against one run directory.

Each stage module exposes ``stage_config(recipe)`` and ``run(recipe, rundir, *, force=False,
**options)``. A stage whose inputs are unchanged is skipped, so running the pipeline again is
cheap, and a stage that was killed resumes from its checkpoints.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from branchnas.errors import UserError, unknown_choice
from branchnas.rundir import RunDir, StageResult

__all__ = ["STAGES", "stage_module", "ensure", "run_pipeline", "open_run"]

#: The stages of ``branchnas run``, in order.
STAGES = ("pretrain", "affinity", "search", "finetune", "export")


def stage_module(name: str) -> ModuleType:
    """The module that implements stage ``name``."""
    if name not in STAGES:
        raise UserError(unknown_choice("stage", name, STAGES))
    return importlib.import_module(f"branchnas.{name}")


def open_run(recipe: Any) -> RunDir:
    """The recipe's run directory, with the resolved recipe saved in it."""
    rundir = RunDir(recipe.run_dir)
    with rundir.locked():
        rundir.save_recipe(recipe)
    return rundir


def ensure(recipe: Any, rundir: RunDir, before: str) -> dict[str, StageResult]:
    """Run (or skip, when done) every stage that comes before ``before``."""
    results = {}
    with rundir.locked():
        for name in STAGES[: STAGES.index(before)] if before in STAGES else ():
            results[name] = stage_module(name).run(recipe, rundir)
    return results


def run_pipeline(
    recipe: Any,
    *,
    start: str | None = None,
    until: str | None = None,
    force: bool = False,
) -> tuple[RunDir, dict[str, StageResult]]:
    """Run the stages from ``start`` through ``until``.

    Args:
        recipe: the resolved recipe.
        start: the first stage to (re)do; it and every later stage are forced. Earlier stages
            are run only if they are not done yet.
        until: the last stage to run (default: export).
        force: redo every stage.

    Returns:
        The run directory and each stage's result, in order.
    """
    for name in (start, until):
        if name is not None and name not in STAGES:
            raise UserError(unknown_choice("stage", name, STAGES))
    first = STAGES.index(start) if start else 0
    last = STAGES.index(until) if until else len(STAGES) - 1
    if first > last:
        raise UserError(f"--from {start} comes after --until {until}; choose a --from at or before --until")
    rundir = open_run(recipe)
    results: dict[str, StageResult] = {}
    with rundir.locked():
        for index, name in enumerate(STAGES[: last + 1]):
            redo = force or (start is not None and index >= first)
            results[name] = stage_module(name).run(recipe, rundir, force=redo)
    return rundir, results
