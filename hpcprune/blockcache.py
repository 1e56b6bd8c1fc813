"""The part of one block's forward that a group's cut changes (a ``torch.fx`` trace of the block).

The sensitivity engine caches what enters the first chain element a group touches. When that
element is a block (a residual block, a transformer layer), much of the block may not depend on
the cut: a shortcut, the layers before the group's first member, and the group's first member
itself when it produces the group's channels from an unchanged input (its dense output holds every
channel; a cell takes the kept ones). A :class:`BlockPlan` lists the values a cell reuses (computed
once per group, dense) and the nodes a cell computes, in order; everything else is skipped.

Only blocks ``torch.fx`` can trace get a plan; others fall back to running the whole block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn


@dataclass
class BlockPlan:
    block: nn.Module
    placeholder: fx.Node
    order: list[fx.Node]  # every computing node of the block, in graph order (to capture the cache)
    cached: list[fx.Node]  # dense values a cell reuses
    sliced: dict[fx.Node, int]  # cached outputs of the group's first members: kept channels along this dim
    run: list[fx.Node]  # nodes a cell computes, in order
    out: fx.Node  # the block's output value


def _inplace(block: nn.Module, n: fx.Node) -> bool:
    if n.op == "call_module":
        return bool(getattr(block.get_submodule(str(n.target)), "inplace", False))
    if n.op == "call_method":
        return str(n.target).endswith("_") and not str(n.target).endswith("__")
    if n.op == "call_function":
        return bool(n.kwargs.get("inplace", False)) or getattr(n.target, "__name__", "").endswith("_")
    return False


def plan_block(block: nn.Module, prefix: str, members: dict[str, bool], no_unchanged_bn: bool) -> BlockPlan | None:
    """The plan for a cut of the group whose members (qualified name -> cuts its outputs) lie in
    ``block`` (named ``prefix``); None when tracing fails or nothing can be skipped.
    ``no_unchanged_bn``: refuse a plan that would skip a BatchNorm (cells re-estimate them)."""
    try:
        graph = fx.symbolic_trace(block).graph
    except Exception:
        return None
    changed: set[fx.Node] = set()
    sliced: dict[fx.Node, int] = {}
    placeholder = None
    order: list[fx.Node] = []
    out = None
    for n in graph.nodes:
        if n.op == "placeholder":
            if placeholder is not None:
                return None  # one input only (the chain passes one tensor)
            placeholder = n
            continue
        if n.op == "output":
            out = n.args[0]
            continue
        order.append(n)
        inputs_changed = any(a in changed for a in n.all_input_nodes)
        name = f"{prefix}.{n.target}" if n.op == "call_module" else None
        if name in members:
            mod = block.get_submodule(str(n.target))
            leaf = members[name] and not inputs_changed and (
                (isinstance(mod, nn.modules.conv._ConvNd) and mod.groups == 1) or isinstance(mod, nn.Linear))
            if leaf:
                sliced[n] = 1 if isinstance(mod, nn.modules.conv._ConvNd) else -1
            elif not inputs_changed:
                return None  # a member cut from an unchanged input that is not a plain layer
            changed.add(n)
        elif inputs_changed:
            changed.add(n)
    if placeholder is None or not isinstance(out, fx.Node) or out not in changed:
        return None
    run = [n for n in order if n in changed and n not in sliced]
    cached = list(dict.fromkeys([a for n in run for a in n.all_input_nodes if a not in changed] + list(sliced)))
    skipped = [n for n in order if n not in changed or n in sliced]
    if not [n for n in skipped if n.op in ("call_module", "call_function", "call_method")]:
        return None  # nothing to save: the whole block runs anyway
    if any(_inplace(block, n) for n in run if any(a in cached for a in n.all_input_nodes)):
        return None  # a cell would overwrite a cached value
    if no_unchanged_bn and any(n.op == "call_module" and isinstance(block.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm)
                               for n in skipped if n not in sliced):
        return None
    return BlockPlan(block, placeholder, order, cached, sliced, run, out)


def _exec(block: nn.Module, n: fx.Node, env: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(n.args, lambda a: env[a])
    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
    if n.op == "call_module":
        return block.get_submodule(str(n.target))(*args, **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)  # type: ignore[operator]
    if n.op == "call_method":
        obj, *rest = args
        return getattr(obj, str(n.target))(*rest, **kwargs)
    if n.op == "get_attr":
        obj: Any = block
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        return obj
    raise ValueError(f"cannot run fx node {n.op}")


def capture(plan: BlockPlan, x: torch.Tensor) -> list[torch.Tensor]:
    """The dense values a cell reuses, for block input ``x`` (run on the uncut model)."""
    env: dict[fx.Node, Any] = {plan.placeholder: x}
    want = set(plan.cached)
    for n in plan.order:
        if want <= env.keys():
            break
        env[n] = _exec(plan.block, n, env)
    return [env[n] for n in plan.cached]


def run(plan: BlockPlan, values: Sequence[torch.Tensor], keep: torch.Tensor | None, nhwc: bool = False) -> torch.Tensor:
    """The block's output with the group cut (its members sliced in place), from the cached values."""
    env: dict[fx.Node, Any] = {}
    for n, v in zip(plan.cached, values):
        if n in plan.sliced and keep is not None:
            v = v.index_select(plan.sliced[n] % v.dim(), keep)
            if nhwc and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        env[n] = v
    for n in plan.run:
        env[n] = _exec(plan.block, n, env)
    return env[plan.out]
