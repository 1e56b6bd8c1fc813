"""hpcprune: structural pruning of PyTorch models as a batch job on HPC clusters."""
from __future__ import annotations

__version__ = "0.1.0"


def load_pruned(path: str, weights: str = "final"):  # noqa: ANN201
    """Rebuild the pruned (and, once fine-tuned, the fine-tuned) model stored in run file ``path``."""
    from .runs import load_pruned as _load

    return _load(path, weights=weights)


__all__ = ["__version__", "load_pruned"]
