"""THE cost model: parameters and FLOPs of the stem, each block and each head, by fvcore.

A third metric, ``latency`` (seconds per image at a batch size and thread count), is carried
alongside when a latency table is attached (:meth:`BlockCosts.with_latency`; the tables are
measured by :mod:`branchnas.latency`). It follows the same size formula.

Every number of parameters or FLOPs that branchnas reports or budgets comes from here,
measured with fvcore on the real modules:

* parameters: ``fvcore.nn.parameter_count``, which counts a tensor shared by several
  submodules once;
* FLOPs: ``fvcore.nn.FlopCountAnalysis`` on a batch of one image, in eval mode (batch norm
  as at inference). **fvcore counts one multiply-add as one flop**, so its numbers are
  about half of "2 x MACs" counts. Convolutions, linear layers, matrix products, batch norm
  (1 or 2 per element), adaptive average pooling (1 per input element) and bilinear
  upsampling (4 per output element) are counted; element-wise ops such as ReLU/ReLU6
  (``aten::hardtanh``), residual additions (``aten::add``) and max-pooling are not.
  Those skipped operators are logged at DEBUG level instead of fvcore's warnings.

The size of a tree whose partition at branch point d has ``n_d`` groups is (paper Sec. 3.2)::

    size = stem + sum_d n_d * block_d + sum_t head_t

The tree search uses the same :class:`BlockCosts`: :meth:`BlockCosts.coerce` reads block
costs from a ``BlockCosts``, a mapping with its fields or a plain list of block sizes, and
:meth:`BlockCosts.sizes` gives the sizes of many trees at once in float64. torch is imported
only by the functions that measure modules, so the search library runs without it.

Example:
    >>> costs = block_costs(backbone, heads, (32, 32))
    >>> costs.size([1, 2, 3], "params")        # D = 3: all shared, then 2, then 3 groups
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from branchnas.budget import METRICS
from branchnas.errors import UserError, unknown_choice

if TYPE_CHECKING:
    from torch import Tensor, nn

    from branchnas.backbones import Backbone

__all__ = ["ALL_HEADS", "BlockCosts", "as_count", "block_costs", "count_params", "count_flops",
           "task_pass_flops"]

#: The head key of a :meth:`BlockCosts.coerce` result whose heads were given as one total.
ALL_HEADS = "*"

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode, restoring every submodule's own flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _fvcore() -> Any:
    """Import ``fvcore.nn`` (lazily: it is slow), hiding the one warning its import raises.

    fvcore scripts its focal loss at import time, which torch now answers with "torch.jit.script
    is deprecated"; that says nothing about branchnas, so exactly that warning is dropped.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
        import fvcore.nn

    return fvcore.nn


def count_params(module: nn.Module) -> int:
    """Parameters of ``module`` by fvcore; a parameter shared by submodules counts once."""
    return int(_fvcore().parameter_count(module)[""])


def count_flops(module: nn.Module, inputs: Tensor | tuple[Any, ...]) -> int:
    """FLOPs of one forward pass of ``module`` on ``inputs``, by fvcore.

    fvcore counts one multiply-add as one flop. The module runs in eval mode (restored
    afterwards) and without gradients, so batch-norm statistics are not touched. Operators
    fvcore has no formula for (ReLU, additions, max-pooling, ...) count as zero; they are
    logged at DEBUG level rather than warned about.

    Args:
        module: Any module that ``torch.jit.trace`` can trace.
        inputs: One tensor or a tuple of forward arguments. FLOPs scale with the batch
            size, so pass a batch of one for per-image costs.
    """
    import torch

    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    with _eval_mode(module), torch.no_grad():
        analysis = _fvcore().FlopCountAnalysis(module, inputs)
        # Targeted: only fvcore's per-analysis warnings about skipped operators and modules
        # that did not run (an nn.Identity stem) are silenced; other warnings still show.
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = int(analysis.total())
        skipped = analysis.unsupported_ops()
    if skipped:
        logger.debug("fvcore counted 0 flops for %s in %s", dict(skipped), type(module).__name__)
    return total


def task_pass_flops(net: nn.Module, x: Tensor) -> dict[str, int]:
    """fvcore FLOPs of each task's pass alone (``net(x, [task])``: the stem, the nodes on the task's
    path and its head) on the input ``x`` (a batch of one for per-image costs).

    A branched network computes every task in one pass, sharing what the tasks share; this is
    what one task costs on its own (the attentive variant runs one such pass per task).
    """
    from branchnas.models.branched import TaskPass

    return {task: count_flops(TaskPass(net, task), x) for task in net.task_names}


def as_count(value: float) -> int | float:
    """An int when the value is integral (sizes are counts), else the float."""
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**63 else value


@dataclass(frozen=True)
class BlockCosts:
    """Parameters and FLOPs (fvcore: one multiply-add = one flop) of a backbone's parts.

    FLOPs are per image at the image size given to :func:`block_costs`. Measured costs are
    ints; :meth:`coerce` keeps a non-integral given cost as a float.

    Attributes:
        stem_params: Parameters of the stem.
        stem_flops: FLOPs of the stem.
        block_params: Parameters of each block (length D).
        block_flops: FLOPs of each block (length D).
        head_params: Parameters of each task's head (or, from :meth:`coerce`, their total
            under the key :data:`ALL_HEADS`).
        head_flops: FLOPs of each task's head (likewise).
        stem_latency: Seconds per image of the stem (0 without a latency table).
        block_latency: Seconds per image of each block, or ``None`` (no latency table).
        head_latency: Seconds per image of each task's head (or their total under
            :data:`ALL_HEADS`), or ``None``.
    """

    stem_params: int | float
    stem_flops: int | float
    block_params: tuple[int | float, ...]
    block_flops: tuple[int | float, ...]
    head_params: dict[str, int | float]
    head_flops: dict[str, int | float]
    stem_latency: float = 0.0
    block_latency: tuple[float, ...] | None = None
    head_latency: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if len(self.block_params) != len(self.block_flops):
            raise ValueError(f"{len(self.block_params)} block params but {len(self.block_flops)} block flops")
        if set(self.head_params) != set(self.head_flops):
            raise ValueError(f"heads {sorted(self.head_params)} have params but {sorted(self.head_flops)} have flops")
        if (self.block_latency is None) != (self.head_latency is None):
            raise ValueError("block_latency and head_latency must be given together")
        if self.block_latency is not None and len(self.block_latency) != len(self.block_params):
            raise ValueError(f"{len(self.block_params)} block params but {len(self.block_latency)} block latencies")

    @property
    def has_latency(self) -> bool:
        """Whether a latency table is attached (``size(..., "latency")`` works)."""
        return self.block_latency is not None

    def with_latency(self, table: Mapping[str, Any]) -> BlockCosts:
        """These costs with the latencies of ``table`` attached (seconds per image).

        Args:
            table: ``{"stem": s, "blocks": [s, ...], "heads": {task: s}}`` (a
                :mod:`branchnas.latency` table); only this cost model's heads are kept.

        Raises:
            UserError: a wrong number of blocks, a missing head, a negative or non-finite time.
        """
        blocks = _vector("block latency", table.get("blocks", ()))
        if len(blocks) != self.num_blocks:
            raise UserError(f"latency table: {len(blocks)} blocks but the backbone has {self.num_blocks} branch points")
        heads: Any = table.get("heads", {})
        if set(self.head_params) == {ALL_HEADS} and isinstance(heads, Mapping):
            heads = sum(float(v) for v in heads.values())  # heads held as a total: so is their latency
        tasks = [t for t in self.head_params if t != ALL_HEADS]
        return dataclasses.replace(
            self, stem_latency=_scalar("stem latency", table.get("stem", 0) or 0), block_latency=blocks,
            head_latency=_heads("head latency", heads, tasks if isinstance(heads, Mapping) else None),
        )

    @classmethod
    def coerce(cls, costs: Any, num_points: int | None = None, tasks: Sequence[str] | None = None) -> BlockCosts:
        """Read and check block costs from a ``BlockCosts``, a mapping, or a plain array.

        Args:
            costs: a :class:`BlockCosts`, or any object or mapping with ``stem_params``,
                ``stem_flops``, ``block_params`` (D,), ``block_flops`` (D,), ``head_params``
                and ``head_flops`` (per-task dicts or totals; missing fields count 0; no
                ``block_flops`` means the same as ``block_params``); or a plain length-D
                sequence of per-block sizes, used for both params and FLOPs with no stem
                or heads.
            num_points: the expected D (checked when given).
            tasks: the task names; per-task heads are restricted to these (all entries
                when ``None``).

        Returns:
            A new :class:`BlockCosts` whose head costs sum to those of ``tasks``. Heads given
            as totals (or as dicts over different tasks for params and FLOPs) are held as
            one total each, under the key :data:`ALL_HEADS`.

        Raises:
            UserError: a field has the wrong length, is negative or not finite, or a task
                has no head cost.

        Example:
            >>> BlockCosts.coerce([5, 6]).size([2, 1], "flops")
            16
        """
        if isinstance(costs, Mapping) or hasattr(costs, "block_params"):
            get = costs.get if isinstance(costs, Mapping) else (lambda k, default=None: getattr(costs, k, default))
            if get("block_params") is None:
                raise UserError("block costs: expected a 'block_params' field (one value per branch point)")
            bp = _vector("block_params", get("block_params"))
            bf = _vector("block_flops", get("block_flops")) if get("block_flops") is not None else bp
            stem_params = _scalar("stem_params", get("stem_params", 0) or 0)
            stem_flops = _scalar("stem_flops", get("stem_flops", 0) or 0)
            head_params = _heads("head_params", get("head_params", 0) or 0, tasks)
            head_flops = _heads("head_flops", get("head_flops", 0) or 0, tasks)
            if set(head_params) != set(head_flops):
                # Sizes only need the sums; keeping them as totals keeps the heads consistent.
                head_params, head_flops = _total_head(head_params), _total_head(head_flops)
            latency = None
            if get("block_latency") is not None:
                bl = _vector("block_latency", get("block_latency"))
                if len(bl) != len(bp):
                    raise UserError(f"block costs: block_params has {len(bp)} entries but block_latency has {len(bl)}")
                hl = _heads("head_latency", get("head_latency", 0) or 0, tasks)
                latency = (_scalar("stem_latency", get("stem_latency", 0) or 0), bl, hl)
        else:
            bp = bf = _vector("block costs", costs)
            stem_params = stem_flops = 0.0
            head_params, head_flops = {}, {}
            latency = None
        if len(bp) != len(bf):
            raise UserError(f"block costs: block_params has {len(bp)} entries but block_flops has {len(bf)}")
        if num_points is not None and len(bp) != num_points:
            raise UserError(
                f"block costs: expected one cost per branch point ({num_points}); got {len(bp)}; "
                "the affinity and the backbone must use the same branch points"
            )
        return cls(
            as_count(stem_params), as_count(stem_flops),
            tuple(as_count(v) for v in bp), tuple(as_count(v) for v in bf),
            head_params, head_flops,
            *((latency[0], latency[1], dict(latency[2])) if latency is not None else ()),
        )

    @property
    def num_blocks(self) -> int:
        """D, the number of branch points."""
        return len(self.block_params)

    def _parts(self, metric: str) -> tuple[int | float, tuple[int | float, ...], dict[str, int | float]]:
        if metric == "params":
            return self.stem_params, self.block_params, self.head_params
        if metric == "flops":
            return self.stem_flops, self.block_flops, self.head_flops
        if metric == "latency":
            if self.block_latency is None or self.head_latency is None:
                raise UserError("cost metric 'latency': these block costs have no latency table; measure one "
                                "(`branchnas profile`) or set search.latency_table")
            return self.stem_latency, self.block_latency, self.head_latency
        raise UserError(unknown_choice("cost metric", metric, METRICS))

    def size(self, partition_counts: Sequence[int], metric: str = "params") -> int | float:
        """Size of a tree: ``stem + sum_d n_d * block_d + sum_t head_t``.

        Args:
            partition_counts: ``n_d``, the number of task groups at each branch point
                (length D; 1 = all tasks share the block, the number of tasks = none do).
            metric: ``params``, ``flops`` or ``latency`` (seconds per image; needs a table).

        Raises:
            UserError: unknown metric, or ``latency`` without a latency table.
            ValueError: ``partition_counts`` has the wrong length or a count below 1.

        Example:
            >>> costs.size([1] * costs.num_blocks)          # everything shared
        """
        stem, blocks, heads = self._parts(metric)
        counts = list(partition_counts)
        if len(counts) != len(blocks):
            raise ValueError(f"expected {len(blocks)} partition counts (one per branch point); got {len(counts)}")
        if any(int(n) < 1 for n in counts):
            raise ValueError(f"every partition has at least one group; got counts {counts}")
        return stem + sum(int(n) * b for n, b in zip(counts, blocks, strict=True)) + sum(heads.values())

    def affine(self, metric: str) -> tuple[float, np.ndarray]:
        """The size as an affine function of the group counts, in float64.

        Returns:
            ``(stem + sum of the heads, block sizes (D,))``: a tree with counts ``n`` has size
            ``fixed + n @ blocks``. :meth:`sizes` and the search engines use these same
            numbers, so that sizes computed in different places compare exactly.

        Raises:
            UserError: unknown metric.
        """
        stem, blocks, heads = self._parts(metric)
        return float(stem) + sum(float(v) for v in heads.values()), np.asarray(blocks, dtype=np.float64)

    def sizes(self, counts: Any) -> tuple[np.ndarray, np.ndarray]:
        """Params and FLOPs (float64) of many trees at once.

        Args:
            counts: a ``(C, D)`` array; row ``c`` holds the group counts of one tree. Not
                checked (the search calls this on its own tables).

        Returns:
            ``(params, flops)``, each of shape ``(C,)``.
        """
        counts = np.asarray(counts, dtype=np.float64)
        fixed_params, block_params = self.affine("params")
        fixed_flops, block_flops = self.affine("flops")
        return fixed_params + counts @ block_params, fixed_flops + counts @ block_flops

    def metric_sizes(self, counts: Any, metric: str) -> np.ndarray:
        """Sizes (float64) of many trees in one metric: ``fixed + counts @ blocks``.

        For ``params`` and ``flops`` these are exactly the arrays of :meth:`sizes`.
        """
        if metric == "params":
            return self.sizes(counts)[0]
        if metric == "flops":
            return self.sizes(counts)[1]
        fixed, blocks = self.affine(metric)
        return fixed + np.asarray(counts, dtype=np.float64) @ blocks

    def single_task(self, task: str, metric: str = "params") -> int | float:
        """Size of the single-task model of ``task``: stem, every block once and its head."""
        stem, blocks, heads = self._parts(metric)
        if task not in heads:
            raise UserError(unknown_choice("task", task, heads))
        return stem + sum(blocks) + heads[task]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back (latency fields only when attached)."""
        data: dict[str, Any] = {
            "stem_params": self.stem_params,
            "stem_flops": self.stem_flops,
            "block_params": list(self.block_params),
            "block_flops": list(self.block_flops),
            "head_params": dict(self.head_params),
            "head_flops": dict(self.head_flops),
        }
        if self.block_latency is not None and self.head_latency is not None:
            data.update(stem_latency=self.stem_latency, block_latency=list(self.block_latency),
                        head_latency=dict(self.head_latency))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockCosts:
        """The inverse of :meth:`to_dict`."""
        return cls(
            int(data["stem_params"]),
            int(data["stem_flops"]),
            tuple(int(v) for v in data["block_params"]),
            tuple(int(v) for v in data["block_flops"]),
            {str(k): int(v) for k, v in data["head_params"].items()},
            {str(k): int(v) for k, v in data["head_flops"].items()},
            *((float(data.get("stem_latency", 0.0)), tuple(float(v) for v in data["block_latency"]),
               {str(k): float(v) for k, v in data["head_latency"].items()}) if "block_latency" in data else ()),
        )


def _vector(name: str, value: Any) -> tuple[float, ...]:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise UserError(f"block costs: {name} must be a list with one number per branch point; got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise UserError(f"block costs: {name} must be finite and non-negative; got {arr.tolist()}")
    return tuple(float(x) for x in arr)


def _scalar(name: str, value: Any) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise UserError(f"block costs: {name} must be finite and non-negative; got {value}")
    return value


def _heads(name: str, value: Any, tasks: Sequence[str] | None) -> dict[str, int | float]:
    """Per-task head costs (only ``tasks`` when given), or a total; checked on their sum."""
    if isinstance(value, Mapping) and set(value) == {ALL_HEADS}:
        value = value[ALL_HEADS]  # a total held by an earlier coerce: coercing again keeps it
    if isinstance(value, Mapping):
        if tasks is not None:
            missing = [t for t in tasks if t not in value]
            if missing:
                raise UserError(f"block costs: {name} has no entry for task {missing[0]!r}; it has: {', '.join(map(str, value))}")
            value = {t: value[t] for t in tasks}
        _scalar(name, sum(float(v) for v in value.values()))
        return {k: as_count(float(v)) for k, v in value.items()}
    total = _scalar(name, value)
    return {ALL_HEADS: as_count(total)} if total else {}


def _total_head(heads: Mapping[str, int | float]) -> dict[str, int | float]:
    return {ALL_HEADS: as_count(sum(float(v) for v in heads.values()))}


def block_costs(
    backbone: Backbone,
    heads: Mapping[str, nn.Module],
    image_size: int | Sequence[int],
    in_channels: int | None = None,
) -> BlockCosts:
    """Measure the stem, each block and each head with fvcore at their real input shapes.

    The stem and blocks run once, in eval mode and without gradients, on one zero image;
    each part is counted on the tensor that actually reaches it, and every head on the last
    block's output.

    Args:
        backbone: A :class:`branchnas.backbones.Backbone`.
        heads: Task name -> head module (each takes the last block's features).
        image_size: ``(height, width)`` of the input images.
        in_channels: Input channels; defaults to ``backbone.in_channels``.

    Returns:
        The :class:`BlockCosts` (FLOPs per image; fvcore counts a multiply-add as one flop).
    """
    import torch

    from branchnas.backbones._base import as_image_size

    size = as_image_size(image_size)
    channels = backbone.in_channels if in_channels is None else in_channels
    first = next(backbone.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    x = torch.zeros(1, channels, *size, device=device)
    with _eval_mode(backbone), torch.no_grad():
        stem_params, stem_flops = count_params(backbone.stem), count_flops(backbone.stem, x)
        x = backbone.stem(x)
        block_params, block_flops = [], []
        for block in backbone.blocks:
            block_params.append(count_params(block))
            block_flops.append(count_flops(block, x))
            x = block(x)
    head_params = {task: count_params(head) for task, head in heads.items()}
    head_flops = {task: count_flops(head, x) for task, head in heads.items()}
    return BlockCosts(
        stem_params, stem_flops, tuple(block_params), tuple(block_flops), head_params, head_flops
    )


def recipe_costs(recipe: Any) -> tuple[BlockCosts, list[str], list[str]]:
    """The cost model of a recipe's network: its backbone and one head per task.

    Builds the untrained modules (no training, no data beyond the split metadata) and
    measures them with :func:`block_costs` at the recipe's input size.

    Returns:
        ``(costs, task names, branch point names)``.
    """
    from branchnas.backbones import build_backbone
    from branchnas.data import load_splits
    from branchnas.heads import build_head

    splits, tasks = load_splits(recipe)
    train = splits["train"]
    backbone = build_backbone(recipe.backbone, train.in_channels, train.image_size)
    heads = {t.name: build_head(t, backbone.out_channels, backbone.reduction, train.image_size) for t in tasks}
    costs = block_costs(backbone, heads, train.image_size, train.in_channels)
    return costs, [t.name for t in tasks], [info.name for info in backbone.block_info]
