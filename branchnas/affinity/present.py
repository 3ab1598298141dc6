"""Presentation of the affinity tensor: a terminal table (:func:`format_affinity`) and figures.

:func:`plot_heatmap` draws one branch point's N x N affinity, :func:`plot_depth` the affinity
of every task pair against depth (the paper's Fig. 4). The figures are bare matplotlib
``Figure`` objects on the Agg canvas; matplotlib is imported only when one is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["ANNOTATE_MAX_TASKS", "format_affinity", "plot_depth", "plot_heatmap"]


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=float)


def format_affinity(
    affinity: Any,
    tasks: Sequence[str],
    points: Sequence[str],
    low: Any = None,
    high: Any = None,
) -> str:
    """A compact table per branch point, for the terminal.

    Args:
        affinity: ``(D, N, N)`` tensor or array.
        tasks: the N task names.
        points: the D branch-point names.
        low, high: optional ``(D, N, N)`` interval bounds, shown as ``[low, high]``.

    Example:
        >>> print(format_affinity(torch.eye(2)[None], ["seg", "depth"], ["layer1"]))
        layer1
                 seg  depth
        seg     1.00   0.00
        depth   0.00   1.00
    """
    a = _as_array(affinity)
    lo = None if low is None else _as_array(low)
    hi = None if high is None else _as_array(high)
    label = max(len(t) for t in tasks)
    blocks = []
    for d, point in enumerate(points):
        cells = [[_cell(a[d, i, j], lo, hi, d, i, j) for j in range(len(tasks))] for i in range(len(tasks))]
        width = max(max(len(t) for t in tasks), *(len(c) for row in cells for c in row))
        lines = [str(point), " " * label + "".join(f"  {t:>{width}}" for t in tasks)]
        for task, row in zip(tasks, cells, strict=True):
            lines.append(f"{task:<{label}}" + "".join(f"  {c:>{width}}" for c in row))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _cell(value: float, lo: Any, hi: Any, d: int, i: int, j: int) -> str:
    text = f"{value:.2f}"
    if lo is not None and hi is not None and i != j:
        text += f" [{lo[d, i, j]:.2f}, {hi[d, i, j]:.2f}]"
    return text


def _figure(width: float, height: float) -> Any:
    # A bare Figure on the Agg canvas: headless, and no pyplot global state to leak.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


#: Heatmaps of more tasks than this show colours only, no numbers in the cells.
ANNOTATE_MAX_TASKS = 12


def plot_heatmap(affinity: Any, tasks: Sequence[str], point: str, low: Any = None, high: Any = None) -> Any:
    """A heatmap of one branch point's ``(N, N)`` affinity, values written in the cells.

    Returns:
        A matplotlib ``Figure`` (save it with :func:`branchnas.rundir.atomic_savefig`).
    """
    a = _as_array(affinity)
    n = len(tasks)
    fig = _figure(1.6 + 0.9 * n, 1.2 + 0.8 * n)
    ax = fig.add_subplot()
    image = ax.imshow(a, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    ax.set_xticks(range(n), labels=list(tasks), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(tasks))
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    ax.set_title(f"RSA task affinity at {point}")
    lo = None if low is None else _as_array(low)
    hi = None if high is None else _as_array(high)
    # Past a dozen tasks the numbers no longer fit their cells, and drawing them dominates
    # the stage's time (about 10 s per heatmap at 40 tasks): the colours say it all.
    for i in range(n if n <= ANNOTATE_MAX_TASKS else 0):
        for j in range(n):
            text = f"{a[i, j]:.2f}"
            if lo is not None and hi is not None and i != j:
                text += f"\n[{lo[i, j]:.2f}, {hi[i, j]:.2f}]"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if abs(a[i, j]) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="Spearman correlation of RDMs")
    return fig


def plot_depth(affinity: Any, tasks: Sequence[str], points: Sequence[str], low: Any = None, high: Any = None) -> Any:
    """Affinity against depth (the paper's Fig. 4): one line per task pair, plus their mean.

    Returns:
        A matplotlib ``Figure``.
    """
    a = _as_array(affinity)
    lo = None if low is None else _as_array(low)
    hi = None if high is None else _as_array(high)
    n = len(tasks)
    x = list(range(len(points)))
    fig = _figure(max(5.0, 1.2 * len(points)), 4.0)
    ax = fig.add_subplot()
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    # Bands for every pair turn into fog beyond a few pairs; then only the lines are drawn.
    bands = lo is not None and hi is not None and len(pairs) <= 4
    for i, j in pairs:
        line = ax.plot(x, a[:, i, j], marker="o", markersize=4, linewidth=1, alpha=0.8,
                       label=f"{tasks[i]} / {tasks[j]}")[0]
        if bands:
            ax.fill_between(x, lo[:, i, j], hi[:, i, j], color=line.get_color(), alpha=0.15)
    if pairs:
        mean = np.mean([a[:, i, j] for i, j in pairs], axis=0)
        ax.plot(x, mean, color="black", linewidth=2.5, label="mean over pairs")
    ax.set_xticks(x, labels=list(points))
    ax.set_xlabel("branch point (shallow → deep)")
    ax.set_ylabel("task affinity (Spearman)")
    ax.set_ylim(min(-0.05, float(np.nanmin(a)) - 0.05), 1.05)
    ax.set_title("Task affinity against depth" + (" (shaded: bootstrap interval)" if bands else ""))
    ax.grid(alpha=0.3)
    if pairs:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(pairs) // 24)
    return fig

