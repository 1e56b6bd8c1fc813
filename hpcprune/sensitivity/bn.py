"""BatchNorm in cells: re-estimating the statistics downstream of a cut, and folding BatchNorms
into the convolutions before them.

Re-estimation: pruning shifts the statistics of the BatchNorms after the cut; without re-estimating
them on training batches, cells overstate the damage of pruning. In a team every member
re-estimates on its share of the batches and ``combine_bn_stats`` makes the team's average.

Folding (``sensitivity.fold_bn``): per cell, after the cut and the re-estimation, a BatchNorm that
only follows a convolution becomes part of that convolution's weights and bias and is skipped: one
pass over the activations less per pair; numbers agree to rounding (~1e-7).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from .split import Team


def running_bns(roots: Sequence[nn.Module]) -> list[nn.Module]:
    """The BatchNorms in ``roots`` that keep running statistics (those without use batch
    statistics in eval too: nothing to re-estimate)."""
    return [m for r in roots for m in r.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


@torch.no_grad()
def reestimate(bns: Sequence[nn.Module], forward: Callable[[], None], team: Team | None = None) -> list:
    """Re-estimate the statistics of ``bns`` (cumulative average) over what ``forward()`` runs;
    returns what ``restore`` puts back. With ``team``, each member's ``forward`` runs its share of
    the batches and the members' averages are combined, weighted by batches."""
    saved = [(bn, (bn.running_mean, bn.running_var, bn.momentum, bn.num_batches_tracked.clone())) for bn in bns]
    for bn in bns:
        bn.running_mean = torch.zeros_like(bn.running_mean)
        bn.running_var = torch.ones_like(bn.running_var)
        bn.num_batches_tracked.zero_()
        bn.momentum = None
        bn.train()
    try:
        forward()
    finally:
        for bn in bns:
            bn.eval()
    if team is not None:
        combine_bn_stats(bns, team)
    return saved


def restore(saved: list) -> None:
    """The statistics ``reestimate`` replaced, back."""
    for bn, (mean, var, momentum, tracked) in saved:
        bn.running_mean, bn.running_var, bn.momentum = mean, var, momentum
        bn.num_batches_tracked.copy_(tracked)


def combine_bn_stats(bns: Sequence[nn.Module], team: Team) -> None:
    """Every member's BatchNorm averages over its share of batches -> the average over all batches."""
    if not bns:
        return
    n = torch.stack([bn.num_batches_tracked.double() for bn in bns])
    parts = [n] + [t for bn, nb in zip(bns, n) for t in (bn.running_mean.double().ravel() * nb, bn.running_var.double().ravel() * nb)]
    total = team.sum(torch.cat(parts).cpu().numpy())  # one copy off the device
    counts, pos = total[: len(bns)], len(bns)
    for bn, count in zip(bns, counts):
        c = bn.running_mean.numel()
        mean, var = total[pos: pos + c], total[pos + c: pos + 2 * c]
        pos += 2 * c
        if count == 0:  # not reached by any batch (a skipped block's): as on one rank, left reset
            continue
        mean, var = mean / count, var / count
        bn.running_mean = torch.as_tensor(mean, dtype=bn.running_mean.dtype).to(bn.running_mean.device).view_as(bn.running_mean)
        bn.running_var = torch.as_tensor(var, dtype=bn.running_var.dtype).to(bn.running_var.device).view_as(bn.running_var)
        bn.num_batches_tracked.fill_(int(count))


def _identity(x: Any) -> Any:
    return x


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.track_running_stats and bn.running_mean is not None)


def fold_pairs(chain: Sequence[tuple[str, nn.Module]]) -> list[tuple[int, nn.Module, nn.Module]]:
    """(chain index, convolution, BatchNorm): each convolution whose output goes only into a
    BatchNorm, both called once, in chain elements or inside a chain element (a block traced with
    ``torch.fx``; blocks that cannot be traced have none). An evaluation may fold the BatchNorm into
    the convolution's weights and bias (``fold``)."""
    pairs = []
    for i, (_, mod) in enumerate(chain):
        if i > 0 and _foldable(chain[i - 1][1], mod):
            pairs.append((i - 1, chain[i - 1][1], mod))
        if any(True for _ in mod.children()):
            pairs += [(i, conv, bn) for conv, bn in _traced_pairs(mod)]
    return pairs


def _traced_pairs(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Inside ``block``: (convolution, BatchNorm) where the BatchNorm is the convolution's only user,
    each called once; none when ``block`` cannot be traced."""
    try:
        gm = torch.fx.symbolic_trace(block)
    except Exception:  # noqa: BLE001 - any untraceable block simply folds nothing
        return []
    mods = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if (user.op == "call_module" and user.args[:1] == (node,) and len(user.args) == 1 and not user.kwargs
                and calls[node.target] == 1 and calls[user.target] == 1 and _foldable(mods[node.target], mods[user.target])):
            pairs.append((mods[node.target], mods[user.target]))
    return pairs


@torch.no_grad()
def fold(pairs: Sequence[tuple[int, nn.Module, nn.Module]], k: int, whole_k: bool) -> list:
    """Fold the BatchNorms of chain elements after ``k`` (and in ``k`` when the cell runs all of
    it, not from an in-block cache) into their convolutions (what ``unfold`` undoes):
    W' = W * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta."""
    saved = []
    for i, conv, bn in pairs:
        if i < k or (i == k and not whole_k):
            continue
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        w = conv.weight.data
        new_w = w * scale.view(-1, *([1] * (w.dim() - 1))).to(w.dtype)
        if w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
            new_w = new_w.contiguous(memory_format=torch.channels_last)
        b = conv.bias.data if conv.bias is not None else None
        saved.append((conv, bn, w, b))
        conv.weight.data = new_w
        if b is not None:
            conv.bias.data = b * scale + shift
        else:
            conv.bias = nn.Parameter(shift.to(w.dtype), requires_grad=False)
        bn.forward = _identity
    return saved


def unfold(saved: list) -> None:
    """The convolutions' weights and biases before ``fold``, and the BatchNorms run again."""
    for conv, bn, w, b in reversed(saved):
        conv.weight.data = w
        if b is None:
            conv.bias = None
        else:
            conv.bias.data = b
        del bn.forward
