"""Helpers shared by the search tests: random affinities, block costs and a brute-force tree list.

Each helper is a plain function, handed to the tests by a fixture of the same name.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest


def _random_affinity(rng, n, d, ties=False):
    """A symmetric affinity tensor; with ``ties`` its values are multiples of 1/4 (many equal costs)."""
    a = rng.uniform(-1, 1, (d, n, n))
    a = (a + a.transpose(0, 2, 1)) / 2
    if ties:
        a = np.round(a * 4) / 4
    idx = np.arange(n)
    a[:, idx, idx] = 1.0
    return a


def _set_partitions(items):
    """Every partition of ``items`` (independent of the library's generator)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in _set_partitions(rest):
        yield [[first], *smaller]
        for i in range(len(smaller)):
            yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1:]]


def _refines(fine, coarse):
    return all(any(set(g) <= set(h) for h in coarse) for g in fine)


def _canon(partition):
    return tuple(sorted(tuple(sorted(g)) for g in partition))


def _brute_force_trees(n, d):
    parts = [_canon(p) for p in _set_partitions(list(range(n)))]
    return {
        chain for chain in itertools.product(parts, repeat=d)
        if all(_refines(chain[i + 1], chain[i]) for i in range(d - 1))
    }


def _block_costs_like(d, n, rng):
    return SimpleNamespace(
        stem_params=1000, stem_flops=50_000,
        block_params=rng.integers(100, 1000, d), block_flops=rng.integers(10_000, 100_000, d),
        head_params={f"task{i}": 10 + i for i in range(n)}, head_flops={f"task{i}": 100 for i in range(n)},
    )


@pytest.fixture
def random_affinity():
    """``random_affinity(rng, n, d, ties=False)``: a symmetric D x N x N affinity tensor."""
    return _random_affinity


@pytest.fixture
def block_costs_like():
    """``block_costs_like(d, n, rng)``: random block costs with a stem and per-task heads ``task<i>``."""
    return _block_costs_like


@pytest.fixture
def canon():
    """``canon(partition)``: the sorted tuple form of a partition."""
    return _canon


@pytest.fixture
def brute_force_trees():
    """``brute_force_trees(n, d)``: every tree, by filtering all tuples of partitions."""
    return _brute_force_trees


@pytest.fixture
def set_partitions():
    """``set_partitions(items)``: every partition of ``items``, independent of the library."""
    return _set_partitions
