"""Prunable groups from Torch-Pruning's dependency graph; masking a group in place; applying a plan.

This is the one module that talks to Torch-Pruning. A *group* is a set of channels (or neurons)
coupled through residual adds, BatchNorm, concatenations or attention projections: pruning channel
``i`` of the group removes it from every member layer at once. Groups are named after their first
member layer in model order, which is stable across processes and runs of the same model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch_pruning as tp
from torch import nn

_MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass
class Member:
    module: str  # qualified module name
    out: bool  # True: the module's output channels are cut; False: its input channels


@dataclass
class GroupInfo:
    """One prunable group, as plain data (identical on every rank)."""

    name: str
    kind: str  # "channels" (conv-rooted) or "neurons" (linear-rooted)
    size: int  # channels in the group
    members: list[Member]
    maskable: bool  # every member can be masked exactly in place (else cells prune a copy)
    sliceable: bool = False  # every member indexes the group's channels 1:1 (no concat/flatten mapping)

    @property
    def modules(self) -> list[str]:
        return [m.module for m in self.members]


def keep_count(size: int, ratio: float, round_to: int = 1) -> int:
    """Channels kept when pruning ``ratio`` of ``size``: a multiple of ``round_to`` (at least one)."""
    keep = math.ceil(round((1.0 - ratio) * size / round_to, 6)) * round_to
    return int(min(size, max(round_to if round_to <= size else size, keep, 1)))


class Graph:
    """A dependency graph over one model instance (Torch-Pruning prunes in place: one per model)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignore: Sequence[str] = ()) -> None:
        self.model = model
        self.names = {mod: name for name, mod in model.named_modules()}
        self.by_name = dict(model.named_modules())
        self.order = {name: i for i, name in enumerate(self.by_name)}
        unknown = [n for n in ignore if n not in self.by_name]
        if unknown:
            raise ValueError(f"groups.ignore: no module named {unknown[0]!r} in the model")
        self.ignored = [self.by_name[n] for n in ignore]
        was = model.training
        model.eval()
        with torch.enable_grad():  # the graph is traced through autograd
            self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        model.train(was)
        self._tp_groups: dict[str, Any] = {}
        self.groups = self._enumerate()

    def _enumerate(self) -> list[GroupInfo]:
        infos = []
        for g in self.dg.get_all_groups(ignored_layers=self.ignored, root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
            members: list[Member] = []
            identity = True
            for dep, idxs in g:
                mod = dep.target.module
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
            maskable = all(self._maskable(self.by_name[m.module], m.out) for m in members)
            sliceable = maskable and identity
            infos.append(GroupInfo(name, kind, size, members, maskable, sliceable))
            self._tp_groups[name] = root_mod
        infos.sort(key=lambda gi: self.order[gi.name])
        return infos

    def _maskable(self, mod: nn.Module, out: bool) -> bool:
        if not isinstance(mod, _MASKABLE):
            return False
        if isinstance(mod, nn.modules.conv._ConvNd):
            # depthwise: in and out are the same channels; other grouped convs index inputs per group
            return mod.groups == 1 or (mod.groups == mod.in_channels == mod.out_channels)
        return True

    # ---- pruning ----------------------------------------------------------------------------------
    def prune_group(self, name: str, idxs: Sequence[int]) -> None:
        """Physically remove channels ``idxs`` (dense numbering) of group ``name``."""
        if not idxs:
            return
        root = self._tp_groups[name]
        pruner = self.dg.get_pruner_of_module(root)
        group = self.dg.get_pruning_group(root, pruner.prune_out_channels, [int(i) for i in idxs])
        group.prune()

    def apply_plan(self, plan: dict[str, Sequence[int]]) -> None:
        """Prune to the kept channel indices per group (``plan[group] = kept indices``)."""
        sizes = {g.name: g.size for g in self.groups}
        for name, kept in plan.items():
            if name not in sizes:
                raise KeyError(f"plan names group {name!r}, which this model does not have")
            kept_set = set(int(k) for k in kept)
            self.prune_group(name, [i for i in range(sizes[name]) if i not in kept_set])

    def tp_group(self, name: str, idxs: Sequence[int] | None = None) -> Any:
        """Torch-Pruning's Group object (for importance criteria), on all channels by default."""
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
    idx = torch.as_tensor(list(idxs), dtype=torch.long)
    if idx.numel() == 0:
        return mask
    for m in group.members:
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
    return -1


@dataclass
class Slice:
    """Cuts a group's channels out of its member layers in place (smaller tensors, exactly the
    computation of the physically pruned model); ``restore()`` puts the original tensors back."""

    saved: list[tuple[Any, str, Any]] = field(default_factory=list)

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        self.saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def _data(self, t: torch.Tensor | None, value: Any) -> None:
        if t is not None:
            self._set(t, "data", value)

    def restore(self) -> None:
        for obj, attr, value in reversed(self.saved):
            setattr(obj, attr, value)
        self.saved.clear()


def slice_group(model_modules: dict[str, nn.Module], group: GroupInfo, keep: Sequence[int]) -> Slice:
    """Keep only channels ``keep`` of ``group`` in every member (for ``group.sliceable`` groups)."""
    if not group.sliceable:
        raise ValueError(f"group {group.name} cannot be sliced in place")
    sl = Slice()
    seen: set[str] = set()
    for m in group.members:
        mod = model_modules[m.module]
        if m.module in seen and isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1:
            continue  # a depthwise conv's in and out channels are the same: cut once
        seen.add(m.module)
        k = torch.as_tensor(list(keep), dtype=torch.long, device=mod.weight.device if getattr(mod, "weight", None) is not None else "cpu")
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            for name in ("weight", "bias"):
                t = getattr(mod, name)
                sl._data(t, t.data.index_select(0, k) if t is not None else None)
            for name in ("running_mean", "running_var"):
                buf = getattr(mod, name)
                if buf is not None:
                    sl._set(mod, name, buf.index_select(0, k))
            continue
        depthwise = isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1
        if m.out or depthwise:
            sl._data(mod.weight, mod.weight.data.index_select(0, k))
            if mod.bias is not None:
                sl._data(mod.bias, mod.bias.data.index_select(0, k))
            if depthwise:
                sl._set(mod, "groups", len(keep))
        else:
            sl._data(mod.weight, mod.weight.data.index_select(1, k))
    return sl
