"""Allocation methods x importance criteria on Fashion-MNIST: accuracy at a MACs budget.

    python benchmarks/allocation_bench.py [--device cuda] [--root /usr/share/datasets/fashion-mnist]

A ResNet-style CNN (stem stride 2, 3 stages x 2 basic blocks, 32/64/128, BatchNorm) trained to
~92 % (cached). For prune.target.macs 0.5 and 0.33, each method (uniform / global / sensitivity)
x criterion (l2, taylor, activation): accuracy right after pruning (BatchNorm re-estimated on 20
training batches), real MACs and params kept, CPU latency speed-up (1 thread, batch 256, median of
20). The l2 rows are fine-tuned for 3 epochs (AdamW, cosine, batch 256), sensitivity also with
distillation from the dense model; the 0.33 l2 rows with 2 seeds. Plus one latency-target run
(latency <= 0.5 of dense, round_to 8). Everything goes through hpcprune's own modules. The last
line is one JSON object.

    python benchmarks/allocation_bench.py --synthetic > benchmarks/results/allocation_bench.log

The solvers alone (no data, no training): the exact ``allocate.sensitivity`` (hpcprune.mckp) beside
the greedy ``allocate.sensitivity_greedy`` on synthetic cost models of 100 / 1,000 / 5,000 groups
(``CostModel`` objects with the structures real models give: separable terms; a chain of
convolutions between consecutive groups; one residual stream in a product with every group; four
stage streams with their blocks' groups) and synthetic convex damage curves measured at 9 ratios,
for prune.target.macs=0.5 and max_ratio 0.9. The exact solver runs with the 9 measured ratios (and
0) as candidates (step 0.1) and with the interpolated 0.025 grid (37 candidates, the default); the
greedy with the default, up to ``--greedy-max`` groups (its cost grows about as G**2.7). Seconds on
one core, predicted damage (summed curves) and the MACs fraction kept (the real CostModel).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hpcprune import allocate, importance, metrics  # noqa: E402
from hpcprune.graph import Graph, keep_count  # noqa: E402
from hpcprune.sensitivity import DONE, Evaluator, run_sensitivity  # noqa: E402
from hpcprune.world import World  # noqa: E402
from hpcprune.zoo import data as zdata  # noqa: E402
from hpcprune.zoo.models import resnet  # noqa: E402

RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
IGNORE = ["7.fc"]


def log(*a):
    print(*a, flush=True)


def loader(ds, bs, seed, device, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    for x, y in torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=shuffle, generator=g, drop_last=shuffle):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def train(model, data, epochs, lr, device, seed, teacher=None, kd_weight=0.0, T=2.0, max_steps=None):
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(data.train) // 256)
    if max_steps:
        steps = min(steps, max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    step = 0
    for ep in range(epochs):
        for x, y in loader(data.train, 256, seed * 100 + ep, device):
            out = model(x)
            loss = F.cross_entropy(out, y)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
                kd = F.kl_div(F.log_softmax(out / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True) * T * T
                loss = (1 - kd_weight) * loss + kd_weight * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
        if step >= steps:
            break
    return model.eval()


def accuracy(model, batches):
    return metrics.evaluate(model, batches).metric("accuracy")


LAT = {"batch": 256, "repeats": 20, "table_repeats": 5}


def cpu_latency(model, example, repeats=None):
    m = copy.deepcopy(model).cpu().eval()
    return metrics.latency_ms(m, example.cpu(), LAT["batch"], warmup=2, repeats=repeats or LAT["repeats"], threads=1)


SYNTHETIC = ("separable", "chain", "stream", "stages")


def synthetic_model(structure: str, G: int, seed: int = 0):
    """A CostModel of ``G`` channel groups with ``structure``'s product terms (MACs and params),
    and damage curves (G, 9) that grow as ``a r**p`` (a lognormal, p in [1, 3])."""
    from hpcprune.graph import GroupInfo

    rng = np.random.default_rng(seed)
    sizes = rng.choice([16, 32, 64, 128, 256, 512], G)
    streams = {"stream": 1, "stages": 4}.get(structure, 0)
    sizes[:streams] = 512
    groups = [GroupInfo(f"g{i}", "channels", int(s), [], True) for i, s in enumerate(sizes)]
    pairs = []
    if structure == "chain":
        pairs = [(i, i + 1) for i in range(G - 1)]
    elif streams:
        stage = np.r_[np.arange(streams), rng.integers(0, streams, G - streams)]
        pairs = [(int(stage[g]), g) for g in range(streams, G) for _ in range(2)] + [(s, s + 1) for s in range(streams - 1)]
    terms = {}
    for kind, spatial in (("macs", 49.0), ("params", 1.0)):
        rows, coef = [], []
        for a, b in pairs:  # a convolution between two groups
            e = np.zeros(G, dtype=np.int8)
            e[[a, b]] += 1
            rows.append(e)
            coef.append(9.0 * spatial * sizes[a] * sizes[b] * rng.uniform(0.25, 1))
        for g in range(G):  # a layer with one side fixed, and a norm
            e = np.zeros(G, dtype=np.int8)
            e[g] = 1
            rows.append(e)
            coef.append(spatial * sizes[g] * (64 * rng.uniform(0.5, 4) + 4))
        terms[kind] = (np.array(coef), np.array(rows))
    cm = allocate.CostModel(groups, terms)
    damage = rng.lognormal(-2, 1, (G, 1)) * np.array(RATIOS)[None, :] ** rng.uniform(1, 3, (G, 1))
    damage[:streams] *= 10  # a residual stream matters more
    return cm, damage


def synthetic(greedy_max: int, sizes: tuple[int, ...]) -> None:
    """The solver comparison of the module docstring; prints one row per case and a JSON line."""
    import platform

    import scipy

    log(f"solvers alone, synthetic cost models; {platform.processor() or platform.machine()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, numpy {np.__version__}, scipy {scipy.__version__}")
    cm, damage = synthetic_model("chain", 20, seed=1)  # imports and first calls outside the timings
    allocate.sensitivity(cm, RATIOS, damage, {"macs": 0.5}, 0.9)
    log(f"{'structure':10} {'groups':>6} {'solver':14} {'seconds':>8} {'damage':>10} {'MACs kept':>9}")
    rows = []
    for structure in SYNTHETIC:
        for G in sizes:
            cm, damage = synthetic_model(structure, G)
            runs = [("exact step 0.1", lambda: allocate.sensitivity(cm, RATIOS, damage, {"macs": 0.5}, 0.9, step=0.1)),
                    ("exact", lambda: allocate.sensitivity(cm, RATIOS, damage, {"macs": 0.5}, 0.9))]
            if G <= greedy_max:
                runs.append(("greedy", lambda: allocate.sensitivity_greedy(cm, RATIOS, damage, {"macs": 0.5}, 0.9)))
            for solver, fn in runs:
                t0 = time.perf_counter()
                a = fn()
                row = {"structure": structure, "groups": G, "solver": solver, "seconds": round(time.perf_counter() - t0, 3),
                       "damage": round(a.predicted_loss, 6), "macs_kept": round(a.predicted["macs"], 6)}
                rows.append(row)
                log(f"{structure:10} {G:>6} {solver:14} {row['seconds']:>8.2f} {row['damage']:>10.5f} {row['macs_kept']:>9.5f}")
            if G > greedy_max:
                log(f"{structure:10} {G:>6} {'greedy':14} not run (more than --greedy-max={greedy_max} groups)")
    print(json.dumps({"target_macs": 0.5, "max_ratio": 0.9, "ratios": RATIOS, "results": rows}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", action="store_true", help="the solvers alone on synthetic cost models (no data)")
    ap.add_argument("--greedy-max", type=int, default=100, help="--synthetic: run the greedy up to this many groups")
    ap.add_argument("--sizes", default="100,1000,5000", help="--synthetic: group counts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/hpcprune"))
    ap.add_argument("--dense-epochs", type=int, default=10)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps, one target")
    ap.add_argument("--only-latency", action="store_true", help="only the latency-target row (l2 sensitivity)")
    args = ap.parse_args()
    if args.synthetic:
        return synthetic(args.greedy_max, tuple(int(g) for g in args.sizes.split(",")))
    dev = args.device
    if args.quick:
        LAT.update(batch=32, repeats=3, table_repeats=2)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    t_start = time.perf_counter()
    data = zdata.fashion_mnist(args.root, calib_samples=200 if args.quick else 2000, train_samples=4000 if args.quick else 0)
    test = metrics.make_batches(data.val, 1000, dev)
    calib = metrics.make_batches(data.calib, 500, dev)
    recal_batches = [(x, y) for x, y in loader(data.train, 256, 7, dev)][:20]
    example = data.example_input[:1]

    def fresh():
        torch.manual_seed(0)
        return resnet(1, 10, (32, 64, 128), (2, 2, 2), stem_stride=2)

    os.makedirs(args.cache, exist_ok=True)
    ckpt = os.path.join(args.cache, f"allocation_dense_{args.dense_epochs}ep{'_quick' if args.quick else ''}.pt")
    dense = fresh()
    if os.path.exists(ckpt):
        dense.load_state_dict(torch.load(ckpt, weights_only=True))
    else:
        t0 = time.perf_counter()
        train(dense, data, args.dense_epochs, 3e-3, dev, 0, max_steps=30 if args.quick else None)
        torch.save(dense.state_dict(), ckpt)
        log(f"dense training: {time.perf_counter() - t0:.0f} s")
    dense.to(dev).eval()
    dense_acc = accuracy(dense, test)
    dense_macs = metrics.macs(dense, example.to(dev))
    dense_lat = cpu_latency(dense, data.example_input.repeat(32, 1, 1, 1))
    log(f"dense: acc {dense_acc:.4f}, {metrics.params(dense)} params, {dense_macs} MACs, {dense_lat:.1f} ms "
        f"(CPU, 1 thread, batch {LAT['batch']})")
    lat_example = data.example_input.repeat(32, 1, 1, 1)

    graph = Graph(dense, example.to(dev), IGNORE)
    groups = graph.groups
    cm = allocate.CostModel(dense, groups, metrics.module_macs(dense, example.to(dev)))
    calib_loss = metrics.evaluate(dense, calib).mean_loss()
    criteria = ["l2"] if (args.quick or args.only_latency) else ["l2", "taylor", "activation"]
    targets = [] if args.only_latency else [0.5] if args.quick else [0.5, 0.33]
    scores, damage = {}, {}
    for crit in criteria:
        t0 = time.perf_counter()
        g2 = Graph(dense, example.to(dev), IGNORE)
        scores[crit] = importance.group_scores(g2, crit, [(x, y) for x, y in calib])
        orders = {n: importance.prune_order(s) for n, s in scores[crit].items()}
        ev = Evaluator(dense, groups, orders, RATIOS, calib, example.to(dev), IGNORE, recal_batches=recal_batches[:4])
        res = run_sensitivity(World(None), ev, np.ones((len(groups), len(RATIOS)), bool), None)
        d = np.full((len(groups), len(RATIOS)), np.nan)
        for c in res:
            if c.status == DONE:
                d[c.group, c.ratio] = c.sums[1] / c.sums[2] - calib_loss
        damage[crit] = d
        log(f"sensitivity ({crit}): {len(res)} cells in {time.perf_counter() - t0:.1f} s")

    def prune(ratios, crit, round_to=1):
        model = copy.deepcopy(dense)
        g = Graph(model, example.to(dev), IGNORE)
        orders = {n: importance.prune_order(s) for n, s in scores[crit].items()}
        plan = {gi.name: sorted(orders[gi.name][gi.size - keep_count(gi.size, float(r), round_to):]) for gi, r in zip(groups, ratios)}
        g.apply_plan(plan)
        metrics.recalibrate_bn(model, recal_batches)
        return model.eval()

    def allocation(method, crit, tg, round_to=1, start=None):
        if method == "uniform":
            return allocate.uniform(cm, tg, 0.9, round_to)
        if method == "global":
            return allocate.global_ranking(cm, scores[crit], tg, 0.9, round_to)
        return allocate.sensitivity(cm, RATIOS, damage[crit], tg, 0.9, round_to, start=start)

    results = []
    for t in targets:
        for crit in criteria:
            for method in ("uniform", "global", "sensitivity"):
                alloc = allocation(method, crit, {"macs": t})
                model = prune(alloc.ratios, crit)
                row = {"method": method, "criterion": crit, "target": t, "acc_pruned": accuracy(model, test),
                       "macs_kept": metrics.macs(model, example.to(dev)) / dense_macs,
                       "params_kept": metrics.params(model) / metrics.params(dense),
                       "latency_speedup": dense_lat / cpu_latency(model, lat_example), "acc_finetuned": None}
                if crit == "l2":
                    seeds = [0, 1] if (t == 0.33 and not args.quick) else [0]
                    accs = [accuracy(train(copy.deepcopy(model), data, args.ft_epochs, 1e-3, dev, s, max_steps=20 if args.quick else None), test) for s in seeds]
                    row["acc_finetuned"] = float(np.mean(accs))
                    row["acc_finetuned_seeds"] = accs
                results.append(row)
                log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
            if crit == "l2":  # sensitivity + distillation from the dense model
                alloc = allocation("sensitivity", "l2", {"macs": t})
                model = prune(alloc.ratios, "l2")
                seeds = [0, 1] if (t == 0.33 and not args.quick) else [0]
                accs = [accuracy(train(copy.deepcopy(model), data, args.ft_epochs, 1e-3, dev, s, teacher=dense, kd_weight=0.7,
                                       max_steps=20 if args.quick else None), test) for s in seeds]
                row = {"method": "sensitivity+kd", "criterion": "l2", "target": t, "acc_pruned": accuracy(model, test),
                       "macs_kept": metrics.macs(model, example.to(dev)) / dense_macs,
                       "params_kept": metrics.params(model) / metrics.params(dense),
                       "latency_speedup": dense_lat / cpu_latency(model, lat_example),
                       "acc_finetuned": float(np.mean(accs)), "acc_finetuned_seeds": accs}
                results.append(row)
                log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    # round_to=8 with MACs 0.5, and the latency target (table measured on the CPU, 1 thread)
    for method in () if args.only_latency else ("global", "sensitivity"):
        alloc = allocation(method, "l2", {"macs": 0.5}, round_to=8)
        model = prune(alloc.ratios, "l2", round_to=8)
        results.append({"method": method, "criterion": "l2", "target": 0.5, "round_to": 8, "acc_pruned": accuracy(model, test),
                        "macs_kept": metrics.macs(model, example.to(dev)) / dense_macs,
                        "params_kept": metrics.params(model) / metrics.params(dense),
                        "latency_speedup": dense_lat / cpu_latency(model, lat_example), "acc_finetuned": None})
        log(json.dumps(results[-1]))
    t0 = time.perf_counter()
    table = np.zeros((len(groups), len(RATIOS)))
    orders = {n: importance.prune_order(s) for n, s in scores["l2"].items()}
    for gi, g in enumerate(groups):
        ref = cpu_latency(dense, lat_example, LAT["table_repeats"])
        for ri, r in enumerate(RATIOS):
            m = copy.deepcopy(dense)
            Graph(m, example.to(dev), IGNORE).prune_group(g.name, orders[g.name][: g.size - keep_count(g.size, r, 8)])
            table[gi, ri] = cpu_latency(m, lat_example, LAT["table_repeats"]) - ref + dense_lat
    cm.set_latency_table(RATIOS, table, dense_lat)
    log(f"latency table: {time.perf_counter() - t0:.0f} s")
    target = {"latency": 0.5}
    tg = target
    attempts = []
    start = None
    for attempt in range(4):  # what the prune stage does: re-measure the table around a miss, continue from there
        try:
            alloc = allocation("sensitivity", "l2", tg, round_to=8, start=start)
        except allocate.BudgetError as e:  # the table around the last miss says it is out of reach
            log(f"latency: stopping after {attempt} re-allocation(s): {e}")
            break
        model = prune(alloc.ratios, "l2", round_to=8)
        lat_ms = cpu_latency(model, lat_example)
        lat_kept = lat_ms / dense_lat
        macs_kept = metrics.macs(model, example.to(dev)) / dense_macs
        attempts.append({"latency_kept": round(lat_kept, 4), "macs_kept": round(macs_kept, 4)})
        if lat_kept <= 0.5:
            break
        t0 = time.perf_counter()
        table, zero = allocate.latency_table_around(lambda rs: cpu_latency(prune(rs, "l2", round_to=8), lat_example, LAT["table_repeats"]),
                                                    RATIOS, alloc.ratios, lat_ms)
        cm.set_latency_table(RATIOS, table, dense_lat, lat_ms, zero)
        tg = allocate.tighten_for_latency(target, macs_kept, lat_kept)
        log(f"latency {lat_kept:.3f} of dense > 0.5: table around the allocation in {time.perf_counter() - t0:.0f} s; "
            f"MACs capped at {tg['macs']:.3f}")
        start = alloc.ratios
    ft = train(copy.deepcopy(model), data, args.ft_epochs, 1e-3, dev, 0, teacher=dense, kd_weight=0.7, max_steps=20 if args.quick else None)
    results.append({"method": "sensitivity+kd", "criterion": "l2", "target": "latency=0.5", "round_to": 8,
                    "acc_pruned": accuracy(model, test), "acc_finetuned": accuracy(ft, test),
                    "macs_kept": metrics.macs(model, example.to(dev)) / dense_macs,
                    "params_kept": metrics.params(model) / metrics.params(dense), "latency_kept": lat_kept,
                    "latency_speedup": 1.0 / lat_kept, "latency_attempts": attempts})
    log(json.dumps(results[-1]))
    log(f"{'method':16} {'crit':10} {'target':>8} {'pruned':>7} {'tuned':>7} {'MACs':>6} {'speedup':>7}")
    for r in results:
        tuned = "-" if r["acc_finetuned"] is None else f"{r['acc_finetuned']:.4f}"
        log(f"{r['method']:16} {r['criterion']:10} {str(r['target']):>8} {r['acc_pruned']:.4f} {tuned:>7} {r['macs_kept']:.3f} {r['latency_speedup']:.2f}")
    print(json.dumps({"dense_acc": dense_acc, "device": dev, "wall_s": time.perf_counter() - t_start, "results": results}))


if __name__ == "__main__":
    main()
