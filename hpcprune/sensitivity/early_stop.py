"""The early-stop rule, in one place.

With ``sensitivity.early_stop_floor``, a cell is *past the floor* when its metric is below the floor
(a metric where higher is better, accuracy) or above it (perplexity); NaN never is. Every cell of a
group above its first done cell past the floor is skipped (status ``SKIPPED``, metric NaN).

The engine applies the rule as cells come in, to avoid computing them: a chunk skips its ratios
after a cell that ``stops`` the group, and rank 0 drops the group's queued chunks above that cell
(``Dispatcher.drop_above``). Several ranks may evaluate chunks of one group at once, so the stage
applies the rule once more to the whole record (``skip_past_floor``): the record is then the one
rank's, with any world size. Both decide with ``past_floor``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from ..metrics import EvalSums
from .records import DONE, PENDING, SKIPPED, CellResult

StopRule = Callable[[EvalSums], bool]


def past_floor(metric: Any, floor: float, higher: bool) -> Any:
    """Whether ``metric`` is past ``floor``: for a number a bool, for an array element-wise (NaN: False)."""
    with np.errstate(invalid="ignore"):
        return metric < floor if higher else metric > floor


def stop_rule(metric_name: str, floor: float | None, higher: bool) -> StopRule | None:
    """The engine's test on a cell's sums (``run_sensitivity(stop_below=...)``); None without a floor."""
    if floor is None:
        return None
    return lambda sums: bool(past_floor(sums.metric(metric_name), floor, higher))


def stops(stop_below: StopRule | None, cell: CellResult) -> bool:
    """Whether ``cell`` ends its group: done, whole (a shard's share of the batches cannot decide;
    a team's sums are the whole cell's) and past the floor."""
    return stop_below is not None and cell.status == DONE and cell.shards == 1 and stop_below(EvalSums(*cell.sums))


def skipped(group: int, ratios: Sequence[int], rank: int = 0, team: int = 1) -> list[CellResult]:
    """The records of cells the rule skips (no sums, no time)."""
    return [CellResult(group, r, SKIPPED, (math.nan,) * 4, 0.0, rank, team=team) for r in ratios]


def skip_past_floor(state: dict[str, np.ndarray], floor: float | None, higher: bool) -> None:
    """Apply the rule to a whole (G, R) record in place (``metric``, ``loss``, ``seconds``, ``rank``,
    ``status``), whichever rank computed what; nothing without a floor. Cells that were never
    computed get 0 seconds and rank 0; computed ones keep their seconds and rank."""
    if floor is None:
        return
    past = past_floor(state["metric"], floor, higher)
    past &= state["status"] == DONE
    for g, r in zip(*np.nonzero(past)):
        if past[g, :r].any():
            continue
        later = slice(r + 1, None)
        never = state["status"][g, later] == PENDING
        state["seconds"][g, later][never] = 0.0
        state["rank"][g, later][never] = 0
        state["status"][g, later] = SKIPPED
        state["metric"][g, later] = np.nan
        state["loss"][g, later] = np.nan
