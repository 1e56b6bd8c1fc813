"""Sensitivity analysis: the (group, ratio) cell grid, its schedule over ranks, cell evaluation.

A cell prunes one group at one ratio (least important channels first) and evaluates the model on
the fixed calibration batches. Cells are evaluated by zeroing the group's channels in place on one
model per rank and restoring them afterwards (no deep copy, no re-trace). For an ``nn.Sequential``
model the activations entering the first block a group touches are the same for every ratio of
that group: they are computed once per group and only the rest of the network runs per ratio.

Scheduling: the cells of a group form chunks (a group's ratios, split when there are many ranks);
rank 0 hands chunks out dynamically, most expensive first, and evaluates chunks itself between
serving requests. Every worker holds a second chunk in reserve so it never waits for rank 0.
A cell's numbers depend only on the model, the group, the ratio and the batches, never on which
rank computed it or in which order.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .graph import Graph, GroupInfo, keep_count, mask_group, slice_group
from .metrics import EvalSums, batch_sums
from .world import World

log = logging.getLogger(__name__)

PENDING, DONE, SKIPPED = 0, 1, 2
_TAG_WORK, _TAG_RESULT = 11, 12


@dataclass
class CellResult:
    group: int
    ratio: int
    status: int
    sums: tuple[float, float, float]
    seconds: float
    rank: int


@dataclass
class Chunk:
    group: int
    ratios: list[int]  # ratio indices, ascending
    cost: float = 0.0


def flatten_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model as a chain of (name, module), nested ``nn.Sequential``s expanded; None when the
    model is not a chain (then every cell runs the full forward)."""
    if not isinstance(model, nn.Sequential):
        return None
    chain: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, seq: nn.Sequential) -> None:
        for name, child in seq.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.Sequential):
                walk(full + ".", child)
            else:
                chain.append((full, child))

    walk("", model)
    return chain


class Evaluator:
    """Evaluates cells on one rank's model and calibration batches.

    Per group, the evaluator finds the first chain element the group touches and caches what
    enters it (or, when that element is a layer whose output channels are the group's channels,
    what leaves it: those channels are then simply sliced out). Per ratio it cuts the channels out
    of the member layers in place (``slice_group``: the pruned model's exact computation), or
    zeroes them (``mask_group``) where index mappings forbid slicing, or, for layers that can be
    neither, prunes a copy.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[GroupInfo],
        orders: dict[str, list[int]],
        ratios: Sequence[float],
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        example_input: torch.Tensor,
        ignore: Sequence[str] = (),
        cache_prefix: bool = True,
        slice_channels: bool = True,
    ) -> None:
        self.model = model.eval()
        self.modules = dict(model.named_modules())
        self.groups = list(groups)
        self.orders = orders
        self.ratios = list(ratios)
        self.batches = list(batches)
        self.example_input = example_input
        self.ignore = list(ignore)
        self.slice_channels = slice_channels
        self.chain = flatten_chain(model) if cache_prefix else None

    def _idxs(self, g: GroupInfo, ratio: float) -> list[int]:
        n = g.size - keep_count(g.size, ratio)
        return self.orders[g.name][:n]

    def entry(self, g: GroupInfo) -> tuple[int, bool]:
        """(chain index where a cell's forward starts, whether the cache is that element's output)."""
        if self.chain is None or not g.maskable:
            return 0, False
        touched = [
            i for i, (name, _) in enumerate(self.chain)
            if any(m.module == name or m.module.startswith(name + ".") for m in g.members)
        ]
        if not touched:
            return 0, False
        k = touched[0]
        name, mod = self.chain[k]
        roles = {m.out for m in g.members if m.module == name}
        leaf_out = roles == {True} and isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear))
        leaf_out = leaf_out and not (isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1)
        if leaf_out and g.sliceable and self.slice_channels:
            return k + 1, True
        return k, False

    @torch.inference_mode()
    def _prefix(self, k: int) -> list[torch.Tensor]:
        outs = []
        for x, _ in self.batches:
            for _, child in self.chain[:k]:  # type: ignore[index]
                x = child(x)
            outs.append(x)
        return outs

    @torch.inference_mode()
    def _suffix_sums(self, k: int, inputs: Sequence[torch.Tensor], keep: torch.Tensor | None) -> EvalSums:
        total = EvalSums()
        for h, (_, y) in zip(inputs, self.batches):
            if keep is not None:
                h = h.index_select(1, keep)
            for _, child in self.chain[k:]:  # type: ignore[index]
                h = child(h)
            total = total + batch_sums(h, y)
        return total

    @torch.inference_mode()
    def _full_sums(self, model: nn.Module) -> EvalSums:
        total = EvalSums()
        for x, y in self.batches:
            total = total + batch_sums(model(x), y)
        return total

    def run_chunk(
        self, chunk: Chunk, rank: int, stop_below: Callable[[EvalSums], bool] | None = None,
        between: Callable[[], None] | None = None,
    ) -> list[CellResult]:
        g = self.groups[chunk.group]
        results: list[CellResult] = []
        k, sliced_cache = self.entry(g)
        prefix = self._prefix(k) if k > 0 else None
        stopped = False
        for r in chunk.ratios:
            if stopped:
                results.append(CellResult(chunk.group, r, SKIPPED, (math.nan,) * 3, 0.0, rank))
                continue
            t0 = time.perf_counter()
            idxs = self._idxs(g, self.ratios[r])
            keep_t = None
            if g.sliceable and self.slice_channels:
                drop = set(idxs)
                keep = [i for i in range(g.size) if i not in drop]
                cut: Any = slice_group(self.modules, g, keep)
                if sliced_cache:
                    keep_t = torch.as_tensor(keep, dtype=torch.long, device=self.batches[0][0].device)
            elif g.maskable:
                cut = mask_group(self.modules, g, idxs)
            else:
                cut = None
            try:
                if cut is None:  # exact fallback: prune a copy
                    sums = self._pruned_copy_sums(g, idxs)
                elif prefix is not None:
                    sums = self._suffix_sums(k, prefix, keep_t)
                else:
                    sums = self._full_sums(self.model)
            finally:
                if cut is not None:
                    cut.restore()
            results.append(CellResult(chunk.group, r, DONE, sums.as_tuple(), time.perf_counter() - t0, rank))
            if stop_below is not None and stop_below(sums):
                stopped = True
            if between is not None:
                between()
        return results

    def _pruned_copy_sums(self, g: GroupInfo, idxs: list[int]) -> EvalSums:
        model = copy.deepcopy(self.model)
        graph = Graph(model, self.example_input, self.ignore)
        graph.prune_group(g.name, idxs)
        return self._full_sums(model)

    def chunk_cost(self, chunk: Chunk, module_macs: dict[str, int] | None) -> float:
        """Relative cost: forward MACs before the cache point once, after it once per ratio."""
        k, _ = self.entry(self.groups[chunk.group])
        if module_macs is None or self.chain is None:
            return float(len(chunk.ratios))
        per = [sum(v for n, v in module_macs.items() if n == name or n.startswith(name + ".")) for name, _ in self.chain]
        total = sum(per) or 1.0
        suffix = sum(per[k:]) / total
        return (1.0 - suffix) + suffix * len(chunk.ratios)


def make_chunks(pending: np.ndarray, world_size: int) -> list[Chunk]:
    """Chunks of pending cells: one per group, split so that there are a few per rank."""
    chunks = []
    n_groups = pending.shape[0]
    per_group = [list(np.nonzero(pending[g])[0]) for g in range(n_groups)]
    total = sum(len(p) for p in per_group)
    if total == 0:
        return []
    want = max(1, min(total, 3 * world_size))
    nonempty = sum(1 for p in per_group if p)
    pieces = max(1, math.ceil(want / max(1, nonempty)))
    for g, rs in enumerate(per_group):
        if not rs:
            continue
        k = min(len(rs), pieces)
        for part in np.array_split(np.array(rs), k):
            chunks.append(Chunk(g, [int(r) for r in part]))
    return chunks


def run_sensitivity(
    world: World,
    evaluator: Evaluator,
    pending: np.ndarray,
    module_macs: dict[str, int] | None,
    on_results: Callable[[list[CellResult]], None] | None = None,
    stop_below: Callable[[float], bool] | None = None,
    progress: Any = None,
) -> list[CellResult]:
    """Evaluate every pending cell over all ranks; rank 0 returns all results, others return []."""
    if world.size == 1 or world.comm is None:
        chunks = make_chunks(pending, 1)
        results: list[CellResult] = []
        for ch in sorted(chunks, key=lambda c: -evaluator.chunk_cost(c, module_macs)):
            res = evaluator.run_chunk(ch, 0, stop_below)
            results += res
            if progress is not None:
                progress.update(len(res))
            if on_results is not None:
                on_results(res)
        return results
    if world.rank == 0:
        return _master(world, evaluator, pending, module_macs, on_results, stop_below, progress)
    _worker(world, evaluator, stop_below)
    return []


def _master(world, evaluator, pending, module_macs, on_results, stop_below, progress) -> list[CellResult]:
    from mpi4py import MPI

    comm = world.comm
    chunks = make_chunks(pending, world.size)
    for ch in chunks:
        ch.cost = evaluator.chunk_cost(ch, module_macs)
    queue = deque(sorted(chunks, key=lambda c: -c.cost))
    results: list[CellResult] = []
    in_flight = {r: 0 for r in range(1, world.size)}  # chunks a worker holds and has not returned

    def reply(rank: int) -> None:
        chunk = queue.popleft() if queue else None  # None: nothing more for this request
        comm.send(chunk, dest=rank, tag=_TAG_WORK)
        if chunk is not None:
            in_flight[rank] += 1

    def take(res: list[CellResult]) -> None:
        results.extend(res)
        if progress is not None:
            progress.update(len(res))
        if on_results is not None:
            on_results(res)

    def serve() -> bool:
        served = False
        status = MPI.Status()
        while comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_RESULT, status=status):
            src = status.Get_source()
            take(comm.recv(source=src, tag=_TAG_RESULT))
            in_flight[src] -= 1
            reply(src)  # exactly one reply per result message
            served = True
        return served

    for _ in range(2):  # every worker starts with a chunk to work on and one in reserve
        for r in range(1, world.size):
            reply(r)
    while queue:
        serve()
        if not queue:  # serving may have handed out the last chunk
            break
        take(evaluator.run_chunk(queue.popleft(), 0, stop_below, between=serve))
    while any(in_flight.values()):  # drain without busy-waiting
        if not serve():
            time.sleep(0.002)
    return results


def _worker(world: World, evaluator: Evaluator, stop_below) -> None:
    from mpi4py import MPI

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

    while local or owed:
        receive(block=not local)
        if not local:
            continue
        res = evaluator.run_chunk(local.popleft(), world.rank, stop_below)
        comm.send(res, dest=0, tag=_TAG_RESULT)
        owed += 1
    del MPI
