"""branchnas: decide which encoder layers vision tasks should share under a budget.

Importing this package is cheap: it does not import torch. Heavy modules are imported
where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
