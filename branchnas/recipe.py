"""Recipes: TOML file -> validated dataclasses.

Layering is built-in defaults, then the recipe file, then ``--set section.key=value``
overrides from the command line. The built-in defaults *are* the default recipe
(``recipes/shapes.toml`` spells them out), so a command run with no recipe works out of
the box. Every error names the key path, what was expected and what was given, and
suggests the closest valid key or value.

Example:
    >>> recipe = load_recipe(None, ["pretrain.epochs=2", "tasks[0].weight=2"])
    >>> recipe.pretrain.epochs
    2
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from branchnas.errors import RecipeError, did_you_mean
from branchnas.kinds import TASK_KINDS

__all__ = [
    "Recipe",
    "DataConfig",
    "TaskConfig",
    "BackboneConfig",
    "TrainConfig",
    "PretrainConfig",
    "AffinityConfig",
    "SearchConfig",
    "FinetuneConfig",
    "FusedConfig",
    "AttentiveConfig",
    "TuneConfig",
    "ExportConfig",
    "TASK_KINDS",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipe_to_toml",
    "default_recipe_path",
]

#: Task kinds the recipe accepts; :mod:`branchnas.tasks` implements each one.

DEFAULT_RECIPE_FILE = "branchnas.toml"


def _choices(*values: str, doc: str = "") -> Any:
    return {"choices": values, "doc": doc}


def _spec(doc: str = "", **extra: Any) -> dict[str, Any]:
    return {"doc": doc, **extra}


@dataclass
class DataConfig:
    """The ``[data]`` section: which dataset, where it lives and how it is split."""

    dataset: str = field(default="shapes", metadata=_spec("dataset family; see `branchnas datasets`"))
    root: str = field(default="", metadata=_spec("folder of an on-disk dataset (unused by generated ones)"))
    image_size: list[int] = field(
        default_factory=list,
        metadata=_spec("[height, width] the images are resized to; [] keeps the dataset's size", length=(0, 2)),
    )
    num_train: int = field(default=1600, metadata=_spec("training images (0 = all available)", min=0))
    num_val: int = field(default=500, metadata=_spec("validation images (0 = all available)", min=0))
    num_test: int = field(default=500, metadata=_spec("test images (0 = all available)", min=0))
    batch_size: int = field(default=64, metadata=_spec("images per batch", min=1))
    augment: bool = field(default=True, metadata=_spec("random horizontal flips during training (task-aware)"))
    options: dict[str, Any] = field(default_factory=dict, metadata=_spec("dataset-specific options"))


@dataclass
class TaskConfig:
    """One ``[[tasks]]`` entry. ``target`` defaults to ``name``; 0 and "" mean "the dataset's"."""

    name: str = field(default="", metadata=_spec("task name, unique", required=True))
    kind: str = field(default="", metadata=_spec("task kind", choices=TASK_KINDS, required=True))
    target: str = field(default="", metadata=_spec("the dataset target this task predicts (default: name)"))
    num_classes: int = field(default=0, metadata=_spec("classes of a classification/segmentation task (0 = the dataset's)", min=0))
    weight: float = field(default=1.0, metadata=_spec("loss weight in multi-task fine-tuning", min=0.0))
    loss: str = field(default="", metadata=_spec("loss override for regression/depth: l1 or mse", choices=("", "l1", "mse")))


@dataclass
class BackboneConfig:
    """The ``[backbone]`` section: the shared encoder and its branch points."""

    name: str = field(default="resnet20", metadata=_spec("backbone; see `branchnas backbones`"))
    width: float = field(default=1.0, metadata=_spec("width multiplier (resnet20, mobilenet_v2, lenet5)", min=0.0625))
    granularity: str = field(default="stage", metadata=_choices("stage", "block", doc="branch points per stage or per residual block"))
    dilation: bool = field(default=False, metadata=_spec("dilate the last stages (output stride 8) for dense tasks"))
    weights: str = field(default="", metadata=_spec("local file of backbone weights to start from (never downloaded)"))


@dataclass
class TrainConfig:
    """Optimisation settings shared by pre-training and fine-tuning (one trainer)."""

    epochs: int = field(default=6, metadata=_spec("training epochs", min=1))
    lr: float = field(default=0.05, metadata=_spec("peak learning rate", min=0.0))
    optimizer: str = field(default="sgd", metadata=_choices("sgd", "adam", "adamw"))
    momentum: float = field(default=0.9, metadata=_spec("SGD momentum", min=0.0))
    weight_decay: float = field(default=5e-4, metadata=_spec("weight decay", min=0.0))
    schedule: str = field(default="cosine", metadata=_choices("cosine", "constant"))
    warmup_epochs: int = field(default=0, metadata=_spec("linear warm-up epochs", min=0))
    patience: int = field(default=0, metadata=_spec("early-stopping patience in epochs on the validation metric (0 = off)", min=0))
    grad_clip: float = field(default=0.0, metadata=_spec("clip each model's gradient norm (0 = off)", min=0.0))
    log: str = field(default="csv", metadata=_choices(
        "csv", "tensorboard", doc="per-epoch training log: csv (history CSV files, always written), or tensorboard "
        "(also event files under tensorboard/; pip install 'branchnas[tensorboard]')"))
    device: str = field(default="auto", metadata=_spec("auto, cpu, cuda or cuda:N"))
    precision: str = field(default="fp32", metadata=_choices(
        "fp32", "bf16", "auto", doc="forward passes in fp32, or under bf16 autocast (losses and metrics stay "
        "fp32); auto = bf16 where the device does bf16 in hardware (CUDA Ampere+, CPU with AVX-512 BF16 or AMX)"))
    sync_bn: bool = field(default=False, metadata=_spec(
        "under torchrun (DDP): BatchNorm statistics over the whole global batch (SyncBatchNorm; CUDA only), "
        "not over each process's share; no effect in one process"))


@dataclass
class PretrainConfig(TrainConfig):
    """The ``[pretrain]`` section: one single-task model per task (stage 1)."""

    epochs: int = field(default=5, metadata=_spec("training epochs", min=1))
    concurrent: bool = field(default=True, metadata=_spec("train the N single-task models together, sharing each batch"))
    parallel: str = field(default="auto", metadata=_choices(
        "auto", "tasks", "data", doc="under torchrun: tasks = each process trains its share of the models alone "
        "(the same results as one process), data = DDP on the models, each process taking its share of every "
        "batch; auto = tasks when there are at least as many models to train as processes"))


@dataclass
class AffinityConfig:
    """The ``[affinity]`` section: RSA task affinity at every branch point (stage 2)."""

    images: int = field(default=500, metadata=_spec("K held-out images for the RDMs", min=3))
    bootstrap: int = field(default=0, metadata=_spec("bootstrap resamples of the K images for confidence intervals (0 = off)", min=0))
    split: str = field(default="val", metadata=_choices("val", "test", "train"))
    batch_size: int = field(default=16, metadata=_spec("images per forward pass (memory grows with it)", min=1))


@dataclass
class SearchConfig:
    """The ``[search]`` section: the budget-constrained tree search (stage 3)."""

    budget: str = field(default="50%", metadata=_spec("budget such as 10M, 2.5G, 8ms (metric latency), or 50% of the all-separate size; empty = no limit", number_ok=True))
    metric: str = field(default="params", metadata=_choices("params", "flops", "latency", doc="what the budget counts (fvcore: one multiply-add = one flop; latency: seconds per image at data.batch_size)"))
    latency_table: str = field(default="", metadata=_spec("metric latency: a table from `branchnas profile -o FILE` (e.g. measured on the deployment machine); empty = measure on this machine"))
    mode: str = field(default="auto", metadata=_choices("auto", "exact", "scalable"))
    exact_limit: int = field(default=5_000_000_000, metadata=_spec("auto runs exact search up to this many trees", min=1))
    top: int = field(default=1, metadata=_spec("list this many best trees", min=1))


@dataclass
class GatedConfig:
    """``[finetune.gated]``: the GatedMTL variant's gates (``finetune.variant = "gated"``)."""

    sparsity: float = field(default=2.0, metadata=_spec("λ_s, the weight of the hinge sparsity loss on the gates", min=0.0))
    targets: float | dict[str, float] = field(default=0.05, metadata=_spec(
        "τ_t, the hinge target (share of a task's gates left open without penalty): one value for every "
        "task, or a table { task = value }", min=0.0, max=1.0))
    lr: float = field(default=10.0, metadata=_spec("learning rate of the gates' own SGD (α and β)", min=0.0))
    init: float = field(default=-0.1, metadata=_spec(
        "initial gate logit α: > 0 starts every task on its own single-task features, < 0 on the shared ones"))


@dataclass
class FusedConfig:
    """``[finetune.fused]``: the Task Fusion variant's layers (``finetune.variant = "fused"``)."""

    where: str = field(default="all", metadata=_choices(
        "all", "last", doc="which convs of a shared block get a task fusion layer in place of their BN→ReLU: "
        "all of them, or the last one of each block"))
    modulation: str = field(default="both", metadata=_choices(
        "film", "prelu", "both", doc="task modulation: FiLM (γ, β), MultiPReLU (α), or FiLM then PReLU"))
    bottleneck: str = field(default="conv", metadata=_choices(
        "conv", "linear", "attention", doc="shared bottleneck from C·(T+1) channels back to C: 1×1 conv + BN, "
        "a linear layer over channels, or self-attention over the T+1 modulations"))


@dataclass
class AttentiveConfig:
    """``[finetune.attentive]``: the ASTMT variant's modulation (``finetune.variant = "attentive"``)."""

    reduction: int = field(default=16, metadata=_spec("squeeze-and-excitation reduction ratio", min=1))
    adapters: bool = field(default=False, metadata=_spec(
        "per-task residual adapters: a 1×1 conv beside each shared conv, initialised to zero"))
    adversarial: bool = field(default=True, metadata=_spec(
        "adversarial training: a discriminator tells the tasks apart from their gradients at the branch "
        "points, and the reversed gradient makes them indistinguishable"))
    weight: float = field(default=0.01, metadata=_spec("w: the loss is (1 - w)·L_task + w·L_D", min=0.0, max=1.0))
    discriminator_lr: float = field(default=10.0, metadata=_spec(
        "the discriminator's learning rate, as a multiple of finetune.lr", min=0.0))


@dataclass
class FinetuneConfig(TrainConfig):
    """The ``[finetune]`` section: the branched network's multi-task fine-tuning (stage 4)."""

    epochs: int = field(default=5, metadata=_spec("training epochs", min=1))
    lr: float = field(default=0.02, metadata=_spec("peak learning rate", min=0.0))
    variant: str = field(default="plain", metadata=_choices("plain", "gated", "fused", "attentive"))
    weighting: str | dict[str, Any] = field(default="uncertainty", metadata=_spec(
        "loss weighting: a name, or a table { name = ..., option = value }; options: dwa: temperature; "
        "gradnorm: alpha, lr; mgda: normalization; graddrop: leak; imtl: loss_scale; gradvac: beta; famo: lr, decay",
        choices=("uniform", "uncertainty", "dwa", "rlw", "pcgrad", "gradnorm", "mgda", "graddrop", "imtl", "gradvac", "famo"),
        # Each scheme's options (keyword arguments of its class in branchnas.weighting).
        options={
            "dwa": {"temperature": {"type": float, "min": 0.0}},
            "gradnorm": {"alpha": {"type": float, "min": 0.0}, "lr": {"type": float, "min": 0.0}},
            "mgda": {"normalization": {"type": str, "choices": ("none", "l2", "loss", "loss+")}},
            "graddrop": {"leak": {"type": float, "min": 0.0, "max": 1.0}},
            "imtl": {"loss_scale": {"type": bool}},
            "gradvac": {"beta": {"type": float, "min": 0.0, "max": 1.0}},
            "famo": {"lr": {"type": float, "min": 0.0}, "decay": {"type": float, "min": 0.0}},
        },
    ))
    init: str = field(default="outlier", metadata=_choices("first", "central", "outlier", "average", "scratch", doc="how tree nodes take single-task weights: the group's first task, its most central task by affinity, its least central (outlier) task, the group mean, or fresh"))
    align_images: int = field(default=128, metadata=_spec(
        "training images on which each node or head that starts from another model's features fits the "
        "least-squares change of basis folded into its first layers (0 = off)", min=0))
    distill: float = field(default=0.3, metadata=_spec("weight of output distillation from each task's single-task model (0 = off)", min=0.0))
    distill_features: float = field(default=0.0, metadata=_spec("weight of feature distillation at the branch points (0 = off)", min=0.0))
    distill_temperature: float = field(default=2.0, metadata=_spec("softmax temperature of output distillation", min=0.01))
    balance: str = field(default="none", metadata=_choices("none", "single_task", doc="scale each task's loss by 1 / its single-task model's final training loss"))
    select: str = field(default="last", metadata=_choices("last", "best", doc="keep the last epoch, or the one with the best validation Δ_MTL"))
    compare_random: int = field(default=0, metadata=_spec("random trees of similar size in `branchnas compare`", min=0))
    compare_variants: list[str] = field(default_factory=lambda: ["plain", "gated", "fused", "attentive"], metadata=_spec(
        "fine-tuning variants that `branchnas compare` trains on the chosen tree, one row each"))
    compare_weightings: list[str] = field(default_factory=list, metadata=_spec(
        "loss weightings that `branchnas compare` also trains the chosen tree with, one row each (names)"))
    gated: GatedConfig = field(default_factory=GatedConfig)
    fused: FusedConfig = field(default_factory=FusedConfig)
    attentive: AttentiveConfig = field(default_factory=AttentiveConfig)


@dataclass
class TuneConfig:
    """The ``[tune]`` section: Optuna over the gated variant's sparsity and hinge targets (stage 5)."""

    enabled: bool = field(default=False, metadata=_spec(
        "run the tune stage in `branchnas run`; its best trial within the budget becomes the exported model"))
    trials: int = field(default=12, metadata=_spec(
        "finished trials (complete or pruned) the study should hold; `branchnas tune --trials N` adds N more", min=1))
    timeout: float = field(default=0.0, metadata=_spec("start no new trial after this many seconds (0 = no limit)", min=0.0))
    storage: str = field(default="", metadata=_spec(
        "Optuna storage URL (postgresql://user@host/db); empty = SQLite <run dir>/tune-study/study.db. "
        "Put a password in PGPASSWORD or ~/.pgpass, not here (it is masked wherever the URL is shown)"))
    study: str = field(default="", metadata=_spec("study name; empty = <name>-<hash of the tree and the search space>"))
    objective: str = field(default="delta", metadata=_choices(
        "delta", "pareto", doc="delta: maximise val Δ_MTL; pareto: maximise val Δ_MTL and minimise size (a Pareto front)"))
    sparsity_min: float = field(default=0.01, metadata=_spec("lower bound of λ_s (log-uniform)", min=0.0))
    sparsity_max: float = field(default=30.0, metadata=_spec("upper bound of λ_s (log-uniform)", min=0.0))
    grid: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.05, 0.07, 0.1], metadata=_spec(
        "λ_s values enqueued as the first trials (GatedMTL's grid); [] = none"))
    targets: str = field(default="shared", metadata=_choices(
        "shared", "per_task", "fixed", doc="hinge targets τ: one tuned for all tasks, one tuned per task, or "
        "finetune.gated.targets as set"))
    target_min: float = field(default=0.0, metadata=_spec("lower bound of τ", min=0.0, max=1.0))
    target_max: float = field(default=0.5, metadata=_spec("upper bound of τ", min=0.0, max=1.0))
    lr: bool = field(default=False, metadata=_spec("also tune finetune.lr, log-uniform in [lr / 4, lr × 4]"))
    pruner: str = field(default="median", metadata=_choices(
        "median", "hyperband", "none", doc="stop unpromising trials early on their val Δ_MTL per epoch (objective delta)"))
    pruner_startup: int = field(default=3, metadata=_spec("trials that finish before the median pruner prunes", min=0))


@dataclass
class ExportConfig:
    """The ``[export]`` section (stage 6)."""

    format: str | list[str] = field(default_factory=lambda: ["torchscript"], metadata=_choices(
        "torchscript", "torch.export", "onnx", doc="file format, or a list of them: torchscript (model.pt), "
        "torch.export (model.pt2), onnx (model.onnx, needs pip install 'branchnas[onnx]')"))
    output: str = field(default="", metadata=_spec("output file; empty = <run dir>/export/model.pt"))
    check: bool = field(default=True, metadata=_spec("reload in a clean process and compare with eager outputs"))
    atol: float = field(default=1e-5, metadata=_spec("largest allowed absolute difference in the check", min=0.0))
    over_budget: bool = field(default=False, metadata=_spec("export a fine-tuned network that is over the search budget"))


@dataclass
class Recipe:
    """A whole resolved recipe."""

    name: str = field(default="shapes", metadata=_spec("recipe name; the run directory is <out>/<name>"))
    seed: int = field(default=0, metadata=_spec("seed of every random choice"))
    out: str = field(default="runs", metadata=_spec("parent folder of run directories"))
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        """The run directory: ``<out>/<name>``."""
        return Path(self.out) / self.name

    def task(self, name: str) -> TaskConfig:
        """Return the task called ``name``."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise RecipeError(
            f"tasks: no task named '{name}'{did_you_mean(name, [t.name for t in self.tasks])}"
        )


# --------------------------------------------------------------------------- validation

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"a list {json.dumps(value, default=str)[:60]}"
    return repr(value)


def _coerce(path: str, value: Any, annotation: Any, meta: dict[str, Any]) -> Any:
    """Check ``value`` against a field's type and constraints, returning the coerced value."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false; got {_describe(value)}")
    elif annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise RecipeError(f"{path}: expected an integer; got {_describe(value)}")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{path}: expected a number; got {_describe(value)}")
        value = float(value)
    elif annotation is str:
        if meta.get("number_ok") and isinstance(value, int | float) and not isinstance(value, bool):
            value = repr(value) if isinstance(value, float) else str(value)  # budget = 1000000
        if not isinstance(value, str):
            quoted = f' (quote it: {path.rsplit(".", 1)[-1]} = "{value}")' if isinstance(value, int | float) else ""
            raise RecipeError(f"{path}: expected a string; got {_describe(value)}{quoted}")
    elif origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list; got {_describe(value)}")
        value = [_coerce(f"{path}[{i}]", v, item_type, {}) for i, v in enumerate(value)]
        if "length" in meta and len(value) not in meta["length"]:
            lengths = " or ".join(str(n) for n in meta["length"])
            raise RecipeError(f"{path}: expected a list of {lengths} items; got {len(value)}")
    elif origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a table; got {_describe(value)}")
        args = typing.get_args(annotation)
        if args and args[1] in _TYPE_WORDS:
            value = {str(k): _coerce(f"{path}.{k}", v, args[1], meta) for k, v in value.items()}
    elif origin in (typing.Union, types.UnionType):
        # A scalar or a table of scalars (``targets = 0.25`` or ``targets = { depth = 0.5 }``);
        # with "options", a name or a named table (``weighting = { name = "gradnorm", alpha = 1.5 }``).
        scalar, table = typing.get_args(annotation)
        if typing.get_origin(table) is list:  # one value or a list of them (export.format)
            items = value if isinstance(value, list) else [value]
            if not items:
                raise RecipeError(f"{path}: expected at least one value")
            return [_coerce(f"{path}[{i}]" if isinstance(value, list) else path, v, scalar, meta)
                    for i, v in enumerate(items)]
        if isinstance(value, dict) and "options" in meta:
            return _coerce_named(path, value, meta)
        if isinstance(value, dict):
            return _coerce(path, value, table, meta)
        shape = "{ name = ..., option = value }" if "options" in meta else "{ task = value }"
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise RecipeError(f"{path}: expected {_TYPE_WORDS[scalar]} or a table {shape}; got {_describe(value)}")
        if isinstance(value, str) and scalar is not str:
            raise RecipeError(f"{path}: expected {_TYPE_WORDS[scalar]} or a table {shape}; got {_describe(value)}")
        return _coerce(path, value, scalar, meta)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported recipe field type {annotation!r} at {path}")
    if "choices" in meta and value not in meta["choices"]:
        choices = ", ".join(repr(c) for c in meta["choices"] if c != "") or "(none)"
        raise RecipeError(
            f"{path}: expected one of {choices}; got {_describe(value)}"
            f"{did_you_mean(value, meta['choices'])}"
        )
    if "min" in meta and isinstance(value, int | float) and value < meta["min"]:
        raise RecipeError(f"{path}: expected a value >= {meta['min']}; got {_describe(value)}")
    if "max" in meta and isinstance(value, int | float) and value > meta["max"]:
        raise RecipeError(f"{path}: expected a value <= {meta['max']}; got {_describe(value)}")
    return value


def _coerce_named(path: str, value: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A table ``{ name = choice, option = value, ... }``: ``name`` one of ``meta["choices"]``,
    each other key one of ``meta["options"][name]`` (a dict of option -> spec with a "type")."""
    if "name" not in value:
        raise RecipeError(f"{path}.name: missing; expected one of {', '.join(repr(c) for c in meta['choices'])}")
    name = _coerce(f"{path}.name", value["name"], str, {"choices": meta["choices"]})
    specs = meta["options"].get(name, {})
    out = {"name": name}
    for key, v in value.items():
        if key == "name":
            continue
        if key not in specs:
            raise RecipeError(f"{path}.{key}: unknown option of {name!r}{did_you_mean(key, specs)}; "
                              f"valid options: {', '.join(specs) or '(none)'}")
        out[key] = _coerce(f"{path}.{key}", v, specs[key]["type"], specs[key])
    return out


def _build(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass ``cls`` from the table ``raw``; unknown keys are errors."""
    where = path or "recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a table; got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise RecipeError(
                f"{_join(path, key)}: unknown key{did_you_mean(key, fields)}; "
                f"valid keys here: {', '.join(fields) or '(none)'}"
            )
    kwargs = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        annotation = hints[name]
        if name not in raw:
            if f.metadata.get("required"):
                raise RecipeError(f"{key_path}: missing; expected {_TYPE_WORDS.get(annotation, 'a value')}")
            continue
        value = raw[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, key_path)
        elif typing.get_origin(annotation) is list and dataclasses.is_dataclass(typing.get_args(annotation)[0]):
            if not isinstance(value, list):
                raise RecipeError(f"{key_path}: expected a list of tables ([[{name}]]); got {_describe(value)}")
            item_cls = typing.get_args(annotation)[0]
            kwargs[name] = [_build(item_cls, item, f"{key_path}[{i}]") for i, item in enumerate(value)]
        else:
            kwargs[name] = _coerce(key_path, value, annotation, dict(f.metadata))
    return cls(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_recipe(recipe: Recipe) -> None:
    """Cross-field checks that a single field cannot express."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", recipe.name):
        raise RecipeError(
            f"name: expected letters, digits, '_', '-' or '.' (it names the run folder); got {recipe.name!r}"
        )
    seen: dict[str, int] = {}
    for i, task in enumerate(recipe.tasks):
        if not task.name:
            raise RecipeError(f"tasks[{i}].name: expected a non-empty string; got ''")
        if task.name in seen:
            raise RecipeError(f"tasks[{i}].name: duplicate task name '{task.name}' (also tasks[{seen[task.name]}])")
        seen[task.name] = i
    tune = recipe.tune
    if tune.sparsity_min > tune.sparsity_max:
        raise RecipeError(f"tune.sparsity_min: expected <= tune.sparsity_max ({tune.sparsity_max}); got {tune.sparsity_min}")
    if tune.sparsity_min <= 0:
        raise RecipeError(f"tune.sparsity_min: expected > 0 (λ_s is searched log-uniformly); got {tune.sparsity_min}")
    if tune.target_min > tune.target_max:
        raise RecipeError(f"tune.target_min: expected <= tune.target_max ({tune.target_max}); got {tune.target_min}")
    outside = [v for v in tune.grid if not tune.sparsity_min <= v <= tune.sparsity_max]
    if outside:
        raise RecipeError(f"tune.grid: {', '.join(f'{v:g}' for v in outside)} outside [tune.sparsity_min, "
                          f"tune.sparsity_max] = [{tune.sparsity_min:g}, {tune.sparsity_max:g}]; widen the range or drop them")
    if recipe.search.budget:
        from branchnas.budget import parse_budget
        from branchnas.errors import BudgetError

        try:
            parse_budget(recipe.search.budget, metric=recipe.search.metric)
        except BudgetError as err:
            raise RecipeError(f"search.{err}") from None


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """Validate a plain dict (the TOML layers merged) into a :class:`Recipe`."""
    recipe = _build(Recipe, raw, "")
    _check_recipe(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (the inverse of :func:`recipe_from_dict`)."""
    return dataclasses.asdict(recipe)


# --------------------------------------------------------------------------- layering


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge tables key by key; lists (such as ``tasks``) are replaced whole."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_value(text: str) -> Any:
    """A ``--set`` value is read as a TOML value; anything that is not one is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_KEY_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")


def apply_override(raw: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``section.key=value`` (or ``tasks[0].weight=2``) to the raw recipe."""
    if "=" not in assignment:
        raise RecipeError(f"--set: expected section.key=value; got {assignment!r}")
    key_path, text = assignment.split("=", 1)
    key_path = key_path.strip()
    parts = key_path.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        match = _KEY_PART.match(part)
        if not match:
            raise RecipeError(f"--set: malformed key {key_path!r}; expected section.key or tasks[0].key")
        name, index = match.group(1), match.group(2)
        last = depth == len(parts) - 1
        if index is not None:
            items = node.get(name)
            if not isinstance(items, list) or int(index) >= len(items):
                count = len(items) if isinstance(items, list) else 0
                raise RecipeError(f"--set {key_path}: '{name}' has {count} entries; index {index} is out of range")
            if last:
                items[int(index)] = _parse_value(text)
            else:
                node = items[int(index)]
        elif last:
            node[name] = _parse_value(text)
        else:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
    return raw


def default_recipe_path() -> Path | None:
    """``./branchnas.toml`` when it exists, else ``None`` (the built-in default)."""
    path = Path(DEFAULT_RECIPE_FILE)
    return path if path.is_file() else None


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML recipe file, turning I/O and syntax errors into :class:`RecipeError`."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file {str(path)!r} does not exist; pass a path to a .toml recipe (see recipes/)")
    if path.is_dir():
        raise RecipeError(f"recipe {str(path)!r} is a folder; pass a .toml recipe file")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the recipe as UTF-8") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot be read ({err.strerror})") from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe: built-in defaults, then ``path``, then ``overrides``.

    Args:
        path: a TOML recipe; ``None`` uses ``./branchnas.toml`` if present, else the
            built-in default recipe.
        overrides: ``section.key=value`` assignments, applied last.

    Raises:
        RecipeError: the file is missing or invalid, or a key or value is wrong.
    """
    raw = recipe_to_dict(Recipe())
    if path is None:
        path = default_recipe_path()
    if path is not None:
        from_file = read_recipe_file(path)
        if "tasks" in from_file:
            raw["tasks"] = []
        raw = _merge(raw, from_file)
    for assignment in overrides:
        raw = apply_override(raw, assignment)
    return recipe_from_dict(raw)


# --------------------------------------------------------------------------- writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def recipe_to_toml(recipe: Recipe) -> str:
    """Write the resolved recipe as TOML (it reads back to an equal recipe, a storage password masked)."""
    from branchnas.secrets import mask_url

    data = recipe_to_dict(recipe)
    data["tune"]["storage"] = mask_url(data["tune"]["storage"])  # a password never reaches the saved recipe
    lines = []
    for key, value in data.items():
        if not isinstance(value, dict | list) or (isinstance(value, list) and not value):
            if key != "tasks":
                lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            for k, v in value.items():
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for task in data["tasks"]:
        lines.append("\n[[tasks]]")
        for k, v in task.items():
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _doc_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) of a section's fields; a nested table's keys as ``table.key``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for sub in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[sub.name]):
            rows += _doc_rows(hints[sub.name], f"{prefix}{sub.name}.")
            continue
        default = sub.default if sub.default is not dataclasses.MISSING else sub.default_factory()
        doc = sub.metadata.get("doc", "")
        if "choices" in sub.metadata:
            doc = (doc + "; " if doc else "") + "one of " + ", ".join(c for c in sub.metadata["choices"] if c)
        rows.append((prefix + sub.name, _toml_value(default), doc))
    return rows


def section_docs() -> dict[str, list[tuple[str, str, str]]]:
    """(key, default, doc) per section, for the recipe reference in docs/."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    hints = typing.get_type_hints(Recipe)
    top = []
    for f in dataclasses.fields(Recipe):
        ann = hints[f.name]
        if dataclasses.is_dataclass(ann):
            out[f.name] = _doc_rows(ann)
        elif f.name == "tasks":
            rows = []
            for sub in dataclasses.fields(TaskConfig):
                doc = sub.metadata.get("doc", "")
                if "choices" in sub.metadata:
                    doc = (doc + "; " if doc else "") + "one of " + ", ".join(c for c in sub.metadata["choices"] if c)
                rows.append((sub.name, _toml_value(sub.default), doc))
            out["[tasks]"] = rows
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            top.append((f.name, _toml_value(default), f.metadata.get("doc", "")))
    return {"(top level)": top, **out}

