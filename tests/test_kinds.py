"""THE task-kind table: every kind list in branchnas is derived from branchnas.kinds."""

from __future__ import annotations

import subprocess
import sys

from branchnas import heads, kinds, recipe, tasks
from branchnas.data import _base, transforms


def test_every_kind_list_is_the_one_table():
    assert recipe.TASK_KINDS is kinds.TASK_KINDS and tasks.KIND_INFO is kinds.KIND_INFO
    assert _base.DENSE_KINDS is kinds.DENSE_KINDS and _base.IGNORE_LABEL == tasks.IGNORE_INDEX == 255
    assert heads.GLOBAL_KINDS is kinds.GLOBAL_KINDS
    assert transforms.NEAREST_KINDS is kinds.NEAREST_KINDS
    # dense and global split the kinds; label maps are dense
    assert set(kinds.DENSE_KINDS) | set(kinds.GLOBAL_KINDS) == set(kinds.TASK_KINDS)
    assert not set(kinds.DENSE_KINDS) & set(kinds.GLOBAL_KINDS)
    assert kinds.NEAREST_KINDS <= kinds.DENSE_KINDS
    assert kinds.DENSE_KINDS == {"segmentation", "depth", "normals", "edges"}


def test_the_table_imports_no_torch():
    code = "import sys, branchnas.kinds, branchnas.recipe; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
