"""Channel importance criteria: which channels of a group go first.

``group_scores(graph, criterion, batches)`` returns one score per group channel (higher = keep).
Scores that need data (``taylor``: first-order |w * dL/dw|; ``activation``: mean |activation| of
the channel times the norm of the weights that produce it, Wanda-style; ``fluctuation``: FLAP's
variance of the channel where a single linear layer reads it, for cuts whose mean is compensated,
``hpcprune.compensate``) are built from sums over
the calibration batches: with ``reduce`` (an all-reduce over MPI ranks) each rank takes a share of
the batches and the sums are added, which equals the single-rank result.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch_pruning as tp

import logging

from .cuts import member_channels
from .graph import Graph, GroupInfo
from .metrics import task_loss
from .tp_layers import is_conv1d, weight_dims

log = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "activation", "fluctuation", "random")


def _magnitude(p: int) -> Callable:
    # no normalisation: within one group only the order matters; `global` normalises itself
    return tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None)


def group_scores(
    graph: Graph,
    criterion: str,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    seed: int = 0,
    reduce: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """Importance of every channel of every group of ``graph``'s (dense) model.

    ``batches`` is this rank's share of the calibration batches; ``reduce`` sums an array over
    ranks (None: a single rank holding every batch).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"importance={criterion!r} is not a known criterion (choose from {', '.join(CRITERIA)})")
    reduce = reduce or (lambda a: a)
    out: dict[str, torch.Tensor] = {}
    if criterion == "random":
        for i, g in enumerate(graph.groups):
            gen = torch.Generator().manual_seed(seed * 1000003 + i)
            out[g.name] = torch.rand(g.size, generator=gen, dtype=torch.float64)
        return out
    if criterion in ("activation", "fluctuation"):
        return _activation_scores(graph, batches, reduce, fluctuation=criterion == "fluctuation")
    if criterion == "taylor":
        _summed_gradients(graph.model, batches, reduce)
        imp: Callable = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
    elif criterion == "bn_scale":
        imp = tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)
    else:
        imp = _magnitude(1 if criterion == "l1" else 2)
    with torch.no_grad():
        for g in graph.groups:
            if g.kind in ("heads", "block"):
                out[g.name] = _unit_scores(graph, g, criterion)
                continue
            try:
                s = imp(graph.tp_group(g.name))
                if s is None:  # e.g. bn_scale on a group without BatchNorm: fall back to L2 magnitude
                    s = _magnitude(2)(graph.tp_group(g.name))
                if s is None:  # no member is a layer Torch-Pruning's criteria know (a HF Conv1D): the same sums here
                    s = _unit_scores(graph, g, criterion if criterion in ("l1", "taylor") else "l2")
            except (IndexError, RuntimeError, ValueError) as e:
                # Torch-Pruning's criteria index some layers wrongly (a depthwise conv with a channel
                # multiplier; see tp_fixes): the norm of the weights producing each channel of the root layer instead
                log.warning("importance: %s for group %s failed in Torch-Pruning (%s: %s); using the root layer's output "
                            "weight norms", criterion, g.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                s = _out_weight_norm(graph.by_name[g.name])
            out[g.name] = graph.unit_scores(g, s.detach().double().cpu())
    if criterion == "taylor":
        graph.model.zero_grad(set_to_none=True)
    return out


def _unit_scores(graph: Graph, g: GroupInfo, criterion: str) -> torch.Tensor:
    """Scores of hpcprune's own groups. A block is one unit (nothing to order). A head group's unit
    (a KV group) scores the sum over its members of each unit's weights: ``|w|^p`` (l1, l2; bn_scale
    falls back to l2 as for groups without BatchNorm) or ``|w * dL/dw|`` (taylor, with the
    calibration gradients already in ``.grad``)."""
    if g.kind == "block":
        return torch.ones(1, dtype=torch.float64)
    total = torch.zeros(g.size, dtype=torch.float64)
    for m in g.members:
        mod = graph.by_name[m.module]
        for pname in ("weight", "bias"):
            p = getattr(mod, pname, None)
            if p is None or (pname == "bias" and not m.out):
                continue
            if criterion == "taylor":
                if p.grad is None:
                    continue
                v = (p.detach() * p.grad.detach()).abs().double()
            else:
                v = p.detach().abs().double() ** (1 if criterion == "l1" else 2)
            if pname == "bias":
                dim = 0
            elif isinstance(mod, torch.nn.Embedding):  # (rows, channels): a per-head table's columns
                dim = 1
            else:
                dim = weight_dims(mod)[0 if m.out else 1]
            per_channel = v.transpose(0, dim).reshape(v.shape[dim], -1).sum(dim=1).cpu()
            total += per_channel[_per_unit(m, g.size, per_channel.numel())].sum(dim=1)
    return total


def _per_unit(m: Any, size: int, channels: int) -> torch.Tensor:
    """[size, channels per unit] indices of each unit's channels on member ``m``."""
    return torch.stack([member_channels(m, [u], channels) for u in range(size)])


def _summed_gradients(model: torch.nn.Module, batches: Sequence, reduce: Callable) -> None:
    """Gradients of the loss summed over all calibration samples (this rank's share, then reduced)."""
    model.zero_grad(set_to_none=True)
    was = model.training
    model.eval()
    for x, y in batches:
        task_loss(model(x), y, reduction="sum").backward()
    model.train(was)
    params = list(model.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = np.concatenate([p.grad.detach().double().cpu().numpy().ravel() for p in params])
    flat = reduce(flat)
    i = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(torch.from_numpy(flat[i : i + n]).view_as(p).to(p.grad.dtype))
        i += n


def _forward_all(model: torch.nn.Module, batches: Sequence, hooks: list) -> None:
    """Run every batch through ``model`` in eval mode without gradients, then remove ``hooks``."""
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            for x, _ in batches:
                model(x)
            model.train(was)
    finally:
        for h in hooks:
            h.remove()


def _activation_scores(graph: Graph, batches: Sequence, reduce: Callable, fluctuation: bool = False) -> dict[str, torch.Tensor]:
    """Activation-aware scores (Wanda, Sun et al. 2023, "A Simple and Effective Pruning Approach for
    Large Language Models"; structured as Wanda-sp in FLAP, An et al. 2024): small weights on large
    activations still matter.

    - A head group, and a neuron group read by exactly one linear layer (an MLP's down projection):
      where the units *enter* that consumer, ``||x_j||_2 / sqrt(n) * ||W[:, j]||_2`` per input channel
      ``j`` (the RMS of the channel over the calibration tokens times the norm of the consumer's
      column), summed over a unit's channels. In a gated MLP this is the product ``act(gate) * up``
      the down projection really reads, not one factor of it (scoring the gate's output instead left
      SmolLM2-135M at perplexity 107.5 for 20 % removed, against 82.7 with this score;
      benchmarks/results/llm_peers_cpu.log).
    - Every other group: mean |activation| of each channel at the group's root layer's output times
      that layer's output-weight norm.

    ``fluctuation`` (FLAP, An et al., AAAI 2024, WIFV): at that single consumer, the sample variance
    of each input channel over the calibration tokens x its column's squared norm, summed per unit:
    what a cut loses once its mean is compensated (``prune.bias_compensation``); else as ``activation``.
    """
    modules = dict(graph.model.named_modules())
    groups = [g for g in graph.groups if g.kind != "block"]
    o_of = {g.name: next(m for m in g.members if not m.out) for g in groups if g.kind == "heads"}  # the output projection
    o_of.update({g.name: m for g in groups if g.kind == "neurons" and (m := _sole_linear_consumer(g, modules))})
    width = {g.name: (g.channels or g.size) if g.kind != "heads" else g.size * o_of[g.name].unit for g in groups}
    sums = {g.name: torch.zeros(width[g.name], dtype=torch.float64) for g in groups}
    firsts = {n: torch.zeros(width[n], dtype=torch.float64) for n in o_of} if fluctuation else {}  # sum of x
    counts = {g.name: 0.0 for g in groups}
    hooks = []

    def add(name: str, t: torch.Tensor, ch_dim: int) -> None:
        dims = [d for d in range(t.dim()) if d != ch_dim]
        v = t.detach().double()
        sums[name] += (v.square() if name in o_of else v.abs()).sum(dim=dims).cpu()
        if name in firsts:
            firsts[name] += v.sum(dim=dims).cpu()
        counts[name] += t.numel() / t.shape[ch_dim]

    def hook_for(name: str):
        def hook(mod, inp, out):
            add(name, out, 1 if isinstance(mod, torch.nn.modules.conv._ConvNd) else out.dim() - 1)

        return hook

    def pre_hook_for(name: str):
        def hook(mod, inp):
            add(name, inp[0], inp[0].dim() - 1)

        return hook

    for g in groups:
        if g.name in o_of:  # the consumer's input: the o projection's, the down projection's
            hooks.append(modules[o_of[g.name].module].register_forward_pre_hook(pre_hook_for(g.name)))
        else:
            hooks.append(modules[g.name].register_forward_hook(hook_for(g.name)))
    _forward_all(graph.model, batches, hooks)
    names = [g.name for g in groups]
    means = [firsts[n].numpy() for n in names if n in firsts]
    flat = reduce(np.concatenate([sums[n].numpy() for n in names] + means + [np.array([counts[n] for n in names])]))
    flat, first = _split_firsts(flat, names, width, firsts) if fluctuation else (flat, None)
    return _activation_finish(graph, groups, o_of, width, flat, modules, first)


def _split_firsts(flat: np.ndarray, names: list[str], width: dict, firsts: dict) -> tuple[np.ndarray, dict]:
    """The all-reduced ``[second moments, first moments (consumer inputs only), counts]``: the array
    without the first moments, and those per group."""
    second = sum(width[n] for n in names)
    first, i = {}, second
    for n in names:
        if n in firsts:
            first[n] = torch.from_numpy(flat[i : i + width[n]].copy())
            i += width[n]
    return np.concatenate([flat[:second], flat[-len(names):]]), first


def _activation_finish(graph: Graph, groups: list, o_of: dict, width: dict, flat: np.ndarray,
                       modules: dict, first: dict | None = None) -> dict[str, torch.Tensor]:
    """Per-unit scores from the all-reduced sums (``flat``: every group's channel sums, then one count
    per group): RMS x consumer column norm where ``o_of`` names a consumer, else mean |x| x the
    root's output-weight norm; a block group scores 1. ``first``: the consumer inputs' channel sums
    (``fluctuation``): variance x squared column norm there instead."""
    out: dict[str, torch.Tensor] = {}
    i = 0
    total = flat[-len(groups):]
    for j, g in enumerate(groups):
        act = torch.from_numpy(flat[i : i + width[g.name]].copy()) / max(total[j], 1.0)
        i += width[g.name]
        if g.name in o_of and first is not None and g.name in first:  # FLAP: variance x squared column norm
            om = modules[o_of[g.name].module]
            col = om.weight.detach().double().cpu().norm(dim=weight_dims(om)[0])
            n = max(total[j], 1.0)
            mean = first[g.name] / n
            var = ((act - mean.square()) * (n / max(n - 1.0, 1.0))).clamp_min(0.0)  # sample variance
            out[g.name] = (var * col.square()).reshape(g.size, -1).sum(dim=1)
        elif g.name in o_of:  # RMS of the consumer's input channel x the norm of its column
            om = modules[o_of[g.name].module]
            o = om.weight.detach().double().cpu()
            out[g.name] = (act.sqrt() * o.norm(dim=weight_dims(om)[0])).reshape(g.size, -1).sum(dim=1)
        else:
            out[g.name] = graph.unit_scores(g, act * _out_weight_norm(modules[g.name]))
    for g in graph.groups:
        if g.kind == "block":
            out[g.name] = torch.ones(1, dtype=torch.float64)
    return out


def _sole_linear_consumer(g: GroupInfo, modules: dict) -> Any:
    """The one member that reads the neuron group's channels, when it is a ``nn.Linear`` or HF
    ``Conv1D`` whose input features are the group's channels 1:1 (an MLP's down projection); else
    None (several readers, a concat or flatten in between, a convolution)."""
    readers = [m for m in g.members if not m.out]
    if len(readers) != 1 or readers[0].chunks != 1 or readers[0].parts or readers[0].unit != 1:
        return None
    mod = modules[readers[0].module]
    if not (isinstance(mod, torch.nn.Linear) or is_conv1d(mod)):
        return None
    width = g.channels or g.size
    return readers[0] if mod.weight.shape[weight_dims(mod)[1]] == width and width == g.size else None


def _out_weight_norm(mod: torch.nn.Module) -> torch.Tensor:
    """Norm of the weights that produce each output channel of ``mod``."""
    w = mod.weight.detach().double().cpu()
    if is_conv1d(mod):  # Hugging Face Conv1D (in, out): a channel is a column
        return w.norm(dim=0)
    if isinstance(mod, torch.nn.modules.conv._ConvTransposeNd):  # (in, out / groups, ...): a channel is a column
        return w.transpose(0, 1).flatten(1).norm(dim=1).repeat(mod.groups)
    if isinstance(mod, torch.nn.Embedding):  # (vocabulary, width): a channel is a column
        return w.norm(dim=0)
    if w.dim() == 1:  # LayerNorm / BatchNorm scale
        return w.abs()
    return w.flatten(1).norm(dim=1)


def prune_order(scores: torch.Tensor) -> list[int]:
    """Channel indices, least important first (stable: ties broken by index)."""
    return torch.sort(scores, stable=True).indices.tolist()
