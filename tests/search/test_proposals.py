"""Partition proposals by merging: the beam and the greedy merge (branchnas.search.proposals)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from branchnas.search.lattice import _canonical_rgs
from branchnas.search.proposals import _beam_merges, _greedy_merges


def _stack(rng, n, points=1, ties=False):
    dis = rng.uniform(0, 2, (points, n, n))
    if ties:
        dis = np.round(dis * 4) / 4
    dis = (dis + dis.transpose(0, 2, 1)) / 2
    dis[:, range(n), range(n)] = 0.0
    return dis


def _diameter_sum(row, stack):
    total = 0.0
    for g in np.unique(row):
        members = np.flatnonzero(row == g)
        total += sum(stack[w][np.ix_(members, members)].max() for w in range(len(stack)))
    return total


def test_beam_states_are_distinct_canonical_and_scored_by_the_window_objective():
    rng = np.random.default_rng(0)
    stack = _stack(rng, 9, points=2)
    rows, score = _beam_merges(stack, 4)
    assert (rows == _canonical_rgs(rows)).all()
    assert len(np.unique(rows, axis=0)) == len(rows)
    counts = rows.max(axis=1) + 1
    assert set(counts.tolist()) == set(range(1, 10))
    assert np.bincount(counts).max() <= 4  # at most ``width`` states per count
    assert np.allclose(score, [_diameter_sum(row, stack) for row in rows])


def test_a_wide_beam_finds_the_best_partition_of_every_count_where_greedy_linkage_fails(set_partitions):
    # Greedy merging (the beam of width 1) misses the best partition of some count on this
    # instance; a beam that keeps enough states finds the best of every count.
    rng = np.random.default_rng(11)
    stack = _stack(rng, 7)
    best = {}
    for groups in set_partitions(list(range(7))):
        row = np.empty(7, dtype=np.int64)
        for g, members in enumerate(groups):
            row[members] = g
        value = _diameter_sum(row, stack)
        best[len(groups)] = min(best.get(len(groups), np.inf), value)
    rows, score = _beam_merges(stack, 20)
    counts = rows.max(axis=1) + 1
    for k, value in best.items():
        assert score[counts == k].min() == pytest.approx(value, abs=1e-12)
    greedy = {int(r.max()) + 1: _diameter_sum(r, stack) for r in _beam_merges(stack, 1)[0]}
    assert any(greedy[k] > best[k] + 1e-9 for k in best)


def test_greedy_merges_reach_the_beam_of_width_one():
    rng = np.random.default_rng(3)
    for n, ties in itertools.product((2, 5, 9, 13), (False, True)):
        stack = _stack(rng, n, ties=ties)
        rows, _ = _beam_merges(stack, 1)
        for stop in range(1, n + 1):
            assert (_greedy_merges(stack[0], stop) == rows[n - stop]).all()


def test_greedy_merges_coarsen_a_start_and_refine_inside_a_parent():
    rng = np.random.default_rng(4)
    dis = _stack(rng, 10)[0]
    start = np.array([0, 1, 0, 2, 3, 1, 4, 5, 5, 6])
    coarse = _greedy_merges(dis, 3, start=start)
    assert coarse.max() + 1 == 3
    assert all(len(set(coarse[start == g])) == 1 for g in np.unique(start))  # start refines it
    parent = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    for stop in range(3, 11):
        fine = _greedy_merges(dis, stop, within=parent)
        assert fine.max() + 1 == stop
        assert all(len(set(parent[fine == g])) == 1 for g in np.unique(fine))  # it refines parent
    assert _greedy_merges(dis, 1, within=parent).max() + 1 == 3  # cannot merge across parents
