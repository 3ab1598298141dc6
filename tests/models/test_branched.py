"""BranchedNet: the plan, task subsets, scripting, and initialisation from single-task models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from branchnas.backbones import build_backbone
from branchnas.errors import UserError
from branchnas.models import BranchedNet, tree_chain
from branchnas.recipe import BackboneConfig

# torch marks TorchScript as deprecated; it is still the format plain PyTorch loads.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")

TASKS = ["a", "b", "c"]
TREES = {
    "shared": [[("a", "b", "c")]] * 3,
    "separate": [[("a",), ("b",), ("c",)]] * 3,
    "mixed": [[("a", "b", "c")], [("a", "c"), ("b",)], [("a",), ("b",), ("c",)]],
}
BACKBONES = {
    "resnet20": (BackboneConfig(name="resnet20", width=0.25), 3, (16, 16)),
    "lenet5": (BackboneConfig(name="lenet5", width=0.5), 1, (16, 16)),
    "mobilenet_v2": (BackboneConfig(name="mobilenet_v2", width=0.25), 3, (32, 32)),
}


def make_backbone(name="resnet20", seed=0):
    cfg, channels, size = BACKBONES[name]
    torch.manual_seed(seed)
    return build_backbone(cfg, channels, size)


def make_heads(channels, seed=0):
    torch.manual_seed(seed)
    return {t: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2 + i))
            for i, t in enumerate(TASKS)}


def fit_tree(tree, depth):
    """Stretch a 3-partition tree over ``depth`` blocks (repeat the last partitions)."""
    return [tree[min(d * len(tree) // depth, len(tree) - 1)] for d in range(depth)] if depth != len(tree) else tree


def images(name="resnet20", batch=2, seed=1):
    _, channels, size = BACKBONES[name]
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed))


def build(tree_name="mixed", backbone="resnet20"):
    bb = make_backbone(backbone)
    tree = fit_tree(TREES[tree_name], bb.num_blocks)
    return BranchedNet(tree, bb, make_heads(bb.out_channels), tasks=TASKS).eval()


def count_calls(net):
    counts = {name: 0 for name in net.nodes}

    def hook(name):
        def pre(module, args):
            counts[name] += 1
        return pre

    handles = [node.register_forward_pre_hook(hook(name)) for name, node in net.nodes.items()]
    return counts, handles


# --------------------------------------------------------------------------- the tree


def test_tree_chain_is_canonical_and_accepts_indices():
    names, chain = tree_chain([[(2, 0, 1)], [(1,), (2, 0)]], ["a", "b", "c"])
    assert names == ["a", "b", "c"]
    assert chain == [[("a", "b", "c")], [("a", "c"), ("b",)]]


def test_tree_chain_reads_a_tree_by_task_name_in_any_order():
    from branchnas.tree import Tree

    tree = Tree([[[0, 1, 2]], [[0, 2], [1]]], tasks=["a", "b", "c"])
    assert tree_chain(tree) == (["a", "b", "c"], [[("a", "b", "c")], [("a", "c"), ("b",)]])
    assert tree_chain(tree, ["c", "b", "a"]) == (["c", "b", "a"], [[("c", "b", "a")], [("c", "a"), ("b",)]])


@pytest.mark.parametrize("tree, words", [
    ([[("a", "b")], [("a", "c"), ("b",)]], "exactly once"),
    ([[("a",), ("b", "c")], [("a", "b"), ("c",)]], "does not refine"),
    ([[("a", "b", "z")]], "unknown task 'z'"),
])
def test_tree_chain_rejects_bad_trees(tree, words):
    with pytest.raises(UserError, match=words):
        tree_chain(tree, ["a", "b", "c"])


def test_tree_depth_must_match_the_backbone():
    bb = make_backbone()
    with pytest.raises(UserError, match="expected 3 partitions"):
        BranchedNet([[("a", "b", "c")]] * 2, bb, make_heads(bb.out_channels), tasks=TASKS)


def test_task_names_with_a_dot_are_refused():
    bb = make_backbone()
    heads = make_heads(bb.out_channels)
    heads["a.b"] = heads.pop("a")
    with pytest.raises(UserError, match="'.'"):
        BranchedNet([[("a.b", "b", "c")]] * 3, bb, heads, tasks=["a.b", "b", "c"])


# --------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("tree_name, nodes", [("shared", 3), ("separate", 9), ("mixed", 6)])
def test_one_node_per_group_and_each_runs_once(tree_name, nodes):
    net = build(tree_name)
    assert net.num_nodes == nodes == len(net.nodes)
    counts, handles = count_calls(net)
    out = net(images())
    assert list(out) == TASKS
    assert all(count == 1 for count in counts.values()), counts
    for h in handles:
        h.remove()


def test_mixed_plan_wires_parents_by_refinement():
    net = build("mixed")
    assert net.plan == [
        ("b0_0_1_2", "stem"),
        ("b1_0_2", "b0_0_1_2"), ("b1_1", "b0_0_1_2"),
        ("b2_0", "b1_0_2"), ("b2_1", "b1_1"), ("b2_2", "b1_0_2"),
    ]
    assert net.leaf == {"a": "b2_0", "b": "b2_1", "c": "b2_2"}


def test_nodes_are_independent_copies():
    bb = make_backbone()
    net = BranchedNet(TREES["separate"], bb, make_heads(bb.out_channels), tasks=TASKS)
    with torch.no_grad():
        next(net.nodes["b0_0"].parameters()).add_(1.0)
    assert not torch.equal(next(net.nodes["b0_0"].parameters()), next(net.nodes["b0_1"].parameters()))
    assert not torch.equal(next(net.nodes["b0_0"].parameters()), next(bb.blocks[0].parameters()))


def test_task_subset_returns_only_those_tasks_and_skips_unneeded_nodes():
    net = build("mixed")
    x = images()
    full = net(x)
    counts, handles = count_calls(net)
    part = net(x, ["b"])
    assert list(part) == ["b"]
    assert torch.equal(part["b"], full["b"])
    assert counts == {"b0_0_1_2": 1, "b1_0_2": 0, "b1_1": 1, "b2_0": 0, "b2_1": 1, "b2_2": 0}
    for h in handles:
        h.remove()
    pair = net(x, ["c", "a"])
    assert sorted(pair) == ["a", "c"] and all(torch.equal(pair[t], full[t]) for t in pair)


def test_unknown_task_in_subset_fails():
    with pytest.raises(ValueError, match="unknown task 'z'"):
        build()(images(), ["z"])


@pytest.mark.parametrize("tree_name", ["shared", "separate"])
def test_shared_parameters(tree_name):
    net = build(tree_name)
    shared = {id(p) for p in net.shared_parameters()}
    stem = {id(p) for p in net.stem.parameters()}
    nodes = {id(p) for p in net.nodes.parameters()}
    assert stem <= shared
    assert (nodes <= shared) == (tree_name == "shared")
    assert not (nodes & shared) or tree_name == "shared"


def test_shared_parameters_of_a_mixed_tree_are_the_multi_task_nodes():
    net = build("mixed")
    expected = {id(p) for p in itertools.chain(net.stem.parameters(), net.nodes["b0_0_1_2"].parameters(),
                                                net.nodes["b1_0_2"].parameters())}
    assert {id(p) for p in net.shared_parameters()} == expected


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("tree_name", list(TREES))
def test_scripted_equals_eager(backbone, tree_name):
    net = build(tree_name, backbone)
    scripted = torch.jit.script(net)
    x = images(backbone)
    eager, script = net(x), scripted(x)
    assert list(script) == TASKS
    for t in TASKS:
        torch.testing.assert_close(script[t], eager[t], rtol=0, atol=1e-6)
    assert list(scripted(x, ["c"])) == ["c"]


# --------------------------------------------------------------------------- initialisation


def single_task_models(backbone="resnet20"):
    backbones = {t: make_backbone(backbone, seed=10 + i) for i, t in enumerate(TASKS)}
    heads = {t: make_heads(backbones[t].out_channels, seed=20 + i)[t] for i, t in enumerate(TASKS)}
    # Distinct BatchNorm statistics, so copying or averaging them is visible.
    for i, bb in enumerate(backbones.values()):
        for m in bb.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(i))
                m.running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(i + 5))
    return backbones, heads


@pytest.mark.parametrize("backbone", ["resnet20", "lenet5"])
def test_all_separate_reproduces_each_single_task_model(backbone):
    backbones, heads = single_task_models(backbone)
    first = backbones["a"]
    net = BranchedNet.from_single_task(fit_tree(TREES["separate"], first.num_blocks), backbones, heads,
                                       init="first", tasks=TASKS).eval()
    x = images(backbone)
    out = net(x)
    for t in TASKS:
        # The stem is always shared (the cost model counts it once): it is the first task's.
        model = nn.Sequential(first.stem, *backbones[t].blocks, heads[t]).eval()
        assert torch.equal(out[t], model(x)), t
    assert torch.equal(out["a"], nn.Sequential(first, heads["a"]).eval()(x))


def test_all_separate_with_identical_stems_is_exact_for_every_task():
    backbones, heads = single_task_models()
    for t in TASKS[1:]:
        backbones[t].stem.load_state_dict(backbones["a"].stem.state_dict())
    net = BranchedNet.from_single_task(TREES["separate"], backbones, heads, tasks=TASKS).eval()
    x = images()
    out = net(x)
    for t in TASKS:
        assert torch.equal(out[t], heads[t].eval()(backbones[t].eval()(x)))


def test_all_shared_first_is_the_first_tasks_encoder():
    backbones, heads = single_task_models()
    net = BranchedNet.from_single_task(TREES["shared"], backbones, heads, init="first", tasks=TASKS).eval()
    encoder = nn.Sequential(net.stem, *net.nodes.values())
    for (k1, v1), (k2, v2) in zip(encoder.state_dict().items(), nn.Sequential(backbones["a"].stem, *backbones["a"].blocks).state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2), k1
    for t in TASKS:
        for key, value in heads[t].state_dict().items():
            assert torch.equal(net.heads[t].state_dict()[key], value)


def test_average_init_is_the_mean_of_the_group_including_bn_statistics():
    backbones, heads = single_task_models()
    net = BranchedNet.from_single_task(TREES["mixed"], backbones, heads, init="average", tasks=TASKS)
    for name, group in net.node_groups.items():
        d = int(name[1])
        for key, value in net.nodes[name].state_dict().items():
            stacked = torch.stack([backbones[t].blocks[d].state_dict()[key] for t in group])
            if value.is_floating_point():
                torch.testing.assert_close(value, stacked.float().mean(0), rtol=0, atol=1e-7)
                if len(group) > 1 and "running_var" in key:
                    assert not torch.equal(value, stacked[0])
            else:
                assert torch.equal(value, stacked[0])
    stem_mean = torch.stack([backbones[t].stem[0].weight for t in TASKS]).mean(0)
    torch.testing.assert_close(net.stem[0].weight, stem_mean, rtol=0, atol=1e-7)


def test_central_init_takes_the_most_central_task_at_each_depth():
    backbones, heads = single_task_models()
    affinity = np.full((3, 3, 3), 0.1)
    affinity[:, [0, 1, 2], [0, 1, 2]] = 1.0
    affinity[0, 2, :] = affinity[0, :, 2] = 0.9   # c is central at block 0
    affinity[0, 2, 2] = 1.0
    affinity[1, 0, 2] = affinity[1, 2, 0] = 0.5   # a and c tie at block 1: the earlier (a) wins
    net = BranchedNet.from_single_task(TREES["mixed"], backbones, heads, init="central",
                                       affinity=affinity, tasks=TASKS)
    assert torch.equal(net.nodes["b0_0_1_2"].state_dict()["0.conv1.weight"],
                       backbones["c"].blocks[0].state_dict()["0.conv1.weight"])
    assert torch.equal(net.stem[0].weight, backbones["c"].stem[0].weight)
    assert torch.equal(net.nodes["b1_0_2"].state_dict()["0.conv1.weight"],
                       backbones["a"].blocks[1].state_dict()["0.conv1.weight"])
    with pytest.raises(UserError, match="affinity"):
        BranchedNet.from_single_task(TREES["mixed"], backbones, heads, init="central", tasks=TASKS)


def test_scratch_init_is_fresh_and_seeded():
    backbones, heads = single_task_models()
    one = BranchedNet.from_single_task(TREES["mixed"], backbones, heads, init="scratch", seed=3, tasks=TASKS)
    two = BranchedNet.from_single_task(TREES["mixed"], backbones, heads, init="scratch", seed=3, tasks=TASKS)
    key = "0.conv1.weight"
    assert torch.equal(one.nodes["b1_1"].state_dict()[key], two.nodes["b1_1"].state_dict()[key])
    for t in TASKS:
        assert not torch.equal(one.nodes["b1_1"].state_dict()[key], backbones[t].blocks[1].state_dict()[key])
    assert not torch.equal(one.heads["a"][2].weight, heads["a"][2].weight)


def test_unknown_init_rule_lists_the_choices():
    backbones, heads = single_task_models()
    with pytest.raises(UserError, match="choose one of: average, central, first, outlier, scratch"):
        BranchedNet.from_single_task(TREES["mixed"], backbones, heads, init="frist", tasks=TASKS)


def test_scripted_equals_eager_with_a_head_of_every_kind():
    from branchnas.heads import build_head
    from branchnas.tasks import Task

    tasks = [
        Task("cls", "classification", "cls", num_classes=3), Task("attr", "attribute", "attr"),
        Task("seg", "segmentation", "seg", num_classes=4), Task("depth", "depth", "depth"),
        Task("normals", "normals", "normals", channels=3), Task("edges", "edges", "edges"),
        Task("reg", "regression", "reg", channels=2),
    ]
    bb = make_backbone()
    heads = {t.name: build_head(t, bb.out_channels, bb.reduction, (16, 16)) for t in tasks}
    names = [t.name for t in tasks]
    tree = [[tuple(names)], [tuple(names[:3]), tuple(names[3:])], [(n,) for n in names]]
    net = BranchedNet(tree, bb, heads, tasks=names).eval()
    x = images()
    eager, script = net(x), torch.jit.script(net)(x)
    assert list(script) == names
    for t in names:
        assert script[t].shape == eager[t].shape
        torch.testing.assert_close(script[t], eager[t], rtol=0, atol=1e-6)
    assert eager["attr"].shape == (2,) and eager["normals"].shape == (2, 3, 16, 16)


def test_forward_features_gives_each_tasks_path_and_the_same_outputs():
    net = build("mixed")
    x = images()
    outputs, features = net.forward_features(x)
    assert net.task_path("c") == ["b0_0_1_2", "b1_0_2", "b2_2"] and net.task_path("b") == ["b0_0_1_2", "b1_1", "b2_1"]
    with torch.no_grad():
        h = net.stem(x)
        for node in net.task_path("c"):  # recompute c's path by hand from the nodes
            h = net.nodes[node](h)
        torch.testing.assert_close(features["b2_2"], h, rtol=0, atol=0)
        torch.testing.assert_close(outputs["c"], net.heads["c"](h), rtol=0, atol=0)
        for task, value in net(x).items():
            torch.testing.assert_close(value, outputs[task], rtol=0, atol=0)
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(x)["a"], outputs["a"], rtol=0, atol=1e-6)


def test_outlier_init_takes_the_least_central_task_at_the_deepest_point_for_every_depth():
    backbones, heads = single_task_models()
    affinity = np.full((3, 3, 3), 0.5)
    affinity[:, [0, 1, 2], [0, 1, 2]] = 1.0
    # At the deepest point b is the outlier over all three (row sums: a 1.4, b 0.6, c 1.0),
    # and within {a, c} both score 0.9: the earlier (a) wins. Earlier points do not count.
    affinity[2] = [[1, 0.5, 0.9], [0.5, 1, 0.1], [0.9, 0.1, 1]]
    affinity[0] = [[1, 0.0, 0.0], [0.0, 1, 0.9], [0.0, 0.9, 1]]  # would make a the outlier at block 0
    net = BranchedNet.from_single_task(TREES["mixed"], backbones, heads, init="outlier",
                                       affinity=affinity, tasks=TASKS)
    assert torch.equal(net.stem[0].weight, backbones["b"].stem[0].weight)
    assert torch.equal(net.nodes["b0_0_1_2"].state_dict()["0.conv1.weight"],
                       backbones["b"].blocks[0].state_dict()["0.conv1.weight"])
    assert torch.equal(net.nodes["b1_0_2"].state_dict()["0.conv1.weight"],
                       backbones["a"].blocks[1].state_dict()["0.conv1.weight"])
    with pytest.raises(UserError, match="init 'outlier' needs the task affinity"):
        BranchedNet.from_single_task(TREES["mixed"], backbones, heads, init="outlier", tasks=TASKS)


def test_sources_and_shared_tasks():
    backbones, heads = single_task_models()
    net = BranchedNet.from_single_task(TREES["mixed"], backbones, heads, init="first", tasks=TASKS)
    # mixed: {a,b,c} | {a,c} {b} | {a} {b} {c}; first takes a, then a, b; c's last node is its own
    assert net.sources == {"b0_0_1_2": "a", "b1_0_2": "a", "b1_1": "b", "b2_0": "a", "b2_1": "b", "b2_2": "c"}
    assert net.shared_tasks() == TASKS
    separate = BranchedNet.from_single_task(TREES["separate"], backbones, heads, init="first", tasks=TASKS)
    assert separate.shared_tasks() == []
    bb = make_backbone()
    alone_c = BranchedNet(fit_tree([[("a", "b"), ("c",)]] * 3, bb.num_blocks), bb, make_heads(bb.out_channels), tasks=TASKS)
    assert alone_c.shared_tasks() == ["a", "b"]
