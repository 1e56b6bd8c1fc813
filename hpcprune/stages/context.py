"""What the stages work on: one :class:`Context` per run, and the helpers several stages share.

The context is built in two steps, because half of it cannot exist before two stages have run:

- at the start (``pipeline``), on every rank: the world, the device, the data, the example input;
  on rank 0 also the model ``prepare`` built and checked (the groups stage verifies that instance);
- by :func:`analyse`, once, on every rank, after the groups and baseline stages: the dense model,
  its baseline record, the graph of the groups the groups stage kept, importance scores and prune
  orders, the cost model and the calibration batches. Every stage after baseline reads these.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import h5py
import numpy as np
import torch
from torch import nn

from .. import allocate, compensate, importance, metrics
from ..config import ConfigError
from ..energy import EnergyResult
from ..energy import measure_model as measure_energy
from ..graph import Excluded, Graph, n_keep
from ..runs import dense_model, ignore_names
from ..store import RunFile, RunFileError
from ..world import World

log = logging.getLogger("hpcprune.stages")

Batches = list[tuple[torch.Tensor, torch.Tensor]]
# what a stage returns on rank 0 when it completes: a function that writes the stage's result (its
# group, complete=True) into the run-file transaction the pipeline opens for it
Record = Callable[[h5py.File], None]


@dataclass
class Context:
    world: World
    run_dir: str
    device: str
    data: Any  # hpcprune.zoo.data.TaskData: train, val, calib, example_input, metric
    arch_model: nn.Module | None = None  # rank 0: the model prepare built (and loaded the checkpoint into)
    # ---- set by analyse(), once the run file holds the groups and the dense weights
    model: nn.Module | None = None  # the dense model, eval mode, on the CPU between stages
    base: dict[str, Any] = field(default_factory=dict)  # /baseline's attributes (dense metric, params, MACs, latency)
    graph: Graph | None = None  # on ``model``: the groups the groups stage kept, in its order
    ignore: list[str] = field(default_factory=list)  # layers whose outputs are never cut
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # importance per unit, per group
    orders: dict[str, list[int]] = field(default_factory=dict)  # units in the order they are pruned
    cost: allocate.CostModel | None = None  # MACs and params as polynomials in the kept fractions (+ latency tables)
    calib: Batches = field(default_factory=list)  # the calibration set, on ``device``
    module_macs: dict[str, int] = field(default_factory=dict)  # per layer, for the cells' cost records
    compensation: dict[str, Any] = field(default_factory=dict)  # prune.bias_compensation: group -> compensate.Target
    # rank 0: what a stage asks to be done once its record is committed (publish a result, drop a lock)
    after_commit: list[Callable[[], None]] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.world.is_main

    @property
    def example(self) -> torch.Tensor:
        return self.data.example_input

    @property
    def metric(self) -> str:
        return self.data.metric


def build_graph(model: nn.Module, cfg: Any, example: torch.Tensor, exclude: Any = ()) -> tuple[Graph, list[str]]:
    """The dependency graph of ``model`` with the config's group kinds and ignored layers, and those
    layers' names (``groups.ignore`` and what the model declares)."""
    kinds = [str(k) for k in cfg.groups.kinds] if cfg.groups.kinds else None  # schema choices (str) as plain names
    ignore = ignore_names(model, list(cfg.groups.ignore or []))
    graph = Graph(model, example[:1], ignore, kinds, timeout_s=float(cfg.groups.timeout_s), exclude=exclude)
    return graph, ignore


# ---- the analysis (every rank, once) -------------------------------------------------------------
def analyse(ctx: Context, cfg: Any, rf: RunFile) -> Context:
    """Every rank: the graph on the dense model (the groups the groups stage kept), importance
    scores (data-driven criteria: each rank scores its share, the sums are all-reduced), the
    calibration batches and the cost model; rank 0 records the scores once."""
    model = dense_model(rf, cfg)
    with rf.read() as f:
        base = {k: v for k, v in f["baseline"].attrs.items()}
        h = f["groups"]
        v1 = "excluded" not in h.attrs  # schema 1: no verification record; its groups are the recorded ones
        excluded = [e[0] for e in json.loads(h.attrs.get("excluded", "[]"))]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in h["name"][()]]
        cost_terms = {k[:-5]: (h["cost"][k][()], h["cost"][k[:-5] + "_exps"][()]) for k in h.get("cost", {}) if k.endswith("_coef")}
    graph, ignore = build_graph(model, cfg, ctx.example, exclude=excluded)
    if v1:
        graph.exclude([Excluded(g.name, g.layer_types, "not a group of the run file (schema 1)")
                       for g in graph.groups if g.name not in names])
    if [g.name for g in graph.groups] != names:
        raise RunFileError(f"{rf.path}: the model's groups ({len(graph.groups)}) are not the ones its groups stage "
                           f"recorded ({len(names)}): the model changed; use another hydra.run.dir")
    calib = metrics.make_batches(ctx.data.calib, int(cfg.sensitivity.batch_size), ctx.device)
    if len(ctx.data.calib) == 0:
        raise ConfigError("data.calib_samples: the calibration set is empty")
    share = [(x.cpu(), y.cpu()) for x, y in calib[ctx.world.rank :: ctx.world.size]]
    reduce = ctx.world.allreduce_sum if ctx.world.size > 1 else None
    scores = importance.group_scores(graph, str(cfg.importance), share, int(cfg.seed), reduce)
    orders = {n: importance.prune_order(s) for n, s in scores.items()}
    module_macs = metrics.module_macs(model, ctx.example[:1])
    cost = _cost_model(model, graph, ctx.example, cost_terms)
    comp = compensate.prepare(graph, share, reduce) if bool(cfg.prune.get("bias_compensation", False)) else {}
    if ctx.main:
        _record_scores(rf, graph, scores, str(cfg.importance))
    # the architecture's model is not needed any more (a resumed run whose groups stage was done kept it)
    return dataclasses.replace(ctx, arch_model=None, model=model, base=base, graph=graph, ignore=ignore, scores=scores,
                               orders=orders, cost=cost, calib=calib, module_macs=module_macs, compensation=comp)


def _cost_model(model: nn.Module, graph: Graph, example: torch.Tensor, terms: dict[str, Any]) -> allocate.CostModel:
    """The cost model the groups stage recorded; a run file of schema 1 has none: derived again."""
    if terms:
        return allocate.CostModel(graph.groups, terms)
    from ..costs import ExactCost, probes_from_graph

    exact = ExactCost.derive(model, example[:1], probes_from_graph(graph))
    return allocate.CostModel.from_exact(graph.groups, exact)


def _record_scores(rf: RunFile, graph: Graph, scores: dict[str, torch.Tensor], criterion: str) -> None:
    with rf.read() as f:
        recorded = "groups/importance" in f or "importance" in f
    if not recorded:  # its own group: /groups stays as the groups stage completed it
        with rf.write() as f:
            imp = f.create_group("importance")
            for g in graph.groups:
                imp.create_dataset(g.name, data=scores[g.name].numpy())
            imp.attrs["criterion"] = criterion


# ---- helpers of several stages -------------------------------------------------------------------
def train_batches(ctx: Context, cfg: Any, n: int) -> Batches:
    """The first ``n`` batches of a seeded shuffle of the training data (the same on every rank)."""
    if n <= 0:
        return []
    loader = torch.utils.data.DataLoader(ctx.data.train, batch_size=int(cfg.baseline.batch_size), shuffle=True,
                                         generator=torch.Generator().manual_seed(int(cfg.seed)))
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) >= n:
            break
    return batches


def latency(ctx: Context, cfg: Any, model: nn.Module) -> float:
    """Milliseconds per batch of ``baseline.latency_batch`` on the run's device, run by torch or by
    ONNX Runtime (``prune.latency_runtime``), timed by :func:`latency_clock`."""
    b = cfg.baseline
    return metrics.latency_ms(model.to(ctx.device), ctx.example.to(ctx.device), int(b.latency_batch),
                              repeats=int(b.latency_repeats), threads=int(b.latency_threads),
                              runtime=str(cfg.prune.latency_runtime), clock=latency_clock(ctx, cfg))


def latencies(ctx: Context, cfg: Any, models: list[nn.Module]) -> list[float]:
    """:func:`latency` of each of ``models``, timed in alternation (:func:`hpcprune.metrics.latencies_ms`)."""
    b = cfg.baseline
    return metrics.latencies_ms([m.to(ctx.device) for m in models], ctx.example.to(ctx.device), int(b.latency_batch),
                                repeats=int(b.latency_repeats), threads=int(b.latency_threads),
                                runtime=str(cfg.prune.latency_runtime), clock=latency_clock(ctx, cfg))


def latency_clock(ctx: Context, cfg: Any) -> str:
    """``wall`` or ``thread``: ``baseline.latency_clock`` on the run's device
    (:func:`hpcprune.metrics.latency_clock`); ``wall`` for a run file whose dense latency was
    measured before that key existed, so that its latencies stay comparable."""
    b = cfg.baseline
    if ctx.base and "latency_clock" not in ctx.base:
        return "wall"
    return metrics.latency_clock(str(b.latency_clock), ctx.device, int(b.latency_threads), str(cfg.prune.latency_runtime))


def energy(ctx: Context, cfg: Any, model: nn.Module) -> EnergyResult:
    """Joules per sample at ``baseline.latency_batch`` on the run's device (:mod:`hpcprune.energy`;
    unavailable with the reason, or with ``baseline.energy=false``). The model is left on the device."""
    b = cfg.baseline
    if not b.energy:
        return EnergyResult.unavailable("baseline.energy=false")
    return measure_energy(model, ctx.example, int(b.latency_batch), ctx.device, threads=int(b.latency_threads))


def measure(ctx: Context, cfg: Any, model: nn.Module) -> dict[str, Any]:
    """A pruned model's record: metric and loss on the validation set, params, MACs, latency, energy
    per sample, and each as a fraction of the dense model's. The speed-up is the ratio of the dense
    model's and this one's latencies timed again in alternation (``latency_pair_ms``): both under the
    same machine conditions, where the baseline's dense latency may be minutes old on a node whose
    load drifts. ``latency_ms`` (and ``latency_kept``) is timed alone, as the dense model and the
    latency tables are: alternating passes find colder caches."""
    model = model.eval()
    sums = metrics.evaluate(model, metrics.make_batches(ctx.data.val, 256))
    m = metrics.macs(model, ctx.example[:1])
    p = metrics.params(model)
    lat = latency(ctx, cfg, model)
    pair = [float(ctx.base["latency_ms"]), lat]  # a context without the dense model: the baseline's
    if ctx.model is not None:
        pair = latencies(ctx, cfg, [ctx.model, model])
        ctx.model.cpu()
    e = energy(ctx, cfg, model)
    model.cpu()
    base = ctx.base
    dense_j = float(base.get("energy_j_per_sample", np.nan))
    return dict(metric=sums.metric(ctx.metric), loss=sums.mean_loss(), params=p, macs=m, latency_ms=lat,
                latency_runtime=str(cfg.prune.latency_runtime), latency_clock=latency_clock(ctx, cfg),
                macs_kept=m / float(base["macs"]), params_kept=p / float(base["params"]),
                latency_pair_ms=[float(v) for v in pair], latency_speedup=pair[0] / pair[1],
                latency_kept=lat / float(ctx.cost.dense.get("latency", base["latency_ms"])),
                energy_j_per_sample=e.j_per_sample, energy_source=e.source,
                energy_kept=e.j_per_sample / dense_j if dense_j > 0 else np.nan)


def speed_note(rec: dict[str, Any], what: str, cfg: Any) -> str:
    """The log's words for :func:`measure`'s speed-up, and a warning when ``what`` (the pruned or
    fine-tuned model) is slower than the dense one: the speed-up is timed in alternation, not the
    ratio of the two stages' own latencies, which are timed alone minutes apart."""
    dense, own = rec["latency_pair_ms"]
    speedup = float(rec["latency_speedup"])
    if speedup < 1.0:
        log.warning("%s: slower than the dense model on this device (speed-up %.2fx, %.2f vs %.2f ms): fewer MACs "
                    "are not less time here; a loaded machine times noisily, and widths this device runs poorly "
                    "are slow: prune for time with prune.target.latency, or raise prune.round_to", what, speedup, own, dense)
    b = cfg.baseline
    threads = int(b.latency_threads)
    how = (f"batch {int(b.latency_batch)}, {f'{threads} thread(s)' if threads > 0 else 'the run threads'}, "
           f"{rec.get('latency_clock', 'wall')} clock, {rec.get('latency_runtime', 'torch')}")
    return f"speed-up {speedup:.2f}x (its own timing of both, in alternation: dense {dense:.2f} ms, this {own:.2f} ms, {how})"


def plan(ctx: Context, cfg: Any, ratios: np.ndarray) -> dict[str, list[int]]:
    """The kept units of every group at ``ratios`` (the lowest-scored units go first)."""
    round_to = int(cfg.prune.round_to)
    # recorded as the root layer's kept channels (a unit of a grouped conv or GroupNorm group is
    # several channels); heads and blocks by unit
    return {g.name: (sorted(ctx.orders[g.name][g.size - n_keep(g, float(r), round_to):]) if g.kind in ("heads", "block")
                     else g.unit_channels(ctx.orders[g.name][g.size - n_keep(g, float(r), round_to):]))
            for g, r in zip(ctx.graph.groups, ratios)}
