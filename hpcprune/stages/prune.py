"""The prune stage (rank 0): the dense model cut by the allocation's plan, BatchNorm statistics
re-estimated, measured; every budget checked on the real model. A missed latency target measures
the latency model again around that allocation and re-allocates from it
(``prune.latency_attempts`` times at most); a missed energy target (``prune.target.energy``,
allocated as a MACs cap: ``allocate.allocator_targets``) lowers that cap by the factor of the miss
and re-allocates likewise.

Writes ``/pruned``: the plan (kept channels per group), metric, MACs, params, latency, energy, the pruned
weights (``pruned.safetensors``).
"""
from __future__ import annotations

import json
import logging
from typing import Any

import h5py
import numpy as np
import torch

from .. import allocate, compensate, metrics
from ..config import targets as config_targets
from ..graph import Graph
from ..runs import dense_model
from ..store import RunFile, put_attrs, replace_group, write_weights
from . import allocation
from .context import Context, Record, measure, plan, speed_note, train_batches
from .latency import latency_table, relinearize

log = logging.getLogger("hpcprune.stages")


def run(ctx: Context, cfg: Any, rf: RunFile) -> Record:
    targets = config_targets(cfg)
    if "latency" in targets:
        latency_table(ctx, cfg, rf)
    with rf.read() as f:
        ratios = f["allocation/ratio"][()]
    adjustments: list[dict[str, Any]] = []
    for attempt in range(int(cfg.prune.latency_attempts)):
        model, kept, rec = _prune_to(ctx, cfg, rf, ratios)
        miss = _missed(targets, rec)
        if miss is None:
            break
        ratios = _reallocate(ctx, cfg, rf, ratios, rec, miss, attempt, adjustments)
    else:
        kind, measured = miss
        raise RuntimeError(f"prune.target.{kind}={targets[kind]}: still {measured:.3f} of the dense {kind} after "
                           f"{len(adjustments)} re-allocations (prune.latency_attempts); {kind} on this device may be noisy")
    for k, t in targets.items():
        if rec[f"{k}_kept"] > t + 1e-9:
            raise RuntimeError(f"pruned model keeps {rec[f'{k}_kept']:.4f} of the dense {k}, above prune.target.{k}={t}")
    log.info("pruned: %s %.4f, %.3f MACs kept, %.3f params kept, latency %.2f ms; %s", ctx.metric, rec["metric"],
             rec["macs_kept"], rec["params_kept"], rec["latency_ms"], speed_note(rec, "pruned", cfg))

    def write(f: h5py.File) -> None:
        p = replace_group(f, "pruned")
        put_attrs(p, rec)
        p.attrs["bn_recalib_batches"] = int(cfg.prune.bn_recalib_batches)
        p.attrs["latency_adjustments"] = json.dumps(adjustments)
        pl = p.create_group("plan")
        for name, units in kept.items():
            pl.create_dataset(name, data=np.array(units, dtype=np.int64))
        pl.attrs["groups"] = np.array(list(kept), dtype=object).astype(str).tolist()
        write_weights(rf, "pruned", model.state_dict(), p)
        p.attrs["complete"] = True

    return write


def _prune_to(ctx: Context, cfg: Any, rf: RunFile, ratios: np.ndarray) -> tuple[torch.nn.Module, dict[str, list[int]], dict[str, Any]]:
    """A fresh dense model cut to ``ratios``, its BatchNorm statistics re-estimated: (model, plan, record)."""
    kept = plan(ctx, cfg, ratios)
    model = dense_model(rf, cfg)
    if ctx.compensation:  # prune.bias_compensation: added at the dense widths, then cut with the plan (a consumer
        # whose own outputs are a cut group loses those rows of its bias with them)
        removed = {g.name: sorted(set(range(g.size)) - set(Graph.plan_units(g, kept[g.name])))
                   for g in ctx.graph.groups if g.name in kept and g.name in ctx.compensation}
        done = compensate.apply(ctx.model, model, ctx.compensation, removed)
        log.info("pruned: bias compensation in %d layer(s) (of %d that read a cut group)", len(done),
                 sum(1 for units in removed.values() if units))
    graph = Graph(model, ctx.example[:1], ctx.ignore)
    graph.apply_plan(kept)
    recal = int(cfg.prune.bn_recalib_batches)
    if recal:
        metrics.recalibrate_bn(model, train_batches(ctx, cfg, recal))
    return model, kept, measure(ctx, cfg, model)


def _missed(targets: dict[str, float], rec: dict[str, Any]) -> tuple[str, float] | None:
    """The first measured budget (latency, then energy) the pruned model misses: (kind, kept
    fraction), or None. An energy budget whose energy could not be measured is an error."""
    for kind in allocate.MEASURED:
        if kind not in targets:
            continue
        measured = float(rec[f"{kind}_kept"])
        if not np.isfinite(measured):
            raise RuntimeError(f"prune.target.{kind}={targets[kind]}: the pruned model's {kind} could not be measured "
                               f"({rec.get('energy_source', '')})")
        if measured > targets[kind]:
            return kind, measured
    return None


def _reallocate(ctx: Context, cfg: Any, rf: RunFile, ratios: np.ndarray, rec: dict[str, Any], miss: tuple[str, float],
                attempt: int, adjustments: list[dict[str, Any]]) -> np.ndarray:
    """A measured target was missed (``miss``: kind, kept fraction). Latency: the additive latency
    model (measured around the dense model) is measured again around the allocation just pruned, so
    that it is exact there. Both: the allocation continues from that point for the same targets with
    the MACs capped by the factor of the miss (sensitivity: only pruning more). Records the new
    allocation (and the miss in ``adjustments``); returns its ratios."""
    kind, measured = miss
    targets = config_targets(cfg)
    if kind == "latency":
        relinearize(ctx, cfg, rf, ratios, rec["latency_ms"], attempt)
    used = allocate.tighten_for_latency(targets, rec["macs_kept"], measured, kind=kind)
    adjustments.append({"attempt": attempt, "kind": kind, "measured": measured, "macs_kept": rec["macs_kept"], "targets": used,
                        "relinearized": kind == "latency"})
    log.info("%s kept %.3f > target %.3f: re-allocating from this allocation with MACs capped at %.3f%s", kind, measured,
             targets[kind], used["macs"], " (latency table measured around it)" if kind == "latency" else "")
    try:
        alloc = allocation.allocate_ratios(ctx, cfg, rf, used, start=ratios)
    except allocate.BudgetError as e:
        raise RuntimeError(f"prune.target.{kind}={targets[kind]}: still {measured:.3f} of the dense {kind} after "
                           f"{attempt} re-allocation(s), and the next step (MACs capped at {used['macs']:.3f}) is out "
                           f"of reach ({e})") from e
    write = allocation.record(ctx, cfg, alloc, used, adjustments)
    with rf.write() as f:
        write(f)
    return alloc.ratios
