"""How a gated network's sharing looks: a heatmap (PNG) and a table of gate openness.

*Openness* is, per node of the tree and task, the share of the node's channels that the task
computes with its own copy (its gates are open) rather than taking from the shared copy.
0 means the task uses the node exactly as the plain tree shares it; 1 means it has a private
copy of the whole node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["gate_table", "plot_gates"]


def _grid(openness: Mapping[str, Mapping[str, float]], tasks: Sequence[str],
          labels: Mapping[str, str] | None) -> tuple[list[str], list[list[float | None]]]:
    nodes = list(openness)
    names = [(labels or {}).get(n, n) for n in nodes]
    return names, [[openness[n].get(t) for t in tasks] for n in nodes]


def gate_table(openness: Mapping[str, Mapping[str, float]], tasks: Sequence[str],
               labels: Mapping[str, str] | None = None) -> str:
    """Openness per node (rows) and task (columns) in %, ``·`` where a task is not in the node."""
    from tabulate import tabulate

    if not openness:
        return "no node is shared by two or more tasks, so there are no gates"
    nodes, grid = _grid(openness, tasks, labels)
    rows = [[node, *("·" if v is None else f"{100 * v:.0f}" for v in values)] for node, values in zip(nodes, grid, strict=True)]
    return tabulate(rows, headers=["task-specific channels (%)", *tasks], tablefmt="simple",
                    disable_numparse=True, colalign=("left", *("right",) * len(tasks)))


def plot_gates(openness: Mapping[str, Mapping[str, float]], tasks: Sequence[str], path: str | Path,
               labels: Mapping[str, str] | None = None) -> None:
    """The openness as a heatmap (nodes × tasks), saved as a PNG; blank where a task is not in a node."""
    import numpy as np
    from matplotlib.figure import Figure

    from branchnas.rundir import atomic_savefig

    nodes, grid = _grid(openness, tasks, labels)
    values = np.array([[np.nan if v is None else 100 * v for v in row] for row in grid], dtype=float).reshape(
        len(nodes), len(tasks))
    fig = Figure(figsize=(2.2 + 0.9 * len(tasks), 1.4 + 0.45 * max(len(nodes), 1)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), labels=list(tasks), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(nodes)), labels=nodes, fontsize=8)
    for i in range(len(nodes)):
        for j in range(len(tasks)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] < 60 else "black")
    ax.set_title("task-specific channels per shared node (%)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    atomic_savefig(fig, path)
