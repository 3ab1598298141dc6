"""``precision = fp32 | bf16 | auto``: bf16 autocast in the forward, fp32 losses and metrics."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from branchnas.errors import UserError
from branchnas.tasks import Task
from branchnas.training import Trainer, evaluate, runtime
from branchnas.training.runtime import bf16_supported, resolve_precision
from branchnas.weighting import Uniform

sys.path.insert(0, str(Path(__file__).parent))
from test_training import COLOUR, config, make_split, tiny_model, weights  # noqa: E402

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def with_bf16(monkeypatch):
    """Pretend the CPU does bf16 in hardware (autocast itself works on any CPU, only slower)."""
    monkeypatch.setattr(runtime, "_cpu_bf16_native", lambda: True)
    monkeypatch.setattr(runtime, "_mkldnn_bf16", lambda: True)


@pytest.fixture
def without_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "_cpu_bf16_native", lambda: False)


class RecordingUniform(Uniform):
    """Uniform weighting that notes the dtype of every loss it backpropagates."""

    def __init__(self, tasks, seed=0):
        super().__init__(tasks, seed=seed)
        self.dtypes: set[torch.dtype] = set()

    def backward(self, losses, shared):
        self.dtypes |= {loss.dtype for loss in losses.values()}
        return super().backward(losses, shared)


def _record_layer_outputs(model: nn.Module, seen: set[torch.dtype] | None = None) -> set[torch.dtype]:
    """The dtypes the model's convs and linears output, noted by forward hooks."""
    seen = set() if seen is None else seen
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    return seen


def _record_meter_inputs(monkeypatch) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    meter = Task.meter

    def recording(self):
        inner = meter(self)
        update = inner.update

        def update_and_note(output, target):
            seen.add(output.dtype)
            return update(output, target)

        inner.update = update_and_note
        return inner

    monkeypatch.setattr(Task, "meter", recording)
    return seen


SECOND = Task("colour2", "classification", "colour", num_classes=3)


def test_bf16_runs_layers_in_bf16_and_losses_and_metrics_in_fp32(with_bf16, monkeypatch):
    tasks = [COLOUR, SECOND]
    models = {"colour": tiny_model(COLOUR), "colour2": tiny_model(SECOND, 1)}
    layers = _record_layer_outputs(models["colour"])
    _record_layer_outputs(models["colour2"], layers)
    metered = _record_meter_inputs(monkeypatch)
    lossed: set[torch.dtype] = set()  # what the task losses are given (each casts too, to be safe)
    loss = Task.loss
    monkeypatch.setattr(Task, "loss", lambda self, output, target: lossed.add(output.dtype) or loss(self, output, target))
    weightings = {t.name: RecordingUniform([t]) for t in tasks}
    trainer = Trainer(models, tasks, config(epochs=1, precision="bf16"), batch_size=32, seed=0,
                      weighting=weightings, progress=False)
    assert (trainer.precision, trainer.concurrent) == ("bf16", "shared")
    trainer.fit(make_split(64, 1), make_split(32, 2))
    assert layers == {torch.bfloat16}
    assert lossed == {torch.float32}
    assert all(w.dtypes == {torch.float32} for w in weightings.values())  # what is backpropagated
    assert metered == {torch.float32}
    # The weights (the optimizer's master copy) stay fp32.
    assert {p.dtype for m in models.values() for p in m.parameters()} == {torch.float32}


def test_bf16_on_cpu_refuses_stacked_encoders(with_bf16):
    """CPU autocast has no rule for the grouped convolution vmap lowers the encoders to (they
    would silently stay fp32), so stacking is refused there as any other unstackable case."""
    models = {"colour": tiny_model(COLOUR), "colour2": tiny_model(SECOND, 1)}
    with pytest.raises(UserError, match="concurrent='stacked' is not possible here: bf16 on CPU .*; use 'shared'"):
        Trainer(models, [COLOUR, SECOND], config(precision="bf16"), batch_size=32, seed=0, concurrent="stacked")


def test_fp32_runs_every_layer_in_fp32():
    model = tiny_model(COLOUR)
    seen = _record_layer_outputs(model)
    Trainer({"colour": model}, [COLOUR], config(epochs=1), batch_size=32, seed=0,
            progress=False).fit(make_split(32, 1), make_split(16, 2))
    assert seen == {torch.float32}


def test_evaluate_in_bf16_feeds_the_meters_fp32(with_bf16, monkeypatch):
    model = tiny_model(COLOUR)
    layers = _record_layer_outputs(model)
    metered = _record_meter_inputs(monkeypatch)
    evaluate(model, [COLOUR], make_split(32, 2), 16, precision="bf16")
    assert layers == {torch.bfloat16} and metered == {torch.float32}
    layers.clear()
    evaluate(model, [COLOUR], make_split(32, 2), 16)
    assert layers == {torch.float32}


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten().float() for k, v in state.items() if v.is_floating_point() and "running" not in k])


def test_bf16_training_ends_close_to_fp32_but_not_identical(with_bf16):
    """Tolerance: bf16 keeps 8 significant bits, so every conv/linear output carries a relative
    rounding error of up to 2^-9 (0.2%), while the weights, gradients and optimizer state stay
    fp32 (checked above), so the errors do not compound through the updates. After 3 epochs the
    bf16 weights end 0.3-0.5% of the distance training moved them (measured) away from the fp32
    ones: the gap is measured against that distance, not the weights' size, which initialisation
    dominates. 5% allows 10x the measured gap; a bf16 run that learns something else (diverges,
    stalls) lands near 100%, and one where autocast never applied lands at exactly 0. The
    per-epoch losses agree to 1% (measured: 0.05%)."""
    train, val = make_split(96, 1), make_split(32, 2)
    start = _flat(weights(tiny_model(COLOUR)))
    ends, losses = {}, {}
    for precision in ("fp32", "bf16"):
        model = tiny_model(COLOUR)
        result = Trainer({"colour": model}, [COLOUR], config(epochs=3, precision=precision), batch_size=32,
                         seed=0, progress=False).fit(train, val)["colour"]
        losses[precision] = [h["train_loss"]["colour"] for h in result["history"]]
        ends[precision] = _flat(weights(model))
    assert all(torch.isfinite(torch.tensor(losses["bf16"])))
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.01)
    moved = (ends["fp32"] - start).norm()
    gap = (ends["bf16"] - ends["fp32"]).norm()
    assert 0 < gap < 0.05 * moved, f"bf16 ends {gap / moved:.2%} of the training distance from fp32"


def _cpu_has_bf16_per_cpuinfo() -> bool | None:
    """Independent of torch's cpuinfo: the kernel's CPU flags (Linux x86 only, else None)."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not cpuinfo.exists():
        return None
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"}) and torch.backends.mkldnn.is_available()


def test_auto_is_bf16_exactly_where_the_cpu_has_it():
    expected = _cpu_has_bf16_per_cpuinfo()
    if expected is None:
        pytest.skip("needs Linux on x86 (/proc/cpuinfo flags)")
    assert bf16_supported(CPU) is expected
    assert resolve_precision("auto", CPU) == ("bf16" if expected else "fp32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_auto_is_bf16_exactly_where_the_gpu_has_it():
    device = torch.device("cuda")
    native = torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere and later
    assert resolve_precision("auto", device) == ("bf16" if native else "fp32")


def test_auto_follows_the_hardware_check(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(runtime, "_cpu_bf16_native", lambda native=native: native)
        monkeypatch.setattr(runtime, "_mkldnn_bf16", lambda: True)
        model = tiny_model(COLOUR)
        seen = _record_layer_outputs(model)
        trainer = Trainer({"colour": model}, [COLOUR], config(epochs=1, precision="auto"), batch_size=32,
                          seed=0, progress=False)
        assert trainer.precision == ("bf16" if native else "fp32")
        trainer.fit(make_split(32, 1))
        assert seen == {torch.bfloat16 if native else torch.float32}
    assert resolve_precision("fp32", CPU) == "fp32"  # never asks the hardware


def test_bf16_without_hardware_support_is_refused_before_any_work(without_bf16, monkeypatch, in_tmp):
    from branchnas.pipeline import run_stages
    from branchnas.recipe import load_recipe
    from branchnas.stages import _checks
    from branchnas.stages._base import get_stage

    def no_data(recipe):
        raise AssertionError("the data was opened before the precision was checked")

    monkeypatch.setattr(_checks, "splits_of", no_data)
    recipe = load_recipe(None, ["pretrain.device=cpu", "pretrain.precision=bf16"])
    with pytest.raises(UserError) as err:
        run_stages(recipe, ["pretrain"], progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("pretrain.precision: 'bf16' asked for, but this CPU has neither AVX-512 BF16 nor AMX")
    assert "use auto" in message and "fp32" in message
    assert not (in_tmp / "runs").exists()
    finetune = load_recipe(None, ["finetune.device=cpu", "finetune.precision=bf16"])
    with pytest.raises(UserError, match=r"^finetune\.precision: 'bf16' asked for"):
        get_stage("finetune").check(finetune, {})
    with pytest.raises(UserError, match=r"^pretrain\.precision: 'bf16' asked for"):
        Trainer({"colour": tiny_model(COLOUR)}, [COLOUR], config(precision="bf16"), batch_size=8, seed=0)
    for precision in ("fp32", "auto"):  # both run anywhere
        get_stage("finetune").check(load_recipe(None, [f"finetune.precision={precision}"]), {})


def test_precision_is_a_checked_recipe_key():
    from branchnas.errors import RecipeError
    from branchnas.recipe import load_recipe

    recipe = load_recipe(None, ["pretrain.precision=auto"])
    assert (recipe.pretrain.precision, recipe.finetune.precision) == ("auto", "fp32")
    with pytest.raises(RecipeError, match=r"finetune\.precision: expected one of 'fp32', 'bf16', 'auto'; got 'fp16'"):
        load_recipe(None, ["finetune.precision=fp16"])


def test_a_checkpoint_records_the_resolved_precision(with_bf16, tmp_path):
    train = make_split(32, 1)
    Trainer({"colour": tiny_model(COLOUR)}, [COLOUR], config(epochs=1, precision="auto"), batch_size=32, seed=0,
            checkpoint=tmp_path, progress=False).fit(train)
    # auto resolved to bf16 here: asking for bf16 resumes it, fp32 is other settings.
    Trainer({"colour": tiny_model(COLOUR)}, [COLOUR], config(epochs=1, precision="bf16"), batch_size=32, seed=0,
            checkpoint=tmp_path, progress=False).fit(train)
    with pytest.raises(UserError, match="precision was 'bf16', now 'fp32'"):
        Trainer({"colour": tiny_model(COLOUR)}, [COLOUR], config(epochs=1, precision="fp32"), batch_size=32,
                seed=0, checkpoint=tmp_path, progress=False).fit(train)
