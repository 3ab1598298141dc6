"""The contracts between the search strategies, their DP engines and the best-first read-out.

A :class:`SearchStrategy` chooses the DP's node set (every partition, or candidates) and
builds an :class:`_Engine`; the read-out (:mod:`branchnas.search.api`) only uses the engine's
interface, so both strategies share it.
"""

from __future__ import annotations

import numpy as np

from branchnas.cost import BlockCosts
from branchnas.tree import Partition

__all__ = ["SearchStrategy"]


class _Engine:
    """The suffix DP tables, as the best-first read-out uses them.

    ``W_d(node)[s]`` is the cost of the best chain of levels ``d..D-1`` that starts at
    ``node`` and has the count vector ``s`` below it, summed as in :func:`branchnas.search.cost._fold`.
    """

    num_points: int
    class_counts: np.ndarray  # (C, D): count vector of every class (size label)
    class_best: np.ndarray  # (C,): the cheapest cost within the class

    def roots(self, allowed: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Level-0 entries (node, class, value) with value <= threshold in allowed classes."""
        raise NotImplementedError

    def kth(self, allowed: np.ndarray, k: int) -> float:
        """The k-th smallest level-0 value in allowed classes (the largest when there are fewer)."""
        raise NotImplementedError

    def children(self, d: int, node: int, groups: int) -> np.ndarray:
        """Nodes at level d+1 that refine ``node`` and have ``groups`` groups."""
        raise NotImplementedError

    def values(self, d: int, nodes: np.ndarray, suffix: tuple[int, ...]) -> np.ndarray:
        """``W_d(node)[suffix]`` for every node (all with the same group count); inf if absent."""
        raise NotImplementedError

    def partition(self, d: int, node: int) -> Partition:
        raise NotImplementedError

    def level_cost(self, d: int, node: int) -> float:
        raise NotImplementedError


class SearchStrategy:
    """How the DP's node set is chosen. Subclasses: :class:`ExactSearch`, :class:`ScalableSearch`."""

    name = "base"

    def build(self, dis: np.ndarray, sizes: BlockCosts, metric: str, budget: float | None) -> _Engine:
        """The DP tables for this problem (``budget`` may prune; ``None`` keeps every size)."""
        raise NotImplementedError

    def trees_considered(self, engine: _Engine, n: int, d: int) -> int:
        raise NotImplementedError
