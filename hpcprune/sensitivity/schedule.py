"""Scheduling: the pending cells as chunks, which chunk a worker gets next, the size of teams.

The cells of a group form chunks (a group's ratios, split when there are many ranks); rank 0 hands
chunks out dynamically, most expensive first (``Dispatcher``). With many ranks (more than the work
has good chunks for: see ``team_size``) the workers form teams of ``team_ranks``.

Nothing here touches MPI or a model: ``benchmarks/sensitivity_scaling.py`` replays recorded costs
through these same functions.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from .records import Chunk

_CHUNKS_PER_RANK = 4  # granularity that keeps dynamic balancing effective (see sensitivity_scaling.py)
# auto team size (see team_size; chosen with benchmarks/sensitivity_scaling.py)
_TEAM_FROM = 0.5  # teams once there are this many workers per pending group
_TEAM_MIN_WORLD = 12  # and this many ranks: with fewer, rank 0's share of the work is worth more
_TEAMS_PER_GROUP = 0.25  # then teams so large that there are at most this many teams per group
_MAX_TEAM = 32  # at most this many ranks share a cell (two small allreduces per cell)
_MIN_SHARE = 32  # calibration samples per team member, at least


def make_chunks(
    pending: np.ndarray, world_size: int, n_batches: int = 1, cost: Callable[[int, list[int]], float] | None = None
) -> list[Chunk]:
    """Chunks of pending cells, about four per rank by cost.

    On one rank a chunk is a group's pending ratios (its cached activations serve them all). With
    more ranks, a chunk costlier than 1/(4 x ranks) of the work is split: first its ratios, then,
    when a single cell is still too big (more ranks than cells, as with 256 GPUs for 400 cells),
    its calibration batches into shards (at most one per batch); rank 0 adds the shards' partial
    sums in shard order. ``cost(group, ratios)`` is a relative cost (default: the number of cells).
    """
    cost = cost or (lambda g, rs: float(len(rs)))
    per_group = {g: [int(r) for r in np.nonzero(pending[g])[0]] for g in range(pending.shape[0])}
    per_group = {g: rs for g, rs in per_group.items() if rs}
    if not per_group:
        return []
    if world_size == 1:
        return [Chunk(g, rs) for g, rs in per_group.items()]
    target = sum(cost(g, rs) for g, rs in per_group.items()) / (_CHUNKS_PER_RANK * world_size)
    chunks = []
    for g, rs in per_group.items():
        k = min(len(rs), max(1, math.ceil(cost(g, rs) / target)))
        for part in np.array_split(np.array(rs), k):
            part_l = [int(r) for r in part]
            shards = min(n_batches, max(1, math.ceil(cost(g, part_l) / target))) if len(part_l) == 1 else 1
            chunks += [Chunk(g, part_l, 0.0, i, shards) for i in range(shards)]
    return chunks


class Dispatcher:
    """Which chunk a worker (or team) gets next. The most expensive chunk of the group it worked on
    last, whose cached activations it still holds; else the most expensive chunk of a group no
    worker holds; else (the tail of the run) the most expensive chunk left. A group split into
    chunks for balance is thus mostly evaluated by one worker in turn, computing its prefix once,
    and split over workers only where one would otherwise idle."""

    def __init__(self, chunks: Sequence[Chunk]) -> None:
        self.queue = sorted(chunks, key=lambda c: -c.cost)
        self.holds: dict[int, int] = {}  # worker -> group of its last chunk

    def __len__(self) -> int:
        return len(self.queue)

    def next(self, worker: int) -> Chunk | None:
        if not self.queue:
            return None
        mine = self.holds.get(worker)
        pick = next((i for i, c in enumerate(self.queue) if c.group == mine), None)
        if pick is None:
            held = set(self.holds.values())
            pick = next((i for i, c in enumerate(self.queue) if c.group not in held), 0)
        chunk = self.queue.pop(pick)
        self.holds[worker] = chunk.group
        return chunk

    def drop_above(self, group: int, ratio: int) -> list[Chunk]:
        """Take the queued chunks of ``group`` whose ratios all lie above ``ratio`` out (early stop)."""
        dropped = [c for c in self.queue if c.group == group and min(c.ratios) > ratio]
        self.queue = [c for c in self.queue if not (c.group == group and min(c.ratios) > ratio)]
        return dropped


def team_size(world_size: int, groups: int, n_samples: int, setting: Any = "auto", recal_batches: int = 0,
              recal_batch: int = 0) -> int:
    """Ranks per team (1: no teams). ``auto``: no teams while there are fewer than ``_TEAM_FROM``
    workers per pending group or fewer than ``_TEAM_MIN_WORLD`` ranks; then the smallest power of two that leaves at most
    ``_TEAMS_PER_GROUP`` teams per group, at most ``_MAX_TEAM``. Any size is capped so that each
    member's share of the work (``n_samples`` calibration samples and ``recal_batches`` BatchNorm
    re-estimation batches of ``recal_batch`` samples) is at least ``_MIN_SHARE`` samples and one
    re-estimation batch."""
    workers = world_size - 1  # with teams rank 0 only dispatches
    cap = max(1, min(workers, (n_samples + recal_batches * recal_batch) // max(_MIN_SHARE, recal_batch)))
    if setting == "auto":
        if world_size < _TEAM_MIN_WORLD or workers < _TEAM_FROM * groups:
            return 1
        t = 2
        while t < _MAX_TEAM and workers / t > _TEAMS_PER_GROUP * groups:
            t *= 2
    else:
        t = int(setting)
    return max(1, min(t, cap))


def team_ranks(world_size: int, size: int) -> list[np.ndarray]:
    """Ranks 1 .. N-1 in teams of at most ``size``, as even as the count allows (rank 0 dispatches);
    each team's first rank is its leader."""
    return np.array_split(np.arange(1, world_size), math.ceil((world_size - 1) / size))
