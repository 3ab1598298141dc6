"""Machine-readable output (``--json``), progress bars only on a terminal, and the training CSVs.

The end-to-end tests share one tiny run (3 tasks, 16x16 shapes, ResNet-20 at width 1/4, two
epochs per training), driven through the command line: ``search --json`` trains stages 1 and 2
on first use, ``run --json`` finishes the pipeline, then ``report --json`` and ``compare --json``
read it back.
"""

from __future__ import annotations

import csv
import io
import json
import sys

import numpy as np
import pytest
import torch
from branchnas_cli._options import jsonable
from branchnas_cli.main import cli, main
from click.testing import CliRunner
from torch import nn

from branchnas import progress
from branchnas.data import TargetSpec, TensorDataset
from branchnas.heads import build_head
from branchnas.recipe import PretrainConfig
from branchnas.tasks import Task
from branchnas.training import SingleTaskModel, Trainer
from branchnas.training.history import read_history_csv, write_history_csv

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")

TASKS = ('tasks=[{name="shape", kind="classification"}, {name="colour", kind="classification"}, '
         '{name="segmentation", kind="segmentation"}]')
NAMES = ["shape", "colour", "segmentation"]
#: What a tqdm bar always writes ("  50%|█████     | 1/2 ...").
BAR = "%|"


def tiny_overrides(out, name="tiny", *extra):
    return [
        f"out={json.dumps(str(out))}", f"name={name}", TASKS,
        "data.num_train=64", "data.num_val=32", "data.num_test=32", "data.batch_size=32",
        "data.options={size = 16}", "backbone.width=0.25",
        "pretrain.epochs=2", "finetune.epochs=2", "affinity.images=16", "affinity.batch_size=32",
        "pretrain.device=cpu", "finetune.device=cpu", *extra,
    ]


def sets(overrides):
    return [arg for item in overrides for arg in ("--set", item)]


def invoke(*args):
    """The command line in-process; stdout and stderr apart (CliRunner's stderr is not a terminal)."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def parse(result):
    """stdout must be exactly one JSON document (json.loads refuses anything around it)."""
    return json.loads(result.stdout)


@pytest.fixture(autouse=True)
def not_quiet():
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def searched(out):
    """``branchnas search --json`` on a fresh run directory (trains pretrain and affinity)."""
    return invoke("search", "--json", "--budget", "40k", *sets(tiny_overrides(out)))


@pytest.fixture(scope="module")
def finished(out, searched):
    """``branchnas run --json`` on the searched run: fine-tunes and exports."""
    return invoke("run", "--json", *sets(tiny_overrides(out, "tiny", 'search.budget="40k"')))


# --------------------------------------------------------------------------- the pieces


def test_show_progress_needs_a_request_a_terminal_and_no_quiet(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert progress.show_progress(True) and progress.show_progress()
    assert not progress.show_progress(False)
    progress.set_quiet(True)
    assert not progress.show_progress(True) and progress.is_quiet()
    progress.set_quiet(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.show_progress(True)
    monkeypatch.setattr(sys, "stderr", None)
    assert not progress.show_progress(True)


def _toy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 32)
    images = rng.integers(0, 255, (32, 3, 8, 8)).astype(np.uint8)
    specs = {"colour": TargetSpec("colour", "classification", 3)}
    data = TensorDataset(images, {"colour": labels.astype(np.int64)}, specs, mean=(0.5,) * 3, std=(0.25,) * 3,
                         can_flip=True, name="toy")
    task = Task("colour", "classification", "colour", num_classes=3)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    model = SingleTaskModel(backbone, build_head(task, 4, 1, (8, 8)), task.name)
    cfg = PretrainConfig(epochs=2, lr=0.01, optimizer="sgd", momentum=0.9, weight_decay=0.0, schedule="cosine",
                         warmup_epochs=0, patience=0, grad_clip=0.0, device="cpu")
    return data, task, model, cfg


@pytest.mark.parametrize(("tty", "quiet", "drawn"), [(True, False, True), (False, False, False), (True, True, False)])
def test_the_trainer_draws_its_bar_only_on_a_terminal_and_not_quiet(monkeypatch, tty, quiet, drawn):
    class Stream(io.StringIO):
        def isatty(self):
            return tty

    stream = Stream()
    monkeypatch.setattr(sys, "stderr", stream)
    progress.set_quiet(quiet)
    data, task, model, cfg = _toy()
    history = Trainer(model, [task], cfg, batch_size=16, seed=0, progress=True).fit(data, data)["history"]
    assert len(history) == 2
    assert (BAR in stream.getvalue()) == drawn, stream.getvalue()


def test_history_csv_flattens_each_epoch_and_reads_back_exactly(tmp_path):
    history = [
        {"epoch": 1, "train_loss": {"a": 0.5, "b": 1 / 3}, "val": {"a": {"accuracy": 0.25}, "b": {"rmse": 2.0}},
         "lr": 0.1, "seconds": 1.5, "images_per_s": 100.0, "weights": {"a": 1.0, "b": 1.0}},
        {"epoch": 2, "train_loss": {"a": 0.25, "b": 0.1}, "val": None,
         "lr": 0.05, "seconds": 1.25, "images_per_s": 120.5, "weights": {"a": 1.0, "b": 1.0}, "regulariser": 0.0},
    ]
    path = write_history_csv(tmp_path / "history.csv", history)
    with open(path, newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["epoch", "lr", "seconds", "images_per_s", "train_loss/a", "train_loss/b",
                      "val/a/accuracy", "val/b/rmse", "weights/a", "weights/b", "regulariser"]
    rows = read_history_csv(path)
    assert len(rows) == 2
    assert rows[0]["train_loss/b"] == 1 / 3 and rows[0]["val/a/accuracy"] == 0.25 and rows[0]["regulariser"] is None
    assert rows[1]["val/a/accuracy"] is None and rows[1]["lr"] == 0.05
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]  # written atomically: no temp file left


def test_listings_as_json_and_nothing_else_on_stdout():
    tasks = parse(invoke("tasks", "--json"))
    kinds = {k["name"]: k for k in tasks["kinds"]}
    assert {"classification", "segmentation", "depth"} <= set(kinds)
    assert kinds["segmentation"]["metrics"][0] == {"name": "miou", "higher_is_better": True, "primary": True}
    assert set(kinds["depth"]) == {"name", "loss", "losses", "metrics", "dense", "output", "target"}
    assert [k["name"] for k in parse(invoke("tasks", "depth", "--json"))["kinds"]] == ["depth"]

    families = {f["name"]: f for f in parse(invoke("datasets", "--json"))["families"]}
    shapes = families["shapes"]
    assert shapes["needs_root"] is False and shapes["layout"] is None
    targets = {t["name"]: t for t in shapes["targets"]}
    assert targets["shape"] == {"name": "shape", "kind": "classification", "num_classes": 5, "channels": 1,
                                "description": targets["shape"]["description"], "default": True}
    assert any(o["name"] == "size" and o["default"] == 32 and o["doc"] for o in shapes["options"])
    assert [f["name"] for f in parse(invoke("datasets", "shapes", "--json"))["families"]] == ["shapes"]

    backbones = parse(invoke("backbones", "resnet20", "--size", "16", "--json"))
    assert backbones["size"] == [16, 16] and backbones["granularity"] == "stage"
    (entry,) = backbones["backbones"]
    assert entry["name"] == "resnet20" and entry["depth"]["stage"] == len(entry["points"]) - 1
    assert entry["points"][0]["point"] == "stem"
    assert entry["params"] == sum(p["params"] for p in entry["points"])
    assert all(isinstance(p["flops"], int) for p in entry["points"])


def test_json_errors_are_one_line_on_stderr_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["search", "--json", "--budget", "1k", *sets(tiny_overrides(tmp_path / "runs"))])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: search.budget") and "below the smallest tree" in lines[0]
    with pytest.raises(SystemExit) as exc:
        main(["tasks", "--json", "nope"])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.out == "" and captured.err.startswith("Error: unknown task kind 'nope'")


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_search_json_holds_the_chosen_tree_and_the_runners_up(searched, out):
    data = parse(searched)
    assert {"run_dir", "skipped", "tree", "cost", "params", "flops", "metric", "budget", "mode", "ranked",
            "runners_up", "extremes", "pareto", "files"} <= set(data)
    assert data["skipped"] is False and data["metric"] == "params" and data["budget"] == 40_000
    assert data["tree"]["tasks"] == NAMES and len(data["tree"]["partitions"]) == len(data["tree"]["points"])
    assert data["params"] <= 40_000 and data["ranked"][0]["params"] == data["params"]
    assert data["ranked"][0]["cost"] == data["cost"]
    assert set(data["extremes"]) == {"all_shared", "all_separate"}
    saved = json.loads((out / "tiny" / "search" / "tree.json").read_text())
    assert data["runners_up"] == saved["runners_up"] and data["ranked"] == saved["ranked"]
    assert str(out / "tiny" / "search" / "tree.json") in data["files"]
    # Training happened (pretrain, affinity) but no bar reached stderr: it is not a terminal.
    assert BAR not in searched.stderr


@pytest.mark.slow
def test_search_json_again_is_skipped_and_stdout_holds_only_the_json(searched, out):
    again = invoke("search", "--json", "--no-pareto", "--budget", "40k", *sets(tiny_overrides(out)))
    data = parse(again)
    assert data["skipped"] is True and "pareto" not in data
    assert data["tree"] == parse(searched)["tree"]
    assert "already done" in again.stderr and "already done" not in again.stdout
    text = invoke("search", "--budget", "40k", *sets(tiny_overrides(out)))
    assert "already done" in text.stdout and "Pareto front" in text.stdout  # the text output is as it was


@pytest.mark.slow
def test_run_json_gives_every_stage_and_the_summary(finished, searched, out):
    data = parse(finished)
    assert data["run_dir"] == str(out / "tiny")
    assert list(data["stages"]) == ["pretrain", "affinity", "search", "finetune", "export"]
    assert all(s["status"] == "done" for s in data["stages"].values())
    assert [n for n, s in data["stages"].items() if s["skipped"]] == ["pretrain", "affinity", "search"]
    assert "finetune/history.csv" in data["stages"]["finetune"]["outputs"]
    summary = data["summary"]
    report = json.loads((out / "tiny" / "finetune" / "report.json").read_text())
    assert summary["tree"] == parse(searched)["tree"]
    assert summary["params"] == report["params"] and summary["flops"] == report["flops"]
    assert list(summary["tasks"]) == NAMES
    for name in NAMES:
        entry = summary["tasks"][name]
        assert entry["test"] == report["test"][name] and entry["single_task"] == report["single_task"]["test"][name]
    assert summary["delta_mtl"] == jsonable(report["delta_mtl"])  # a NaN would be written as null
    assert summary["export"]["path"].endswith("model.pt") and summary["report"].endswith("report.md")
    assert BAR not in finished.stderr and "run directory:" in finished.stderr


@pytest.mark.slow
def test_quiet_drops_the_progress_messages(finished, out):
    result = invoke("--quiet", "run", *sets(tiny_overrides(out, "tiny", 'search.budget="40k"')))
    assert "run directory:" not in result.stderr and "unchanged, skipped" not in result.stderr
    assert "Chosen tree:" in result.stdout


@pytest.mark.slow
def test_report_json_gives_the_path_and_the_same_summary(finished, out):
    data = parse(invoke("report", str(out / "tiny"), "--json"))
    assert data["report"] == str(out / "tiny" / "report.md")
    assert data["summary"] == parse(finished)["summary"]


@pytest.mark.slow
def test_compare_json_is_compare_json(finished, out):
    result = invoke("compare", "--json", "--variants", "plain",
                    *sets(tiny_overrides(out, "tiny", 'search.budget="40k"')))
    data = parse(result)
    saved = json.loads((out / "tiny" / "compare" / "compare.json").read_text())
    assert {k: v for k, v in data.items() if k not in ("run_dir", "skipped")} == jsonable(saved)
    assert data["skipped"] is False
    assert [r["name"] for r in data["rows"]][:3] == ["single-task", "all-shared", "chosen"]
    assert "compare: up to" in result.stderr and BAR not in result.stderr
    # compare's own fine-tunes log their epochs too.
    rows = read_history_csv(out / "tiny" / "compare" / "all-shared" / "history.csv")
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    # report.md now holds the comparison, as after `branchnas run`.
    assert "Compared models (`branchnas compare`)" in (out / "tiny" / "report.md").read_text()


def _same(a, b):
    return a == b or (a != a and b != b)  # NaN equals NaN here


def _assert_csv_matches(path, history):
    """One row per epoch, each value exactly the history's."""
    rows = read_history_csv(path)
    assert len(rows) == len(history)
    for row, entry in zip(rows, history, strict=True):
        for key in ("epoch", "lr", "seconds", "images_per_s"):
            assert _same(row[key], entry[key]), key
        for task, loss in entry["train_loss"].items():
            assert _same(row[f"train_loss/{task}"], loss)
        for task, metrics in entry["val"].items():
            for metric, value in metrics.items():
                assert _same(row[f"val/{task}/{metric}"], value), f"val/{task}/{metric}"


@pytest.mark.slow
def test_every_training_writes_its_history_as_csv(finished, out):
    from branchnas.rundir import RunDir

    run = out / "tiny"
    report = json.loads((run / "finetune" / "report.json").read_text())
    assert len(report["training"]["history"]) == 2
    _assert_csv_matches(run / "finetune" / "history.csv", report["training"]["history"])
    manifest = RunDir(run).manifest()["stages"]
    assert "finetune/history.csv" in manifest["finetune"]["outputs"]
    for name in NAMES:
        saved = torch.load(run / "pretrain" / f"{name}.pt", weights_only=True)
        _assert_csv_matches(run / "pretrain" / f"history-{name}.csv", saved["history"])
        assert f"pretrain/history-{name}.csv" in manifest["pretrain"]["outputs"]
    with open(run / "pretrain" / "history-shape.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:6] == ["epoch", "lr", "seconds", "images_per_s", "train_loss/shape", "val/shape/accuracy"]
