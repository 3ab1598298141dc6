"""Stage 4 (finetune), ``branchnas compare`` and the export stage, end to end on tiny data.

The slow tests share one tiny run (3 tasks, 16x16 shapes, ResNet-20 at width 1/4, one epoch
per stage); the fast ones check the pieces that need no run.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from branchnas_cli.main import cli
from click.testing import CliRunner

from branchnas import compare, export, finetune
from branchnas.errors import UserError
from branchnas.pipeline import open_run, run_stages
from branchnas.recipe import load_recipe
from branchnas.stages import get_stage
from branchnas.stages.finetune import load_finetuned
from branchnas.tasks import Task, delta_mtl

# torch marks TorchScript as deprecated; it is still the format plain PyTorch loads.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")

TASKS = ('tasks=[{name="shape", kind="classification"}, {name="colour", kind="classification"}, '
         '{name="segmentation", kind="segmentation"}]')


def tiny_overrides(out, name="tiny", *extra):
    return [
        f"out={json.dumps(str(out))}", f"name={name}", TASKS,
        "data.num_train=64", "data.num_val=32", "data.num_test=32", "data.batch_size=32",
        "data.options={size = 16}", "backbone.width=0.25",
        "pretrain.epochs=1", "finetune.epochs=1", "affinity.images=16", "affinity.batch_size=32",
        "pretrain.device=cpu", "finetune.device=cpu",
        # Between the all-shared (20k) and all-separate (54k) sizes, so the chosen tree is mixed.
        "search.budget=40k", *extra,
    ]


def run_stage(recipe, rundir, stage, force=False):
    """One stage through the pipeline (earlier ones run first if not done), as its command does."""
    return run_stages(recipe, [stage], force=[stage] if force else [], rundir=rundir, progress=False)[1][stage]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run up to stage 4: (recipe, rundir, stage result)."""
    out = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(None, tiny_overrides(out))
    rundir = open_run(recipe)
    result = run_stage(recipe, rundir, "finetune")
    return recipe, rundir, result


def tasks_of(report):
    return [Task(**{k: t[k] for k in ("name", "kind", "target", "num_classes", "channels", "weight", "loss_name")})
            for t in report["tasks"]]


# --------------------------------------------------------------------------- fast


def test_stage_config_leaves_out_compare_only_keys_and_the_device():
    a = load_recipe(None, ["finetune.compare_random=3", "finetune.device=cpu"])
    b = load_recipe(None, ["finetune.compare_random=0"])
    stage_config = get_stage("finetune").config
    assert stage_config(a, {}) == stage_config(b, {})
    assert get_stage("compare").config(a, {}) != get_stage("compare").config(b, {})
    assert stage_config(load_recipe(None, ["finetune.lr=0.5"]), {}) != stage_config(b, {})


def test_rebuild_refuses_other_files():
    with pytest.raises(UserError, match="expected a fine-tuned model of format branchnas.branched/1"):
        finetune.rebuild({"format": "something else"})


def test_report_table_is_aligned_and_signed():
    report = {
        "tasks": [{"name": "shape", "metric": "accuracy", "higher_is_better": True},
                  {"name": "depth", "metric": "abs_err", "higher_is_better": False}],
        "single_task": {"test": {"shape": {"accuracy": 0.5}, "depth": {"abs_err": 2.0}}},
        "test": {"shape": {"accuracy": 0.6}, "depth": {"abs_err": 1.0}},
        "delta_per_task": {"shape": 0.2, "depth": 0.5},
        "delta_mtl": 0.35, "params": 1_234_567, "flops": 2_000_000_000,
    }
    lines = finetune.report_table(report).splitlines()
    assert lines[0].split() == ["task", "metric", "single-task", "branched", "Δ", "(%)"]
    assert lines[2].split() == ["shape", "accuracy", "↑", "0.5000", "0.6000", "+20.00"]
    assert lines[3].split() == ["depth", "abs_err", "↓", "2.0000", "1.0000", "+50.00"]
    assert lines[-1].startswith("params 1.23M   FLOPs 2G") and "Δ_MTL +35.00% (test)" in lines[-1]
    assert len({len(line) for line in lines[:4]}) == 1  # aligned columns


# --------------------------------------------------------------------------- slow: stage 4


@pytest.mark.slow
def test_finetune_writes_the_report_and_a_rebuildable_model(run):
    recipe, rundir, result = run
    folder = rundir.path / "finetune"
    assert not result["skipped"]
    assert sorted(result["outputs"]) == ["finetune/history.csv", "finetune/model.pt", "finetune/report.json"]
    report = json.loads((folder / "report.json").read_text())
    # The training history as CSV: one row per epoch, the report's values.
    from branchnas.training.history import read_history_csv

    rows = read_history_csv(folder / "history.csv")
    assert [r["epoch"] for r in rows] == [h["epoch"] for h in report["training"]["history"]]
    assert [r["train_loss/shape"] for r in rows] == [h["train_loss"]["shape"] for h in report["training"]["history"]]
    tasks = tasks_of(report)
    assert [t.name for t in tasks] == ["shape", "colour", "segmentation"]
    # Δ_MTL is recomputed from the files alone: the report's test metrics and stage 1's.
    baseline = {n: e["test"] for n, e in json.loads((rundir.path / "pretrain" / "metrics.json").read_text())["tasks"].items()}
    assert report["delta_mtl"] == pytest.approx(delta_mtl(report["test"], baseline, tasks), abs=1e-12)
    assert report["delta_mtl"] == pytest.approx(sum(report["delta_per_task"].values()) / 3, abs=1e-12)
    assert report["single_task"]["test"] == baseline
    assert result["delta_mtl"] == report["delta_mtl"]
    # The tree is the search's, and the size is the cost model's size of that tree.
    tree = finetune.load_tree(rundir.path / "search" / "tree.json")
    assert report["partitions"] == tree.named_partitions()
    assert tree.groups_per_point() not in [(1, 1, 1), (3, 3, 3)]  # mixed: the budget is 40k
    from branchnas.cost import block_costs
    from branchnas.stages.pretrain import load_single_task

    pairs = {t.name: load_single_task(recipe, rundir, t.name) for t in tasks}
    costs = block_costs(pairs["shape"][0], {n: p[1] for n, p in pairs.items()}, (16, 16))
    assert report["params"] == costs.size(list(tree.groups_per_point()), "params")
    assert report["flops"] == costs.size(list(tree.groups_per_point()), "flops")


def test_finetune_aligns_exactly_the_places_its_report_lists(run):
    """The stage's report lists the change of basis it made; the weights it changed are those
    listed as kept, and ``finetune.align_images = 0`` leaves the copied weights as they were."""
    from branchnas.data import load_splits

    recipe, rundir, _ = run
    report = json.loads((rundir.path / "finetune" / "report.json").read_text())
    tree = finetune.load_tree(rundir.path / "search" / "tree.json")
    train = load_splits(recipe)[0]["train"]
    aligned = finetune.build_branched(recipe, rundir, tree, train=train)
    off = dataclasses.replace(recipe, finetune=dataclasses.replace(recipe.finetune, align_images=0))
    copied = finetune.build_branched(off, rundir, tree, train=train)
    assert copied.alignment == {}
    assert report["init_alignment"] == json.loads(json.dumps(aligned.alignment))
    assert any(e["kept"] for e in report["init_alignment"].values())  # the mixed tree reads foreign features
    kept = {name for name, e in aligned.alignment.items() if e["kept"]}
    places = [(name, aligned.nodes[name], copied.nodes[name]) for name, _ in aligned.plan]
    places += [(f"head:{t}", aligned.heads[t], copied.heads[t]) for t in aligned.task_names]
    for name, new, old in places:
        same = all(torch.equal(v, old.state_dict()[k]) for k, v in new.state_dict().items())
        assert same == (name not in kept), name
    # report.md names the places where the fold was kept, and only those
    from branchnas.report import write_report

    text = write_report(rundir).read_text()
    line = next(x for x in text.splitlines() if "change of basis was folded into" in x)
    assert f"folded into {len(kept)} of them" in line
    assert {name for name, _, _ in places if f" {name} " in line} == kept


def assert_reproduces_test_metrics(recipe, net, report):
    """``net`` (the rebuilt saved model) gives the test metrics ``report`` says it was evaluated at."""
    from branchnas.data import load_splits
    from branchnas.training import evaluate

    splits, tasks = load_splits(recipe)
    measured = evaluate(net, tasks, splits["test"], 32)
    for task in tasks:
        for metric, value in report["test"][task.name].items():
            assert measured[task.name][metric] == pytest.approx(value, abs=1e-6), (task.name, metric)


@pytest.mark.slow
def test_the_saved_model_reproduces_the_reported_metrics(run):
    recipe, rundir, _ = run
    report = json.loads((rundir.path / "finetune" / "report.json").read_text())
    assert_reproduces_test_metrics(recipe, load_finetuned(rundir), report)


@pytest.mark.slow
def test_central_init_takes_each_group_from_its_most_central_task(run):
    import numpy as np

    from branchnas.models import source_task
    from branchnas.stages.pretrain import load_single_task

    recipe, rundir, _ = run
    tree = finetune.load_tree(rundir.path / "search" / "tree.json")
    names = list(tree.tasks)
    with np.load(rundir.path / "affinity" / "affinity.npz") as data:
        order = [[str(t) for t in data["tasks"]].index(n) for n in names]
        affinity = data["affinity"][:, order][:, :, order]
    net = finetune.build_branched(recipe, rundir, tree, init="central")
    backbones = {n: load_single_task(recipe, rundir, n)[0] for n in names}
    for name, group in net.node_groups.items():
        d = int(name[1:].split("_")[0])
        source = source_task(group, d, "central", affinity, names)
        for key, value in net.nodes[name].state_dict().items():
            assert torch.equal(value, backbones[source].blocks[d].state_dict()[key]), (name, key)


@pytest.mark.slow
def test_a_second_run_is_skipped(run):
    recipe, rundir, _ = run
    assert run_stage(recipe, rundir, "finetune")["skipped"]


@pytest.mark.slow
def test_a_killed_finetune_resumes_to_the_same_result(run, monkeypatch):
    from branchnas import training

    recipe, rundir, _ = run
    recipe2 = load_recipe(None, tiny_overrides(rundir.path.parent, "tiny", "finetune.epochs=2"))
    real_save = training.Trainer._save
    saves = []

    def kill_after_first_epoch(self, member):
        real_save(self, member)
        saves.append(member.epoch)
        raise KeyboardInterrupt

    monkeypatch.setattr(training.Trainer, "_save", kill_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_stage(recipe2, rundir, "finetune")
    monkeypatch.setattr(training.Trainer, "_save", real_save)
    assert saves == [1]
    assert rundir.stage_entry("finetune")["status"] == "running"
    assert (rundir.path / ".staging" / "finetune" / "ckpt" / "model.pt").exists()
    real_epoch = training.Trainer._epoch
    epochs_run = []

    def count_epochs(self, group, train, val, epoch, bar):
        epochs_run.append(epoch)
        return real_epoch(self, group, train, val, epoch, bar)

    monkeypatch.setattr(training.Trainer, "_epoch", count_epochs)
    resumed = run_stage(recipe2, rundir, "finetune")
    assert not resumed["skipped"]
    assert epochs_run == [1]  # resumed at the second epoch, not started over
    report = json.loads((rundir.path / "finetune" / "report.json").read_text())
    assert [h["epoch"] for h in report["training"]["history"]] == [1, 2]
    # The same tree fine-tuned without interruption ends with the same metrics (CPU is deterministic).
    tree = finetune.load_tree(rundir.path / "search" / "tree.json")
    fresh = finetune.finetune_tree(recipe2, rundir, tree, rundir.path / "uninterrupted", desc="check")
    assert epochs_run == [1, 0, 1]
    assert fresh["test"] == report["test"]
    # Put stage 4 back as the other tests expect it (1 epoch).
    run_stage(recipe, rundir, "finetune")


@pytest.mark.slow
def test_cli_finetune_prints_the_table(run, monkeypatch):
    recipe, rundir, _ = run
    args = ["finetune"]
    for item in tiny_overrides(rundir.path.parent):
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "already done" in result.output
    assert "single-task" in result.output and "Δ_MTL" in result.output
    for name in ("shape", "colour", "segmentation"):
        assert name in result.output


# --------------------------------------------------------------------------- slow: compare


@pytest.mark.slow
def test_compare_writes_json_and_markdown(run):
    recipe, rundir, _ = run
    recipe = load_recipe(None, tiny_overrides(rundir.path.parent, "tiny", "finetune.compare_random=1",
                                              'finetune.compare_weightings=["uncertainty", "famo", "mgda"]'))
    run_stage(recipe, rundir, "compare")
    data = json.loads((rundir.path / "compare" / "compare.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names[:3] == ["single-task", "all-shared", "chosen"]
    rows = {r["name"]: r for r in data["rows"]}
    chosen = json.loads((rundir.path / "finetune" / "report.json").read_text())
    assert rows["chosen"]["test"] == chosen["test"] and rows["chosen"]["params"] == chosen["params"]
    assert rows["single-task"]["delta_mtl"] == 0.0
    assert rows["single-task"]["params"] >= rows["chosen"]["params"] >= rows["all-shared"]["params"]
    assert rows["all-shared"]["partitions"] == [[["shape", "colour", "segmentation"]]] * 3
    # The chosen tree under every other variant (finetune.compare_variants defaults to all four).
    assert {rows[f"chosen ({v})"]["variant"] for v in ("gated", "fused", "attentive")} == {"gated", "fused", "attentive"}
    # FLOPs of one task's pass alone: the all-separate tree's passes add up to its total, the stem
    # counted once; the attentive network runs one pass per task, so its total is made the same way.
    n = len(data["tasks"])
    attentive = json.loads((rundir.path / "compare" / "chosen-attentive" / "report.json").read_text())
    passes = attentive["flops_per_task_pass"]
    assert rows["chosen (attentive)"]["flops_per_task"] == pytest.approx(sum(passes.values()) / n)
    assert sum(passes.values()) > rows["chosen (attentive)"]["flops"]  # the stem runs once, not n times
    single = rows["single-task"]
    assert single["flops_per_task"] * n > single["flops"] > single["flops_per_task"]
    for row in data["rows"]:
        assert row["flops_per_task"] is not None and row["flops_per_task"] <= row["flops"]
    assert "FLOPs/task" in (rundir.path / "compare" / "compare.md").read_text()
    gated = rows["chosen (gated)"]
    assert gated["kind"] == "variant" and gated["variant"] == "gated" and rows["chosen"]["variant"] == "plain"
    assert gated["partitions"] == rows["chosen"]["partitions"]
    saved = json.loads((rundir.path / "compare" / "chosen-gated" / "report.json").read_text())
    assert gated["params"] == saved["params"] and saved["variant"] == "gated"
    assert gated["within_budget"] == (saved["params"] <= 40_000)
    assert ("over the budget" in gated["note"]) == (not gated["within_budget"])
    # One row per other loss weighting (uncertainty is the recipe's own: the chosen row), same tree.
    weighted = [r for r in data["rows"] if r["kind"] == "weighting"]
    assert [r["weighting"] for r in weighted] == ["famo", "mgda"]
    for row in weighted:
        saved = json.loads((rundir.path / "compare" / f"weighting-{row['weighting']}" / "report.json").read_text())
        assert saved["weighting"] == row["weighting"] and row["partitions"] == rows["chosen"]["partitions"]
        assert row["test"] == saved["test"] and row["seconds_per_epoch"] > 0
    assert (rundir.path / "compare" / "weightings.png").read_bytes()[:4] == b"\x89PNG"
    randoms = [r for r in data["rows"] if r["kind"] == "random"]
    assert len(randoms) == 1
    for row in randoms:
        assert abs(row["params"] - chosen["params"]) <= 0.1 * chosen["params"]
        assert row["partitions"] != chosen["partitions"]
    md = (rundir.path / "compare" / "compare.md").read_text()
    assert "| model" in md and "Δ_MTL (%) ↑" in md and "## Trees" in md
    for name in names:
        assert f"| {name}" in md
    table = compare.comparison_table(data).splitlines()
    assert table[0].split()[:3] == ["model", "#params", "FLOPs"] and table[0].split()[-1] == "s/epoch"


# --------------------------------------------------------------------------- slow: export


@pytest.mark.slow
def test_export_stage_writes_a_checked_file_with_metadata(run):
    recipe, rundir, _ = run
    result = run_stage(recipe, rundir, "export")
    path = rundir.path / "export" / "model.pt"
    assert result["path"] == str(path.resolve()) and path.exists()
    assert result["checked"] and max(result["max_abs_diff"].values()) <= recipe.export.atol
    meta = export.read_metadata(path)
    report = json.loads((rundir.path / "finetune" / "report.json").read_text())
    assert meta["task_names"] == ["shape", "colour", "segmentation"]
    assert meta["partitions"] == report["partitions"]
    assert meta["input"]["shape"] == ["B", 3, 16, 16]
    model = torch.jit.load(str(path))
    x = torch.randn(2, 3, 16, 16)
    eager = load_finetuned(rundir)
    with torch.no_grad():
        for name, value in model(x).items():
            torch.testing.assert_close(value, eager(x)[name], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_cli_export_from_a_run_directory(run, tmp_path):
    _, rundir, _ = run
    target = tmp_path / "model.pt"
    result = CliRunner().invoke(cli, ["export", str(rundir.path), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.exists() and "checked in a clean process without branchnas" in result.output
    assert export.read_metadata(target)["task_names"] == ["shape", "colour", "segmentation"]


@pytest.mark.slow
def test_export_stage_writes_every_format_asked_for(run):
    recipe, rundir, _ = run
    recipe = load_recipe(None, tiny_overrides(rundir.path.parent, "tiny", 'export.format=["torchscript", "torch.export", "onnx"]'))
    result = run_stage(recipe, rundir, "export")
    assert list(result["formats"]) == ["torchscript", "torch.export", "onnx"]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        eager = load_finetuned(rundir)(x)
    program = torch.export.load(str(rundir.path / "export" / "model.pt2")).module()
    for entry in result["formats"].values():
        assert entry["checked"] and max(entry["max_abs_diff"].values()) <= recipe.export.atol
        assert export.read_metadata(entry["path"])["task_names"] == ["shape", "colour", "segmentation"]
    for name, value in program(x).items():
        torch.testing.assert_close(value, eager[name], rtol=0, atol=1e-5)
    assert sorted(p.name for p in (rundir.path / "export").iterdir()) == ["model.onnx", "model.pt", "model.pt2"]
    run_stage(load_recipe(None, tiny_overrides(rundir.path.parent, "tiny")), rundir, "export")  # as the others expect


@pytest.mark.slow
def test_report_lists_an_unchecked_export(run):
    from branchnas.report import write_report

    recipe, rundir, _ = run
    unchecked = load_recipe(None, tiny_overrides(rundir.path.parent, "tiny", "export.check=false"))
    run_stage(unchecked, rundir, "export")
    text = write_report(rundir).read_text()
    assert "- torchscript: `" in text and "not checked (export.check = false)" in text
    run_stage(recipe, rundir, "export")  # as the other tests expect
    assert "max abs difference to eager" in write_report(rundir).read_text()


def test_a_latency_budget_is_not_claimed_checked_by_the_fine_tune(tmp_path, monkeypatch):
    """The fine-tune measures params and FLOPs, not latency: a latency budget is left unchecked."""
    from types import SimpleNamespace

    from branchnas.stages import search

    result = SimpleNamespace(metric="latency", budget=0.002)
    monkeypatch.setattr(search, "read_result", lambda rundir: (result, {}))
    check = finetune._budget_check(None, {"params": 10, "flops": 20})
    assert check == {"metric": "latency", "limit": 0.002, "size": None, "within": None}
    result.metric = "params"
    assert finetune._budget_check(None, {"params": 10, "flops": 20})["within"] is False
    report = {"tasks": [], "single_task": {"test": {}}, "test": {}, "delta_per_task": {}, "params": 10, "flops": 20,
              "delta_mtl": 0.0, "budget": check}
    assert "budget" not in finetune.report_table(report)


@pytest.mark.slow
def test_tensorboard_log_holds_the_history(run, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe, rundir, _ = run
    tree = finetune.load_tree(rundir.path / "search" / "tree.json")
    logged = load_recipe(None, tiny_overrides(rundir.path.parent, "tiny", "finetune.log=tensorboard", "finetune.epochs=2"))
    report = finetune.finetune_tree(logged, rundir, tree, tmp_path / "tb-run", desc="tb")
    events = EventAccumulator(str(tmp_path / "tb-run" / "tensorboard"))
    events.Reload()
    history = report["training"]["history"]
    for tag, pick in [("train_loss/shape", lambda h: h["train_loss"]["shape"]),
                      ("val/segmentation/miou", lambda h: h["val"]["segmentation"]["miou"])]:
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([pick(h) for h in history], rel=1e-6)


def test_tensorboard_without_its_package_is_refused_before_any_work(tmp_path, monkeypatch):
    import importlib

    from branchnas.errors import UserError
    from branchnas.pipeline import check

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "tensorboard" else real(name, *a, **k))
    recipe = load_recipe(None, tiny_overrides(tmp_path, "tiny", "pretrain.log=tensorboard"))
    with pytest.raises(UserError, match=r"pip install 'branchnas\[tensorboard\]'"):
        check(recipe, ["pretrain"])
    assert not (tmp_path / "tiny").exists()
