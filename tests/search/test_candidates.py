"""The candidate DAG of the scalable search: proposals made to nest (branchnas.search.candidates)."""

from __future__ import annotations

import numpy as np

from branchnas.search import dissimilarity
from branchnas.search.candidates import _candidates, _nest, _point_cuts, _unique_rgs
from branchnas.search.cost import _row_level_costs
from branchnas.search.lattice import _canonical_rgs, _unique_rows


def test_unique_rgs_matches_unique_rows():
    rng = np.random.default_rng(0)
    rows = _canonical_rgs(rng.integers(0, 4, (500, 23))).astype(np.int64)
    rows = np.concatenate([rows, rows[:100]])
    got, inverse = _unique_rgs(rows)
    want, want_inverse = _unique_rows(rows)
    assert (got == want).all() and (inverse == want_inverse).all()


def test_nest_keeps_the_cheapest_intersections_with_every_pair_that_makes_them(random_affinity):
    rng = np.random.default_rng(1)
    n = 12
    dis = dissimilarity(random_affinity(rng, n, 2))
    cuts = _point_cuts(dis, 3, 2)
    prev = cuts[0]
    limit = 60
    cand, parent, child = _nest(prev, cuts[1], dis[1], limit)
    # Brute force: every intersection, canonical.
    every = _canonical_rgs((prev[:, None, :] * 2 * n + cuts[1][None, :, :]).reshape(-1, n)).astype(np.int64)
    index = {bytes(row.astype(np.int8)): i for i, row in enumerate(cand)}
    pairs = {(r // len(cuts[1]), index[key]) for r, row in enumerate(every)
             if (key := bytes(row.astype(np.int8))) in index}
    assert pairs == set(zip(parent.tolist(), child.tolist(), strict=True))
    # Per group count, the cheapest distinct intersections are kept (more only if a proposal
    # itself refines a parent).
    distinct, _ = _unique_rows(every)
    cost, counts = _row_level_costs(distinct, dis[1]), distinct.max(axis=1) + 1
    kept_cost, kept_counts = _row_level_costs(cand, dis[1]), cand.max(axis=1) + 1
    quota = limit // counts.max()
    for k in np.unique(counts):
        want = np.sort(cost[counts == k])[:quota]
        assert np.allclose(np.sort(kept_cost[kept_counts == k])[:len(want)], want)


def test_candidates_nest_and_respect_the_limit(random_affinity):
    rng = np.random.default_rng(2)
    n = 15
    dis = dissimilarity(random_affinity(rng, n, 3))
    levels, edges = _candidates(dis, 200)
    assert all(len(rows) <= 200 for rows in levels)
    for d, (indptr, kids) in enumerate(edges):
        parent = np.repeat(np.arange(len(levels[d])), np.diff(indptr))
        coarse, fine = levels[d][parent].astype(np.int64), levels[d + 1][kids].astype(np.int64)
        first = (fine[:, :, None] == fine[:, None, :]).argmax(axis=2)
        assert (np.take_along_axis(coarse, first, axis=1) == coarse).all()  # every kid refines its parent
    assert any((row == 0).all() for row in levels[0])  # the all-shared tree is always there
