"""compare: random trees of similar size; the end-to-end comparison is in test_finetune.py."""

from __future__ import annotations

import random

import pytest
import torch

from branchnas import compare
from branchnas.cost import BlockCosts, block_costs, count_params
from branchnas.models import BranchedNet
from branchnas.search import count_trees, enumerate_trees
from branchnas.tree import Tree

NAMES = ["a", "b", "c", "d"]
COSTS = BlockCosts(
    stem_params=500, stem_flops=5000, block_params=(1000, 4000, 16000), block_flops=(9000, 9000, 9000),
    head_params={t: 100 for t in NAMES}, head_flops={t: 10 for t in NAMES},
)


def size(tree, metric="params"):
    return COSTS.size(list(tree.groups_per_point()), metric)


@pytest.mark.parametrize("limit", [compare.ENUMERATION_LIMIT, 5])
def test_random_trees_are_within_ten_percent_distinct_and_seeded(limit, monkeypatch):
    assert count_trees(4, 3) <= compare.ENUMERATION_LIMIT
    monkeypatch.setattr(compare, "ENUMERATION_LIMIT", limit)  # 5 forces the sampling path
    chosen = Tree([[NAMES], [["a", "b"], ["c", "d"]], [["a", "b"], ["c"], ["d"]]], tasks=NAMES)
    target = size(chosen)
    trees = compare.random_trees_of_similar_size(NAMES, COSTS, target, 6, seed=3, exclude=[chosen])
    assert len(trees) == 6 and len(set(trees)) == 6
    assert chosen not in trees
    for tree in trees:
        assert abs(size(tree) - target) <= 0.1 * target, tree
    again = compare.random_trees_of_similar_size(NAMES, COSTS, target, 6, seed=3, exclude=[chosen])
    other = compare.random_trees_of_similar_size(NAMES, COSTS, target, 6, seed=4, exclude=[chosen])
    assert trees == again and trees != other


def test_random_trees_cover_the_band_uniformly():
    chosen = Tree([[NAMES], [["a", "b"], ["c", "d"]], [["a", "b"], ["c"], ["d"]]], tasks=NAMES)
    target = size(chosen)
    band = [c for c in enumerate_trees(4, 3) if abs(COSTS.size([len(p) for p in c]) - target) <= 0.1 * target]
    seen = set()
    for seed in range(100):
        seen.update(compare.random_trees_of_similar_size(NAMES, COSTS, target, 10, seed=seed))
    assert len(seen) == len(band)


def test_a_band_with_too_few_trees_returns_what_there_is():
    late_split = Tree([[NAMES], [NAMES], [["a", "b"], ["c", "d"]]], tasks=NAMES)
    trees = compare.random_trees_of_similar_size(NAMES, COSTS, size(late_split), 10, seed=0)
    # Within ±10% only the 7 ways of splitting 4 tasks in two at the last block fit.
    assert len(trees) == 7 and len(set(trees)) == 7
    assert all(t.groups_per_point() == (1, 1, 2) for t in trees)


def test_random_chain_is_a_valid_tree():
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        chain = compare.random_chain(4, 3, rng)
        seen.add(Tree(chain, tasks=NAMES))  # Tree checks coverage and refinement
    assert len(seen) > 60  # far from a handful of fixed shapes (of the 154 trees)


def test_built_random_trees_have_the_measured_size_of_the_band():
    from branchnas.backbones import build_backbone
    from branchnas.heads import build_head
    from branchnas.recipe import BackboneConfig
    from branchnas.tasks import Task

    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="resnet20", width=0.25), 3, (16, 16))
    tasks = [Task(t, "classification", t, num_classes=3) for t in NAMES]
    heads = {t.name: build_head(t, backbone.out_channels, backbone.reduction, (16, 16)) for t in tasks}
    costs = block_costs(backbone, heads, (16, 16))
    chosen = Tree([[NAMES], [["a", "b"], ["c", "d"]], [["a", "b"], ["c"], ["d"]]], tasks=NAMES)
    target = costs.size(list(chosen.groups_per_point()))
    for tree in compare.random_trees_of_similar_size(NAMES, costs, target, 3, seed=0, exclude=[chosen]):
        params = count_params(BranchedNet(tree, backbone, heads))
        assert abs(params - target) <= 0.1 * target
