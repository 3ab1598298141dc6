"""Stage 5, ``tune`` (optional): Optuna over the gate sparsity and hinge targets.

Registered so that the pipeline, ``--until`` and the docs know it. It will tune the gated
fine-tuning variant (``finetune.gated``); until it is built its check refuses it before any
work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from branchnas.errors import NotAvailableYet
from branchnas.stages._base import Stage, StageContext, register_stage

__all__ = ["TuneStage"]


@register_stage
class TuneStage(Stage):
    name = "tune"
    summary = "Stage 5: tune gate sparsity and hinge targets with Optuna (not available yet)."
    requires = ("finetune",)
    optional = True

    def check(self, recipe: Any, options: Mapping[str, Any]) -> None:
        raise NotAvailableYet("stage 'tune' is not available yet; set finetune.gated.sparsity and .targets by hand "
                              "(docs/variants.md); nothing was run")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        raise NotAvailableYet("stage 'tune' is not available yet")
