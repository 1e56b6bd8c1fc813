"""Cell evaluation: one rank's model, a chunk's cells one after another, with its caches.

A cell prunes one group at one ratio (least important channels first) and evaluates the model on
the fixed calibration batches, by cutting the group's channels in place and restoring them
afterwards (no deep copy, no re-trace). For a model that is a chain of blocks (an
``nn.Sequential``, or a forward that applies its children one after another: most CNNs, see
:func:`flatten_chain`) the activations entering the first block a group touches are the same for
every ratio of that group: they are computed once per group and only the rest of the network runs
per ratio.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .. import blockcache, compensate, metrics
from ..graph import Graph, GroupInfo, Slice, _first_line, n_keep, skip_block, slice_group
from ..metrics import EvalSums, batch_sums
from ..structure import structure_of
from . import bn
from .early_stop import StopRule, skipped, stops
from .records import DONE, CellResult, Chunk

from .split import Team, shard_batches, team_share

log = logging.getLogger("hpcprune.stages")
# what a cell's damage is measured by (``sensitivity.damage``): the task loss against the labels, or the
# KL divergence from the dense model's predictions (the loss is recorded either way)
DAMAGES = ("loss", "kl")


def flatten_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model as a chain of (name, module), nested ``nn.Sequential``s expanded; None when the
    model is not a chain (then every cell runs the full forward), or when one module object runs at
    two places of it (``named_children`` lists it once: a chain without its second use would
    compute another model).

    A model that is not an ``nn.Sequential`` is a chain when its own forward, traced with
    ``torch.fx`` down to its direct children, applies them one after another, each to the previous
    one's output only, with functions between them (``torch.flatten(x, 1)``, ``F.relu``): torchvision's
    ResNets, VGGs, EfficientNets, MobileNets, DenseNets and most CNNs users write. A function becomes
    a :class:`_Step` element named ``<node>``. :class:`Evaluator` checks such a chain against the
    model's own forward before using it.

    A model may declare its chain: ``model.prune_chain()`` returning the (name, module) elements,
    each applied to the previous one's output (a stem that reads the model's own parameters, as a
    ViT's class token, can be one element); it is checked the same way. hpcprune's torchvision ViTs
    declare one (:func:`hpcprune.zoo.vision.vit_chain`)."""
    declared = getattr(model, "prune_chain", None)
    if callable(declared):
        try:
            chain = list(declared())
            if not chain or not all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str)
                                    and isinstance(e[1], nn.Module) for e in chain):
                raise TypeError("it must return a non-empty list of (name, nn.Module) pairs")
        except Exception as e:  # noqa: BLE001 - a declaration that fails: the whole forward, said once
            _warn_once(model, f"{type(model).__name__}.prune_chain() is not used ({type(e).__name__}: {_first_line(e)}): "
                              "every cell runs the whole forward")
            return None
        return chain
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return _traced_chain(model)
    chain: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    try:
        _walk("", model, chain, seen)
    except _Reused:
        return None
    return chain


def _walk(prefix: str, seq: nn.Sequential, chain: list[tuple[str, nn.Module]], seen: set[int]) -> None:
    for name, child in seq._modules.items():  # every position, a module used twice included
        if child is None or id(child) in seen:
            raise _Reused
        seen.add(id(child))
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward:
            _walk(full + ".", child, chain, seen)
        else:
            chain.append((full, child))


class _ChildrenAsLeaves(fx.Tracer):
    """Traces a model's own forward only: every submodule is a leaf (one ``call_module`` node)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


# tensor methods and functions whose integer arguments are sizes (not dimensions)
_SIZE_OPS = {"view", "reshape", "expand", "repeat", "tile", "unflatten", "narrow", "split", "chunk", "new_zeros",
             "new_ones", "new_empty", "new_full", "resize_", "as_strided", "unfold"}


# ... and those whose integer arguments are dimensions (or output sizes of 1)
_DIM_OPS = {"flatten", "mean", "sum", "amax", "amin", "max", "min", "permute", "transpose", "squeeze", "unsqueeze",
            "softmax", "log_softmax", "movedim", "swapaxes", "std", "var", "logsumexp", "argmax", "contiguous",
            "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d", "relu", "gelu",
            "silu", "sigmoid", "tanh", "hardswish", "dropout", "float", "to"}


def _sized(node: fx.Node, widths: set[int]) -> bool:
    """Whether a function between children has an integer argument a cut may change: one equal to
    an integer attribute of a layer (``x.view(-1, self.fc.in_features)`` traces to the number 16,
    while the model's own forward reads the attribute again after a cut), or any size of 2 or more
    passed to a reshaping op. Such a model is no chain (its cells run the whole forward)."""
    ints: list[int] = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: ints.append(a) if type(a) is int else None)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in _DIM_OPS:  # its integers are dimensions
        return False
    return any(abs(v) in widths for v in ints) or (name in _SIZE_OPS and any(abs(v) >= 2 for v in ints))


class _Step(nn.Module):
    """A function or tensor method the model's own forward applies between two of its children
    (``torch.flatten(x, 1)``), with its constant arguments; ``forward(x)`` puts ``x`` where the
    previous child's output went."""

    def __init__(self, node: fx.Node) -> None:
        super().__init__()
        self.op, self.target = node.op, node.target
        self.args_, self.kwargs_ = node.args, dict(node.kwargs)

    def forward(self, x: Any) -> Any:
        args, kwargs = fx.node.map_arg((self.args_, self.kwargs_), lambda n: x)
        if self.op == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.op} {getattr(self.target, '__name__', self.target)}"


def _traced_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The chain of a model whose own forward is a straight line over its children (see
    :func:`flatten_chain`), or None: the trace fails (control flow on values, several inputs), a
    value is used twice (a skip connection), a parameter or buffer of the model itself is read
    (a class token), a child runs twice, or the output is not the last value."""
    modes = [(m, m.training) for m in model.modules()]
    attrs = [(m, dict(vars(m))) for m in model.modules()]
    try:
        model.eval()  # the path a cell runs (an auxiliary head taken in training only is not on it)
        graph = _ChildrenAsLeaves().trace(model)
    except Exception:  # noqa: BLE001 - not traceable: no chain, every cell runs the whole forward
        return None
    finally:  # what the forward set on the modules while traced (self.feat = Proxy) and their modes, back
        for m, before in attrs:
            for key in [k for k, v in vars(m).items() if k not in before or before[k] is not v]:
                if key in before:
                    m.__dict__[key] = before[key]
                else:
                    del m.__dict__[key]
        for m, mode in modes:
            m.training = mode
    nodes = list(graph.nodes)
    if not nodes or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    widths = {v for m in model.modules() for v in vars(m).values() if type(v) is int and v >= 2}
    chain: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    prev = nodes[0]
    for n in nodes[1:-1]:
        inputs = set(n.all_input_nodes)
        if n.op not in ("call_module", "call_function", "call_method") or inputs != {prev} or len(prev.users) != 1:
            return None
        if n.op == "call_module":
            child = model.get_submodule(str(n.target))
            try:
                if isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward:
                    if id(child) in seen:
                        raise _Reused
                    seen.add(id(child))
                    _walk(str(n.target) + ".", child, chain, seen)
                else:
                    if id(child) in seen:
                        raise _Reused
                    seen.add(id(child))
                    chain.append((str(n.target), child))
            except _Reused:
                return None
        else:
            if _sized(n, widths):
                return None
            chain.append((f"<{n.name}>", _Step(n)))
        prev = n
    out = nodes[-1]
    if out.args != (prev,) or len(prev.users) != 1 or not any(not isinstance(m, _Step) for _, m in chain):
        return None
    return chain


@torch.inference_mode()
def _called_once(model: nn.Module, x: Any, modules: Sequence[nn.Module]) -> set[int]:
    """ids of ``modules`` the model's forward on ``x`` calls exactly once (forward hooks, one
    forward): a module run at two places (a shared convolution) is not."""
    calls: dict[int, int] = {id(m): 0 for m in modules}

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        calls[id(mod)] += 1

    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in modules}.values()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return {i for i, n in calls.items() if n == 1}


def first_element(chain: Sequence[tuple[str, nn.Module]], modules: Sequence[str]) -> int:
    """The index of the first chain element that holds one of ``modules`` (qualified names), 0 when
    one of them is in none (a parameter of the model itself, a layer the forward does not reach)."""
    at = []
    for m in modules:
        k = element_of(chain, m)
        if k is None:
            return 0
        at.append(k)
    return min(at, default=0)


def element_of(chain: Sequence[tuple[str, nn.Module]], module: str) -> int | None:
    """The index of the chain element that holds ``module`` (a qualified name), None when none does."""
    return next((i for i, (name, _) in enumerate(chain) if module == name or module.startswith(name + ".")), None)


def chain_of(model: nn.Module, x: Any) -> list[tuple[str, nn.Module]] | None:
    """:func:`flatten_chain`, a traced chain (not an ``nn.Sequential``) only where it computes the
    model's own output on ``x`` exactly (:func:`_checked_chain`)."""
    chain = flatten_chain(model)
    if chain is not None and not isinstance(model, nn.Sequential):
        chain = _checked_chain(model, chain, x)
    return chain


@torch.inference_mode()
def _checked_chain(model: nn.Module, chain: list[tuple[str, nn.Module]], x: Any) -> list[tuple[str, nn.Module]] | None:
    """``chain`` when running its elements one after another on ``x`` gives exactly the model's own
    output (every tensor equal), else None (cells then run the model's forward)."""
    try:
        want = model(x)
        h = x
        for _, element in chain:
            h = element(h)
        a, spec_a = pytree.tree_flatten(want)
        b, spec_b = pytree.tree_flatten(h)
        same = spec_a == spec_b and all(
            torch.equal(u, v) if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) else u == v
            for u, v in zip(a, b))
    except Exception as e:  # noqa: BLE001 - no chain: cells run the model's own forward
        log.debug("sensitivity: the traced chain of %s fails (%s: %s)", type(model).__name__, type(e).__name__, e)
        why = f"its elements fail on the example input ({type(e).__name__}: {_first_line(e)})"
        same = False
    else:
        why = "its elements, one after another, compute another output than the model's forward"
    if not same:
        log.debug("sensitivity: the traced chain of %s computes another output; cells run its forward", type(model).__name__)
        if callable(getattr(model, "prune_chain", None)):
            _warn_once(model, f"{type(model).__name__}.prune_chain() is not used: {why}; every cell runs the whole forward")
        return None
    return chain


_warned: set[str] = set()


def _warn_once(model: nn.Module, text: str) -> None:
    """``text`` as a warning, once per process for each model class and text."""
    key = f"{type(model).__qualname__}:{text}"
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", text)


class _Reused(Exception):
    """A module at two places of a Sequential chain (or a None slot)."""


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """A 4-D tensor in channels-last layout (others unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@dataclass
class _ChunkRun:
    """What every cell of one chunk shares: the group, where its cells' forward starts (chain index
    ``k``; ``sliced_cache``: the cache is element ``k - 1``'s output, sliced per cell; ``plan``: in
    block ``k``, from its captured values), this rank's batches, their cached activations and the
    seconds computing those took."""

    chunk: Chunk
    group: GroupInfo
    k: int
    sliced_cache: bool
    plan: blockcache.BlockPlan | None
    batches: Sequence
    recal_batches: Sequence
    prefix: Any
    recal_prefix: Any
    t_prefix: float
    t_recal_prefix: float
    rank: int
    team: Team | None


def _runs_channels_last(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` runs on NHWC tensors (``sensitivity.channels_last``): a forward that flattens
    with ``.view`` (``x.view(x.size(0), -1)``) fails on a channels-last tensor. A model that does not
    runs the cells in its own layout: same numbers (the key is result-neutral), one warning line."""
    if x.dim() != 4:
        return True
    try:
        with torch.no_grad():
            model.to(memory_format=torch.channels_last)(nhwc(x[:1]))
        return True
    except RuntimeError as e:
        log.warning("sensitivity: the model fails on channels-last tensors (%s: %s); its cells run in the default "
                    "layout (sensitivity.channels_last=false says so and skips this check)",
                    type(e).__name__, str(e).strip().splitlines()[0][:160])
        return False
    finally:
        model.to(memory_format=torch.contiguous_format)


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
    cell runs after a convolution it runs into that convolution (``bn.fold_pairs``; not inside a block
    the cell starts from cached values), and skip the BatchNorm: one pass over the activations less
    per pair; numbers agree to rounding (~1e-7).

    ``damage``: what a cell's damage is measured by (``sensitivity.damage``; :data:`DAMAGES`):
    ``"loss"``, the task loss against the labels; ``"kl"``, also the KL divergence from the dense
    model's predictions on the same batches (``EvalSums.kl``; :func:`hpcprune.metrics.kl_sums`,
    coarsened to the dense model's ``kl_topk`` most likely classes or tokens and the rest; the
    dense predictions are computed once here).

    ``compensation``: per group name, a :class:`hpcprune.compensate.Target`: each cell of that group
    adds the compensation of its cut to the consumer's bias (computed from the dense weights before
    the cut) and takes it away after (``prune.bias_compensation``).
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
        compensation: dict[str, Any] | None = None,
        damage: str = "loss",
        kl_topk: int = 64,
    ) -> None:
        if damage not in DAMAGES:
            raise ValueError(f"sensitivity.damage={damage!r}: choose from {list(DAMAGES)}")
        self.damage = damage
        if damage == "kl":  # the dense model's predictions ride along with the labels
            model.eval()
            with torch.inference_mode():
                batches = [(x, metrics.reference_targets(model(x), y, kl_topk)) for x, y in batches]
        self.channels_last = channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()) \
            and _runs_channels_last(model, batches[0][0] if batches else example_input)
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
        self.chain = chain_of(model, batches[0][0] if batches else example_input) if cache_prefix else None
        self._fold_pairs = bn.fold_pairs(self.chain) if (fold_bn and self.chain is not None) else []
        if self._fold_pairs:  # a convolution (or BatchNorm) that also runs elsewhere cannot carry the fold
            once = _called_once(model, batches[0][0] if batches else example_input,
                                [m for _, conv, b in self._fold_pairs for m in (conv, b)])
            self._fold_pairs = [p for p in self._fold_pairs if id(p[1]) in once and id(p[2]) in once]
        # training batches on which each cell re-estimates the BatchNorm statistics downstream of
        # the cut (pruning shifts them; without this, cells overstate the damage of pruning)
        self.recal_batches = list(recal_batches)
        self.structure = structure_of(model)
        self.round_to = int(round_to)
        self.compensation = dict(compensation or {})
        self._graph = graph  # Torch-Pruning's graph over this model, for groups that are not sliced (built on first use)
        self._memo: dict[tuple, EvalSums] = {}  # (group or None, units cut, shard, shards) -> sums
        self._plans: dict[int, blockcache.BlockPlan | None] = {}
        # the cached activations of the last chunk's group (and batch share), for its next chunk
        self._held: tuple[tuple, Any, Any] | None = None
        # (the batches' inputs, chain index k, the dense activations entering element k): where the next
        # group's prefix goes on from, for the calibration and the re-estimation batches
        self._cursor: list[tuple[list, int, list]] = []
        self._team_share: tuple[tuple[int, int], list, list] | None = None

    def close(self) -> None:
        """The model back in the default memory layout (after ``channels_last``); cached activations freed."""
        self._held = None
        self._cursor = []
        if self.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
            self.channels_last = False

    def team_share(self, team: Team) -> tuple[list, list]:
        """This team member's calibration and BatchNorm re-estimation batches (``split.team_share``,
        computed once per team)."""
        if self._team_share is None or self._team_share[0] != (team.index, team.size):
            fmt = nhwc if self.channels_last else (lambda t: t.contiguous())
            calib, recal = team_share(self.batches, self.recal_batches, team.index, team.size, fmt)
            self._team_share = ((team.index, team.size), calib, recal)
        return self._team_share[1], self._team_share[2]

    def share(self, chunk: Chunk, team: Team | None) -> tuple[Sequence, Sequence]:
        """The calibration and re-estimation batches this rank evaluates of ``chunk``'s cells: a team
        member's share (``team_share``), a shard's batches (``shard_batches``), or all."""
        if team is not None:
            return self.team_share(team)
        if chunk.shards > 1:
            return shard_batches(self.batches, chunk.shard, chunk.shards), self.recal_batches
        return self.batches, self.recal_batches

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
        if g.kind == "block" and any(name == g.block or name.startswith(g.block + ".") for name, _ in self.chain):
            # skipping replaces the module in its parent, not in the chain: run the model's own forward
            # (a block group lists no members today, so it starts at 0 below anyway; this keeps it so)
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

    # ---- a chunk --------------------------------------------------------------------------------
    def run_chunk(
        self, chunk: Chunk, rank: int, stop_below: StopRule | None = None,
        between: Callable[[], None] | None = None, team: Team | None = None,
    ) -> list[CellResult]:
        """Evaluate a chunk's cells, in ratio order, until one ``stops`` the group (the rest are
        ``skipped``). With ``team``, every member of the team calls this with the same chunk: each
        evaluates its share of the batches and the shares are summed after each cell, so every
        member returns the whole cells' numbers. ``between()`` runs after each cell computed (not
        after one taken from the memo): rank 0 serves the workers there."""
        run = self._start(chunk, rank, team)
        results: list[CellResult] = []
        for i, r in enumerate(chunk.ratios):
            cell, computed = self._cell(run, r, first=not results)
            results.append(cell)
            if computed and between is not None:
                between()
            if stops(stop_below, cell):
                results += skipped(chunk.group, chunk.ratios[i + 1:], rank, cell.team)
                break
        return results

    def _start(self, chunk: Chunk, rank: int, team: Team | None) -> _ChunkRun:
        g = self.groups[chunk.group]
        k, sliced_cache = self.entry(g)
        batches, recal_batches = self.share(chunk, team)
        plan = self.block_plan(chunk.group)
        held_key = (chunk.group, chunk.shard, chunk.shards)
        if self._held is not None and self._held[0] == held_key:  # the group's previous chunk computed it
            prefix, recal_prefix, t_prefix, t_recal_prefix = self._held[1], self._held[2], 0.0, 0.0
        else:
            self._held = None  # one group's activations at a time
            prefix, recal_prefix, t_prefix, t_recal_prefix = self._prefixes(k, plan, batches, recal_batches)
            self._held = (held_key, prefix, recal_prefix)
        return _ChunkRun(chunk, g, k, sliced_cache, plan, batches, recal_batches, prefix, recal_prefix,
                         t_prefix, t_recal_prefix, rank, team)

    def _prefixes(self, k: int, plan: blockcache.BlockPlan | None, batches: Sequence,
                  recal_batches: Sequence) -> tuple[Any, Any, float, float]:
        """(cached activations of the calibration batches, of the re-estimation batches (None: cells
        run the whole model), seconds computing both, of which the re-estimation batches')."""
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
        return prefix, recal_prefix, t_prefix, t_recal_prefix

    def _cell(self, run: _ChunkRun, r: int, first: bool) -> tuple[CellResult, bool]:
        """Cell (group, ratio ``r``) and whether it was computed (else taken from the memo)."""
        t0 = time.perf_counter()
        idxs = self._idxs(run.group, self.ratios[r])
        key = self._memo_key(run, idxs)
        computed = key not in self._memo
        t_recal = 0.0
        if computed:
            self._memo[key], t_recal = self._evaluate(run, idxs)
        sums = self._memo[key]
        chunk = run.chunk
        return CellResult(chunk.group, r, DONE, sums.as_tuple(), time.perf_counter() - t0, run.rank, chunk.shard,
                          chunk.shards, run.t_prefix if first else 0.0, t_recal, run.t_recal_prefix if first else 0.0,
                          run.team.size if run.team is not None else 1), computed

    def _memo_key(self, run: _ChunkRun, idxs: list[int]) -> tuple:
        # cells that cut the same units (grid ratios that round to the same count: a block at
        # every ratio >= 0.5, 3 KV heads at 0.4 and 0.55) are the same model: evaluated once
        # per batch shard. Cells that cut nothing are the dense model, shared by all groups
        # unless BatchNorm re-estimation (which depends on where the group sits) is on.
        # A team's sums are the whole cell's.
        chunk = run.chunk
        if not idxs and not (self.recal_batches and self._suffix_bns(run.k)):
            return (None, 0, chunk.shard, chunk.shards)
        return (chunk.group, len(idxs), chunk.shard, chunk.shards)

    def _evaluate(self, run: _ChunkRun, idxs: list[int]) -> tuple[EvalSums, float]:
        """Cut ``idxs`` out of the group, re-estimate the BatchNorms after the cut, fold, evaluate,
        put everything back: (the cell's sums, whole with a team; seconds of the re-estimation)."""
        g, k = run.group, run.k
        target = self.compensation.get(g.name) if idxs else None
        shift = compensate.vector(self.modules[target.consumer], target, idxs) if target is not None else None
        cut, keep_t = self._cut(run, idxs)
        added = compensate.add(self.modules[target.consumer], shift) if target is not None else compensate.Added()
        recal = self.recal_batches and not (g.kind == "block" and not idxs) and self._suffix_bns(k)
        t_recal = time.perf_counter()
        bn_saved = self._recalibrate(run, keep_t) if recal else None
        t_recal = time.perf_counter() - t_recal
        folded = None
        try:
            folded = bn.fold(self._fold_pairs, k, run.plan is None) if self._fold_pairs else None
            if run.prefix is not None:
                sums = self._suffix_sums(k, run.prefix, keep_t, run.batches, run.plan)
            else:
                sums = self._full_sums(self.model, run.batches)
        finally:
            if folded:
                bn.unfold(folded)
            if bn_saved is not None:
                bn.restore(bn_saved)
            added.restore()
            cut.restore()
        if run.team is not None:
            sums = EvalSums(*(float(v) for v in run.team.sum(np.array(sums.as_tuple()))))
        return sums, t_recal

    def _cut(self, run: _ChunkRun, idxs: list[int]) -> tuple[Any, torch.Tensor | None]:
        """The group without ``idxs``, in place (``.restore()`` undoes it), and the kept channels as
        a tensor where the cell starts from cached values that hold them all (else None)."""
        g = run.group
        if g.kind == "block":
            return (skip_block(self.model, g, self.structure) if idxs else Slice()), None
        if g.sliceable and self.slice_channels:
            drop = set(idxs)
            keep = [i for i in range(g.size) if i not in drop]
            cut = slice_group(self.modules, g, keep)
            keep_t = None
            if run.sliced_cache or run.plan is not None:
                keep_t = torch.as_tensor(keep, dtype=torch.long, device=self.batches[0][0].device)
            return cut, keep_t
        return self.graph.cut(g.name, idxs), None

    # ---- forward passes -------------------------------------------------------------------------
    @torch.inference_mode()
    def _captured(self, plan: blockcache.BlockPlan, k: int, batches: Sequence) -> list[list[torch.Tensor]]:
        # a copy: the block's own forward may write into its input (an in-place activation), and the
        # input is the prefix the next group goes on from
        return [blockcache.capture(plan, h.clone(memory_format=torch.preserve_format)) for h in self._prefix(k, batches)]

    @torch.inference_mode()
    def _prefix(self, k: int, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """What enters chain element ``k`` for each batch (the dense model's activations). Continues
        from the last prefix computed on the same batches where that one ends at or before ``k``
        (chunks come most expensive first, so mostly in chain order): over a chain of G groups the
        prefixes cost about one forward, not G / 2."""
        xs = [x for x, _ in batches]
        at = next((i for i, (ys, _, _) in enumerate(self._cursor)
                   if len(ys) == len(xs) and all(a is b for a, b in zip(ys, xs))), None)
        start, outs = (0, xs) if at is None else self._cursor.pop(at)[1:]
        if start > k:
            start, outs = 0, xs
        outs = list(outs)
        for i in range(len(outs)):
            h = outs[i]
            for _, child in self.chain[start:k]:  # type: ignore[index]
                h = child(h)
            outs[i] = h
        # the calibration and the re-estimation batches' positions (their inputs held: no id reuse)
        self._cursor = self._cursor[-1:] + [(xs, k, outs)]
        return outs

    def _enter(self, k: int, h: Any, keep: torch.Tensor | None, plan: blockcache.BlockPlan | None) -> tuple[int, torch.Tensor]:
        """From a cached value to the input of the chain element where the cell's forward goes on."""
        if plan is not None:  # the cut part of block k, from its cached values
            return k + 1, blockcache.run(plan, h, keep, self.channels_last)
        if keep is not None:  # the cached output of element k - 1, a leaf layer: its channels' axis
            dim = h.dim() - 1 if isinstance(self.chain[k - 1][1], nn.Linear) else 1  # type: ignore[index]
            h = nhwc(h.index_select(dim, keep)) if self.channels_last else h.index_select(dim, keep)
        elif isinstance(h, torch.Tensor):  # the element may write into its input (x += f(x), an in-place
            h = h.clone(memory_format=torch.preserve_format)  # activation): the cache serves every cell and the next group
        return k, h

    def _from_cache(self, k: int, h: Any, keep: torch.Tensor | None, plan: blockcache.BlockPlan | None) -> torch.Tensor:
        """The model's output from a cached value."""
        start, h = self._enter(k, h, keep, plan)
        for _, child in self.chain[start:]:  # type: ignore[index]
            h = child(h)
        return h

    @torch.inference_mode()
    def _suffix_sums(self, k: int, inputs: Sequence[Any], keep: torch.Tensor | None, batches: Sequence,
                     plan: blockcache.BlockPlan | None = None) -> EvalSums:
        total = EvalSums()
        for h, (_, y) in zip(inputs, batches):
            total = total + self._sums(self._from_cache(k, h, keep, plan), y)
        return total

    @torch.inference_mode()
    def _full_sums(self, model: nn.Module, batches: Sequence) -> EvalSums:
        total = EvalSums()
        for x, y in batches:
            total = total + self._sums(model(x), y)
        return total

    def _sums(self, out: Any, y: torch.Tensor) -> EvalSums:
        return metrics.kl_sums(out, y) if self.damage == "kl" else batch_sums(out, y)

    def dense_sums(self) -> EvalSums:
        """The dense model's sums on all the calibration batches (its KL is 0 by definition)."""
        return self._full_sums(self.model, self.batches)

    # ---- BatchNorm ------------------------------------------------------------------------------
    def _suffix_bns(self, k: int) -> list[nn.Module]:
        """BatchNorms after the cut point that keep running statistics."""
        roots = [m for _, m in self.chain[k:]] if (self.chain is not None and k > 0) else [self.model]
        return bn.running_bns(roots)

    def _recalibrate(self, run: _ChunkRun, keep: torch.Tensor | None) -> list:
        """Re-estimate the BatchNorm statistics after the cut point on this rank's re-estimation
        batches, from their cached activations where there are some (``bn.reestimate``); returns
        what ``bn.restore`` puts back."""
        def forward() -> None:
            if run.recal_prefix is not None:
                for h in run.recal_prefix:
                    self._from_cache(run.k, h, keep, run.plan)
            else:
                for x, _ in run.recal_batches:
                    self.model(x)

        return bn.reestimate(self._suffix_bns(run.k), forward, run.team)
