"""Tests for branchnas.affinity.stage and the `branchnas affinity` command."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from torch import nn

from branchnas import affinity as aff
from branchnas.errors import DataError, UserError
from branchnas.stages.affinity import read_affinity


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- the stage


@pytest.fixture
def fake_upstream(monkeypatch, tiny_backbone):
    """Stand-ins for the data, the pretrained models and the pipeline's upstream stages."""
    images = torch.randn(30, 3, 16, 16, generator=_gen(14))

    class Split:
        def __len__(self) -> int:
            return len(images)

        def get_batch(self, indices, augment=False, rng=None):
            return images[indices], {}

    def load_splits(recipe):
        tasks = [types.SimpleNamespace(name=n) for n in ("seg", "depth", "edges")]
        return {"train": Split(), "val": Split(), "test": Split()}, tasks

    def load_single_task(recipe, rundir, task):
        backbone = tiny_backbone({"seg": 1, "depth": 1, "edges": 5}[task])
        backbone.block_info = [types.SimpleNamespace(name=f"layer{i + 1}") for i in range(3)]
        return backbone, nn.Identity()

    monkeypatch.setattr("branchnas.data.load_splits", load_splits)
    monkeypatch.setattr("branchnas.stages.pretrain.load_single_task", load_single_task)
    return ["affinity"]


def run_affinity(recipe, rundir, force=False, images=None, bootstrap=None):
    """The affinity stage alone on a stand-in pretrain stage, checks first, as the pipeline runs it."""
    import dataclasses

    from branchnas.stages import StageContext, get_stage
    from branchnas.stages._checks import clear_cache

    changes = {k: v for k, v in (("images", images), ("bootstrap", bootstrap)) if v is not None}
    recipe = dataclasses.replace(recipe, affinity=dataclasses.replace(recipe.affinity, **changes))
    stage = get_stage("affinity")
    clear_cache()
    stage.check(recipe, {})
    return rundir.run_stage("affinity", stage.config(recipe, {}), ["pretrain"],
                            lambda folder: stage.run(StageContext(recipe, rundir, folder, {}, False)), force=force)


def get_stage_config(recipe):
    from branchnas.stages import get_stage

    return get_stage("affinity").config(recipe, {})


def _done_pretrain(tmp_path):
    from branchnas.recipe import load_recipe
    from branchnas.rundir import RunDir

    recipe = load_recipe(None, ["affinity.images=12", "affinity.batch_size=5", f"out={tmp_path.as_posix()!r}"])
    rundir = RunDir(recipe.run_dir)
    rundir.run_stage("pretrain", {}, [], lambda folder: {"outputs": []})
    return recipe, rundir


def test_stage_writes_its_artifacts_and_skips_when_unchanged(tmp_path, fake_upstream):
    recipe, rundir = _done_pretrain(tmp_path)
    result = run_affinity(recipe, rundir, bootstrap=20)
    assert not result["skipped"] and fake_upstream == ["affinity"]
    folder = rundir.path / "affinity"
    data = np.load(folder / "affinity.npz")
    assert data["affinity"].shape == (3, 3, 3)
    assert list(data["tasks"]) == ["seg", "depth", "edges"] and list(data["points"]) == ["layer1", "layer2", "layer3"]
    assert int(data["images"]) == 12 and len(set(data["indices"].tolist())) == 12
    assert data["low"].shape == data["high"].shape == (3, 3, 3)
    np.testing.assert_allclose(data["affinity"][:, 0, 1], 1.0)  # seg and depth share one model
    summary = json.loads((folder / "affinity.json").read_text())
    assert summary["bootstrap"] == 20 and summary["tasks"] == ["seg", "depth", "edges"]
    for name in ("heatmap_layer1.png", "heatmap_layer2.png", "heatmap_layer3.png", "depth.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    assert run_affinity(recipe, rundir, bootstrap=20)["skipped"]
    assert not run_affinity(recipe, rundir, bootstrap=0)["skipped"]  # a changed option redoes the stage
    assert "low" not in np.load(folder / "affinity.npz")
    loaded = read_affinity(rundir)
    assert loaded["tasks"] == ["seg", "depth", "edges"] and loaded["low"] is None


def test_stage_resumes_from_saved_rdms(tmp_path, fake_upstream):
    recipe, rundir = _done_pretrain(tmp_path)
    run_affinity(recipe, rundir)
    first = np.load(rundir.path / "affinity" / "affinity.npz")["affinity"]
    # As if killed after the RDMs were saved: the work in progress sits in the staging folder.
    staging = rundir.staging_dir("affinity")
    staging.parent.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.copytree(rundir.path / "affinity", staging)
    rundir.update_stage("affinity", status="running", attempt={"fingerprint": "changed inputs"})
    rundir.update_stage("affinity", fingerprint="changed inputs")
    attempt_fp = rundir.stage_fingerprint("affinity", get_stage_config(recipe), ["pretrain"])
    rundir.update_stage("affinity", attempt={"fingerprint": attempt_fp})
    saved = staging / "rdms" / "seg.pt"
    torch.save(torch.load(saved) * 0 + torch.rand(3, 12, 12, generator=_gen(15), dtype=torch.float64), saved)
    run_affinity(recipe, rundir)
    second = np.load(rundir.path / "affinity" / "affinity.npz")["affinity"]
    assert not np.allclose(first[:, 0, 1], second[:, 0, 1])  # the saved seg RDMs were used


def test_stage_rejects_more_images_than_the_split_has(tmp_path, fake_upstream):
    recipe, rundir = _done_pretrain(tmp_path)
    with pytest.raises(UserError, match="affinity.images: expected at most 30"):
        run_affinity(recipe, rundir, images=31)


# --------------------------------------------------------------------------- the command


def test_command_help_lists_its_options():
    from branchnas_cli.main import cli
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["affinity", "--help"])
    assert result.exit_code == 0
    assert "--images" in result.output and "--bootstrap" in result.output and "--force" in result.output


def test_command_rejects_too_few_images():
    from branchnas_cli.main import cli
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["affinity", "--images", "2"])
    assert result.exit_code == 2 and "--images" in result.output


def test_command_runs_the_stage_and_prints_the_tables(tmp_path, fake_upstream, monkeypatch):
    from branchnas_cli.main import cli
    from click.testing import CliRunner

    from branchnas.recipe import load_recipe
    from branchnas.rundir import RunDir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text(f'out = "{tmp_path.as_posix()}"\n')
    from branchnas.stages import get_stage

    recipe = load_recipe("r.toml")  # a stand-in pretrain stage, done with the recipe's fingerprint
    RunDir(recipe.run_dir).run_stage("pretrain", get_stage("pretrain").config(recipe, {}), [],
                                     lambda folder: {"outputs": []})
    result = CliRunner().invoke(cli, ["affinity", "r.toml", "--images", "12", "--bootstrap", "5"])
    assert result.exit_code == 0, result.output
    assert "layer3" in result.output and "edges" in result.output and "[" in result.output
    saved = (load_recipe("r.toml").run_dir / "recipe.toml").read_text()
    assert "images = 12" in saved and "bootstrap = 5" in saved
    again = CliRunner().invoke(cli, ["affinity", "r.toml", "--images", "12", "--bootstrap", "5"])
    assert "already done" in again.output


def test_stage_names_a_task_whose_rdm_is_constant(tmp_path, fake_upstream, monkeypatch):
    recipe, rundir = _done_pretrain(tmp_path)
    real = aff.extract_rdms

    def extract(backbones, *args, names=None, **kwargs):
        out = real(backbones, *args, names=names, **kwargs)
        return torch.ones_like(out) if names == ["edges"] else out

    # the stage looks extract_rdms up in its defining module when it runs
    monkeypatch.setattr("branchnas.affinity.extract.extract_rdms", extract)
    with pytest.raises(DataError, match="task 'edges' has the same dissimilarity for every image pair"):
        run_affinity(recipe, rundir)
