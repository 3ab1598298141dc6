"""The run report: ``report.md`` plus figures, readable without opening any JSON.

It reads what the stages wrote into the run directory and explains the decision: how each
task does alone, which tasks represent images alike at which depth, which tree that leads
to within the budget, what it costs against the two extremes, and how the fine-tuned
network fares against the single-task models (Δ_MTL).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from branchnas.budget import format_count, format_size
from branchnas.errors import UserError
from branchnas.rundir import RunDir, atomic_savefig, atomic_write_text
from branchnas.tasks import format_delta

__all__ = ["write_report", "summary", "summary_data", "search_data", "plot_delta_vs_params", "affinity_findings",
           "resolve_run"]

REPORT = "report.md"


def _done(rundir: RunDir, stage: str) -> bool:
    """The stage has finished at least once, so its artifacts are there to read."""
    entry = rundir.stage_entry(stage) or {}
    return "outputs" in entry and not entry.get("partial")


def resolve_run(target: str | Path | None) -> RunDir:
    """A run directory from a path: a run directory itself, or a recipe whose run it names.

    ``None`` means the default recipe's run directory (``./branchnas.toml`` or the built-in).
    """
    from branchnas.recipe import load_recipe

    if target is not None and Path(target).is_dir():
        if not (Path(target) / "manifest.json").exists():
            raise UserError(f"{target} is not a run directory (no manifest.json); give a run directory or a recipe")
        return RunDir(target)
    recipe = load_recipe(target)
    if not (recipe.run_dir / "manifest.json").exists():
        raise UserError(f"no run in {recipe.run_dir}; run `branchnas run` first")
    return RunDir(recipe.run_dir)


# --------------------------------------------------------------------------- findings


def affinity_findings(affinity: np.ndarray, tasks: Sequence[str], points: Sequence[str]) -> list[str]:
    """Plain-language observations on a ``D x N x N`` affinity tensor.

    The closest and most distant pair at the deepest point, and whether the mean affinity
    between different tasks falls with depth (the paper observes that it does).
    """
    affinity = np.asarray(affinity, dtype=float)
    n = len(tasks)
    if n < 2:
        return ["only one task: nothing to compare"]
    iu = np.triu_indices(n, 1)
    means = [float(affinity[d][iu].mean()) for d in range(len(points))]
    deepest = affinity[-1][iu]
    order = np.argsort(deepest)
    hi, lo = order[-1], order[0]
    pair = lambda k: f"{tasks[iu[0][k]]} & {tasks[iu[1][k]]}"  # noqa: E731
    trend = "falls" if all(b <= a + 1e-9 for a, b in zip(means, means[1:], strict=False)) else (
        "mostly falls" if means[-1] < means[0] else "does not fall")
    return [
        f"at the deepest branch point ({points[-1]}) the most similar pair is {pair(hi)} "
        f"(affinity {deepest[hi]:.2f}) and the least similar is {pair(lo)} ({deepest[lo]:.2f});",
        "mean affinity between different tasks per branch point: "
        + ", ".join(f"{p} {m:.2f}" for p, m in zip(points, means, strict=True))
        + f" — it {trend} with depth (the paper observes that tasks drift apart in deeper layers).",
    ]


def plot_delta_vs_params(models: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Δ_MTL (%) against parameters for the compared models, saved as a PNG."""
    from matplotlib.figure import Figure

    colours = {"single-task": "#55a868", "all-shared": "#8172b2", "chosen": "#c44e52",
               "ranked": "#dd8452", "random": "#8c8c8c", "variant": "#da8bc3", "tuned": "#ccb974"}
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    seen = set()
    for model in models:
        kind = model.get("kind", "chosen")
        label = kind if kind not in seen else None
        seen.add(kind)
        ax.scatter([model["params"]], [100 * model["delta_mtl"]], s=70 if kind == "chosen" else 40,
                   color=colours.get(kind, "#4c72b0"), label=label, zorder=3)
        ax.annotate(model["name"], (model["params"], 100 * model["delta_mtl"]), xytext=(5, 4),
                    textcoords="offset points", fontsize=7)
    ax.axhline(0, color="#999999", lw=0.8)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_count(x)))
    ax.set_xlabel("parameters")
    ax.set_ylabel("Δ_MTL vs single-task (%) — higher is better")
    ax.set_title("multi-task performance against model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    atomic_savefig(fig, path)


# --------------------------------------------------------------------------- the report


def _models(rundir: RunDir, finetune: Mapping[str, Any] | None, extremes: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The models to place on the Δ_MTL-vs-params figure: compare's rows, else what the run has."""
    if _done(rundir, "compare"):
        from branchnas.stages.compare import read_comparison

        return [dict(row) for row in read_comparison(rundir)["rows"]]
    models = []
    if "all_separate" in extremes:
        models.append({"name": "single-task", "kind": "single-task",
                       "params": extremes["all_separate"]["params"], "delta_mtl": 0.0})
    if finetune:
        models.append({"name": "chosen", "kind": "chosen", "params": finetune["params"],
                       "delta_mtl": finetune["delta_mtl"]})
    tuned = _tuned_report(rundir)
    if tuned and "params" in tuned:
        models.append({"name": f"tuned (trial {tuned['tuned']['trial']})", "kind": "tuned",
                       "params": tuned["params"], "delta_mtl": tuned["delta_mtl"]})
    return models


def _tuned_report(rundir: RunDir) -> dict[str, Any] | None:
    """``tune/report.json`` when the tune stage is done."""
    if not _done(rundir, "tune"):
        return None
    from branchnas.stages import get_stage

    return get_stage("tune").read_json(rundir, "report.json")


def _tune_section(rundir: RunDir) -> list[str]:
    """The Optuna study of ``branchnas tune``: its best trials, the picture, and which network is final."""
    tuned = _tuned_report(rundir)
    if tuned is None:
        return []
    from branchnas.tuning import trials_table

    tune, budget = tuned["tune"], tuned["tune"]["budget"]
    best = tune["best"]
    out = ["## Tuning (stage 5)", "",
           f"Optuna study `{tune['study']}` ({tune['storage']}): {tune['finished']} finished trials "
           f"({', '.join(f'{n} {s}' for s, n in tune['trials'].items())}). Each trial fine-tunes the chosen tree "
           "with the gated variant under its λ_s and τ; the objective is val Δ_MTL (%), and a pruned network over "
           f"the budget of {format_count(budget['limit']) if budget['limit'] else 'none'} {budget['metric']} is "
           "infeasible. The best trials:", "", "```", trials_table(tune["rows"], budget["metric"], budget["limit"],
                                                                  best=(best or {}).get("number"), top=8), "```", ""]
    if best is None:
        out += ["No trial fits the budget: the run's final network is stage 4's.", ""]
    else:
        out += [f"**The run's final network is trial {best['number']}**: {format_count(tuned['params'])} params, "
                f"{format_count(tuned['flops'])} FLOPs, Δ_MTL {format_delta(tuned['delta_mtl'])} on test "
                f"({format_delta(tuned['delta_mtl_val'])} on val). `branchnas export` writes it.", ""]
    if (rundir.path / "tune" / "study.png").exists():
        out += ["![tuning trials](tune/study.png)", ""]
    return out


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _f(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.4f}"


def _trust(rundir: RunDir) -> list[str]:
    """The "how much to trust the pick" section (see :mod:`branchnas.trust`)."""
    from branchnas.pretrain import unlearned_tasks
    from branchnas.stages.affinity import read_affinity
    from branchnas.stages.compare import read_comparison
    from branchnas.stages.pretrain import read_metrics
    from branchnas.stages.search import read_result, read_runners_up
    from branchnas.trust import trust_section

    result, _ = read_result(rundir)
    affinity = read_affinity(rundir) if _done(rundir, "affinity") else None
    comparison = read_comparison(rundir) if _done(rundir, "compare") else None
    unlearned = unlearned_tasks(read_metrics(rundir)) if _done(rundir, "pretrain") else {}
    return trust_section(result, read_runners_up(rundir), affinity, comparison,
                         {t: why for t, why in unlearned.items() if t in result.tree.tasks})


def _finetune_report(rundir: RunDir) -> dict[str, Any] | None:
    if not _done(rundir, "finetune"):
        return None
    from branchnas.stages.finetune import read_report

    return read_report(rundir)


def _weighting_name(weighting: Any) -> str:
    """``uniform``, or ``gradnorm (alpha 1.5)`` for the table form."""
    if isinstance(weighting, Mapping):
        options = ", ".join(f"{k} {v}" for k, v in weighting.items() if k != "name")
        return f"{weighting.get('name', '?')}" + (f" ({options})" if options else "")
    return str(weighting or "uniform")


def _alignment_lines(finetune: Mapping[str, Any]) -> list[str]:
    """One paragraph: where the change of basis was folded in before fine-tuning (if anywhere)."""
    places = finetune.get("init_alignment") or {}
    if not places:
        return []
    kept = [(name, e) for name, e in places.items() if e["kept"]]
    text = (f"{len(places)} blocks or heads started on features of another model than their own; the change "
            f"of basis was folded into {len(kept)} of them (`finetune.align_images`; their output error against "
            "the source model's, before → after")
    details = ", ".join(f"{name} {e['error_before']:.2f} → {e['error_after']:.2f}" for name, e in kept)
    return [text + (f": {details})." if kept else ")."), ""]


def _variant_section(rundir: RunDir, finetune: Mapping[str, Any]) -> list[str]:
    """The budget check and, for the gated variant, how much each task specialised."""
    from branchnas.variants import over_budget_fix

    out = []
    budget = finetune.get("budget") or {}
    if budget.get("limit") is not None and budget.get("within") is not None:
        verdict = "fits" if budget["within"] else "**does not fit**"
        out += [f"The finished network {verdict} the budget: {format_count(budget['size'])} of "
                f"{format_count(budget['limit'])} {budget['metric']} (fvcore, measured on the network itself)."
                + ("" if budget["within"] else " `branchnas export` refuses it: "
                   f"{over_budget_fix(finetune.get('variant', 'plain'))} and fine-tune again, or set "
                   "export.over_budget = true."), ""]
    gates = finetune.get("gates")
    if gates:
        from branchnas.variants.present import gate_table

        tasks = [t["name"] for t in finetune["tasks"]]
        targets = gates["targets"]
        if len(set(targets.values())) == 1:
            targets = next(iter(targets.values()))
        out += ["### Gates (GatedMTL variant)", "",
                "In every block that several tasks share, each task had its own copy too, and per-channel "
                "gates chose between its own features and the shared ones (hinge sparsity weight "
                f"λ_s = {gates['sparsity']:g}, targets τ = {targets}). After training the closed "
                f"channels were pruned: {format_count(gates['params_before_pruning'])} → "
                f"{format_count(finetune['params'])} params. The share of each shared node's channels that a "
                "task computes itself:", "", "```", gate_table(gates["openness"], tasks, gates.get("labels")), "```", ""]
        if (rundir.path / "finetune" / "gates.png").exists():
            out += ["![gate openness](finetune/gates.png)", ""]
    return out


def write_report(rundir: RunDir) -> Path:
    """Write ``report.md`` (and ``delta_vs_params.png``) from the run directory's artifacts.

    Sections for stages that have not run yet are left out, so it works mid-pipeline.
    """
    root = rundir.path
    manifest = rundir.manifest()
    stages = manifest.get("stages", {})
    recipe_text = (root / "recipe.toml").read_text() if (root / "recipe.toml").exists() else ""
    name = root.name
    out: list[str] = [f"# branchnas report: {name}", ""]
    timing = [(s, e.get("status", "?"), f"{e.get('seconds', 0):.0f} s") for s, e in stages.items()]
    if timing:
        out += ["Stages: " + ", ".join(f"{s} ({st}, {t})" for s, st, t in timing) + ".", ""]

    if _done(rundir, "pretrain"):
        from branchnas.stages.pretrain import read_metrics

        pretrain = read_metrics(rundir)
        out += ["## 1. Single-task baselines", "",
                "One model per task, all with the same encoder (the paper's first step). Their test "
                "metrics are the baselines every Δ_MTL below is measured against; *chance* is the best "
                "constant prediction.", ""]
        rows = []
        for task, e in pretrain["tasks"].items():
            metric = e["metric"]
            arrow = "↑" if e["higher_is_better"] else "↓"
            rows.append((task, e["kind"], f"{metric} {arrow}", _f(e["val"].get(metric)), _f(e["test"].get(metric)),
                         _f(e.get("chance", {}).get(metric))))
        out += [_table(("task", "kind", "metric", "val", "test", "chance"), rows), ""]

    if _done(rundir, "affinity"):
        from branchnas.stages import get_stage
        from branchnas.stages.affinity import heatmap_name, read_affinity

        saved = read_affinity(rundir)
        affinity, tasks, points, k = saved["affinity"], saved["tasks"], saved["points"], saved["images"]
        out += ["## 2. Task affinity", "",
                f"At each of the {len(points)} candidate branch points, every single-task model's features "
                f"for the same {k} held-out images give a representation dissimilarity matrix (RDM); the "
                "affinity of two tasks is the Spearman correlation of their RDMs. High affinity means the "
                "tasks see the images alike there, so sharing that layer costs little.", ""]
        out += [f"- {line}" for line in affinity_findings(affinity, tasks, points)]
        out += ["", "![affinity against depth](affinity/depth.png)", ""]
        for point in points:
            if get_stage("affinity").path(rundir, heatmap_name(point)).exists():
                out.append(f"![affinity at {point}](affinity/{heatmap_name(point)})")
        out.append("")

    extremes: Mapping[str, Any] = {}
    if _done(rundir, "search"):
        from branchnas.search import format_result
        from branchnas.stages.search import read_result

        result, extremes = read_result(rundir)
        budget = "no budget (the all-separate size)" if result.budget is None else (
            f"{format_size(result.budget, result.metric)} {result.metric}")
        out += ["## 3. The chosen tree", "",
                f"Budget: {budget}. The {result.mode} search considered {result.trees_considered:,} trees and "
                "picked the one with the least clustering cost (the sum over branch points of the mean, over "
                "groups, of the largest dissimilarity 1 − affinity within a group) that fits the budget.", "",
                "```", format_result(result), "```", ""]
        rows = [(label, format_count(extremes[key]["params"]), format_count(extremes[key]["flops"]),
                 f"{extremes[key]['cost']:.4f}")
                for key, label in (("all_shared", "all shared"), ("all_separate", "all separate")) if key in extremes]
        rows.insert(1, ("**chosen**", format_count(result.best.params), format_count(result.best.flops),
                        f"{result.cost:.4f}"))
        out += [_table(("tree", "params", "FLOPs (multiply-adds)", "clustering cost"), rows), "",
                "![chosen tree](search/tree.png)", "", "![Pareto front](search/pareto.png)", ""]

    finetune = _finetune_report(rundir)
    if finetune:
        out += ["## 4. Fine-tuned branched network", "",
                f"Initialised from the single-task models and fine-tuned on all tasks "
                f"(variant: {finetune.get('variant', 'plain')}, loss weighting: {_weighting_name(finetune.get('weighting'))}). "
                "Test metrics:", ""]
        rows = []
        for task in finetune["tasks"]:
            t, metric = task["name"], task["metric"]
            arrow = "↑" if task["higher_is_better"] else "↓"
            rows.append((t, f"{metric} {arrow}", _f(finetune["single_task"]["test"][t][metric]),
                         _f(finetune["test"][t][metric]), format_delta(finetune['delta_per_task'][t])))
        out += [_table(("task", "metric", "single-task", "branched", "Δ"), rows), "",
                f"**Δ_MTL = {format_delta(finetune['delta_mtl'])}** on test (mean relative change of each task's "
                f"primary metric, signed so that positive is better) with {format_count(finetune['params'])} "
                f"params and {format_count(finetune['flops'])} FLOPs.", ""]
        out += _alignment_lines(finetune)
        out += _variant_section(rundir, finetune)
        out += _tune_section(rundir)
        models = _models(rundir, finetune, extremes)
        if models:
            plot_delta_vs_params(models, root / "delta_vs_params.png")
            out += ["![Δ_MTL against params](delta_vs_params.png)", ""]
            if _done(rundir, "compare"):
                from branchnas.stages.compare import read_comparison_markdown

                out += ["Compared models (`branchnas compare`):", "",
                        (read_comparison_markdown(rundir) or "").strip(), ""]

    if _done(rundir, "search"):
        out += _trust(rundir)

    export = stages.get("export")
    if export and _done(rundir, "export"):
        # {task: diff} per file when checked; {} with export.check = false
        files = export.get("formats") or {export.get("format", "torchscript"): export}
        lines = []
        for fmt, entry in files.items():
            diff = entry.get("max_abs_diff")
            worst = (max(diff.values()) if diff else None) if isinstance(diff, dict) else diff
            lines.append(f"- {fmt}: `{entry.get('path')}`" + (
                f"; reloaded in a clean process without branchnas, max abs difference to eager {float(worst):.2e}"
                if worst is not None else "; not checked (export.check = false)"))
        out += ["## 5. Export", "", *lines, "",
                "How to load it from plain PyTorch: `docs/exported-model.md` in the branchnas repository.", ""]
    if recipe_text:
        out += ["## Recipe", "", "```toml", recipe_text.strip(), "```", ""]
    path = root / REPORT
    atomic_write_text(path, "\n".join(out))
    return path


def summary(rundir: RunDir) -> str:
    """The end-of-run summary for the terminal: tree, sizes against the extremes, metrics, Δ_MTL, export."""
    root = rundir.path
    lines: list[str] = []
    if _done(rundir, "search"):
        from branchnas.search import format_summary
        from branchnas.stages.search import read_result

        result, extremes = read_result(rundir)
        lines += ["Chosen tree:", result.tree.render(), "", format_summary(result, extremes), ""]
        if _done(rundir, "pretrain"):
            from branchnas.pretrain import unlearned_warnings
            from branchnas.stages.pretrain import read_metrics

            warnings = unlearned_warnings(read_metrics(rundir), result.tree.tasks)
            lines += [*warnings, ""] if warnings else []
    finetune = _finetune_report(rundir)
    if finetune:
        from branchnas.finetune import report_table

        lines += ["Fine-tuned branched network (test):", report_table(finetune), ""]
    tuned = _tuned_report(rundir)
    if tuned and tuned["tune"]["best"] is not None:
        from branchnas.finetune import report_table

        lines += [f"Tuned network, trial {tuned['tune']['best']['number']} of {tuned['tune']['finished']} (test):",
                  report_table(tuned), ""]
    export = rundir.stage_entry("export")
    if export and _done(rundir, "export"):
        lines.append(f"Exported model: {export.get('path')}")
    if (root / REPORT).exists():
        lines.append(f"Report: {root / REPORT}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- as data (--json)


def search_data(rundir: RunDir, pareto: bool = True) -> dict[str, Any]:
    """The search result as JSON-able data (``branchnas search --json``).

    The chosen tree with its clustering cost, params and FLOPs at the top; then what the
    budget counts and its value, the search that ran, the ranked trees (``search.top``), the
    runners-up, the all-shared and all-separate extremes and, with ``pareto``, the Pareto front.
    """
    from branchnas.stages import get_stage
    from branchnas.stages.search import read_result, read_runners_up

    result, extremes = read_result(rundir)
    best = result.best
    data: dict[str, Any] = {
        "run_dir": str(rundir.path),
        "tree": best.tree.to_json(),
        "cost": best.cost,
        "params": best.params,
        "flops": best.flops,
        "metric": result.metric,
        "budget": result.budget,
        "mode": result.mode,
        "trees_considered": result.trees_considered,
        "seconds": result.seconds,
        "min_size": result.min_size,
        "max_size": result.max_size,
        "ranked": [scored.to_json() for scored in result.ranked],
        "runners_up": [scored.to_json() for scored in read_runners_up(rundir)],
        "extremes": dict(extremes),
    }
    if pareto:
        data["pareto"] = [scored.to_json() for scored in result.pareto or ()]
    stage = get_stage("search")
    data["files"] = [str(stage.path(rundir, a.name)) for a in stage.artifacts if stage.path(rundir, a.name).exists()]
    return data


def summary_data(rundir: RunDir) -> dict[str, Any]:
    """What :func:`summary` prints, as JSON-able data (``branchnas run --json``, ``report --json``).

    ``tree`` (the chosen tree), ``search`` (its cost, size and the extremes), ``params`` and
    ``flops`` (of the fine-tuned network, else of the searched tree), per-task test metrics
    next to the single-task ones (``tasks``), ``delta_mtl`` (test; ``None`` before stage 4 or
    when undefined), the budget check, the exported file (``export``) and ``report.md``; a key
    whose stage has not run is ``None``.
    """
    root = rundir.path
    data: dict[str, Any] = {"run_dir": str(root), "tree": None, "search": None, "params": None, "flops": None,
                            "variant": None, "weighting": None, "tasks": None, "delta_mtl": None,
                            "delta_mtl_val": None, "budget": None, "export": None, "report": None}
    if _done(rundir, "search"):
        from branchnas.stages.search import read_result

        result, extremes = read_result(rundir)
        data["tree"] = result.tree.to_json()
        data["search"] = {"metric": result.metric, "budget": result.budget, "mode": result.mode,
                          "cost": result.cost, "params": result.best.params, "flops": result.best.flops,
                          "extremes": dict(extremes)}
        data["params"], data["flops"] = result.best.params, result.best.flops
    finetune = _finetune_report(rundir)
    if finetune:
        data["params"], data["flops"] = finetune["params"], finetune["flops"]
        data["tree"] = data["tree"] or finetune.get("tree")
        data["variant"] = finetune.get("variant", "plain")
        data["weighting"] = finetune.get("weighting")
        data["delta_mtl"], data["delta_mtl_val"] = finetune["delta_mtl"], finetune.get("delta_mtl_val")
        data["budget"] = finetune.get("budget")
        data["tasks"] = {
            t["name"]: {"metric": t["metric"], "higher_is_better": t["higher_is_better"],
                        "test": finetune["test"][t["name"]], "val": finetune["val"][t["name"]],
                        "single_task": finetune["single_task"]["test"][t["name"]],
                        "delta": finetune["delta_per_task"][t["name"]]}
            for t in finetune["tasks"]
        }
    tuned = _tuned_report(rundir)
    data["tuned"] = None if not tuned or tuned["tune"]["best"] is None else {
        "trial": tuned["tune"]["best"]["number"], "params": dict(tuned["tune"]["best"]["params"]),
        "trials": tuned["tune"]["finished"], "model_params": tuned["params"], "flops": tuned["flops"],
        "delta_mtl": tuned["delta_mtl"], "delta_mtl_val": tuned["delta_mtl_val"], "budget": tuned.get("budget")}
    export = rundir.stage_entry("export")
    if export and _done(rundir, "export"):
        data["export"] = {k: export[k] for k in ("path", "format", "checked", "max_abs_diff", "source") if k in export}
    if (root / REPORT).exists():
        data["report"] = str(root / REPORT)
    return data
