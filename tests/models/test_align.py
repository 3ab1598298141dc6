"""The change of basis at branch points (branchnas.models.align), against numpy and exact cases.

The exact case: task ``b``'s single-task LeNet is task ``a``'s with every block's channels
permuted and positively scaled (ReLU and max-pooling commute with both), so ``b``'s features are
an exact linear function of ``a``'s at every branch point. A tree that gives ``b`` a node or a
head copied from ``b`` on top of ``a``'s features must then reproduce ``b``'s single-task
output exactly once aligned, and does not without.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import branchnas.models.align as align_module
from branchnas.backbones import build_backbone
from branchnas.heads import LinearHead
from branchnas.models import BranchedNet
from branchnas.models.align import align_inputs, fit_affine, fold_affine
from branchnas.recipe import BackboneConfig


def test_fit_affine_matches_numpy_least_squares():
    gen = np.random.default_rng(0)
    x = gen.normal(size=(500, 6)) * gen.uniform(0.5, 3, size=6) + gen.normal(size=6)
    y = x @ gen.normal(size=(6, 4)) + gen.normal(size=4) + 0.3 * gen.normal(size=(500, 4))
    design = np.hstack([x, np.ones((500, 1))])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    m, c = fit_affine(torch.tensor(x), torch.tensor(y), ridge=0.0)
    np.testing.assert_allclose(m.numpy(), coef[:-1].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c.numpy(), coef[-1], rtol=1e-4, atol=1e-5)
    # the ridge shrinks M towards 0 (and moves c to keep the mean)
    m_ridge, _ = fit_affine(torch.tensor(x), torch.tensor(y), ridge=10.0)
    assert m_ridge.norm() < 0.5 * m.norm()


@pytest.mark.parametrize("bias", [True, False])
def test_fold_affine_into_a_convolution_and_its_batchnorm(bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, bias=bias)
    norm = nn.BatchNorm2d(7).eval()
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2)
    m, c, x = torch.randn(5, 5), torch.randn(5), torch.randn(2, 5, 9, 9)
    mapped = torch.einsum("ij,bjhw->bihw", m, x) + c.view(1, -1, 1, 1)
    with torch.no_grad():
        expected = norm(conv(mapped))
        fold_affine(conv, m, c, norm)
        got = norm(conv(x))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fold_affine_into_a_linear_layer():
    torch.manual_seed(1)
    fc = nn.Linear(5, 3)
    m, c, x = torch.randn(5, 5), torch.randn(5), torch.randn(8, 5)
    with torch.no_grad():
        expected = fc(x @ m.T + c)
        fold_affine(fc, m, c)
        torch.testing.assert_close(fc(x), expected, rtol=1e-5, atol=1e-5)


def _pair():
    """Backbones and heads of tasks ``a`` and ``b``; ``b``'s features are ``a``'s permuted and scaled."""
    torch.manual_seed(0)
    a = build_backbone(BackboneConfig(name="lenet5", width=0.5), 1, (16, 16)).eval()
    b = build_backbone(BackboneConfig(name="lenet5", width=0.5), 1, (16, 16)).eval()
    perms, scales = [], []
    with torch.no_grad():
        previous_perm, previous_scale = None, None
        for block_a, block_b in zip(a.blocks, b.blocks, strict=True):
            conv_a, conv_b = block_a[0], block_b[0]
            out = conv_a.out_channels
            perm, scale = torch.randperm(out), torch.rand(out) * 2 + 0.5
            weight = conv_a.weight.clone()
            if previous_perm is not None:  # read the previous block's permuted, scaled channels
                weight = weight[:, previous_perm] / previous_scale.view(1, -1, 1, 1)
            conv_b.weight.copy_(weight[perm] * scale.view(-1, 1, 1, 1))
            conv_b.bias.copy_(conv_a.bias[perm] * scale)
            perms.append(perm)
            scales.append(scale)
            previous_perm, previous_scale = perm, scale
    heads = {"a": LinearHead(a.blocks[-1][0].out_channels, 3), "b": LinearHead(b.blocks[-1][0].out_channels, 3)}
    return {"a": a, "b": b}, heads, perms, scales


def _single_task(backbone, head, x):
    with torch.no_grad():
        return head(backbone(x))


def test_the_pair_is_a_change_of_basis():
    backbones, _, perms, scales = _pair()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        fa = backbones["a"](x)
        fb = backbones["b"](x)
    torch.testing.assert_close(fb, fa[:, perms[-1]] * scales[-1].view(1, -1, 1, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tree, aligned", [
    ([[("a", "b")], [("a",), ("b",)]], {"b1_1"}),      # b's conv2 node on a's conv1 (then b's head reads its own)
    ([[("a", "b")], [("a", "b")]], {"head:b"}),                  # b's head on a's conv2
])
def test_alignment_reproduces_the_single_task_model_exactly(tree, aligned):
    backbones, heads, _, _ = _pair()
    torch.manual_seed(3)
    fit_images, x = torch.randn(48, 1, 16, 16), torch.randn(6, 1, 16, 16)
    expected = _single_task(backbones["b"], heads["b"], x)
    plain = BranchedNet.from_single_task(tree, backbones, heads, init="first", tasks=["a", "b"]).eval()
    with torch.no_grad():
        assert (plain(x)["b"] - expected).abs().max() > 0.05  # unaligned, b reads a's channels
    net = BranchedNet.from_single_task(tree, backbones, heads, init="first", tasks=["a", "b"]).eval()
    report = align_inputs(net, backbones, fit_images, ridge=0.0)
    assert set(report) == aligned
    for entry in report.values():
        assert entry["kept"] and entry["source"] == "b" and entry["error_after"] < 1e-6 < entry["error_before"]
    with torch.no_grad():
        torch.testing.assert_close(net(x)["b"], expected, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(net(x)["a"], _single_task(backbones["a"], heads["a"], x))


def test_from_single_task_aligns_when_given_images_and_records_it():
    backbones, heads, _, _ = _pair()
    tree = [[("a", "b")], [("a",), ("b",)]]
    net = BranchedNet.from_single_task(tree, backbones, heads, init="first", tasks=["a", "b"],
                                       align=torch.randn(32, 1, 16, 16))
    assert net.alignment["b1_1"]["kept"] and set(net.alignment) <= {"b1_1", "head:b"}
    assert BranchedNet.from_single_task(tree, backbones, heads, init="first", tasks=["a", "b"]).alignment == {}
    # nothing to align in the all-separate tree: every node reads its own model's features
    separate = [[("a",), ("b",)], [("a",), ("b",)]]
    assert BranchedNet.from_single_task(separate, backbones, heads, init="first", tasks=["a", "b"],
                                        align=torch.randn(8, 1, 16, 16)).alignment == {}


def test_a_fold_that_does_not_help_is_undone(monkeypatch):
    backbones, heads, _, _ = _pair()
    tree = [[("a", "b")], [("a",), ("b",)]]
    net = BranchedNet.from_single_task(tree, backbones, heads, init="first", tasks=["a", "b"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    # a useless map: every channel becomes a large constant
    monkeypatch.setattr(align_module, "_solve", lambda xx, xy, sx, sy, n, ridge: (
        torch.zeros(len(xy.T), len(xx)), torch.full((len(xy.T),), 1e3)))
    report = align_inputs(net, backbones, torch.randn(16, 1, 16, 16))
    assert report and not any(entry["kept"] for entry in report.values())
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_resnet_folds_into_the_first_convolution_and_its_batchnorm():
    """ResNet-20's option-A shortcut reads the input too, so the fold there is partial: the
    readers are exactly the first basic block's first conv (with its BatchNorm)."""
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="resnet20", width=0.25), 3, (16, 16))
    block = backbone.blocks[1]
    x = torch.randn(2, block[0].conv1.in_channels, 8, 8)
    readers = align_module._readers(block, x)
    assert [(layer, norm) for layer, norm in readers] == [(block[0].conv1, block[0].bn1)]
