"""Tests for branchnas.affinity: RDMs, RSA affinity, bootstrap, extraction and the stage."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from branchnas import affinity as aff
from branchnas.errors import DataError, UserError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _upper_np(matrix: np.ndarray) -> np.ndarray:
    rows, cols = np.triu_indices(matrix.shape[0], 1)
    return matrix[rows, cols]


def _spearman_reference(rdms: torch.Tensor) -> np.ndarray:
    """A[d, i, j] by scipy, one pair at a time (the slow, obvious way)."""
    n, d = rdms.shape[:2]
    out = np.empty((d, n, n))
    for p in range(d):
        for i in range(n):
            for j in range(n):
                out[p, i, j] = spearmanr(_upper_np(rdms[i, p].numpy()), _upper_np(rdms[j, p].numpy())).statistic
    return out


# --------------------------------------------------------------------------- rdm


def test_rdm_matches_numpy_corrcoef():
    x = torch.randn(7, 3, 4, 5, generator=_gen(), dtype=torch.float64)
    expected = 1.0 - np.corrcoef(x.reshape(7, -1).numpy())
    out = aff.rdm(x)
    assert out.shape == (7, 7) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    assert torch.equal(out, out.T)
    assert torch.equal(out.diagonal(), torch.zeros(7, dtype=torch.float64))


def test_rdm_marks_a_constant_image_nan():
    # 0.1 in float64 over 7 features: the mean rounds, so centring leaves a tiny constant
    # that would normalise to an arbitrary vector unless constant rows are caught exactly.
    x = torch.randn(4, 7, generator=_gen(), dtype=torch.float64)
    x[2] = 0.1
    assert (x[2] - x[2].mean()).abs().max() > 0
    out = aff.rdm(x)
    assert torch.isnan(out[2, [0, 1, 3]]).all() and torch.isnan(out[[0, 1, 3], 2]).all()
    assert torch.isfinite(out[:2, :2]).all()


def test_rdm_rejects_a_single_image():
    with pytest.raises(ValueError, match="K >= 2"):
        aff.rdm(torch.randn(1, 5))


# --------------------------------------------------------------------------- accumulator


@pytest.mark.parametrize("chunk", [1, 13, 60, 1000])
def test_accumulator_over_chunks_equals_rdm_on_the_full_matrix(chunk):
    # A large common offset is the case where naive raw moments lose digits.
    x = 1e4 + torch.randn(6, 60, generator=_gen(1), dtype=torch.float64)
    acc = aff.CorrelationAccumulator(6)
    for part in x.split(chunk, dim=1):
        acc.update(part)
    assert acc.num_features == 60
    np.testing.assert_allclose(acc.compute().numpy(), aff.rdm(x).numpy(), rtol=0, atol=1e-10)


def test_accumulator_flags_constant_images_and_checks_shapes():
    x = torch.randn(3, 20, generator=_gen(), dtype=torch.float64)
    x[1] = 0.7  # a value whose mean rounds (see the rdm test)
    acc = aff.CorrelationAccumulator(3)
    acc.update(x[:, :7])
    acc.update(x[:, 7:])
    assert acc.constant.tolist() == [False, True, False]
    assert torch.isnan(acc.compute()[1, 0])
    with pytest.raises(ValueError, match=r"\(3, f\)"):
        acc.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match="update"):
        aff.CorrelationAccumulator(3).compute()


# --------------------------------------------------------------------------- Spearman


def _random_rdms(n: int, d: int, k: int, seed: int, decimals: int | None = None) -> torch.Tensor:
    rdms = torch.rand(n, d, k, k, generator=_gen(seed), dtype=torch.float64) * 2
    if decimals is not None:
        rdms = rdms.round(decimals=decimals)  # many ties
    return rdms  # neither symmetric nor zero on the diagonal: only the strict upper part counts


@pytest.mark.parametrize("decimals", [None, 1])
def test_rsa_affinity_matches_scipy_spearman_on_strict_upper_triangles(decimals):
    rdms = _random_rdms(4, 3, 9, seed=2, decimals=decimals)
    if decimals is not None:
        assert len(np.unique(_upper_np(rdms[0, 0].numpy()))) < 36  # ties are really there
    out = aff.rsa_affinity(rdms)
    assert out.shape == (3, 4, 4)
    np.testing.assert_allclose(out.numpy(), _spearman_reference(rdms), rtol=0, atol=1e-12)


def test_rsa_affinity_ignores_the_diagonal_and_lower_triangle():
    rdms = _random_rdms(3, 2, 8, seed=3)
    changed = rdms.clone()
    lower = torch.ones(8, 8, dtype=torch.bool).tril()
    changed[..., lower] = torch.rand(int(lower.sum()), generator=_gen(9), dtype=torch.float64)
    assert torch.equal(aff.rsa_affinity(rdms), aff.rsa_affinity(changed))


def test_rsa_affinity_is_symmetric_with_a_unit_diagonal():
    out = aff.rsa_affinity(_random_rdms(5, 4, 12, seed=4, decimals=2))
    assert torch.equal(out, out.transpose(1, 2))
    assert torch.equal(out.diagonal(dim1=1, dim2=2), torch.ones(4, 5, dtype=torch.float64))
    assert (out.abs() <= 1).all()


def test_rsa_affinity_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N tasks, D points, K, K\)"):
        aff.rsa_affinity(torch.rand(3, 5, 5))
    rdms = _random_rdms(2, 2, 5, seed=5)
    rdms[1, 0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"rdms\[1, 0\]"):
        aff.rsa_affinity(rdms)
    with pytest.raises(ValueError, match=r"bootstrap_affinity: rdms\[1, 0\]"):
        aff.bootstrap_affinity(rdms, 2, seed=0)


def _latent_features(latent: torch.Tensor, features: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    """A random linear map of the latent (nearly preserves its geometry), plus noise."""
    g = _gen(seed)
    mixed = latent @ torch.randn(latent.shape[1], features, generator=g, dtype=torch.float64)
    return mixed + noise * torch.randn(latent.shape[0], features, generator=g, dtype=torch.float64)


def _structured_rdms(k: int, seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    """Tasks 0 and 1 see the same latent; task 2 sees an independent one. Shape (3, 1, K, K)."""
    shared = torch.randn(k, 8, generator=_gen(seed), dtype=torch.float64)
    other = torch.randn(k, 8, generator=_gen(seed + 100), dtype=torch.float64)
    feats = [_latent_features(shared, 3000, seed + 1, noise), _latent_features(shared, 3000, seed + 2, noise),
             _latent_features(other, 3000, seed + 3, noise)]
    return torch.stack([aff.rdm(f) for f in feats])[:, None]


def test_affinity_of_linear_transforms_of_one_latent_is_near_one_and_of_independent_near_zero():
    out = aff.rsa_affinity(_structured_rdms(40))[0]
    assert out[0, 1] > 0.95
    assert abs(out[0, 2]) < 0.2 and abs(out[1, 2]) < 0.2


# --------------------------------------------------------------------------- bootstrap


def test_resampled_affinity_equals_building_the_resample_and_dropping_repeated_pairs():
    rdms = _random_rdms(3, 2, 9, seed=6, decimals=1)
    indices = torch.tensor([0, 0, 1, 3, 3, 3, 5, 6, 8])
    expected = np.empty((2, 3, 3))
    rows, cols = np.triu_indices(len(indices), 1)
    distinct = indices.numpy()[rows] != indices.numpy()[cols]
    for d in range(2):
        vectors = []
        for t in range(3):
            resampled = rdms[t, d].numpy()[np.ix_(indices.numpy(), indices.numpy())]
            vectors.append(resampled[rows[distinct], cols[distinct]])
        for i in range(3):
            for j in range(3):
                expected[d, i, j] = spearmanr(vectors[i], vectors[j]).statistic
    np.testing.assert_allclose(aff.resampled_affinity(rdms, indices).numpy(), expected, rtol=0, atol=1e-12)


def test_resampled_affinity_without_repeats_is_rsa_affinity_of_the_subset():
    rdms = _random_rdms(3, 2, 10, seed=7)
    subset = torch.tensor([1, 2, 4, 7, 9])
    sub_rdms = rdms[:, :, subset][:, :, :, subset]
    np.testing.assert_allclose(aff.resampled_affinity(rdms, subset).numpy(),
                               aff.rsa_affinity(sub_rdms).numpy(), rtol=0, atol=1e-12)


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_images():
    widths = []
    for k in (15, 60):
        rdms = _structured_rdms(k, seed=k, noise=3.0)
        point = aff.rsa_affinity(rdms)
        mean, low, high = aff.bootstrap_affinity(rdms, 200, seed=0)
        assert mean.shape == low.shape == high.shape == point.shape
        off = ~torch.eye(3, dtype=torch.bool)
        assert (low[:, off] <= point[:, off]).all() and (point[:, off] <= high[:, off]).all()
        assert (low <= mean).all() and (mean <= high).all()
        assert torch.equal(low.diagonal(dim1=1, dim2=2), torch.ones(1, 3, dtype=torch.float64))
        widths.append((high - low)[:, off].mean().item())
    assert widths[1] < 0.7 * widths[0]


def test_bootstrap_is_seeded():
    rdms = _random_rdms(3, 1, 8, seed=8)
    first = aff.bootstrap_affinity(rdms, 20, seed=3)
    again = aff.bootstrap_affinity(rdms, 20, seed=3)
    other = aff.bootstrap_affinity(rdms, 20, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])


# --------------------------------------------------------------------------- extraction


class TinyBackbone(nn.Module):
    """The Backbone contract in miniature: a stem and three blocks of nn.Sequential."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
            nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Tanh()),
            nn.Sequential(nn.Conv2d(8, 5, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(5 * 4 * 4, 7)),
        ])
        for bn in self.modules():
            if isinstance(bn, nn.BatchNorm2d):  # non-trivial running statistics
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)


def _direct_rdms(backbone: TinyBackbone, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """All features in memory, then rdm(). Same batches as the extraction, because a conv's
    float32 result depends (in the last bits) on the batch it runs in."""
    backbone.eval()
    per_point: list[list[torch.Tensor]] = [[] for _ in backbone.blocks]
    with torch.no_grad():
        for batch in images.split(batch_size):
            h = backbone.stem(batch)
            for d, block in enumerate(backbone.blocks):
                h = block(h)
                per_point[d].append(h)
    return torch.stack([aff.rdm(torch.cat(feats)) for feats in per_point])


# 400 of the 1536 + 512 + 7 features per image per pass (6 passes, some stopping early); all at once.
@pytest.mark.parametrize("max_memory", [10 * 4 * 400, 1 << 30])
def test_extract_rdms_equals_the_computation_with_all_features_in_memory(max_memory):
    assert len(aff.plan_passes([1536, 512, 7], max_memory // (10 * 4))) in (6, 1)
    images = torch.randn(12, 3, 16, 16, generator=_gen(10))
    backbones = [TinyBackbone(1), TinyBackbone(2)]
    for b in backbones:
        b.train()
    expected = torch.stack([_direct_rdms(b, images[:10], 3) for b in backbones])
    for b in backbones:
        b.train()
    out = aff.extract_rdms(backbones, images, 10, batch_size=3, max_memory=max_memory)
    assert out.shape == (2, 3, 10, 10) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=0, atol=1e-12)
    assert all(b.training for b in backbones)  # the caller's mode is given back


def test_extract_rdms_reads_datasets_and_callables():
    images = torch.randn(8, 3, 16, 16, generator=_gen(11))

    class Dataset:
        def __len__(self) -> int:
            return len(images)

        def get_batch(self, indices, augment=False, rng=None):
            assert augment is False
            return images[indices], {}

    backbone = TinyBackbone(3)
    from_tensor = aff.extract_rdms([backbone], images, 6, batch_size=4)
    from_dataset = aff.extract_rdms({"seg": backbone}, Dataset(), 6, batch_size=4)
    from_callable = aff.extract_rdms([backbone], lambda idx: images[idx], 6, batch_size=4)
    assert torch.equal(from_tensor, from_dataset) and torch.equal(from_tensor, from_callable)
    with pytest.raises(UserError, match="at least 9 images"):
        aff.extract_rdms([backbone], Dataset(), 9, batch_size=4)


def test_extract_rdms_names_the_image_with_constant_features():
    images = torch.randn(5, 3, 8, 8, generator=_gen(12))
    images[3] = 0.0  # bias-free convolutions keep it exactly zero
    backbone = nn.Module()
    backbone.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    backbone.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1, bias=False)])
    with pytest.raises(DataError, match="task 'depth' gives image 3 constant features at branch point 'block0'"):
        aff.extract_rdms({"depth": backbone}, images, 5, batch_size=2)


def test_plan_passes_covers_every_feature_once_within_capacity_deepest_first():
    sizes = [70, 30, 25]
    passes = aff.plan_passes(sizes, capacity=40)
    seen = {p: np.zeros(s, dtype=int) for p, s in enumerate(sizes)}
    for slices in passes:
        assert sum(stop - start for _, start, stop in slices) <= 40
        for point, start, stop in slices:
            seen[point][start:stop] += 1
    assert all((counts == 1).all() for counts in seen.values())
    assert len(passes) == 4  # ceil(125 / 40)
    assert [max(p for p, _, _ in s) for s in passes] == [2, 1, 0, 0]
    assert aff.plan_passes(sizes, capacity=1000) == [[(2, 0, 25), (1, 0, 30), (0, 0, 70)]]


# --------------------------------------------------------------------------- reporting


def test_format_affinity_shows_every_point_task_and_interval():
    a = torch.tensor([[[1.0, 0.25], [0.25, 1.0]], [[1.0, -0.5], [-0.5, 1.0]]])
    text = aff.format_affinity(a, ["seg", "depth"], ["layer1", "layer2"], a - 0.1, a + 0.1)
    assert "layer1" in text and "layer2" in text and "depth" in text
    assert "0.25 [0.15, 0.35]" in text and "-0.50 [-0.60, -0.40]" in text


def test_plots_have_labels_and_save_as_png(tmp_path):
    from branchnas.rundir import atomic_savefig

    a = aff.rsa_affinity(_random_rdms(3, 2, 6, seed=13))
    fig = aff.plot_heatmap(a[0], ["a", "b", "c"], "layer1")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert ax.get_xlabel() and ax.get_ylabel() and len(fig.axes) == 2  # plot and colour bar
    assert len(ax.texts) == 9
    atomic_savefig(fig, tmp_path / "h.png")
    fig = aff.plot_depth(a, ["a", "b", "c"], ["layer1", "layer2"])
    assert len(fig.axes[0].lines) == 4  # three pairs and their mean
    atomic_savefig(fig, tmp_path / "d.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG" == (tmp_path / "d.png").read_bytes()[:4]


# --------------------------------------------------------------------------- the stage


@pytest.fixture
def fake_upstream(monkeypatch):
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
        backbone = TinyBackbone({"seg": 1, "depth": 1, "edges": 5}[task])
        backbone.block_info = [types.SimpleNamespace(name=f"layer{i + 1}") for i in range(3)]
        return backbone, nn.Identity()

    ensured: list[str] = []
    monkeypatch.setattr("branchnas.data.load_splits", load_splits)
    monkeypatch.setattr("branchnas.pretrain.load_single_task", load_single_task)
    monkeypatch.setattr("branchnas.pipeline.ensure", lambda recipe, rundir, before: ensured.append(before))
    return ensured


def _done_pretrain(tmp_path):
    from branchnas.recipe import load_recipe
    from branchnas.rundir import RunDir

    recipe = load_recipe(None, ["affinity.images=12", "affinity.batch_size=5", f"out={tmp_path.as_posix()!r}"])
    rundir = RunDir(recipe.run_dir)
    rundir.run_stage("pretrain", {}, [], lambda folder: {"outputs": []})
    return recipe, rundir


def test_stage_writes_its_artifacts_and_skips_when_unchanged(tmp_path, fake_upstream):
    recipe, rundir = _done_pretrain(tmp_path)
    result = aff.run(recipe, rundir, bootstrap=20)
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
    assert aff.run(recipe, rundir, bootstrap=20)["skipped"]
    assert not aff.run(recipe, rundir, bootstrap=0)["skipped"]  # a changed option redoes the stage
    assert "low" not in np.load(folder / "affinity.npz")
    loaded = aff.load_affinity(rundir)
    assert loaded["tasks"] == ["seg", "depth", "edges"] and loaded["low"] is None


def test_stage_resumes_from_saved_rdms(tmp_path, fake_upstream):
    recipe, rundir = _done_pretrain(tmp_path)
    aff.run(recipe, rundir)
    first = np.load(rundir.path / "affinity" / "affinity.npz")["affinity"]
    rundir.update_stage("affinity", status="running")  # as if killed after the RDMs were saved
    saved = rundir.path / "affinity" / "rdms" / "seg.pt"
    torch.save(torch.load(saved) * 0 + torch.rand(3, 12, 12, generator=_gen(15), dtype=torch.float64), saved)
    aff.run(recipe, rundir)
    second = np.load(rundir.path / "affinity" / "affinity.npz")["affinity"]
    assert not np.allclose(first[:, 0, 1], second[:, 0, 1])  # the saved seg RDMs were used


def test_stage_rejects_more_images_than_the_split_has(tmp_path, fake_upstream):
    recipe, rundir = _done_pretrain(tmp_path)
    with pytest.raises(UserError, match="affinity.images: expected at most 30"):
        aff.run(recipe, rundir, images=31)


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
    RunDir(load_recipe("r.toml").run_dir).run_stage("pretrain", {}, [], lambda folder: {"outputs": []})
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

    monkeypatch.setattr(aff, "extract_rdms", extract)
    with pytest.raises(DataError, match="task 'edges' has the same dissimilarity for every image pair"):
        aff.run(recipe, rundir)
