"""The cost model: fvcore params and FLOPs of stem, blocks and heads, and tree sizes."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from branchnas.backbones import build_backbone
from branchnas.cost import ALL_HEADS, BlockCosts, block_costs, count_flops, count_params
from branchnas.errors import UserError
from branchnas.heads import build_head
from branchnas.recipe import BackboneConfig
from branchnas.tasks import Task


class NetWithReuse(nn.Module):
    """fvcore's weight-sharing fixture: one conv applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.other = nn.Conv2d(3, 4, 1, bias=False)

    def forward(self, x):
        return self.other(self.conv(self.conv(x)))


class SharedAcrossSubmodules(nn.Module):
    """Two submodules holding the same Linear (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(8, 8)
        self.a = nn.Sequential(shared, nn.ReLU())
        self.b = nn.Sequential(shared)

    def forward(self, x):
        return self.b(self.a(x))


def test_reused_module_params_count_once_and_flops_count_per_use():
    net = NetWithReuse()
    assert count_params(net) == 3 * 3 + 3 * 4
    # A 1x1 conv costs in*out multiply-adds per pixel; the shared conv runs twice.
    assert count_flops(net, torch.zeros(1, 3, 5, 5)) == 25 * (2 * 9 + 12)


def test_tied_weights_across_submodules_count_once():
    net = SharedAcrossSubmodules()
    assert count_params(net) == 8 * 8 + 8
    assert count_flops(net, torch.zeros(2, 8)) == 2 * 2 * 64


def test_one_multiply_add_is_one_flop():
    # The example of fvcore's FlopCountAnalysis docstring.
    conv, fc = nn.Conv2d(3, 10, 1), nn.Linear(1000, 10)
    assert count_flops(conv, torch.zeros(1, 3, 10, 10)) == 3000
    assert count_flops(fc, torch.zeros(1, 1000)) == 10000


def test_count_flops_restores_training_mode_and_leaves_bn_statistics_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    net.train()
    net[2].eval()  # a submodule with its own flag must keep it
    before = net[1].running_mean.clone()
    flops = count_flops(net, torch.randn(1, 3, 6, 6))
    assert net.training and net[1].training and not net[2].training
    assert torch.equal(net[1].running_mean, before) and int(net[1].num_batches_tracked) == 0
    # Eval-mode batch norm with affine parameters: 2 flops per element (fvcore).
    assert flops == 4 * 16 * 27 + 2 * 4 * 16


def test_skipped_operators_are_logged_not_warned(caplog):
    with caplog.at_level(logging.DEBUG, logger="branchnas.cost"):
        count_flops(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.MaxPool2d(2)), torch.zeros(1, 3, 4, 4))
    assert any("max_pool2d" in r.getMessage() for r in caplog.records if r.name == "branchnas.cost")
    assert not [r for r in caplog.records if r.name.startswith("fvcore") and r.levelno >= logging.WARNING]


def _tasks():
    return [
        Task("seg", "segmentation", "seg", num_classes=4),
        Task("attr", "attribute", "attr"),
    ]


@pytest.mark.parametrize(
    "name,granularity,size,channels",
    [
        ("resnet20", "block", (32, 32), 3),
        ("resnet18", "stage", (32, 32), 3),
        ("mobilenet_v2", "stage", (32, 32), 3),
        ("lenet5", "stage", (16, 32), 1),
    ],
)
def test_parts_sum_to_fvcores_count_of_the_whole_single_task_model(name, granularity, size, channels):
    backbone = build_backbone(BackboneConfig(name=name, granularity=granularity), channels, size)
    heads = {t.name: build_head(t, backbone.out_channels, backbone.reduction, size) for t in _tasks()}
    costs = block_costs(backbone, heads, size)
    assert costs.num_blocks == backbone.num_blocks
    for task, head in heads.items():
        whole = nn.Sequential(backbone.stem, *backbone.blocks, head)
        assert costs.single_task(task, "params") == count_params(whole)
        assert costs.single_task(task, "flops") == count_flops(whole, torch.zeros(1, channels, *size))
        # Sanity on the measured parts themselves, not just their sum.
        assert costs.head_params[task] == sum(p.numel() for p in head.parameters())
    assert costs.block_params == tuple(sum(p.numel() for p in b.parameters()) for b in backbone.blocks)


def test_block_flops_are_measured_at_each_blocks_real_input():
    backbone = build_backbone(BackboneConfig(name="lenet5"), 1, (28, 28))
    costs = block_costs(backbone, {}, (28, 28))
    # conv1: 28x28 outputs x 10 channels x 25 taps; conv2 sees 14x14: 14x14 x 20 x (10 x 25).
    assert costs.block_flops == (28 * 28 * 10 * 25, 14 * 14 * 20 * 250)
    assert (costs.stem_params, costs.stem_flops) == (0, 0)
    doubled = block_costs(backbone, {}, (56, 28))
    assert doubled.block_flops == tuple(2 * f for f in costs.block_flops)


def test_block_costs_leave_the_backbone_in_training_mode():
    backbone = build_backbone(BackboneConfig(name="resnet20"), 3, (32, 32))
    before = backbone.stem.bn1.running_mean.clone()
    block_costs(backbone, {}, (32, 32))
    assert backbone.training and backbone.blocks[0].training
    assert torch.equal(backbone.stem.bn1.running_mean, before)


def test_in_channels_argument_overrides_the_backbones():
    backbone = build_backbone(BackboneConfig(name="lenet5"), 1, (28, 28))
    with pytest.raises(RuntimeError):
        block_costs(backbone, {}, (28, 28), in_channels=3)


COSTS = BlockCosts(
    stem_params=100, stem_flops=1000,
    block_params=(10, 20, 30), block_flops=(1, 2, 3),
    head_params={"a": 5, "b": 7}, head_flops={"a": 50, "b": 70},
)


def test_size_is_stem_plus_groups_times_blocks_plus_heads():
    assert COSTS.size([1, 1, 1]) == 100 + 60 + 12
    assert COSTS.size([1, 2, 2], "params") == 100 + 10 + 40 + 60 + 12
    assert COSTS.size((2, 2, 2), "flops") == 1000 + 2 * 6 + 120
    assert COSTS.single_task("b", "flops") == 1000 + 6 + 70


def test_size_refuses_bad_arguments():
    with pytest.raises(ValueError, match="expected 3 partition counts"):
        COSTS.size([1, 2])
    with pytest.raises(ValueError, match="at least one group"):
        COSTS.size([1, 0, 2])
    with pytest.raises(UserError, match="unknown cost metric 'flop'.*did you mean 'flops'"):
        COSTS.size([1, 1, 1], "flop")
    with pytest.raises(UserError, match="unknown task 'c'"):
        COSTS.single_task("c")


def test_block_costs_round_trip_through_a_dict():
    assert BlockCosts.from_dict(COSTS.to_dict()) == COSTS


def test_inconsistent_costs_are_refused():
    with pytest.raises(ValueError, match="2 block params but 3 block flops"):
        BlockCosts(0, 0, (1, 2), (1, 2, 3), {}, {})


def test_coerce_reads_block_costs_objects_mappings_and_plain_arrays():
    costs = SimpleNamespace(stem_params=7, stem_flops=70, block_params=[10, 20], block_flops=[100, 200],
                            head_params={"a": 1, "b": 2, "c": 99}, head_flops={"a": 5, "b": 5, "c": 5})
    model = BlockCosts.coerce(costs, num_points=2, tasks=["a", "b"])
    assert model.size([1, 2], "params") == 7 + 10 + 40 + 3
    assert model.size([2, 2], "flops") == 70 + 600 + 10
    assert BlockCosts.coerce(vars(costs)).size([1, 1], "params") == 7 + 30 + 102
    plain = BlockCosts.coerce([5, 6])
    assert plain.size([2, 1], "params") == 16 and plain.size([2, 1], "flops") == 16
    with pytest.raises(UserError, match="no entry for task 'z'"):
        BlockCosts.coerce(costs, tasks=["a", "z"])
    with pytest.raises(UserError, match="one cost per branch point \\(3\\)"):
        BlockCosts.coerce(costs, num_points=3)
    with pytest.raises(UserError, match="non-negative"):
        BlockCosts.coerce([5, -1])


def test_coerce_restricts_heads_to_tasks_and_sizes_agree_with_size():
    assert BlockCosts.coerce(COSTS) == COSTS
    model = BlockCosts.coerce(COSTS, num_points=3, tasks=["b"])
    assert model.head_params == {"b": 7} and model.head_flops == {"b": 70}
    counts = np.array([[1, 1, 1], [1, 2, 3], [3, 3, 3]])
    params, flops = model.sizes(counts)
    assert params.dtype == np.float64 and flops.dtype == np.float64
    assert params.tolist() == [model.size(row, "params") for row in counts] == [167, 247, 287]
    assert flops.tolist() == [model.size(row, "flops") for row in counts] == [1076, 1084, 1088]
    # Heads given as a total (or over different tasks for params and flops) are kept as totals.
    totals = BlockCosts.coerce({"block_params": [1, 2], "head_params": 5, "head_flops": {"a": 1, "b": 2}})
    assert totals.head_params == {ALL_HEADS: 5} and totals.head_flops == {ALL_HEADS: 3}
    assert totals.size([1, 1], "params") == 8 and totals.size([2, 1], "flops") == 7
    assert BlockCosts.coerce(totals, tasks=["a", "b"]) == totals  # coercing again changes nothing
    with pytest.raises(UserError, match="block_params has 2 entries but block_flops has 3"):
        BlockCosts.coerce({"block_params": [1, 2], "block_flops": [1, 2, 3]})
    with pytest.raises(UserError, match="expected a 'block_params' field"):
        BlockCosts.coerce({"block_flops": [1, 2]})
