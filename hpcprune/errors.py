"""The one base class of the errors a user can fix.

A :class:`HpcpruneError` says what is wrong with the user's input or environment in one line that
names the bad value (a config key, a run file, a budget, a run directory) and what to do instead.
The driver (``hpcprune.sweep``, through ``world.run_guarded``) prints it as
``hpcprune: error: ...`` and exits non-zero, without a traceback. Any other exception is a bug, in
hpcprune or in a library: it is printed the same way and keeps its traceback in ``sweep.log``.

Each subclass also keeps the built-in base it always had (``ValueError``, ``RuntimeError``), so
callers that catch those still do::

    ConfigError (config.py)      ValueError     bad config value, model, data or checkpoint
    BudgetError (allocate.py)    ValueError     a budget no allocation can reach
    RunFileError (store.py)      ValueError     a run file that cannot be used (WeightsError: its weights)
    RunDirLocked (store.py)      RuntimeError   another sweep runs in the run directory
    MPIMismatch (world.py)       RuntimeError   mpiexec and mpi4py's MPI disagree
    ReportError (report.py)      ValueError     bad report arguments
    GraphError (graph.py)        ValueError     a model Torch-Pruning cannot trace, a graph past groups.timeout_s
    ExportError (export.py)      ValueError     bad export arguments, a missing deploy package, an export that disagrees
    HFDirError (hf_dir.py)       ValueError     a run or directory save_hf_dir / load_hf_dir cannot use (HFDirExists: a model already there)
    StructureError (structure.py) ValueError    a model whose attention layers do not fit its config
    AccuracyGateError (pipeline.py) RuntimeError the fine-tuned model misses finetune.min_metric / max_drop
"""
from __future__ import annotations


class HpcpruneError(Exception):
    """A problem the user can fix, stated in one line (see the module docstring)."""
