"""GradNorm, MGDA, GradDrop, IMTL, GradVac and FAMO, each against an independent reference.

The references are numpy reimplementations of the papers' formulas, scipy's QP solver, a
grid over the simplex, or autograd applied to the paper's objective; none reuses the code
under test. Models are tiny float64 ``nn.Linear`` stacks so comparisons can be tight.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from branchnas.errors import RecipeError
from branchnas.recipe import FinetuneConfig, load_recipe, recipe_from_dict, recipe_to_toml
from branchnas.tasks import Task
from branchnas.weighting import (
    FAMO,
    IMTL,
    MGDA,
    WEIGHTINGS,
    GradDrop,
    GradNorm,
    GradVac,
    drop_signs,
    get_weighting,
    imtl_alpha,
    min_norm_weights,
    weighting_options,
)

NEW = ["gradnorm", "mgda", "graddrop", "imtl", "gradvac", "famo"]


def make_tasks(*weights: float) -> list[Task]:
    return [Task(f"t{i}", "regression", f"t{i}", weight=w) for i, w in enumerate(weights)]


class Tiny(nn.Module):
    """x (B, 3) -> tanh(shared) (B, 4) -> one linear head per task; MSE per task."""

    def __init__(self, tasks: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4).double()
        self.heads = nn.ModuleList(nn.Linear(4, 1).double() for _ in range(tasks))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.shared(x))
        return {f"t{i}": (head(h).squeeze(-1) - y[:, i]).square().mean() for i, head in enumerate(self.heads)}


def batch(step: int, tasks: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(5, 3, generator=gen, dtype=torch.float64),
            torch.randn(5, tasks, generator=gen, dtype=torch.float64))


def shared_of(model: Tiny) -> list[torch.Tensor]:
    return list(model.shared.parameters())


def reference_grads(model: Tiny, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray, list]:
    """Per-task flat shared gradients (T, N), loss values (T,), per-task head gradients."""
    losses = model.losses(x, y)
    flat, heads = [], []
    for i, loss in enumerate(losses.values()):
        grads = torch.autograd.grad(loss, shared_of(model) + list(model.heads[i].parameters()), retain_graph=True)
        flat.append(torch.cat([g.reshape(-1) for g in grads[:2]]).numpy())
        heads.append([g.numpy() for g in grads[2:]])
    return np.stack(flat), np.array([float(v.detach()) for v in losses.values()]), heads


def shared_grad(model: Tiny) -> np.ndarray:
    return torch.cat([p.grad.reshape(-1) for p in shared_of(model)]).numpy()


def scipy_min_norm(g: np.ndarray) -> np.ndarray:
    m = g @ g.T
    t = len(g)
    res = minimize(lambda w: w @ m @ w, np.full(t, 1 / t), jac=lambda w: 2 * m @ w, method="SLSQP",
                   bounds=[(0, 1)] * t, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                   options={"ftol": 1e-16, "maxiter": 1000})
    return res.x


# --------------------------------------------------------------------------- registry and recipe


def test_registry_and_the_recipe_list_the_same_schemes_and_options():
    meta = {f.name: f.metadata for f in dataclasses.fields(FinetuneConfig)}["weighting"]
    assert set(meta["choices"]) == set(WEIGHTINGS)
    assert set(NEW) <= set(WEIGHTINGS)
    for name in WEIGHTINGS:
        recipe_options = {key: spec["type"] for key, spec in meta["options"].get(name, {}).items()}
        assert recipe_options == {key: typ for key, (typ, _) in weighting_options(name).items()}, name


def test_get_weighting_takes_a_name_or_a_table_of_options():
    scheme = get_weighting({"name": "gradnorm", "alpha": 0.5, "lr": 0.1}, make_tasks(1, 1), seed=0)
    assert isinstance(scheme, GradNorm) and (scheme.alpha, scheme.lr) == (0.5, 0.1)
    assert isinstance(get_weighting("famo", make_tasks(1, 1)), FAMO)
    assert get_weighting({"name": "mgda"}, make_tasks(1, 1)).normalization == "none"
    with pytest.raises(RecipeError, match=r"^finetune\.weighting\.alhpa: unknown option of 'gradnorm' "
                                          r"\(did you mean 'alpha'\?\); valid options: alpha, lr$"):
        get_weighting({"name": "gradnorm", "alhpa": 1.0}, make_tasks(1, 1))
    with pytest.raises(RecipeError, match=r"choose one of: .*famo.*gradnorm.*mgda.* \(did you mean 'imtl'\?\)"):
        get_weighting("imtll", make_tasks(1, 1))
    with pytest.raises(RecipeError, match="normalization 'l3'"):
        get_weighting({"name": "mgda", "normalization": "l3"}, make_tasks(1, 1))


def test_recipe_accepts_the_table_form_round_trips_it_and_refuses_unknown_options():
    recipe = load_recipe(None, ['finetune.weighting={ name = "gradnorm", alpha = 2 }'])
    assert recipe.finetune.weighting == {"name": "gradnorm", "alpha": 2.0}
    assert 'weighting = { name = "gradnorm", alpha = 2.0 }' in recipe_to_toml(recipe)
    import tomllib

    assert recipe_from_dict(tomllib.loads(recipe_to_toml(recipe))) == recipe
    assert load_recipe(None, ["finetune.weighting=famo"]).finetune.weighting == "famo"
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ['finetune.weighting={ name = "gradvac", beat = 0.1 }'])
    assert str(err.value) == ("finetune.weighting.beat: unknown option of 'gradvac' (did you mean 'beta'?); "
                              "valid options: beta")
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match=r"^finetune\.weighting\.leak: expected a value <= 1"):
        load_recipe(None, ['finetune.weighting={ name = "graddrop", leak = 2 }'])
    with pytest.raises(RecipeError, match=r"^finetune\.weighting\.name: missing"):
        load_recipe(None, ["finetune.weighting={ alpha = 2 }"])
    with pytest.raises(RecipeError, match=r"did you mean 'gradvac'"):
        load_recipe(None, ["finetune.weighting=gradvca"])


# --------------------------------------------------------------------------- MGDA


@pytest.mark.parametrize("tasks,dim,seed", [(3, 5, 0), (3, 4, 1), (4, 6, 2), (5, 8, 3), (3, 3, 4)])
def test_min_norm_weights_match_scipy(tasks, dim, seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(tasks, dim)) + rng.normal(size=dim)  # a common component: an interior optimum
    alpha = min_norm_weights(torch.tensor(g @ g.T)).numpy()
    ref = scipy_min_norm(g)
    assert alpha.min() >= 0 and alpha.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(alpha, ref, atol=1e-6)
    assert np.sum((alpha @ g) ** 2) == pytest.approx(np.sum((ref @ g) ** 2), rel=1e-9)


def test_min_norm_weights_match_a_grid_over_the_simplex_on_two_and_three_tasks():
    rng = np.random.default_rng(5)
    for tasks in (2, 3):
        for _ in range(3):
            g = rng.normal(size=(tasks, 4)) + rng.normal(size=4)
            step = 1 / 400
            grid = [np.array([*w, 1 - sum(w)]) for w in itertools.product(np.arange(0, 1 + step / 2, step), repeat=tasks - 1)
                    if sum(w) <= 1 + 1e-12]
            best = min(grid, key=lambda w: np.sum((w @ g) ** 2))
            alpha = min_norm_weights(torch.tensor(g @ g.T)).numpy()
            assert np.sum((alpha @ g) ** 2) <= np.sum((best @ g) ** 2) + 1e-12
            np.testing.assert_allclose(alpha, best, atol=2 * step)


def test_min_norm_weights_on_a_face_and_on_two_tasks():
    # g_0 . g_1 >= |g_0|^2: the min-norm point is g_0 itself
    g = np.array([[1.0, 0.0], [2.0, 0.5], [1.5, -0.2]])
    np.testing.assert_allclose(min_norm_weights(torch.tensor(g @ g.T)).numpy(), [1.0, 0.0, 0.0], atol=1e-9)
    # two orthogonal unit vectors: the midpoint
    g = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(min_norm_weights(torch.tensor(g @ g.T)).numpy(), [0.5, 0.5])


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_backward_weights_are_the_min_norm_solution_of_the_normalised_gradients(normalization):
    model = Tiny(3)
    x, y = batch(0)
    g, values, heads = reference_grads(model, x, y)
    norm = {"none": np.ones(3), "l2": np.linalg.norm(g, axis=1), "loss": values,
            "loss+": values * np.linalg.norm(g, axis=1)}[normalization]
    ref = scipy_min_norm(g / norm[:, None])
    weights = MGDA(make_tasks(1, 1, 1), normalization=normalization).backward(model.losses(x, y), shared_of(model))
    alpha = np.array([weights[f"t{i}"] for i in range(3)])
    np.testing.assert_allclose(alpha, ref, atol=1e-6)
    # the weights multiply the raw losses everywhere (as in the authors' code)
    np.testing.assert_allclose(shared_grad(model), alpha @ g, rtol=1e-9, atol=1e-12)
    for i in range(3):
        np.testing.assert_allclose(model.heads[i].weight.grad.numpy(), alpha[i] * heads[i][0], rtol=1e-9, atol=1e-12)


def test_mgda_recipe_weights_multiply_the_min_norm_weights():
    model = Tiny(2)
    x, y = batch(1, 2)
    g, _, _ = reference_grads(model, x, y)
    weights = MGDA(make_tasks(2.0, 1.0)).backward(model.losses(x, y), shared_of(model))
    ref = scipy_min_norm(g)
    assert [weights["t0"], weights["t1"]] == pytest.approx([2.0 * ref[0], ref[1]], abs=1e-6)


# --------------------------------------------------------------------------- IMTL


def numpy_imtl(g: np.ndarray) -> np.ndarray:
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    d = g[0] - g[1:]  # rows g_1 - g_t
    un = u[0] - u[1:]  # rows u_1 - u_t
    rest = g[0] @ un.T @ np.linalg.inv(d @ un.T)
    return np.concatenate([[1 - rest.sum()], rest])


@pytest.mark.parametrize("tasks,seed", [(2, 0), (3, 1), (4, 2)])
def test_imtl_alpha_matches_the_closed_form_and_equalises_the_projections(tasks, seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(tasks, 7)) * rng.uniform(0.1, 5, size=(tasks, 1))
    alpha = imtl_alpha(torch.tensor(g @ g.T)).numpy()
    np.testing.assert_allclose(alpha, numpy_imtl(g), rtol=1e-9, atol=1e-12)
    combined = alpha @ g
    projections = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ combined
    np.testing.assert_allclose(projections, projections[0], rtol=1e-9)
    assert alpha.sum() == pytest.approx(1.0)


def test_imtl_backward_gives_the_closed_form_shared_gradient_and_plain_head_gradients():
    model = Tiny(3)
    x, y = batch(2)
    g, _, heads = reference_grads(model, x, y)
    weights = IMTL(make_tasks(1, 1, 1)).backward(model.losses(x, y), shared_of(model))
    alpha = numpy_imtl(g)
    assert [weights[f"t{i}"] for i in range(3)] == pytest.approx(alpha.tolist(), rel=1e-9)
    np.testing.assert_allclose(shared_grad(model), alpha @ g, rtol=1e-9, atol=1e-12)
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(u @ shared_grad(model), (u @ shared_grad(model))[0], rtol=1e-9)
    for i in range(3):
        np.testing.assert_allclose(model.heads[i].weight.grad.numpy(), heads[i][0], rtol=1e-12)


def test_imtl_loss_scale_learns_s_from_exp_s_times_loss_minus_s():
    model = Tiny(2)
    x, y = batch(3, 2)
    imtl = IMTL(make_tasks(1, 1), loss_scale=True)
    assert imtl.parameters() == [imtl.log_scales]
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([0.5, -0.3]))
    g, values, heads = reference_grads(model, x, y)
    s = np.array([0.5, -0.3])
    weights = imtl.backward(model.losses(x, y), shared_of(model))
    # d/ds (e^s L - s) = e^s L - 1; IMTL-G runs on the scaled gradients e^s g
    np.testing.assert_allclose(imtl.log_scales.grad.numpy(), np.exp(s) * values - 1, rtol=1e-6)
    alpha = numpy_imtl(np.exp(s)[:, None] * g)
    np.testing.assert_allclose(shared_grad(model), alpha @ (np.exp(s)[:, None] * g), rtol=1e-6)
    assert [weights["t0"], weights["t1"]] == pytest.approx((alpha * np.exp(s)).tolist(), rel=1e-6)
    np.testing.assert_allclose(model.heads[1].weight.grad.numpy(), np.exp(s[1]) * heads[1][0], rtol=1e-6)
    assert IMTL(make_tasks(1, 1)).parameters() == []


# --------------------------------------------------------------------------- GradNorm


def autograd_gradnorm_step(model: Tiny, x, y, v: np.ndarray, first: np.ndarray, alpha: float, lr: float) -> np.ndarray:
    """The paper's update, with L_grad differentiated by autograd (second order) w.r.t. v."""
    w = torch.tensor(v, requires_grad=True)
    losses = list(model.losses(x, y).values())
    g = torch.stack([
        torch.sqrt(sum(gr.square().sum() for gr in torch.autograd.grad(w[i] * loss, shared_of(model), create_graph=True)))
        for i, loss in enumerate(losses)
    ])
    ratio = np.array([float(loss.detach()) for loss in losses]) / first
    target = (g.mean() * torch.tensor(ratio / ratio.mean()) ** alpha).detach()
    (g - target).abs().sum().backward()
    new = v - lr * w.grad.numpy()
    return new * len(v) / new.sum()


def test_gradnorm_steps_its_weights_like_the_paper_and_uses_them_before_the_step():
    model = Tiny(2)
    gn = GradNorm(make_tasks(1, 1), alpha=1.5, lr=0.05)
    v = np.ones(2)
    first = None
    for step in range(3):
        x, y = batch(step, 2)
        g, values, _ = reference_grads(model, x, y)
        if first is None:
            first = values
        expected = autograd_gradnorm_step(model, x, y, v, first, 1.5, 0.05)
        model.zero_grad(set_to_none=True)
        weights = gn.backward(model.losses(x, y), shared_of(model))
        assert [weights["t0"], weights["t1"]] == pytest.approx(v.tolist(), rel=1e-12)  # used before the update
        np.testing.assert_allclose(shared_grad(model), v @ g, rtol=1e-9)
        np.testing.assert_allclose(gn.task_weights.numpy(), expected, rtol=1e-9)
        assert gn.task_weights.sum().item() == pytest.approx(2.0)
        v = expected
        with torch.no_grad():  # move the model, so the losses and their ratios change
            for p in model.parameters():
                p -= 0.2 * p.grad
    assert not np.allclose(v, 1.0)


def test_gradnorm_renormalises_and_multiplies_recipe_weights():
    gn = GradNorm(make_tasks(3.0, 1.0), lr=10.0)
    model = Tiny(2)
    x, y = batch(0, 2)
    gn.backward(model.losses(x, y), shared_of(model))
    x, y = batch(1, 2)
    v = gn.task_weights.clone()
    weights = gn.backward(model.losses(x, y), shared_of(model))
    assert [weights["t0"], weights["t1"]] == pytest.approx([3.0 * float(v[0]), float(v[1])])
    assert float(gn.task_weights.min()) > 0 and gn.task_weights.sum().item() == pytest.approx(2.0)


# --------------------------------------------------------------------------- GradDrop


def numpy_graddrop(g: np.ndarray, u: np.ndarray, leak: float) -> np.ndarray:
    out = np.zeros(g.shape[1])
    for k in range(g.shape[1]):
        s, a = g[:, k].sum(), np.abs(g[:, k]).sum()
        p = 0.5 * (1 + s / a) if a > 0 else 0.5
        for t in range(g.shape[0]):
            keep = (p > u[k] and g[t, k] > 0) or (p < u[k] and g[t, k] < 0)
            out[k] += (leak + (1 - leak) * keep) * g[t, k]
    return out


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_masks_follow_the_paper_rule_on_the_schemes_own_draws(leak):
    model = Tiny(3)
    x, y = batch(4)
    g, _, heads = reference_grads(model, x, y)
    scheme = GradDrop(make_tasks(1, 1, 1), seed=11, leak=leak)
    u = torch.rand(g.shape[1], generator=torch.Generator().manual_seed(11)).double().numpy()
    weights = scheme.backward(model.losses(x, y), shared_of(model))
    assert weights == {"t0": 1.0, "t1": 1.0, "t2": 1.0}
    expected = numpy_graddrop(g, u, leak)
    np.testing.assert_allclose(shared_grad(model), expected, rtol=1e-12, atol=1e-15)
    assert not np.allclose(expected, g.sum(0))  # something was dropped
    for i in range(3):
        np.testing.assert_allclose(model.heads[i].weight.grad.numpy(), heads[i][0], rtol=1e-12)


def test_drop_signs_keeps_one_sign_per_element_and_leak_one_is_the_plain_sum():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(4, 200))
    u = rng.uniform(size=200)
    out = drop_signs(torch.tensor(g), torch.tensor(u)).numpy()
    np.testing.assert_allclose(out, numpy_graddrop(g, u, 0.0), rtol=1e-12)
    positive_part, negative_part = np.where(g > 0, g, 0).sum(0), np.where(g < 0, g, 0).sum(0)
    assert all(math.isclose(o, pp) or math.isclose(o, np_) or o == 0
               for o, pp, np_ in zip(out, positive_part, negative_part, strict=True))
    np.testing.assert_allclose(drop_signs(torch.tensor(g), torch.tensor(u), leak=1.0).numpy(), g.sum(0))


# --------------------------------------------------------------------------- GradVac


def numpy_vaccine(gi: np.ndarray, gj: np.ndarray, target: float) -> np.ndarray:
    cos = gi @ gj / (np.linalg.norm(gi) * np.linalg.norm(gj))
    if cos >= target:
        return gi
    return gi + np.linalg.norm(gi) * (target * np.sqrt(1 - cos**2) - cos * np.sqrt(1 - target**2)) / (
        np.linalg.norm(gj) * np.sqrt(1 - target**2)) * gj


def two_task_linear(a0, a1):
    w = torch.tensor([0.3, -0.7, 0.2], dtype=torch.float64, requires_grad=True)
    h = [torch.tensor(2.0, dtype=torch.float64, requires_grad=True), torch.tensor(1.5, dtype=torch.float64, requires_grad=True)]
    a = [torch.tensor(a0, dtype=torch.float64), torch.tensor(a1, dtype=torch.float64)]
    return w, h, {f"t{i}": h[i] * (a[i] @ w) for i in range(2)}, np.stack([h[i].item() * a[i].numpy() for i in range(2)])


def test_gradvac_projection_matches_the_formula_and_reaches_the_target_cosine():
    a0, a1 = [1.0, 0.2, 0.0], [-1.0, 1.0, 0.3]  # conflicting
    scheme = GradVac(make_tasks(1, 1), beta=0.25)
    # step 1: targets 0, so the change is PCGrad's projection
    w, h, losses, g = two_task_linear(a0, a1)
    scheme.backward(losses, [w])
    g0, g1 = numpy_vaccine(g[0], g[1], 0.0), numpy_vaccine(g[1], g[0], 0.0)
    np.testing.assert_allclose(w.grad.numpy(), g0 + g1, rtol=1e-12)
    np.testing.assert_allclose(g0, g[0] - g[0] @ g[1] / (g[1] @ g[1]) * g[1], rtol=1e-12)
    cos = g[0] @ g[1] / np.linalg.norm(g[0]) / np.linalg.norm(g[1])
    np.testing.assert_allclose(scheme.targets.numpy(), [[0, 0.25 * cos], [0.25 * cos, 0]], rtol=1e-12)
    # step 2 with a positive target: set it, then the vaccinated cosine must equal it
    with torch.no_grad():
        scheme.targets.copy_(torch.tensor([[0.0, 0.4], [0.3, 0.0]], dtype=torch.float64))
    w, h, losses, g = two_task_linear(a0, a1)
    weights = scheme.backward(losses, [w])
    g0, g1 = numpy_vaccine(g[0], g[1], 0.4), numpy_vaccine(g[1], g[0], 0.3)
    np.testing.assert_allclose(w.grad.numpy(), g0 + g1, rtol=1e-12)
    assert g0 @ g[1] / np.linalg.norm(g0) / np.linalg.norm(g[1]) == pytest.approx(0.4)
    assert g1 @ g[0] / np.linalg.norm(g1) / np.linalg.norm(g[0]) == pytest.approx(0.3)
    np.testing.assert_allclose(scheme.targets.numpy(), [[0, 0.75 * 0.4 + 0.25 * cos], [0.75 * 0.3 + 0.25 * cos, 0]])
    # the returned weights are the coefficients of the shared update on each task's gradient
    np.testing.assert_allclose(weights["t0"] * g[0] + weights["t1"] * g[1], g0 + g1, rtol=1e-12)
    assert h[0].grad.item() == pytest.approx(float(torch.tensor(a0, dtype=torch.float64) @ w.detach()))


def test_gradvac_leaves_aligned_gradients_alone_but_still_tracks_the_cosine():
    scheme = GradVac(make_tasks(1, 1), beta=0.5)
    w, _, losses, g = two_task_linear([1.0, 0.0, 0.0], [1.0, 1.0, 0.0])
    weights = scheme.backward(losses, [w])
    np.testing.assert_allclose(w.grad.numpy(), g.sum(0))
    assert weights == {"t0": 1.0, "t1": 1.0}
    assert scheme.targets[0, 1].item() == pytest.approx(0.5 * math.sqrt(0.5))


# --------------------------------------------------------------------------- FAMO


def test_famo_follows_the_papers_update_rule_over_three_steps():
    beta, gamma = 0.5, 0.1
    famo = FAMO(make_tasks(1, 1, 1), lr=beta, decay=gamma)
    steps = [[2.0, 1.0, 0.5], [1.0, 0.9, 0.5], [0.4, 0.8, 0.45], [0.3, 0.7, 0.2]]
    xi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    previous = None
    for values in steps:
        v = np.array(values)
        if previous is not None:
            # the official code: δ = autograd of softmax(ξ) against the decrease of the log losses
            delta = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=torch.tensor(np.log(previous) - np.log(v)))[0]
            with torch.no_grad():
                xi -= beta * (delta + gamma * xi)
        previous = v
        # the loss Σ c z_t log L_t with c = 1 / Σ z/L held constant, differentiated by autograd
        theta = torch.tensor(v, requires_grad=True)
        z = torch.softmax(xi.detach(), 0)
        c = 1 / (z / theta.detach()).sum()
        (c * (z * theta.log()).sum()).backward()
        x = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        weights = famo.backward({f"t{i}": values[i] * x for i in range(3)}, [x])
        np.testing.assert_allclose([weights[f"t{i}"] for i in range(3)], theta.grad.numpy(), rtol=1e-12)
        assert x.grad.item() == pytest.approx(float(theta.grad @ torch.tensor(v)))
        np.testing.assert_allclose(famo.logits.numpy(), xi.detach().numpy(), rtol=1e-12, atol=1e-15)
        assert sum(weights.values()) == pytest.approx(1.0)
    # the task whose loss fell least (t1) gained weight
    assert int(torch.argmax(famo.logits)) == 1


def test_famo_clamps_non_positive_losses():
    famo = FAMO(make_tasks(1, 1))
    x = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    weights = famo.backward({"t0": 0.0 * x, "t1": 1.0 * x}, [x])
    assert all(math.isfinite(w) for w in weights.values())
    x = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    famo.backward({"t0": 0.5 * x, "t1": 1.0 * x}, [x])
    assert torch.isfinite(famo.logits).all()


# --------------------------------------------------------------------------- every new scheme

OPTIONS = {"gradnorm": {"lr": 0.5}, "famo": {"lr": 0.5}, "gradvac": {"beta": 0.3}, "imtl": {"loss_scale": True}}


def run(scheme, model: Tiny, steps: range) -> list[tuple[dict[str, float], list[np.ndarray]]]:
    """Train ``model`` by hand-rolled SGD under ``scheme``; weights and gradients per step."""
    out = []
    for step in steps:
        x, y = batch(step)
        model.zero_grad(set_to_none=True)
        for p in scheme.parameters():
            p.grad = None
        weights = scheme.backward(model.losses(x, y), shared_of(model))
        grads = [p.grad.clone().numpy() for p in model.parameters()]
        with torch.no_grad():
            for p in [*model.parameters(), *scheme.parameters()]:
                p -= 0.1 * p.grad
        out.append((weights, grads))
    return out


@pytest.mark.parametrize("name", NEW)
def test_resuming_from_a_saved_state_continues_identically(name):
    spec = {"name": name, **OPTIONS.get(name, {})}
    straight = run(get_weighting(spec, make_tasks(1, 1, 1), seed=3), Tiny(3), range(5))
    model, first = Tiny(3), get_weighting(spec, make_tasks(1, 1, 1), seed=3)
    before = run(first, model, range(3))
    buffer = io.BytesIO()
    torch.save({"weighting": first.state_dict(), "model": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as the trainer's checkpoints are read
    resumed, model2 = get_weighting(spec, make_tasks(1, 1, 1), seed=99), Tiny(3, seed=7)
    resumed.load_state_dict(saved["weighting"])
    model2.load_state_dict(saved["model"])
    after = run(resumed, model2, range(3, 5))
    for (w1, g1), (w2, g2) in zip(straight, before + after, strict=True):
        assert w1 == w2
        for a, b in zip(g1, g2, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", NEW)
def test_every_scheme_fills_the_task_specific_gradients(name):
    model = Tiny(3)
    x, y = batch(6)
    _, _, heads = reference_grads(model, x, y)
    weights = get_weighting(name, make_tasks(1, 1, 1), seed=0).backward(model.losses(x, y), shared_of(model))
    assert set(weights) == {"t0", "t1", "t2"} and all(isinstance(w, float) for w in weights.values())
    # loss-weighting schemes scale the heads by their weights; gradient surgery leaves them plain
    scale = weights if name in ("gradnorm", "mgda", "famo") else {t: 1.0 for t in weights}
    for i, head in enumerate(model.heads):
        assert head.weight.grad is not None and head.bias.grad is not None
        np.testing.assert_allclose(head.weight.grad.numpy(), scale[f"t{i}"] * heads[i][0], rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(head.bias.grad.numpy(), scale[f"t{i}"] * heads[i][1], rtol=1e-9, atol=1e-14)
    assert all(p.grad is not None for p in shared_of(model))


@pytest.mark.parametrize("name", NEW)
def test_one_task_or_no_shared_parameters_is_a_plain_backward(name):
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    scheme = get_weighting(name, make_tasks(2.0), seed=0)
    weights = scheme.backward({"t0": (x * x).sum()}, [x])  # the trainer's stacked path: one task, shared = [cut]
    assert weights == {"t0": 2.0}
    np.testing.assert_allclose(x.grad.numpy(), [4.0, 8.0])
