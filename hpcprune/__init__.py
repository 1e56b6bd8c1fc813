"""hpcprune: structural pruning of PyTorch models as a batch job on HPC clusters."""
from __future__ import annotations

__version__ = "0.1.0"


def load_pruned(path: str, weights: str = "final"):  # noqa: ANN201
    """Rebuild the pruned (and, once fine-tuned, the fine-tuned) model stored in run file ``path``;
    ``weights``: ``final`` (default), ``pruned``, ``plan`` or ``dense`` (hpcprune.runs.load_pruned)."""
    from .runs import load_pruned as _load

    return _load(path, weights=weights)


def save_hf_dir(path: str, out_dir: str, weights: str = "final"):  # noqa: ANN201
    """Write the pruned Hugging Face model of run file ``path`` to a directory: one plain
    ``from_pretrained`` loads when one config can describe it, else hpcprune's (see hpcprune.hf_dir).
    Returns an ``HFDir`` (``os.fspath`` gives the path; ``.loader``, ``.reason``, ``.line`` say which)."""
    from .hf_dir import save_hf_dir as _save

    return _save(path, out_dir, weights=weights)


def load_hf_dir(path: str):  # noqa: ANN201
    """Load a directory written by :func:`save_hf_dir` (either kind) as hpcprune's wrapper."""
    from .hf_dir import load_hf_dir as _load

    return _load(path)


__all__ = ["__version__", "load_pruned", "save_hf_dir", "load_hf_dir"]
