"""Stage 5, ``tune`` (optional): Optuna over the gated variant's sparsity weight and hinge targets.

The work is :mod:`branchnas.tuning`. The stage runs the study's trials (each a gated
fine-tuning of the chosen tree), waits for any other worker's running trials, and makes the
best trial within the search budget the run's final model: ``branchnas export``, report.md
and ``branchnas compare`` use ``tune/model.pt`` whenever this stage is done for the current
tree and settings (:func:`final_model`).

Keyed, like fine-tuning, on the tree and the single-task models, plus the fine-tuning settings
the trials share and the search space. Where the study is stored, how many trials it holds and
for how long it runs do not key it: the study is the stage's running state (kept outside its
folder, in ``tune-study/``), and its folder holds only what the study concluded.

Artifacts in ``tune/``: ``model.pt`` (the best feasible trial's pruned network, the format of
``finetune/model.pt``; absent when no trial fits the budget), ``report.json`` (that trial's
fine-tuning report plus the study's summary and every trial), ``trials.csv`` and
``study.png`` (val Δ_MTL against size, and by trial).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from branchnas.errors import UserError
from branchnas.stages._base import (
    Artifact,
    Stage,
    StageContext,
    get_stage,
    is_current,
    register_stage,
)

__all__ = ["TuneStage", "final_model", "read_tuned", "run_worker", "show", "REQUEST_ATTR"]

#: Study user attribute: the target of a ``--trials N`` call that has not finished (a rerun resumes it).
REQUEST_ATTR = "open_request"
#: The tune settings that define the search (the rest says where and how long it runs).
SPACE_KEYS = ("objective", "sparsity_min", "sparsity_max", "grid", "targets", "target_min", "target_max", "lr",
              "pruner", "pruner_startup")


@register_stage
class TuneStage(Stage):
    name = "tune"
    summary = "Stage 5: tune the gated variant's sparsity and hinge targets with Optuna (budget as a constraint)."
    requires = ("finetune",)
    optional = True
    artifacts = (
        Artifact("model.pt", "the best trial within the budget: its pruned gated network (finetune/model.pt's format)"),
        Artifact("report.json", "that trial's fine-tuning report, the study's summary and every trial"),
        Artifact("trials.csv", "one row per trial: state, λ_s, τ, val/test Δ_MTL, params, FLOPs, feasibility, time"),
        Artifact("study.png", "val Δ_MTL against the pruned size (budget line, feasible front) and by trial"),
    )

    def enabled(self, recipe: Any) -> bool:
        return bool(recipe.tune.enabled)

    def dependencies(self, recipe: Any, options: Mapping[str, Any]) -> tuple[str, ...]:
        return (*get_stage("finetune").dependencies(recipe, options), "finetune")

    def keyed_on(self, recipe: Any, options: Mapping[str, Any]) -> tuple[str, ...]:
        # As fine-tuning: the single-task models (and affinity for init); the tree by content.
        return get_stage("finetune").keyed_on(recipe, options)

    def config(self, recipe: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        finetune = get_stage("finetune").config(dataclasses.replace(
            recipe, finetune=dataclasses.replace(recipe.finetune, variant="gated")), options)
        # The trials' variant is always gated, and λ_s and τ are what the study chooses.
        finetune["finetune"].pop("variant")
        for key in ("sparsity", "targets") if recipe.tune.targets != "fixed" else ("sparsity",):
            finetune["finetune"]["gated"].pop(key)
        return {**finetune, "tune": {k: getattr(recipe.tune, k) for k in SPACE_KEYS}}

    def fingerprint_extra(self, recipe: Any, rundir: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        return get_stage("finetune").fingerprint_extra(recipe, rundir, options)

    def check(self, recipe: Any, options: Mapping[str, Any]) -> None:
        from branchnas import tuning
        from branchnas.finetune import check_variant
        from branchnas.stages._checks import splits_of

        if recipe.search.metric == "latency":
            raise UserError("tune: a latency budget (search.metric = 'latency') cannot constrain the trials (their "
                            "pruned size is counted in params or FLOPs); use search.metric = 'params' or 'flops'")
        names = [t.name for t in splits_of(recipe)[1]]
        check_variant(recipe, "gated", task_names=names)
        url = options.get("storage") or recipe.tune.storage
        if url:
            tuning.check_storage(url, connect=True)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from branchnas import tuning
        from branchnas.rundir import atomic_write_json
        from branchnas.stages.search import read_tree

        recipe, rundir = _with_storage(ctx.recipe, ctx.options), ctx.rundir
        url = tuning.storage_url(recipe, rundir)
        study = tuning.open_study(recipe, url, study_name(recipe, rundir))
        target = _target(study, recipe, ctx.options.get("more"))
        study.set_user_attr(tuning.TARGET_ATTR, target)
        runner = tuning.TrialRunner(recipe, rundir, read_tree(rundir), study, progress=ctx.progress)
        study.set_user_attr("budget", {"metric": runner.metric, "limit": runner.limit})
        study.set_user_attr("tasks", runner.names)
        timeout = ctx.options.get("timeout")
        tuning.run_trials(runner, target, timeout=timeout if timeout is not None else (recipe.tune.timeout or None))
        tuning.wait_for_running(study)
        best = tuning.best_trial(study)
        rows = tuning.trial_rows(study)
        folder = ctx.folder
        _write_csv(folder / "trials.csv", rows)
        tuning.plot_study(rows, folder / "study.png", runner.metric, runner.limit, best.number if best else None)
        summary = tuning.study_summary(study, url) | {
            "best": None if best is None else {"number": best.number, "params": dict(best.params),
                                               "val_delta_mtl": best.values[0]},
            "budget": {"metric": runner.metric, "limit": runner.limit}, "rows": rows,
        }
        outputs = ["trials.csv", "study.png", "report.json"]
        if best is None:
            report: dict[str, Any] = {"tune": summary}
        else:
            report = _best_model(runner, best, folder) | {"tune": summary}
            outputs.append("model.pt")
        atomic_write_json(folder / "report.json", report)
        study.set_user_attr(REQUEST_ATTR, None)  # this call's trials are all in: the next call adds anew
        return {"outputs": outputs, "study": study.study_name, "trials": summary["finished"],
                "best_trial": None if best is None else best.number,
                "delta_mtl_val": None if best is None else best.values[0]}


def _with_storage(recipe: Any, options: Mapping[str, Any]) -> Any:
    """``recipe`` with ``--storage`` / ``--study`` from the command line."""
    changes = {k: options[k] for k in ("storage", "study") if options.get(k)}
    return dataclasses.replace(recipe, tune=dataclasses.replace(recipe.tune, **changes)) if changes else recipe


def study_name(recipe: Any, rundir: Any) -> str:
    """The study of this recipe and tree: ``tune.study``, or ``<name>-<hash>`` that every worker computes alike."""
    from branchnas import tuning
    from branchnas.stages._base import stage_config

    return tuning.study_name(recipe, stage_config("tune", recipe, rundir, {}))


def _target(study: Any, recipe: Any, more: int | None) -> int:
    """How many finished trials this call aims at.

    ``branchnas tune --trials N`` adds N to what the study holds, unless a call that asked for
    more was interrupted: then it resumes that call. Otherwise the study holds ``tune.trials``.
    """
    from branchnas import tuning

    finished = tuning.finished_count(study)
    pending = study.user_attrs.get(REQUEST_ATTR)
    if more is None:
        return max(recipe.tune.trials, pending or 0)
    if pending is not None and pending > finished:
        return int(pending)
    study.set_user_attr(REQUEST_ATTR, finished + int(more))
    return finished + int(more)


def _best_model(runner: Any, best: Any, folder: Path) -> dict[str, Any]:
    """The best trial's fine-tuning report, its model copied into ``folder`` (trained again if not here)."""
    import json

    from branchnas.rundir import file_sha256

    saved = Path(str(best.user_attrs.get("model", "")))
    source = "trial"
    if not (saved.is_file() and file_sha256(saved) == best.user_attrs.get("model_sha256")
            and (saved.parent / "report.json").is_file()):
        # Another machine ran it (or its folder is gone): the same settings and seeds train it again.
        key = runner.key(best.params)
        saved = runner.root / key / "model.pt"
        runner.train(best.params, saved.parent, f"trial {best.number} again")
        source = "trained again"
    report = json.loads((saved.parent / "report.json").read_text())
    shutil.copyfile(saved, folder / "model.pt")  # the staging folder: swapped in whole, or not at all
    report["tuned"] = {"trial": best.number, "params": dict(best.params), "model_from": source,
                       "val_delta_mtl_in_study": best.values[0]}
    return report


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from branchnas.rundir import atomic_write_text

    names = sorted({k for r in rows for k in r["params"]}, key=lambda k: (k != "sparsity", k))
    fields = ["number", "state", *names, "val_delta_mtl", "test_delta_mtl", "last_epoch", "params_count", "flops",
              "feasible", "seconds", "worker"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: v for k, v in row.items() if k != "params"} | dict(row["params"]))
    atomic_write_text(path, buffer.getvalue())


# --------------------------------------------------------------------------- readers


def read_tuned(rundir: Any, recipe: Any) -> dict[str, Any] | None:
    """``tune/report.json`` when the stage is done for this recipe's tree and settings and has a model."""
    stage = get_stage("tune")
    if not is_current("tune", recipe, rundir) or not stage.path(rundir, "model.pt").is_file():
        return None
    return stage.read_json(rundir, "report.json")


def final_model(rundir: Any, recipe: Any) -> tuple[Path, str]:
    """The run's final network: ``(path, "tune")`` when tuning is done and found one, else stage 4's."""
    from branchnas.stages.finetune import model_path

    if read_tuned(rundir, recipe) is not None:
        return get_stage("tune").path(rundir, "model.pt"), "tune"
    return model_path(rundir), "finetune"


# --------------------------------------------------------------------------- workers and --show


def run_worker(recipe: Any, rundir: Any, options: Mapping[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """``branchnas tune --worker``: add trials to the shared study; write nothing in the stages' folders.

    The run directory must already hold what the trials read (stage 4 done for this recipe);
    the lock stays with the process that runs the stage.
    """
    from branchnas import tuning
    from branchnas.stages.search import read_tree

    recipe = _with_storage(recipe, options)
    stage = get_stage("tune")
    stage.check(recipe, options)
    for dep in stage.dependencies(recipe, options):
        if not is_current(dep, recipe, rundir):
            raise UserError(f"tune --worker: stage '{dep}' is not done for this recipe in {rundir.path}; run "
                            f"`branchnas finetune` there first (workers only read the run directory)")
    url = tuning.storage_url(recipe, rundir)
    study = tuning.open_study(recipe, url, study_name(recipe, rundir), seed_tag=tuning.worker_id())
    runner = tuning.TrialRunner(recipe, rundir, read_tree(rundir), study, progress=progress)
    target = int(study.user_attrs.get(tuning.TARGET_ATTR, recipe.tune.trials))
    timeout = options.get("timeout")
    done = tuning.run_trials(runner, target, timeout=timeout if timeout is not None else (recipe.tune.timeout or None))
    return {"study": study.study_name, "finished_here": done, "finished": tuning.finished_count(study)}


def show(recipe: Any, rundir: Any, options: Mapping[str, Any], png: Path | None, top: int = 10) -> dict[str, Any]:
    """``branchnas tune --show``: the study's best trials and front as a table (and a PNG); no work."""
    from branchnas import tuning
    from branchnas.stages.search import read_result

    recipe = _with_storage(recipe, options)
    url = tuning.storage_url(recipe, rundir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise UserError(f"no tuning study in {rundir.path} yet; run `branchnas tune` first")
    study = tuning.open_study(recipe, url, study_name(recipe, rundir), create=False)
    result, _ = read_result(rundir)
    best = tuning.best_trial(study)
    rows = tuning.trial_rows(study)
    table = tuning.trials_table(rows, result.metric, result.budget, best=best.number if best else None, top=top)
    front = tuning.pareto_front(rows, result.metric)
    front_table = tuning.trials_table(front, result.metric, result.budget, best=best.number if best else None)
    if png is not None:
        tuning.plot_study(rows, png, result.metric, result.budget, best.number if best else None)
    return {"table": table, "front": front_table, "summary": tuning.study_summary(study, url), "rows": rows,
            "best": None if best is None else best.number, "png": str(png) if png else None}
