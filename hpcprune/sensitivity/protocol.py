"""The MPI protocol between ranks: rank 0 dispatches chunks, workers (or team leaders) evaluate and
return them, team members follow their leader.

Messages (pickled objects, point to point):

- ``_TAG_WORK`` rank 0 -> worker: a ``Chunk``, or None (nothing more for this request). Rank 0
  sends every worker two at the start (one in reserve, so it never waits for rank 0) and exactly
  one per result message after; a worker ends once every reply it is owed has come and its chunks
  are done.
- ``_TAG_RESULT`` worker -> rank 0: the list of ``CellResult`` of one chunk.
- ``_TAG_TEAM`` leader -> member (on the team's communicator): the chunk the leader starts, or None
  at the leader's end.

Waiting ranks poll with sleeps: MPICH would busy-poll in a blocking receive. A failure on any rank
ends every rank: the exception leaves ``run_sensitivity`` and ``world.run_guarded`` calls MPI_Abort,
which also ends the ranks still waiting here for that rank's messages.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

import numpy as np

from ..world import World
from .cells import Evaluator
from .early_stop import StopRule, skipped, stops
from .records import CellResult, Chunk
from .schedule import Dispatcher, make_chunks, team_ranks, team_size
from .split import Gather, Team, make_teams

_TAG_WORK, _TAG_RESULT, _TAG_TEAM = 11, 12, 13


def run_sensitivity(
    world: World,
    evaluator: Evaluator,
    pending: np.ndarray,
    module_macs: dict[str, int] | None,
    on_results: Callable[[list[CellResult]], None] | None = None,
    stop_below: StopRule | None = None,
    progress: Any = None,
    team_setting: Any = "auto",
) -> list[CellResult]:
    """Evaluate every pending cell (``pending``: (G, R) bool) over all ranks; rank 0 returns all
    results (shards combined), others return []. ``on_results`` (rank 0) gets complete cells as
    they come; ``progress.update(n)`` counts them; ``stop_below``: the early-stop test
    (``early_stop.stop_rule``); ``team_setting``: ``sensitivity.team_size``."""
    if world.size == 1 or world.comm is None:
        return _alone(evaluator, pending, module_macs, on_results, stop_below, progress)
    n_samples = sum(len(y) for _, y in evaluator.batches)
    recal_batch = max((len(y) for _, y in evaluator.recal_batches), default=0)
    t = team_size(world.size, int(pending.any(axis=1).sum()), n_samples, team_setting,
                  len(evaluator.recal_batches), recal_batch)
    team = make_teams(world, t) if t > 1 else None  # collective: every rank, rank 0 too
    if world.rank == 0:
        gather = Gather()

        def report(res: list[CellResult]) -> None:  # complete cells only: shards are combined first
            done = gather.add(res)
            if progress is not None:
                progress.update(len(done))
            if on_results is not None and done:
                on_results(done)

        return Gather().add(_Master(world, evaluator, pending, module_macs, report, stop_below, t).run())
    if team is not None and team.index > 0:
        _member(evaluator, team, world.rank, stop_below)
    else:
        _worker(world, evaluator, stop_below, team)
    if team is not None:  # (after an error the abort ends every rank: no collective free then)
        team.comm.Free()
    return []


def _alone(evaluator: Evaluator, pending: np.ndarray, module_macs: dict[str, int] | None,
           on_results: Callable[[list[CellResult]], None] | None, stop_below: StopRule | None,
           progress: Any) -> list[CellResult]:
    """One rank: a chunk per group, most expensive first."""
    results: list[CellResult] = []
    for ch in sorted(make_chunks(pending, 1), key=lambda c: -evaluator.chunk_cost(c, module_macs)):
        res = evaluator.run_chunk(ch, 0, stop_below)
        results += res
        if progress is not None:
            progress.update(len(res))
        if on_results is not None:
            on_results(res)
    return results


class _Master:
    """Rank 0: hands out chunks to the workers (with teams: to the team leaders, and works on none)."""

    def __init__(self, world: World, evaluator: Evaluator, pending: np.ndarray, module_macs: dict[str, int] | None,
                 on_results: Callable[[list[CellResult]], None], stop_below: StopRule | None, team: int = 1) -> None:
        self.comm, self.evaluator, self.on_results, self.stop_below, self.team = world.comm, evaluator, on_results, stop_below, team
        cost = lambda g, rs: evaluator.chunk_cost(Chunk(g, rs), module_macs)  # noqa: E731
        if team > 1:
            self.clients = [int(part[0]) for part in team_ranks(world.size, team)]
            chunks = make_chunks(pending, len(self.clients), 1, cost)
        else:
            self.clients = list(range(1, world.size))
            chunks = make_chunks(pending, world.size, len(evaluator.batches), cost)
        for ch in chunks:
            ch.cost = evaluator.chunk_cost(ch, module_macs)
        self.queue = Dispatcher(chunks)
        self.results: list[CellResult] = []
        self.in_flight = {r: 0 for r in self.clients}  # chunks a worker holds and has not returned

    def run(self) -> list[CellResult]:
        for _ in range(2):  # every worker starts with a chunk to work on and one in reserve
            for r in self.clients:
                self.reply(r)
        while self.queue and self.team == 1:
            self.serve()
            if not self.queue:  # serving may have handed out the last chunk
                break
            self.take(self.evaluator.run_chunk(self.queue.next(0), 0, self.stop_below, between=self.serve))
        while any(self.in_flight.values()):  # drain without busy-waiting
            if not self.serve():
                time.sleep(0.002)
        return self.results

    def reply(self, rank: int) -> None:
        chunk = self.queue.next(rank)  # None: nothing more for this request
        self.comm.send(chunk, dest=rank, tag=_TAG_WORK)
        if chunk is not None:
            self.in_flight[rank] += 1

    def take(self, res: list[CellResult]) -> None:
        for c in list(res):  # early stop: a group's chunks above a cell past the floor are not needed
            if stops(self.stop_below, c):
                res += [s for d in self.queue.drop_above(c.group, c.ratio) for s in skipped(d.group, d.ratios)]
        self.results.extend(res)
        self.on_results(res)

    def serve(self) -> bool:
        """Take every result that has come, answering each with the next chunk; whether any had."""
        from mpi4py import MPI

        served = False
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_RESULT, status=status):
            src = status.Get_source()
            self.take(self.comm.recv(source=src, tag=_TAG_RESULT))
            self.in_flight[src] -= 1
            self.reply(src)  # exactly one reply per result message
            served = True
        return served


def _worker(world: World, evaluator: Evaluator, stop_below: StopRule | None, team: Team | None = None) -> None:
    """A worker, or a team's leader: asks rank 0 for chunks (one in reserve), and with a team
    hands each chunk to the members as it starts it."""
    comm = world.comm
    local: deque[Chunk] = deque()
    owed = 2  # replies rank 0 still owes this rank: the two initial sends

    def receive(block: bool) -> None:
        nonlocal owed
        while owed > 0:
            if not comm.Iprobe(source=0, tag=_TAG_WORK):
                if not block:
                    return
                time.sleep(0.002)
                continue
            msg = comm.recv(source=0, tag=_TAG_WORK)
            owed -= 1
            if msg is not None:
                local.append(msg)
            block = block and not local

    try:
        while local or owed:
            receive(block=not local)
            if not local:
                continue
            chunk = local.popleft()
            if team is not None:
                for member in range(1, team.size):
                    team.comm.send(chunk, dest=member, tag=_TAG_TEAM)
            res = evaluator.run_chunk(chunk, world.rank, stop_below, team=team)
            comm.send(res, dest=0, tag=_TAG_RESULT)
            owed += 1
    finally:
        if team is not None:  # the members' end (after an error the abort ends them anyway)
            for member in range(1, team.size):
                team.comm.send(None, dest=member, tag=_TAG_TEAM)


def _member(evaluator: Evaluator, team: Team, rank: int, stop_below: StopRule | None) -> None:
    """A team member: evaluates its share of each chunk its leader starts, until the leader ends."""
    while True:
        while not team.comm.Iprobe(source=0, tag=_TAG_TEAM):
            time.sleep(0.0005)
        chunk = team.comm.recv(source=0, tag=_TAG_TEAM)
        if chunk is None:
            return
        evaluator.run_chunk(chunk, rank, stop_below, team=team)
