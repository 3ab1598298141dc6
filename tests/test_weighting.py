"""branchnas.weighting: each scheme against hand-computed weights, gradients and projections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from branchnas.errors import RecipeError
from branchnas.tasks import Task
from branchnas.weighting import (
    DWA,
    RLW,
    WEIGHTINGS,
    LossWeighting,
    PCGrad,
    UncertaintyWeighting,
    Uniform,
    get_weighting,
    project_conflicting,
    register_weighting,
)


def make_tasks(*weights: float) -> list[Task]:
    return [Task(f"t{i}", "regression", f"t{i}", weight=w) for i, w in enumerate(weights)]


def test_registry_lists_every_scheme_and_suggests_on_a_typo():
    assert set(WEIGHTINGS) == {"uniform", "uncertainty", "dwa", "rlw", "pcgrad", "gradnorm", "mgda", "graddrop",
                               "imtl", "gradvac", "famo"}
    assert isinstance(get_weighting("dwa", make_tasks(1, 1), seed=0), DWA)
    with pytest.raises(RecipeError, match=r"unknown loss weighting 'pcgard'; choose one of: .* \(did you mean 'pcgrad'\?\)"):
        get_weighting("pcgard", make_tasks(1, 1))
    with pytest.raises(ValueError, match="already registered"):
        register_weighting("uniform")(Uniform)


def test_uniform_honours_recipe_weights_in_the_gradient():
    x = torch.tensor(1.0, requires_grad=True)
    losses = {"t0": 3 * x, "t1": 5 * x}
    weights = Uniform(make_tasks(2.0, 0.5)).backward(losses, [x])
    assert weights == {"t0": 2.0, "t1": 0.5}
    assert x.grad.item() == pytest.approx(2.0 * 3 + 0.5 * 5)


def test_a_loss_for_an_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="task 'zz'"):
        Uniform(make_tasks(1, 1)).weights({"zz": torch.tensor(1.0)})


# --------------------------------------------------------------------------- DWA


def test_dwa_uniform_for_the_first_two_epochs_then_softmax_of_loss_ratios():
    dwa = DWA(make_tasks(1, 1, 1))
    losses = {f"t{i}": torch.tensor(1.0) for i in range(3)}
    history = [{"t0": 2.0, "t1": 1.0, "t2": 4.0}, {"t0": 1.0, "t1": 1.0, "t2": 1.0}]
    for epoch in range(2):
        dwa.start_epoch(epoch, history[:epoch])
        assert dwa.weights(losses) == {"t0": 1.0, "t1": 1.0, "t2": 1.0}
    dwa.start_epoch(2, history)
    w = dwa.weights(losses)
    r = np.array([1 / 2, 1 / 1, 1 / 4])  # L(e-1) / L(e-2)
    expected = 3 * np.exp(r / 2) / np.exp(r / 2).sum()
    assert [w["t0"], w["t1"], w["t2"]] == pytest.approx(expected.tolist())
    assert sum(w.values()) == pytest.approx(3.0)
    # the task whose loss fell least (t1) gets the most weight
    assert max(w, key=w.get) == "t1"


def test_dwa_multiplies_recipe_weights():
    dwa = DWA(make_tasks(2.0, 1.0))
    dwa.start_epoch(2, [{"t0": 1.0, "t1": 1.0}, {"t0": 1.0, "t1": 1.0}])
    assert dwa.weights({"t0": torch.tensor(1.0), "t1": torch.tensor(1.0)}) == pytest.approx({"t0": 2.0, "t1": 1.0})


# --------------------------------------------------------------------------- uncertainty


def test_uncertainty_total_loss_and_gradient_wrt_log_variance():
    uw = UncertaintyWeighting(make_tasks(1.0, 2.0))
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.5, -1.0]))
    theta = torch.tensor(1.0, requires_grad=True)
    losses = {"t0": 3.0 * theta, "t1": 0.5 * theta}
    total = uw.total(losses)
    # Σ exp(-s) w L + s
    assert total.item() == pytest.approx(math.exp(-0.5) * 3.0 + 0.5 + math.exp(1.0) * 2.0 * 0.5 - 1.0)
    weights = uw.backward(losses, [theta])
    # d/ds = 1 - exp(-s) w L
    assert uw.log_vars.grad.tolist() == pytest.approx([1 - math.exp(-0.5) * 3.0, 1 - math.exp(1.0) * 1.0])
    assert theta.grad.item() == pytest.approx(math.exp(-0.5) * 3.0 + math.exp(1.0) * 2.0 * 0.5)
    assert weights == pytest.approx({"t0": math.exp(-0.5), "t1": 2.0 * math.exp(1.0)})
    assert uw.parameters() == [uw.log_vars]


def test_uncertainty_state_round_trips():
    uw = UncertaintyWeighting(make_tasks(1, 1))
    with torch.no_grad():
        uw.log_vars.fill_(0.3)
    other = UncertaintyWeighting(make_tasks(1, 1))
    other.load_state_dict(uw.state_dict())
    assert other.log_vars.tolist() == pytest.approx([0.3, 0.3])


# --------------------------------------------------------------------------- RLW


def test_rlw_weights_positive_sum_to_one_vary_and_reproduce_with_the_seed():
    losses = {f"t{i}": torch.tensor(1.0) for i in range(4)}
    a, b, c = RLW(make_tasks(1, 1, 1, 1), seed=7), RLW(make_tasks(1, 1, 1, 1), seed=7), RLW(make_tasks(1, 1, 1, 1), seed=8)
    draws_a = [a.weights(losses) for _ in range(5)]
    draws_b = [b.weights(losses) for _ in range(5)]
    assert draws_a == draws_b
    assert draws_a[0] != draws_a[1]
    assert c.weights(losses) != draws_a[0]
    for w in draws_a:
        assert all(v > 0 for v in w.values())
        assert sum(w.values()) == pytest.approx(1.0)


def test_rlw_resumes_the_same_sequence_from_its_state():
    losses = {"t0": torch.tensor(1.0), "t1": torch.tensor(1.0)}
    a = RLW(make_tasks(1, 1), seed=3)
    a.weights(losses)
    state = a.state_dict()
    expected = a.weights(losses)
    b = RLW(make_tasks(1, 1), seed=99)
    b.load_state_dict(state)
    assert b.weights(losses) == expected


# --------------------------------------------------------------------------- PCGrad


def np_pcgrad(grads: np.ndarray, orders) -> np.ndarray:
    out = grads.astype(np.float64).copy()
    for i, order in enumerate(orders):
        for j in order:
            if j != i:
                dot = out[i] @ grads[j]
                if dot < 0:
                    out[i] = out[i] - dot / (grads[j] @ grads[j]) * grads[j]
    return out


def test_projection_removes_the_conflict_between_two_gradients():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    pc = project_conflicting(g, [[1], [0]])
    # g0 - (g0.g1/|g1|^2) g1 = (1,0) + 0.5(-1,1) = (0.5, 0.5); g1 + 1(1,0) = (0, 1)
    assert pc.tolist() == [[0.5, 0.5], [0.0, 1.0]]
    assert float(pc[0] @ g[1]) >= 0 and float(pc[1] @ g[0]) >= 0
    np.testing.assert_allclose(pc.numpy(), np_pcgrad(g.numpy(), [[1], [0]]))


def test_projection_leaves_non_conflicting_gradients_alone():
    g = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]])
    assert torch.equal(project_conflicting(g, [[1], [0]]), g)


@pytest.mark.parametrize("orders", [[[1, 2], [0, 2], [0, 1]], [[2, 1], [2, 0], [1, 0]]])
def test_projection_matches_numpy_on_three_tasks_in_any_order(orders):
    g = torch.tensor([[1.0, 0.2, -0.5], [-0.8, 1.0, 0.1], [0.3, -1.0, 0.9]], dtype=torch.float64)
    np.testing.assert_allclose(project_conflicting(g, orders).numpy(), np_pcgrad(g.numpy(), orders), rtol=1e-12)


def test_three_task_orders_matter_so_the_order_test_can_fail():
    g = np.array([[1.0, 0.2, -0.5], [-0.8, 1.0, 0.1], [0.3, -1.0, 0.9]])
    assert not np.allclose(np_pcgrad(g, [[1, 2], [0, 2], [0, 1]]), np_pcgrad(g, [[2, 1], [2, 0], [1, 0]]))


def linear_setup(conflict: bool):
    """Shared vector w (2,) and task heads h0, h1 (scalars): L_t = h_t * (a_t . w)."""
    w = torch.tensor([0.3, -0.7], requires_grad=True)
    h = [torch.tensor(2.0, requires_grad=True), torch.tensor(1.5, requires_grad=True)]
    a = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]) if conflict else torch.tensor([0.5, 1.0])]
    losses = {f"t{i}": h[i] * (a[i] @ w) for i in range(2)}
    return w, h, a, losses


@pytest.mark.parametrize("conflict", [True, False])
def test_pcgrad_backward_projects_shared_grads_and_keeps_task_grads(conflict):
    w, h, a, losses = linear_setup(conflict)
    weights = PCGrad(make_tasks(1.0, 1.0), seed=0).backward(losses, [w])
    assert weights == {"t0": 1.0, "t1": 1.0}
    g = np.stack([(h[i].item() * a[i]).numpy() for i in range(2)])  # d L_t / d w
    np.testing.assert_allclose(w.grad.numpy(), np_pcgrad(g, [[1], [0]]).sum(0), rtol=1e-6)
    if not conflict:
        np.testing.assert_allclose(w.grad.numpy(), g.sum(0), rtol=1e-6)  # plain sum
    else:
        assert not np.allclose(w.grad.numpy(), g.sum(0))
    # task-specific parameters: their plain gradients a_t . w
    for i in range(2):
        assert h[i].grad.item() == pytest.approx(float(a[i] @ w.detach()))


def test_pcgrad_adds_to_existing_grads_and_honours_recipe_weights():
    w, h, a, losses = linear_setup(conflict=True)
    w.grad = torch.tensor([10.0, 10.0])
    PCGrad(make_tasks(2.0, 1.0), seed=0).backward(losses, [w])
    g = np.stack([2.0 * h[0].item() * a[0].numpy(), 1.0 * h[1].item() * a[1].numpy()])
    np.testing.assert_allclose(w.grad.numpy(), 10.0 + np_pcgrad(g, [[1], [0]]).sum(0), rtol=1e-6)
    assert h[0].grad.item() == pytest.approx(2.0 * float(a[0] @ w.detach()))


def test_pcgrad_is_a_loss_weighting_used_through_the_base_contract():
    scheme: LossWeighting = get_weighting("pcgrad", make_tasks(1, 1), seed=1)
    assert scheme.parameters() == []
    scheme.start_epoch(0, [])  # a no-op that must not fail
