"""The plain variant: the tree's branched network, trained as it is."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from branchnas.variants import Variant, register_variant


@register_variant
class PlainVariant(Variant):
    name = "plain"
    summary = "the tree's branched network"

    def build(self, tree: Any, backbones: Mapping[str, nn.Module], heads: Mapping[str, nn.Module], *,
              init: str, tasks: Sequence[str], affinity: Any = None, seed: int = 0,
              align: Tensor | None = None) -> nn.Module:
        from branchnas.models import BranchedNet

        return BranchedNet.from_single_task(tree, backbones, heads, init=init, tasks=tasks,
                                            affinity=affinity, seed=seed, align=align)

    @classmethod
    def rebuild(cls, checkpoint: Mapping[str, Any], tree: Any, backbone: nn.Module,
                heads: Mapping[str, nn.Module], tasks: Sequence[str]) -> nn.Module:
        from branchnas.models import BranchedNet

        net = BranchedNet(tree, backbone, heads, tasks=tasks)
        net.load_state_dict(checkpoint["state_dict"])
        return net
