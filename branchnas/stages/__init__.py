"""The pipeline stages, registered by name in dependency order (see :mod:`branchnas.stages._base`).

Importing this package registers the built-in stages; it imports neither torch nor numpy.

Example:
    >>> from branchnas.stages import stage_names
    >>> stage_names()
    ['pretrain', 'affinity', 'search', 'finetune', 'compare', 'tune', 'export']
"""

from __future__ import annotations

import importlib

from branchnas.stages._base import (
    REGISTRY,
    Artifact,
    Stage,
    StageContext,
    closure,
    get_stage,
    register_stage,
    stage_names,
)

#: The built-in stage modules; each registers one stage. Registration order is dependency order.
BUILTIN = ("pretrain", "affinity", "search", "finetune", "compare", "tune", "export")
for _name in BUILTIN:
    importlib.import_module(f"branchnas.stages.{_name}")

__all__ = ["BUILTIN", "REGISTRY", "Artifact", "Stage", "StageContext", "closure", "get_stage", "register_stage", "stage_names"]
