"""README's stage table as code: ``STAGES``, one row per stage, in the order they run.

Each stage is a module with ``run(ctx, cfg, run_file) -> record``: it works on the run's
:class:`~hpcprune.stages.context.Context`, may read the run file and write partial results to it
(sensitivity flushes, latency tables), and on rank 0 returns its record: a function that writes the
stage's group, ``complete`` included, into the transaction ``hpcprune.pipeline`` opens for it
(``None`` where there is nothing to record: another rank, a stage with nothing left to do).
The pipeline loops over the table: it skips what the run file holds, times each stage, and sets
the run's status.

``who``: ``RANK0`` stages run on rank 0 unless their group is complete, while the other ranks wait
at a sleeping barrier; an ``EVERY_RANK`` stage runs on every rank, done or not (it resumes itself:
a partly done sensitivity grid computes only its missing cells), with the cores shared out.
``dense``: the stage works on the dense model's analysis (``context.analyse``: graph, scores,
orders, cost model, calibration batches), built once on every rank before the first such stage;
groups and baseline work on the architecture and the data only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import ConfigError, validate  # noqa: F401 - importable from here, as before the split
from ..store import TIMED_STAGES
from . import allocation, baseline, finetune, groups, prune, sensitivity
from .baseline import train_dense  # noqa: F401 - importable from here, as before the split
from .context import Context, Record

RANK0, EVERY_RANK = "rank 0", "every rank"


@dataclass(frozen=True)
class Stage:
    key: str  # its run-file group (the stage is done when that is complete) and the name it is timed under
    who: str  # RANK0 or EVERY_RANK
    run: Callable[[Context, Any, Any], Record | None]
    dense: bool  # needs the dense model's analysis


STAGES = (
    Stage("groups", RANK0, groups.run, dense=False),  # first: the architecture checked before any training
    Stage("baseline", RANK0, baseline.run, dense=False),
    Stage("sensitivity", EVERY_RANK, sensitivity.run, dense=True),
    Stage("allocation", RANK0, allocation.run, dense=True),
    Stage("pruned", RANK0, prune.run, dense=True),
    Stage("final", RANK0, finetune.run, dense=True),  # the fine-tune stage: also writes /finetune
)
assert sorted(s.key for s in STAGES) == sorted(TIMED_STAGES), "the stage table and store.TIMED_STAGES disagree"


def __getattr__(name: str) -> Any:
    # ``from hpcprune.stages import Sweep`` (tests, benchmarks, older scripts): the driver is
    # hpcprune.pipeline now, imported on first use (the pipeline imports this package)
    if name == "Sweep":
        from ..pipeline import Sweep

        return Sweep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["STAGES", "Stage", "RANK0", "EVERY_RANK", "Context", "Record", "ConfigError", "validate", "train_dense", "Sweep"]
