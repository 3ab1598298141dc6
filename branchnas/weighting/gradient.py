"""Schemes that work on the tasks' gradients of the shared parameters: PCGrad, GradNorm, MGDA,
GradDrop, IMTL and GradVac."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from branchnas.errors import unknown_choice
from branchnas.tasks import Task
from branchnas.weighting._base import LossWeighting, _loss_values, _TaskState, register_weighting

#: Why none of these schemes trains under DDP (``LossWeighting.ddp_conflict``).
_PER_PROCESS = ("it works on each process's own per-task gradients, which DDP does not average "
                "(the processes' weights would drift apart)")


def project_conflicting(grads: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """PCGrad's projection (Yu et al., NeurIPS 2020, Algorithm 1) on flat gradients.

    For each task i, starting from ``g_i``, and for each other task j in ``orders[i]``: when
    the running ``g_i`` conflicts with the *original* ``g_j`` (negative dot product), remove
    its component along ``g_j``: ``g_i -= (g_i·g_j / |g_j|²) g_j``.

    Args:
        grads: ``(T, N)`` per-task gradients.
        orders: For each task, the order in which to visit the other tasks.

    Returns:
        ``(T, N)`` projected gradients; their sum is PCGrad's update.
    """
    projected = grads.clone()
    for i, order in enumerate(orders):
        g = projected[i]
        for j in order:
            if j == i:
                continue
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g -= dot / grads[j].square().sum() * grads[j]
    return projected


def _trainable(shared: Sequence[Tensor]) -> list[Tensor]:
    return [p for p in shared if p.requires_grad]


def _task_gradients(losses: Sequence[Tensor], shared: Sequence[Tensor]) -> Tensor:
    """``(T, N)``: row t is the gradient of ``losses[t]`` w.r.t. every ``shared`` tensor,
    flattened and concatenated (zeros where a loss does not depend on a tensor)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(shared), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([
            (torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(shared, grads, strict=True)
        ]))
    return torch.stack(rows)


def _gram(flat: Tensor) -> Tensor:
    """``(T, T)`` float64 Gram matrix ``g_i · g_j`` of ``(T, N)`` gradients, one pair at a time
    (so no float64 copy of all T gradients is ever held)."""
    t = flat.shape[0]
    gram = torch.zeros(t, t, dtype=torch.float64)
    for i in range(t):
        gi = flat[i].double()
        for j in range(i, t):
            gram[i, j] = gram[j, i] = float(torch.dot(gi, flat[j].double()))
    return gram


def _backward_with_shared(total: Tensor, shared: Sequence[Tensor], update: Tensor) -> None:
    """Backpropagate ``total`` into every parameter, then give the ``shared`` ones ``update``
    (a flat vector, added to what their ``.grad`` held before) instead of ``total``'s gradient."""
    before = [None if p.grad is None else p.grad.clone() for p in shared]
    total.backward()
    offset = 0
    for p, old in zip(shared, before, strict=True):
        n = p.numel()
        new = update[offset:offset + n].view_as(p).to(p.dtype)
        p.grad = new if old is None else old + new
        offset += n


def _backward_with_surgery(weighted: Sequence[Tensor], shared: Sequence[Tensor],
                           surgery: Callable[[Tensor], tuple[Tensor, Any]]) -> Any:
    """Backpropagate ``Σ weighted``, the shared parameters getting ``surgery(task gradients)[0]``.

    ``surgery`` maps the ``(T, N)`` per-task gradients of the shared parameters to the flat
    update that replaces their summed gradient, and anything else it wants returned. With one
    task or no trainable shared parameter the plain sum is backpropagated (and ``surgery``
    never runs, so it draws no random numbers); the result is then ``None``.
    """
    shared = _trainable(shared)
    if len(weighted) < 2 or not shared:
        sum(weighted).backward()  # type: ignore[union-attr]
        return None
    update, extra = surgery(_task_gradients(weighted, shared))
    # The plain backward gives the task-specific gradients; the shared ones are replaced.
    _backward_with_shared(sum(weighted), shared, update)  # type: ignore[arg-type]
    return extra


def _grad_norm(loss: Tensor, shared: Sequence[Tensor]) -> float:
    """``‖∇ loss‖`` over every ``shared`` tensor together (one device sync)."""
    grads = [g for g in torch.autograd.grad(loss, list(shared), retain_graph=True, allow_unused=True) if g is not None]
    return math.sqrt(float(sum(g.double().square().sum() for g in grads))) if grads else 0.0



@register_weighting("pcgrad")
class PCGrad(LossWeighting):
    """Projecting Conflicting Gradients (Yu et al., "Gradient surgery", NeurIPS 2020).

    The shared parameters get ``Σ_t PC(w_t ∇L_t)`` from :func:`project_conflicting`, with
    every task visiting the others in a fresh random order (the seeded generator); all
    shared parameters form one flat vector, as in the paper. Every other parameter gets its
    plain gradient of ``Σ_t w_t L_t``. This costs T backward passes through the shared part
    plus one full one.
    """

    ddp_conflict = _PER_PROCESS

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[Tensor]) -> dict[str, float]:
        weights = self.weights(losses)
        names = list(losses)

        def surgery(flat: Tensor) -> tuple[Tensor, None]:
            orders = [torch.randperm(len(names), generator=self.generator).tolist() for _ in names]
            return project_conflicting(flat, orders).sum(0), None

        _backward_with_surgery([weights[name] * losses[name] for name in names], shared, surgery)
        return weights



@register_weighting("gradnorm")
class GradNorm(_TaskState):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

    Learnable task weights ``v_t`` (initially 1) scale the losses: ``Σ_t v_t L_t``. Every
    step also takes one gradient step on the GradNorm loss::

        L_grad = Σ_t | G_t - Ḡ · r_t^α |,   G_t = ‖∇_W v_t L_t‖ = v_t ‖∇_W L_t‖,
        Ḡ = mean_t G_t,   r_t = L̃_t / mean_s L̃_s,   L̃_t = L_t / L_t(0)

    with the target ``Ḡ r_t^α`` held constant (as in the paper). Since ``G_t`` is linear in
    ``v_t``, ``∂L_grad/∂v_t = sign(G_t - Ḡ r_t^α) ‖∇_W L_t‖`` exactly, so no second-order
    backward is needed. The step is plain gradient descent inside the scheme,
    ``v ← v - lr ∂L_grad/∂v``, then ``v`` is clamped to at least 1e-6 and renormalised to
    ``Σ_t v_t = T`` (the paper's renormalisation; the clamp keeps weights positive). The
    weights used for a step's losses are those before its update, as in the paper's
    Algorithm 1. ``L_t(0)`` is each task's loss at its first step.

    ``W`` is *all* shared parameters (one flat vector), not only the last shared layer the
    paper suggests for speed: the trainer passes no "last layer", and the last tensor of the
    shared list can be a normalisation bias. This costs T backward passes through the shared
    part plus one full one. The recipe weight ρ_t multiplies on top: the loss is
    ``Σ_t ρ_t v_t L_t`` while ``v`` balances the raw losses.

    Args:
        alpha: α, the strength of the pull towards equal training rates.
        lr: Learning rate of ``v`` (0.025 in the paper).
    """

    ddp_conflict = _PER_PROCESS

    def __init__(self, tasks: Sequence[Task], seed: int = 0, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(tasks, seed)
        if alpha < 0 or lr < 0:
            raise ValueError(f"gradnorm: alpha and lr must be >= 0; got alpha={alpha}, lr={lr}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.task_weights = torch.ones(len(self.task_names), dtype=torch.float64)
        self.initial_losses = torch.full((len(self.task_names),), math.nan, dtype=torch.float64)

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        return {
            name: self._recipe_weight(name) * float(self.task_weights[i])
            for name, i in zip(losses, self._indices(list(losses)), strict=True)
        }

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[Tensor]) -> dict[str, float]:
        weights = self.weights(losses)
        names = list(losses)
        shared = _trainable(shared)
        if len(names) >= 2 and shared:
            norms = torch.tensor([_grad_norm(losses[name], shared) for name in names], dtype=torch.float64)
            self.update(self._indices(names), _loss_values([losses[n] for n in names]), norms)
        sum(weights[name] * losses[name] for name in names).backward()  # type: ignore[union-attr]
        return weights

    def update(self, indices: Sequence[int], values: Tensor, norms: Tensor) -> None:
        """One step on ``v`` from the tasks' loss values and raw gradient norms ``‖∇_W L_t‖``."""
        idx = torch.tensor(list(indices))
        first = self.initial_losses[idx]
        first = torch.where(torch.isnan(first), values, first)
        self.initial_losses[idx] = first
        v = self.task_weights[idx]
        g = v * norms
        ratio = values / first.clamp_min(1e-12)  # L̃_t
        rate = ratio / ratio.mean() if float(ratio.mean()) > 0 else torch.ones_like(ratio)  # r_t
        target = g.mean() * rate ** self.alpha
        v = (v - self.lr * torch.sign(g - target) * norms).clamp_min(1e-6)
        self.task_weights[idx] = v * len(idx) / v.sum()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "task_weights": self.task_weights.clone(),
                "initial_losses": self.initial_losses.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.task_weights = state["task_weights"].clone().double()
        self.initial_losses = state["initial_losses"].clone().double()


def min_norm_weights(gram: Tensor, max_iter: int = 1000, tol: float = 1e-10) -> Tensor:
    """The min-norm point of the convex hull of T vectors, from their Gram matrix ``M``.

    Solves MGDA's quadratic program (Sener & Koltun, NeurIPS 2018, eq. 3)::

        α* = argmin_{α ≥ 0, Σ α = 1} ‖Σ_t α_t g_t‖² = argmin α^T M α

    For T = 2 with the closed form of the paper's Algorithm 1,
    ``α_1 = clip((g_2 - g_1)·g_2 / ‖g_1 - g_2‖², 0, 1)``; for T > 2 with Frank–Wolfe (the paper's
    Algorithm 2) plus *away steps*, which converge linearly on the simplex (the plain
    algorithm zig-zags when the optimum lies on a face). Each step moves along
    ``d = e_s - α`` (towards the vertex ``s = argmin_t (Mα)_t``) or ``d = α - e_a`` (away from
    the worst used vertex), with the exact line search ``γ = -α^T M d / d^T M d``. It stops
    when the duality gap ``α^T M α - min_t (Mα)_t`` is below ``tol · α^T M α``.

    Returns:
        ``(T,)`` float64 weights on the simplex.
    """
    m = gram.double().cpu()
    t = m.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64)
    if t == 2:
        denom = float(m[0, 0] + m[1, 1] - 2 * m[0, 1])
        a = 0.5 if denom <= 0 else min(1.0, max(0.0, float(m[1, 1] - m[0, 1]) / denom))
        return torch.tensor([a, 1.0 - a], dtype=torch.float64)
    alpha = torch.full((t,), 1.0 / t, dtype=torch.float64)
    for _ in range(max_iter):
        grad = m @ alpha  # half the gradient of α^T M α
        value = float(alpha @ grad)
        s = int(torch.argmin(grad))
        fw_gap = value - float(grad[s])
        if fw_gap <= tol * max(value, 1e-300):
            break
        used = torch.nonzero(alpha > 0).flatten()
        a = int(used[torch.argmax(grad[used])])
        away_gap = float(grad[a]) - value
        away = away_gap > fw_gap
        if away:
            d = alpha.clone()
            d[a] -= 1
            step_max = float(alpha[a] / (1 - alpha[a]))
        else:
            d = -alpha.clone()
            d[s] += 1
            step_max = 1.0
        curvature = float(d @ m @ d)
        step = step_max if curvature <= 0 else min(step_max, -float(grad @ d) / curvature)
        alpha = alpha + step * d
        if away and step == step_max:
            alpha[a] = 0.0  # a drop step: vertex a leaves the support exactly
        alpha = alpha.clamp_min(0)
        alpha = alpha / alpha.sum()
    return alpha


_MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register_weighting("mgda")
class MGDA(_TaskState):
    """MGDA (Sener & Koltun, "Multi-task learning as multi-objective optimization", NeurIPS 2018).

    Each step computes the tasks' gradients ``g_t = ∇_W L_t`` on the shared parameters (all
    of them, one flat vector), divides each by its normaliser ``n_t`` and finds the min-norm
    point of their convex hull with :func:`min_norm_weights`::

        α = argmin_{α ≥ 0, Σ α = 1} ‖Σ_t α_t g_t / n_t‖²

    then backpropagates ``Σ_t ρ_t α_t L_t`` (ρ_t the recipe weight) through the whole model:
    the shared parameters get ``Σ_t ρ_t α_t g_t`` and the task-specific ones the same
    weighted sum. As in the authors' code the weights multiply the *raw* losses, whatever
    the normalisation. ``n_t`` is 1 (``none``), ``‖g_t‖`` (``l2``), ``L_t`` (``loss``) or
    ``L_t ‖g_t‖`` (``loss+``); a normaliser that is not positive counts as 1.

    MGDA-UB (gradients w.r.t. the shared representation instead of the parameters) is not
    implemented: the trainer passes the shared parameters, not the representation.

    Args:
        normalization: ``none``, ``l2``, ``loss`` or ``loss+``.
    """

    ddp_conflict = _PER_PROCESS

    def __init__(self, tasks: Sequence[Task], seed: int = 0, normalization: str = "none") -> None:
        super().__init__(tasks, seed)
        if normalization not in _MGDA_NORMALIZATIONS:
            raise ValueError(unknown_choice("MGDA normalization", normalization, _MGDA_NORMALIZATIONS))
        self.normalization = normalization

    def solve(self, gram: Tensor, values: Tensor) -> Tensor:
        """MGDA's weights from the raw gradients' Gram matrix and the loss values."""
        norms = gram.diagonal().clamp_min(0).sqrt()
        n = {"none": torch.ones_like(values), "l2": norms, "loss": values, "loss+": values * norms}[self.normalization]
        n = torch.where(n > 0, n, torch.ones_like(n))
        return min_norm_weights(gram / (n[:, None] * n[None, :]))

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[Tensor]) -> dict[str, float]:
        names = list(losses)
        self._indices(names)
        shared = _trainable(shared)
        if len(names) < 2 or not shared:
            alpha = [1.0] * len(names)
        else:
            flat = _task_gradients([losses[n] for n in names], shared)
            alpha = self.solve(_gram(flat), _loss_values([losses[n] for n in names])).tolist()
            del flat
        weights = {name: self._recipe_weight(name) * a for name, a in zip(names, alpha, strict=True)}
        sum(weights[name] * losses[name] for name in names).backward()  # type: ignore[union-attr]
        return weights


def drop_signs(grads: Tensor, uniform: Tensor, leak: float = 0.0) -> Tensor:
    """GradDrop's masked sum (Chen et al., NeurIPS 2020, Algorithm 1) on flat gradients.

    Per element, the positive-sign purity ``P = ½ (1 + Σ_t g_t / Σ_t |g_t|)`` (½ where every
    gradient is 0); with ``U`` uniform on [0, 1), task t keeps ``g_t`` where
    ``M_t = [P > U][g_t > 0] + [P < U][g_t < 0]`` is 1, and the result is
    ``Σ_t (ℓ + (1 - ℓ) M_t) g_t`` with the leak ℓ.

    Args:
        grads: ``(T, N)`` per-task gradients.
        uniform: ``(N,)`` draws of ``U``.
        leak: ℓ; 1 keeps every gradient (the plain sum).
    """
    total = grads.sum(0)
    size = grads.abs().sum(0)
    purity = 0.5 * (1 + torch.where(size > 0, total / torch.where(size > 0, size, 1), 0))
    keep = ((purity > uniform) & (grads > 0)) | ((purity < uniform) & (grads < 0))
    return (grads * (leak + (1 - leak) * keep.to(grads.dtype))).sum(0)


@register_weighting("graddrop")
class GradDrop(LossWeighting):
    """Gradient Sign Dropout (Chen et al., "Just pick a sign", NeurIPS 2020).

    The shared parameters get :func:`drop_signs` of the tasks' gradients ``∇ w_t L_t`` (all
    shared parameters as one flat vector), with ``U`` drawn from the scheme's seeded CPU
    generator every step: per element, only gradients of one sign survive, positive with
    probability ``P``. The task-specific parameters get the plain gradient of
    ``Σ_t w_t L_t``. The paper applies GradDrop to the gradient w.r.t. a shared activation
    (summed over the batch after a sign correction); the trainer passes no activation, so
    here it acts on the shared parameters' gradients, as LibMTL's parameter mode would.

    Args:
        leak: ℓ in [0, 1]: the share of every gradient that always passes.
    """

    ddp_conflict = _PER_PROCESS

    def __init__(self, tasks: Sequence[Task], seed: int = 0, leak: float = 0.0) -> None:
        super().__init__(tasks, seed)
        if not 0 <= leak <= 1:
            raise ValueError(f"graddrop: leak must be in [0, 1]; got {leak}")
        self.leak = float(leak)

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[Tensor]) -> dict[str, float]:
        weights = self.weights(losses)

        def surgery(flat: Tensor) -> tuple[Tensor, None]:
            uniform = torch.rand(flat.shape[1], generator=self.generator).to(flat.device)
            return drop_signs(flat, uniform, self.leak), None

        _backward_with_surgery([weights[name] * losses[name] for name in losses], shared, surgery)
        return weights


def imtl_alpha(gram: Tensor) -> Tensor:
    """IMTL-G's weights (Liu et al., "Towards impartial multi-task learning", ICLR 2021).

    With ``u_t = g_t / ‖g_t‖``, the rows ``D = [g_1 - g_2; ...; g_1 - g_T]`` and
    ``U = [u_1 - u_2; ...; u_1 - u_T]``::

        α_{2:T} = g_1 U^T (D U^T)^{-1},   α_1 = 1 - Σ_{t≥2} α_t

    so that ``g = Σ_t α_t g_t`` has the same projection ``g · u_t`` on every task. Computed
    from the Gram matrix ``M_ij = g_i · g_j`` in float64 (``g_i · u_j = M_ij / ‖g_j‖``); the
    inverse is a pseudo-inverse so that equal or zero gradients give finite weights.

    Returns:
        ``(T,)`` float64 weights that sum to 1.
    """
    m = gram.double().cpu()
    t = m.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64)
    norms = m.diagonal().clamp_min(0).sqrt()
    k = m / torch.where(norms > 0, norms, 1)[None, :]  # k_ij = g_i · u_j (0 for a zero g_j)
    g1_ut = k[0, 0] - k[0, 1:]  # g_1 · (u_1 - u_b)
    d_ut = k[0, 0] - k[0, 1:][None, :] - k[1:, 0][:, None] + k[1:, 1:]  # (g_1 - g_a) · (u_1 - u_b)
    rest = g1_ut @ torch.linalg.pinv(d_ut)
    return torch.cat([(1 - rest.sum()).reshape(1), rest])


@register_weighting("imtl")
class IMTL(LossWeighting):
    """Impartial Multi-Task Learning (Liu et al., ICLR 2021): IMTL-G, optionally with IMTL-L.

    IMTL-G: the shared parameters get ``Σ_t α_t g_t`` with ``g_t = ∇_W L_t`` (all shared
    parameters, one flat vector) and α from :func:`imtl_alpha`, the closed form that gives
    the combined gradient equal projections onto every task's unit gradient. With the
    recipe weights ρ_t the shared gradient is ``Σ_t ρ_t α_t g_t`` (so ρ scales on top of the
    balance, which it would otherwise cancel). The task-specific parameters get the plain
    gradient of ``Σ_t ρ_t L_t``; the returned weights are ``ρ_t α_t``, those of the shared
    gradient.

    IMTL-L (``loss_scale = true``, the paper's hybrid IMTL): learnable ``s_t`` (initially 0,
    trained by the trainer's optimizer like uncertainty weighting's) replace each loss by
    ``e^{s_t} L_t - s_t`` before IMTL-G; its optimum scales every loss to 1. Off by default.

    Args:
        loss_scale: Also learn the IMTL-L loss scales.
    """

    ddp_conflict = _PER_PROCESS

    def __init__(self, tasks: Sequence[Task], seed: int = 0, loss_scale: bool = False) -> None:
        super().__init__(tasks, seed)
        self.loss_scale = bool(loss_scale)
        self.log_scales = torch.zeros(len(self.task_names), requires_grad=True)

    def parameters(self) -> list[Tensor]:
        return [self.log_scales] if self.loss_scale else []

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[Tensor]) -> dict[str, float]:
        names = list(losses)
        rho = [self._recipe_weight(name) for name in names]
        scaled = [losses[name] for name in names]
        regulariser: Any = 0.0
        if self.loss_scale:
            s = [self.log_scales[self.task_names.index(name)].to(losses[name].device) for name in names]
            scaled = [torch.exp(si) * loss for si, loss in zip(s, scaled, strict=True)]
            regulariser = sum(r * si for r, si in zip(rho, s, strict=True))
        total = sum(r * loss for r, loss in zip(rho, scaled, strict=True)) - regulariser
        shared = _trainable(shared)
        if len(names) < 2 or not shared:
            total.backward()  # type: ignore[union-attr]
            alpha = [1.0] * len(names)
        else:
            flat = _task_gradients(scaled, shared)
            alpha_t = imtl_alpha(_gram(flat))
            coef = alpha_t * torch.tensor(rho, dtype=torch.float64)
            _backward_with_shared(total, shared, coef.to(flat.device, flat.dtype) @ flat)  # type: ignore[arg-type]
            alpha = alpha_t.tolist()
        if self.loss_scale:
            alpha = [a * math.exp(float(self.log_scales[self.task_names.index(n)].detach())) for a, n in zip(alpha, names, strict=True)]
        return {name: r * a for name, r, a in zip(names, rho, alpha, strict=True)}


@register_weighting("gradvac")
class GradVac(_TaskState):
    """Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021, Algorithm 1).

    With ``g_t = ∇ w_t L_t`` on the shared parameters (one flat vector), each task i visits
    the others j in a fresh random order (the seeded generator). With ``g'_i`` the running
    vaccinated gradient, ``φ_ij = cos(g'_i, g_j)`` and the EMA target ``φ̂_ij`` (initially 0)::

        if φ_ij < φ̂_ij:  g'_i ← g'_i + ‖g'_i‖ (φ̂_ij √(1-φ_ij²) - φ_ij √(1-φ̂_ij²))
                                         / (‖g_j‖ √(1-φ̂_ij²)) · g_j
        φ̂_ij ← (1-β) φ̂_ij + β φ_ij        (every visit: an EMA of the cosine, paper eq. 3)

    and the shared parameters get ``Σ_i g'_i``. With ``φ̂ = 0`` the change is PCGrad's
    projection. The target is per ordered pair and over the whole shared vector (the
    paper's coarsest granularity); a pair with a zero gradient is skipped. (LibMTL updates
    φ̂ only when it changes a gradient.) Task-specific
    parameters get the plain gradient of ``Σ_t w_t L_t``. Since every ``g'_i`` is a
    combination ``Σ_j C_ij g_j``, the returned weight of task j is ``w_j Σ_i C_ij``, the
    weight of its gradient in the shared update.

    Args:
        beta: β, the EMA rate of the cosine targets (0.01 in the paper).
    """

    ddp_conflict = _PER_PROCESS

    def __init__(self, tasks: Sequence[Task], seed: int = 0, beta: float = 0.01) -> None:
        super().__init__(tasks, seed)
        if not 0 <= beta <= 1:
            raise ValueError(f"gradvac: beta must be in [0, 1]; got {beta}")
        self.beta = float(beta)
        self.targets = torch.zeros(len(self.task_names), len(self.task_names), dtype=torch.float64)

    def vaccinate(self, grads: Tensor, indices: Sequence[int], orders: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """The vaccinated gradients ``g'`` (T, N) and their coefficients ``C`` (T, T).

        Args:
            grads: ``(T, N)`` per-task gradients.
            indices: Each row's task index into the EMA targets.
            orders: For each row, the order in which to visit the other rows.
        """
        out = grads.clone()
        coef = torch.eye(len(indices), dtype=torch.float64)
        norms = [float(torch.linalg.vector_norm(g.double())) for g in grads]
        for i, order in enumerate(orders):
            for j in order:
                if j == i:
                    continue
                norm_i = float(torch.linalg.vector_norm(out[i].double()))
                if norm_i == 0 or norms[j] == 0:
                    continue
                cos = float(torch.dot(out[i].double(), grads[j].double())) / (norm_i * norms[j])
                cos = min(1.0, max(-1.0, cos))
                target = float(self.targets[indices[i], indices[j]])
                if cos < target:
                    root = math.sqrt(max(1 - target ** 2, 1e-12))
                    w = norm_i * (target * math.sqrt(1 - cos ** 2) - cos * root) / (norms[j] * root)
                    out[i] += w * grads[j]
                    coef[i, j] += w
                self.targets[indices[i], indices[j]] = (1 - self.beta) * target + self.beta * cos
        return out, coef

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[Tensor]) -> dict[str, float]:
        names = list(losses)
        indices = self._indices(names)
        rho = {name: self._recipe_weight(name) for name in names}

        def surgery(flat: Tensor) -> tuple[Tensor, Tensor]:
            orders = [torch.randperm(len(names), generator=self.generator).tolist() for _ in names]
            vaccinated, coef = self.vaccinate(flat, indices, orders)
            return vaccinated.sum(0), coef

        coef = _backward_with_surgery([rho[name] * losses[name] for name in names], shared, surgery)
        if coef is None:
            return rho
        return {name: rho[name] * float(c) for name, c in zip(names, coef.sum(0), strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "targets": self.targets.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.targets = state["targets"].clone().double()


