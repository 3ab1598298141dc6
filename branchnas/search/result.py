"""What a search returns: scored trees, the ranked result and its JSON form (``SEARCH_FORMAT``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from branchnas.cost import as_count
from branchnas.errors import UserError
from branchnas.search.cost import _check_metric
from branchnas.tree import Tree

__all__ = ["ScoredTree", "SearchResult", "SEARCH_FORMAT"]


@dataclass(frozen=True)
class ScoredTree:
    """A tree with its clustering cost and its size in params, FLOPs and (with a table) latency."""

    tree: Tree
    cost: float
    params: int | float
    flops: int | float
    latency: float | None = None

    def size(self, metric: str) -> int | float:
        """The size in ``params``, ``flops`` or ``latency`` (seconds per image)."""
        metric = _check_metric(metric)
        if metric == "latency":
            if self.latency is None:
                raise UserError("this tree has no latency (the search ran without a latency table)")
            return self.latency
        return self.params if metric == "params" else self.flops

    def sort_key(self) -> tuple[Any, ...]:
        """The ranking: cost, then fewer params, then fewer FLOPs, then the canonical tree order."""
        return (self.cost, self.params, self.flops, self.tree.key())

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        data: dict[str, Any] = {
            "cost": self.cost,
            "params": self.params,
            "flops": self.flops,
            "groups_per_point": list(self.tree.groups_per_point()),
            "tree": self.tree.to_json(),
        }
        if self.latency is not None:
            data["latency"] = self.latency
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScoredTree:
        """Inverse of :meth:`to_json`."""
        try:
            latency = data.get("latency")
            return cls(Tree.from_json(data["tree"]), float(data["cost"]), as_count(data["params"]), as_count(data["flops"]),
                       None if latency is None else float(latency))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"search result: a tree entry is malformed ({err!r}); run `branchnas search --force`") from None


SEARCH_FORMAT = "branchnas.search/1"


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search` returns.

    Attributes:
        ranked: the best trees within the budget, best first (up to ``top``).
        metric: what the budget counts (``params``, ``flops`` or ``latency``, in seconds per image).
        budget: the budget, or ``None`` for no limit.
        mode: the search that ran: ``exact``, ``scalable`` or ``enumerate``.
        trees_considered: trees covered by the search (exact: every tree; scalable: the
            chains of the candidate DAG).
        seconds: wall time of the search.
        min_size: size of the all-shared tree (the smallest), in ``metric``.
        max_size: size of the all-separate tree (the largest), in ``metric``.
        pareto: the Pareto front (cheapest cost for every budget), smallest first, when asked.
        details: counts describing the run (candidates per branch point, labels, ...).
    """

    ranked: tuple[ScoredTree, ...]
    metric: str
    budget: int | float | None
    mode: str
    trees_considered: int
    seconds: float
    min_size: int | float
    max_size: int | float
    pareto: tuple[ScoredTree, ...] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> ScoredTree:
        """The winning tree with its scores."""
        return self.ranked[0]

    @property
    def tree(self) -> Tree:
        """The winning tree."""
        return self.ranked[0].tree

    @property
    def cost(self) -> float:
        """The winning tree's clustering cost."""
        return self.ranked[0].cost

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (``search/tree.json``); ``pareto`` is included when present."""
        data: dict[str, Any] = {
            "format": SEARCH_FORMAT,
            "metric": self.metric,
            "budget": self.budget,
            "mode": self.mode,
            "trees_considered": self.trees_considered,
            "seconds": round(self.seconds, 6),
            "min_size": self.min_size,
            "max_size": self.max_size,
            "ranked": [s.to_json() for s in self.ranked],
            "details": self.details,
        }
        if self.pareto is not None:
            data["pareto"] = [s.to_json() for s in self.pareto]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SearchResult:
        """Inverse of :meth:`to_json`.

        Raises:
            UserError: the data is not a search result.
        """
        if not isinstance(data, Mapping) or data.get("format") != SEARCH_FORMAT:
            raise UserError(f"search result: expected format '{SEARCH_FORMAT}'; run `branchnas search --force` to rewrite it")
        try:
            return cls(
                ranked=tuple(ScoredTree.from_json(s) for s in data["ranked"]),
                metric=str(data["metric"]),
                budget=data["budget"],
                mode=str(data["mode"]),
                trees_considered=int(data["trees_considered"]),
                seconds=float(data["seconds"]),
                min_size=as_count(data["min_size"]),
                max_size=as_count(data["max_size"]),
                pareto=None if data.get("pareto") is None else tuple(ScoredTree.from_json(s) for s in data["pareto"]),
                details=dict(data.get("details", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"search result: malformed ({err!r}); run `branchnas search --force`") from None
