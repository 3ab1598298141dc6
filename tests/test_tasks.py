"""branchnas.tasks: every loss and metric against numpy/sklearn, build_tasks errors, Δ_MTL."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

from branchnas.errors import DataError, RecipeError, UserError
from branchnas.recipe import TASK_KINDS, TaskConfig
from branchnas.tasks import (
    IGNORE_INDEX,
    KIND_INFO,
    MEDIAN_BIN_DEGREES,
    Task,
    build_tasks,
    delta_mtl,
)


@dataclass(frozen=True)
class Spec:
    """Stands in for branchnas.data.TargetSpec."""

    name: str
    kind: str
    num_classes: int = 0
    channels: int = 1
    description: str = ""


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_meter(task: Task, batches) -> dict[str, float]:
    meter = task.meter()
    for output, target in batches:
        meter.update(output, target)
    return meter.compute()


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


# --------------------------------------------------------------------------- kinds


def test_every_recipe_kind_has_a_definition_with_a_primary_metric():
    assert set(KIND_INFO) == set(TASK_KINDS)
    expected = {
        "classification": ("accuracy", True), "attribute": ("accuracy", True),
        "segmentation": ("miou", True), "depth": ("abs_err", False),
        "normals": ("mean_angle", False), "edges": ("fscore", True), "regression": ("mae", False),
    }
    for kind, (metric, higher) in expected.items():
        task = Task("t", kind, "t", num_classes=3 if kind in ("classification", "segmentation") else 0,
                    channels=3 if kind == "normals" else 1)
        assert task.primary_metric == metric == task.metric_names[0]
        assert task.higher_is_better(metric) is higher
        assert set(task.meter().compute()) == set(task.metric_names)


def test_directions_and_unknown_metric():
    depth = Task("d", "depth", "d")
    assert depth.higher_is_better("rmse") is False
    assert Task("s", "segmentation", "s", num_classes=4).higher_is_better("pixel_acc") is True
    with pytest.raises(UserError, match="did you mean 'rmse'"):
        depth.higher_is_better("rmsee")


def test_out_channels_and_dense():
    assert Task("c", "classification", "c", num_classes=7).out_channels == 7
    assert Task("r", "regression", "r", channels=5).out_channels == 5
    assert Task("n", "normals", "n", channels=3).out_channels == 3
    assert Task("a", "attribute", "a").out_channels == 1
    assert Task("e", "edges", "e").dense and not Task("a", "attribute", "a").dense


def test_shape_mismatch_is_an_error_not_a_broadcast():
    task = Task("d", "depth", "d")
    with pytest.raises(ValueError, match=r"expected a head output of shape \(2, 1, 4, 4\)"):
        task.loss(torch.rand(2, 4, 4), torch.rand(2, 1, 4, 4))


# --------------------------------------------------------------------------- classification / attribute


def test_classification_loss_and_accuracy():
    task = Task("c", "classification", "c", num_classes=3)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([0, 1])
    # -log softmax by hand
    expected = (-(2 - math.log(math.exp(2) + 2)) - (1 - math.log(1 + math.e + math.exp(3)))) / 2
    assert task.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert run_meter(task, [(logits, target)]) == {"accuracy": 0.5}


def test_attribute_loss_and_accuracy_accept_b_or_b1_logits():
    task = Task("a", "attribute", "a")
    x = torch.randn(10, generator=gen(1))
    y = (torch.rand(10, generator=gen(2)) > 0.5).float()
    xn, yn = x.double().numpy(), y.double().numpy()
    expected = -np.mean(yn * np_log_sigmoid(xn) + (1 - yn) * np_log_sigmoid(-xn))
    assert task.loss(x, y).item() == pytest.approx(expected, rel=1e-5)
    assert task.loss(x[:, None], y).item() == pytest.approx(expected, rel=1e-5)
    acc = np.mean((xn >= 0) == (yn == 1))
    assert run_meter(task, [(x[:4], y[:4]), (x[4:, None], y[4:])])["accuracy"] == pytest.approx(acc)


# --------------------------------------------------------------------------- segmentation


def seg_batch(seed: int, b: int = 2, c: int = 4, h: int = 5, w: int = 6):
    g = gen(seed)
    logits = torch.randn(b, c, h, w, generator=g)
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < 0.2] = IGNORE_INDEX
    return logits, target


def test_segmentation_loss_ignores_255():
    task = Task("s", "segmentation", "s", num_classes=4)
    logits, target = seg_batch(0)
    lp = torch.log_softmax(logits.double(), 1).permute(0, 2, 3, 1).numpy()
    t = target.numpy()
    valid = t != IGNORE_INDEX
    expected = -np.mean(lp[valid][np.arange(valid.sum()), t[valid]])
    assert task.loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_segmentation_loss_with_no_labelled_pixel_is_zero_and_backprops():
    task = Task("s", "segmentation", "s", num_classes=4)
    logits = torch.randn(1, 4, 2, 2, requires_grad=True)
    loss = task.loss(logits, torch.full((1, 2, 2), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_segmentation_miou_matches_sklearn_over_several_batches():
    task = Task("s", "segmentation", "s", num_classes=4)
    batches = [seg_batch(seed) for seed in range(3)]
    preds = np.concatenate([o.argmax(1).numpy().ravel() for o, _ in batches])
    labels = np.concatenate([t.numpy().ravel() for _, t in batches])
    keep = labels != IGNORE_INDEX
    cm = confusion_matrix(labels[keep], preds[keep], labels=range(4))
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    got = run_meter(task, batches)
    assert got["miou"] == pytest.approx(np.mean(tp[union > 0] / union[union > 0]))
    assert got["pixel_acc"] == pytest.approx(tp.sum() / cm.sum())
    # accumulating batches is the same as one big batch (not a mean of batch means)
    big = (torch.cat([o for o, _ in batches]), torch.cat([t for _, t in batches]))
    assert run_meter(task, [big]) == pytest.approx(got)


def test_miou_skips_classes_absent_from_target_and_prediction():
    task = Task("s", "segmentation", "s", num_classes=5)
    # class 0: tp 2, class 1: tp 1 fp 1 fn 0 ... hand-made: target [0 0 1 1], pred [0 0 1 0]
    target = torch.tensor([[[0, 0, 1, 1]]])
    logits = torch.nn.functional.one_hot(torch.tensor([[[0, 0, 1, 0]]]), 5).permute(0, 3, 1, 2).float()
    got = run_meter(task, [(logits, target)])
    # IoU0 = 2/3, IoU1 = 1/2; classes 2..4 appear nowhere and do not count
    assert got["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert got["pixel_acc"] == pytest.approx(3 / 4)


def test_segmentation_label_out_of_range_is_a_data_error():
    task = Task("s", "segmentation", "s", num_classes=3)
    with pytest.raises(DataError, match="label 7"):
        task.meter().update(torch.randn(1, 3, 1, 2), torch.tensor([[[0, 7]]]))


# --------------------------------------------------------------------------- depth / regression


def depth_batch(seed: int):
    g = gen(seed)
    pred = torch.rand(2, 1, 4, 5, generator=g) * 3
    target = torch.rand(2, 1, 4, 5, generator=g) * 3
    target[torch.rand(2, 1, 4, 5, generator=g) < 0.3] = 0.0
    return pred, target


@pytest.mark.parametrize("loss_name", ["l1", "mse"])
def test_depth_loss_masks_missing_pixels(loss_name):
    task = Task("d", "depth", "d", loss_name=loss_name)
    pred, target = depth_batch(0)
    p, t = pred.double().numpy(), target.double().numpy()
    diff = (p - t)[t > 0]
    expected = np.mean(np.abs(diff)) if loss_name == "l1" else np.mean(diff**2)
    assert task.loss(pred, target).item() == pytest.approx(expected, rel=1e-5)


def test_depth_metrics_match_numpy_over_batches():
    task = Task("d", "depth", "d")
    batches = [depth_batch(seed) for seed in range(3)]
    diff = np.concatenate([(p.double().numpy() - t.double().numpy())[t.numpy() > 0] for p, t in batches])
    got = run_meter(task, batches)
    assert got["abs_err"] == pytest.approx(np.mean(np.abs(diff)))
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean(diff**2)))


@pytest.mark.parametrize("loss_name", ["l1", "mse"])
def test_regression_loss_and_metrics(loss_name):
    task = Task("r", "regression", "r", channels=3, loss_name=loss_name)
    g = gen(3)
    batches = [(torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)) for _ in range(2)]
    p, t = batches[0][0].double().numpy(), batches[0][1].double().numpy()
    expected = np.mean(np.abs(p - t)) if loss_name == "l1" else np.mean((p - t) ** 2)
    assert task.loss(*batches[0]).item() == pytest.approx(expected, rel=1e-5)
    diff = np.concatenate([(p.double() - t.double()).numpy().ravel() for p, t in batches])
    got = run_meter(task, batches)
    assert got == pytest.approx({"mae": np.mean(np.abs(diff)), "rmse": np.sqrt(np.mean(diff**2))})


# --------------------------------------------------------------------------- normals


def normals_batch(seed: int, b: int = 2, h: int = 5, w: int = 5):
    g = gen(seed)
    pred = torch.randn(b, 3, h, w, generator=g)
    target = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    target = target * (torch.rand(b, 1, h, w, generator=g) > 0.25)  # some all-zero = missing
    return pred, target


def np_angles(pred, target):
    p, t = pred.double().numpy(), target.double().numpy()
    valid = np.abs(t).sum(1) > 0
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-300)  # float32 'unit' targets
    cos = np.clip((p * t).sum(1)[valid], -1, 1)
    return cos, np.degrees(np.arccos(cos))


def test_normals_loss_is_one_minus_cosine_over_valid_pixels():
    task = Task("n", "normals", "n", channels=3)
    pred, target = normals_batch(0)
    cos, _ = np_angles(pred, target)
    assert task.loss(pred, target).item() == pytest.approx(np.mean(1 - cos), rel=1e-5)


@pytest.mark.parametrize("sizes", [(5, 5), (4, 5)])  # odd and even pixel counts across the set
def test_normals_mean_and_median_angle(sizes):
    task = Task("n", "normals", "n", channels=3)
    batches = [normals_batch(seed, h=sizes[0], w=sizes[1]) for seed in range(3)]
    angles = np.concatenate([np_angles(p, t)[1] for p, t in batches])
    got = run_meter(task, batches)
    assert got["mean_angle"] == pytest.approx(np.mean(angles), rel=1e-9)
    assert abs(got["median_angle"] - np.median(angles)) <= MEDIAN_BIN_DEGREES / 2 + 1e-9


def test_normals_median_resolves_tiny_angles():
    task = Task("n", "normals", "n", channels=3)
    # angles 0.01, 0.02, 0.03 degrees: float32 arccos cannot tell these apart
    rad = np.radians([0.01, 0.02, 0.03])
    pred = torch.tensor(np.stack([np.sin(rad), np.zeros(3), np.cos(rad)])[None, :, :, None], dtype=torch.float32)
    target = torch.zeros_like(pred)
    target[:, 2] = 1.0
    got = run_meter(task, [(pred, target)])
    assert abs(got["median_angle"] - 0.02) <= MEDIAN_BIN_DEGREES
    assert got["mean_angle"] == pytest.approx(0.02, abs=1e-4)


# --------------------------------------------------------------------------- edges


def edge_batch(seed: int):
    g = gen(seed)
    logits = torch.randn(2, 1, 6, 6, generator=g)
    target = (torch.rand(2, 1, 6, 6, generator=g) < 0.15).float()
    return logits, target


def test_edges_balanced_bce_matches_hed_formula():
    task = Task("e", "edges", "e")
    logits, target = edge_batch(0)
    x, y = logits.double().numpy(), target.double().numpy()
    beta = 1 - y.mean()  # fraction of negative pixels
    per_pixel = -(beta * y * np_log_sigmoid(x) + (1 - beta) * (1 - y) * np_log_sigmoid(-x))
    assert task.loss(logits, target).item() == pytest.approx(per_pixel.mean(), rel=1e-5)
    # positives are rare, so they must weigh more than negatives
    assert beta > 0.5


def test_edges_fscore_matches_counts_and_sklearn():
    task = Task("e", "edges", "e")
    batches = [edge_batch(seed) for seed in range(3)]
    pred = np.concatenate([(o.numpy() >= 0).ravel() for o, _ in batches])
    truth = np.concatenate([(t.numpy() >= 0.5).ravel() for _, t in batches])
    tp, fp, fn = np.sum(pred & truth), np.sum(pred & ~truth), np.sum(~pred & truth)
    got = run_meter(task, batches)
    assert got["fscore"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["fscore"] == pytest.approx(f1_score(truth, pred))
    assert got["precision"] == pytest.approx(precision_score(truth, pred))
    assert got["recall"] == pytest.approx(recall_score(truth, pred))


# --------------------------------------------------------------------------- build_tasks


TARGETS = {
    "label": Spec("label", "classification", num_classes=5),
    "seg": Spec("seg", "segmentation", num_classes=4),
    "depth": Spec("depth", "depth"),
    "pose": Spec("pose", "regression", channels=6),
}


def test_build_tasks_resolves_defaults():
    tasks = build_tasks([
        TaskConfig(name="label", kind="classification"),
        TaskConfig(name="parts", kind="segmentation", target="seg", num_classes=6, weight=2.0),
        TaskConfig(name="depth", kind="depth", loss="mse"),
        TaskConfig(name="pose", kind="regression"),
    ], TARGETS)
    assert [(t.name, t.target, t.num_classes, t.channels, t.loss_name) for t in tasks] == [
        ("label", "label", 5, 1, "cross_entropy"),
        ("parts", "seg", 6, 1, "cross_entropy"),
        ("depth", "depth", 0, 1, "mse"),
        ("pose", "pose", 0, 6, "l1"),
    ]
    assert tasks[1].weight == 2.0


def test_build_tasks_unknown_target_suggests_the_closest():
    with pytest.raises(RecipeError) as err:
        build_tasks([TaskConfig(name="a", kind="depth", target="dept")], TARGETS)
    assert str(err.value) == (
        "tasks[0].target: the dataset has no target 'dept'; "
        "choose one of: depth, label, pose, seg (did you mean 'depth'?)"
    )


def test_build_tasks_target_defaults_to_name_and_says_so():
    with pytest.raises(RecipeError, match=r"tasks\[1\]\.target: .*'segg' \(target defaults to the task name\).*'seg'"):
        build_tasks([TaskConfig(name="label", kind="classification"), TaskConfig(name="segg", kind="segmentation")], TARGETS)


def test_build_tasks_kind_mismatch_names_both_kinds():
    with pytest.raises(RecipeError, match=r"tasks\[0\]\.kind: target 'depth' is a depth target .* as a segmentation task; use kind = 'depth'"):
        build_tasks([TaskConfig(name="depth", kind="segmentation")], TARGETS)


def test_build_tasks_num_classes_checks():
    with pytest.raises(RecipeError, match=r"tasks\[0\]\.num_classes: target 'label' has 5 classes.*got 3"):
        build_tasks([TaskConfig(name="label", kind="classification", num_classes=3)], TARGETS)
    with pytest.raises(RecipeError, match=r"tasks\[0\]\.num_classes: only classification and segmentation"):
        build_tasks([TaskConfig(name="depth", kind="depth", num_classes=3)], TARGETS)
    with pytest.raises(RecipeError, match="does not say how many classes"):
        build_tasks([TaskConfig(name="x", kind="classification")], {"x": Spec("x", "classification")})


def test_build_tasks_loss_must_fit_the_kind():
    with pytest.raises(RecipeError, match=r"tasks\[0\]\.loss: a classification task has one loss \(cross-entropy\); remove loss = 'mse'"):
        build_tasks([TaskConfig(name="label", kind="classification", loss="mse")], TARGETS)
    with pytest.raises(RecipeError, match=r"tasks\[0\]\.loss: a depth task takes 'l1' or 'mse'; got 'l2'"):
        build_tasks([TaskConfig(name="depth", kind="depth", loss="l2")], TARGETS)


def test_tasks_command_lists_every_kind_and_rejects_an_unknown_one():
    from branchnas_cli.tasks import command
    from click.testing import CliRunner

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 0, result.output
    for kind in TASK_KINDS:
        assert f"\n{kind}\n" in f"\n{result.output}"
    assert "miou ↑ (primary), pixel_acc ↑" in result.output
    assert "abs_err ↓ (primary), rmse ↓" in result.output
    one = CliRunner().invoke(command, ["normals"])
    assert one.output.splitlines()[0] == "normals" and "mean_angle ↓ (primary)" in one.output
    bad = CliRunner().invoke(command, ["segmentaton"])
    assert isinstance(bad.exception, UserError) and "did you mean 'segmentation'" in str(bad.exception)


# --------------------------------------------------------------------------- delta_mtl


def test_delta_mtl_hand_computed_with_both_directions():
    tasks = [Task("cls", "classification", "c", num_classes=3), Task("dep", "depth", "d")]
    metrics = {"cls": {"accuracy": 0.9}, "dep": {"abs_err": 0.5, "rmse": 99.0}}
    baseline = {"cls": {"accuracy": 0.8}, "dep": {"abs_err": 0.4, "rmse": 1.0}}
    # accuracy +0.1/0.8 = +0.125 (higher better); abs_err worse: -(0.1/0.4) = -0.25; rmse unused
    assert delta_mtl(metrics, baseline, tasks) == pytest.approx((0.125 - 0.25) / 2)
    # a lower error is an improvement
    metrics["dep"]["abs_err"] = 0.3
    assert delta_mtl(metrics, baseline, tasks) == pytest.approx((0.125 + 0.25) / 2)


def test_delta_mtl_errors():
    tasks = [Task("dep", "depth", "d")]
    with pytest.raises(UserError, match="baseline metrics have no 'abs_err' for task 'dep'"):
        delta_mtl({"dep": {"abs_err": 1.0}}, {"other": {"abs_err": 1.0}}, tasks)
    with pytest.raises(UserError, match="model metrics have no 'abs_err'"):
        delta_mtl({}, {"dep": {"abs_err": 1.0}}, tasks)
    with pytest.raises(UserError, match="abs_err = 0"):
        delta_mtl({"dep": {"abs_err": 1.0}}, {"dep": {"abs_err": 0.0}}, tasks)


def test_delta_mtl_with_a_zero_baseline_can_return_nan_instead_of_raising():
    import math

    from branchnas.tasks import Task, delta_mtl

    task = Task(name="a", kind="classification", target="a", num_classes=3)
    assert math.isnan(delta_mtl({"a": {"accuracy": 0.5}}, {"a": {"accuracy": 0.0}}, [task], undefined="nan"))
    with pytest.raises(UserError, match="baseline of task 'a' has accuracy = 0"):
        delta_mtl({"a": {"accuracy": 0.5}}, {"a": {"accuracy": 0.0}}, [task])
