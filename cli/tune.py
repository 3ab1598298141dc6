"""`branchnas tune`: stage 5, Optuna over the gated variant's sparsity and hinge targets."""

from __future__ import annotations

from pathlib import Path

import click
from branchnas_cli._options import (
    emit_json,
    force_option,
    json_option,
    load,
    note,
    recipe_options,
    run_stage_command,
    stdout_to_stderr,
)


@click.command(name="tune")
@recipe_options
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Add this many finished trials to the study (default: fill it up to tune.trials). A call that "
                   "was killed resumes when run again with the same --trials.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Start no new trial after this many seconds (default: tune.timeout).")
@click.option("--storage", default=None, metavar="URL",
              help="Optuna storage shared by every worker, e.g. postgresql://user@host/db (password in PGPASSWORD); "
                   "default: tune.storage, else SQLite in <run dir>/tune-study/study.db.")
@click.option("--study", default=None, metavar="NAME", help="Study name (default: tune.study, else <name>-<hash>).")
@click.option("--worker", is_flag=True,
              help="Only take trials of the shared study (another process runs the stage and writes the final "
                   "model); needs the run directory's stage 4 done.")
@click.option("--show", is_flag=True, help="Print the study's best trials and the Pareto front; run nothing.")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="With --show: also draw the trials (val Δ_MTL against size, and by trial) into this PNG.")
@force_option
@json_option
def command(recipe: str | None, overrides: tuple[str, ...], trials: int | None, timeout: float | None,
            storage: str | None, study: str | None, worker: bool, show: bool, png: str | None, force: bool,
            as_json: bool) -> None:
    """Tune the gated variant's λ_s and hinge targets τ with Optuna, the search budget a hard constraint.

    Each trial fine-tunes the chosen tree with the gated variant (finetune.gated) under the
    sampled λ_s (log-uniform in [tune.sparsity_min, tune.sparsity_max], GatedMTL's grid first)
    and τ (tune.targets: one shared, one per task, or fixed), and scores the pruned network by
    val Δ_MTL. Trials whose pruned params (or FLOPs) exceed the search budget are infeasible
    (Optuna's constraints); unpromising ones are pruned per epoch (tune.pruner). The best
    feasible trial's network becomes the run's final model: `branchnas export`, report.md and
    `branchnas compare` use tune/model.pt. Writes tune/report.json, trials.csv and study.png.

    The study is kept in <run dir>/tune-study/study.db (SQLite) unless --storage names a
    database: a killed tune resumes, and --trials N adds N trials. For many workers, give every
    process the same --storage postgresql://... ; run one `branchnas tune` (it holds the run
    directory and writes the final model) and any number of `branchnas tune --worker`.

    With --json: {run_dir, skipped, study, trials, best_trial, delta_mtl_val, params, flops,
    budget} (--show --json: {table, front, summary, rows, best, png}).
    """
    from branchnas.errors import UserError
    from branchnas.rundir import RunDir
    from branchnas.stages import tune as stage

    resolved = load(recipe, overrides)
    options = {k: v for k, v in {"storage": storage, "study": study, "timeout": timeout}.items() if v is not None}
    if show:
        shown = stage.show(resolved, RunDir(resolved.run_dir), options, Path(png) if png else None)
        if as_json:
            emit_json(shown)
            return
        click.echo(f"study {shown['summary']['study']} in {shown['summary']['storage']}: "
                   f"{shown['summary']['finished']} finished trial(s) {shown['summary']['trials']}")
        click.echo(shown["table"])
        click.echo("\nPareto front within the budget (no other trial is both smaller and better on val Δ_MTL):")
        click.echo(shown["front"])
        if shown["png"]:
            click.echo(f"wrote {shown['png']}")
        return
    if png:
        raise UserError("--png goes with --show; the stage itself writes tune/study.png")
    if worker:
        with stdout_to_stderr(as_json):
            done = stage.run_worker(resolved, RunDir(resolved.run_dir), options)
        if as_json:
            emit_json(done)
        else:
            click.echo(f"worker: {done['finished_here']} trial(s) finished here; the study "
                       f"{done['study']} holds {done['finished']}")
        return
    if trials is not None:
        options["more"] = trials
    with stdout_to_stderr(as_json):
        note(f"tune: up to {trials if trials else resolved.tune.trials} trial(s), each a gated fine-tuning of "
             f"{resolved.finetune.epochs} epoch(s)")
        # --trials asks for new trials: the stage runs again even when its inputs are unchanged.
        rundir, outcome = run_stage_command(resolved, "tune", force=force or trials is not None, options=options)
        report = stage.get_stage("tune").read_json(rundir, "report.json")
        from branchnas.report import write_report

        write_report(rundir)  # report.md shows the study and the final network, as after `branchnas run`
    tune = report["tune"]
    if as_json:
        emit_json({"run_dir": str(rundir.path), "skipped": bool(outcome.get("skipped")), "study": tune["study"],
                   "trials": tune["finished"], "best_trial": (tune["best"] or {}).get("number"),
                   "delta_mtl_val": (tune["best"] or {}).get("val_delta_mtl"), "params": report.get("params"),
                   "flops": report.get("flops"), "budget": tune["budget"]})
        return
    _print(rundir, report)


def _print(rundir: object, report: dict) -> None:
    from branchnas import tuning
    from branchnas.budget import format_count
    from branchnas.finetune import report_table

    tune = report["tune"]
    budget = tune["budget"]
    click.echo(f"study {tune['study']} ({tune['storage']}): {tune['finished']} finished trial(s) {tune['trials']}")
    click.echo(tuning.trials_table(tune["rows"], budget["metric"], budget["limit"],
                                   best=(tune["best"] or {}).get("number")))
    folder = rundir.path / "tune"  # type: ignore[attr-defined]
    if tune["best"] is None:
        click.echo(f"\nno trial fits the budget of {format_count(budget['limit'])} {budget['metric']}: the run keeps "
                   "stage 4's network. Raise tune.sparsity_max or lower tune.target_max, and add trials "
                   "(branchnas tune --trials N).")
    else:
        click.echo(f"\nbest trial {tune['best']['number']} (test metrics of its pruned network):")
        click.echo(report_table(report))
        click.echo(f"wrote {folder / 'model.pt'}: the run's final model (branchnas export writes it)")
    click.echo(f"wrote {folder / 'report.json'}, trials.csv, study.png")
