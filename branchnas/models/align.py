"""Basis alignment where a node or head starts from weights trained on other features.

A branched network is initialised from single-task models (:meth:`BranchedNet.from_single_task`),
so a node whose parent came from another task's model receives features in that model's
basis, not its own: the channels of two independently trained networks are in no particular
correspondence. The affinity that chose the tree (RSA) compares representations up to such a
change of basis, so two tasks can look alike to the search while the child's weights, as
copied, read its parent's features as noise: on the digits recipe, LeNet's second convolution
for ``right`` on ``left``'s first convolution scores 11% (chance) instead of 59%.

:func:`align_inputs` fixes the basis before fine-tuning. For every node (in plan order) and
head whose input differs from what its source model fed it, it fits the least-squares affine
map ``y ~ M x + c`` per pixel from the features the network gives it (``x``) to those its
source model gave it (``y``) on a batch of training images, and folds the map into the
layers that read the input: ``W' = W M`` and ``b' = b + W c`` (summed over the kernel) for a
convolution or linear layer; per-channel averaging in between (global average pooling)
commutes with the map, so a linear head is folded exactly. A layer that reads the input in any
other way (an identity shortcut) keeps the unaligned input, so the fold is checked: it is
kept only when it removes at least half of the difference between the module's output on these
images and what the same module computes from its source's own features.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["align_inputs", "fit_affine", "fold_affine"]

#: Ridge of the least-squares fit, relative to each input channel's variance (so the same on
#: standardised channels): channels that barely vary get no large coefficients.
RIDGE = 1e-2
#: A fold is kept only when it leaves at most this share of the output error. A map that
#: explains little of the wanted features only scales the weights up: on digits, ``right``'s
#: head on ``parity``'s features (error 0.997 -> 0.953) started training at 5x chance's loss
#: and ended 84% below its single-task accuracy.
KEEP = 0.5
#: A relative output error below which a module already reads its source's features (float noise).
SAME = 1e-6
#: Images per forward pass while collecting features.
CHUNK = 32


def fit_affine(x: Tensor, y: Tensor, ridge: float = RIDGE) -> tuple[Tensor, Tensor]:
    """The ridge least-squares affine map ``y ~ x @ M.T + c`` over rows.

    Args:
        x: ``(P, C_in)`` inputs (one row per pixel).
        y: ``(P, C_out)`` targets.
        ridge: Penalty on ``M`` relative to each column's variance (the intercept is not
            penalised).

    Returns:
        ``(M (C_out, C_in), c (C_out,))`` in float32.
    """
    return _solve(*_normal_equations(x, y), ridge)


def _normal_equations(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Sums for :func:`_solve`: ``x^T x``, ``x^T y``, ``sum x``, ``sum y`` and the row count (float64)."""
    x, y = x.double(), y.double()
    return x.T @ x, x.T @ y, x.sum(0), y.sum(0), len(x)


def _solve(xx: Tensor, xy: Tensor, sx: Tensor, sy: Tensor, n: int, ridge: float = RIDGE) -> tuple[Tensor, Tensor]:
    """Solve the centred normal equations: ``(cov_x + ridge * diag(cov_x)) M^T = cov_xy``."""
    mx, my = sx / n, sy / n
    cxx = xx / n - torch.outer(mx, mx)
    cxy = xy / n - torch.outer(mx, my)
    floor = float(cxx.diagonal().mean().clamp_min(1e-12)) * 1e-6  # a constant channel stays solvable
    m_t = torch.linalg.solve(cxx + torch.diag(ridge * cxx.diagonal() + floor), cxy)
    c = my - mx @ m_t
    return m_t.T.float().contiguous(), c.float()


def fold_affine(layer: nn.Module, m: Tensor, c: Tensor, norm: nn.Module | None = None) -> None:
    """Make ``layer`` (a conv with ``groups == 1`` or a linear layer) read ``x`` as it read ``M x + c``.

    The constant ``W c`` goes to the layer's bias; a layer without one passes it to ``norm``,
    the BatchNorm that reads its output, whose running mean absorbs it (BatchNorm removes a
    per-channel constant from its input anyway, so this is exact in both modes). Exact for a
    linear layer and for a convolution away from its zero padding (at the border the padded
    taps of ``c`` are counted as if the image went on).
    """
    w = layer.weight
    with torch.no_grad():
        shift = (w * c.view(1, -1, *([1] * (w.dim() - 2)))).flatten(1).sum(1)
        if layer.bias is not None:
            layer.bias.add_(shift)
        elif norm is not None and norm.running_mean is not None:
            norm.running_mean.sub_(shift)
        layer.weight.copy_(torch.einsum("oi...,ij->oj...", w, m))


def _readers(module: nn.Module, x: Tensor) -> list[tuple[nn.Module, nn.Module | None]]:
    """The conv (``groups == 1``) and linear layers of ``module`` that read ``x`` itself or a
    channel-wise average of it (a view of an average-pooling output), found by running it,
    each with the BatchNorm that reads its output (or ``None``)."""
    x = x.clone()  # the module's own copy: it may work in place
    averaged = {x.data_ptr(): x}  # tensors are kept alive so that no other reuses the address
    outputs: dict[int, tuple[nn.Module, Tensor]] = {}
    readers: dict[nn.Module, nn.Module | None] = {}
    hooks = []

    def pooled(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if isinstance(args[0], Tensor) and args[0].data_ptr() in averaged and isinstance(out, Tensor):
            averaged[out.data_ptr()] = out

    def reads(mod: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor) and args[0].data_ptr() in averaged:
            readers.setdefault(mod, None)

    def wrote(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if mod in readers and isinstance(out, Tensor):
            outputs[out.data_ptr()] = (mod, out)

    def normalises(mod: nn.Module, args: tuple[Any, ...]) -> None:
        found = outputs.get(args[0].data_ptr()) if args and isinstance(args[0], Tensor) else None
        if found is not None and readers[found[0]] is None:
            readers[found[0]] = mod

    for sub in module.modules():
        if isinstance(sub, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            hooks.append(sub.register_forward_hook(pooled))
        elif (isinstance(sub, nn.Conv2d) and sub.groups == 1) or isinstance(sub, nn.Linear):
            hooks.append(sub.register_forward_pre_hook(reads))
            hooks.append(sub.register_forward_hook(wrote))
        elif isinstance(sub, nn.BatchNorm2d):
            hooks.append(sub.register_forward_pre_hook(normalises))
    try:
        with torch.no_grad():
            module(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [(layer, norm) for layer, norm in readers.items() if layer.weight.shape[1] == x.shape[1]]


def _rows(features: Tensor) -> Tensor:
    """``(B, C, H, W)`` or ``(B, C)`` features as ``(pixels, C)`` rows."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def _relative_error(out: Tensor, ref: Tensor) -> float:
    """Mean squared difference over the reference's variance."""
    return float(((out - ref) ** 2).mean() / ref.var().clamp_min(1e-12))


def align_inputs(net: Any, backbones_by_task: Mapping[str, nn.Module], images: Tensor,
                 ridge: float = RIDGE) -> dict[str, dict[str, Any]]:
    """Fold the basis change into every node and head whose input is not its source's own.

    Args:
        net: A :class:`branchnas.models.BranchedNet` fresh from ``from_single_task`` with an
            explicit source per node (``net.sources``; nodes without one, from ``average`` or
            ``scratch``, are left alone).
        backbones_by_task: The single-task backbones it was built from.
        images: Normalised training images ``(K, C, H, W)``.
        ridge: See :func:`fit_affine`.

    Returns:
        ``{node or "head:<task>": {"source": task, "error_before": e0, "error_after": e1,
        "kept": bool}}`` for every place that received foreign features, where ``e`` is the
        mean squared difference of its output from its source's, over the variance of the
        latter, on ``images``.
    """
    modes = [(m, m.training) for m in (net, *backbones_by_task.values())]
    for module, _ in modes:
        module.eval()  # BatchNorm's running statistics, as the single-task models computed them
    report: dict[str, dict[str, Any]] = {}
    # (report key, module, source task, the nodes its input passes through): nodes in plan order, then heads
    sources = getattr(net, "sources", None) or {}
    places = [(name, net.nodes[name], sources[name], net.task_path(net.node_groups[name][0])[:_depth(name)])
              for name, _ in net.plan if sources.get(name) is not None]
    places += [(f"head:{task}", net.heads[task], task, net.task_path(task)) for task in net.task_names]
    try:
        for key, module, source, path in places:
            entry = _align_one(module, net, path, backbones_by_task[source], images, ridge)
            if entry is not None:
                report[key] = {"source": source, **entry}
    finally:
        for module, mode in modes:
            module.train(mode)
    return report


def _depth(node: str) -> int:
    """The block index of a node name (``b2_0_3`` -> 2)."""
    return int(node[1:].split("_", 1)[0])


def _path_output(net: Any, path: list[str], x: Tensor) -> Tensor:
    """The stem of ``net`` and then the nodes of ``path`` (a prefix of a task's path) on images ``x``."""
    out = net.stem(x)
    for node in path:
        out = net.nodes[node](out)
    return out


def _backbone_output(backbone: nn.Module, depth: int, x: Tensor) -> Tensor:
    """The input of block ``depth`` of a single-task backbone (``depth == len(blocks)``: its output)."""
    out = backbone.stem(x)
    for block in backbone.blocks[:depth]:
        out = block(out)
    return out


def _align_one(module: nn.Module, net: Any, path: list[str], source: nn.Module, images: Tensor,
               ridge: float) -> dict[str, Any] | None:
    """Fit, fold and check one module that reads ``net``'s features after ``path``, against what
    it read in its ``source`` backbone; ``None`` when it already computes what it did there."""
    with torch.no_grad():
        chunks = [(_path_output(net, path, x), _backbone_output(source, len(path), x)) for x in images.split(CHUNK)]
        reference = torch.cat([module(b.clone()) for _, b in chunks])
        before = torch.cat([module(a.clone()) for a, _ in chunks])
        error_before = _relative_error(before, reference)
        if error_before < SAME:
            return None
        sums = None
        for a, b in chunks:
            part = _normal_equations(_rows(a), _rows(b))
            sums = part if sums is None else tuple(s + p for s, p in zip(sums, part, strict=True))
        m, c = _solve(*sums, ridge=ridge)
        readers = _readers(module, chunks[0][0])
        if not readers:
            return {"error_before": error_before, "error_after": error_before, "kept": False}
        saved = {k: v.clone() for k, v in module.state_dict().items()}
        for layer, norm in readers:
            fold_affine(layer, m, c, norm)
        after = torch.cat([module(a.clone()) for a, _ in chunks])
    error_after = _relative_error(after, reference)
    kept = error_after <= KEEP * error_before
    if not kept:
        module.load_state_dict(saved)
    return {"error_before": error_before, "error_after": error_after, "kept": kept}
