"""Several independent single-task models trained side by side on the same batches.

``Trainer({"a": model_a, "b": model_b}, ...)`` trains independent single-task models on the
same batches: one data load and one augmentation per batch serve every model. Each model
keeps everything that could couple it to the others to itself: its optimizer, schedule, RNG
stream (dropout), gradient-norm clipping, best epoch and early stopping (a model that stopped
is frozen with its best weights while the others go on). Training them together is therefore
the same computation as training each alone. Two ways to run them (``concurrent``):

* ``"shared"``: the models run one after another on each shared batch; bit-identical to
  training each model alone.
* ``"stacked"``: the identical encoders run as one batched computation
  (``torch.func.stack_module_state`` + ``vmap``, which becomes grouped convolutions); the
  heads, which differ per task, run per model. The same maths as ``"shared"``; the floats
  can differ in the last bits because a grouped kernel sums in another order.

``"auto"`` picks ``"stacked"`` on CUDA, where small models leave the GPU idle and one
batched kernel replaces N small ones, and ``"shared"`` on CPU. There one model's step
already keeps the cores busy (ResNet-20, 32x32, batch 64: ~100 ms per model and step against
<1 ms to load and flip the batch), and oneDNN's grouped convolutions, which ``vmap`` lowers
to, measured 1.2-1.4x slower than N separate ones (``bench/pretrain.py``). With
``precision = "bf16"`` on CPU, ``"shared"`` is the only way: CPU autocast leaves the vmapped
convolutions in fp32.

This module holds :class:`SingleTaskModel` (encoder + head, the shape that can be stacked),
the check whether a group of models can be stacked, and the stacked encoders themselves;
the trainer's per-step code for both ways lives in :mod:`branchnas.training.loop`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from branchnas.training.optim import _clip_coefficient, _make_optimizer

if TYPE_CHECKING:
    from branchnas.training.member import _Member

__all__ = ["SingleTaskModel", "CONCURRENT_MODES"]

#: How several models are trained together (see the module docstring).
CONCURRENT_MODES = ("auto", "shared", "stacked")


class SingleTaskModel(nn.Module):
    """A single-task network: an encoder (the backbone) and the task's head.

    Its forward is ``{task: head(backbone(images))}``; the trainer runs the encoders of
    several such models as one stacked computation when they are identical in structure.

    Args:
        backbone: The encoder (a :class:`branchnas.backbones.Backbone` or any module).
        head: The task head, fed with the backbone's output.
        task: The task's name (the key of the output).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, task: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.task = task

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return {self.task: self.head(self.backbone(images))}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters."""
        return list(self.backbone.parameters())


def _stackable(members: Sequence[_Member]) -> str:
    """Why ``members`` cannot run as one stacked computation ('' when they can)."""
    if len(members) < 2:
        return "fewer than two models"
    if not all(isinstance(m.model, SingleTaskModel) for m in members):
        return "not all models are SingleTaskModel (encoder + head)"
    first = members[0].model.backbone
    shapes = [(k, tuple(v.shape), v.dtype) for k, v in first.state_dict().items()]
    for m in members[1:]:
        other = m.model.backbone
        if type(other) is not type(first) or repr(other) != repr(first):
            return "the encoders differ in structure"
        if [(k, tuple(v.shape), v.dtype) for k, v in other.state_dict().items()] != shapes:
            return "the encoders differ in their tensors"
    for module in first.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return "the encoder has dropout (random per model)"
    if any(m.extra for m in members):
        return "a loss weighting has learnable parameters"
    return ""


class _Stack:
    """The encoders of several models as one batched (vmapped) computation, for one epoch.

    At the start of an epoch the models' encoder weights, BN buffers and optimizer state are
    stacked along a new leading dimension; one optimizer (the same kind and settings, all
    element-wise, so the same maths) steps the stacked tensors and every head. At the end of
    the epoch everything is copied back into each model, which stays the source of truth
    for checkpoints and evaluation.
    """

    def __init__(self, members: Sequence[_Member], cfg: Any) -> None:
        from torch.func import functional_call, stack_module_state, vmap

        self.members = list(members)
        backbones = [m.model.backbone for m in self.members]
        self.names = [name for name, p in backbones[0].named_parameters() if p.requires_grad]
        params, buffers = stack_module_state(backbones)
        self.params = {k: params[k] for k in self.names}
        self.frozen = {k: v for k, v in params.items() if k not in self.params}
        self.buffers = buffers
        base = copy.deepcopy(backbones[0]).to("meta")
        base.train()

        def encode(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(base, ({**p, **self.frozen}, b), (x,))

        # randomness="error": an encoder that draws random numbers would draw the same
        # numbers for every model here, unlike separate training; _stackable rules it out.
        self._forward = vmap(encode, in_dims=(0, 0, None), randomness="error")
        self.heads = [list(m.model.head.parameters()) for m in self.members]
        head_params = [p for ps in self.heads for p in ps if p.requires_grad]
        self.optimizer = _make_optimizer(cfg, list(self.params.values()) + head_params, [])
        self._load_optimizer_state()

    def forward(self, images: Tensor) -> Tensor:
        return self._forward(self.params, self.buffers, images)

    def _member_params(self, member: _Member) -> dict[str, Tensor]:
        return dict(member.model.backbone.named_parameters())

    def _load_optimizer_state(self) -> None:
        for name, stacked in self.params.items():
            states = [m.optimizer.state.get(self._member_params(m)[name]) for m in self.members]
            if not any(states):
                continue
            if not all(states):
                raise RuntimeError("stacked training: models are at different optimizer steps")
            merged = {}
            for key, value in states[0].items():
                if torch.is_tensor(value) and value.shape == stacked.shape[1:] and value.dim() > 0:
                    merged[key] = torch.stack([s[key] for s in states])
                elif torch.is_tensor(value):
                    merged[key] = value.clone()
                else:
                    merged[key] = value
            self.optimizer.state[stacked] = merged
        for member, params in zip(self.members, self.heads, strict=True):
            for p in params:
                if p in member.optimizer.state:
                    self.optimizer.state[p] = member.optimizer.state[p]

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the stacked weights, buffers and optimizer state back into each model."""
        for i, member in enumerate(self.members):
            own = self._member_params(member)
            for name, stacked in self.params.items():
                own[name].copy_(stacked[i])
                state = self.optimizer.state.get(stacked)
                if state:
                    member.optimizer.state[own[name]] = {
                        k: (v[i].clone() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(self.members)
                            and v.shape[1:] == own[name].shape else
                            v.clone() if torch.is_tensor(v) else v)
                        for k, v in state.items()
                    }
            own_buffers = dict(member.model.backbone.named_buffers())
            for name, stacked in self.buffers.items():
                own_buffers[name].copy_(stacked[i])
            for p in self.heads[i]:
                if p in self.optimizer.state:
                    member.optimizer.state[p] = self.optimizer.state[p]

    def grad_norms(self) -> Tensor:
        """Each model's gradient norm over its encoder slice and its head, shape (N,)."""
        squares = torch.zeros(len(self.members), device=next(iter(self.params.values())).device)
        for p in self.params.values():
            if p.grad is not None:
                squares = squares + p.grad.detach().float().flatten(1).square().sum(1)
        for i, params in enumerate(self.heads):
            for p in params:
                if p.grad is not None:
                    squares[i] = squares[i] + p.grad.detach().float().square().sum()
        return squares.sqrt()

    def clip(self, max_norm: float) -> None:
        coef = _clip_coefficient(self.grad_norms(), max_norm)
        for p in self.params.values():
            if p.grad is not None:
                p.grad.mul_(coef.view(-1, *([1] * (p.grad.dim() - 1))).to(p.grad.dtype))
        for i, params in enumerate(self.heads):
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef[i].to(p.grad.dtype))
