"""The allocator's latency model, measured on rank 0's device when a latency budget is given
(``prune.target.latency``): used by the allocation and prune stages.

``/latency``: one group pruned at each grid ratio, measured once around the dense model;
``/latency/around_<k>``: measured again around an allocation whose pruned model missed its target.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any

import numpy as np

from .. import allocate
from ..graph import Graph, n_keep
from ..runs import dense_model
from ..store import RunFile, put_attrs, replace_group
from .context import Context, latency, latency_clock, plan

log = logging.getLogger("hpcprune.stages")


def latency_table(ctx: Context, cfg: Any, rf: RunFile) -> None:
    """Latency with one group pruned at each grid ratio, measured once (rank 0's device) and kept
    in the run file: the allocator's latency model."""
    grid = [float(r) for r in cfg.sensitivity.ratios]
    with rf.read() as f:
        if "latency" in f and f["latency"].attrs.get("complete", False):
            ctx.cost.set_latency_table(grid, f["latency/table_ms"][()], float(f["latency"].attrs["dense_ms"]))
            return
    dense = dense_model(rf, cfg)
    table = np.zeros((len(ctx.graph.groups), len(grid)))
    refs = []
    t0 = time.perf_counter()
    for gi, g in enumerate(ctx.graph.groups):
        # the dense model is measured again next to every row: a row's changes are taken against
        # a reference measured under the same machine conditions
        ref = latency(ctx, cfg, dense)
        refs.append(ref)
        for ri, r in enumerate(grid):
            model = copy.deepcopy(dense)
            n = g.size - n_keep(g, r, int(cfg.prune.round_to))  # the widths the allocator can choose
            Graph(model, ctx.example[:1], ctx.ignore).prune_group(g.name, ctx.orders[g.name][:n])
            table[gi, ri] = latency(ctx, cfg, model) - ref
    dense_ms = float(np.median(refs))
    table += dense_ms
    log.info("latency table: %d groups x %d ratios in %.1f s (dense %.2f ms)", *table.shape, time.perf_counter() - t0, dense_ms)
    ctx.cost.set_latency_table(grid, table, dense_ms)
    with rf.write() as f:
        h = replace_group(f, "latency")
        h.create_dataset("table_ms", data=table)
        h.create_dataset("ratios", data=np.array(grid))
        put_attrs(h, {"dense_ms": dense_ms, "batch": int(cfg.baseline.latency_batch), "threads": int(cfg.baseline.latency_threads),
                      "device": str(ctx.device),
                      "runtime": str(cfg.prune.latency_runtime), "clock": latency_clock(ctx, cfg), "complete": True})


def relinearize(ctx: Context, cfg: Any, rf: RunFile, ratios: np.ndarray, base_ms: float, attempt: int) -> None:
    """Latency table around allocation ``ratios`` (measured ``base_ms``): per group, the latency
    with that group at full width and at each grid ratio, every other group as allocated.
    Stored as ``/latency/around_<attempt>``."""
    grid = [float(r) for r in cfg.sensitivity.ratios]
    G = len(ctx.graph.groups)
    dense = dense_model(rf, cfg)

    def measure(rs: np.ndarray) -> float:
        model = copy.deepcopy(dense)
        Graph(model, ctx.example[:1], ctx.ignore).apply_plan(plan(ctx, cfg, rs))
        return latency(ctx, cfg, model)

    t0 = time.perf_counter()
    table, zero = allocate.latency_table_around(measure, grid, ratios, base_ms)
    log.info("latency table around the allocation: %d groups x %d ratios in %.1f s (base %.2f ms)", G, len(grid) + 1,
             time.perf_counter() - t0, base_ms)
    ctx.cost.set_latency_table(grid, table, float(ctx.cost.dense["latency"]), base_ms, zero)
    with rf.write() as f:
        h = f["latency"].require_group(f"around_{attempt}")
        for k in list(h):
            del h[k]
        h.create_dataset("table_ms", data=table)
        h.create_dataset("zero_ms", data=zero)
        h.create_dataset("ratios", data=np.asarray(ratios, dtype=np.float64))
        h.attrs["base_ms"] = float(base_ms)
