"""Stage 1 on tiny shapes data: artifacts, skipping, task subsets, loading, and a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from branchnas_cli.main import cli
from click.testing import CliRunner

from branchnas import pretrain
from branchnas.errors import UserError
from branchnas.pipeline import run_stages
from branchnas.recipe import load_recipe
from branchnas.rundir import RunDir
from branchnas.stages.pretrain import load_single_task

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "data.num_train=48", "data.num_val=16", "data.num_test=16", "data.batch_size=16",
    "data.options.size=16", "backbone.width=0.25", "pretrain.epochs=2",
    "tasks=[{name='shape', kind='classification'}, {name='depth', kind='depth'}, {name='floor', kind='attribute'}]",
]


def tiny_recipe(out: Path, *extra: str):
    return load_recipe(None, [*TINY, f"out={out}", *extra])


def run_pretrain(recipe, rundir, force=False, tasks=None, progress=False):
    """Stage 1 through the pipeline, as `branchnas pretrain` runs it."""
    options = {"pretrain": {"tasks": tasks}} if tasks else {}
    _, results = run_stages(recipe, ["pretrain"], force=["pretrain"] if force else [], options=options,
                            progress=progress, rundir=rundir)
    return results["pretrain"]


def test_stage_writes_models_and_metrics(tmp_path):
    recipe = tiny_recipe(tmp_path)
    rundir = RunDir(recipe.run_dir)
    result = run_pretrain(recipe, rundir, progress=False)
    assert not result["skipped"] and result["status"] == "done"
    folder = rundir.path / "pretrain"
    assert sorted(p.name for p in folder.glob("*.pt")) == ["depth.pt", "floor.pt", "shape.pt"]
    assert not (folder / "ckpt").exists()  # per-epoch checkpoints go once the models are written
    # Each model's training history as CSV, one row per epoch, declared in the stage's outputs.
    from branchnas.training.history import read_history_csv

    for name in ("depth", "floor", "shape"):
        assert f"pretrain/history-{name}.csv" in result["outputs"]
        history = torch.load(folder / f"{name}.pt", weights_only=True)["history"]
        rows = read_history_csv(folder / f"history-{name}.csv")
        assert [r["epoch"] for r in rows] == [h["epoch"] for h in history]
        assert [r[f"train_loss/{name}"] for r in rows] == [h["train_loss"][name] for h in history]
    written = json.loads((folder / "metrics.json").read_text())
    metrics = written["tasks"]
    assert list(metrics) == ["shape", "depth", "floor"]
    assert set(metrics["depth"]["test"]) == {"abs_err", "rmse"} and metrics["depth"]["metric"] == "abs_err"
    assert metrics["shape"]["higher_is_better"] is True and 0 <= metrics["shape"]["val"]["accuracy"] <= 1
    saved = torch.load(folder / "shape.pt", weights_only=True)
    assert {"task", "backbone", "head", "val", "test"} <= set(saved) and saved["task"] == "shape"
    assert saved["test"] == metrics["shape"]["test"]
    # The validation split's chance level, for unlearned_tasks, recomputed on that split.
    from branchnas.data import load_splits

    splits, tasks = load_splits(recipe)
    val_chance = pretrain.chance_metrics(tasks, splits["train"], splits["val"], 16)
    assert metrics["shape"]["num_val"] == len(splits["val"]) == recipe.data.num_val
    for name in ("shape", "depth", "floor"):
        assert metrics[name]["chance_val"] == pytest.approx(val_chance[name])
    # The rebuilt model reproduces the saved test accuracy.
    from branchnas.training import SingleTaskModel, evaluate

    backbone, head = load_single_task(recipe, rundir, "shape")
    model = SingleTaskModel(backbone, head, "shape")
    assert evaluate(model, [tasks[0]], splits["test"], 16)["shape"] == pytest.approx(saved["test"])
    table = pretrain.metrics_table(written)
    assert "abs_err ↓" in table and "accuracy ↑" in table


def test_bf16_training_reports_the_saved_models_fp32_metrics(tmp_path, monkeypatch):
    from branchnas.data import load_splits
    from branchnas.training import SingleTaskModel, evaluate, runtime

    # autocast works on any CPU (only slower where it has no bf16 in hardware)
    monkeypatch.setattr(runtime, "_cpu_bf16_native", lambda: True)
    monkeypatch.setattr(runtime, "_mkldnn_bf16", lambda: True)
    recipe = tiny_recipe(tmp_path, "pretrain.precision=bf16", "pretrain.epochs=1")
    rundir = RunDir(recipe.run_dir)
    run_pretrain(recipe, rundir)
    metrics = json.loads((rundir.path / "pretrain" / "metrics.json").read_text())["tasks"]
    splits, tasks = load_splits(recipe)
    trained = torch.load(rundir.path / "pretrain" / "shape.pt", weights_only=True)["history"]
    for task in tasks:
        model = SingleTaskModel(*load_single_task(recipe, rundir, task.name), task.name)
        for split in ("val", "test"):
            fp32 = evaluate(model, [task], splits[split], 16, precision="fp32")[task.name]
            assert metrics[task.name][split] == pytest.approx(fp32, rel=1e-6, abs=1e-9), (task.name, split)
    assert trained[-1]["val"]["shape"] is not None  # the per-epoch curve is still measured while training


def test_rerun_skips_and_force_retrains(tmp_path):
    recipe = tiny_recipe(tmp_path)
    rundir = RunDir(recipe.run_dir)
    run_pretrain(recipe, rundir, progress=False)
    stamp = (rundir.path / "pretrain" / "shape.pt").stat().st_mtime_ns
    assert run_pretrain(recipe, rundir, progress=False)["skipped"]
    assert (rundir.path / "pretrain" / "shape.pt").stat().st_mtime_ns == stamp
    assert not run_pretrain(recipe, rundir, force=True, progress=False)["skipped"]
    assert (rundir.path / "pretrain" / "shape.pt").stat().st_mtime_ns != stamp
    # A lost history CSV is an output gone missing: it is written again from the model, untrained.
    csv_path = rundir.path / "pretrain" / "history-shape.csv"
    kept, stamp = csv_path.read_text(), (rundir.path / "pretrain" / "shape.pt").stat().st_mtime_ns
    csv_path.unlink()
    assert not run_pretrain(recipe, rundir, progress=False)["skipped"]
    assert csv_path.read_text() == kept and (rundir.path / "pretrain" / "shape.pt").stat().st_mtime_ns == stamp


def test_task_subset_then_the_rest(tmp_path):
    recipe = tiny_recipe(tmp_path)
    rundir = RunDir(recipe.run_dir)
    result = run_pretrain(recipe, rundir, tasks=["floor", "shape"], progress=False)
    folder = rundir.path / "pretrain"
    assert sorted(p.name for p in folder.glob("*.pt")) == ["floor.pt", "shape.pt"]
    assert result["status"] == "running" and result["missing"] == ["depth"]
    stamp = (folder / "shape.pt").stat().st_mtime_ns
    result = run_pretrain(recipe, rundir, progress=False)
    assert result["status"] == "done" and not result["skipped"]
    assert (folder / "depth.pt").exists() and (folder / "shape.pt").stat().st_mtime_ns == stamp
    # A model does not depend on which others were trained with it.
    alone = tiny_recipe(tmp_path / "alone")
    run_pretrain(alone, RunDir(alone.run_dir), progress=False)
    for name in ("shape", "depth"):
        a = torch.load(folder / f"{name}.pt", weights_only=True)
        b = torch.load(alone.run_dir / "pretrain" / f"{name}.pt", weights_only=True)
        for key in a["backbone"]:
            assert torch.equal(a["backbone"][key], b["backbone"][key]), key


def test_unknown_task_and_missing_model_are_user_errors(tmp_path):
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(UserError, match="no task named 'shap' \\(did you mean 'shape'\\?\\)"):
        run_pretrain(recipe, RunDir(recipe.run_dir), tasks=["shap"], progress=False)
    with pytest.raises(UserError, match="run `branchnas pretrain` first"):
        load_single_task(recipe, RunDir(recipe.run_dir), "shape")


def test_chance_metrics_are_those_of_the_best_constant():
    from branchnas.data import TargetSpec, TensorDataset
    from branchnas.tasks import Task

    labels = np.array([0, 0, 0, 1, 2, 2])
    data = TensorDataset(np.zeros((6, 1, 2, 2), np.uint8), {"c": labels, "r": np.arange(6, dtype=np.float32).reshape(6, 1)},
                         {"c": TargetSpec("c", "classification", 3), "r": TargetSpec("r", "regression")},
                         mean=(0.0,), std=(1.0,), can_flip=False, name="toy")
    chance = pretrain.chance_metrics([Task("c", "classification", "c", 3), Task("r", "regression", "r")], data, data, 4)
    assert chance["c"]["accuracy"] == pytest.approx(0.5)
    assert chance["r"]["mae"] == pytest.approx(np.abs(np.arange(6) - 2.5).mean())



def test_unlearned_tasks_are_those_not_beating_the_constant_prediction_on_val():
    def entry(metric, higher, val, chance, n=None, chance_val=True):
        out = {"metric": metric, "higher_is_better": higher, "val": {metric: val}, "num_val": n}
        out["chance_val" if chance_val else "chance"] = {metric: chance}
        return out

    metrics = {"tasks": {
        # 2 s.e. of accuracy 0.5 on 500 images: 2 * sqrt(0.25 / 500) = 0.0447
        "parity": entry("accuracy", True, 0.544, 0.5, 500),       # 0.044 <= 0.0447: nothing learned
        "greater": entry("accuracy", True, 0.546, 0.5, 500),      # 0.046 > 0.0447: learned
        "rare": entry("accuracy", True, 0.95, 0.9, 100),          # 2 * sqrt(0.09 / 100) = 0.06 > 0.05
        "seg": entry("miou", True, 0.2, 0.2, 500),                # no margin off accuracy: equal is nothing
        "depth": entry("abs_err", False, 1.19, 1.2, 500),         # lower is better: learned
        "normals": entry("mean_angle", False, 34.0, 33.8, 500),   # worse than the constant
        "old": entry("accuracy", True, 0.51, 0.5, chance_val=False),  # test chance, no margin: learned
    }}
    out = pretrain.unlearned_tasks(metrics)
    assert sorted(out) == ["normals", "parity", "rare", "seg"]
    assert out["parity"] == "val accuracy 0.544 against 0.500 for a constant prediction (2 s.e. = 0.045)"
    assert out["rare"].endswith("(2 s.e. = 0.060)")
    assert out["seg"] == "val miou 0.200 against 0.200 for a constant prediction"
    # The terminal says it under the pretrain table (and under the chosen tree, for its tasks).
    warnings = pretrain.unlearned_warnings(metrics, ["parity", "depth"])
    assert warnings == ["warning: parity's single-task model learned nothing, " + out["parity"] + "; its "
                        "affinities may be noise, so where the tree puts it is not evidence: train longer "
                        "(pretrain.epochs) or check its labels"]

def test_cli_help_and_bad_task(in_tmp):
    runner = CliRunner()
    result = runner.invoke(cli, ["pretrain", "--help"])
    assert result.exit_code == 0 and "--tasks" in result.output
    from branchnas_cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["pretrain", *sum((["--set", s] for s in TINY), []), "--tasks", "dept"])
    assert info.value.code == 2


def _command(out: Path) -> list[str]:
    sets = [*TINY, "data.num_train=192", "pretrain.epochs=3", f"out={out}"]
    return [sys.executable, "-m", "branchnas", "pretrain", *sum((["--set", s] for s in sets), [])]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_matches_an_uninterrupted_run(tmp_path):
    # One thread: bitwise reproducibility across processes, and no oversubscribed cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_command(straight), env=env, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "shapes" / ".staging" / "pretrain" / "ckpt"  # work in progress is staged
    deadline = time.monotonic() + 240
    try:
        # The first epoch's checkpoints exist: the process is now inside epoch 2.
        while len(list(ckpt.glob("*.pt"))) < 3:
            assert proc.poll() is None, "the run ended before it could be killed; make it longer"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    states = {p.stem: torch.load(p, weights_only=True) for p in ckpt.glob("*.pt")}
    assert max(s["epoch"] for s in states.values()) < 3, "the kill came after the last epoch"
    assert not list((killed / "shapes" / "pretrain").glob("*.pt"))  # no model finished

    rerun = subprocess.run(_command(killed), env=env, check=True, capture_output=True, text=True, timeout=300)
    assert "models and metrics in" in rerun.stdout
    for name in ("shape", "depth", "floor"):
        a = torch.load(straight / "shapes" / "pretrain" / f"{name}.pt", weights_only=True)
        b = torch.load(killed / "shapes" / "pretrain" / f"{name}.pt", weights_only=True)
        for part in ("backbone", "head"):
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), f"{name} {part}.{key}"
        assert a["test"] == b["test"]
        # Continued, not redone: the first epoch's record (its wall time) is the killed run's.
        assert b["history"][0] == states[name]["history"][0]
        timing = ("seconds", "images_per_s")
        assert [b["history"][0][k] for k in timing] != [a["history"][0][k] for k in timing]
