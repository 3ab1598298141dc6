"""Multi-task network architectures built from a tree and a backbone.

* :class:`BranchedNet`: the branched network of a tree (one block copy per tree node).
"""

from branchnas.models.branched import INIT_RULES, BranchedNet, node_name, source_task, tree_chain

__all__ = ["BranchedNet", "INIT_RULES", "node_name", "source_task", "tree_chain"]
