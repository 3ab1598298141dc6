"""Distillation and loss balancing (branchnas.distill) against values computed by hand in numpy."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from branchnas.distill import FinetuneObjective, Teachers, feature_distillation, output_distillation


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_classification_is_t_squared_kl_of_the_softened_distributions():
    s, t = torch.randn(5, 4, generator=_gen(1)), torch.randn(5, 4, generator=_gen(2))
    temperature = 2.0
    p = _softmax(t.numpy().astype(np.float64) / temperature, 1)
    q = _softmax(s.numpy().astype(np.float64) / temperature, 1)
    expected = (p * (np.log(p) - np.log(q))).sum(1).mean() * temperature**2
    assert output_distillation("classification", s, t, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert output_distillation("classification", t, t, temperature).item() == pytest.approx(0, abs=1e-6)


def test_segmentation_leaves_out_unlabelled_pixels():
    s, t = torch.randn(2, 3, 4, 4, generator=_gen(3)), torch.randn(2, 3, 4, 4, generator=_gen(4))
    target = torch.randint(0, 3, (2, 4, 4), generator=_gen(5))
    target[0, :2] = 255
    p = _softmax(t.numpy().astype(np.float64), 1)
    q = _softmax(s.numpy().astype(np.float64), 1)
    per_pixel = (p * (np.log(p) - np.log(q))).sum(1)  # (2, 4, 4)
    expected = per_pixel[target.numpy() != 255].mean()
    got = output_distillation("segmentation", s, t, 1.0, target)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_binary_kinds_use_the_bernoulli_kl():
    s, t = torch.randn(6, generator=_gen(6)), torch.randn(6, generator=_gen(7))
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    p, q = sig(t.numpy().astype(np.float64) / 3), sig(s.numpy().astype(np.float64) / 3)
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    assert output_distillation("attribute", s, t, 3.0).item() == pytest.approx(kl.mean() * 9, rel=1e-4)
    assert output_distillation("edges", t, t, 1.0).item() == pytest.approx(0, abs=1e-6)


def test_dense_regression_kinds():
    s, t = torch.randn(2, 1, 3, 3, generator=_gen(8)), torch.randn(2, 1, 3, 3, generator=_gen(9))
    assert output_distillation("depth", s, t).item() == pytest.approx(np.abs(s.numpy() - t.numpy()).mean(), rel=1e-6)
    n_s, n_t = torch.randn(2, 3, 2, 2, generator=_gen(10)), torch.randn(2, 3, 2, 2, generator=_gen(11))
    a, b = n_s.numpy().astype(np.float64), n_t.numpy().astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert output_distillation("normals", n_s, n_t).item() == pytest.approx((1 - cos).mean(), rel=1e-5)
    with pytest.raises(ValueError, match="no output distillation"):
        output_distillation("nope", s, t)


def test_feature_distillation_is_the_mean_of_per_point_mse():
    s = [torch.randn(2, 3, 4, 4, generator=_gen(i)) for i in range(3)]
    t = [torch.randn(2, 3, 4, 4, generator=_gen(10 + i)) for i in range(3)]
    expected = np.mean([((a.numpy() - b.numpy()) ** 2).mean() for a, b in zip(s, t, strict=True)])
    assert feature_distillation(s, t).item() == pytest.approx(expected, rel=1e-5)


class _Backbone(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.stem = nn.Identity()
        self.blocks = nn.ModuleList([nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)])
        for block in self.blocks:
            nn.init.constant_(block.weight, scale)
            nn.init.zeros_(block.bias)


def test_objective_adds_weighted_terms_then_scales_and_teachers_get_no_gradient():
    tasks = [types.SimpleNamespace(name="a", kind="depth", target="a"),
             types.SimpleNamespace(name="b", kind="depth", target="b")]
    head = nn.Conv2d(2, 1, 1)
    nn.init.constant_(head.weight, 1.0)
    nn.init.zeros_(head.bias)
    teachers = Teachers({"a": (_Backbone(0.5), head), "b": (_Backbone(0.25), head)})
    x = torch.rand(2, 2, 3, 3, generator=_gen(12))
    t_out, t_feat = teachers(x, features=True)
    out = {"a": torch.zeros(2, 1, 3, 3, requires_grad=True), "b": torch.ones(2, 1, 3, 3, requires_grad=True)}
    feats = {"n0": torch.zeros(2, 2, 3, 3), "n1": torch.zeros(2, 2, 3, 3)}
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}
    objective = FinetuneObjective(tasks, teachers, outputs=0.5, features=2.0, scale={"a": 0.1, "b": 1.0},
                                  paths={"a": ["n0", "n1"], "b": ["n0", "n1"]})
    got = objective(x, out, losses, {}, feats)
    for name, s in (("a", 0.1), ("b", 1.0)):
        d = np.abs(out[name].detach().numpy() - t_out[name].numpy()).mean()
        f = np.mean([(t.numpy() ** 2).mean() for t in t_feat[name]])
        assert got[name].item() == pytest.approx(s * (losses[name].item() + 0.5 * d + 2.0 * f), rel=1e-5)
    got["a"].backward()
    assert out["a"].grad is not None and all(p.grad is None for p in teachers.parameters())
    assert not teachers.training and not teachers.train().training  # teachers stay in eval mode
    with pytest.raises(ValueError, match="positive and finite"):
        FinetuneObjective(tasks, None, scale={"a": 0.0})
