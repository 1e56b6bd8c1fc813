"""Splitting one cell over ranks: shards and teams.

Both give each rank a share of a cell's calibration data and add the shares' sums up; they differ
in who adds, and that makes them two mechanisms rather than one:

- **shards** (no teams, more ranks than cells): ``make_chunks`` splits a one-cell chunk's whole
  calibration batches into shards, ordinary chunks that any worker takes from the queue. A shard
  needs no other rank while it runs: it computes the prefix of its batches and repeats the whole
  BatchNorm re-estimation itself. Rank 0 adds the shards' partial sums in shard order (``Gather``),
  and a shard cannot decide an early stop.
- **teams** (``team_size`` > 1): fixed groups of ranks (``make_teams``, a communicator each) that
  evaluate every chunk together, each member on a contiguous share of the calibration *samples*
  and of the re-estimation batches (``team_share``); they combine the re-estimated statistics and
  the sums after each cell with two allreduces, so every member has the whole cell's numbers.

The shares differ (whole batches vs. re-batched samples, full vs. shared re-estimation), and so do
the sums to rounding (~1e-7): merging the two would change one of them, and shards' independence is
what lets any idle worker take one without a communicator set up in advance.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..world import World
from .records import DONE, CellResult
from .schedule import team_ranks

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def shard_batches(batches: Batches, shard: int, shards: int) -> list:
    """Shard ``shard`` of ``shards``: contiguous whole batches, as even a split as the count allows."""
    return [batches[i] for i in np.array_split(np.arange(len(batches)), shards)[shard]]


class Gather:
    """Combines the shards of split cells, in shard order (so the sums do not depend on arrival)."""

    def __init__(self) -> None:
        self.partial: dict[tuple[int, int], dict[int, CellResult]] = {}

    def add(self, results: list[CellResult]) -> list[CellResult]:
        """The complete cells among ``results`` (a cell's last shard completes it)."""
        done = []
        for c in results:
            if c.shards == 1:
                done.append(c)
                continue
            parts = self.partial.setdefault((c.group, c.ratio), {})
            parts[c.shard] = c
            if len(parts) == c.shards:
                del self.partial[(c.group, c.ratio)]
                ordered = [parts[i] for i in range(c.shards)]
                sums = tuple(float(sum(p.sums[j] for p in ordered)) for j in range(len(c.sums)))
                done.append(CellResult(c.group, c.ratio, DONE, sums,  # type: ignore[arg-type]
                                       sum(p.seconds for p in ordered), ordered[0].rank, 0, 1,
                                       sum(p.prefix_s for p in ordered), sum(p.recal_s for p in ordered),
                                       sum(p.recal_prefix_s for p in ordered)))
        return done


@dataclass
class Team:
    """The ranks that evaluate chunks together: ``comm`` spans them, this rank is member ``index``."""

    comm: Any
    index: int
    size: int

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over the team (waits sleeping, so an idle member does not spin a core)."""
        from mpi4py import MPI

        arr = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(arr)
        req = self.comm.Iallreduce(arr, out, op=MPI.SUM)
        while not req.Test():
            time.sleep(0.0002)
        return out


def make_teams(world: World, size: int) -> Team | None:
    """This rank's team (``team_ranks``); None on rank 0. Collective: every rank calls it."""
    from mpi4py import MPI

    index = -1
    if world.rank > 0:
        index = next(i for i, part in enumerate(team_ranks(world.size, size)) if world.rank in part)
    comm = world.comm.Split(index if index >= 0 else MPI.UNDEFINED, world.rank)
    if index < 0:
        return None
    return Team(comm, comm.Get_rank(), comm.Get_size())


def team_share(batches: Batches, recal_batches: Batches, index: int, size: int,
               fmt: Callable[[torch.Tensor], torch.Tensor]) -> tuple[list, list]:
    """Member ``index`` of ``size``'s calibration and BatchNorm re-estimation batches. Re-estimation
    batches are whole (a batch's statistics depend on all its samples), as even a split as the count
    allows; calibration samples are split to even out the members' work (an image costs about the
    same forward in either), contiguously and in order, and re-batched at the batch size (inputs
    laid out by ``fmt``)."""
    parts = np.array_split(np.arange(len(recal_batches)), size)  # every member's, as even as can be
    recal = [recal_batches[i] for i in parts[index]]
    recal_n = np.array([sum(len(recal_batches[i][1]) for i in p) for p in parts], dtype=np.float64)
    n = sum(len(y) for _, y in batches)
    want = np.maximum(0.0, (n + recal_n.sum()) / size - recal_n)
    bounds = np.concatenate([[0], np.round(np.cumsum(want) * n / want.sum()).astype(int)])
    lo, hi = int(bounds[index]), int(bounds[index + 1])
    calib = []
    if hi > lo:
        batch = len(batches[0][1])
        xs = torch.cat([x for x, _ in batches])[lo:hi]
        ys = torch.cat([y for _, y in batches])[lo:hi]
        calib = [(fmt(xs[i:i + batch]), ys[i:i + batch].contiguous()) for i in range(0, hi - lo, batch)]
    return calib, recal
