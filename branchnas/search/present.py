"""Search results for people: text tables for the terminal and the Pareto front as a PNG.

matplotlib is imported only by :func:`plot_pareto`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from branchnas.budget import format_count, format_seconds, format_size
from branchnas.search.cost import _check_metric
from branchnas.search.result import ScoredTree, SearchResult
from branchnas.tree import Tree

__all__ = ["format_pareto", "plot_pareto", "format_result", "format_summary"]


def _short(tree: Tree, width: int = 70) -> str:
    text = repr(tree)[5:-1]
    return text if len(text) <= width else text[: width - 1] + "…"


def format_pareto(front: Sequence[ScoredTree], metric: str = "params", chosen: ScoredTree | None = None) -> str:
    """The Pareto front as a text table: one row per budget level, cheapest size first.

    Args:
        front: from :func:`pareto_front` or ``SearchResult.pareto``.
        metric: the metric the front is over.
        chosen: mark this entry (the tree picked for the budget) with ``*``.
    """
    other = "flops" if _check_metric(metric) == "params" else "params"
    header = ("", "#", f"{metric} ≤", other, "cost", "groups/point", "tree")
    rows = [
        ("*" if chosen is not None and s.tree == chosen.tree else "", str(i + 1), format_size(s.size(metric), metric),
         format_count(s.size(other)), f"{s.cost:.4f}", "-".join(map(str, s.tree.groups_per_point())), _short(s.tree))
        for i, s in enumerate(front)
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c in (0, 5, 6) else cell.rjust(w)
                       for c, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_pareto(front: Sequence[ScoredTree], path: str | Path, metric: str = "params",
                chosen: ScoredTree | None = None, budget: float | None = None) -> None:
    """Save the Pareto front (cost against size) as a PNG, written atomically."""
    from matplotlib.figure import Figure

    from branchnas.rundir import atomic_savefig

    _check_metric(metric)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    xs = [float(s.size(metric)) for s in front]
    ys = [s.cost for s in front]
    if xs:
        ax.step(xs + [xs[-1] * 1.05], ys + [ys[-1]], where="post", color="#4c72b0", lw=1.2, zorder=1)
        ax.scatter(xs, ys, color="#4c72b0", zorder=2, label="Pareto-optimal trees")
        for x, y, s in zip(xs, ys, front, strict=True):
            ax.annotate("-".join(map(str, s.tree.groups_per_point())), (x, y), xytext=(4, 4),
                        textcoords="offset points", fontsize=7, color="#555555")
    if chosen is not None:
        ax.scatter([float(chosen.size(metric))], [chosen.cost], s=120, facecolors="none", edgecolors="#c44e52",
                   lw=2, zorder=3, label="chosen tree")
    if budget is not None:
        ax.axvline(float(budget), color="#c44e52", ls="--", lw=1, label=f"budget {format_size(budget, metric)}")
    unit = {"params": "parameters", "flops": "FLOPs (1 multiply-add = 1 flop)",
            "latency": "latency per image (from the per-block table)"}[metric]
    ax.set_xlabel(f"tree size: {unit}")
    ax.set_ylabel("task clustering cost (lower is better)")
    ax.set_title("cheapest task clustering for every budget")
    ax.xaxis.set_major_formatter(_count_formatter(metric))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    atomic_savefig(fig, path)


def _count_formatter(metric: str = "params") -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: format_size(x, metric))


def format_result(result: SearchResult) -> str:
    """A few lines for the terminal: what ran, the winner's scores and its tree."""
    m = result.metric
    budget = "no budget" if result.budget is None else f"budget {format_size(result.budget, m)} {m}"
    lines = [
        f"{result.mode} search over {result.trees_considered:,} trees in {result.seconds:.2f} s ({budget}; "
        f"sizes range {format_size(result.min_size, m)}..{format_size(result.max_size, m)} {m})",
    ]
    for i, s in enumerate(result.ranked):
        latency = "" if s.latency is None else f"{format_seconds(s.latency)} latency, "
        lines.append(
            f"#{i + 1}: cost {s.cost:.4f}, {format_count(s.params)} params, {format_count(s.flops)} flops, {latency}"
            f"groups per branch point {'-'.join(map(str, s.tree.groups_per_point()))}"
        )
    lines.append(result.tree.render())
    return "\n".join(lines)


def format_summary(result: SearchResult, extremes: Mapping[str, Any]) -> str:
    """The chosen tree next to the all-shared and all-separate extremes, for the terminal."""
    rows = [("tree", "params", "flops", "cost")]
    for name, label in (("all_shared", "all shared"), ("all_separate", "all separate")):
        if name in extremes:
            e = extremes[name]
            rows.append((label, format_count(e["params"]), format_count(e["flops"]), f"{e['cost']:.4f}"))
    for i, s in enumerate(result.ranked):
        rows.append((f"chosen #{i + 1}" if len(result.ranked) > 1 else "chosen", format_count(s.params),
                     format_count(s.flops), f"{s.cost:.4f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
