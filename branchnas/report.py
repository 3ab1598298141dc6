"""The run report: ``report.md`` plus figures, readable without opening any JSON.

It reads what the stages wrote into the run directory and explains the decision: how each
task does alone, which tasks represent images alike at which depth, which tree that leads
to within the budget, what it costs against the two extremes, and how the fine-tuned
network fares against the single-task models (Δ_MTL).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from branchnas.budget import format_count
from branchnas.errors import UserError
from branchnas.rundir import RunDir, atomic_savefig, atomic_write_text

__all__ = ["write_report", "summary", "plot_delta_vs_params", "affinity_findings", "resolve_run"]

REPORT = "report.md"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


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
               "ranked": "#dd8452", "random": "#8c8c8c"}
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
    compare = _read_json(rundir.path / "compare" / "compare.json")
    if compare:
        return [dict(row) for row in compare["rows"]]
    models = []
    if "all_separate" in extremes:
        models.append({"name": "single-task", "kind": "single-task",
                       "params": extremes["all_separate"]["params"], "delta_mtl": 0.0})
    if finetune:
        models.append({"name": "chosen", "kind": "chosen", "params": finetune["params"],
                       "delta_mtl": finetune["delta_mtl"]})
    return models


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _f(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.4f}"


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

    pretrain = _read_json(root / "pretrain" / "metrics.json")
    if pretrain:
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

    affinity_path = root / "affinity" / "affinity.npz"
    if affinity_path.exists():
        with np.load(affinity_path) as data:
            affinity = data["affinity"]
            tasks = [str(t) for t in data["tasks"]]
            points = [str(p) for p in data["points"]]
            k = int(data["images"])
        out += ["## 2. Task affinity", "",
                f"At each of the {len(points)} candidate branch points, every single-task model's features "
                f"for the same {k} held-out images give a representation dissimilarity matrix (RDM); the "
                "affinity of two tasks is the Spearman correlation of their RDMs. High affinity means the "
                "tasks see the images alike there, so sharing that layer costs little.", ""]
        out += [f"- {line}" for line in affinity_findings(affinity, tasks, points)]
        out += ["", "![affinity against depth](affinity/depth.png)", ""]
        for point in points:
            slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in point)
            if (root / "affinity" / f"heatmap_{slug}.png").exists():
                out.append(f"![affinity at {point}](affinity/heatmap_{slug}.png)")
        out.append("")

    search = _read_json(root / "search" / "tree.json")
    extremes: Mapping[str, Any] = {}
    if search:
        from branchnas.search import format_result, load_result

        result, extremes = load_result(rundir)
        budget = "no budget (the all-separate size)" if result.budget is None else (
            f"{format_count(result.budget)} {result.metric}")
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

    finetune = _read_json(root / "finetune" / "report.json")
    if finetune:
        out += ["## 4. Fine-tuned branched network", "",
                f"Initialised from the single-task models and fine-tuned on all tasks "
                f"(loss weighting: {finetune.get('weighting', 'uniform')}). Test metrics:", ""]
        rows = []
        for task in finetune["tasks"]:
            t, metric = task["name"], task["metric"]
            arrow = "↑" if task["higher_is_better"] else "↓"
            rows.append((t, f"{metric} {arrow}", _f(finetune["single_task"]["test"][t][metric]),
                         _f(finetune["test"][t][metric]), f"{100 * finetune['delta_per_task'][t]:+.2f}%"))
        out += [_table(("task", "metric", "single-task", "branched", "Δ"), rows), "",
                f"**Δ_MTL = {100 * finetune['delta_mtl']:+.2f}%** on test (mean relative change of each task's "
                f"primary metric, signed so that positive is better) with {format_count(finetune['params'])} "
                f"params and {format_count(finetune['flops'])} FLOPs.", ""]
        models = _models(rundir, finetune, extremes)
        if models:
            plot_delta_vs_params(models, root / "delta_vs_params.png")
            out += ["![Δ_MTL against params](delta_vs_params.png)", ""]
            compare = _read_json(root / "compare" / "compare.json")
            if compare:
                out += ["Compared models (`branchnas compare`):", "",
                        (root / "compare" / "compare.md").read_text().strip()
                        if (root / "compare" / "compare.md").exists() else "", ""]

    export = stages.get("export")
    if export and export.get("status") == "done":
        diff = export.get("max_abs_diff")
        worst = max(diff.values()) if isinstance(diff, dict) and diff else diff
        out += ["## 5. Export", "",
                f"{export.get('format', 'torchscript')} file: `{export.get('path')}`"
                + (f"; reloaded in a clean process without branchnas, max abs difference to eager "
                   f"{float(worst):.2e}." if worst is not None else "."), "",
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
    if (root / "search" / "tree.json").exists():
        from branchnas.search import format_summary, load_result

        result, extremes = load_result(rundir)
        lines += ["Chosen tree:", result.tree.render(), "", format_summary(result, extremes), ""]
    finetune = _read_json(root / "finetune" / "report.json")
    if finetune:
        from branchnas.finetune import report_table

        lines += ["Fine-tuned branched network (test):", report_table(finetune), ""]
    export = rundir.stage_entry("export")
    if export and export.get("status") == "done":
        lines.append(f"Exported model: {export.get('path')}")
    if (root / REPORT).exists():
        lines.append(f"Report: {root / REPORT}")
    return "\n".join(lines)
