"""The installed package holds every subpackage: setup.cfg lists packages explicitly."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_package_with_an_init():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = {p.strip() for p in config["options"]["packages"].split() if p.strip()}
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "branchnas").rglob("__init__.py")}
    found |= {"branchnas_cli"} if (ROOT / "cli" / "__init__.py").exists() else set()
    assert found <= listed, f"add to setup.cfg [options] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"setup.cfg lists packages that do not exist: {sorted(listed - found)}"
