"""Tiny end-to-end runs of a fine-tuning variant, shared by the variants' tests.

* :func:`tiny` gives the recipe overrides of a tiny run of one variant (run name = variant);
* :func:`finished_run` runs it through stage 4 (for a module-scoped fixture);
* :func:`kill_and_resume` fine-tunes a copy straight through, and another copy that is
  SIGKILLed at its first checkpoint and run again, so that a test can compare the two.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import assert_reproduces_test_metrics, tiny_overrides  # noqa: E402, F401 (re-exported)


def tiny(variant: str, out: Any, *extra: str) -> list[str]:
    """Overrides of a tiny run named ``variant`` with ``finetune.variant = variant``."""
    return tiny_overrides(out, variant, f"finetune.variant={variant}", *extra)


def finished_run(tmp_path_factory: Any, variant: str, *extra: str) -> tuple[Any, Any]:
    """A tiny run of ``variant`` through stage 4: ``(recipe, rundir)``."""
    from branchnas.pipeline import open_run, run_stages
    from branchnas.recipe import load_recipe

    out = tmp_path_factory.mktemp(variant)
    recipe = load_recipe(None, tiny(variant, out, *extra))
    rundir = open_run(recipe)
    run_stages(recipe, ["finetune"], rundir=rundir, progress=False)
    return recipe, rundir


@dataclass
class Resumed:
    """What :func:`kill_and_resume` leaves: the checkpoint at the kill, both models and reports."""

    killed_at: dict[str, Any]
    straight: dict[str, Any]
    resumed: dict[str, Any]
    straight_report: dict[str, Any]
    resumed_report: dict[str, Any]


def kill_and_resume(rundir: Any, variant: str, tmp_path: Path, *extra: str) -> Resumed:
    """Fine-tune two copies of ``rundir``'s run with ``extra``: one straight, one SIGKILLed at its
    first epoch checkpoint and then run again by the same command."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dirs = {}
    for name in ("straight", "killed"):
        dirs[name] = tmp_path / name
        shutil.copytree(rundir.path.parent, dirs[name])
        for stage in ("finetune", "export"):
            shutil.rmtree(dirs[name] / variant / stage, ignore_errors=True)

    def command(out: Path) -> list[str]:
        sets = tiny(variant, out, *extra)
        return [sys.executable, "-m", "branchnas", "finetune", *sum((["--set", s] for s in sets), [])]

    subprocess.run(command(dirs["straight"]), env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(command(dirs["killed"]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = dirs["killed"] / variant / ".staging" / "finetune" / "ckpt" / "model.pt"
    deadline = time.monotonic() + 240
    try:
        while not ckpt.exists():
            assert proc.poll() is None, "the run ended before it could be killed; make it longer"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=True)
    subprocess.run(command(dirs["killed"]), env=env, check=True, capture_output=True, timeout=300)

    def load(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        folder = dirs[name] / variant / "finetune"
        return (torch.load(folder / "model.pt", weights_only=True), json.loads((folder / "report.json").read_text()))

    (straight, straight_report), (resumed, resumed_report) = load("straight"), load("killed")
    return Resumed(killed_at, straight, resumed, straight_report, resumed_report)


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two saved models' weights are equal, bit for bit."""
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
