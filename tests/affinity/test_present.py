"""Tests for branchnas.affinity.present: the terminal table and the plots."""

from __future__ import annotations

import torch

from branchnas import affinity as aff


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# The same random RDMs as test_functional.py's (test modules cannot import each other).
def _random_rdms(n: int, d: int, k: int, seed: int, decimals: int | None = None) -> torch.Tensor:
    rdms = torch.rand(n, d, k, k, generator=_gen(seed), dtype=torch.float64) * 2
    if decimals is not None:
        rdms = rdms.round(decimals=decimals)  # many ties
    return rdms  # neither symmetric nor zero on the diagonal: only the strict upper part counts


# --------------------------------------------------------------------------- reporting


def test_format_affinity_shows_every_point_task_and_interval():
    a = torch.tensor([[[1.0, 0.25], [0.25, 1.0]], [[1.0, -0.5], [-0.5, 1.0]]])
    text = aff.format_affinity(a, ["seg", "depth"], ["layer1", "layer2"], a - 0.1, a + 0.1)
    assert "layer1" in text and "layer2" in text and "depth" in text
    assert "0.25 [0.15, 0.35]" in text and "-0.50 [-0.60, -0.40]" in text


def test_plots_have_labels_and_save_as_png(tmp_path):
    from branchnas.rundir import atomic_savefig

    a = aff.rsa_affinity(_random_rdms(3, 2, 6, seed=13))
    fig = aff.plot_heatmap(a[0], ["a", "b", "c"], "layer1")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert ax.get_xlabel() and ax.get_ylabel() and len(fig.axes) == 2  # plot and colour bar
    assert len(ax.texts) == 9
    atomic_savefig(fig, tmp_path / "h.png")
    fig = aff.plot_depth(a, ["a", "b", "c"], ["layer1", "layer2"])
    assert len(fig.axes[0].lines) == 4  # three pairs and their mean
    atomic_savefig(fig, tmp_path / "d.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG" == (tmp_path / "d.png").read_bytes()[:4]
