"""Sensitivity analysis: the (group, ratio) cell grid, its schedule over ranks, cell evaluation.

A cell prunes one group at one ratio (least important channels first) and evaluates the model on
the fixed calibration batches. Cells are evaluated by zeroing the group's channels in place on one
model per rank and restoring them afterwards (no deep copy, no re-trace). For an ``nn.Sequential``
model the activations entering the first block a group touches are the same for every ratio of
that group: they are computed once per group and only the rest of the network runs per ratio.

Scheduling: the cells of a group form chunks (a group's ratios, split when there are many ranks);
rank 0 hands chunks out dynamically, most expensive first, and evaluates chunks itself between
serving requests. Every worker holds a second chunk in reserve so it never waits for rank 0.

With many ranks (more than the work has good chunks for: see ``team_size``) the workers form
teams. Rank 0 then only dispatches, to team leaders; a team evaluates a chunk together, each
member on its share of the calibration batches and of the BatchNorm re-estimation batches, and
adds the shares up after each cell (two small allreduces). Nothing is computed twice: a group's
prefix is computed once per team, in shares, instead of once per rank that takes one of its cells.

A cell's numbers depend only on the model, the group, the ratio and the batches, never on which
rank computed it or in which order (sums of shares agree with one rank's to rounding, ~1e-7).
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import blockcache
from .graph import Graph, GroupInfo, Slice, n_keep, skip_block, slice_group
from .structure import structure_of
from .metrics import EvalSums, batch_sums
from .world import World

log = logging.getLogger(__name__)

PENDING, DONE, SKIPPED = 0, 1, 2
_CHUNKS_PER_RANK = 4  # granularity that keeps dynamic balancing effective (see sensitivity_scaling.py)
_TAG_WORK, _TAG_RESULT, _TAG_TEAM = 11, 12, 13
# auto team size (see team_size; chosen with benchmarks/sensitivity_scaling.py)
_TEAM_FROM = 0.5  # teams once there are this many workers per pending group
_TEAM_MIN_WORLD = 12  # and this many ranks: with fewer, rank 0's share of the work is worth more
_TEAMS_PER_GROUP = 0.25  # then teams so large that there are at most this many teams per group
_MAX_TEAM = 32  # at most this many ranks share a cell (two small allreduces per cell)
_MIN_SHARE = 32  # calibration samples per team member, at least


@dataclass
class CellResult:
    group: int
    ratio: int
    status: int
    sums: tuple[float, float, float]
    seconds: float
    rank: int
    shard: int = 0  # a cell split over ranks: this share of its calibration batches
    shards: int = 1
    prefix_s: float = 0.0  # time to compute the chunk's cached activations (first cell of a chunk)
    recal_s: float = 0.0  # of ``seconds``: re-estimating the BatchNorm statistics
    recal_prefix_s: float = 0.0  # of ``prefix_s``: the cached activations of the re-estimation batches
    team: int = 1  # ranks that evaluated the cell together (``rank`` is the team's leader)


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


@dataclass
class Chunk:
    group: int
    ratios: list[int]  # ratio indices, ascending
    cost: float = 0.0
    shard: int = 0  # with more ranks than cells, a cell's calibration batches are split
    shards: int = 1


class Gather:
    """Combines the shards of split cells, in shard order (so the sums do not depend on arrival)."""

    def __init__(self) -> None:
        self.partial: dict[tuple[int, int], dict[int, CellResult]] = {}

    def add(self, results: list[CellResult]) -> list[CellResult]:
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
                sums = tuple(float(sum(p.sums[j] for p in ordered)) for j in range(3))
                done.append(CellResult(c.group, c.ratio, DONE, sums,  # type: ignore[arg-type]
                                       sum(p.seconds for p in ordered), ordered[0].rank, 0, 1,
                                       sum(p.prefix_s for p in ordered), sum(p.recal_s for p in ordered),
                                       sum(p.recal_prefix_s for p in ordered)))
        return done


def flatten_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model as a chain of (name, module), nested ``nn.Sequential``s expanded; None when the
    model is not a chain (then every cell runs the full forward)."""
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
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


def _identity(x: Any) -> Any:
    return x


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.track_running_stats and bn.running_mean is not None)


def fold_pairs(chain: Sequence[tuple[str, nn.Module]]) -> list[tuple[int, nn.Module, nn.Module]]:
    """(chain index, convolution, BatchNorm): each convolution whose output goes only into a
    BatchNorm, both called once, in chain elements or inside a chain element (a block traced with
    ``torch.fx``; blocks that cannot be traced have none). An evaluation may fold the BatchNorm into
    the convolution's weights and bias (``Evaluator.fold_bn``)."""
    pairs = []
    for i, (_, mod) in enumerate(chain):
        if i > 0 and _foldable(chain[i - 1][1], mod):
            pairs.append((i - 1, chain[i - 1][1], mod))
        if not any(True for _ in mod.children()):
            continue
        try:
            gm = torch.fx.symbolic_trace(mod)
        except Exception:  # noqa: BLE001 - any untraceable block simply folds nothing
            continue
        mods = dict(gm.named_modules())
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in gm.graph.nodes:
            if node.op != "call_module" or len(node.users) != 1:
                continue
            user = next(iter(node.users))
            if (user.op == "call_module" and user.args[:1] == (node,) and len(user.args) == 1 and not user.kwargs
                    and calls[node.target] == 1 and calls[user.target] == 1 and _foldable(mods[node.target], mods[user.target])):
                pairs.append((i, mods[node.target], mods[user.target]))
    return pairs


class Evaluator:
    """Evaluates cells on one rank's model and calibration batches.

    Per group, the evaluator finds the first chain element the group touches and caches what
    enters it (or, when that element is a layer whose output channels are the group's channels,
    what leaves it: those channels are then simply sliced out). Per ratio it cuts the channels out
    of the member layers in place: ``slice_group`` where every member indexes the channels 1:1,
    else Torch-Pruning's own layer functions on its mapped indices (``Graph.cut``: concat offsets,
    flatten blocks, grouped convolutions), restored after the cell. Either is the pruned model's
    exact computation. ``round_to``: the cells cut what the prune stage will (kept channels a
    multiple of it).

    ``channels_last``: run convolutions on NHWC tensors (weights, calibration batches, cached
    activations, sliced weights), faster conv kernels on CPU and tensor cores; the numbers agree
    with the default layout to rounding (~1e-7). ``close()`` puts the model back in the default layout.

    ``fold_bn``: per cell (after the cut and the BatchNorm re-estimation), fold every BatchNorm the
    cell runs after a convolution it runs into that convolution (``fold_pairs``; not inside a block
    the cell starts from cached values), and skip the BatchNorm: one pass over the activations less
    per pair; numbers agree to rounding (~1e-7).
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
        recal_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
        channels_last: bool = False,
        fold_bn: bool = False,
        graph: Graph | None = None,
        round_to: int = 1,
    ) -> None:
        self.channels_last = channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules())
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
            batches = [(nhwc(x), y) for x, y in batches]
            recal_batches = [(nhwc(x), y) for x, y in recal_batches]
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
        self._fold_pairs = fold_pairs(self.chain) if (fold_bn and self.chain is not None) else []
        # training batches on which each cell re-estimates the BatchNorm statistics downstream of
        # the cut (pruning shifts them; without this, cells overstate the damage of pruning)
        self.recal_batches = list(recal_batches)
        self.structure = structure_of(model)
        self.round_to = int(round_to)
        self._graph = graph  # Torch-Pruning's graph over this model, for groups that are not sliced (built on first use)
        self._memo: dict[tuple, EvalSums] = {}  # (group or None, units cut, shard, shards) -> sums
        self._plans: dict[int, blockcache.BlockPlan | None] = {}
        # the cached activations of the last chunk's group (and batch share), for its next chunk
        self._held: tuple[tuple, Any, Any] | None = None
        self._team_share: tuple[tuple[int, int], list, list] | None = None

    def close(self) -> None:
        """The model back in the default memory layout (after ``channels_last``); cached activations freed."""
        self._held = None
        if self.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
            self.channels_last = False

    def team_share(self, team: Team) -> tuple[list, list]:
        """This team member's calibration and BatchNorm re-estimation batches. Re-estimation batches
        are whole (a batch's statistics depend on all its samples), as even a split as the count
        allows; calibration samples are split to even out the members' work (an image costs about
        the same forward in either), contiguously and in order, and re-batched at the batch size."""
        if self._team_share is None or self._team_share[0] != (team.index, team.size):
            parts = np.array_split(np.arange(len(self.recal_batches)), team.size)  # every member's, as even as can be
            recal = [self.recal_batches[i] for i in parts[team.index]]
            recal_n = np.array([sum(len(self.recal_batches[i][1]) for i in p) for p in parts], dtype=np.float64)
            n = sum(len(y) for _, y in self.batches)
            want = np.maximum(0.0, (n + recal_n.sum()) / team.size - recal_n)
            bounds = np.concatenate([[0], np.round(np.cumsum(want) * n / want.sum()).astype(int)])
            lo, hi = int(bounds[team.index]), int(bounds[team.index + 1])
            calib = []
            if hi > lo:
                size = len(self.batches[0][1])
                xs = torch.cat([x for x, _ in self.batches])[lo:hi]
                ys = torch.cat([y for _, y in self.batches])[lo:hi]
                fmt = nhwc if self.channels_last else (lambda t: t.contiguous())
                calib = [(fmt(xs[i:i + size]), ys[i:i + size].contiguous()) for i in range(0, hi - lo, size)]
            self._team_share = ((team.index, team.size), calib, recal)
        return self._team_share[1], self._team_share[2]

    def _idxs(self, g: GroupInfo, ratio: float) -> list[int]:
        n = g.size - n_keep(g, ratio, self.round_to)
        return self.orders[g.name][:n]

    @property
    def graph(self) -> Graph:
        if self._graph is None:
            self._graph = Graph(self.model, self.example_input, self.ignore)
        return self._graph

    def entry(self, g: GroupInfo) -> tuple[int, bool]:
        """(chain index where a cell's forward starts, whether the cache is that element's output)."""
        if self.chain is None:
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
        leaf_out = leaf_out and not (isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1) and g.kind != "heads"
        if leaf_out and g.sliceable and self.slice_channels:
            return k + 1, True
        return k, False

    def block_plan(self, gi: int) -> blockcache.BlockPlan | None:
        """Inside the block where group ``gi``'s cells start: what a cell can skip (see blockcache)."""
        if gi not in self._plans:
            g = self.groups[gi]
            k, sliced_cache = self.entry(g)
            plan = None
            if (self.chain is not None and not sliced_cache and g.sliceable and self.slice_channels
                    and g.kind in ("channels", "neurons") and all(m.unit == 1 for m in g.members)):
                name, mod = self.chain[k]
                members = {m.module: m.out for m in g.members if m.module.startswith(name + ".")}
                if members and any(True for _ in mod.children()):
                    plan = blockcache.plan_block(mod, name, members, no_unchanged_bn=bool(self.recal_batches))
            self._plans[gi] = plan
        return self._plans[gi]

    @torch.inference_mode()
    def _captured(self, plan: blockcache.BlockPlan, k: int, batches: Sequence) -> list[list[torch.Tensor]]:
        return [blockcache.capture(plan, h) for h in self._prefix(k, batches)]

    @torch.inference_mode()
    def _prefix(self, k: int, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        outs = []
        for x, _ in batches:
            for _, child in self.chain[:k]:  # type: ignore[index]
                x = child(x)
            outs.append(x)
        return outs

    def _enter(self, k: int, h: Any, keep: torch.Tensor | None, plan: blockcache.BlockPlan | None) -> tuple[int, torch.Tensor]:
        """From a cached value to the input of the chain element where the cell's forward goes on."""
        if plan is not None:  # the cut part of block k, from its cached values
            return k + 1, blockcache.run(plan, h, keep, self.channels_last)
        if keep is not None:
            h = nhwc(h.index_select(1, keep)) if self.channels_last else h.index_select(1, keep)
        return k, h

    @torch.inference_mode()
    def _suffix_sums(self, k: int, inputs: Sequence[Any], keep: torch.Tensor | None, batches: Sequence,
                     plan: blockcache.BlockPlan | None = None) -> EvalSums:
        total = EvalSums()
        for h, (_, y) in zip(inputs, batches):
            start, h = self._enter(k, h, keep, plan)
            for _, child in self.chain[start:]:  # type: ignore[index]
                h = child(h)
            total = total + batch_sums(h, y)
        return total

    @torch.inference_mode()
    def _full_sums(self, model: nn.Module, batches: Sequence) -> EvalSums:
        total = EvalSums()
        for x, y in batches:
            total = total + batch_sums(model(x), y)
        return total

    def run_chunk(
        self, chunk: Chunk, rank: int, stop_below: Callable[[EvalSums], bool] | None = None,
        between: Callable[[], None] | None = None, team: Team | None = None,
    ) -> list[CellResult]:
        """Evaluate a chunk's cells. With ``team``, every member of the team calls this with the
        same chunk: each evaluates its share of the batches and the shares are summed after each
        cell, so every member returns the whole cells' numbers."""
        g = self.groups[chunk.group]
        results: list[CellResult] = []
        k, sliced_cache = self.entry(g)
        batches, recal_batches = self.batches, self.recal_batches
        if chunk.shards > 1:
            batches = [self.batches[i] for i in np.array_split(np.arange(len(self.batches)), chunk.shards)[chunk.shard]]
            stop_below = None  # a share of the batches cannot decide an early stop
        if team is not None:
            batches, recal_batches = self.team_share(team)
        plan = self.block_plan(chunk.group)
        held_key = (chunk.group, chunk.shard, chunk.shards)
        t_prefix = t_recal_prefix = 0.0
        if self._held is not None and self._held[0] == held_key:  # the group's previous chunk computed it
            prefix, recal_prefix = self._held[1], self._held[2]
        else:
            self._held = None  # one group's activations at a time
            t_prefix = time.perf_counter()
            recal_prefix: Any = None
            if plan is not None:
                prefix: Any = self._captured(plan, k, batches)
                t_recal_prefix = time.perf_counter()
                if self.recal_batches:
                    recal_prefix = self._captured(plan, k, recal_batches)
            else:
                prefix = self._prefix(k, batches) if k > 0 else None
                t_recal_prefix = time.perf_counter()
                if k > 0 and self.recal_batches:
                    recal_prefix = self._prefix(k, recal_batches)
            t_recal_prefix = time.perf_counter() - t_recal_prefix
            t_prefix = time.perf_counter() - t_prefix
            self._held = (held_key, prefix, recal_prefix)
        n_team = team.size if team is not None else 1

        def result(r: int, sums: EvalSums, t0: float, recal_s: float = 0.0) -> CellResult:
            first = not results
            return CellResult(chunk.group, r, DONE, sums.as_tuple(), time.perf_counter() - t0, rank, chunk.shard,
                              chunk.shards, t_prefix if first else 0.0, recal_s, t_recal_prefix if first else 0.0, n_team)

        stopped = False
        for r in chunk.ratios:
            if stopped:
                results.append(CellResult(chunk.group, r, SKIPPED, (math.nan,) * 3, 0.0, rank, team=n_team))
                continue
            t0 = time.perf_counter()
            idxs = self._idxs(g, self.ratios[r])
            keep_t = None
            # cells that cut the same units (grid ratios that round to the same count: a block at
            # every ratio >= 0.5, 3 KV heads at 0.4 and 0.55) are the same model: evaluated once
            # per batch shard. Cells that cut nothing are the dense model, shared by all groups
            # unless BatchNorm re-estimation (which depends on where the group sits) is on.
            # A team's sums are the whole cell's.
            memo_key = (chunk.group, len(idxs), chunk.shard, chunk.shards)
            if not idxs:
                shared = not (self.recal_batches and self._suffix_bns(k))
                memo_key = (None, 0, chunk.shard, chunk.shards) if shared else memo_key
            if memo_key in self._memo:
                sums = self._memo[memo_key]
                results.append(result(r, sums, t0))
                if stop_below is not None and stop_below(sums):
                    stopped = True
                continue
            if g.kind == "block":
                cut = skip_block(self.model, g, self.structure) if idxs else Slice()
            elif g.sliceable and self.slice_channels:
                drop = set(idxs)
                keep = [i for i in range(g.size) if i not in drop]
                cut: Any = slice_group(self.modules, g, keep)
                if sliced_cache or plan is not None:
                    keep_t = torch.as_tensor(keep, dtype=torch.long, device=self.batches[0][0].device)
            else:
                cut = self.graph.cut(g.name, idxs)
            recal = self.recal_batches and not (g.kind == "block" and not idxs) and self._suffix_bns(k)
            t_recal = time.perf_counter()
            bn_saved = self._recalibrate(k, recal_prefix, keep_t, plan, recal_batches, team) if recal else None
            t_recal = time.perf_counter() - t_recal
            folded = None
            try:
                folded = self._fold(k, plan is None) if self._fold_pairs else None
                if prefix is not None:
                    sums = self._suffix_sums(k, prefix, keep_t, batches, plan)
                else:
                    sums = self._full_sums(self.model, batches)
            finally:
                if folded:
                    self._unfold(folded)
                if bn_saved is not None:
                    for bn, (mean, var, momentum, tracked) in bn_saved:
                        bn.running_mean, bn.running_var, bn.momentum = mean, var, momentum
                        bn.num_batches_tracked.copy_(tracked)
                cut.restore()
            if team is not None:
                sums = EvalSums(*(float(v) for v in team.sum(np.array(sums.as_tuple()))))
            self._memo[memo_key] = sums
            results.append(result(r, sums, t0, t_recal))
            if stop_below is not None and stop_below(sums):
                stopped = True
            if between is not None:
                between()
        return results

    @torch.no_grad()
    def _fold(self, k: int, whole_k: bool) -> list:
        """Fold the BatchNorms of chain elements after ``k`` (and in ``k`` when the cell runs all of
        it, not from an in-block cache) into their convolutions (what ``_unfold`` undoes):
        W' = W * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta."""
        saved = []
        for i, conv, bn in self._fold_pairs:
            if i < k or (i == k and not whole_k):
                continue
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            w = conv.weight.data
            new_w = w * scale.view(-1, *([1] * (w.dim() - 1))).to(w.dtype)
            if w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
                new_w = new_w.contiguous(memory_format=torch.channels_last)
            b = conv.bias.data if conv.bias is not None else None
            saved.append((conv, bn, w, b))
            conv.weight.data = new_w
            if b is not None:
                conv.bias.data = b * scale + shift
            else:
                conv.bias = nn.Parameter(shift.to(w.dtype), requires_grad=False)
            bn.forward = _identity
        return saved

    @staticmethod
    def _unfold(saved: list) -> None:
        for conv, bn, w, b in reversed(saved):
            conv.weight.data = w
            if b is None:
                conv.bias = None
            else:
                conv.bias.data = b
            del bn.forward

    def _suffix_bns(self, k: int) -> list[nn.Module]:
        """BatchNorms after the cut point that keep running statistics (those without use batch
        statistics in eval too: nothing to re-estimate)."""
        roots = [m for _, m in self.chain[k:]] if (self.chain is not None and k > 0) else [self.model]
        return [m for r in roots for m in r.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]

    @torch.no_grad()
    def _recalibrate(self, k: int, recal_prefix: Sequence[Any] | None, keep: torch.Tensor | None,
                     plan: blockcache.BlockPlan | None = None, recal_batches: Sequence | None = None,
                     team: Team | None = None) -> list:
        """Re-estimate the BatchNorm statistics after the cut point on the recalibration batches
        (cumulative average); returns what ``run_chunk`` restores afterwards. In a team each member
        averages its share of the batches, and the team combines the averages, weighted by batches."""
        bns = self._suffix_bns(k)
        saved = [(bn, (bn.running_mean, bn.running_var, bn.momentum, bn.num_batches_tracked.clone())) for bn in bns]
        for bn in bns:
            bn.running_mean = torch.zeros_like(bn.running_mean)
            bn.running_var = torch.ones_like(bn.running_var)
            bn.num_batches_tracked.zero_()
            bn.momentum = None
            bn.train()
        try:
            if recal_prefix is not None:
                for h in recal_prefix:
                    start, h = self._enter(k, h, keep, plan)
                    for _, child in self.chain[start:]:  # type: ignore[index]
                        h = child(h)
            else:
                for x, _ in (self.recal_batches if recal_batches is None else recal_batches):
                    self.model(x)
        finally:
            for bn in bns:
                bn.eval()
        if team is not None:
            _combine_bn_stats(bns, team)
        return saved

    def chunk_cost(self, chunk: Chunk, module_macs: dict[str, int] | None) -> float:
        """Relative cost: forward MACs before the cache point once, after it once per distinct cell
        (ratios that cut the same number of units are one evaluation; cutting nothing is the dense
        model, nearly free). A block's 9 ratios are 2 evaluations: such a chunk is not worth splitting."""
        g = self.groups[chunk.group]
        cuts = {len(self._idxs(g, self.ratios[r])) for r in chunk.ratios}
        evals = len(cuts - {0}) + (0.1 if 0 in cuts else 0.0)
        k, _ = self.entry(g)
        if module_macs is None or self.chain is None:
            return evals / chunk.shards
        per = [sum(v for n, v in module_macs.items() if n == name or n.startswith(name + ".")) for name, _ in self.chain]
        total = sum(per) or 1.0
        suffix = sum(per[k:]) / total
        return ((1.0 - suffix) + suffix * evals) / chunk.shards


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


def _combine_bn_stats(bns: Sequence[nn.Module], team: Team) -> None:
    """Every member's BatchNorm averages over its share of batches -> the average over all batches."""
    if not bns:
        return
    n = torch.stack([bn.num_batches_tracked.double() for bn in bns])
    parts = [n] + [t for bn, nb in zip(bns, n) for t in (bn.running_mean.double().ravel() * nb, bn.running_var.double().ravel() * nb)]
    total = team.sum(torch.cat(parts).cpu().numpy())  # one copy off the device
    counts, pos = total[: len(bns)], len(bns)
    for bn, count in zip(bns, counts):
        c = bn.running_mean.numel()
        mean, var = total[pos: pos + c], total[pos + c: pos + 2 * c]
        pos += 2 * c
        if count == 0:  # not reached by any batch (a skipped block's): as on one rank, left reset
            continue
        mean, var = mean / count, var / count
        bn.running_mean = torch.as_tensor(mean, dtype=bn.running_mean.dtype).to(bn.running_mean.device).view_as(bn.running_mean)
        bn.running_var = torch.as_tensor(var, dtype=bn.running_var.dtype).to(bn.running_var.device).view_as(bn.running_var)
        bn.num_batches_tracked.fill_(int(count))


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


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """A 4-D tensor in channels-last layout (others unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


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


def make_teams(world: World, size: int) -> Team | None:
    """This rank's team (``team_ranks``); None on rank 0."""
    from mpi4py import MPI

    index = -1
    if world.rank > 0:
        index = next(i for i, part in enumerate(team_ranks(world.size, size)) if world.rank in part)
    comm = world.comm.Split(index if index >= 0 else MPI.UNDEFINED, world.rank)
    if index < 0:
        return None
    return Team(comm, comm.Get_rank(), comm.Get_size())


def run_sensitivity(
    world: World,
    evaluator: Evaluator,
    pending: np.ndarray,
    module_macs: dict[str, int] | None,
    on_results: Callable[[list[CellResult]], None] | None = None,
    stop_below: Callable[[float], bool] | None = None,
    progress: Any = None,
    team_setting: Any = "auto",
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
    n_samples = sum(len(y) for _, y in evaluator.batches)
    recal_batch = max((len(y) for _, y in evaluator.recal_batches), default=0)
    t = team_size(world.size, int(pending.any(axis=1).sum()), n_samples, team_setting,
                  len(evaluator.recal_batches), recal_batch)
    team = make_teams(world, t) if t > 1 else None
    if world.rank == 0:
        gather = Gather()

        def report(res: list[CellResult]) -> None:  # complete cells only: shards are combined first
            done = gather.add(res)
            if progress is not None:
                progress.update(len(done))
            if on_results is not None and done:
                on_results(done)

        return Gather().add(_master(world, evaluator, pending, module_macs, report, stop_below, t))
    if team is not None and team.index > 0:
        _member(evaluator, team, world.rank, stop_below)
    else:
        _worker(world, evaluator, stop_below, team)
    if team is not None:  # (after an error the abort ends every rank: no collective free then)
        team.comm.Free()
    return []


def _master(world, evaluator, pending, module_macs, on_results, stop_below, team: int = 1) -> list[CellResult]:
    """Rank 0: hands out chunks to the workers (with teams: to the team leaders, and works on none)."""
    from mpi4py import MPI

    comm = world.comm
    if team > 1:
        clients = [int(part[0]) for part in team_ranks(world.size, team)]
        chunks = make_chunks(pending, len(clients), 1, lambda g, rs: evaluator.chunk_cost(Chunk(g, rs), module_macs))
    else:
        clients = list(range(1, world.size))
        chunks = make_chunks(pending, world.size, len(evaluator.batches),
                             lambda g, rs: evaluator.chunk_cost(Chunk(g, rs), module_macs))
    for ch in chunks:
        ch.cost = evaluator.chunk_cost(ch, module_macs)
    queue = Dispatcher(chunks)
    results: list[CellResult] = []
    in_flight = {r: 0 for r in clients}  # chunks a worker holds and has not returned

    def reply(rank: int) -> None:
        chunk = queue.next(rank)  # None: nothing more for this request
        comm.send(chunk, dest=rank, tag=_TAG_WORK)
        if chunk is not None:
            in_flight[rank] += 1

    def take(res: list[CellResult]) -> None:
        for c in list(res):  # early stop: a group's chunks above a cell past the floor are not needed
            if stop_below is not None and c.status == DONE and c.shards == 1 and stop_below(EvalSums(*c.sums)):
                res += [CellResult(d.group, r, SKIPPED, (math.nan,) * 3, 0.0, 0)
                        for d in queue.drop_above(c.group, c.ratio) for r in d.ratios]
        results.extend(res)
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
        for r in clients:
            reply(r)
    while queue and team == 1:
        serve()
        if not queue:  # serving may have handed out the last chunk
            break
        take(evaluator.run_chunk(queue.next(0), 0, stop_below, between=serve))
    while any(in_flight.values()):  # drain without busy-waiting
        if not serve():
            time.sleep(0.002)
    return results


def _worker(world: World, evaluator: Evaluator, stop_below, team: Team | None = None) -> None:
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


def _member(evaluator: Evaluator, team: Team, rank: int, stop_below) -> None:
    """A team member: evaluates its share of each chunk its leader starts, until the leader ends."""
    while True:
        while not team.comm.Iprobe(source=0, tag=_TAG_TEAM):
            time.sleep(0.0005)
        chunk = team.comm.recv(source=0, tag=_TAG_TEAM)
        if chunk is None:
            return
        evaluator.run_chunk(chunk, rank, stop_below, team=team)
