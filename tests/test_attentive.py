"""The attentive variant (ASTMT): per-task SE and BatchNorm, adapters, single-tasking, the
adversarial term on the exposed gradients, costs, export and resume.

Every check is against an independent reference: SE written out in numpy, BatchNorm with the
task's own statistics in a plain block, the plain network, gradients taken by hand with autograd
on the separate task losses, the reversal's formula, and fvcore on the plain network.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from branchnas.backbones import build_backbone
from branchnas.cost import count_flops, count_params
from branchnas.models import BranchedNet
from branchnas.models.attentive import AttentiveNet, PerTask, SqueezeExcite, TaskPass
from branchnas.recipe import BackboneConfig, load_recipe
from branchnas.tasks import Task
from branchnas.variants.attentive import reversal_alpha, reverse_gradient

sys.path.insert(0, str(Path(__file__).parent))
from variant_runs import (  # noqa: E402
    assert_reproduces_test_metrics,
    assert_same_weights,
    finished_run,
    kill_and_resume,
    tiny,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")

TASKS = ["a", "b", "c"]
TREES = {
    # a and b share two stages and branch at stage 2; c leaves after stage 0
    "mixed": [[("a", "b", "c")], [("a", "b"), ("c",)], [("a",), ("b",), ("c",)]],
    # all three branch after stage 1
    "late": [[("a", "b", "c")], [("a", "b", "c")], [("a",), ("b",), ("c",)]],
    "all-shared": [[("a", "b", "c")]] * 3,
}


def _backbones(seed=0, name="resnet20", width=0.25, size=16):
    torch.manual_seed(seed)
    return {t: build_backbone(BackboneConfig(name=name, width=width), 3, (size, size)) for t in TASKS}


def _heads(backbones):
    return {t: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(b.out_channels, 2))
            for t, b in backbones.items()}


def _tree(name, depth):
    tree = TREES[name]
    return [tree[0]] * (depth - 2) + tree[-2:] if depth > 3 else tree[-depth:]


def _randomise(module, seed):
    """Random SE, adapter and BatchNorm weights and statistics, so nothing is trivially equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, SqueezeExcite):
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)


def _bn_copies(node):
    """Per task of an attentive node: its BatchNorm copies, in the layer's order."""
    groups = [m for m in node.modules() if isinstance(m, PerTask) and isinstance(m.copies[0], nn.BatchNorm2d)]
    return [[g.copies[t] for g in groups] for t in range(len(groups[0].copies))]


# --------------------------------------------------------------------------- modulation


@pytest.mark.parametrize(("name", "size"), [("resnet20", 16), ("lenet5", 16), ("mobilenet_v2", 32)])
@pytest.mark.parametrize("adapters", [False, True])
def test_the_attentive_network_starts_as_the_plain_network(name, size, adapters):
    """SE at identity (W₂, b₂ = 0, 2σ(0) = 1), BatchNorm copies of the plain node's, adapters at 0."""
    backbones = _backbones(1, name, size=size)
    tree = _tree("mixed", len(backbones["a"].blocks))
    heads = _heads(backbones)
    plain = BranchedNet.from_single_task(tree, backbones, heads, tasks=TASKS)
    net = AttentiveNet.from_single_task(tree, backbones, heads, tasks=TASKS, adapters=adapters)
    assert net.modulated_nodes()  # something is modulated
    x = torch.randn(4, 3, size, size)
    for training in (True, False):
        plain.train(training)
        net.train(training)
        with torch.no_grad():
            want, got = plain(x), net(x)
        for t in TASKS:
            torch.testing.assert_close(got[t], want[t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "size"), [("resnet20", 16), ("mobilenet_v2", 32)])
def test_every_batchnorm_of_a_shared_node_has_one_copy_per_task(name, size):
    backbones = _backbones(2, name, size=size)
    tree = _tree("mixed", len(backbones["a"].blocks))
    plain = BranchedNet(tree, backbones["a"], _heads(backbones), tasks=TASKS)
    net = AttentiveNet(tree, backbones["a"], _heads(backbones), tasks=TASKS)
    for node_name, group in net.modulated_nodes().items():
        node = net.nodes[node_name]
        copies = _bn_copies(node)
        originals = [m for m in plain.nodes[node_name].modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(copies) == len(group) and all(len(c) == len(originals) for c in copies)
        per_task = {id(m) for c in copies for m in c}
        assert all(id(m) in per_task for m in node.modules() if isinstance(m, nn.BatchNorm2d))


def test_se_modulation_differs_per_task_and_is_the_hand_computed_se():
    """A residual layer of a shared node, by hand: conv, the task's BN, ReLU, conv, the task's
    BN, the task's SE (numpy), plus the shortcut, ReLU."""
    backbones = _backbones(3)
    net = AttentiveNet(TREES["mixed"], backbones["a"], _heads(backbones), tasks=TASKS)
    _randomise(net, 3)
    net.eval()
    layer = net.nodes["b0_0_1_2"].layers[1]
    conv1, conv2 = layer.body[0].module, layer.body[3].module
    x = torch.randn(2, conv1.in_channels, 8, 8)
    outs = []
    for t in range(3):
        bn1, bn2 = layer.body[1].copies[t], layer.body[4].copies[t]

        def bn(h, m):
            return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

        h = bn(F.conv2d(torch.relu(bn(F.conv2d(x, conv1.weight, padding=1), bn1)), conv2.weight, padding=1), bn2)
        h = h.detach().numpy()
        se = layer.se.copies[t]
        w1, b1 = se.reduce.weight.detach().numpy()[:, :, 0, 0], se.reduce.bias.detach().numpy()
        w2, b2 = se.expand.weight.detach().numpy()[:, :, 0, 0], se.expand.bias.detach().numpy()
        squeezed = h.mean(axis=(2, 3))                        # B x C
        hidden = np.maximum(squeezed @ w1.T + b1, 0.0)        # B x C/r
        gate = 2.0 / (1.0 + np.exp(-(hidden @ w2.T + b2)))    # B x C, in (0, 2)
        expected = np.maximum(h * gate[:, :, None, None] + x.numpy(), 0.0)
        with torch.no_grad():
            out = layer(x, t)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_each_task_runs_its_own_batchnorm_copies():
    """Task b's BN statistics changed: b's output is the plain network's with those statistics,
    a's and c's are untouched."""
    backbones = _backbones(4)
    heads = _heads(backbones)
    plain = BranchedNet.from_single_task(TREES["all-shared"], backbones, heads, tasks=TASKS).eval()
    net = AttentiveNet.from_single_task(TREES["all-shared"], backbones, heads, tasks=TASKS).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = net(x)
    node = net.nodes["b1_0_1_2"]
    for bn in _bn_copies(node)[1]:  # task b
        _randomise(bn, 5)
    reference = copy.deepcopy(plain)
    originals = [m for m in reference.nodes["b1_0_1_2"].modules() if isinstance(m, nn.BatchNorm2d)]
    for original, changed in zip(originals, _bn_copies(node)[1], strict=True):
        original.load_state_dict(changed.state_dict())
    with torch.no_grad():
        after, want = net(x), reference(x)
    torch.testing.assert_close(after["b"], want["b"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after["b"], before["b"])
    for t in ("a", "c"):
        assert torch.equal(after[t], before[t])


def test_adapters_start_at_zero_and_once_nonzero_change_only_their_task():
    backbones = _backbones(6)
    heads = _heads(backbones)
    net = AttentiveNet.from_single_task(TREES["mixed"], backbones, heads, tasks=TASKS, adapters=True).eval()
    plain = AttentiveNet.from_single_task(TREES["mixed"], backbones, heads, tasks=TASKS).eval()
    adapted = net.nodes["b1_0_1"].layers[0].body[0]
    assert all(not a.weight.detach().any() for a in adapted.adapters.copies)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = net(x)
        for t in TASKS:
            torch.testing.assert_close(before[t], plain(x)[t], rtol=1e-5, atol=1e-6)
        adapted.adapters.copies[1].weight.normal_()  # task b's adapter beside the node's first conv
        after = net(x)
        h = torch.randn(2, adapted.conv.in_channels, 8, 8)
        by_hand = adapted.conv(h) + F.conv2d(h, adapted.adapters.copies[1].weight, stride=adapted.conv.stride)
        torch.testing.assert_close(adapted(h, 1), by_hand, rtol=1e-5, atol=1e-6)
        assert torch.equal(adapted(h, 0), adapted.conv(h))
    assert not torch.allclose(after["b"], before["b"])
    assert torch.equal(after["a"], before["a"]) and torch.equal(after["c"], before["c"])


def test_a_shared_node_runs_once_per_requested_task_and_the_script_keeps_the_task_argument():
    backbones = _backbones(7)
    net = AttentiveNet.from_single_task(TREES["mixed"], backbones, _heads(backbones), tasks=TASKS)
    _randomise(net, 7)
    net.eval()
    calls = {name: 0 for name in net.modulated_nodes()}

    def count(name):
        def hook(module, args):
            calls[name] += 1
        return hook

    hooks = [net.nodes[name].register_forward_pre_hook(count(name)) for name in calls]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        everything = net(x)
        assert calls == {"b0_0_1_2": 3, "b1_0_1": 2}
        out, features = net.forward_features(x, ["c"])
        assert calls == {"b0_0_1_2": 4, "b1_0_1": 2}  # c's pass only
        assert list(out) == ["c"] and set(features) == {"stem", "b0_0_1_2:c", "b1_2:c", "b2_2:c"}
        for hook in hooks:
            hook.remove()
        scripted = torch.jit.script(net)
        assert list(scripted(x, ["b"])) == ["b"]
        torch.testing.assert_close(scripted(x, ["b"])["b"], everything["b"], rtol=1e-5, atol=1e-6)
        for t in TASKS:
            torch.testing.assert_close(scripted(x)[t], everything[t], rtol=1e-5, atol=1e-6)
    assert everything["a"].shape == (2, 2)
    assert net.task_path("a") == ["b0_0_1_2:a", "b1_0_1:a", "b2_0:a"]
    assert net.branch_inputs == {"a": "b1_0_1:a", "b": "b1_0_1:b", "c": "b0_0_1_2:c"}


def test_the_shared_parameters_are_the_convs_not_the_per_task_modulation():
    backbones = _backbones(8)
    net = AttentiveNet(TREES["mixed"], backbones["a"], _heads(backbones), tasks=TASKS, adapters=True)
    shared = {id(p) for p in net.shared_parameters()}
    own = {id(p) for p in net.task_parameters()}
    assert shared and own and not shared & own
    layer = net.nodes["b0_0_1_2"].layers[0]
    assert id(layer.body[0].conv.weight) in shared and id(layer.se.copies[0].reduce.weight) in own
    assert id(layer.body[1].copies[2].weight) in own and id(layer.body[0].adapters.copies[1].weight) in own


# --------------------------------------------------------------------------- adversarial term


@pytest.mark.parametrize("progress", [0.0, 0.05, 0.3, 1.0])
def test_the_reversal_flips_the_gradient_scaled_by_alpha(progress):
    alpha = reversal_alpha(progress)
    assert alpha == pytest.approx(2.0 / (1.0 + np.exp(-10.0 * progress)) - 1.0, abs=1e-15)
    x = torch.randn(3, 4, requires_grad=True)
    incoming = torch.randn(3, 4)
    y = reverse_gradient(x, alpha)
    assert torch.equal(y, x)
    y.backward(incoming)
    torch.testing.assert_close(x.grad, -alpha * incoming, rtol=0, atol=0)


def test_alpha_rises_from_zero_to_almost_one():
    assert reversal_alpha(0.0) == 0.0
    assert reversal_alpha(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert 0.9999 < reversal_alpha(1.0) < 1.0


def _adversarial_setup(tree, seed, *extra):
    from branchnas.variants import get_variant

    recipe = load_recipe(None, ["finetune.variant=attentive", *extra])
    variant = get_variant("attentive", recipe)
    backbones = _backbones(seed)
    net = variant.build(tree, backbones, _heads(backbones), init="first", tasks=TASKS, seed=seed)
    _randomise(net, seed)  # SE away from the identity, so its gradient reaches everything
    tasks = [Task(t, "classification", t, num_classes=2) for t in TASKS]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    y = {t: torch.randint(0, 2, (4,), generator=torch.Generator().manual_seed(seed + i)) for i, t in enumerate(TASKS)}
    return variant, net, tasks, x, y


@pytest.mark.parametrize("tree", ["mixed", "late"])
def test_the_discriminator_receives_the_normalised_gradients_at_the_branch_points(tree):
    from branchnas.weighting import Uniform

    variant, net, tasks, x, y = _adversarial_setup(TREES[tree], 9)
    assert variant.levels == ({"b1": ["a", "b"]} if tree == "mixed" else {"b1": ["a", "b", "c"]})
    reference = copy.deepcopy(net).train()
    received = {level: [] for level in variant.levels}
    for level, disc in variant.discriminators.items():
        disc.register_forward_pre_hook(lambda module, args, level=level: received[level].append(args[0].detach()))
    net.train()
    out = net(x)
    losses = {t: F.cross_entropy(out[t], y[t]) for t in TASKS}
    variant.backward(net, losses, Uniform(tasks), net.shared_parameters(), progress=0.4)
    # By hand: each task's own loss, differentiated at the features its branch receives.
    out, features = reference.forward_features(x)
    for level, group in variant.levels.items():
        assert len(received[level]) == len(group)
        for task, got in zip(group, received[level], strict=True):
            feature = features[reference.branch_inputs[task]]
            (g,) = torch.autograd.grad(F.cross_entropy(out[task], y[task]), feature, retain_graph=True)
            assert g.abs().sum() > 0
            want = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got.norm(dim=1), torch.ones_like(got.norm(dim=1)), rtol=1e-4, atol=1e-4)


def test_the_step_gradient_is_the_weighted_task_gradient_plus_the_reversed_discriminator_gradient():
    """(1 − w)·∇L_task for the network, −α·w·∇L_D added to it through the exposed gradients,
    +w·∇L_D for the discriminator: all by hand, without the reversal function."""
    from branchnas.weighting import Uniform

    w, progress = 0.2, 0.15
    variant, net, tasks, x, y = _adversarial_setup(TREES["late"], 10, f"finetune.attentive.weight={w}")
    reference, discriminators = copy.deepcopy(net).train(), copy.deepcopy(variant.discriminators)
    net.train()
    out = net(x)
    weights = variant.backward(net, {t: F.cross_entropy(out[t], y[t]) for t in TASKS}, Uniform(tasks),
                               net.shared_parameters(), progress)
    assert weights == {t: pytest.approx(1 - w) for t in TASKS}

    out, features = reference.forward_features(x)
    losses = {t: F.cross_entropy(out[t], y[t]) for t in TASKS}
    terms = []
    for label, task in enumerate(variant.levels["b1"]):
        (g,) = torch.autograd.grad(losses[task], features[reference.branch_inputs[task]], create_graph=True)
        logits = discriminators["b1"](g / g.norm(dim=1, keepdim=True))
        terms.append(F.cross_entropy(logits, torch.full((4, *logits.shape[2:]), label)))
    loss_d = sum(terms) / len(terms)
    params, d_params = list(reference.parameters()), list(discriminators.parameters())
    task_grads = torch.autograd.grad(sum(losses.values()), params, retain_graph=True, allow_unused=True)
    d_grads = torch.autograd.grad(loss_d, params + d_params, allow_unused=True)
    alpha = 2.0 / (1.0 + math.exp(-10 * progress)) - 1.0
    zero = torch.zeros(())
    for p, gt, gd in zip(net.parameters(), task_grads, d_grads[:len(params)], strict=True):
        want = (1 - w) * (gt if gt is not None else zero) - alpha * w * (gd if gd is not None else zero)
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), want.expand_as(p),
                                   rtol=1e-4, atol=1e-7)
    moved = sum(float(g.abs().sum()) for g in d_grads[:len(params)] if g is not None)
    assert moved > 0  # the discriminator's term reaches the network
    for p, gd in zip(variant.discriminators.parameters(), d_grads[len(params):], strict=True):
        torch.testing.assert_close(p.grad, w * gd, rtol=1e-4, atol=1e-8)


def test_a_tree_where_no_two_tasks_branch_together_trains_without_a_discriminator():
    separate = [[("a",), ("b",), ("c",)]] * 3
    variant, net, _, _, _ = _adversarial_setup([[("a", "b"), ("c",)], *separate[1:]], 11)
    assert variant.levels == {"b0": ["a", "b"]}
    variant, net, _, _, _ = _adversarial_setup(separate, 11)
    assert variant.levels == {"stem": ["a", "b", "c"]}  # the stem is shared by all
    assert not net.modulated_nodes() and net.keep_branch_features
    variant, net, _, _, _ = _adversarial_setup([[("a", "b", "c")], [("a",), ("b", "c")], [("a",), ("b",), ("c",)]], 11)
    assert variant.levels == {"b1": ["b", "c"]}


def test_the_variant_saves_and_restores_its_discriminator_and_refuses_ddp_only_when_adversarial():
    from branchnas.variants import PLANNED, get_variant

    assert "attentive" not in PLANNED
    variant, *_ = _adversarial_setup(TREES["mixed"], 12)
    with torch.no_grad():
        for p in variant.discriminators.parameters():
            p.add_(1.0)
    state = variant.state_dict()
    fresh, *_ = _adversarial_setup(TREES["mixed"], 12)
    fresh.load_state_dict(state)
    for a, b in zip(variant.discriminators.parameters(), fresh.discriminators.parameters(), strict=True):
        assert torch.equal(a, b)
    assert "double backprop" in variant.ddp_conflict
    off = get_variant("attentive", load_recipe(None, ["finetune.attentive.adversarial=false"]))
    assert off.ddp_conflict == ""


def test_the_discriminator_steps_at_its_own_learning_rate():
    variant, net, *_ = _adversarial_setup(TREES["mixed"], 13, "finetune.lr=0.05", "finetune.attentive.discriminator_lr=4")
    (optimizer,) = variant.optimizers(net)
    assert [g["base_lr"] for g in optimizer.param_groups] == [pytest.approx(0.2)]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in variant.discriminators.parameters()}
    assert not {id(p) for p in variant.discriminators.parameters()} & {id(p) for p in net.parameters()}


# --------------------------------------------------------------------------- costs


def test_fvcore_counts_every_task_pass_and_the_se_by_hand():
    """Per task: the plain network's pass plus, in every shared node on its path, each layer's
    SE (C·H·W for the pooling, 2·C·hidden for the two 1×1 convs). All tasks: the stem once and
    each pass without it."""
    backbones = _backbones(14)
    heads = _heads(backbones)
    plain = BranchedNet.from_single_task(TREES["mixed"], backbones, heads, tasks=TASKS)
    net = AttentiveNet.from_single_task(TREES["mixed"], backbones, heads, tasks=TASKS, reduction=2)
    x = torch.zeros(1, 3, 16, 16)
    passes = {t: count_flops(TaskPass(net, t), x) for t in TASKS}
    stem = count_flops(plain.stem, x)
    assert count_flops(net, x) == stem + sum(p - stem for p in passes.values())
    # resnet20 at width 1/4 on 16x16: stages of 4, 8, 16 channels at 16x16, 8x8, 4x4; 3 layers each
    se = {d: 3 * (c * s * s + 2 * c * (c // 2)) for d, (c, s) in enumerate([(4, 16), (8, 8), (16, 4)])}
    shared_on_path = {"a": [0, 1], "b": [0, 1], "c": [0]}
    for t in TASKS:
        assert passes[t] == count_flops(TaskPass(plain, t), x) + sum(se[d] for d in shared_on_path[t])
    from branchnas.cost import task_pass_flops

    assert task_pass_flops(net, x) == passes


# --------------------------------------------------------------------------- the stage, end to end


def _tiny(out, *extra):
    return tiny("attentive", out, *extra)


@pytest.fixture(scope="module")
def attentive_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "attentive")


@pytest.mark.slow
def test_the_attentive_stage_reports_its_fvcore_size_per_image_and_per_task_pass(attentive_run):
    from branchnas.stages.finetune import load_finetuned, read_report

    recipe, rundir = attentive_run
    report = read_report(rundir)
    net = load_finetuned(rundir)
    assert report["variant"] == "attentive" and isinstance(net, AttentiveNet)
    assert report["params"] == count_params(net)
    x = torch.zeros(1, 3, 16, 16)
    assert report["flops"] == count_flops(net, x)
    passes = report["flops_per_task_pass"]
    assert passes == {t: count_flops(TaskPass(net, t), x) for t in net.task_names}
    stem = count_flops(net.stem, x)
    assert report["flops"] == stem + sum(p - stem for p in passes.values())
    info = report["attentive"]
    assert info["modulated_nodes"] == net.modulated_nodes() and info["modulated_nodes"]
    assert info["discriminator_levels"] and math.isfinite(info["discriminator_loss"])
    # The rebuilt file is the network that was evaluated.
    assert_reproduces_test_metrics(recipe, net, report)


@pytest.mark.slow
def test_the_attentive_export_runs_without_branchnas_and_keeps_the_task_argument(attentive_run):
    from branchnas.pipeline import run_stages
    from branchnas.stages.finetune import load_finetuned

    _, rundir = attentive_run
    recipe = load_recipe(None, _tiny(rundir.path.parent, 'export.format=["torchscript", "torch.export"]'))
    result = run_stages(recipe, ["export"], rundir=rundir, progress=False)[1]["export"]
    assert all(entry["checked"] for entry in result["formats"].values())  # reloaded with branchnas blocked
    x = torch.randn(2, 3, 16, 16)
    eager = load_finetuned(rundir)
    loaded = torch.jit.load(str(rundir.path / "export" / "model.pt"))
    program = torch.export.load(str(rundir.path / "export" / "model.pt2")).module()
    with torch.no_grad():
        want = eager(x)
        for task, out in loaded(x).items():
            torch.testing.assert_close(out, want[task], rtol=1e-5, atol=1e-5)
        for task, out in program(x).items():
            torch.testing.assert_close(out, want[task], rtol=1e-5, atol=1e-5)
        one = loaded(x, ["segmentation"])
    assert list(one) == ["segmentation"]
    torch.testing.assert_close(one["segmentation"], want["segmentation"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sigkill_mid_attentive_finetune_resumes_to_the_same_network(attentive_run, tmp_path):
    r = kill_and_resume(attentive_run[1], "attentive", tmp_path, "finetune.epochs=5")
    assert r.killed_at["epoch"] < 5 and r.killed_at["owned_optimizers"]  # the discriminator's optimizer state
    assert r.killed_at["variant"]["discriminators"]  # and its weights
    assert r.straight["attentive"] == r.resumed["attentive"]
    assert_same_weights(r.straight, r.resumed)
    assert r.resumed_report["training"]["history"][0] == r.killed_at["history"][0]  # continued, not redone
    assert r.resumed_report["attentive"]["discriminator_loss"] == r.straight_report["attentive"]["discriminator_loss"]
