"""Bias compensation of a cut (FLAP: An et al., "Fluctuation-based Adaptive Structured Pruning for
Large Language Models", AAAI 2024, its bias-compensation step).

A group read by exactly one linear layer (an MLP's down projection reading the neurons, an
attention's output projection reading the heads) loses, with its removed input channels ``j``,
``sum_j W[:, j] * x_j`` of that layer's output. The expectation of that sum over the calibration
tokens, ``W[:, removed] @ mean(x[removed])``, is added to the layer's bias (a bias is created where
the layer has none), so that only the channels' fluctuation around their mean is lost; the
``fluctuation`` criterion (``importance``) ranks the channels by that fluctuation.

With ``prune.bias_compensation=true`` the sensitivity cells measure each cut with its compensation,
the prune stage adds it to a copy of the dense model before the plan's cut (the means are the dense
model's, as in FLAP), and the pruned weights hold the biases: :func:`create_missing_biases` gives a rebuilt model (``load_pruned``,
the fine-tune job, ``load_hf_dir``) the bias parameters the stored weights name. Groups read by
something else (several layers, a convolution, a concat) are cut without compensation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .cuts import member_channels
from .tp_layers import is_conv1d, weight_dims


@dataclass(frozen=True)
class Target:
    """Where a group's cut is compensated: the consumer layer's name, the group member that maps
    units to its input channels, its input width and the calibration mean of each input channel
    (float64, shape ``(channels,)``)."""

    consumer: str
    member: Any
    channels: int
    mean: torch.Tensor


def consumers(graph: Any) -> dict[str, tuple[str, Any, int]]:
    """Per group that can be compensated (a head group, or a neuron group with one linear reader;
    ``importance._sole_linear_consumer``): (consumer name, its member, its input width)."""
    from .importance import _sole_linear_consumer

    modules = dict(graph.model.named_modules())
    out: dict[str, tuple[str, Any, int]] = {}
    for g in graph.groups:
        if g.kind == "heads":
            readers = [m for m in g.members if not m.out]
            m = readers[0] if len(readers) == 1 else None
        elif g.kind == "neurons":
            m = _sole_linear_consumer(g, modules)
        else:
            m = None
        mod = modules.get(m.module) if m is not None else None
        if mod is not None and (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            out[g.name] = (m.module, m, int(mod.weight.shape[weight_dims(mod)[1]]))
    return out


def prepare(graph: Any, batches: Sequence[tuple[torch.Tensor, Any]],
            reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Target]:
    """The compensation targets of ``graph``'s groups, with the input means of their consumers over
    ``batches`` (this rank's share of the calibration batches; ``reduce`` sums over ranks: the same
    means on every rank). One forward pass, no gradients."""
    found = consumers(graph)
    modules = dict(graph.model.named_modules())
    names = sorted({c for c, _, _ in found.values()})
    widths = {c: w for c, _, w in found.values()}
    sums = {n: torch.zeros(widths[n], dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0.0)
    hooks = []

    def hook_for(name: str):
        def hook(mod, inp):
            x = inp[0].detach()
            sums[name] += x.double().reshape(-1, x.shape[-1]).sum(dim=0).cpu()
            counts[name] += x.numel() / x.shape[-1]

        return hook

    for n in names:
        hooks.append(modules[n].register_forward_pre_hook(hook_for(n)))
    try:
        with torch.no_grad():
            was = graph.model.training
            graph.model.eval()
            for x, _ in batches:
                graph.model(x)
            graph.model.train(was)
    finally:
        for h in hooks:
            h.remove()
    flat = np.concatenate([sums[n].numpy() for n in names] + [np.array([counts[n] for n in names])])
    flat = reduce(flat) if reduce is not None else flat
    means, i = {}, 0
    for j, n in enumerate(names):
        w = sums[n].numel()
        means[n] = torch.from_numpy(flat[i : i + w].copy()) / max(float(flat[len(flat) - len(names) + j]), 1.0)
        i += w
    return {g: Target(c, m, w, means[c]) for g, (c, m, w) in found.items()}


def vector(module: nn.Module, target: Target, removed_units: Sequence[int]) -> torch.Tensor:
    """``W[:, cols] @ mean[cols]`` for the consumer's input channels ``cols`` of ``removed_units``,
    from ``module``'s current weights (the dense ones: computed before the cut), in the weight's
    dtype; shape ``(out_features,)``."""
    cols = member_channels(target.member, list(removed_units), target.channels)
    w = module.weight.detach()
    m = target.mean.to(w.device)
    if is_conv1d(module):  # HF Conv1D: weight (in, out)
        b = w.index_select(0, cols.to(w.device)).double().T @ m[cols.to(w.device)]
    else:
        b = w.index_select(1, cols.to(w.device)).double() @ m[cols.to(w.device)]
    return b.to(w.dtype)


@dataclass
class Added:
    """A compensation added to a layer's bias in place; ``restore()`` removes it exactly."""

    module: nn.Module | None = None
    created: bool = False
    saved: torch.Tensor | None = None

    def restore(self) -> None:
        if self.module is None:
            return
        if self.created:
            self.module.bias = None
        else:
            self.module.bias.data.copy_(self.saved)
        self.module = None


def add(module: nn.Module, b: torch.Tensor) -> Added:
    """Add ``b`` to ``module``'s bias (creating the bias parameter when it has none)."""
    if module.bias is None:
        module.bias = nn.Parameter(b.detach().clone(), requires_grad=module.weight.requires_grad)
        return Added(module, True)
    saved = module.bias.data.clone()
    module.bias.data += b.to(module.bias.dtype)
    return Added(module, False, saved)


def apply(dense: nn.Module, pruned: nn.Module, targets: Mapping[str, Target],
          removed: Mapping[str, Sequence[int]]) -> list[str]:
    """Compensate every cut of ``removed`` (group name -> removed units) on ``pruned``, with the
    ``dense`` model's weights and the targets' means (FLAP uses the dense statistics for every layer).
    The prune stage calls it on a copy of the dense model *before* cutting it: the biases are then at
    the dense widths and the cut takes the rows of a consumer whose own outputs are a cut group. A
    consumer ``pruned`` does not have (a removed block) is skipped. Returns the consumers compensated."""
    dmods, pmods = dict(dense.named_modules()), dict(pruned.named_modules())
    done = []
    for name, units in removed.items():
        t = targets.get(name)
        if t is None or not units or t.consumer not in pmods or t.consumer not in dmods:
            continue
        add(pmods[t.consumer], vector(dmods[t.consumer], t, units))
        done.append(t.consumer)
    return done


def new_bias_params(model: nn.Module, targets: Mapping[str, Target]) -> int:
    """Parameters that compensation adds at most: the output width of every target consumer
    without a bias (the allocation reserves them under a params budget)."""
    mods = dict(model.named_modules())
    seen, n = set(), 0
    for t in targets.values():
        mod = mods.get(t.consumer)
        if mod is not None and mod.bias is None and t.consumer not in seen:
            seen.add(t.consumer)
            n += int(mod.weight.shape[weight_dims(mod)[0]])
    return n


def create_missing_biases(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """Give ``model`` the bias parameters that stored weights (``shapes``: name -> shape) hold and it
    lacks (a linear layer whose cut was compensated: :func:`add` created its bias), zero-filled before
    they are loaded. Returns their names; other missing or unexpected keys are left to the loader
    to report."""
    mods = dict(model.named_modules())
    have = set(model.state_dict())
    made = []
    for key, shape in shapes.items():
        if key in have or not key.endswith(".bias"):
            continue
        mod = mods.get(key[: -len(".bias")])
        if isinstance(mod, nn.Linear) and mod.bias is None and tuple(shape) == (mod.out_features,):
            mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype, device=mod.weight.device))
            made.append(key)
    return made
