"""`branchnas run`: the whole pipeline against one run directory."""

from __future__ import annotations

import click
from branchnas_cli._options import (
    emit_json,
    json_option,
    load,
    note,
    recipe_options,
    stdout_to_stderr,
)


class _StageChoice(click.Choice):
    """The registered stages, read when the command is built (importing no torch)."""

    def __init__(self) -> None:
        from branchnas.stages import stage_names

        super().__init__(stage_names())


@click.command(name="run")
@recipe_options
@click.option("--until", type=_StageChoice(), help="Stop after this stage (an optional stage such as compare runs too).")
@click.option("--from", "start", type=_StageChoice(), help="Redo this stage and every later one.")
@click.option("--budget", help="Shortcut for --set search.budget=... (e.g. 1M, 500k).")
@click.option("--force", is_flag=True, help="Redo every stage.")
@json_option
def command(recipe, overrides, until, start, budget, force, as_json):  # noqa: ANN001
    """Run every stage of the pipeline, then write the report.

    The stages and their order come from their declared dependencies: pretrain → affinity →
    search → finetune → export (tune runs before export with tune.enabled = true, and its best
    trial is what is exported; compare is optional: --until compare). With no RECIPE it
    uses ./branchnas.toml if present, else the built-in default recipe (generated shapes
    data; a few minutes on a laptop CPU). Every stage's checks run before any work. A re-run
    skips finished stages, a killed run resumes where it stopped, and a failed stage leaves
    the previous outputs as they were. The run directory gets report.md with the figures;
    `branchnas report` prints it again.

    With --json: {run_dir, stages: {stage: {status, skipped, seconds, outputs}}, summary:
    {tree, search, params, flops, variant, weighting, tasks: {task: {metric, test, val,
    single_task, delta}}, delta_mtl, delta_mtl_val, budget, tuned, export, report}}; a stage that
    did not run leaves its keys null.
    """
    from branchnas.pipeline import run_pipeline
    from branchnas.report import summary, summary_data, write_report
    from branchnas.training import distributed

    sets = list(overrides) + ([f'search.budget="{budget}"'] if budget else [])
    with stdout_to_stderr(as_json):
        resolved = load(recipe, tuple(sets))
        note(f"run directory: {resolved.run_dir}")
        rundir, results = run_pipeline(resolved, start=start, until=until, force=force)
        skipped = [name for name, result in results.items() if result.get("skipped")]
        if skipped:
            note(f"(unchanged, skipped: {', '.join(skipped)})")
        if distributed.is_main():  # under torchrun, rank 0 writes the files
            write_report(rundir)
    if as_json:
        stages = {name: {"status": result.get("status"), "skipped": bool(result.get("skipped")),
                         "seconds": result.get("seconds"), "outputs": list(result.get("outputs", []))}
                  for name, result in results.items()}
        emit_json({"run_dir": str(rundir.path), "stages": stages, "summary": summary_data(rundir)})
        return
    click.echo(summary(rundir))
