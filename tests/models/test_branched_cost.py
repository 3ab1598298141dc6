"""fvcore's params and FLOPs of a built BranchedNet equal the cost model's size of its tree."""

from __future__ import annotations

import pytest
import torch

from branchnas.backbones import build_backbone
from branchnas.cost import block_costs, count_flops, count_params
from branchnas.heads import build_head
from branchnas.models import BranchedNet
from branchnas.recipe import BackboneConfig
from branchnas.tasks import Task

TASKS = [
    Task("digit", "classification", "digit", num_classes=10),
    Task("odd", "attribute", "odd"),
    Task("seg", "segmentation", "seg", num_classes=3),
    Task("depth", "depth", "depth"),
]
NAMES = [t.name for t in TASKS]
BACKBONES = [
    ("resnet20", BackboneConfig(name="resnet20", width=0.25), 3, (16, 16)),
    ("resnet20-blocks", BackboneConfig(name="resnet20", width=0.25, granularity="block"), 3, (16, 16)),
    ("lenet5", BackboneConfig(name="lenet5", width=0.5), 1, (16, 16)),
    ("mobilenet_v2", BackboneConfig(name="mobilenet_v2", width=0.25), 3, (32, 32)),
]


def trees(depth):
    """Both extremes and two mixed chains, stretched over ``depth`` branch points."""
    shared, separate = [tuple(NAMES)], [(t,) for t in NAMES]
    pairs = [("digit", "odd"), ("seg", "depth")]
    split = [("digit", "odd"), ("seg",), ("depth",)]
    half = depth // 2
    return {
        "all-shared": [shared] * depth,
        "all-separate": [separate] * depth,
        "late-split": [shared] * (depth - 1) + [pairs],
        "mixed": [shared] * half + [pairs] * max(1, (depth - half) // 2) + [split] * (depth - half - max(1, (depth - half) // 2)),
    }


@pytest.mark.parametrize("name, cfg, channels, size", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_fvcore_size_of_the_built_model_equals_the_cost_model(name, cfg, channels, size):
    torch.manual_seed(0)
    backbone = build_backbone(cfg, channels, size)
    heads = {t.name: build_head(t, backbone.out_channels, backbone.reduction, size) for t in TASKS}
    costs = block_costs(backbone, heads, size)
    x = torch.zeros(1, channels, *size)
    for label, tree in trees(backbone.num_blocks).items():
        net = BranchedNet(tree, backbone, heads, tasks=NAMES)
        counts = [len(p) for p in net.chain]
        assert count_params(net) == costs.size(counts, "params"), label
        assert count_flops(net, x) == costs.size(counts, "flops"), label
        assert sum(p.numel() for p in net.parameters()) == costs.size(counts, "params"), label
