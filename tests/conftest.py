"""Shared test settings: headless plotting and a private working directory per test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# As the CLI does: OpenMP threads that spin while waiting slow torch several-fold on a busy CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test inside an empty temporary folder (so ./branchnas.toml and runs/ are its own)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
