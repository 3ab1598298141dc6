"""Shared test settings: headless plotting and a private working directory per test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# OpenMP threads that spin while waiting slow torch several-fold when processes share the cores,
# as the two test workers do (the CLI, usually alone on the machine, spins briefly instead).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One process per core (pytest -n 2): each worker and its subprocesses use one thread,
    # so the workers don't fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test inside an empty temporary folder (so ./branchnas.toml and runs/ are its own)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def one_thread():
    """One CPU thread for the test: tiny tensors gain nothing from more, a busy shared runner loses
    much to spinning OpenMP waits, and the thread count changes the trained weights' rounding (so
    end-to-end figures stay the same across machines). Files that want it for every test set
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
