"""Task affinity finds the factor structure of the ``shapes`` data on a small real run.

Stage 1 trains one single-task model for each of the seven default tasks, stage 2 measures
their RSA affinity. At the deepest branch point, task pairs whose targets share more
generative factors (:data:`branchnas.data.shapes.FACTORS`) must come out more related on
average. Leaving out the pairs of ``normals``, whose model barely learns in this run, the
mean affinity of the pairs that share no factor, one and three must rise in that order,
three clearly above none; over all 21 pairs, the pairs that share a factor must beat those
that share none. Each difference must hold under a paired bootstrap of the images too.
Pairs and their levels are derived from ``FACTORS``, not written out here.

Not asserted, because it fails on some seeds: that every factor-sharing pair beats every
pair that shares none (``shape``/``count`` share no factor yet often look alike), and the
ordering with the pairs of ``normals``. docs/affinity-on-shapes.md has the measurements on
10 seeds and the untrained control, which fails this test.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from branchnas import affinity
from branchnas.affinity import resampled_affinity
from branchnas.data import get_family
from branchnas.data.shapes import FACTORS
from branchnas.pipeline import run_stages
from branchnas.pretrain import metrics_table
from branchnas.recipe import load_recipe
from branchnas.stages import get_stage
from branchnas.stages.affinity import read_affinity
from branchnas.stages.pretrain import read_metrics

TASKS = {t.name: t.kind for t in get_family("shapes").default_tasks()}

#: Tasks whose pairs are left out of the ordering checks: after 4 epochs the normals model's
#: test mean angle is only 0.07 to 2.0 degrees better than chance on seeds 0 to 9, so its
#: representation stays close to its initial weights and its affinities swing from seed to
#: seed (0.13 to 0.77 at layer3). Its pairs still count in the check over all pairs.
NOT_LEARNED = ("normals",)

#: The configuration measured for the earlier 3-task version of this test (smaller ones
#: failed there on some seeds), with the seven default tasks: about 53 s of CPU.
OVERRIDES = [
    "tasks=[" + ", ".join(f'{{name="{n}", kind="{k}"}}' for n, k in TASKS.items()) + "]",
    "seed=0",
    "data.options={size = 32}",
    "data.num_train=1000", "data.num_val=200", "data.num_test=100", "data.batch_size=64",
    "backbone.name=resnet20", "backbone.width=0.5", "backbone.granularity=stage",
    "pretrain.epochs=4", "pretrain.device=cpu",
    "affinity.images=100", "affinity.batch_size=100", "affinity.bootstrap=200",
]

#: Least rise of the mean affinity from one level of shared factors to the next (seeds 0 to 9:
#: at least 0.082), and least lead of the factor-sharing pairs over the pairs sharing none,
#: all 21 pairs (at least 0.083).
STEP = 0.04
#: Least lead of the pairs sharing the most factors over the pairs sharing none (seeds 0 to 9:
#: at least 0.30; the same models with their initial weights give -0.07 to +0.18).
GAP = 0.20
#: Paired bootstrap resamples of the K images: every difference above must also have its
#: 2.5% percentile above 0 (seeds 0 to 9: at least 0.025).
RESAMPLES = 200


def factors_of(target: str) -> frozenset[str]:
    return frozenset(factor for factor, targets in FACTORS.items() if target in targets)


@pytest.mark.slow
def test_tasks_sharing_more_factors_have_higher_affinity_at_the_deepest_point(
    tmp_path, record_property, one_thread
):
    recipe = load_recipe(None, [f"out={json.dumps(str(tmp_path))}", "name=structure", *OVERRIDES])
    rundir, _ = run_stages(recipe, ["affinity"], progress=False)  # runs stage 1 first

    result = read_affinity(rundir)
    a, low, high = result["affinity"], result["low"], result["high"]
    names, points = result["tasks"], result["points"]
    assert names == list(TASKS)
    factors = [factors_of(recipe.task(name).target or name) for name in names]
    for name, found in zip(names, factors, strict=True):
        assert found, f"task '{name}' reads a target in no factor of FACTORS: {FACTORS}"

    pairs = list(itertools.combinations(range(len(names)), 2))
    shared = {p: len(factors[p[0]] & factors[p[1]]) for p in pairs}
    learned = [p for p in pairs if not {names[p[0]], names[p[1]]} & set(NOT_LEARNED)]
    levels = sorted({shared[p] for p in learned})
    assert len(levels) >= 3 and levels[0] == 0, f"the tasks must give pairs of at least 3 levels: {levels}"

    mean_by_depth = [float(np.mean([a[d, i, j] for i, j in pairs])) for d in range(len(points))]
    decreasing = all(x > y for x, y in itertools.pairwise(mean_by_depth))
    trend = (
        "mean affinity between different tasks by depth: "
        + ", ".join(f"{p} {m:.3f}" for p, m in zip(points, mean_by_depth, strict=True))
        + (" (decreases with depth)" if decreasing else " (does not decrease at every step)")
    )
    record_property("mean_affinity_by_depth", json.dumps(dict(zip(points, mean_by_depth, strict=True))))

    def mean(deepest: np.ndarray, among: list[tuple[int, int]], wanted: set[int]) -> float:
        return float(np.mean([deepest[p] for p in among if shared[p] in wanted]))

    top = f"{levels[-1]} vs 0 shared factors"
    sharing = set(shared.values()) - {0}

    def contrasts(deepest: np.ndarray) -> dict[str, float]:
        """The asserted differences between mean affinities at the deepest point."""
        out = {f"{hi} vs {lo} shared factors": mean(deepest, learned, {hi}) - mean(deepest, learned, {lo})
               for lo, hi in itertools.pairwise(levels)}
        out[top] = mean(deepest, learned, {levels[-1]}) - mean(deepest, learned, {0})
        out["any vs no shared factor, all pairs"] = mean(deepest, pairs, sharing) - mean(deepest, pairs, {0})
        return out

    d = len(points) - 1  # the deepest branch point
    found = contrasts(a[d])
    # Paired bootstrap: the same resampled K images for every task, so that the pairs move
    # together (per-pair intervals would overstate the uncertainty of a difference).
    folder = get_stage("affinity").folder(rundir) / "rdms"
    rdms = torch.stack([torch.load(folder / f"{n}.pt", weights_only=True)[d:d + 1] for n in names])
    generator = torch.Generator().manual_seed(0)
    k = rdms.shape[-1]
    resampled = [contrasts(resampled_affinity(rdms, torch.randint(k, (k,), generator=generator)).numpy()[0])
                 for _ in range(RESAMPLES)]
    bounds = {key: float(np.quantile([r[key] for r in resampled], 0.025)) for key in found}
    record_property("deepest_contrasts", json.dumps({key: round(v, 4) for key, v in found.items()}))

    report = (
        f"\nmean affinity at {points[d]} by number of shared factors (without {', '.join(NOT_LEARNED)}): "
        + ", ".join(f"{n}: {mean(a[d], learned, {n}):.3f}" for n in levels) + "\n"
        + "\n".join(f"{key}: {v:+.3f} (bootstrap 2.5% {bounds[key]:+.3f})" for key, v in found.items())
        + f"\n{trend}\n\n"
        f"{affinity.format_affinity(a, names, points, low, high)}\n\n"
        f"{metrics_table(read_metrics(rundir))}"
    )
    print(report)
    for key, value in found.items():
        need = GAP if key == top else STEP
        assert value >= need, f"affinity misses the factor structure at {points[d]}: {key} {value:.3f} < {need}:{report}"
        assert bounds[key] > 0, f"{key}: the bootstrap interval reaches 0:{report}"
