"""The allocation stage (rank 0): a pruning ratio per group under the budgets (``prune.method``:
``uniform``, ``global`` or ``sensitivity``), from the cost model and, for ``sensitivity``, the
measured cells. A latency budget first measures the latency table (``latency.py``).

Writes ``/allocation``: ratio and kept units per group, the predicted costs and loss. The prune
stage rewrites it when it re-allocates for a missed latency target.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import h5py
import numpy as np

from .. import allocate, compensate
from ..config import targets as config_targets
from ..graph import n_keep
from ..sensitivity import DONE
from ..store import RunFile, put_attrs, replace_group
from .context import Context, Record
from .latency import latency_table

log = logging.getLogger("hpcprune.stages")


def run(ctx: Context, cfg: Any, rf: RunFile) -> Record:
    targets = config_targets(cfg)
    if "latency" in targets:
        latency_table(ctx, cfg, rf)
    return record(ctx, cfg, allocate_ratios(ctx, cfg, rf, targets), targets)


def allocate_ratios(ctx: Context, cfg: Any, rf: RunFile, targets: dict[str, float],
                    start: np.ndarray | None = None) -> allocate.Allocation:
    """The allocation of ``prune.method`` for ``targets`` (``start``: continue from those ratios); an
    energy budget is allocated as a MACs cap (``allocate.allocator_targets``)."""
    targets = allocate.allocator_targets(targets)
    if ctx.compensation and "params" in targets:  # the biases compensation may add: reserved under the budget
        extra = compensate.new_bias_params(ctx.model, ctx.compensation) / float(ctx.cost.dense["params"])
        targets = {**targets, "params": targets["params"] - extra}
    method = str(cfg.prune.method)
    max_ratio, round_to = float(cfg.prune.max_ratio), int(cfg.prune.round_to)
    if method == "uniform":
        return allocate.uniform(ctx.cost, targets, max_ratio, round_to)
    if method == "global":
        return allocate.global_ranking(ctx.cost, ctx.scores, targets, max_ratio, round_to)
    with rf.read() as f:
        status = f["sensitivity/status"][()]
        if str(f["sensitivity"].attrs.get("damage", "loss")) == "kl":  # KL from the dense model: 0 for it
            damage = np.where(status == DONE, f["sensitivity/kl"][()], np.nan)
        else:
            ref = float(f["sensitivity"].attrs["dense_calib_loss"])
            damage = np.where(status == DONE, f["sensitivity/loss"][()] - ref, np.nan)
    damage = _check_damage(ctx, cfg, damage, status)
    return allocate.sensitivity(ctx.cost, list(cfg.sensitivity.ratios), damage, targets, max_ratio, round_to, start=start,
                                time_limit_s=float(cfg.prune.exact_time_s))


def _check_damage(ctx: Context, cfg: Any, damage: np.ndarray, status: np.ndarray) -> np.ndarray:
    """NaN cells (the pruned model's output was NaN) are unusable: a group's curve ends before its
    first one (as after an early stop), so the allocator never picks or interpolates across it.
    With no usable cell at all there is nothing to allocate from (cells that cut nothing, a group
    narrower than ``prune.round_to`` or a ratio it rounds away, measure the dense model: not usable)."""
    names = [g.name for g in ctx.graph.groups]
    nan = (status == DONE) & np.isnan(damage)
    ratios, round_to = [float(r) for r in cfg.sensitivity.ratios], int(cfg.prune.round_to)
    cuts = np.array([[n_keep(g, r, round_to) < g.size for r in ratios] for g in ctx.graph.groups], bool).reshape(damage.shape)
    if nan.any() and not np.isfinite(damage[cuts]).any():
        raise RuntimeError(f"prune.method=sensitivity: every sensitivity cell's calibration loss is NaN (the model outputs "
                           f"NaN once a group is pruned), nothing to allocate from; check the model or use prune.method=uniform")
    if nan.any():
        bad = [f"{names[g]}@{float(cfg.sensitivity.ratios[int(r)])}" for g, r in zip(*np.nonzero(nan))]
        log.warning("sensitivity: %d cell(s) with a NaN loss, not used by the allocation: %s", len(bad), ", ".join(bad[:10]))
    damage = damage.copy()
    for g in range(damage.shape[0]):
        first = np.flatnonzero(nan[g])
        if first.size:
            damage[g, first[0]:] = np.nan
    return damage


def record(ctx: Context, cfg: Any, alloc: allocate.Allocation, targets: dict[str, float],
           adjusted: list | None = None) -> Record:
    """Log ``alloc`` and return the writer of ``/allocation`` (``targets``: the budgets it was made
    for, tightened after a missed latency target; ``adjusted``: those misses)."""
    method, max_ratio, round_to = str(cfg.prune.method), float(cfg.prune.max_ratio), int(cfg.prune.round_to)
    groups = ctx.graph.groups
    # units kept of each group's units, as the cut makes them (round_to applied): the ratio alone can cut
    # nothing (a group of 8 channels at 0.5 with round_to=8); a block is kept or removed, not cut
    log.info("allocation (%s): units kept %s, predicted kept %s", method,
             {g.name: ("removed" if n_keep(g, float(r), round_to) == 0 else "kept") if g.kind == "block"
              else f"{n_keep(g, float(r), round_to)}/{g.size}" for g, r in zip(groups, alloc.ratios)},
             {k: round(v, 4) for k, v in alloc.predicted.items()})
    given = config_targets(cfg)
    for k, t in targets.items():
        got = alloc.predicted.get(k)
        if got is not None and k in ("macs", "params") and got < 0.8 * float(t):
            blocks = [g.name for g, r in zip(groups, alloc.ratios) if g.kind == "block" and n_keep(g, float(r), round_to) == 0]
            why = (f"a removed block takes all its cost at once ({', '.join(blocks[:3])}{', ...' if len(blocks) > 3 else ''}): "
                   "groups.kinds without block, or a looser target, lands closer" if blocks and method == "sensitivity" else
                   f"prune.round_to={round_to} moves every group's width in steps of that many channels; a lower round_to"
                   + ("" if method == "sensitivity" else ", or prune.method=sensitivity,") + " lands closer")
            log.warning("allocation (%s): keeps %.3f of the %s for prune.target.%s=%s, well below the target: it "
                        "prunes more than asked (%s)", method, got, k, k, t, why)

    def write(f: h5py.File) -> None:
        a = replace_group(f, "allocation")
        a.create_dataset("ratio", data=alloc.ratios)
        a.create_dataset("keep", data=np.array([n_keep(g, r, round_to) for g, r in zip(groups, alloc.ratios)]))
        put_attrs(a, {"method": method, "targets": json.dumps(given), "max_ratio": max_ratio, "round_to": round_to,
                      "predicted_macs": alloc.predicted["macs"], "predicted_params": alloc.predicted["params"],
                      "predicted_latency": alloc.predicted.get("latency"),
                      "predicted_loss_increase": alloc.predicted_loss,
                      "targets_used": json.dumps(targets), "adjustments": json.dumps(adjusted or [])})
        a.attrs["complete"] = True

    return write
