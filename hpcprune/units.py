"""What one unit of a group is, and which groups Torch-Pruning cannot cut correctly.

A group's *unit* is what a cut removes at once: one channel, or, where a member splits the channels
into blocks that must stay equal (a grouped convolution, GroupNorm, ``nn.MultiheadAttention``'s
heads), one channel position in every block (root channels u, u + S, u + 2S, ...), so that every
block keeps the same width at the same positions. ``hpcprune.graph`` builds each group's
:class:`~hpcprune.graph.GroupInfo` with these functions.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
from torch import nn


def unsupported_member(by_name: dict[str, nn.Module], members: Sequence[Any]) -> str | None:
    """Why a group with these members cannot be cut correctly, or None: a LayerNorm over several
    dimensions (``LayerNorm([C, H, W])``: Torch-Pruning cuts its last dimension, not C), a layer
    whose weight is reparametrised (weight norm, spectral norm: the cut would leave ``weight_g`` /
    the parametrization's tensors at the old width), an ``nn.MultiheadAttention`` whose key/value
    width differs from ``embed_dim`` (Torch-Pruning 1.6 ties all three inputs to ``embed_dim``), a
    layer in a TorchScript module (its parameters cannot be swapped and put back)."""
    for m in members:
        mod = by_name.get(m.module)
        scripted = next((p for p in _prefixes(m.module) if isinstance(by_name.get(p), torch.jit.ScriptModule)), None)
        if scripted is not None:
            return (f"{scripted} is a TorchScript module (torch.jit.script / torch.jit.trace): its layers cannot be cut "
                    "in place; build the model without it (script the pruned model: hpcprune.load_pruned(...), then "
                    "torch.jit.script)")
        if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) > 1:
            return (f"{m.module} is a LayerNorm over {tuple(mod.normalized_shape)}: Torch-Pruning cuts its last dimension, "
                    "not the channels; normalise over channels only (LayerNorm(C) on channels-last, or GroupNorm(1, C))")
        if isinstance(mod, nn.MultiheadAttention) and not mod._qkv_same_embed_dim:
            return (f"{m.module} is an nn.MultiheadAttention with kdim={mod.kdim}, vdim={mod.vdim} != embed_dim={mod.embed_dim}: "
                    "Torch-Pruning cuts its key and value inputs as if they were embed_dim wide; this group is not "
                    "pruned (give key and value the query's width to prune it)")
        if mod is not None and hasattr(mod, "weight_mask") and hasattr(mod, "weight_orig"):  # torch.nn.utils.prune
            return (f"{m.module} carries an unstructured pruning mask (torch.nn.utils.prune: weight_orig and weight_mask); "
                    "make it permanent before structured pruning: torch.nn.utils.prune.remove(layer, 'weight')")
        if mod is not None and (torch.nn.utils.parametrize.is_parametrized(mod) or hasattr(mod, "weight_g")
                                or hasattr(mod, "weight_orig")):  # weight_orig: the hook-based spectral_norm
            return (f"{m.module} has a reparametrised weight (weight or spectral norm, or a parametrization of your own); "
                    "remove it before pruning: "
                    "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight'), nn.utils.remove_weight_norm(layer) "
                    "or nn.utils.remove_spectral_norm(layer)")
    return None


def _prefixes(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: the module and every module above it (the model itself left out)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else []


def member_overflow(dg: Any, name: str, mod: nn.Module, out: bool, idxs: Sequence[int]) -> str:
    """'<name>'s N input/output channels (index i)' when Torch-Pruning maps a group onto channel
    indices past the end of member ``mod``, else ''."""
    pruner = dg.get_pruner_of_module(mod)
    width = None if pruner is None else (pruner.get_out_channels(mod) if out else pruner.get_in_channels(mod))
    top = max((int(i) for i in idxs), default=-1)
    if width is None or top < int(width):
        return ""
    return f"{name}'s {int(width)} {'output' if out else 'input'} channels (index {top})"


def block_width(mod: nn.Module, out: bool) -> int:
    """Channels per block of a layer that splits its channels into blocks that must stay equal:
    a grouped (not depthwise) convolution, GroupNorm, nn.MultiheadAttention (per head); 0 otherwise."""
    if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and not (mod.groups == mod.in_channels == mod.out_channels):
        return (mod.out_channels if out else mod.in_channels) // mod.groups
    if isinstance(mod, nn.GroupNorm) and 1 < mod.num_groups < mod.num_channels:  # GroupNorm(C, C): per channel
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


# ops Torch-Pruning passes channels through one to one although they move them (or whose literal
# bounds in forward() stay at the dense width): named in the reason of a group whose cut fails
_LAYOUT_OPS = {
    "PixelShuffle": "PixelShuffle (input channel c*r*r+k becomes output channel c)",
    "PixelUnshuffle": "PixelUnshuffle (channel c becomes channels c*r*r .. c*r*r+r*r-1)",
    "Im2Col": "F.unfold / nn.Unfold (channel c becomes columns c*k*k .. c*k*k+k*k-1)",
    "Col2Im": "F.fold / nn.Fold (k*k columns become one channel)",
    "ChannelShuffle": "nn.ChannelShuffle",
    "MaxPool2DWithIndices": "a max-pool with return_indices=True (its indices unpool other channels)",
    "MaxPool3DWithIndices": "a max-pool with return_indices=True (its indices unpool other channels)",
    "MaxUnpool": "MaxUnpool (its indices come from other channels' max-pool)",
    "Roll": "torch.roll (channel c becomes channel c + shift)",
    "Cumsum": "torch.cumsum over the channels (each output channel sums every channel before it)",
    "Cumprod": "torch.cumprod over the channels (each output channel multiplies every channel before it)",
    "Transpose": ("a transpose of the channel dimension (a channel shuffle written as view, transpose, view? a "
                  "layer mixing another dimension, as MLP-Mixer's token mixing, which the channels pass through?)"),
    "Permute": ("a permute of the channel dimension (a channel shuffle written as view, permute, view? a layer "
                "mixing another dimension, which the channels pass through?)"),
    "Flip": "torch.flip (channel c becomes channel C - 1 - c)",
    "Glu": "a GLU (nn.GLU / F.glu: output channel c is input channel c gated by input channel c + C/2)",
    "IndexSelect": "torch.index_select / an index tensor (channels reordered)",
    "Gather": "torch.gather (channels picked by an index tensor)",
}


def layout_ops(group: Any, model: nn.Module | None = None) -> list[str]:
    """What, in a Torch-Pruning group (``(dep, idxs)`` pairs), moves channels in a way Torch-Pruning
    does not follow (see ``_LAYOUT_OPS``; a channel slice or split: its literal bounds), as short
    phrases for an exclusion reason; empty when nothing is suspect. A max-pool's indices are named
    only where ``model`` has a ``MaxUnpool`` layer: every ``nn.MaxPool2d`` runs as
    ``max_pool2d_with_indices``, whose autograd name alone says nothing."""
    import torch_pruning as tp

    unpools = model is not None and any(isinstance(m, (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d)) for m in model.modules())
    found: list[str] = []
    for dep, _ in group:
        node = dep.target.module
        if isinstance(node, (tp.ops._SliceOp, tp.ops._SplitOp)):
            found.append("a channel slice or split whose bounds forward() fixes (x[:, :8], torch.split(x, [8, 24], 1))")
        grad_fn = str(getattr(node, "_grad_fn", ""))  # the autograd node's name, e.g. "PixelShuffleBackward0"
        found += [text for key, text in _LAYOUT_OPS.items() if grad_fn.startswith(key) and (unpools or "WithIndices" not in key)]
    return list(dict.fromkeys(found))


def runs_on(model: nn.Module, example_input: Any, error: type[Exception]) -> None:
    """``error`` (one line) when ``model`` does not run on ``example_input`` at all (a shape that does
    not fit, a bug in its forward): that, not Torch-Pruning's trace, is then what to fix."""
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, (tuple, list)) else model(example_input)
    except Exception as e:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise error(f"groups: {type(model).__name__} does not run on the data's example input {shape} "
                    f"({type(e).__name__}: {why}); check that the model and the data fit (input size, channels, "
                    "classes)") from e


_MOVES = ("Transpose", "Permute")  # autograd node names of ops that move a dimension


def narrow_readers(dg: Any, group: Any, names: dict) -> frozenset:
    """What to leave out of a Torch-Pruning ``group``: the sides of layers Torch-Pruning maps the
    group's channels onto past their width, as ``(id(node), out)`` pairs, and the element-wise op
    nodes (ids) that lead only to those layers. Such a layer reads the channels reduced to a few
    (``torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)])`` into CBAM's 2-to-1
    spatial-attention conv; ECA's ``Conv1d`` over the pooled channels as its length), or its few
    outputs are broadcast over them (a spatial SE's 1-channel map times ``x``: its input side, which
    does read the channels, stays in the group). Torch-Pruning 1.6 passes the channels 1:1 through
    the reduction and the broadcast, so it would cut indices up to C - 1 from a 2-channel input or a
    1-channel output: the group could not be cut (``member_overflow``). Empty when there is none.
    Whether the model runs without them, and what the cut computes, is tried and verified by the
    caller (``Graph._runs_without``, ``verify_groups``). ``names``: the model's layers by module."""
    import torch_pruning as tp

    deps = [(dep, idxs) for dep, idxs in group]
    sides: set[tuple[int, bool]] = set()  # (layer node, out) of every layer side in the group
    narrow: set[tuple[int, bool]] = set()  # those mapped past their width
    for dep, idxs in deps:
        mod = dep.target.module
        if not isinstance(mod, nn.Module) or mod not in names:
            continue
        out = bool(dg.is_out_channel_pruning_fn(dep.handler))
        sides.add((id(dep.target), out))
        if member_overflow(dg, "", mod, out, idxs):
            narrow.add((id(dep.target), out))
    if not narrow:
        return frozenset()
    layers = {n for n, _ in sides}
    narrow_nodes = {n for n, _ in narrow}
    whole = {n for n in narrow_nodes if all(side in narrow for side in sides if side[0] == n)}  # every side narrow
    children: dict[int, set[int]] = {}
    for dep, _ in deps:
        if dep.target is not dep.source:
            children.setdefault(id(dep.source), set()).add(id(dep.target))
    memo: dict[int, frozenset[int]] = {}

    def reached(node: int, path: frozenset[int] = frozenset()) -> frozenset[int]:
        """The layers below ``node`` in the group (itself when it is one)."""
        if node in memo:
            return memo[node]
        if node in layers:
            return frozenset({node})
        out: set[int] = set()
        for c in children.get(node, ()):
            if c not in path:
                out |= reached(c, path | {node})
        memo[node] = frozenset(out)
        return memo[node]

    drop: set[Any] = set(narrow)
    for dep, _ in deps:
        node = id(dep.target)
        if node in layers:
            continue
        below = reached(node)
        # an op that leads only to whole narrow layers (CBAM's concat of the mean and max); an
        # element-wise op (a sigmoid) also when it leads to a narrow layer's left-out side only
        elementwise = isinstance(dep.target.module, tp.ops._ElementWiseOp)
        if below and (below <= whole or (elementwise and below <= narrow_nodes)):
            drop.add(node)
    return frozenset(drop)


def other_axis_readers(dg: Any, group: Any, channels: int, any_width: bool = False) -> frozenset[int]:
    """The nodes of a Torch-Pruning ``group`` (ids of its ``dep.target`` nodes; ``dg``: its
    dependency graph) behind a transpose or permute that lead only to Linear layers reading another
    dimension than the group's channels: what Torch-Pruning wrongly couples to the channels, to be
    left out of the group. Empty when there is none.

    MLP-Mixer's (and ResMLP's) token mixing: ``ln(x).transpose(1, 2)`` (N, C, T) into
    ``Linear(T, ...)``, then ``Linear(..., T)`` and ``.transpose(1, 2)`` back onto the residual
    stream (N, T, C). Torch-Pruning passes the C channels 1:1 through both transposes onto the
    token Linears' T inputs and T outputs, so no cut of the residual width runs (Torch-Pruning
    1.6: ``get_pruning_group(embed, prune_out_channels, ...)`` lists ``prune_in_channels on tok1``
    and ``prune_out_channels on tok2``). A Linear qualifies when the width of its side in the group
    is neither ``channels`` nor a multiple of them (a flatten of the channels with other
    dimensions, which Torch-Pruning maps in blocks): that side cannot hold the channels. Leaving a
    Linear out that did read them fails loudly: uncut, its input no longer fits once the group is
    cut, and verification runs every group's cut. A transpose with any other layer or parameter
    behind it (a layer reading the channels after a transpose back) is left to Torch-Pruning.
    ``any_width``: every Linear behind a transpose qualifies, whatever its width (as many tokens as
    channels): a candidate only, which :class:`hpcprune.graph.Graph` keeps where a trial cut without
    those Linears runs (with them, it cannot: their input keeps the token count)."""
    if channels <= 0:
        return frozenset()
    deps = [dep for dep, _ in group]
    parent: dict[int, Any] = {}
    for dep in deps:
        if dep.target is not dep.source:
            parent.setdefault(id(dep.target), dep.source)

    def op(mod: Any) -> bool:
        return isinstance(mod, nn.Module) and type(mod).__module__.startswith("torch_pruning.ops")

    def other_width(dep: Any) -> bool:
        mod = dep.target.module
        if not isinstance(mod, nn.Linear):
            return False
        size = mod.out_features if dg.is_out_channel_pruning_fn(dep.handler) else mod.in_features
        return any_width or (size != channels and size % channels != 0)

    def chain(node: Any) -> Iterator[Any]:
        seen: set[int] = set()
        while id(node) not in seen:
            seen.add(id(node))
            yield node
            if id(node) not in parent:
                return
            node = parent[id(node)]

    starts: set[int] = set()  # the transpose nearest above each such Linear
    for dep in deps:
        if other_width(dep):
            top = next((n for n in chain(dep.target) if op(n.module) and str(getattr(n.module, "_grad_fn", "")).startswith(_MOVES)), None)
            if top is not None:
                starts.add(id(top))
    if not starts:
        return frozenset()
    below = {id(dep.target) for dep in deps if any(id(n) in starts for n in chain(dep.target))}
    for dep in deps:
        if id(dep.target) in below and not op(dep.target.module) and not other_width(dep):
            return frozenset()  # a layer or weight behind the transpose that may read the channels
    return frozenset(below)
