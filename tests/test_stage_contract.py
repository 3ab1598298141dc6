"""The stage contract: declared dependencies, checks before any work, verified inputs, outputs
replaced only on success, exploration that never discards a fine-tuned network.

Each refusal is checked three ways: exit status 2, one ``Error:`` line and no traceback, and the
run directory's files byte for byte as they were.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from branchnas_cli.main import main

from branchnas.errors import DataError, UserError
from branchnas.pipeline import plan, run_pipeline, run_stages
from branchnas.recipe import load_recipe
from branchnas.rundir import RunDir
from branchnas.stages import REGISTRY, Stage, get_stage, register_stage, stage_names

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ('tasks=[{name="shape", kind="classification"}, {name="colour", kind="classification"}, '
         '{name="segmentation", kind="segmentation"}]')


def tiny(out: Path, *extra: str) -> list[str]:
    return [
        f"out={json.dumps(str(out))}", "name=tiny", TASKS,
        "data.num_train=64", "data.num_val=32", "data.num_test=32", "data.batch_size=32",
        "data.options={size = 16}", "backbone.width=0.25",
        "pretrain.epochs=1", "finetune.epochs=1", "affinity.images=16", "affinity.batch_size=32",
        "pretrain.device=cpu", "finetune.device=cpu", "search.budget=40k", *extra,
    ]


def sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (but the lock and the manifest's timing) -> its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run the command line in-process: (exit status, stdout + stderr)."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    return info.value.code, out.out + out.err


def assert_refused(code: int, output: str, *words: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 2, output
    assert len(errors) == 1 and "Traceback" not in output, output
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished tiny run (pretrain → export); tests work on copies of it."""
    out = tmp_path_factory.mktemp("base")
    recipe = load_recipe(None, tiny(out))
    run_pipeline(recipe, progress=False)
    return out


@pytest.fixture
def run(base, tmp_path):
    """A private copy of the finished run: (recipe, rundir, overrides)."""
    out = tmp_path / "runs"
    shutil.copytree(base, out)
    overrides = tiny(out)
    recipe = load_recipe(None, overrides)
    return recipe, RunDir(recipe.run_dir), overrides


# --------------------------------------------------------------------------- the registry


def test_the_registry_orders_stages_by_their_declared_dependencies():
    names = stage_names()
    assert names == ["pretrain", "affinity", "search", "finetune", "compare", "tune", "export"]
    for name in names:
        assert all(names.index(dep) < names.index(name) for dep in get_stage(name).requires)
    recipe = load_recipe(None, [])
    assert plan(["export"], recipe) == ["pretrain", "affinity", "search", "finetune", "export"]
    assert plan(["search"], recipe, {"search": {"affinity_file": "a.npz"}}) == ["search"]
    for init in ("central", "outlier"):  # they pick each group's source task by affinity
        assert "affinity" in get_stage("finetune").dependencies(load_recipe(None, [f"finetune.init={init}"]), {})
    first = load_recipe(None, ["finetune.init=first"])
    assert "affinity" not in get_stage("finetune").dependencies(first, {})
    assert "affinity" in get_stage("compare").dependencies(recipe, {})  # compare reads what finetune reads
    assert "search" not in get_stage("finetune").keyed_on(recipe, {})  # keyed on its tree instead


def test_the_registry_refuses_duplicates_unknown_requirements_and_names():
    class Again(Stage):
        name = "search"

    class Orphan(Stage):
        name = "orphan"
        requires = ("nowhere",)

    with pytest.raises(ValueError, match="already registered"):
        register_stage(Again)
    with pytest.raises(ValueError, match="unregistered stage"):
        register_stage(Orphan)
    assert "orphan" not in REGISTRY
    with pytest.raises(UserError, match="unknown stage 'serch'.*did you mean 'search'"):
        get_stage("serch")


def test_artifacts_are_read_through_declared_names_only(tmp_path):
    stage = get_stage("search")
    assert stage.path(RunDir(tmp_path), "tree.json") == tmp_path / "search" / "tree.json"
    with pytest.raises(ValueError, match="declares no artifact"):
        stage.path(RunDir(tmp_path), "other.json")
    assert get_stage("pretrain").path(RunDir(tmp_path), "shape.pt").name == "shape.pt"


def test_no_stage_imports_the_pipeline_and_no_module_is_too_long():
    import re

    imports_pipeline = re.compile(r"^\s*(from branchnas\.pipeline import|from branchnas import .*\bpipeline\b|"
                                  r"import branchnas\.pipeline)", re.M)
    sources = {p: p.read_text() for p in (ROOT / "branchnas").rglob("*.py")}
    for path, text in sources.items():
        if "stages" in path.parts:
            assert not imports_pipeline.search(text), path
        assert len(text.splitlines()) <= 800, f"{path} has {len(text.splitlines())} lines"


# --------------------------------------------------------------------------- checks before work

RECIPE_ONLY = [
    (["search.budget=1e999"], "search.budget"),
    (["search.budget=100k"], "below the smallest tree"),
    (['tasks=[{name="shape", kind="classification"}]'], "single task"),
    (['tasks=[{name="shape", kind="classification"}, {name="colour", kind="classification"}]'],
     "below the smallest tree"),
    (["affinity.images=600"], "affinity.images: expected at most 500"),
    (["pretrain.device=tpu"], "pretrain.device"),
    (["finetune.variant=fused", 'backbone.name="lenet5"'], "'fused' needs a backbone of residual blocks"),
    (["finetune.variant=gated", "finetune.gated.targets={ shpe = 0.5 }"], "unknown task(s) shpe"),
    (["data.dataset=nope"], "unknown dataset 'nope'"),
    (["data.dataset=celeba", "data.root=/no/such/folder"], "data.root"),
    (["out=/proc/x"], "virtual file system"),
]


@pytest.mark.parametrize(("overrides", "words"), RECIPE_ONLY, ids=[o[0][-1][:30] for o in RECIPE_ONLY])
def test_recipe_errors_are_found_by_recipe_check_and_before_any_work_by_run(tmp_path, capsys, monkeypatch,
                                                                          overrides, words):
    monkeypatch.chdir(tmp_path)
    base = [f"out={json.dumps(str(tmp_path / 'runs'))}", *overrides] if not overrides[0].startswith("out=") else overrides
    code, output = cli(capsys, "recipe", "--check", *sets(base))
    assert_refused(code, output, words)
    code, output = cli(capsys, "run", *sets(base))
    assert_refused(code, output, words)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "runs" / "shapes").exists()


def test_compare_refuses_an_unknown_variant_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = cli(capsys, "compare", *sets([f"out={json.dumps(str(tmp_path / 'runs'))}"]),
                       "--variants", "plain,gatd")
    assert_refused(code, output, "did you mean 'gated'")
    assert not (tmp_path / "runs").exists()
    code, output = cli(capsys, "compare", *sets([f"out={json.dumps(str(tmp_path / 'runs'))}"]),
                       "--weighting", "famo,gradnrom")
    assert_refused(code, output, "did you mean 'gradnorm'")
    assert not (tmp_path / "runs").exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, output = cli(capsys, "recipe", "--check", "--set", f"out={json.dumps(str(tmp_path / 'afile'))}")
    assert_refused(code, output, "is a file, not a folder")


def test_a_missing_affinity_file_creates_no_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = cli(capsys, "search", "--affinity", "missing.npz")
    assert_refused(code, output, "--affinity: no file 'missing.npz'")
    assert list(tmp_path.iterdir()) == []


def test_the_default_recipe_passes_its_checks(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = cli(capsys, "recipe", "--check")
    assert code == 0 and output.startswith("ok:") and "checked: pretrain, affinity, search, finetune, export" in output


# --------------------------------------------------------------------------- refusals leave outputs alone


def _hide_onnx(monkeypatch):
    """As if the [onnx] extra were not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.split(".")[0] in ("onnx", "onnxruntime", "onnxscript")
                        else real(name, *a, **k))


def test_onnx_without_its_extra_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _hide_onnx(monkeypatch)
    base = sets([f"out={json.dumps(str(tmp_path / 'runs'))}", "export.format=onnx"])
    for command in ("recipe", "run"):
        code, output = cli(capsys, command, *(["--check"] if command == "recipe" else []), *base)
        assert_refused(code, output, "pip install 'branchnas[onnx]'")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_export_to_onnx_without_onnx_retrains_nothing_and_keeps_the_export(run, capsys, monkeypatch):
    recipe, rundir, overrides = run
    _hide_onnx(monkeypatch)
    before = snapshot(rundir.path)
    # finetune.lr changed: the fine-tune is stale, but the check refuses before retraining it.
    code, output = cli(capsys, "export", *sets([*overrides, "finetune.lr=0.5"]), "--format", "onnx")
    assert_refused(code, output, "pip install 'branchnas[onnx]'")
    assert snapshot(rundir.path) == before


@pytest.mark.slow
def test_export_to_another_file_leaves_the_runs_export_alone(run, capsys, tmp_path):
    recipe, rundir, overrides = run
    before = snapshot(rundir.path / "export")
    code, output = cli(capsys, "export", *sets(overrides), "-o", str(tmp_path / "other.pt"))
    assert code == 0, output
    assert (tmp_path / "other.pt").is_file() and snapshot(rundir.path / "export") == before


@pytest.mark.slow
def test_a_mismatched_affinity_file_leaves_the_search_alone(run, capsys, tmp_path):
    recipe, rundir, overrides = run
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, affinity=np.zeros((3, 2, 2)), tasks=np.array(["shape", "depth"]))
    before = snapshot(rundir.path)
    code, output = cli(capsys, "search", *sets(overrides), "--affinity", str(wrong))
    assert_refused(code, output, "differ from the recipe's")
    assert snapshot(rundir.path) == before


@pytest.mark.slow
def test_a_failing_stage_is_marked_failed_and_its_previous_outputs_stay(run, monkeypatch):
    recipe, rundir, _ = run
    before = snapshot(rundir.path / "affinity")

    def broken(*args, **kwargs):
        raise DataError("the data went away")

    monkeypatch.setattr("branchnas.stages.affinity.compute_affinity", broken)
    with pytest.raises(DataError):
        run_stages(recipe, ["affinity"], force=["affinity"], progress=False)
    entry = rundir.stage_entry("affinity")
    assert entry["status"] == "failed" and "the data went away" in entry["error"]
    assert snapshot(rundir.path / "affinity") == before
    # The outputs still verify for their inputs: the next run reuses them.
    assert run_stages(recipe, ["affinity"], progress=False)[1]["affinity"]["skipped"]
    assert rundir.stage_entry("affinity")["status"] == "done"


# --------------------------------------------------------------------------- damaged inputs


@pytest.mark.slow
def test_a_truncated_model_is_rebuilt_alone_not_reused(run, capsys):
    recipe, rundir, overrides = run
    shape, colour = rundir.path / "pretrain" / "shape.pt", rundir.path / "pretrain" / "colour.pt"
    colour_bytes = colour.read_bytes()
    shape.write_bytes(shape.read_bytes()[:100])
    assert rundir.damaged_outputs("pretrain") == ["pretrain/shape.pt"]
    code, output = cli(capsys, "affinity", *sets(overrides), "--force")
    assert code == 0 and "Traceback" not in output, output
    assert not rundir.damaged_outputs("pretrain")
    assert colour.read_bytes() == colour_bytes  # only the damaged model was trained again
    import torch

    assert torch.load(shape, weights_only=True)["task"] == "shape"


@pytest.mark.slow
def test_a_corrupted_affinity_file_is_rebuilt(run, capsys):
    recipe, rundir, overrides = run
    path = rundir.path / "affinity" / "affinity.npz"
    good = np.load(path)["affinity"]
    path.write_bytes(b"PK\x03\x04 not a zip")
    code, output = cli(capsys, "search", *sets(overrides))
    assert code == 0 and "Traceback" not in output, output
    np.testing.assert_array_equal(np.load(path)["affinity"], good)  # same models, same images


def test_a_damaged_artifact_read_directly_is_a_user_error(tmp_path):
    from branchnas.stages.affinity import read_affinity
    from branchnas.stages.pretrain import read_metrics

    rundir = RunDir(tmp_path)
    (tmp_path / "affinity").mkdir()
    (tmp_path / "affinity" / "affinity.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable .npz file.*branchnas affinity --force"):
        read_affinity(rundir)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "metrics.json").write_text("{")
    with pytest.raises(UserError, match="damaged.*branchnas pretrain --force"):
        read_metrics(rundir)


def test_a_swap_killed_between_its_renames_is_undone(tmp_path):
    rundir = RunDir(tmp_path)
    rundir.run_stage("a", {}, [], lambda folder: (folder / "x").write_text("1") and {"outputs": ["x"]})
    # As if killed after moving the old folder aside and before moving the new one in.
    (tmp_path / ".staging").mkdir(exist_ok=True)
    (tmp_path / "a").rename(tmp_path / ".staging" / "a.old")
    assert rundir.run_stage("a", {}, [], lambda folder: pytest.fail("must not rerun"))["skipped"]
    assert (tmp_path / "a" / "x").read_text() == "1"


# --------------------------------------------------------------------------- exploration


@pytest.mark.slow
def test_exploring_budgets_then_running_retrains_nothing(run):
    recipe, rundir, overrides = run
    model = rundir.path / "finetune" / "model.pt"
    stamp = model.stat().st_mtime_ns
    for budget in ("30k", "50k", "40k", "25k"):
        explored = load_recipe(None, [*overrides, f"search.budget={budget}"])
        run_stages(explored, ["search"], progress=False)
    _, results = run_pipeline(recipe, progress=False)
    assert [n for n, r in results.items() if not r["skipped"]] in ([], ["search"])
    assert results["finetune"]["skipped"] and results["export"]["skipped"]
    assert model.stat().st_mtime_ns == stamp


def test_delta_mtl_is_never_printed_as_nan():
    from branchnas.finetune import report_table
    from branchnas.tasks import format_delta

    report = {"tasks": [{"name": "a", "metric": "accuracy", "higher_is_better": True}],
              "single_task": {"test": {"a": {"accuracy": 0.0}}}, "test": {"a": {"accuracy": 0.5}},
              "delta_per_task": {"a": float("nan")}, "delta_mtl": float("nan"), "params": 10, "flops": 20}
    table = report_table(report)
    assert "nan" not in table.lower() and "undefined (a baseline metric is 0)" in table
    assert format_delta(0.0123) == "+1.23%" and format_delta(-0.5, percent="") == "-50.00"
