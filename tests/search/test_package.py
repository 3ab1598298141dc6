"""The package surface: every listed name resolves, and the search library needs no torch."""

from __future__ import annotations

import subprocess
import sys

import branchnas.search


def test_every_name_in_all_is_importable_from_the_package():
    missing = [name for name in branchnas.search.__all__ if not hasattr(branchnas.search, name)]
    assert not missing
    assert {"search", "format_summary", "_candidates"} <= set(branchnas.search.__all__)


def test_importing_the_search_library_does_not_import_torch_or_matplotlib():
    code = (
        "import sys, branchnas.search, branchnas.cost; "
        "print(sorted(m for m in ('torch', 'matplotlib', 'fvcore') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
