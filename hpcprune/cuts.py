"""Cutting a group's channels in place: zero (mask), slice, skip a block, or Torch-Pruning's own
layer functions with a restore.

Sensitivity cells cut one group at a time on the one model a rank holds and put it back afterwards;
the prune stage cuts permanently. Every way of cutting here computes exactly what the physically
pruned model computes (``verify.verify_groups`` checks that on every group before any compute).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .structure import Skip, Structure, structure_of
from .tp_layers import is_conv1d, weight_dims

if TYPE_CHECKING:
    from .graph import GroupInfo

# normalisations over the channel (last) dimension
_NORMS = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def size_attrs(mod: nn.Module) -> tuple:
    """A module's public number, string and tuple-of-those attributes, as (name, value) pairs:
    what a cut changes besides tensors (sizes, groups, head counts) and shapes or state follow."""
    return tuple((k, v) for k, v in vars(mod).items() if not k.startswith("_") and (
        isinstance(v, (int, float, str)) or (isinstance(v, tuple) and all(isinstance(e, (int, float, str)) for e in v))))


def expand(idxs: Sequence[int] | torch.Tensor, unit: int) -> torch.Tensor:
    """Unit indices to channel indices (unit ``i`` is channels ``i*unit .. i*unit+unit-1``)."""
    i = torch.as_tensor(idxs, dtype=torch.long).reshape(-1)
    if unit == 1:
        return i
    return (i[:, None] * unit + torch.arange(unit)).reshape(-1)


def member_channels(m: Any, units: Sequence[int] | torch.Tensor, channels: int) -> torch.Tensor:
    """Indices, on member ``m``'s channel dimension of ``channels`` channels, of group units ``units``:
    ``expand(units, m.unit)`` in each of the member's consecutive blocks (``m.parts`` channels per
    unit in each block; ``m.chunks`` equal blocks of ``m.unit`` otherwise). Raises ValueError when
    ``channels`` is not a whole number of units."""
    parts = tuple(getattr(m, "parts", ()) or ()) or (m.unit,) * int(getattr(m, "chunks", 1))
    if len(parts) == 1:
        return expand(units, parts[0])
    n, rem = divmod(channels, sum(parts))
    if rem:
        raise ValueError(f"{m.module}: {channels} channels are not blocks of {parts} channels per unit")
    out, offset = [], 0
    for p in parts:
        out.append(offset + expand(units, p))
        offset += p * n
    return torch.cat(out)


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
        mod = model_modules[m.module]
        idx = member_channels(m, units, _dim_size(mod, m.out))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mask._zero(mod.weight, (idx.to(mod.weight.device),)) if mod.weight is not None else None
            mask._zero(mod.bias, (idx.to(mod.bias.device),)) if mod.bias is not None else None
            continue
        w = mod.weight  # Conv / Linear / HF Conv1D (weight [in, out])
        i = idx.to(w.device)
        depthwise = isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1
        dim = weight_dims(mod)[0 if (m.out or depthwise) else 1]
        mask._zero(w, (slice(None),) * dim + (i,))
        if m.out or depthwise:
            mask._zero(mod.bias, (i,))
    return mask


def _dim_size(mod: nn.Module, out: bool) -> int:
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return mod.num_features
    if isinstance(mod, nn.modules.conv._ConvNd):
        return mod.out_channels if (out or mod.groups > 1) else mod.in_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features if out else mod.in_features
    if is_conv1d(mod):
        return int(mod.nf if out else mod.nx)
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
        else:
            value = value.contiguous()
        if self.permanent and isinstance(t, nn.Parameter):
            # a new Parameter of the new shape (an optimiser built later sees the right tensor)
            setattr(mod, name, nn.Parameter(value, requires_grad=t.requires_grad))
        elif self.permanent:
            setattr(mod, name, value)
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
        _set_count(sl, model_modules[module], attr, per_unit * len(keep))
    for m in group.members:
        mod = model_modules[m.module]
        if m.module in seen and isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1:
            continue  # a depthwise conv's in and out channels are the same: cut once
        seen.add(m.module)
        k = member_channels(m, list(keep), _dim_size(mod, m.out))  # fused [q; k; v]: the same units in every block
        k = k.to(mod.weight.device if getattr(mod, "weight", None) is not None else "cpu")
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
            _sync_sizes(mod, sl)
            continue
        depthwise = isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1
        dim = weight_dims(mod)[0 if (m.out or depthwise) else 1]
        sl._param(mod, "weight", lambda t, k=k, dim=dim: t.index_select(dim, k))
        if m.out or depthwise:
            sl._param(mod, "bias", rows)
            if depthwise:
                sl._set(mod, "groups", len(keep))
        _sync_sizes(mod, sl)  # HF Conv1D's forward sizes its output by nf
    if permanent:
        sl.saved.clear()
        sl.done.clear()
    return sl


def _set_count(sl: Slice, mod: nn.Module, attr: str, value: int) -> None:
    """Set a head count: a module attribute, or ``config.<name>`` on the module's own copy of its
    config (the model's config object is shared by every layer and left alone)."""
    if not attr.startswith("config."):
        sl._set(mod, attr, value)
        return
    if not any(obj is mod and a == "config" for obj, a, _ in sl.saved):
        sl._set(mod, "config", copy.copy(mod.config))
    sl._set(mod.config, attr.split(".", 1)[1], value)


def _sync_sizes(mod: nn.Module, sl: Slice) -> None:
    """After a cut: the layer's size attributes follow its weight (through ``sl``: an in-place cut
    restores them; a forward that reads ``self.fc.in_features`` sees the cut width either way)."""
    w = getattr(mod, "weight", None)
    if is_conv1d(mod):
        sizes = {"nx": w.shape[0], "nf": w.shape[1]}
    elif isinstance(mod, nn.Linear):
        sizes = {"out_features": w.shape[0], "in_features": w.shape[1]}
    elif isinstance(mod, nn.modules.conv._ConvNd):
        sizes = ({"in_channels": w.shape[0], "out_channels": w.shape[1] * mod.groups} if mod.transposed
                 else {"out_channels": w.shape[0], "in_channels": w.shape[1] * mod.groups})
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and (w is not None or mod.running_mean is not None):
        sizes = {"num_features": w.shape[0] if w is not None else mod.running_mean.shape[0]}
    else:
        return
    for attr, value in sizes.items():
        if getattr(mod, attr) != int(value):
            sl._set(mod, attr, int(value))


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


# ---- Torch-Pruning's own layer functions, in place and restorable -----------------------------------
def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _targets(dg: Any, group: Any) -> list[nn.Module]:
    """Every module a Torch-Pruning group's layer functions may change: each member (a bare parameter's
    owner) and its submodules (a layer function may cut a submodule too: MHA's out_proj), once."""
    seen: set[int] = set()
    targets = []
    for dep, _ in group:
        mod = dep.target.module
        if isinstance(mod, nn.Parameter):
            owner = _owner(dg.model, dg._param_to_name[mod])[0]
        elif isinstance(mod, nn.Module):
            owner = mod
        else:
            continue
        for sub in owner.modules():
            if id(sub) not in seen:
                seen.add(id(sub))
                targets.append(sub)
    return targets


@dataclass
class TPCut:
    """A Torch-Pruning group (``dg.get_pruning_group(...)``: every coupled layer with the indices it
    loses on its own dimension, concat offsets and flatten blocks already mapped) applied through
    Torch-Pruning's per-layer functions. ``restore()`` puts back every module's exact state (its
    parameter and buffer objects and its size attributes), so cells can cut and restore a group in
    place; ``permanent=True`` keeps the cut and updates the dependency graph's parameter records as
    ``Group.prune()`` does (later groups of the same plan then see the new tensors).

    Parameters shared by several members (tied weights) are cut once and stay shared. Parameters
    the dependency graph tracks as bare ``nn.Parameter`` nodes may be buffers of the model (a
    position encoding sized by the width, registered as a buffer): those stay buffers.
    """

    saved: list[tuple[nn.Module, dict, dict, dict]] = field(default_factory=list)

    @classmethod
    def apply(cls, dg: Any, group: Any, buffers: dict[int, str] | None = None, permanent: bool = False) -> "TPCut":
        cut = cls()
        model = dg.model
        targets = _targets(dg, group)
        # tied parameters: which (module, name) pairs hold the same tensor before the cut
        ties: dict[int, list[tuple[nn.Module, str]]] = {}
        for owner in targets:
            for pname, p in owner._parameters.items():
                if p is not None:
                    ties.setdefault(id(p), []).append((owner, pname))
        for owner in targets:
            # lists copied: Torch-Pruning's ConcatPruner/SplitPruner decrement the old ``concat_sizes``
            # / ``split_sizes`` list in place before assigning a new one (upstream bug, see tp_fixes), so a restored
            # reference would hold the cut sizes and every later cut through that concat be mis-mapped
            attrs = {k: (list(v) if isinstance(v, list) else v) for k, v in owner.__dict__.items()}
            cut.saved.append((owner, attrs, dict(owner._parameters), dict(owner._buffers)))
        try:
            for dep, idxs in group:
                mod = dep.target.module
                if not len(idxs):
                    continue
                if isinstance(mod, nn.Parameter):
                    name = dg._param_to_name[mod]
                    owner, attr = _owner(model, name)
                    if buffers is not None and id(mod) in buffers:  # the model's current buffer, cut the same way
                        cur = nn.Parameter(owner._buffers[attr], requires_grad=False)
                        # the pruner is one object shared by every graph: Dependency.__call__ sets the
                        # dim to cut before each call; called directly, it cut along the dim of whatever
                        # parameter the last cut of any model left there (a ConvNeXt's (C,) scale: dim 0
                        # of a (1, T, C) position table, which then stayed whole)
                        dep.handler.__self__.pruning_dim = dep.target.pruning_dim
                        owner._buffers[attr] = dep.handler(cur, list(idxs)).detach()
                        new = nn.Parameter(owner._buffers[attr], requires_grad=False)
                    else:
                        new = dep(list(idxs))
                        setattr(owner, attr, new)
                    if permanent:  # as Group.prune(): the graph's records follow the new tensor
                        dg._param_to_name.pop(mod)
                        dg._param_to_name[new] = name
                        dg.module2node[new] = dg.module2node.pop(mod)
                        dg.module2node[new].module = new
                        if buffers is not None and id(mod) in buffers:
                            buffers[id(new)] = buffers.pop(id(mod))
                elif isinstance(mod, nn.Module):
                    dep(list(idxs))
            for members in ties.values():  # one tensor cut twice (each member's own function): share the first
                if len(members) > 1:
                    first = getattr(members[0][0], members[0][1])
                    for owner, pname in members[1:]:
                        if getattr(owner, pname).shape == first.shape:
                            setattr(owner, pname, first)
            for owner, _, before, _ in cut.saved:
                for pname, old in before.items():
                    _keep_traits(old, owner._parameters.get(pname))
        except BaseException:
            cut.restore()
            raise
        if permanent:
            cut.saved.clear()
        return cut

    def restore(self) -> None:
        for owner, attrs, params, bufs in reversed(self.saved):
            owner._parameters.clear()
            owner._parameters.update(params)
            owner._buffers.clear()
            owner._buffers.update(bufs)
            owner.__dict__.update({k: v for k, v in attrs.items() if k not in ("_parameters", "_buffers")})
        self.saved.clear()


def _keep_traits(old: Any, new: Any) -> None:
    """What Torch-Pruning's layer functions drop when they make a cut parameter anew (an
    ``nn.Parameter`` of the kept values: trainable, contiguous), put back from the one it replaces:
    ``requires_grad=False`` (a frozen stem, a fixed scale: fine-tuning would otherwise train it)
    and a conv weight's channels-last layout (the pruned model's speed is measured in the dense
    model's layout)."""
    if old is None or new is None or new is old or not isinstance(new, torch.Tensor):
        return
    if new.requires_grad != old.requires_grad and new.is_leaf:
        new.requires_grad_(old.requires_grad)
    if (old.dim() == 4 and new.dim() == 4 and not old.is_contiguous()
            and old.is_contiguous(memory_format=torch.channels_last)):
        new.data = new.data.contiguous(memory_format=torch.channels_last)
