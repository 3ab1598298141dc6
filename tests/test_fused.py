"""The fused variant (Task Fusion): modulations, bottlenecks, where the layers go, the starting
point, per-task gradient routing, costs, and the stage end to end.

Every check is against an independent reference: the layer's formulas written out in numpy,
the plain network, gradients taken by hand from the separate task losses, and parameter and
FLOP counts by formula.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from branchnas.backbones import build_backbone
from branchnas.cost import count_flops, count_params
from branchnas.errors import RecipeError, UserError
from branchnas.models import BranchedNet
from branchnas.models.fused import FiLM, FusedNet, TaskFusion, fuse_block
from branchnas.recipe import BackboneConfig, load_recipe

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
SIZE = 16
TREES = {
    "mixed": [[("a", "b", "c")], [("a", "b"), ("c",)], [("a",), ("b",), ("c",)]],
    "separate": [[("a",), ("b",), ("c",)]] * 3,
}
BOTTLENECKS = ["conv", "linear", "attention"]


def _backbones(seed=0, width=0.5):
    """Single-task ResNet-20s with random BatchNorm statistics and affines (nothing trivially 1 or 0)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 100)
    backbones = {t: build_backbone(BackboneConfig(name="resnet20", width=width), 3, (SIZE, SIZE)) for t in TASKS}
    with torch.no_grad():
        for b in backbones.values():
            for m in b.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return backbones


def _heads(backbones):
    torch.manual_seed(1)  # the same heads on every call
    return {t: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(b.out_channels, 2))
            for t, b in backbones.items()}


def _fused(tree="mixed", seed=0, **settings):
    backbones = _backbones(seed)
    return FusedNet.from_single_task(TREES[tree], backbones, _heads(backbones), tasks=TASKS, **settings), backbones


def _randomise_fusion(net, seed):
    """Random modulations and bottlenecks: every task's modulation reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in net.fusion_layers():
            for p in layer.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _bn(channels, seed):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
    return bn.eval()


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("modulation", ["film", "prelu", "both"])
def test_modulations_start_at_the_papers_values_one_shared_and_one_per_task(modulation):
    net, _ = _fused(modulation=modulation)
    layers = net.fusion_layers()
    assert layers
    for node, layer in layers:
        sets = [layer.shared_modulation, *layer.task_modulations]
        assert len(layer.task_modulations) == len(net.node_groups[node])
        channels = layer.norm.num_features
        for m in sets:
            films = [p for p in m if isinstance(p, FiLM)]
            prelus = [p for p in m if isinstance(p, nn.PReLU)]
            assert len(films) == (modulation in ("film", "both")) and len(prelus) == (modulation in ("prelu", "both"))
            for film in films:
                assert torch.equal(film.gamma, torch.ones(channels)) and torch.equal(film.beta, torch.zeros(channels))
            for prelu in prelus:
                assert torch.equal(prelu.weight, torch.full((channels,), 0.25))
        # separate parameters, not one tensor seen T+1 times
        assert len({id(p) for m in sets for p in m.parameters()}) == len(sets) * len(list(sets[0].parameters()))


def _normalised(bn, x):
    mean, var = bn.running_mean.numpy(), bn.running_var.numpy()
    return (x - mean.reshape(1, -1, 1, 1)) / np.sqrt(var.reshape(1, -1, 1, 1) + bn.eps)


def _modulated(layer, xhat):
    """The T+1 modulations of ``xhat`` by the layer's own parameters, in numpy."""
    out = []
    for m in [layer.shared_modulation, *layer.task_modulations]:
        y = xhat
        for part in m:
            if isinstance(part, FiLM):
                y = y * part.gamma.detach().numpy().reshape(1, -1, 1, 1) + part.beta.detach().numpy().reshape(1, -1, 1, 1)
            else:
                a = part.weight.detach().numpy().reshape(1, -1, 1, 1)
                y = np.where(y >= 0, y, a * y)
        out.append(y)
    return out


def _bottleneck_by_hand(kind, bottleneck, mods):
    """The bottleneck of ``mods`` (T+1 arrays N x C x H x W) in numpy, eval mode."""
    cat = np.concatenate(mods, axis=1)
    if kind == "conv":
        conv, bn = bottleneck[0], bottleneck[1]
        y = np.einsum("oc,nchw->nohw", conv.weight.detach().numpy()[:, :, 0, 0], cat)
        y = _normalised(bn, y)
        return y * bn.weight.detach().numpy().reshape(1, -1, 1, 1) + bn.bias.detach().numpy().reshape(1, -1, 1, 1)
    if kind == "linear":
        lin = bottleneck.linear
        return (np.einsum("oc,nchw->nohw", lin.weight.detach().numpy(), cat)
                + lin.bias.detach().numpy().reshape(1, -1, 1, 1))
    tokens = np.stack(mods, axis=1).transpose(0, 3, 4, 1, 2)  # N H W K C

    def proj(layer, t):
        return t @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()

    q, k, v = (proj(layer, tokens) for layer in (bottleneck.query, bottleneck.key, bottleneck.value))
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (weights @ v).mean(axis=3).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
def test_fusion_concatenates_T_plus_1_modulations_and_the_bottleneck_maps_them_back_to_C(bottleneck):
    channels, tasks = 6, 3
    layer = TaskFusion(_bn(channels, 1), tasks, "both", bottleneck).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(2, channels, 5, 4, generator=g)
    with torch.no_grad():
        modulated = layer.modulate(x)
        out = layer(x)
    assert modulated.shape == (2, channels * (tasks + 1), 5, 4)
    assert out.shape == x.shape
    mods = _modulated(layer, _normalised(layer.norm, x.numpy()))
    np.testing.assert_allclose(modulated.numpy(), np.concatenate(mods, axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), _bottleneck_by_hand(bottleneck, layer.bottleneck, mods), rtol=1e-4, atol=1e-5)


def test_prelu_starts_as_the_bns_affine_of_the_prelu_of_the_normalised_input():
    """Not the plain BN→ReLU: the stated difference, exactly."""
    bn = _bn(4, 3)
    layer = TaskFusion(bn, 2, "prelu", "linear").eval()
    x = torch.randn(3, 4, 5, 5)
    xhat = _normalised(bn, x.numpy())
    expected = (np.where(xhat >= 0, xhat, 0.25 * xhat) * bn.weight.detach().numpy().reshape(1, -1, 1, 1)
                + bn.bias.detach().numpy().reshape(1, -1, 1, 1))
    with torch.no_grad():
        np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
@pytest.mark.parametrize("training", [False, True])
def test_film_fusion_starts_as_the_plain_network(bottleneck, training):
    net, backbones = _fused(modulation="film", bottleneck=bottleneck)
    plain = BranchedNet.from_single_task(TREES["mixed"], backbones, _heads(backbones), tasks=TASKS)
    net.train(training)
    plain.train(training)
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused_out, plain_out = net(x), plain(x)
    # linear and attention: float rounding; conv: its BN normalises x̂ again (eps = 1e-5)
    rtol = 1e-4 if bottleneck == "conv" else 1e-5
    for t in TASKS:
        scale = float(plain_out[t].abs().max())
        torch.testing.assert_close(fused_out[t], plain_out[t], rtol=0, atol=rtol * scale)


def test_where_all_fuses_every_conv_and_last_only_the_one_before_the_residual_sum():
    for where, per_block in (("all", 2), ("last", 1)):
        net, _ = _fused(where=where)
        counts = {}
        for node, _ in net.fusion_layers():
            counts[node] = counts.get(node, 0) + 1
        assert counts == {"b0_0_1_2": 3 * per_block, "b1_0_1": 3 * per_block}  # 3 residual blocks per stage
        for name, node in net.nodes.items():
            if len(net.node_groups[name]) == 1:  # a node of one task stays a plain block
                assert not any(isinstance(m, TaskFusion) for m in node.modules())
                assert type(node).__name__ == "Sequential" and type(node[0]).__name__ == "_CifarBasicBlock"
    net, _ = _fused(where="last")
    body = net.nodes["b1_0_1"][0].body  # conv1, BN, ReLU, conv2, fusion; then + shortcut, ReLU
    assert [type(m).__name__ for m in body] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "TaskFusion"]
    separate, _ = _fused("separate")
    assert separate.fusion_layers() == []

    from torchvision.models.resnet import Bottleneck

    down = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    block = Bottleneck(8, 4, downsample=down).eval()
    x = torch.randn(2, 8, 6, 6)
    for where, count in (("all", 3), ("last", 1)):
        fused = fuse_block(copy.deepcopy(block), 2, where, "film", "linear").eval()
        assert sum(isinstance(m, TaskFusion) for m in fused.modules()) == count
        with torch.no_grad():
            torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- per-task backprop


def _tasks(weights=(1.0, 2.0, 0.5)):
    from branchnas.tasks import Task

    return [Task(t, "classification", t, num_classes=2, weight=w) for t, w in zip(TASKS, weights, strict=True)]


def _losses(net, x, targets):
    out = net(x)
    return {t: nn.functional.cross_entropy(out[t], targets[t]) for t in TASKS}


def _close(actual, expected):
    """Equal up to float32 summation order (one backward of a sum against a sum of backwards)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-9)


@pytest.mark.parametrize("scheme", ["uniform", "uncertainty"])
def test_task_parameters_get_their_own_tasks_gradient_and_shared_ones_the_weightings(scheme):
    """Eq. 4–5, checked against gradients taken by hand from each task's loss separately."""
    from branchnas.variants import get_variant
    from branchnas.weighting import get_weighting

    net, _ = _fused(seed=3)
    _randomise_fusion(net, 3)
    net.train()
    tasks = _tasks()
    weighting = get_weighting(scheme, tasks, seed=0)
    if scheme == "uncertainty":
        with torch.no_grad():
            weighting.log_vars.copy_(torch.tensor([0.4, -0.3, 0.9]))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, SIZE, SIZE, generator=g)
    targets = {t: torch.randint(0, 2, (6,), generator=g) for t in TASKS}

    # By hand: every parameter's gradient of every task's loss alone.
    reference = copy.deepcopy(net)
    losses = _losses(reference, x, targets)
    params = list(reference.parameters())
    by_task = {t: torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True) for t in TASKS}
    s = weighting.log_vars.detach() if scheme == "uncertainty" else torch.zeros(3)
    lam = {t: task.weight * float(torch.exp(-s[i])) for i, (t, task) in enumerate(zip(TASKS, tasks, strict=True))}

    def grad_of(i, t):
        return by_task[t][i] if by_task[t][i] is not None else torch.zeros_like(params[i])

    variant = get_variant("fused", load_recipe(None, []))
    weights = variant.backward(net, _losses(net, x, targets), weighting, net.shared_parameters(), 0.0)
    assert weights == pytest.approx(lam)
    owner = {id(p): t for t, ps in net.task_parameters().items() for p in ps}
    assert len(owner) == sum(len(ps) for ps in net.task_parameters().values()) > 0
    assert not set(owner) & {id(p) for p in net.shared_parameters()}
    routed = 0
    for i, p in enumerate(net.parameters()):
        if id(p) in owner:
            t = owner[id(p)]
            own = lam[t] * grad_of(i, t)
            others = sum(lam[u] * grad_of(i, u) for u in TASKS if u != t)
            _close(p.grad, own)
            routed += bool(others.abs().max() > 1e-3 * own.abs().max())  # the other tasks were cut off
        else:
            expected = sum(lam[u] * grad_of(i, u) for u in TASKS)
            _close(p.grad, expected)
    assert routed == len(owner)


def test_the_trainer_steps_each_task_parameter_by_its_own_loss_alone():
    """One SGD step through the trainer (the variant seam), by hand."""
    from branchnas.recipe import FinetuneConfig
    from branchnas.training import Trainer
    from branchnas.variants import get_variant

    net, _ = _fused(seed=4)
    _randomise_fusion(net, 4)
    tasks = _tasks((1.0, 1.0, 1.0))
    variant = get_variant("fused", load_recipe(None, []))
    cfg = FinetuneConfig(epochs=1, lr=0.1, device="cpu", schedule="constant", weight_decay=0.0)
    trainer = Trainer(net, tasks, cfg, batch_size=6, seed=0, variant=variant, progress=False)
    member = trainer.members[0]
    trainer.total_steps, trainer.warmup_steps = 1, 0
    member.epoch_loss_sums = {t: 0.0 for t in TASKS}
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 3, SIZE, SIZE, generator=g)
    targets = {t: torch.randint(0, 2, (6,), generator=g) for t in TASKS}
    before = copy.deepcopy(net).train()
    trainer._step_shared([member], x, targets, 0, 0, 0.1)
    losses = _losses(before, x, targets)
    for t, params in before.task_parameters().items():
        grads = torch.autograd.grad(losses[t], params, retain_graph=True)
        for new, old, grad in zip(net.task_parameters()[t], params, grads, strict=True):
            torch.testing.assert_close(new.detach(), old.detach() - 0.1 * grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- costs and export


def _delta_by_formula(net, bottleneck, modulation):
    """Params and FLOPs that the fusion layers add to the plain network, by formula (fvcore's units:
    eval-mode BN 2 flops per element with an affine, 1 without; elementwise ops 0)."""
    shapes = []
    hooks = [layer.register_forward_hook(lambda m, i, o: shapes.append((len(m.task_modulations), *o.shape[1:])))
             for _, layer in net.fusion_layers()]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, SIZE, SIZE))
    for h in hooks:
        h.remove()
    per_set = {"film": 2, "prelu": 1, "both": 3}[modulation]
    params = flops = 0
    for tasks, c, h, w in shapes:
        k, hw = tasks + 1, h * w
        params += k * per_set * c - 2 * c  # the modulations; the replaced BN's affine moves into the bottleneck
        flops -= hw * c  # the affine-free norm in place of the BN
        if bottleneck == "conv":
            params += k * c * c + 2 * c
            flops += hw * (k * c * c + 2 * c)
        elif bottleneck == "linear":
            params += k * c * c + c
            flops += hw * k * c * c
        else:
            params += 3 * (c * c + c)
            flops += hw * (3 * k * c * c + 2 * k * k * c)  # q, k, v; scores; weighted values
    return params, flops


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
def test_fvcore_counts_every_bottleneck_on_the_real_modules(bottleneck):
    net, backbones = _fused(modulation="both", bottleneck=bottleneck)
    plain = BranchedNet.from_single_task(TREES["mixed"], backbones, _heads(backbones), tasks=TASKS)
    x = torch.zeros(1, 3, SIZE, SIZE)
    params, flops = _delta_by_formula(net, bottleneck, "both")
    assert count_params(net) - count_params(plain) == params > 0
    assert count_flops(net, x) - count_flops(plain, x) == flops > 0


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
def test_the_fused_network_scripts_and_exports(bottleneck):
    net, _ = _fused(bottleneck=bottleneck)
    _randomise_fusion(net, 7)
    net.eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        eager = net(x)
        scripted = torch.jit.script(net)(x)
        exported = torch.export.export(net, (x,)).module()(x)
    for t in TASKS:
        torch.testing.assert_close(scripted[t], eager[t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exported[t], eager[t], rtol=1e-5, atol=1e-5)


def test_checkpoint_rebuilds_the_same_network():
    from branchnas.variants import get_variant, variant_class

    recipe = load_recipe(None, ['finetune.fused.bottleneck="attention"', 'finetune.fused.where="last"'])
    variant = get_variant("fused", recipe)
    backbones = _backbones(8)
    net = variant.build(TREES["mixed"], backbones, _heads(backbones), init="first", tasks=TASKS).eval()
    _randomise_fusion(net, 8)
    saved = {**variant.checkpoint(net), "state_dict": net.state_dict()}
    assert saved["fused"] == {"where": "last", "modulation": "both", "bottleneck": "attention"}
    fresh = _backbones(9)["a"]  # another backbone's weights: the state dict replaces them
    rebuilt = variant_class("fused").rebuild(saved, TREES["mixed"], fresh, _heads(backbones), TASKS).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        for t, out in rebuilt(x).items():
            torch.testing.assert_close(out, net(x)[t], rtol=0, atol=0)


# --------------------------------------------------------------------------- the recipe


def test_fused_is_registered_and_refuses_a_backbone_without_residual_blocks():
    from branchnas.variants import get_variant, variant_names

    assert "fused" in variant_names()
    get_variant("fused", load_recipe(None, [])).check(["shape"])  # resnet20: fine
    recipe = load_recipe(None, ['backbone.name="lenet5"'])
    with pytest.raises(RecipeError, match="'fused' needs a backbone of residual blocks.*lenet5"):
        get_variant("fused", recipe).check(None)
    with pytest.raises(UserError, match="finetune.fused.bottleneck: unknown bottleneck 'conv2d'"):
        FusedNet(TREES["mixed"], _backbones()["a"], _heads(_backbones()), tasks=TASKS, bottleneck="conv2d")


def test_a_backbone_without_residual_blocks_is_refused_before_any_work(tmp_path):
    from branchnas.pipeline import run_stages

    recipe = load_recipe(None, [f"out={json.dumps(str(tmp_path / 'runs'))}", "finetune.variant=fused",
                                'backbone.name="lenet5"'])
    with pytest.raises(RecipeError, match="'fused' needs a backbone of residual blocks"):
        run_stages(recipe, ["finetune"], progress=False)
    assert not (tmp_path / "runs").exists()


def test_the_fused_settings_key_only_the_fused_fine_tune():
    from branchnas.stages import get_stage

    finetune = get_stage("finetune").config
    assert finetune(load_recipe(None, []), {}) == finetune(load_recipe(None, ['finetune.fused.where="last"']), {})
    fused = ["finetune.variant=fused"]
    assert finetune(load_recipe(None, fused), {}) != finetune(load_recipe(None, [*fused, 'finetune.fused.where="last"']), {})


# --------------------------------------------------------------------------- the stage, end to end


def _tiny(out, *extra):
    return tiny("fused", out, *extra)


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "fused")


@pytest.mark.slow
def test_the_fused_stage_reports_its_networks_own_fvcore_size(fused_run):
    from branchnas.stages.finetune import load_finetuned, read_report

    recipe, rundir = fused_run
    report = read_report(rundir)
    net = load_finetuned(rundir)
    assert report["variant"] == "fused" and isinstance(net, FusedNet)
    assert report["params"] == count_params(net)
    assert report["flops"] == count_flops(net, torch.zeros(1, 3, SIZE, SIZE))
    fusion = report["fusion"]
    assert {k: fusion[k] for k in ("where", "modulation", "bottleneck")} == {
        "where": "all", "modulation": "both", "bottleneck": "conv"}
    shared = {name for name, group in net.node_groups.items() if len(group) > 1}
    assert set(fusion["layers"]) == shared and shared  # the tiny budget's tree shares a node
    assert fusion["fusion_params"] == sum(count_params(layer) for _, layer in net.fusion_layers())
    assert report["budget"]["size"] == report["params"]
    assert_reproduces_test_metrics(recipe, net, report)


@pytest.mark.slow
def test_the_fused_export_runs_without_branchnas(fused_run):
    from branchnas.pipeline import run_stages
    from branchnas.stages.finetune import load_finetuned

    _, rundir = fused_run
    recipe = load_recipe(None, _tiny(rundir.path.parent, 'export.format=["torchscript", "torch.export"]',
                                     "export.over_budget=true"))
    result = run_stages(recipe, ["export"], rundir=rundir, progress=False)[1]["export"]
    for entry in result["formats"].values():
        assert entry["checked"]  # reloaded by `python -I` with branchnas imports blocked
    x = torch.randn(2, 3, SIZE, SIZE)
    loaded = torch.jit.load(str(rundir.path / "export" / "model.pt"))
    program = torch.export.load(str(rundir.path / "export" / "model.pt2")).module()
    with torch.no_grad():
        eager = load_finetuned(rundir)(x)
        for outputs in (loaded(x), program(x)):
            for task, out in outputs.items():
                torch.testing.assert_close(out, eager[task], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sigkill_mid_fused_finetune_resumes_to_the_same_network(fused_run, tmp_path):
    r = kill_and_resume(fused_run[1], "fused", tmp_path, "finetune.epochs=4")
    assert r.killed_at["epoch"] < 4
    assert r.straight["fused"] == r.resumed["fused"] and r.straight["variant"] == r.resumed["variant"] == "fused"
    assert any(".task_modulations." in key for key in r.straight["state_dict"])
    assert_same_weights(r.straight, r.resumed)
    assert r.resumed_report["training"]["history"][0] == r.killed_at["history"][0]  # continued, not redone
