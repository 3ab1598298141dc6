"""The gated variant (GatedMTL): gates, hinge loss, mixing, pruning, and the variant seam.

Every check is against an independent reference: the sigmoid's derivative written out, the
hinge loss computed in numpy, the mixing computed with numpy's softmax, the unpruned network's
outputs, parameter counts by formula, and the plain network.
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
from branchnas.cost import count_params
from branchnas.errors import NotAvailableYet, RecipeError
from branchnas.models import BranchedNet
from branchnas.models.gated import GatedLayer, GatedNet, hard_gate, mix_inputs, sparsity_loss
from branchnas.models.pruning import prunable, prune_outputs
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


def _backbones(seed=0, width=0.5, name="resnet20"):
    torch.manual_seed(seed)
    return {t: build_backbone(BackboneConfig(name=name, width=width), 3, (32, 32)) for t in TASKS}


def _heads(backbones):
    return {t: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(b.out_channels, 2))
            for t, b in backbones.items()}


def _randomise(net, seed):
    """Random gates, mixing and BatchNorm statistics, so nothing is trivially equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, layer in net.gated_layers():
            for alpha, beta in zip(layer.alphas, layer.betas, strict=True):
                alpha.copy_(torch.randn(alpha.shape, generator=g) * 2)
                beta.copy_(torch.randn(beta.shape, generator=g))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)


TREES = {
    "mixed": [[("a", "b", "c")], [("a", "b"), ("c",)], [("a",), ("b",), ("c",)]],
    "all-shared": [[("a", "b", "c")]] * 3,
    "late-split": [[("a", "b", "c")], [("a", "b", "c")], [("a", "c"), ("b",)]],
}


# --------------------------------------------------------------------------- gates


def test_hard_gate_is_exactly_binary_with_the_sigmoid_gradient():
    alpha = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0], requires_grad=True)
    gate = hard_gate(alpha)
    assert gate.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # 1[σ(α) > 0.5]; σ(0) = 0.5 is closed
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (gate * weights).sum().backward()
    a = alpha.detach().numpy()
    sigma = 1 / (1 + np.exp(-a))
    np.testing.assert_allclose(alpha.grad.numpy(), weights.numpy() * sigma * (1 - sigma), rtol=1e-6)


def test_hinge_sparsity_loss_matches_a_hand_computation():
    net = GatedNet(TREES["mixed"], _backbones()["a"], _heads(_backbones()), tasks=TASKS)
    g = torch.Generator().manual_seed(3)
    per_task = {t: [] for t in TASKS}
    with torch.no_grad():
        for name, _, layer in net.gated_layers():
            for alpha in layer.alphas:
                alpha.copy_(torch.randn(alpha.shape, generator=g))
                for i, task in enumerate(net.node_groups[name]):
                    per_task[task].append(alpha[i].numpy().copy())
    targets = {"a": 0.1, "b": 0.9, "c": 0.4}
    terms = []
    for task, alphas in per_task.items():
        mean = np.mean(1 / (1 + np.exp(-np.concatenate(alphas))))
        terms.append(max(0.0, mean - targets[task]))
    expected = np.mean(terms)
    assert terms[1] == 0.0 and terms[0] > 0  # one task under its target, one over
    assert float(sparsity_loss(net, targets).detach()) == pytest.approx(expected, rel=1e-6)


def test_shared_input_mixes_the_tasks_by_a_softmax_over_tasks():
    layer = GatedLayer(nn.Identity(), [nn.Identity(), nn.Identity()], channels=[3, 3],
                       identical_inputs=False, alpha_init=-5.0)  # every gate closed: output = ψ
    with torch.no_grad():
        layer.betas[0].copy_(torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]))
    xs = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    out = layer(xs)
    beta = layer.betas[0].detach().numpy()
    w = np.exp(beta) / np.exp(beta).sum(axis=1, keepdims=True)  # C x T
    expected = sum(w[:, t].reshape(1, 3, 1, 1) * xs[t].numpy() for t in range(2))
    for o in out:
        np.testing.assert_allclose(o.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mix_inputs(torch.from_numpy(w.T.copy()), xs).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_open_gates_take_the_tasks_own_features_channel_by_channel():
    own = [nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 2, 1, bias=False)]
    shared = nn.Conv2d(2, 2, 1, bias=False)
    layer = GatedLayer(shared, own, channels=[2, 2], identical_inputs=True, alpha_init=0.0)
    with torch.no_grad():
        layer.alphas[0].copy_(torch.tensor([[3.0, -3.0], [-3.0, -3.0]]))
    x = torch.randn(1, 2, 3, 3)
    out = layer([x, x])
    assert torch.equal(out[0][:, 0], own[0](x)[:, 0]) and torch.equal(out[0][:, 1], shared(x)[:, 1])
    assert torch.equal(out[1], shared(x))


# --------------------------------------------------------------------------- pruning


def _cifar_block(cin, cout, stride):
    from branchnas.backbones.resnet import _CifarBasicBlock

    return _CifarBasicBlock(cin, cout, stride)


def _layers():
    from torchvision.models.resnet import BasicBlock, Bottleneck

    down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    return {
        "cifar identity": (_cifar_block(8, 8, 1), 8, 8 * 8 * 9 + 16, lambda k: 8 * k * 9 + 2 * k),
        "cifar padded": (_cifar_block(8, 16, 2), 8, 8 * 16 * 9 + 32, lambda k: 16 * k * 9 + 2 * k),
        "torchvision projection": (BasicBlock(8, 16, 2, down), 8, 8 * 16 * 9 + 32,
                                   lambda k: 16 * k * 9 + 2 * k + 8 * k + 2 * k),
        "bottleneck": (Bottleneck(16, 4), 16, 16 * 4 + 8 + 4 * 4 * 9 + 8, lambda k: 4 * k + 2 * k),
        "conv tail": (nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2)),
                      8, 0, lambda k: 8 * 9 * k + k + 2 * k),
    }


@pytest.mark.parametrize("kind", list(_layers()))
def test_prune_outputs_computes_the_kept_channels_with_smaller_weights(kind):
    layer, cin, fixed, per_kept = _layers()[kind]
    torch.manual_seed(1)
    for m in layer.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    layer.eval()
    x = torch.randn(2, cin, 8, 8)
    full = layer(x)
    keep = [0, 3, 5] if full.shape[1] > 6 else [1, 2]
    pruned = prune_outputs(layer, keep).eval()
    assert prunable(layer)
    torch.testing.assert_close(pruned(x), full[:, keep], rtol=1e-5, atol=1e-5)
    assert count_params(pruned) == fixed + per_kept(len(keep))


def test_an_unknown_layer_is_sliced_and_counted_whole():
    layer = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(1), nn.Unflatten(1, (4, 2, 2)))
    assert not prunable(layer)
    pruned = prune_outputs(layer, [1, 2])
    x = torch.randn(1, 3, 2, 2)
    assert torch.equal(pruned(x), layer(x)[:, [1, 2]])
    assert count_params(pruned) == count_params(layer)


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("seed", [0, 1])
def test_the_pruned_network_computes_what_the_gated_one_does(tree, seed):
    backbones = _backbones(seed)
    net = GatedNet.from_single_task(TREES[tree], backbones, _heads(backbones), tasks=TASKS)
    _randomise(net, seed)
    net.eval()
    pruned = net.prune()
    assert pruned.pruned and not net.pruned and not pruned.gated_layers()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        gated, static = net(x), pruned(x)
        scripted = torch.jit.script(pruned)(x)
    for t in TASKS:
        torch.testing.assert_close(static[t], gated[t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scripted[t], gated[t], rtol=1e-5, atol=1e-5)
    assert count_params(pruned) < count_params(net)


def _gates_to(net, value):
    with torch.no_grad():
        for _, _, layer in net.gated_layers():
            for alpha in layer.alphas:
                alpha.fill_(value)


def test_all_gates_closed_prunes_to_the_plain_network():
    backbones = _backbones(2)
    heads = _heads(backbones)
    plain = BranchedNet.from_single_task(TREES["mixed"], backbones, heads, tasks=TASKS).eval()
    net = GatedNet.from_single_task(TREES["mixed"], backbones, heads, tasks=TASKS)
    _gates_to(net, -1.0)
    pruned = net.eval().prune()
    assert count_params(pruned) == count_params(plain)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for t, out in pruned(x).items():
            torch.testing.assert_close(out, plain(x)[t], rtol=1e-5, atol=1e-5)
    assert all(v == 0.0 for node in pruned.openness().values() for v in node.values())


def test_all_gates_open_prunes_to_the_separate_networks():
    backbones = _backbones(3)
    heads = _heads(backbones)
    separate = [[("a",), ("b",), ("c",)]] * 3
    plain = BranchedNet.from_single_task(separate, backbones, heads, tasks=TASKS).eval()
    net = GatedNet.from_single_task(TREES["all-shared"], backbones, heads, tasks=TASKS)
    _gates_to(net, 1.0)
    pruned = net.eval().prune()
    # Every task computes every channel itself: no shared copy is left, as N separate networks.
    assert count_params(pruned) == count_params(plain)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for t, out in pruned(x).items():
            torch.testing.assert_close(out, plain(x)[t], rtol=1e-5, atol=1e-5)


def test_gated_network_starts_from_the_single_task_and_plain_weights():
    backbones = _backbones(4)
    heads = _heads(backbones)
    plain = BranchedNet.from_single_task(TREES["mixed"], backbones, heads, init="first", tasks=TASKS)
    net = GatedNet.from_single_task(TREES["mixed"], backbones, heads, init="first", tasks=TASKS)
    layer = net.nodes["b0_0_1_2"].layers[1]
    shared_ref = list(plain.nodes["b0_0_1_2"])[1]
    for key, value in layer.shared.state_dict().items():
        assert torch.equal(value, shared_ref.state_dict()[key])
    for i, task in enumerate(TASKS):
        own = list(backbones[task].blocks[0])[1]
        for key, value in layer.copies[i].state_dict().items():
            assert torch.equal(value, own.state_dict()[key]), (task, key)
    assert torch.equal(net.nodes["b2_0"].block.state_dict()["0.conv1.weight"],
                       plain.nodes["b2_0"].state_dict()["0.conv1.weight"])


# --------------------------------------------------------------------------- seam and recipe


def test_gated_targets_take_one_value_or_a_table_per_task():
    assert load_recipe(None, ["finetune.gated.targets=0.5"]).finetune.gated.targets == 0.5
    recipe = load_recipe(None, ["finetune.gated.targets={ shape = 0.5, depth = 1 }"])
    assert recipe.finetune.gated.targets == {"shape": 0.5, "depth": 1.0}
    with pytest.raises(RecipeError, match=r"finetune.gated.targets: expected a value <= 1"):
        load_recipe(None, ["finetune.gated.targets=2"])
    with pytest.raises(RecipeError, match=r"finetune.gated.targets.shape: expected a number"):
        load_recipe(None, ['finetune.gated.targets={ shape = "x" }'])
    with pytest.raises(RecipeError, match=r"expected a number or a table"):
        load_recipe(None, ['finetune.gated.targets="high"'])


def test_variant_registry_refuses_unknown_planned_and_duplicate_names(monkeypatch):
    from branchnas import variants
    from branchnas.variants import Variant, get_variant, register_variant, variant_names

    assert variant_names()[:2] == ["plain", "gated"]
    recipe = load_recipe(None, [])
    monkeypatch.setattr(variants, "PLANNED", ("future",))  # every planned name is built now
    with pytest.raises(NotAvailableYet, match="'future' is not available yet"):
        get_variant("future", recipe)
    with pytest.raises(RecipeError, match="did you mean 'gated'"):
        get_variant("gatd", recipe)

    class Again(Variant):
        name = "gated"

    with pytest.raises(ValueError, match="already registered"):
        register_variant(Again)


def test_gated_check_refuses_targets_for_unknown_tasks():
    from branchnas.variants import get_variant

    recipe = load_recipe(None, ["finetune.gated.targets={ shpe = 0.5 }"])
    with pytest.raises(RecipeError, match="unknown task.*shpe"):
        get_variant("gated", recipe).check(["shape", "depth"])


def test_trainer_steps_the_variants_gates_with_their_own_optimizer_and_regulariser():
    """One step by hand: the gate SGD at base_lr x schedule, and the hinge's gradient added."""
    from branchnas.recipe import FinetuneConfig
    from branchnas.tasks import Task
    from branchnas.training import Trainer
    from branchnas.variants import get_variant

    recipe = load_recipe(None, ["finetune.gated.sparsity=0.5", "finetune.gated.targets=0.0", "finetune.gated.lr=0.3"])
    variant = get_variant("gated", recipe)
    backbones = _backbones(5, width=0.25)
    tasks = [Task(t, "classification", t, num_classes=2) for t in TASKS]
    net = variant.build(TREES["mixed"], backbones, _heads(backbones), init="first", tasks=TASKS)
    before = copy.deepcopy(net)

    cfg = FinetuneConfig(epochs=1, lr=0.0, device="cpu", schedule="constant")
    trainer = Trainer(net, tasks, cfg, batch_size=8, seed=0, variant=variant, progress=False)
    images = torch.randn(8, 3, 32, 32)
    targets = {t: torch.randint(0, 2, (8,)) for t in TASKS}
    member = trainer.members[0]
    trainer.total_steps, trainer.warmup_steps = 1, 0
    member.epoch_loss_sums = {t: 0.0 for t in TASKS}
    trainer._step_shared([member], images, targets, 0, 0, 0.0)
    # Reference gradient: task losses plus 0.5 * hinge, through the unchanged copy.
    before.train()
    out = before(images)
    loss = sum(nn.functional.cross_entropy(out[t], targets[t]) for t in TASKS)
    loss = loss + 0.5 * sparsity_loss(before, variant.targets(TASKS))
    loss.backward()
    for (_, _, new), (_, _, old) in zip(net.gated_layers(), before.gated_layers(), strict=True):
        for a_new, a_old in zip(new.alphas, old.alphas, strict=True):
            torch.testing.assert_close(a_new.detach(), a_old.detach() - 0.3 * a_old.grad, rtol=1e-5, atol=1e-7)
    # lr 0: every other parameter is where it was.
    for (name, p), q in zip(net.named_parameters(), before.parameters(), strict=True):
        if ".alphas." not in name and ".betas." not in name:
            assert torch.equal(p, q), name


def test_epoch_callbacks_see_each_validated_epoch_and_can_stop_training(tmp_path):
    from branchnas.data import load_splits
    from branchnas.training import Trainer

    recipe = load_recipe(None, [
        'tasks=[{name="shape", kind="classification"}]', "data.num_train=32", "data.num_val=16",
        "data.num_test=16", "data.options={size = 16}", "backbone.width=0.25"])
    splits, tasks = load_splits(recipe)
    backbone = build_backbone(recipe.backbone, 3, (16, 16))
    net = nn.Sequential(backbone, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(backbone.out_channels, tasks[0].num_classes))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return {"shape": self.net(x)}

    seen = []

    class Stop(Exception):
        pass

    def callback(info):
        seen.append((info["epoch"], info["score"], info["val"]["shape"]["accuracy"]))
        if info["epoch"] == 2:
            raise Stop

    cfg = type(recipe.finetune)(epochs=4, device="cpu")
    trainer = Trainer(Model(), tasks, cfg, batch_size=16, seed=0, checkpoint=tmp_path, progress=False,
                      callbacks=[callback])
    with pytest.raises(Stop):
        trainer.fit(splits["train"], splits["val"])
    assert [e for e, _, _ in seen] == [1, 2]
    assert all(score == acc for _, score, acc in seen)  # one task: the score is its metric
    assert torch.load(tmp_path / "model.pt", weights_only=True)["epoch"] == 2  # saved before the callback


def test_report_json_fields_of_the_gated_variant_are_plain_json():
    backbones = _backbones(6)
    net = GatedNet.from_single_task(TREES["mixed"], backbones, _heads(backbones), tasks=TASKS)
    _randomise(net, 6)
    from branchnas.variants.gated import GatedVariant, gate_decisions

    recipe = load_recipe(None, [])
    final = GatedVariant(recipe).finalise(net)
    fields = GatedVariant(recipe).report(net, final)
    json.dumps(fields)
    assert set(fields["gates"]["openness"]) == {"b0_0_1_2", "b1_0_1"}
    decisions = gate_decisions(final)
    # 3 residual layers, each gated after its two convs, for 2 tasks
    assert [[len(unit) for unit in layer] for layer in decisions["b1_0_1"]] == [[2, 2]] * 3


# --------------------------------------------------------------------------- the stage, end to end


def _tiny(out, *extra):
    return tiny("gated", out, *extra)


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "gated")


@pytest.mark.slow
def test_the_gated_stage_reports_the_pruned_networks_own_fvcore_size(gated_run):
    from branchnas.finetune import report_table
    from branchnas.stages.finetune import load_finetuned, read_report

    recipe, rundir = gated_run
    report = read_report(rundir)
    net = load_finetuned(rundir)
    assert report["variant"] == "gated" and isinstance(net, GatedNet) and net.pruned
    assert report["params"] == count_params(net)
    assert report["params"] < report["gates"]["params_before_pruning"]
    budget = report["budget"]
    assert budget["size"] == report["params"] and budget["limit"] == 40_000
    assert budget["within"] == (report["params"] <= 40_000)
    # The rebuilt file is the network that was evaluated.
    assert_reproduces_test_metrics(recipe, net, report)
    assert (rundir.path / "finetune" / "gates.png").read_bytes()[:4] == b"\x89PNG"
    table = report_table(report)
    assert "task-specific channels (%)" in table and "budget" in table


@pytest.mark.slow
def test_the_pruned_export_runs_without_branchnas(gated_run):
    from branchnas.pipeline import run_stages
    from branchnas.stages.finetune import load_finetuned, read_report

    recipe, rundir = gated_run
    assert read_report(rundir)["budget"]["within"]  # the default gates fit this budget
    result = run_stages(recipe, ["export"], rundir=rundir, progress=False)[1]["export"]
    assert result["checked"]  # reloaded by `python -I` with branchnas imports blocked
    loaded = torch.jit.load(str(rundir.path / "export" / "model.pt"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        eager = load_finetuned(rundir)(x)
        for task, out in loaded(x).items():
            torch.testing.assert_close(out, eager[task], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_an_over_budget_network_is_refused_by_export(gated_run, tmp_path):
    import shutil

    from branchnas.errors import UserError
    from branchnas.pipeline import run_stages
    from branchnas.rundir import RunDir
    from branchnas.stages.finetune import read_report

    _, source = gated_run
    shutil.copytree(source.path.parent, tmp_path / "runs")
    shutil.rmtree(tmp_path / "runs" / "gated" / "export", ignore_errors=True)
    rundir = RunDir(tmp_path / "runs" / "gated")
    # Every gate open and no sparsity: each task keeps its own copy of the shared blocks.
    opened = load_recipe(None, _tiny(tmp_path / "runs", "finetune.gated.init=3.0", "finetune.gated.sparsity=0"))
    with pytest.raises(UserError, match="over the budget of 40k.*export.over_budget=true"):
        run_stages(opened, ["export"], rundir=rundir, progress=False)
    report = read_report(rundir)  # the fine-tune itself finished and is kept
    assert not report["budget"]["within"] and report["params"] > 40_000
    assert not (rundir.path / "export" / "model.pt").exists()
    anyway = load_recipe(None, _tiny(tmp_path / "runs", "finetune.gated.init=3.0", "finetune.gated.sparsity=0",
                                     "export.over_budget=true"))
    assert run_stages(anyway, ["export"], rundir=rundir, progress=False)[1]["export"]["checked"]


@pytest.mark.slow
def test_sigkill_mid_gated_finetune_resumes_to_the_same_network(gated_run, tmp_path):
    r = kill_and_resume(gated_run[1], "gated", tmp_path, "finetune.epochs=6", "finetune.gated.sparsity=0.5")
    assert r.killed_at["epoch"] < 6 and r.killed_at["owned_optimizers"]  # the gates' SGD state is saved
    assert r.straight["gates"] == r.resumed["gates"]
    assert_same_weights(r.straight, r.resumed)
    assert r.resumed_report["training"]["history"][0] == r.killed_at["history"][0]  # continued, not redone


def test_a_task_pays_for_the_channels_it_opens_in_each_conv():
    """Gates after both convs of a residual block: parameters counted by hand."""
    from branchnas.models.gated import _prune_layer

    torch.manual_seed(7)
    blocks = [_cifar_block(8, 8, 1) for _ in range(3)]
    layer = GatedLayer(blocks[0], blocks[1:], channels=[8, 8, 8], identical_inputs=True, alpha_init=-1.0)
    with torch.no_grad():
        layer.alphas[0][0, :3] = 1.0   # task 0 computes channels 0-2 of conv1 itself, task 1 none
        layer.alphas[1][0, 0] = 1.0    # task 0 computes channel 0 of conv2 itself
        layer.alphas[1][1, :] = 1.0    # task 1 computes all of conv2 itself
    layer.eval()
    pruned, identical, summary = _prune_layer(layer, True)
    conv = 8 * 9  # one output channel of a 3x3 conv on 8 channels
    expected = (8 * conv + 16) + (3 * conv + 6)      # conv1: shared (task 1 takes all), task 0's 3
    expected += (7 * conv + 14) + (1 * conv + 2)     # conv2: shared (channels 1-7), task 0's 1
    expected += 8 * conv + 16                        # conv2: task 1's whole copy
    assert count_params(pruned) == expected
    assert not identical and [u["open"] for u in summary] == [[3, 0], [1, 8]]
    assert [u["shared_kept"] for u in summary] == [8, 7]
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        for a, b in zip(layer([x, x]), pruned.eval()([x, x]), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_gates_settings_key_only_the_gated_fine_tune():
    from branchnas.stages import get_stage

    finetune, compare = get_stage("finetune").config, get_stage("compare").config
    a, b = load_recipe(None, []), load_recipe(None, ["finetune.gated.sparsity=7"])
    assert finetune(a, {}) == finetune(b, {})  # a plain fine-tune is not redone
    assert compare(a, {}) != compare(b, {})  # compare's gated row is
    gated = ["finetune.variant=gated"]
    assert finetune(load_recipe(None, gated), {}) != finetune(load_recipe(None, [*gated, "finetune.gated.sparsity=7"]), {})
    plain_only = ["finetune.compare_variants=[\"plain\"]"]
    assert compare(load_recipe(None, plain_only), {}) == compare(load_recipe(None, [*plain_only, "finetune.gated.lr=1"]), {})


@pytest.mark.parametrize("scheme", ["uncertainty", "dwa", "rlw", "pcgrad", "gradnorm", "mgda", "graddrop", "imtl",
                                    "gradvac", "famo"])
def test_every_loss_weighting_trains_the_gates(scheme):
    """The gates' gradient survives every scheme (gradient surgery rewrites only the shared
    parameters' gradients; α and β are the variant's, outside them)."""
    from branchnas.recipe import FinetuneConfig
    from branchnas.tasks import Task
    from branchnas.training import Trainer
    from branchnas.variants import get_variant
    from branchnas.weighting import get_weighting

    recipe = load_recipe(None, ["finetune.gated.sparsity=0"])
    variant = get_variant("gated", recipe)
    backbones = _backbones(8, width=0.25)
    tasks = [Task(t, "classification", t, num_classes=2) for t in TASKS]
    net = variant.build(TREES["mixed"], backbones, _heads(backbones), init="first", tasks=TASKS)
    trainer = Trainer(net, tasks, FinetuneConfig(epochs=1, device="cpu"), batch_size=8, seed=0, variant=variant,
                      weighting=get_weighting(scheme, tasks, seed=0), progress=False)
    member = trainer.members[0]
    assert not {id(p) for p in net.gate_parameters()} & {id(p) for p in member.shared}
    trainer.total_steps, trainer.warmup_steps = 1, 0
    member.epoch_loss_sums = {t: 0.0 for t in TASKS}
    before = [a.detach().clone() for _, _, layer in net.gated_layers() for a in layer.alphas]
    images, targets = torch.randn(8, 3, 32, 32), {t: torch.randint(0, 2, (8,)) for t in TASKS}
    trainer._step_shared([member], images, targets, 0, 0, 0.01)
    grads = [a.grad for _, _, layer in net.gated_layers() for a in layer.alphas]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    after = [a.detach() for _, _, layer in net.gated_layers() for a in layer.alphas]
    for old, new, g in zip(before, after, grads, strict=True):  # plain SGD at the gate lr (10) x factor 1
        torch.testing.assert_close(new, old - 10.0 * g, rtol=1e-5, atol=1e-7)
