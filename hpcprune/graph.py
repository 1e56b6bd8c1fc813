"""Prunable groups from Torch-Pruning's dependency graph; masking a group in place; applying a plan.

This is the one module that talks to Torch-Pruning (the upstream bugs hpcprune patches or works
around are :mod:`hpcprune.tp_fixes`, imported first). A *group* is a set of channels (or neurons)
coupled through residual adds, BatchNorm, concatenations or attention projections: pruning channel
``i`` of the group removes it from every member layer at once. Groups are named after their first
member layer in model order, which is stable across processes and runs of the same model.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn

from . import tp_fixes  # first: Torch-Pruning patched before any graph is built
from .cuts import _NORMS, Mask, Slice, TPCut, _dim_size, expand, mask_group, skip_block, slice_group  # noqa: F401
from .errors import HpcpruneError
from .structure import Skip, Structure, structure_of  # noqa: F401
from .units import block_width as _block_width, layout_ops as _layout_ops, member_overflow as _member_overflow
from .units import narrow_readers as _narrow_readers
from .units import other_axis_readers as _other_axis_readers
from .units import runs_on as _runs_on, unit_count as _unit_count, unsupported_member as _unsupported_member
from .tp_layers import customized_pruners, is_conv1d

log = logging.getLogger(__name__)

_MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)


class GraphError(HpcpruneError, ValueError):
    """The model's dependency graph cannot be built (untraceable model, time limit)."""


@dataclass
class Excluded:
    """A group hpcprune will not prune, and why (recorded in the run file, shown in the report)."""

    name: str
    layer_types: list[str]
    reason: str


@dataclass
class Member:
    module: str  # qualified module name
    out: bool  # True: the module's output channels are cut; False: its input channels
    unit: int = 1  # channels of this member per group unit (a head's rows: n_rep * head_dim for q)
    chunks: int = 1  # the member's rows are this many equal blocks, each laid out by unit (a fused qkv: 3)
    parts: tuple[int, ...] = ()  # else: channels per unit of each consecutive block (a fused GQA qkv: n_rep*hd, hd, hd)


@dataclass
class GroupInfo:
    """One prunable group, as plain data (identical on every rank)."""

    name: str
    kind: str  # "channels" (conv-rooted), "neurons" (linear-rooted), "heads" (attention KV groups), "block"
    size: int  # units in the group: channels, neurons, KV groups (heads), 1 (a block)
    members: list[Member]
    maskable: bool  # every member can be masked exactly in place (else cells prune a copy)
    sliceable: bool = False  # every member indexes the group's channels 1:1 (no concat/flatten mapping) and can be
    # cut in place: convolutions, linears, batch norms, layer/RMS norms, embeddings
    attrs: list[tuple[str, str, int]] = field(default_factory=list)  # heads: (module, attribute, value per unit)
    block: str | None = None  # block groups: the block's module name
    channels: int = 0  # channels of the root layer's output; > size when a unit is several channels: unit u is
    # channels u, u + size, u + 2 size, ... (one position in every block of a grouped conv, GroupNorm or
    # attention head, so that every block keeps the same width)
    layer_types: list[str] = field(default_factory=list)  # the member layers' class names

    def unit_channels(self, units: Sequence[int]) -> list[int]:
        """Root-layer channel indices of ``units`` (for channel and neuron groups)."""
        u = [int(i) for i in units]
        if not self.channels or self.channels == self.size:
            return u
        return sorted(i + j * self.size for i in u for j in range(self.channels // self.size))

    @property
    def modules(self) -> list[str]:
        return [m.module for m in self.members]


KINDS = ("channels", "neurons", "heads", "block")
BLOCK_RATIO = 0.5  # a block group pruned at a ratio at or above this is removed


def keep_count(size: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept when pruning ``ratio`` of ``size``: a multiple of ``round_to`` (at least one)."""
    keep = math.ceil(round((1.0 - ratio) * size / round_to, 6)) * round_to
    return int(min(size, max(round_to if round_to <= size else size, keep, 1)))


def n_keep(g: GroupInfo, ratio: float, round_to: int = 1) -> int:
    """Units of group ``g`` kept at ``ratio``: channels rounded to ``round_to``; whole heads (at least
    one; a head is already ``head_dim`` wide, so no rounding); a block is kept (1) or removed (0)."""
    if g.kind == "block":
        return 0 if ratio >= BLOCK_RATIO - 1e-9 else 1
    if g.kind == "heads":
        return keep_count(g.size, ratio, 1)
    per = g.channels // g.size if g.channels else 1  # channels per unit: kept channels a multiple of round_to
    return keep_count(g.size, ratio, max(1, round_to // math.gcd(round_to, per)))


# an embedding roots its width too (read by a mean-pooled Linear, not only by a residual stream)
_ROOTS = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)
_KNOWN_BUFFERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`GraphError` naming ``what`` when the block runs longer than ``seconds`` (SIGALRM;
    only in the main thread, elsewhere no limit)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise GraphError(what)

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Graph:
    """A dependency graph over one model instance (cuts are in place: one graph per model).

    ``groups``: the prunable groups (after ``exclude``); ``excluded``: groups found but not usable,
    with the reason (Torch-Pruning could not build them, a unit structure it cannot keep, a tied
    parameter cut on one side only, or, from ``verify.verify_groups``, a cut that fails or computes
    something else). ``timeout_s`` bounds the graph build and the group search.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignore: Sequence[str] = (),
                 kinds: Sequence[str] | None = None, timeout_s: float = 0.0, exclude: Sequence[str] = ()) -> None:
        self.model = model
        self.names = {mod: name for name, mod in model.named_modules()}
        self.by_name = dict(model.named_modules())
        self.order = {name: i for i, name in enumerate(self.by_name)}
        self.structure: Structure = structure_of(model)
        unknown = [n for n in ignore if n not in self.by_name]
        if unknown:
            raise ValueError(f"groups.ignore: no module named {unknown[0]!r} in the model")
        bad = [k for k in (kinds or ()) if k not in KINDS]
        if bad:
            raise ValueError(f"groups.kinds: {bad[0]!r} is not a group kind (choose from {', '.join(KINDS)})")
        self.ignored = [self.by_name[n] for n in dict.fromkeys([*ignore, *self.structure.ignore])]
        self.excluded: list[Excluded] = []
        self._example = example_input  # for a trial cut while the groups are searched (_runs_without)
        self._dense_shapes: list | None = None  # the dense model's output shapes on it, once a trial needs them
        self._buffers: dict[int, str] = {}  # id(parameter standing for a buffer while traced) -> its name
        t0 = time.perf_counter()
        with time_limit(timeout_s, f"groups: Torch-Pruning's dependency graph of {type(model).__name__} did not finish in "
                                   f"groups.timeout_s={timeout_s:g} s; declare attention layers and blocks with "
                                   "prune_structure() (hpcprune/structure.py), name slow parts in groups.ignore=[...], "
                                   "or raise groups.timeout_s"):
            self.dg = self._build(model, example_input)
            self._tp_groups: dict[str, Any] = {}
            self.reduced: set[str] = set()  # groups whose channels some layer reads reduced (:meth:`_info`)
            self.all_groups = self._enumerate(t0) + self._structure_groups()
        self.all_groups.sort(key=lambda gi: (self.order.get(gi.block or _module_of(gi), 0), gi.kind == "block"))
        self.kinds = kinds
        self.groups = [g for g in self.all_groups if (kinds is None or g.kind in kinds) and g.name not in set(exclude)]

    # ---- building -------------------------------------------------------------------------------
    def _build(self, model: nn.Module, example_input: torch.Tensor) -> Any:
        """Torch-Pruning's graph, traced through autograd: frozen parameters (requires_grad=False)
        would drop out of the trace and their layers out of every group, so all are traced as
        trainable; floating-point buffers of other than norm layers (a position encoding sized by the
        width) are traced as parameters, so that the groups they are added to cut them too."""
        was = model.training
        model.eval()
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        converted = []
        for name, mod in model.named_modules():
            if isinstance(mod, _KNOWN_BUFFERS):
                continue
            for bname, buf in list(mod._buffers.items()):
                if (buf is None or not buf.is_floating_point() or buf.dim() < 2 or bname in mod._non_persistent_buffers_set):
                    continue
                p = nn.Parameter(buf, requires_grad=True)
                del mod._buffers[bname]
                mod._parameters[bname] = p
                converted.append((mod, bname, p))
                self._buffers[id(p)] = f"{name}.{bname}" if name else bname
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                # parameters of modules Torch-Pruning does not know (RMSNorm scales): its default,
                # the last dimension, is right for normalisation scales; no need for the warning
                warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
                # a tensor in a tuple: Torch-Pruning calls model(*example_inputs) first, which on a bare
                # tensor runs the model on example_input[0], an unbatched sample, wherever that runs
                inputs = (example_input,) if isinstance(example_input, torch.Tensor) else example_input
                try:
                    with _glu_as_chunks():
                        return tp.DependencyGraph().build_dependency(model, example_inputs=inputs,
                                                                     customized_pruners=customized_pruners(model))
                except GraphError:
                    raise
                except Exception as e:
                    _runs_on(model, example_input, GraphError)
                    op = _failing_mapping(e)
                    if op is not None:  # the forward runs and is traced: Torch-Pruning's own mapping of an op fails
                        raise GraphError(f"groups: Torch-Pruning cannot map the channels through {op} of "
                                         f"{type(model).__name__} ({type(e).__name__}: {_first_line(e)}); the "
                                         "forward runs: rewrite that op (channel slices or chunks concatenated in "
                                         "another order, as a rotary embedding's rotate_half before the split into "
                                         "heads, are not mapped), or set groups.kinds=[heads, block] with "
                                         "prune_structure()") from e
                    raise GraphError(f"groups: Torch-Pruning cannot trace {type(model).__name__} ({type(e).__name__}: "
                                     f"{_first_line(e)}); the model's forward must run on the data's example input "
                                     "with autograd (no torch.no_grad() inside), or set groups.kinds=[heads, block] "
                                     "with prune_structure()") from e
        finally:
            for mod, bname, p in converted:
                del mod._parameters[bname]
                mod._buffers[bname] = p.data
            for p in frozen:
                p.requires_grad_(False)
            model.train(was)

    def _enumerate(self, t0: float) -> list[GroupInfo]:
        """Torch-Pruning's groups, rooted at conv and linear outputs as ``get_all_groups`` does, but
        one root at a time: a root whose group Torch-Pruning cannot build is excluded by name
        instead of ending the search; progress is logged every 10 s."""
        infos: list[GroupInfo] = []
        ignored = {id(m) for m in self.ignored} | {id(m) for m in self.dg.IGNORED_LAYERS_IN_TRACING}
        visited: set[int] = set()
        roots = [m for m in self.dg.module2node if (isinstance(m, _ROOTS) or is_conv1d(m)) and id(m) not in ignored]
        root_ids = {id(m) for m in roots}
        last = time.perf_counter()
        for i, root in enumerate(roots):
            if time.perf_counter() - last > 10.0:
                last = time.perf_counter()
                log.info("groups: %d of %d root layers searched, %d groups so far (%.0f s)", i, len(roots), len(infos),
                         last - t0)
            if id(root) in visited:
                continue
            pruner = self.dg.get_pruner_of_module(root)
            if pruner is None or pruner.get_out_channels(root) is None:
                continue
            name = self.names.get(root, "?")
            try:
                group = self.dg.get_pruning_group(root, pruner.prune_out_channels, list(range(pruner.get_out_channels(root))))
            except GraphError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of the search excludes this root only
                visited.add(id(root))
                found = self._from_consumer(root, ignored)
                if found is not None:
                    consumer, group = found
                    visited.update(id(dep.target.module) for dep, _ in group if self.dg.is_out_channel_pruning_fn(dep.handler))
                    info = self._info(name, consumer, group, root_out=False)
                    if info is not None:
                        infos.append(info)
                    continue
                self.excluded.append(Excluded(name, [type(root).__name__], f"Torch-Pruning cannot build its group "
                                              f"({type(e).__name__}: {_first_line(e)}{_tp_mapping_of(e)})"
                                              f"{self._unknown_layers}"))
                continue
            outs = [dep.target.module for dep, _ in group if self.dg.is_out_channel_pruning_fn(dep.handler)]
            if int(pruner.get_out_channels(root)) == 1 and any(
                    m is not root and id(m) not in visited and id(m) not in ignored and id(m) in root_ids
                    and _dim_size(m, True) > 1 for m in outs):
                # a 1-channel layer broadcast over wider channels (CBAM's spatial map, ECA's gate): a group of
                # one unit; the wider layer's own group, searched later, holds the channels (and leaves it out)
                visited.add(id(root))
                continue
            visited.update(id(m) for m in outs)
            if any(id(m) in ignored for m in outs):
                continue
            width = int(pruner.get_out_channels(root))
            # a weight Torch-Pruning cuts along a last dimension that is not the channels (an einsum's
            # operand) is the cause to name instead; a (1, 1, C) scale (ResMLP's Affine) is cut right
            wrong = any(isinstance(dep.target.module, nn.Parameter) and dep.target.module.shape[-1] != width
                        for dep, _ in group)
            drop = _other_axis_readers(self.dg, group, width) if not wrong else frozenset()
            reduced = False
            if not drop and not wrong:  # as many tokens as channels (or a multiple): only a trial cut tells
                maybe = _other_axis_readers(self.dg, group, width, any_width=True)
                if maybe and self._runs_without(root, pruner, maybe):
                    drop = maybe
            if not drop and not wrong:  # layers reading the channels reduced to a few, or broadcasting a few over them
                narrow = _narrow_readers(self.dg, group, self.names)
                if narrow and self._runs_without(root, pruner, narrow):
                    drop = narrow
                    # a layer's input side left out: it reads the channels reduced (a broadcast map's
                    # output alone leaves zeroing a channel equal to removing it)
                    reduced = any(isinstance(d, tuple) and not d[1] for d in narrow)
            info = self._info(name, root, _without(group, drop), drop=drop, reduced=reduced)
            if info is not None:
                infos.append(info)
        return infos

    def _runs_without(self, root: nn.Module, pruner: Any, drop: frozenset[int]) -> bool:
        """Whether the model runs on the example input, its outputs the dense shapes, with ``root``'s
        channel 0 cut through its group without the nodes ``drop`` (:func:`units.other_axis_readers`
        with ``any_width``); the model is restored either way."""
        from .verify import output_shapes

        x, was = self._example, self.model.training
        self.model.eval()  # no BatchNorm statistics updated, no dropout
        try:
            with torch.no_grad():
                if self._dense_shapes is None:  # once per graph: the model is dense between trials
                    self._dense_shapes = output_shapes(self.model(x))
                dense = self._dense_shapes
                cut = TPCut.apply(self.dg, _without(self.dg.get_pruning_group(root, pruner.prune_out_channels, [0]), drop),
                                  self._buffers)
                try:
                    return output_shapes(self.model(x)) == dense
                finally:
                    cut.restore()
        except Exception:  # noqa: BLE001 - does not run so: Torch-Pruning's group stands (and verification judges it)
            return False
        finally:
            self.model.train(was)

    def _from_consumer(self, root: nn.Module, ignored: set[int]) -> tuple[nn.Module, Any] | None:
        """The group of ``root``'s outputs built from the layer that reads them, when Torch-Pruning
        cannot build it from ``root``: (that layer, the group on all its input channels), or None.
        A Linear's features viewed as feature maps (``fc(x).view(n, C, 4, 4)`` before a
        ``ConvTranspose2d``: a decoder, a generator) are the case: rooted at the Linear, every one of
        its ``16 C`` rows maps to a channel and back to 16 rows, 16 times too many indices; rooted
        at the ``C`` input channels of the layer after the view, channel ``c`` is rows ``16c ..
        16c + 15`` (Torch-Pruning's own mapping), and a unit is one input channel of that layer."""
        node = self.dg.module2node.get(root)
        if node is None:
            return None
        seen, todo, consumers = {id(node)}, list(node.outputs), []
        while todo and len(seen) < 64:  # through op nodes (activations, reshapes) to the next layers
            n = todo.pop(0)
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.module in self.names:
                consumers.append(n.module)
            else:
                todo.extend(n.outputs)
        for c in consumers:
            pruner = self.dg.get_pruner_of_module(c)
            if id(c) in ignored or pruner is None or getattr(pruner, "get_in_channels", None) is None:
                continue
            width = pruner.get_in_channels(c)
            if not width:
                continue
            try:
                group = self.dg.get_pruning_group(c, pruner.prune_in_channels, list(range(int(width))))
            except Exception:  # noqa: BLE001 - not from here either
                continue
            if any(dep.target.module is root and self.dg.is_out_channel_pruning_fn(dep.handler) for dep, _ in group):
                return c, group
        return None

    def _refusal(self, group: Any, members: list[Member], root_channels: int, overflow: str, bare: str = "") -> str:
        """Why hpcprune cannot cut this group correctly ('' when it can): a member it cannot cut in
        place, channels mapped past a member's end, a parameter tied across the group's boundary.
        ``bare``: :meth:`bare_parameters` of the group; where channels are mapped past a member's
        end and the group has such a weight, that weight is the cause and the reason opens with it
        (an einsum's own permute is then not a channel shuffle)."""
        unsupported = _unsupported_member(self.by_name, members)
        if unsupported:
            return unsupported
        if overflow:  # the cut could only fail (or, for a tensor op, index out of bounds)
            if bare:
                return f"{bare[2:]} (so cut, its {root_channels} channels map onto {overflow})"
            ops = _layout_ops(group, self.model)
            return (f"Torch-Pruning maps its {root_channels} channels onto {overflow}"
                    + (f": it passes them 1:1 through {'; '.join(ops)}" if ops else ""))
        tied = self._tied_across(group)
        return f"it would cut parameter {tied} (tied weights would come apart)" if tied else ""

    def _info(self, name: str, root: nn.Module, group: Any, root_out: bool = True,
              drop: frozenset[int] = frozenset(), reduced: bool = False) -> GroupInfo | None:
        """A Torch-Pruning group as plain data, or None (and an ``excluded`` entry) when hpcprune
        cannot cut it correctly. ``root_out``: the group is rooted at ``root``'s outputs (else at its
        inputs: :meth:`_from_consumer`); ``drop``: the nodes left out of every use of the group
        (:func:`hpcprune.units.other_axis_readers`, :func:`hpcprune.units.narrow_readers`);
        ``reduced``: ``drop`` holds layers that read the channels reduced to a few or broadcast a
        few over them: zeroing channels is not cutting them (a mean over the channels counts zeros),
        so the group is not maskable and its name goes into :attr:`reduced`."""
        members: list[Member] = []
        types: list[str] = []
        identity = True
        root_channels = int(self.dg.get_out_channels(root) if root_out else self.dg.get_in_channels(root))
        blocks: list[tuple[str, list[int], list[int], int]] = []  # (member, mapped idxs, root idxs, block width)
        overflow = ""  # a member Torch-Pruning maps the root's channels past the end of
        params: list[tuple[Any, str]] = []
        wide: list[tuple[str, int]] = []  # output members wider than a one-channel root
        for item in group:
            dep, idxs = item
            mod = dep.target.module
            if isinstance(mod, nn.Parameter):
                pname = self.dg._param_to_name.get(mod, "?")
                members.append(Member(pname, True))
                types.append("buffer" if id(mod) in self._buffers else "Parameter")
                params.append((mod, pname))
                identity = False
                continue
            if mod not in self.names:  # an op node (add, relu, reshape): nothing to cut
                continue
            out = self.dg.is_out_channel_pruning_fn(dep.handler)
            if out and root_channels == 1 and _dim_size(mod, out) > 1:
                wide.append((self.names[mod], _dim_size(mod, out)))
            members.append(Member(self.names[mod], out))
            types.append(type(mod).__name__)
            overflow = overflow or _member_overflow(self.dg, self.names[mod], mod, out, idxs)
            width = _block_width(mod, out)
            if width:
                blocks.append((self.names[mod], [int(i) for i in idxs], [int(r) for r in item.root_idxs], width))
            identity = (identity and len(idxs) == root_channels and [int(i) for i in idxs] == list(range(len(idxs)))
                        and _dim_size(mod, out) == len(idxs))
        members.sort(key=lambda m: (self.order.get(m.module, -1), not m.out))
        types = sorted(set(types))
        channels = root_channels
        size = _unit_count(channels, blocks)
        if size == channels and any(isinstance(dep.target.module, tp.ops._SplitOp) for dep, _ in group) and root_out:
            size = self._closure_stride(root, channels)
        if size is None:  # what splits them: the members in blocks, a split or chunk of the channels
            why = list(dict.fromkeys(_in_blocks(n, self.by_name[n], w) for n, _, _, w in blocks))[:3] + _layout_ops(group, self.model)
            self.excluded.append(Excluded(name, types, "its layers split the channels into blocks that no cut of whole "
                                          f"units keeps equal ({'; '.join(why) or 'grouped convolution, GroupNorm, attention heads'})"))
            return None
        bare = self.bare_parameters(group, root_channels) if params else ""
        reason = self._refusal(group, members, root_channels, overflow, bare)
        if not reason and wide:  # e.g. ECA's Conv1d over the channel axis, CBAM's spatial attention conv
            reason = (f"Torch-Pruning ties {wide[0][0]}'s {wide[0][1]} output channels to the single channel of "
                      f"{self.names.get(root, '?')} (a layer that reads the channels as its length or spatial axis, "
                      "as ECA's Conv1d or a spatial-attention conv does), a group of one unit that no cut changes; "
                      "the group stays whole")
        if reason:
            self.excluded.append(Excluded(name, types, reason if bare and reason.startswith(bare[2:]) else reason + bare))
            return None
        # named after its first output member in model order (stable across processes and runs)
        name = next((m.module for m in members if m.out and m.module in self.by_name), name)
        kind = "neurons" if isinstance(self.by_name[name], nn.Linear) or is_conv1d(self.by_name[name]) else "channels"
        # a layer reached twice (a module called twice, a weight shared by two members): Torch-Pruning's
        # functions cut it once per role, which slicing in place would not repeat
        reused = len({m.module for m in members}) < len(members) and any(
            not isinstance(self.by_name[m.module], (*_NORMS, nn.modules.batchnorm._BatchNorm)) and not _depthwise(self.by_name[m.module])
            for m in members if sum(1 for o in members if o.module == m.module) > 1)
        plain = size == channels and not params and not reused
        maskable = plain and identity and all(self._maskable(self.by_name[m.module], m.out) for m in members)
        sliceable = plain and identity and all(self._sliceable(self.by_name[m.module], m.out) for m in members)
        self._tp_groups[name] = (root, root_out, drop)
        if reduced:
            maskable = False
            self.reduced.add(name)
        return GroupInfo(name, kind, size, members, maskable, sliceable, channels=channels, layer_types=types)

    @functools.cached_property
    def _unknown_layers(self) -> str:
        """'; ... layers Torch-Pruning has no pruner for: <name> (<type>), ...' naming the leaf layers
        whose own weights (2 or more dimensions: not a norm's scale) it has no pruner for (``nn.Bilinear``),
        or ''. For a group whose search fails: no group lists its members then, and such a layer on
        the channels' path is a likely cause. Found once per graph, however many searches fail."""
        found = [f"{n} ({type(m).__name__})" for n, m in self.by_name.items()
                 if n and not any(True for _ in m.children())
                 and isinstance(self.dg.get_pruner_of_module(m), (type(None), tp.ops.ElementWisePruner))  # its default for unknown modules
                 and any(p is not None and p.dim() >= 2 for p in m._parameters.values())]
        if not found:
            return ""
        return (f"; the model has layers with weights Torch-Pruning has no pruner for: {', '.join(found[:4])}"
                f"{' ...' if len(found) > 4 else ''}; channels that reach one cannot be cut (build it from Linear / Conv "
                "layers to prune them)")

    def bare_parameters(self, group: Any, channels: int | None = None) -> str:
        """'; <why>' for each weight in a Torch-Pruning ``group`` that no layer Torch-Pruning knows
        holds (it cuts such a parameter along its last dimension only, whatever the forward does with
        it): a weight of a layer it has no pruner for (``nn.Bilinear``), or an ``nn.Parameter`` a
        forward passes to a functional call (``F.conv2d``); '' when there is none. For the reason of
        a group excluded or failing once cut: that weight, not the layers around it, is the cause.
        With the group's width ``channels``, a parameter outside any layer whose last dimension alone
        has that width (a position embedding ``(1, T, C)`` added to tokens) is cut where it is used,
        and not named."""
        out = []
        by_type: dict[str, list[tuple[str, str, tuple]]] = {}  # a layer type's weights: one line for all of them
        for dep, _ in group:
            p = dep.target.module
            if not isinstance(p, nn.Parameter) or id(p) in self._buffers or p.dim() < 2:  # 1-D: a norm scale, cut right
                continue
            pname = self.dg._param_to_name.get(p, "?")
            owner_name = pname.rpartition(".")[0]
            owner = self.by_name.get(owner_name)
            layer = owner_name and owner is not None and not any(True for _ in owner.children())
            if not layer and channels is not None and p.shape[-1] == channels and list(p.shape).count(channels) == 1:
                continue
            if layer:
                by_type.setdefault(type(owner).__name__, []).append((pname, owner_name, tuple(p.shape)))
            else:
                out.append(f"{pname} is an nn.Parameter {tuple(p.shape)} outside any layer (a functional call such as "
                           f"F.conv2d, F.linear or torch.einsum uses it): Torch-Pruning cuts it along its last dimension "
                           f"only; hold it in an nn.Conv2d / nn.Linear to have it cut with the channels")
        for kind, found in by_type.items():
            found.sort(key=lambda f: self.order.get(f[1], -1))  # model order
            if len(found) == 1:
                pname, owner_name, shape = found[0]
                out.insert(0, f"{pname} belongs to {owner_name} ({kind}), a layer Torch-Pruning has no pruner for: it cuts "
                              f"that {shape} weight along its last dimension only, so the group stays whole; to prune the "
                              f"layers that feed it, build {owner_name} from layers Torch-Pruning knows (Linear, Conv)")
            else:
                names = ", ".join(n for n, _, _ in found[:3]) + (" ..." if len(found) > 3 else "")
                out.insert(0, f"{len(found)} weights ({names}) belong to {kind} layers, which Torch-Pruning has no pruner "
                              f"for: it cuts each along its last dimension only, so the group stays whole; to prune the "
                              f"layers that feed them, build {kind} from layers Torch-Pruning knows (Linear, Conv)")
        return "".join(f"; {o}" for o in dict.fromkeys(out))

    def _closure_stride(self, root: nn.Module, channels: int) -> int | None:
        """The group's units when Torch-Pruning cuts root channel 0 together with channels S, 2S, ...
        (a fused ``gate_up_proj`` chunked in two and multiplied: neuron u is rows u and u + S): S;
        ``channels`` when channel 0 goes alone; None for any other coupling."""
        group = self.dg.get_pruning_group(root, self.dg.get_pruner_of_module(root).prune_out_channels, [0])
        got = sorted({int(i) for dep, idxs in group
                      if dep.target.module is root and self.dg.is_out_channel_pruning_fn(dep.handler) for i in idxs})
        if got == [0]:
            return channels
        return got[1] if channels % got[1] == 0 and got == list(range(0, channels, got[1])) else None

    def _tied_across(self, group: Any) -> str | None:
        """The name of a parameter of a member that another module outside the group also holds."""
        inside = set()
        for dep, _ in group:
            if isinstance(dep.target.module, nn.Module):
                inside.add(id(dep.target.module))
        holders: dict[int, list[tuple[str, nn.Module]]] = {}
        for mname, mod in self.by_name.items():
            for pname, p in mod._parameters.items():
                if p is not None:
                    holders.setdefault(id(p), []).append((f"{mname}.{pname}" if mname else pname, mod))
        roles: dict[int, set[bool]] = {}
        for dep, _ in group:
            mod = dep.target.module
            if not isinstance(mod, nn.Module):
                continue
            out = self.dg.is_out_channel_pruning_fn(dep.handler)
            for pname, p in mod._parameters.items():
                if p is None:
                    continue
                others = [n for n, m in holders.get(id(p), []) if id(m) not in inside]
                if others:
                    return f"{others[0]}, which is shared with a layer outside the group"
                if len(holders.get(id(p), [])) > 1 and pname == "weight" and p.dim() >= 2:
                    roles.setdefault(id(p), set()).add(out)
                    if len(roles[id(p)]) > 1:  # one shared weight cut as rows in one member, columns in another
                        return f"{holders[id(p)][0][0]}, which two of its layers share as rows and as columns"
        return None

    def _structure_groups(self) -> list[GroupInfo]:
        """Head groups (per attention layer, in KV-group units) and block groups, as the model declares."""
        infos = []
        for h in self.structure.heads:
            for n in [*h.q, *h.kv, h.o]:
                if n not in self.by_name:
                    raise ValueError(f"prune_structure: attention {h.name!r} names module {n!r}, which the model does not have")
            q_unit = h.n_rep * h.head_dim
            for n in [*h.fused, *h.per_head]:
                if n not in self.by_name:
                    raise ValueError(f"prune_structure: attention {h.name!r} names module {n!r}, which the model does not have")
            parts = tuple(h.fused_parts) or (q_unit, h.head_dim, h.head_dim)
            members = ([Member(n, True, sum(parts), parts=parts) for n in h.fused] + [Member(n, True, q_unit) for n in h.q]
                       + [Member(n, True, h.head_dim) for n in h.kv] + [Member(h.o, False, q_unit)]
                       + [Member(n, True, h.n_rep) for n in h.per_head])
            infos.append(GroupInfo(f"{h.name}:heads", "heads", int(h.units), members, True, True, list(h.attrs),
                                   layer_types=sorted({type(self.by_name[m.module]).__name__ for m in members})))
        for name, reason in self.structure.refused.items():
            self.excluded.append(Excluded(name, [type(self.by_name.get(name.split(":")[0])).__name__], reason))
        for b in self.structure.blocks:
            if b not in self.by_name:
                raise ValueError(f"prune_structure: no block module named {b!r}")
            infos.append(GroupInfo(f"{b}:block", "block", 1, [], False, False, block=b,
                                   layer_types=[type(self.by_name[b]).__name__]))
        return infos

    def exclude(self, excluded: Sequence[Excluded], record: bool = True) -> None:
        """Drop groups (``verify.verify_groups``' findings, or the run file's record of them)."""
        names = {e.name for e in excluded}
        if record:
            self.excluded += [e for e in excluded if e.name not in {x.name for x in self.excluded}]
        self.all_groups = [g for g in self.all_groups if g.name not in names]
        if hasattr(self, "groups"):
            self.groups = [g for g in self.groups if g.name not in names]

    def _sliceable(self, mod: nn.Module, out: bool) -> bool:
        if isinstance(mod, _NORMS):  # over the last dimension only: (C,) scale and shift
            return out and len(mod.normalized_shape) == 1
        if isinstance(mod, nn.Embedding):  # its output channels are the embedding's columns
            return out
        return self._maskable(mod, out)

    def _maskable(self, mod: nn.Module, out: bool) -> bool:
        if is_conv1d(mod):
            return True
        if not isinstance(mod, _MASKABLE):
            return False
        if isinstance(mod, nn.modules.conv._ConvNd):
            # depthwise: in and out are the same channels; other grouped convs index inputs per group
            return not mod.transposed and (mod.groups == 1 or (mod.groups == mod.in_channels == mod.out_channels))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return mod.affine
        return True

    # ---- cutting --------------------------------------------------------------------------------
    def group(self, name: str) -> GroupInfo:
        for g in self.all_groups:
            if g.name == name:
                return g
        raise KeyError(f"plan names group {name!r}, which this model does not have")

    def cut(self, name: str, idxs: Sequence[int], permanent: bool = False) -> Any:
        """Remove units ``idxs`` (dense numbering) of group ``name`` in place; the result's
        ``restore()`` puts the model back (unless ``permanent``). Channels and neurons: Torch-Pruning's
        layer functions on its mapped indices (``TPCut``); heads: the projections' rows and columns;
        a block: replaced by its skip module."""
        g = self.group(name)
        if g.kind == "block":
            sl = skip_block(self.model, g, self.structure) if len(idxs) else Slice()
            if permanent:
                sl.saved.clear()
            return sl
        drop = set(int(i) for i in idxs)
        if g.kind == "heads":
            return slice_group(self.by_name, g, [i for i in range(g.size) if i not in drop], permanent=permanent)
        if not drop:
            return Slice()
        return TPCut.apply(self.dg, self.tp_group(name, g.unit_channels(sorted(drop))), self._buffers, permanent)

    def prune_group(self, name: str, idxs: Sequence[int]) -> None:
        """Physically remove units ``idxs`` (dense numbering) of group ``name``."""
        if len(idxs):
            self.cut(name, idxs, permanent=True)

    def apply_plan(self, plan: dict[str, Sequence[int]]) -> None:
        """Prune to a plan (``plan[group]`` = kept indices: the root layer's kept channels for channel
        and neuron groups, kept heads, ``[0]`` or ``[]`` for a block): channel groups first
        (Torch-Pruning works on the whole dense graph), then heads, then blocks."""
        groups = [self.group(name) for name in plan]
        for g in sorted(groups, key=lambda g: ("channels", "neurons", "heads", "block").index(g.kind)):
            kept_set = set(self.plan_units(g, plan[g.name]))
            self.prune_group(g.name, [i for i in range(g.size) if i not in kept_set])

    @staticmethod
    def plan_units(g: GroupInfo, kept: Sequence[int]) -> list[int]:
        """A plan entry (kept root channels for channel groups) as kept units."""
        kept = sorted(int(k) for k in kept)
        if g.kind in ("heads", "block") or not g.channels or g.channels == g.size:
            return kept
        units = sorted({k % g.size for k in kept})
        if g.unit_channels(units) != kept:
            raise ValueError(f"plan for group {g.name}: kept channels are not whole units of {g.channels // g.size} "
                             f"channels (one per block)")
        return units

    def tp_group(self, name: str, idxs: Sequence[int] | None = None) -> Any:
        """Torch-Pruning's Group object on root channels ``idxs`` (all by default)."""
        if name not in self._tp_groups:
            raise KeyError(f"group {name!r} is not a Torch-Pruning group (heads and blocks are hpcprune's own)")
        root, out, drop = self._tp_groups[name]
        pruner = self.dg.get_pruner_of_module(root)
        size = int(self.dg.get_out_channels(root) if out else self.dg.get_in_channels(root))
        fn = pruner.prune_out_channels if out else pruner.prune_in_channels
        return _without(self.dg.get_pruning_group(root, fn, list(range(size)) if idxs is None else list(idxs)), drop)

    def unit_scores(self, g: GroupInfo, channel_scores: torch.Tensor) -> torch.Tensor:
        """Per-unit scores from per-root-channel scores (a strided unit sums its channels)."""
        if not g.channels or g.channels == g.size:
            return channel_scores
        return channel_scores.reshape(g.channels // g.size, g.size).sum(dim=0)


_MAPPINGS = (("concat", "a torch.cat"), ("split", "a split or chunk"), ("reshape", "a reshape or view"),
             ("flatten", "a flatten"), ("slice", "a slice"))


def _failing_mapping(e: BaseException) -> str | None:
    """The kind of op whose index mapping raised ``e`` inside Torch-Pruning's (or ``tp_fixes``')
    ``update_*_index_mapping`` while it built the dependency graph ('a torch.cat', ...), or None."""
    tb, names = e.__traceback__, []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    fn = next((n for n in reversed(names) if "index_mapping" in n), None)
    if fn is None:
        return None
    return next((what for key, what in _MAPPINGS if key in fn), "an op")


@contextlib.contextmanager
def _glu_as_chunks() -> Iterator[None]:
    """``F.glu`` (and ``nn.GLU``, which calls it) traced as what it computes, ``a * sigmoid(b)`` of
    the two halves ``a, b = x.chunk(2, dim)``: Torch-Pruning takes the one ``GluBackward0`` node for an
    element-wise op and passes the 2C channels 1:1 onto the C it outputs (the cut could not run); as
    a chunk and a product it couples channel u with u + C, one unit (:meth:`Graph._closure_stride`),
    as for a fused gate/up projection. Only while the graph is traced; the model itself is unchanged
    (the cut keeps both halves in order, so ``F.glu`` pairs them as before)."""
    fn = torch.nn.functional.glu

    def glu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
        a, b = input.chunk(2, dim)
        return a * torch.sigmoid(b)

    torch.nn.functional.glu = glu  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.nn.functional.glu = fn  # type: ignore[assignment]


def _in_blocks(name: str, mod: nn.Module, width: int) -> str:
    """'<name> in blocks of <width>', or what such a layer is where its blocks have a name: a
    depthwise convolution with a channel multiplier (``Conv2d(C, k C, groups=C)``, k > 1), whose
    input channel c feeds k outputs that Torch-Pruning does not cut with it."""
    if (isinstance(mod, nn.modules.conv._ConvNd) and mod.groups == mod.in_channels > 1
            and mod.out_channels > mod.in_channels):
        return (f"{name} is a depthwise convolution with a channel multiplier of {mod.out_channels // mod.in_channels} "
                f"(groups={mod.groups}, {mod.out_channels} outputs): Torch-Pruning does not cut an input with its "
                f"{mod.out_channels // mod.in_channels} outputs, so the layers feeding it stay whole")
    return f"{name} in blocks of {width}"


def _without(group: Any, drop: frozenset) -> Any:
    """Torch-Pruning ``group`` without the items whose target node is in ``drop``: node ids (every
    item on that node), or ``(node id, out)`` pairs (the items cutting that side of the layer only,
    :func:`hpcprune.units.narrow_readers`)."""
    if not drop:
        return group
    out = tp.dependency.Group()
    out._DG = group._DG
    out._group = [item for item in group._group if id(item.dep.target) not in drop
                  and (id(item.dep.target), bool(group._DG.is_out_channel_pruning_fn(item.dep.handler))) not in drop]
    return out


def _depthwise(mod: nn.Module) -> bool:
    return isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels


_TP_MAPPINGS = {"_SplitIndexMapping": "a split of the channels (torch.split / chunk / unbind)",
                "_ConcatIndexMapping": "a concatenation (torch.cat)",
                "_FlattenIndexMapping": "a flatten or reshape of the channels",
                "_SliceIndexMapping": "a slice of the channels (x[..., a:b])",
                "_GQAIndexMapping": "grouped-query attention's repeated key/value heads"}


def _tp_mapping_of(e: BaseException) -> str:
    """', in Torch-Pruning's index mapping through <the op>' when ``e`` was raised inside one of
    Torch-Pruning's channel index mappings (which op the group's search failed at), else ''."""
    tb, found = e.__traceback__, None
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if type(obj).__name__ in _TP_MAPPINGS and type(obj).__module__.startswith("torch_pruning"):
            found = type(obj).__name__
        tb = tb.tb_next
    return f", in Torch-Pruning's index mapping through {_TP_MAPPINGS[found]}" if found else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _module_of(g: GroupInfo) -> str:
    return g.members[0].module if g.kind == "heads" else g.name
