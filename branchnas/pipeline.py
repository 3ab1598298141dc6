"""Run registered stages against one run directory, in dependency order, checks first.

The stages declare what they require (:mod:`branchnas.stages`); this module resolves the
closure of what a command asks for, runs every needed stage's ``check`` before any work, and
then runs each stage through :meth:`branchnas.rundir.RunDir.run_stage`, which skips a stage
whose fingerprint is unchanged and whose outputs verify, and swaps in new outputs only on
success.

Under torchrun (several processes, :mod:`branchnas.training.distributed`) every process runs
the checks and then the stages in order, but rank 0 alone holds the run directory's lock,
decides whether each stage runs, writes its files and the manifest. It tells the others what
it decided: they run the body of a stage that trains under DDP (``Stage.distributed``) with
it, in the same staging folder, writing nothing; a stage that does not train rank 0 runs by
itself while they wait. They go on to the next stage only once rank 0 has recorded this one,
so that they read its artifacts from the run directory (which every process must see: one
machine, or a shared file system).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from branchnas.errors import UserError
from branchnas.rundir import RunDir, StageResult
from branchnas.stages import StageContext, closure, get_stage, stage_names
from branchnas.stages._base import stage_config

__all__ = ["plan", "check", "check_run_dir", "open_run", "run_stages", "run_pipeline", "default_stages"]

Options = Mapping[str, Mapping[str, Any]]


def default_stages(recipe: Any = None) -> list[str]:
    """The stages of ``branchnas run``: every stage that is not optional, and those the recipe enables
    (``tune.enabled``)."""
    if recipe is None:
        return stage_names(include_optional=False)
    return [name for name in stage_names() if get_stage(name).enabled(recipe)]


def plan(targets: Sequence[str], recipe: Any, options: Options | None = None) -> list[str]:
    """``targets`` and the stages they need, in the order they run."""
    return closure(targets, recipe, options or {})


def check_run_dir(recipe: Any) -> None:
    """The run directory can be created and written (``out`` and ``name``), checked without creating it."""
    path = Path(recipe.run_dir)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    where = f"run directory {str(path)!r} (recipe keys 'out' and 'name')"
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{where}: {str(probe)!r} is a file, not a folder; set out= to a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{where}: {str(probe)!r} is not writable; set out= to a folder you can write")
    if str(path.resolve()).startswith(("/proc/", "/sys/")) or path.resolve() in (Path("/proc"), Path("/sys")):
        raise UserError(f"{where}: {str(path)!r} is inside a virtual file system; set out= to a real folder")


def check(recipe: Any, stages: Sequence[str], options: Options | None = None) -> None:
    """Run the ``check`` of every stage in ``stages`` and of the run directory; write nothing."""
    options = options or {}
    check_run_dir(recipe)
    for name in stages:
        get_stage(name).check(recipe, options.get(name, {}))


def open_run(recipe: Any) -> RunDir:
    """The recipe's run directory, with the resolved recipe saved in it (under torchrun, by rank 0 only)."""
    from branchnas.training import distributed

    check_run_dir(recipe)
    rundir = RunDir(recipe.run_dir)
    if distributed.is_main():
        with rundir.locked():
            rundir.save_recipe(recipe)
    return rundir


def run_stages(
    recipe: Any,
    targets: Sequence[str],
    *,
    force: Sequence[str] = (),
    options: Options | None = None,
    progress: bool = True,
    rundir: RunDir | None = None,
) -> tuple[RunDir, dict[str, StageResult]]:
    """Run ``targets`` and whatever they need (skipping what is done), checks first.

    Args:
        recipe: the resolved recipe.
        targets: the stages asked for.
        force: stages to redo even if their inputs are unchanged.
        options: per-stage invocation options (``{"search": {"affinity_file": ...}}``).
        progress: show progress bars.
        rundir: the run directory (default: the recipe's, opened and its recipe saved).

    Returns:
        The run directory and each stage's result, in the order they ran.

    Raises:
        UserError: a check failed (nothing was run or written), or a stage failed.
    """
    from branchnas.stages._checks import clear_cache
    from branchnas.training import distributed

    options = options or {}
    order = plan(targets, recipe, options)
    clear_cache()
    try:
        check(recipe, order, options)  # every process: each refuses what it cannot run
        rundir = rundir or open_run(recipe)
        main = distributed.is_main()
        results: dict[str, StageResult] = {}
        with rundir.locked() if main else contextlib.nullcontext():
            for name in order:
                run = _run_one if main else _follow
                results[name] = run(recipe, rundir, name, name in force, options.get(name, {}), progress)
    finally:
        clear_cache()
    return rundir, results


def _run_one(recipe: Any, rundir: RunDir, name: str, force: bool, options: Mapping[str, Any],
             progress: bool) -> StageResult:
    """Run stage ``name`` here (rank 0 of several processes: and tell the others what happened)."""
    from branchnas.training import distributed

    stage = get_stage(name)
    several = distributed.world_size() > 1
    told = False

    def body(folder: Path) -> dict[str, Any]:
        nonlocal told
        ctx = StageContext(recipe, rundir, folder, options, progress)
        if not several:
            return stage.run(ctx)
        if not stage.distributed:
            with distributed.alone():
                return stage.run(ctx)
        distributed.broadcast_object(("run", str(folder)))
        told = True
        return stage.run(ctx)

    try:
        config = stage_config(name, recipe, rundir, options)
        keep = stage.keep_on_force(options) if hasattr(stage, "keep_on_force") else None
        result = rundir.run_stage(name, config, list(stage.keyed_on(recipe, options)), body, force=force, keep=keep)
    except Exception as err:
        # Once the others train with it, they fail with it (or torchrun stops them).
        if several and not told:
            distributed.broadcast_object(("stop", f"{type(err).__name__}: {err}"))
        raise
    if several:
        distributed.broadcast_object(("done", dict(result)))
    return result


def _follow(recipe: Any, rundir: RunDir, name: str, force: bool, options: Mapping[str, Any],
            progress: bool) -> StageResult:
    """Another process than rank 0: do what rank 0 says for stage ``name``; its result."""
    from branchnas.training import distributed

    kind, payload = distributed.broadcast_object(None)
    if kind == "run":  # a stage that trains: with rank 0, in its staging folder, writing nothing
        get_stage(name).run(StageContext(recipe, rundir, Path(payload), options, progress=False))
        kind, payload = distributed.broadcast_object(None)
    if kind == "stop":
        raise UserError(f"rank 0 stopped at stage '{name}' ({payload}); see its error")
    return StageResult(payload)


def run_pipeline(
    recipe: Any,
    *,
    start: str | None = None,
    until: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[RunDir, dict[str, StageResult]]:
    """``branchnas run``: the default stages from ``start`` through ``until``.

    Args:
        recipe: the resolved recipe.
        start: redo this stage and every stage after it; earlier ones run only if not done.
        until: the last stage to run (default: the last default stage). An optional stage
            (``compare``) named here runs too.
        force: redo every stage.
    """
    stages = default_stages(recipe)
    everything = stage_names()
    for name in (start, until):
        if name is not None:
            get_stage(name)
    if until is not None and until not in stages:
        stages = [s for s in everything if s in stages or s == until]
    first = stages.index(start) if start in stages else 0
    last = stages.index(until) if until else len(stages) - 1
    if start is not None and start not in stages:
        raise UserError(f"--from {start}: '{start}' is not one of the stages of `branchnas run` ({', '.join(stages)})")
    if first > last:
        raise UserError(f"--from {start} comes after --until {until}; choose a --from at or before --until")
    targets = stages[: last + 1]
    redo = targets if force else (targets[first:] if start is not None else [])
    return run_stages(recipe, targets, force=redo, progress=progress)
