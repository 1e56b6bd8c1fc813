"""Channel importance criteria: which channels of a group go first.

``scores(name, graph, batches)`` returns one score per group channel (higher = keep). Scores that
need data (``taylor``) are sums over calibration batches, so that shares computed on several ranks
add up to the single-rank result.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch_pruning as tp

from .graph import Graph
from .metrics import task_loss

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random")


def _magnitude(p: int) -> Callable:
    # no normalisation: within one group only the order matters; `global` normalises itself
    return tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None)


def group_scores(
    graph: Graph, criterion: str, batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), seed: int = 0
) -> dict[str, torch.Tensor]:
    """Importance of every channel of every group of ``graph``'s (dense) model."""
    if criterion not in CRITERIA:
        raise ValueError(f"importance={criterion!r} is not a known criterion (choose from {', '.join(CRITERIA)})")
    out: dict[str, torch.Tensor] = {}
    if criterion == "random":
        for i, g in enumerate(graph.groups):
            gen = torch.Generator().manual_seed(seed * 1000003 + i)
            out[g.name] = torch.rand(g.size, generator=gen, dtype=torch.float64)
        return out
    if criterion == "taylor":
        model = graph.model
        model.zero_grad(set_to_none=True)
        was = model.training
        model.eval()
        for x, y in batches:
            # summed (not averaged) loss: gradients of shares add up across ranks
            task_loss(model(x), y, reduction="sum").backward()
        model.train(was)
        imp: Callable = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)
    elif criterion == "bn_scale":
        imp = tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)
    else:
        imp = _magnitude(1 if criterion == "l1" else 2)
    with torch.no_grad():
        for g in graph.groups:
            s = imp(graph.tp_group(g.name))
            if s is None:  # e.g. bn_scale on a group without BatchNorm: fall back to L2 magnitude
                s = _magnitude(2)(graph.tp_group(g.name))
            out[g.name] = s.detach().double().cpu()
    if criterion == "taylor":
        graph.model.zero_grad(set_to_none=True)
    return out


def prune_order(scores: torch.Tensor) -> list[int]:
    """Channel indices, least important first (stable: ties broken by index)."""
    return torch.sort(scores, stable=True).indices.tolist()
