"""`branchnas run` end to end, in a subprocess, on a tiny seeded CPU configuration.

One uninterrupted run is the reference (module fixture). Against it:

* a run killed (SIGKILL, whole process group) inside every stage in turn and started again
  each time ends with the same single-task metrics, affinity, chosen tree, test metrics and
  Δ_MTL, exactly; on the way, ``--until search`` stops after search;
* ``--from finetune`` redoes fine-tuning and export only;
* a second run skips every stage and changes nothing;
* the printed summary names the chosen tree, Δ_MTL and the export path, and report.md
  references figures that exist.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

STAGES = ("pretrain", "affinity", "search", "finetune", "export")

RECIPE = """\
name = "tiny"
seed = 0

[data]
dataset = "shapes"
num_train = 48
num_val = 24
num_test = 24
batch_size = 16
options = { size = 16 }

[[tasks]]
name = "segmentation"
kind = "segmentation"

[[tasks]]
name = "depth"
kind = "depth"

[[tasks]]
name = "shape"
kind = "classification"

[backbone]
name = "resnet20"
width = 0.25

[pretrain]
epochs = 2
device = "cpu"

[affinity]
images = 20

[search]
budget = "40k"

[finetune]
epochs = 2
device = "cpu"
"""

TIMEOUT = 300  # seconds for one command; a healthy one takes a fraction of that


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Tiny tensors on a shared machine: one thread avoids OpenMP spinning against other
    # processes (an order of magnitude on a loaded 2-core runner) and changes no result.
    env["OMP_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "branchnas", "run", "recipe.toml", *args]


def _run(folder: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(*args), cwd=folder, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"branchnas run {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done


def _new_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    folder = tmp_path_factory.mktemp(name)
    (folder / "recipe.toml").write_text(RECIPE)
    return folder


def _manifest(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "manifest.json").read_text())["stages"]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _caught(run_dir: Path, stage: str) -> bool:
    """The stage is running and, where it checkpoints, has written its first checkpoint."""
    if _manifest(run_dir).get(stage, {}).get("status") != "running":
        return False
    # Work in progress is staged: it replaces the stage's folder only when the stage succeeds.
    checkpoints = {"pretrain": ".staging/pretrain/ckpt", "affinity": ".staging/affinity/rdms",
                   "finetune": ".staging/finetune/ckpt"}
    if stage not in checkpoints:
        return True
    folder = run_dir / checkpoints[stage]
    return folder.is_dir() and any(p.suffix == ".pt" for p in folder.iterdir())


def _kill_inside(folder: Path, stage: str, *args: str) -> None:
    """Start `branchnas run`, SIGKILL it (and its children) while ``stage`` runs."""
    run_dir = folder / "runs" / "tiny"
    log = folder / f"killed-in-{stage}.log"  # a file, not a pipe: a full pipe would stall the run
    with log.open("w") as stderr:
        proc = subprocess.Popen(_command(*args), cwd=folder, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not _caught(run_dir, stage):
            if proc.poll() is not None:
                pytest.fail(f"`branchnas run` ended (status {proc.returncode}) before stage {stage} could be "
                            f"interrupted; stages: {_manifest(run_dir)}\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"stage {stage} was not seen running within {TIMEOUT} s")
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its children (the export check)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    status = {name: entry.get("status") for name, entry in _manifest(run_dir).items()}
    assert status[stage] == "running", f"the kill should land inside {stage}; stages: {status}"


def _results(run_dir: Path) -> dict:
    """What must not depend on interruptions: every stage's numbers."""
    with np.load(run_dir / "affinity" / "affinity.npz") as data:
        affinity = data["affinity"].tolist()
    pretrain = json.loads((run_dir / "pretrain" / "metrics.json").read_text())["tasks"]
    tree = json.loads((run_dir / "search" / "tree.json").read_text())
    report = json.loads((run_dir / "finetune" / "report.json").read_text())
    return {
        "pretrain_test": {task: entry["test"] for task, entry in pretrain.items()},
        "affinity": affinity,
        "tree": tree["ranked"][0],
        "finetune_test": report["test"],
        "delta_mtl": report["delta_mtl"],
    }


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted run: its folder, printed output and results."""
    folder = _new_folder(tmp_path_factory, "baseline")
    done = _run(folder)
    run_dir = folder / "runs" / "tiny"
    return {"folder": folder, "run_dir": run_dir, "stdout": done.stdout, "stderr": done.stderr,
            "results": _results(run_dir), "manifest": _manifest(run_dir)}


def test_uninterrupted_run_finishes_every_stage(baseline):
    stages = baseline["manifest"]
    assert list(stages) == list(STAGES)
    assert all(entry["status"] == "done" for entry in stages.values())
    assert (baseline["run_dir"] / "export" / "model.pt").is_file()


def test_summary_names_tree_delta_and_export_path(baseline):
    from branchnas.tree import Tree

    out, run_dir = baseline["stdout"], baseline["run_dir"]
    chosen = Tree.from_json(json.loads((run_dir / "search" / "tree.json").read_text())["ranked"][0]["tree"])
    assert f"Chosen tree:\n{chosen.render()}\n" in out
    delta = json.loads((run_dir / "finetune" / "report.json").read_text())["delta_mtl"]
    assert f"Δ_MTL {100 * delta:+.2f}%" in out
    exported = re.search(r"^Exported model: (.+)$", out, re.M)
    assert exported, out
    assert Path(exported.group(1)) == (run_dir / "export" / "model.pt").resolve()
    assert Path(exported.group(1)).is_file()


def test_report_references_figures_that_exist(baseline):
    run_dir = baseline["run_dir"]
    report = (run_dir / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    for expected in ("affinity/depth.png", "search/tree.png", "search/pareto.png", "delta_vs_params.png"):
        assert expected in figures, f"report.md should show {expected}"
    missing = [f for f in figures if not (run_dir / f).is_file()]
    assert not missing, f"report.md references missing figures: {missing}"
    assert "Δ_MTL" in report and "## 5. Export" in report


def test_rerun_skips_every_stage_and_changes_nothing(baseline):
    run_dir = baseline["run_dir"]
    before = _manifest(run_dir)
    done = _run(baseline["folder"])
    assert f"(unchanged, skipped: {', '.join(STAGES)})" in done.stderr
    assert _manifest(run_dir) == before
    assert _results(run_dir) == baseline["results"]


def test_from_finetune_redoes_finetune_and_export_only(baseline):
    run_dir = baseline["run_dir"]
    before = _manifest(run_dir)
    done = _run(baseline["folder"], "--from", "finetune")
    after = _manifest(run_dir)
    assert "(unchanged, skipped: pretrain, affinity, search)" in done.stderr
    for stage in ("pretrain", "affinity", "search"):
        assert after[stage] == before[stage], f"{stage} should be left alone"
    for stage in ("finetune", "export"):
        assert after[stage]["status"] == "done"
        assert after[stage]["started"] > before["export"]["finished"], f"{stage} should be redone"
    assert after["export"]["started"] >= after["finetune"]["finished"]
    # Redone with the same seed: the same numbers.
    assert _results(run_dir) == baseline["results"]


def test_killed_in_every_stage_and_rerun_gives_the_uninterrupted_result(baseline, tmp_path_factory):
    folder = _new_folder(tmp_path_factory, "killed")
    run_dir = folder / "runs" / "tiny"
    # Through search with --until search, interrupted in each of its stages ...
    for stage in ("pretrain", "affinity", "search"):
        _kill_inside(folder, stage, "--until", "search")
    done = _run(folder, "--until", "search")
    stages = _manifest(run_dir)
    assert list(stages) == ["pretrain", "affinity", "search"], "--until search should stop after search"
    assert all(entry["status"] == "done" for entry in stages.values())
    assert not (run_dir / "finetune").exists() and not (run_dir / "export").exists()
    assert "Chosen tree:" in done.stdout and "Exported model" not in done.stdout
    # ... then the rest, interrupted in fine-tuning and in export.
    for stage in ("finetune", "export"):
        _kill_inside(folder, stage)
    _run(folder)
    assert all(entry["status"] == "done" for entry in _manifest(run_dir).values())
    assert _results(run_dir) == baseline["results"]
