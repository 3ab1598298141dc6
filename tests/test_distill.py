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


def _conv_teachers(cache_bytes):
    torch.manual_seed(0)
    return Teachers({name: (_Stacked(), nn.Conv2d(3, 2, 3, padding=1)) for name in ("a", "b")},
                    cache_bytes=cache_bytes)


class _Stacked(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())])


def test_remembered_teachers_compute_the_training_images_once_and_answer_as_running_them():
    teachers = _conv_teachers(cache_bytes=1 << 20)
    images = torch.rand(6, 3, 5, 5, generator=_gen(20))
    calls = []

    def source():
        calls.append(1)
        return iter([images[:4], images[4:]])

    teachers.remember(source, mirrored=True)
    per_image = 2 * (2 * 5 * 5 * 4)  # two heads of 2x5x5 fp32 values
    # a batch of seen images, in another order, one of them mirrored
    batch = torch.stack([images[2], images[5].flip(-1), images[0]])
    got, _ = teachers(batch)
    assert len(calls) == 1 and teachers.cached_bytes == 12 * per_image  # six images and six mirrors
    assert (teachers.hits, teachers.misses) == (3, 0)
    reference, _ = teachers.run(batch)  # the teachers run on the batch: no table
    for task in ("a", "b"):
        assert torch.allclose(got[task], reference[task], atol=1e-6)
    # an image outside the table: the whole batch is run, and nothing is added
    outside = torch.stack([images[1], torch.rand(3, 5, 5, generator=_gen(22))])
    got, _ = teachers(outside)
    assert (teachers.hits, teachers.misses) == (3, 2) and teachers.cached_bytes == 12 * per_image
    for task in ("a", "b"):
        assert torch.equal(got[task], teachers.run(outside)[0][task])
    assert len(calls) == 1
    teachers.to(torch.float64).float()  # moved or cast: the table is dropped and computed again
    assert teachers.cached_bytes == 0
    teachers(batch)
    assert len(calls) == 2 and teachers.cached_bytes == 12 * per_image and teachers.hits == 3


def test_a_teacher_table_stops_at_its_budget_and_repeated_images_are_stored_once():
    images = torch.rand(5, 3, 5, 5, generator=_gen(21))
    per_image = 2 * (2 * 5 * 5 * 4)
    teachers = _conv_teachers(cache_bytes=3 * per_image)  # room for the first batch only
    teachers.remember(lambda: iter([images[:3], images[3:]]))
    got, _ = teachers(images[3:])  # its images did not fit: run
    assert teachers.cached_bytes == 3 * per_image and (teachers.hits, teachers.misses) == (0, 2)
    assert torch.equal(got["a"], teachers.run(images[3:])[0]["a"])
    teachers(images[:3])
    assert teachers.hits == 3
    twice = _conv_teachers(cache_bytes=1 << 20)
    twice.remember(lambda: iter([torch.stack([images[0], images[0], images[1]]), images[:2]]))
    twice(images[:1])
    assert twice.cached_bytes == 2 * per_image
    off = _conv_teachers(cache_bytes=1 << 20)
    off(images)  # nothing to remember: not even looked up
    assert off.cached_bytes == 0 and off.misses == 0
