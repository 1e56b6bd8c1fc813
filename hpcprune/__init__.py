"""hpcprune: structural pruning of PyTorch models as a batch job on HPC clusters."""
from __future__ import annotations

__version__ = "0.1.0"


def load_pruned(path: str, weights: str = "final"):  # noqa: ANN201
    """Rebuild the pruned (and, once fine-tuned, the fine-tuned) model stored in run file ``path``."""
    from .runs import load_pruned as _load

    return _load(path, weights=weights)


def save_hf_dir(path: str, out_dir: str, weights: str = "final") -> str:
    """Write the pruned Hugging Face model of run file ``path`` to a directory (see hpcprune.hf_dir)."""
    from .hf_dir import save_hf_dir as _save

    return _save(path, out_dir, weights=weights)


def load_hf_dir(path: str):  # noqa: ANN201
    """Load a directory written by :func:`save_hf_dir` (layers of different widths, removed blocks)."""
    from .hf_dir import load_hf_dir as _load

    return _load(path)


__all__ = ["__version__", "load_pruned", "save_hf_dir", "load_hf_dir"]
