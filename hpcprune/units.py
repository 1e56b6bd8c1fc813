"""What one unit of a group is, and which groups Torch-Pruning cannot cut correctly.

A group's *unit* is what a cut removes at once: one channel, or, where a member splits the channels
into blocks that must stay equal (a grouped convolution, GroupNorm, ``nn.MultiheadAttention``'s
heads), one channel position in every block (root channels u, u + S, u + 2S, ...), so that every
block keeps the same width at the same positions. ``hpcprune.graph`` builds each group's
:class:`~hpcprune.graph.GroupInfo` with these functions.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn


def unsupported_member(by_name: dict[str, nn.Module], members: Sequence[Any]) -> str | None:
    """Why a group with these members cannot be cut correctly, or None: a LayerNorm over several
    dimensions (``LayerNorm([C, H, W])``: Torch-Pruning cuts its last dimension, not C), a layer
    whose weight is reparametrised (weight norm, spectral norm: the cut would leave ``weight_g`` /
    the parametrization's tensors at the old width)."""
    for m in members:
        mod = by_name.get(m.module)
        if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) > 1:
            return (f"{m.module} is a LayerNorm over {tuple(mod.normalized_shape)}: Torch-Pruning cuts its last dimension, "
                    "not the channels; normalise over channels only (LayerNorm(C) on channels-last, or GroupNorm(1, C))")
        if mod is not None and (torch.nn.utils.parametrize.is_parametrized(mod) or hasattr(mod, "weight_g")):
            return (f"{m.module} has a reparametrised weight (weight or spectral norm); remove it before pruning: "
                    "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') or nn.utils.remove_weight_norm(layer)")
    return None


def block_width(mod: nn.Module, out: bool) -> int:
    """Channels per block of a layer that splits its channels into blocks that must stay equal:
    a grouped (not depthwise) convolution, GroupNorm, nn.MultiheadAttention (per head); 0 otherwise."""
    if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and not (mod.groups == mod.in_channels == mod.out_channels):
        return (mod.out_channels if out else mod.in_channels) // mod.groups
    if isinstance(mod, nn.GroupNorm) and mod.num_groups > 1:
        return mod.num_channels // mod.num_groups
    if isinstance(mod, nn.MultiheadAttention) and mod.num_heads > 1:
        return mod.embed_dim // mod.num_heads
    return 0


def unit_count(channels: int, blocks: list[tuple[str, list[int], list[int], int]]) -> int | None:
    """Units of a group whose members split channels into blocks: the largest stride ``S`` (a
    divisor of every block width and of ``channels``) such that unit ``u`` (root channels u, u+S,
    u+2S, ...) takes the same number of channels from every block each member has; ``channels``
    when no member has blocks; None when no stride works."""
    if not blocks:
        return channels
    s = channels
    for _, _, _, w in blocks:
        s = math.gcd(s, w)
    for cand in sorted((d for d in range(2, s + 1) if s % d == 0), reverse=True):
        if all(_even(cand, mapped, roots, w) for _, mapped, roots, w in blocks):
            return cand
    return None  # (one unit of every channel could never be cut)


def _even(stride: int, mapped: list[int], roots: list[int], width: int) -> bool:
    if len(mapped) != len(roots):
        return False
    per_unit: dict[int, dict[int, int]] = {}
    touched: set[int] = set()
    for p, r in zip(mapped, roots):
        b = p // width
        touched.add(b)
        d = per_unit.setdefault(r % stride, {})
        d[b] = d.get(b, 0) + 1
    return all(set(d) == touched and len(set(d.values())) == 1 for d in per_unit.values())
