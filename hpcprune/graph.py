"""Prunable groups from Torch-Pruning's dependency graph; masking a group in place; applying a plan.

This is the one module that talks to Torch-Pruning. A *group* is a set of channels (or neurons)
coupled through residual adds, BatchNorm, concatenations or attention projections: pruning channel
``i`` of the group removes it from every member layer at once. Groups are named after their first
member layer in model order, which is stable across processes and runs of the same model.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .structure import Skip, Structure, structure_of

_MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)
# normalisations over the channel (last) dimension: zeroing a channel is not removing it (the mean
# and variance see the zero), so they cannot be masked, but their scale and shift can be sliced
_NORMS = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


@dataclass
class Member:
    module: str  # qualified module name
    out: bool  # True: the module's output channels are cut; False: its input channels
    unit: int = 1  # channels of this member per group unit (a head's rows: n_rep * head_dim for q)


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
    return keep_count(g.size, ratio, 1 if g.kind == "heads" else round_to)


def expand(idxs: Sequence[int] | torch.Tensor, unit: int) -> torch.Tensor:
    """Unit indices to channel indices (unit ``i`` is channels ``i*unit .. i*unit+unit-1``)."""
    i = torch.as_tensor(idxs, dtype=torch.long).reshape(-1)
    if unit == 1:
        return i
    return (i[:, None] * unit + torch.arange(unit)).reshape(-1)


class Graph:
    """A dependency graph over one model instance (Torch-Pruning prunes in place: one per model)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignore: Sequence[str] = (),
                 kinds: Sequence[str] | None = None) -> None:
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
        was = model.training
        model.eval()
        # the graph is traced through autograd: frozen parameters (requires_grad=False) would drop
        # out of the trace and their layers out of every group, so all are traced as trainable
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                # parameters of modules Torch-Pruning does not know (RMSNorm scales): its default,
                # the last dimension, is right for normalisation scales; no need for the warning
                warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
                self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        finally:
            for p in frozen:
                p.requires_grad_(False)
            model.train(was)
        self._tp_groups: dict[str, Any] = {}
        self.all_groups = self._enumerate() + self._structure_groups()
        self.all_groups.sort(key=lambda gi: (self.order[gi.block or _module_of(gi)], gi.kind == "block"))
        self.groups = [g for g in self.all_groups if kinds is None or g.kind in kinds]

    def _structure_groups(self) -> list[GroupInfo]:
        """Head groups (per attention layer, in KV-group units) and block groups, as the model declares."""
        infos = []
        for h in self.structure.heads:
            for n in [*h.q, *h.kv, h.o]:
                if n not in self.by_name:
                    raise ValueError(f"prune_structure: attention {h.name!r} names module {n!r}, which the model does not have")
            q_unit = h.n_rep * h.head_dim
            members = [Member(n, True, q_unit) for n in h.q] + [Member(n, True, h.head_dim) for n in h.kv] + [Member(h.o, False, q_unit)]
            infos.append(GroupInfo(f"{h.name}:heads", "heads", int(h.units), members, True, True, list(h.attrs)))
        for b in self.structure.blocks:
            if b not in self.by_name:
                raise ValueError(f"prune_structure: no block module named {b!r}")
            infos.append(GroupInfo(f"{b}:block", "block", 1, [], False, False, block=b))
        return infos

    def _enumerate(self) -> list[GroupInfo]:
        infos = []
        for g in self.dg.get_all_groups(ignored_layers=self.ignored, root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
            members: list[Member] = []
            identity = True
            unwrapped = False
            for dep, idxs in g:
                mod = dep.target.module
                if isinstance(mod, nn.Parameter):  # a parameter of a module Torch-Pruning does not know
                    unwrapped = True
                    continue
                if mod not in self.names:  # an op node (add, relu, reshape): nothing to cut
                    continue
                out = self.dg.is_out_channel_pruning_fn(dep.handler)
                members.append(Member(self.names[mod], out))
                identity = identity and [int(i) for i in idxs] == list(range(len(idxs))) and _dim_size(mod, out) == len(idxs)
            members.sort(key=lambda m: (self.order[m.module], not m.out))
            outs = [m for m in members if m.out]
            name = outs[0].module
            root_mod = self.by_name[name]
            size = int(self.dg.get_out_channels(root_mod))
            kind = "neurons" if isinstance(root_mod, nn.Linear) else "channels"
            maskable = not unwrapped and all(self._maskable(self.by_name[m.module], m.out) for m in members)
            sliceable = not unwrapped and identity and all(self._sliceable(self.by_name[m.module], m.out) for m in members)
            infos.append(GroupInfo(name, kind, size, members, maskable, sliceable))
            self._tp_groups[name] = root_mod
        return infos

    def _sliceable(self, mod: nn.Module, out: bool) -> bool:
        if isinstance(mod, _NORMS):  # over the last dimension only: (C,) scale and shift
            return out and len(mod.normalized_shape) == 1
        if isinstance(mod, nn.Embedding):  # its output channels are the embedding's columns
            return out
        return self._maskable(mod, out)

    def _maskable(self, mod: nn.Module, out: bool) -> bool:
        if not isinstance(mod, _MASKABLE):
            return False
        if isinstance(mod, nn.modules.conv._ConvNd):
            # depthwise: in and out are the same channels; other grouped convs index inputs per group
            return mod.groups == 1 or (mod.groups == mod.in_channels == mod.out_channels)
        return True

    # ---- pruning ----------------------------------------------------------------------------------
    def group(self, name: str) -> GroupInfo:
        for g in self.all_groups:
            if g.name == name:
                return g
        raise KeyError(f"plan names group {name!r}, which this model does not have")

    def prune_group(self, name: str, idxs: Sequence[int]) -> None:
        """Physically remove units ``idxs`` (dense numbering) of group ``name``: channels through
        Torch-Pruning; heads by cutting the projections' rows and columns; a block by replacing it
        with its skip module."""
        if not len(idxs):
            return
        g = self.group(name)
        if g.kind == "block":
            skip_block(self.model, g, self.structure).saved.clear()  # permanent: nothing to restore
            return
        if g.kind == "heads":
            drop = set(int(i) for i in idxs)
            slice_group(self.by_name, g, [i for i in range(g.size) if i not in drop], permanent=True)
            return
        root = self._tp_groups[name]
        pruner = self.dg.get_pruner_of_module(root)
        group = self.dg.get_pruning_group(root, pruner.prune_out_channels, [int(i) for i in idxs])
        # Torch-Pruning 1.6's LayerNorm pruner keeps its scale and shift in the order of a Python set
        # (it calls the tensor's non-in-place sort()): with many channels cut, the kept entries come
        # out permuted against the channels they belong to. Its result is replaced by the sorted cut.
        norms = [(dep.target.module, [int(i) for i in di]) for dep, di in group
                 if isinstance(dep.target.module, nn.LayerNorm) and dep.target.module.elementwise_affine]
        norms = [(m, {k: getattr(m, k).detach().clone() for k in ("weight", "bias") if getattr(m, k) is not None},
                  sorted(set(range(m.normalized_shape[-1])) - set(di))) for m, di in norms]
        group.prune()
        for mod, before, keep in norms:
            for k, t in before.items():
                if getattr(mod, k).shape[-1] == len(keep):
                    setattr(mod, k, nn.Parameter(t[..., keep].contiguous(), requires_grad=getattr(mod, k).requires_grad))

    def apply_plan(self, plan: dict[str, Sequence[int]]) -> None:
        """Prune to the kept unit indices per group (``plan[group] = kept indices``): channel groups
        first (Torch-Pruning works on the whole dense graph), then heads, then blocks."""
        groups = [self.group(name) for name in plan]
        for g in sorted(groups, key=lambda g: ("channels", "neurons", "heads", "block").index(g.kind)):
            kept_set = set(int(k) for k in plan[g.name])
            self.prune_group(g.name, [i for i in range(g.size) if i not in kept_set])

    def tp_group(self, name: str, idxs: Sequence[int] | None = None) -> Any:
        """Torch-Pruning's Group object (for importance criteria), on all channels by default."""
        if name not in self._tp_groups:
            raise KeyError(f"group {name!r} is not a Torch-Pruning group (heads and blocks are hpcprune's own)")
        root = self._tp_groups[name]
        pruner = self.dg.get_pruner_of_module(root)
        size = int(self.dg.get_out_channels(root))
        return self.dg.get_pruning_group(root, pruner.prune_out_channels, list(range(size)) if idxs is None else list(idxs))


# ---- masking in place (sensitivity cells) ---------------------------------------------------------
@dataclass
class _Saved:
    tensor: torch.Tensor
    index: tuple
    values: torch.Tensor


@dataclass
class Mask:
    """Zeroes a group's channels in place; ``restore()`` puts back the exact original values."""

    saved: list[_Saved] = field(default_factory=list)

    def _zero(self, t: torch.Tensor | None, index: tuple) -> None:
        if t is None:
            return
        self.saved.append(_Saved(t, index, t.data[index].clone()))
        t.data[index] = 0

    def restore(self) -> None:
        for s in reversed(self.saved):
            s.tensor.data[s.index] = s.values
        self.saved.clear()


def mask_group(model_modules: dict[str, nn.Module], group: GroupInfo, idxs: Sequence[int]) -> Mask:
    """Zero channels ``idxs`` of ``group`` in every member; equals pruning them for maskable groups.

    Zeroing a channel's producing weights, bias and BatchNorm affine parameters makes it exactly 0
    downstream (0 after BN with zero weight and bias, after ReLU, through residual adds whose other
    inputs are members too); its consumers' input weights are zeroed as well.
    """
    if not group.maskable:
        raise ValueError(f"group {group.name} holds layers that cannot be masked exactly")
    mask = Mask()
    units = torch.as_tensor(list(idxs), dtype=torch.long)
    if units.numel() == 0:
        return mask
    for m in group.members:
        idx = expand(units, m.unit)
        mod = model_modules[m.module]
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mask._zero(mod.weight, (idx.to(mod.weight.device),)) if mod.weight is not None else None
            mask._zero(mod.bias, (idx.to(mod.bias.device),)) if mod.bias is not None else None
            continue
        w = mod.weight  # Conv / Linear
        i = idx.to(w.device)
        depthwise = isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1
        if m.out or depthwise:
            mask._zero(w, (i,))
            mask._zero(mod.bias, (i,))
        else:
            mask._zero(w, (slice(None), i))
    return mask


def _dim_size(mod: nn.Module, out: bool) -> int:
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return mod.num_features
    if isinstance(mod, nn.modules.conv._ConvNd):
        return mod.out_channels if (out or mod.groups > 1) else mod.in_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features if out else mod.in_features
    if isinstance(mod, _NORMS):
        return int(mod.normalized_shape[-1])
    if isinstance(mod, nn.Embedding):
        return mod.embedding_dim if out else -1
    return -1


@dataclass
class Slice:
    """Cuts a group's channels out of its member layers in place (smaller tensors, exactly the
    computation of the physically pruned model); ``restore()`` puts the original tensors back."""

    saved: list[tuple[Any, str, Any]] = field(default_factory=list)
    permanent: bool = False
    # tensors already cut, by id: a parameter tied between two members (an embedding and the output
    # head) is cut once, and after a permanent cut both members hold the same new parameter
    done: dict[int, Any] = field(default_factory=dict)

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        self.saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def _param(self, mod: nn.Module, name: str, value_of: Any) -> None:
        """Replace ``mod.<name>``'s values by ``value_of(tensor)`` (None-safe)."""
        t = getattr(mod, name)
        if t is None:
            return
        if id(t) in self.done:
            if self.permanent:
                setattr(mod, name, self.done[id(t)][1])
            return
        value = value_of(t.data)
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            value = value.contiguous(memory_format=torch.channels_last)  # keep a conv weight's NHWC layout
        if self.permanent and isinstance(t, nn.Parameter):
            # a new Parameter of the new shape (an optimiser built later sees the right tensor)
            setattr(mod, name, nn.Parameter(value.contiguous(), requires_grad=t.requires_grad))
        elif self.permanent:
            setattr(mod, name, value.contiguous())
        else:
            self._set(t, "data", value)
        self.done[id(t)] = (t, getattr(mod, name))  # the old tensor is kept: its id stays unique

    def restore(self) -> None:
        for obj, attr, value in reversed(self.saved):
            setattr(obj, attr, value)
        self.saved.clear()


def slice_group(model_modules: dict[str, nn.Module], group: GroupInfo, keep: Sequence[int], permanent: bool = False) -> Slice:
    """Keep only units ``keep`` of ``group`` in every member (for ``group.sliceable`` groups).

    ``permanent``: new parameters of the smaller shape, with the layers' size attributes updated
    (physical pruning); otherwise the tensors' data is swapped and ``restore()`` swaps it back."""
    if not group.sliceable:
        raise ValueError(f"group {group.name} cannot be sliced in place")
    sl = Slice(permanent=permanent)
    seen: set[str] = set()
    for module, attr, per_unit in group.attrs:
        sl._set(model_modules[module], attr, per_unit * len(keep))
    for m in group.members:
        mod = model_modules[m.module]
        if m.module in seen and isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1:
            continue  # a depthwise conv's in and out channels are the same: cut once
        seen.add(m.module)
        k = expand(list(keep), m.unit).to(mod.weight.device if getattr(mod, "weight", None) is not None else "cpu")
        rows = lambda t, k=k: t.index_select(0, k)  # noqa: E731
        if isinstance(mod, _NORMS):
            for name in ("weight", "bias"):
                sl._param(mod, name, rows)
            sl._set(mod, "normalized_shape", (len(k),))
            continue
        if isinstance(mod, nn.Embedding):
            sl._param(mod, "weight", lambda t, k=k: t.index_select(1, k))
            sl._set(mod, "embedding_dim", len(k))
            continue
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            for name in ("weight", "bias"):
                sl._param(mod, name, rows)
            for name in ("running_mean", "running_var"):
                buf = getattr(mod, name)
                if buf is not None:
                    sl._set(mod, name, buf.index_select(0, k))
            if permanent:
                _sync_sizes(mod)
            continue
        depthwise = isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1
        if m.out or depthwise:
            sl._param(mod, "weight", rows)
            sl._param(mod, "bias", rows)
            if depthwise:
                sl._set(mod, "groups", len(keep))
        else:
            sl._param(mod, "weight", lambda t, k=k: t.index_select(1, k))
        if permanent:
            _sync_sizes(mod)
    if permanent:
        sl.saved.clear()
        sl.done.clear()
    return sl


def _sync_sizes(mod: nn.Module) -> None:
    """After a permanent cut: the layer's size attributes follow its weight."""
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.conv._ConvNd):
        mod.out_channels = mod.weight.shape[0]
        mod.in_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        mod.num_features = mod.weight.shape[0] if mod.weight is not None else mod.running_mean.shape[0]


def skip_block(model: nn.Module, group: GroupInfo, structure: Structure | None = None) -> Slice:
    """Replace a block group's module by its skip (the block's output is its input); ``restore()``
    puts the block back."""
    if group.kind != "block" or group.block is None:
        raise ValueError(f"group {group.name} is not a block")
    structure = structure or structure_of(model)
    parent_name, _, child = group.block.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    block = parent.get_submodule(child)
    sl = Slice()
    sl._set(parent, child, structure.skip(block) if structure.skip is not None else Skip())
    return sl


def _module_of(g: GroupInfo) -> str:
    return g.members[0].module if g.kind == "heads" else g.name
