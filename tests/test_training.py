"""The trainer on tiny synthetic problems: learning, schedule, early stopping, NaN, resume, joint."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from branchnas.data import TargetSpec, TensorDataset
from branchnas.errors import TrainingDiverged, UserError
from branchnas.heads import build_head
from branchnas.recipe import PretrainConfig
from branchnas.tasks import Task
from branchnas.training import SingleTaskModel, Trainer, evaluate, lr_factor, resolve_device

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 8


def make_split(n: int, seed: int, flip: tuple[str, ...] = ()) -> TensorDataset:
    """Noise images where class c (0..2) brightens colour channel c; a second task 'odd' is c == 1.

    The targets named in ``flip`` are wrong on purpose (colour shifted by one class, odd
    negated): a model that learns the training split gets worse on this one, which makes
    early stopping happen.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 120, (n, 3, SIZE, SIZE)).astype(np.uint8)
    images[np.arange(n), labels] += 100
    colour = (labels + 1) % 3 if "colour" in flip else labels
    odd = (labels == 1) != ("odd" in flip)
    specs = {
        "colour": TargetSpec("colour", "classification", 3),
        "odd": TargetSpec("odd", "attribute"),
    }
    targets = {"colour": colour.astype(np.int64), "odd": odd.astype(np.float32)}
    return TensorDataset(images, targets, specs, mean=(0.3, 0.3, 0.3), std=(0.2, 0.2, 0.2),
                         can_flip=True, name=f"toy/{seed}")


COLOUR = Task("colour", "classification", "colour", num_classes=3)
ODD = Task("odd", "attribute", "odd")


def tiny_model(task: Task, seed: int = 0) -> SingleTaskModel:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    return SingleTaskModel(backbone, build_head(task, 8, 1, (SIZE, SIZE)), task.name)


def config(**changes) -> PretrainConfig:
    base = dict(epochs=3, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-4, schedule="cosine",
                warmup_epochs=0, patience=0, grad_clip=0.0, device="cpu")
    return PretrainConfig(**{**base, **changes})


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key].float() - b[key].float()).abs().max()}"


class Interrupt(Exception):
    """Stands in for a kill in the middle of an epoch."""


def test_learns_a_tiny_problem():
    train, val = make_split(192, 1), make_split(96, 2)
    model = tiny_model(COLOUR)
    result = Trainer({"colour": model}, [COLOUR], config(epochs=4), batch_size=32, seed=0,
                     progress=False).fit(train, val)["colour"]
    losses = [h["train_loss"]["colour"] for h in result["history"]]
    assert losses[-1] < 0.5 * losses[0]
    labels = val.get_batch(range(len(val)))[1]["colour"]
    chance = float(torch.bincount(labels).max()) / len(labels)  # the majority class of this split
    accuracy = evaluate(model, [COLOUR], val, 32)["colour"]["accuracy"]
    assert accuracy >= chance + 0.4
    assert result["history"][-1]["val"]["colour"]["accuracy"] == pytest.approx(accuracy)


def test_lr_factor_matches_the_closed_form():
    total, warmup = 40, 8
    for step in range(total):
        if step < warmup:
            expected = (step + 1) / warmup
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert lr_factor(step, total, warmup, "cosine") == pytest.approx(expected, abs=1e-12)
    assert lr_factor(0, total) == 1.0
    assert lr_factor(total // 2, total) == pytest.approx(0.5)
    assert lr_factor(total - 1, total, 0, "constant") == 1.0
    assert lr_factor(2, total, 4, "constant") == pytest.approx(0.75)


def test_trainer_applies_the_schedule_every_step():
    train = make_split(64, 1)  # 2 batches of 32 per epoch
    cfg = config(epochs=3, warmup_epochs=1, lr=0.1)
    seen = []
    trainer = Trainer({"colour": tiny_model(COLOUR)}, [COLOUR], cfg, batch_size=32, seed=0, progress=False,
                      on_step=lambda info: seen.append(trainer.members[0].optimizer.param_groups[0]["lr"]))
    trainer.fit(train)
    expected = [0.1 * lr_factor(s, 6, 2, "cosine") for s in range(6)]
    assert seen == pytest.approx(expected)


def test_early_stopping_restores_the_best_epoch():
    # Validation labels are shifted, so learning the training split makes validation worse:
    # the best epoch is the first, and patience 1 stops after the second.
    train, val = make_split(96, 1), make_split(96, 2, flip=("colour",))
    cfg = config(epochs=6, schedule="constant", patience=1)
    model = tiny_model(COLOUR)
    result = Trainer({"colour": model}, [COLOUR], cfg, batch_size=32, seed=0, progress=False).fit(train, val)["colour"]
    assert result["best_epoch"] == 1
    assert result["stopped_early"] is True
    assert result["epochs"] == 2 and len(result["history"]) == 2
    # With a constant schedule, epoch 1 of this run is a 1-epoch run: the weights must be its.
    reference = tiny_model(COLOUR)
    Trainer({"colour": reference}, [COLOUR], dataclasses.replace(cfg, epochs=1, patience=0), batch_size=32,
            seed=0, progress=False).fit(train, val)
    assert_same(weights(model), weights(reference))


class NaNAfter(nn.Module):
    """A model whose output turns NaN on its ``k``-th training forward pass."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.inner = tiny_model(COLOUR)
        self.k, self.calls = k, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.k:
                out = {name: value * float("nan") for name, value in out.items()}
        return out


def test_nan_loss_stops_with_task_and_step():
    train = make_split(64, 1)  # 2 steps per epoch: step 3 is epoch 2, batch 1
    trainer = Trainer(NaNAfter(3), [COLOUR], config(lr=0.02), batch_size=32, seed=0, progress=False)
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit(train)
    message = str(info.value)
    assert "task 'colour'" in message and "step 3" in message and "epoch 2, batch 1" in message
    assert "pretrain.lr" in message and "\n" not in message


def test_resume_after_a_kill_gives_identical_weights(tmp_path):
    train, val = make_split(96, 1), make_split(64, 2)
    cfg = config(epochs=3, warmup_epochs=1)

    def kill(info):
        if info["epoch"] == 1 and info["batch"] == 1:
            raise Interrupt

    interrupted = tiny_model(COLOUR)
    with pytest.raises(Interrupt):
        Trainer(interrupted, [COLOUR], cfg, batch_size=32, seed=3, checkpoint=tmp_path, progress=False,
                on_step=kill).fit(train, val)
    assert (tmp_path / "model.pt").exists()
    resumed = tiny_model(COLOUR)  # a fresh process starts from the same untrained model
    steps = []
    history = Trainer(resumed, [COLOUR], cfg, batch_size=32, seed=3, checkpoint=tmp_path, progress=False,
                      on_step=lambda info: steps.append(info["step"])).fit(train, val)
    assert steps[0] == 4  # epoch 1 (3 steps) came from the checkpoint; epoch 2 is redone
    uninterrupted = tiny_model(COLOUR)
    reference = Trainer(uninterrupted, [COLOUR], cfg, batch_size=32, seed=3, progress=False).fit(train, val)
    assert_same(weights(resumed), weights(uninterrupted))
    assert [h["train_loss"] for h in history["history"]] == [h["train_loss"] for h in reference["history"]]


def test_checkpoint_with_other_settings_is_refused(tmp_path):
    train = make_split(32, 1)
    Trainer(tiny_model(COLOUR), [COLOUR], config(epochs=1), batch_size=32, seed=0, checkpoint=tmp_path,
            progress=False).fit(train)
    with pytest.raises(UserError, match="lr was 0.05, now 0.1"):
        Trainer(tiny_model(COLOUR), [COLOUR], config(epochs=1, lr=0.1), batch_size=32, seed=0,
                checkpoint=tmp_path, progress=False).fit(train)


@pytest.mark.parametrize("mode", ["shared", "stacked"])
def test_joint_training_equals_separate_training(mode):
    # 'odd' learns from flipped validation labels and stops early; 'colour' goes on. Each
    # model's clipping, schedule, best epoch and stop must be its own, as if trained alone.
    train, val = make_split(96, 1), make_split(64, 2, flip=("odd",))
    cfg = config(epochs=4, patience=1, grad_clip=0.5, warmup_epochs=1)
    tasks = [COLOUR, ODD]
    alone = {t.name: tiny_model(t, seed=i) for i, t in enumerate(tasks)}
    joint = copy.deepcopy(alone)
    results_alone = {}
    for t in tasks:
        results_alone.update(Trainer({t.name: alone[t.name]}, [t], cfg, batch_size=32, seed=5,
                                     progress=False).fit(train, val))
    trainer = Trainer(joint, tasks, cfg, batch_size=32, seed=5, concurrent=mode, progress=False)
    results_joint = trainer.fit(train, val)
    assert trainer.concurrent == mode
    for t in tasks:
        assert results_joint[t.name]["best_epoch"] == results_alone[t.name]["best_epoch"]
        assert results_joint[t.name]["epochs"] == results_alone[t.name]["epochs"]
        a, b = weights(alone[t.name]), weights(joint[t.name])
        if mode == "shared":
            assert_same(a, b)
        else:  # grouped kernels sum in another order: equal up to float rounding
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert results_alone["odd"]["stopped_early"] and not results_alone["colour"]["stopped_early"]


def test_stacked_training_resumes_identically(tmp_path):
    train = make_split(64, 1)
    cfg = config(epochs=2)
    tasks = [COLOUR, ODD]

    def kill(info):
        if info["epoch"] == 1:
            raise Interrupt

    first = {t.name: tiny_model(t, seed=i) for i, t in enumerate(tasks)}
    with pytest.raises(Interrupt):
        Trainer(first, tasks, cfg, batch_size=32, seed=0, checkpoint=tmp_path, concurrent="stacked",
                progress=False, on_step=kill).fit(train)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colour.pt", "odd.pt"]
    resumed = {t.name: tiny_model(t, seed=i) for i, t in enumerate(tasks)}
    Trainer(resumed, tasks, cfg, batch_size=32, seed=0, checkpoint=tmp_path, concurrent="stacked",
            progress=False).fit(train)
    straight = {t.name: tiny_model(t, seed=i) for i, t in enumerate(tasks)}
    Trainer(straight, tasks, cfg, batch_size=32, seed=0, concurrent="stacked", progress=False).fit(train)
    for t in tasks:
        assert_same(weights(resumed[t.name]), weights(straight[t.name]))


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="concurrent"):
        Trainer({"colour": tiny_model(COLOUR)}, [COLOUR], config(), batch_size=8, seed=0, concurrent="fast")
    with pytest.raises(ValueError, match="one model per task"):
        Trainer({"colour": tiny_model(COLOUR)}, [COLOUR, ODD], config(), batch_size=8, seed=0)


def test_keep_best_scores_epochs_against_a_reference_and_restores_the_best():
    # As early stopping's test, but without stopping: all 4 epochs run, and keep_best ends with
    # the weights of epoch 1, the best against the reference (Δ_MTL-style relative change).
    train, val = make_split(96, 1), make_split(96, 2, flip=("colour",))
    cfg = config(epochs=4, schedule="constant")
    model = tiny_model(COLOUR)
    reference = {"colour": {"accuracy": 0.5}}
    result = Trainer(model, [COLOUR], cfg, batch_size=32, seed=0, progress=False, reference=reference,
                     keep_best=True).fit(train, val)
    assert result["epochs"] == 4 and not result["stopped_early"] and result["best_epoch"] == 1
    scores = [h["val"]["colour"]["accuracy"] for h in result["history"]]
    assert scores[0] == max(scores)
    one_epoch = tiny_model(COLOUR)
    Trainer(one_epoch, [COLOUR], dataclasses.replace(cfg, epochs=1), batch_size=32, seed=0,
            progress=False).fit(train, val)
    assert_same(weights(model), weights(one_epoch))


def test_the_objective_hook_changes_what_is_optimised():
    # An objective that zeroes the colour loss leaves the weights where they started.
    train = make_split(64, 1)
    model = tiny_model(COLOUR)
    before = weights(model)

    class Zero:
        wants_features = False

        def to(self, device):
            return self

        def __call__(self, images, outputs, losses, targets, features=None):
            assert features is None and set(outputs) == {"colour"}
            return {name: value * 0.0 for name, value in losses.items()}

    Trainer(model, [COLOUR], config(epochs=1, weight_decay=0.0, momentum=0.0), batch_size=32, seed=0,
            progress=False, objective=Zero()).fit(train)
    after = weights(model)
    for key in before:
        if "running" not in key and "num_batches" not in key:  # BN statistics still follow the data
            assert torch.equal(before[key], after[key]), key


def test_compare_only_keys_do_not_invalidate_a_checkpoint(tmp_path):
    """A run interrupted, then resumed by `branchnas compare --weighting ...`, continues."""
    from branchnas.recipe import FinetuneConfig
    from branchnas.training import Trainer

    a = FinetuneConfig(device="cpu")
    b = FinetuneConfig(device="cpu", compare_random=2, compare_variants=["plain"], compare_weightings=["famo"])
    from branchnas.tasks import Task

    model, tasks = torch.nn.Linear(2, 2), [Task("t", "regression", "t")]
    configs = [Trainer(model, tasks, cfg, batch_size=1, seed=0, progress=False)._config() for cfg in (a, b)]
    assert configs[0] == configs[1]
    assert Trainer(model, tasks, FinetuneConfig(device="cpu", lr=0.5), batch_size=1, seed=0,
                   progress=False)._config() != configs[0]
