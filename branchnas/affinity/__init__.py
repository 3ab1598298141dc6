"""RSA task affinity at every branch point (Sec. 3.1 and Algorithm 1 of the paper).

For each task's single-task model and each branch point d, the features of K held-out
images give a representation dissimilarity matrix (RDM)::

    RDM_t[d][a, b] = 1 - Pearson(features_a, features_b)                 (K x K)

and two tasks are as related at d as their RDMs are alike::

    A[d, i, j] = Spearman(triu(RDM_i[d]), triu(RDM_j[d]))               (D x N x N)

over the strict upper triangles, with average ranks for ties (what ``scipy.stats.spearmanr``
and ``rsatoolbox.rdm.compare(method='spearman')`` compute).

One module per concern:

* :mod:`~branchnas.affinity.functional`: the formulas as plain tensor functions
  (:func:`rdm`, :func:`rsa_affinity`, :func:`resampled_affinity`, :func:`bootstrap_affinity`);
* :mod:`~branchnas.affinity.accumulate`: :class:`CorrelationAccumulator`, which streams the
  K x K correlation over slices of the features in float64;
* :mod:`~branchnas.affinity.extract`: :func:`extract_rdms` reads the features of real
  backbones within a memory budget (its notes say why it makes several passes);
* :mod:`~branchnas.affinity.present`: :func:`format_affinity` (terminal table),
  :func:`plot_heatmap` and :func:`plot_depth`;

The stage that runs this on the pretrained models is :mod:`branchnas.stages.affinity`.
Everything is re-exported here, so ``from branchnas.affinity import rdm`` keeps working.
"""

from __future__ import annotations

from branchnas.affinity.accumulate import CorrelationAccumulator
from branchnas.affinity.extract import (
    DEFAULT_MAX_MEMORY,
    ImageSource,
    _feature_sizes,
    _run_pass,
    extract_rdms,
    plan_passes,
)
from branchnas.affinity.functional import bootstrap_affinity, rdm, resampled_affinity, rsa_affinity
from branchnas.affinity.present import ANNOTATE_MAX_TASKS, format_affinity, plot_depth, plot_heatmap

__all__ = [
    "ANNOTATE_MAX_TASKS",
    "DEFAULT_MAX_MEMORY",
    "CorrelationAccumulator",
    "ImageSource",
    "rdm",
    "rsa_affinity",
    "resampled_affinity",
    "bootstrap_affinity",
    "extract_rdms",
    "plan_passes",
    "format_affinity",
    "plot_heatmap",
    "plot_depth",
    # private, for bench/affinity.py (it times the passes and sizes the features itself)
    "_feature_sizes",
    "_run_pass",
]
