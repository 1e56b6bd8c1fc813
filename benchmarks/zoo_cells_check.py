"""Sensitivity cells of torchvision models against pruned copies (not in CI: needs torchvision).

For each model (random weights, the smallest image it accepts): the sensitivity engine's cells
(cached activations along the model's chain, in-place slices, BatchNorm re-estimation) against the
naive reference per cell: a deepcopy pruned by Torch-Pruning through ``Graph.prune_group``, the
same BatchNorms re-estimated on the same batches, a full forward. Prints per model whether it is a
chain, the groups, the cells and the largest relative difference in mean loss; the last line is one
JSON object. The engine's BatchNorm folding and channels-last layout (``--fold --nhwc``, on in a
sweep) change the rounding, which random weights with BatchNorm statistics of 8 images amplify
(regnet_y_400mf: 1e-3 relative; its dense model alone moves 8e-5 between the two layouts), so the
default leaves them off and the check is exact.

    env -u OMP_NUM_THREADS .venv-vision/bin/python benchmarks/zoo_cells_check.py --log benchmarks/results/zoo_cells_check.log
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hpcprune import importance, metrics  # noqa: E402
from hpcprune.graph import Graph, n_keep  # noqa: E402
from hpcprune.runs import ignore_names  # noqa: E402
from hpcprune.sensitivity import DONE, Evaluator, run_sensitivity  # noqa: E402
from hpcprune.verify import verify_groups  # noqa: E402
from hpcprune.world import World  # noqa: E402

DEFAULT = ("resnet18,mobilenet_v2,mobilenet_v3_small,efficientnet_b0,regnet_x_400mf,regnet_y_400mf,squeezenet1_1,"
           "shufflenet_v2_x0_5,densenet121,convnext_tiny,googlenet,mnasnet0_5,resnext50_32x4d,vgg11_bn,alexnet")


def _recal_copy(pruned: torch.nn.Module, suffix: set[str], recal: list) -> None:
    """Re-estimate the BatchNorms after the cut point of a pruned copy, as the cells do."""
    bns = [m for n, m in pruned.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and any(n == s or n.startswith(s + ".") for s in suffix)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for xb, _ in recal:
            pruned(xb)
    pruned.eval()


def check(name: str, size: int, ratio: float, fold: bool, nhwc: bool) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 3, size, size, generator=g), torch.randint(0, 10, (24,), generator=g)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    recal = [(torch.randn(8, 3, size, size, generator=g), None)]
    ignore = ignore_names(model, [])
    graph = Graph(model, x[:1], ignore)
    verify_groups(graph, x, 0.9, 1)
    scores = importance.group_scores(graph, "l2")
    orders = {n: importance.prune_order(s) for n, s in scores.items()}
    t0 = time.perf_counter()
    ev = Evaluator(model, graph.groups, orders, [ratio], batches, x[:1], ignore, recal_batches=recal,
                   fold_bn=fold, channels_last=nhwc)
    chain = ev.chain is not None
    suffixes = [{n for n, _ in ev.chain[ev.entry(gr)[0]:]} if chain else {""} for gr in graph.groups]
    res = run_sensitivity(World(None), ev, np.ones((len(graph.groups), 1), bool), metrics.module_macs(model, x[:1]))
    ev.close()
    engine_s = time.perf_counter() - t0
    got = {c.group: c.sums[1] / c.sums[2] for c in res if c.status == DONE}
    worst, t1 = 0.0, time.perf_counter()
    for gi, gr in enumerate(graph.groups):
        if gi not in got or gr.kind == "block":
            continue
        pruned = copy.deepcopy(model)
        n = gr.size - n_keep(gr, ratio)
        Graph(pruned, x[:1], ignore).prune_group(gr.name, orders[gr.name][:n])
        _recal_copy(pruned, suffixes[gi] if chain else {n for n, _ in pruned.named_children()} | {""}, recal)
        s = metrics.evaluate(pruned, batches)
        worst = max(worst, abs(got[gi] - s.loss / s.count) / max(1.0, abs(s.loss / s.count)))
    return {"model": name, "chain": chain, "groups": len(graph.groups), "cells": len(got), "max_rel_diff": worst,
            "engine_s": round(engine_s, 1), "reference_s": round(time.perf_counter() - t1, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT)
    ap.add_argument("--size", type=int, default=0, help="image size (default: the model's smallest, at least 32)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--fold", action="store_true", help="fold BatchNorms into convolutions, as a sweep does")
    ap.add_argument("--nhwc", action="store_true", help="channels-last convolutions, as a sweep does")
    ap.add_argument("--log", help="also append the output here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    fh = open(a.log, "a") if a.log else None

    def out(line: str) -> None:
        print(line, flush=True)
        if fh:
            fh.write(line + "\n")
            fh.flush()
    out(f"# zoo_cells_check {time.strftime('%Y-%m-%d %H:%M:%S')}: torch {torch.__version__}, ratio {a.ratio}, "
        f"fold {a.fold}, nhwc {a.nhwc}")
    rows = []
    for name in a.models.split(","):
        try:
            from hpcprune.zoo.vision import min_image_size

            r = check(name, a.size or max(32, min_image_size(name)), a.ratio, a.fold, a.nhwc)
        except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end
            r = {"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        rows.append(r)
        out(json.dumps(r))
    bad = [r["model"] for r in rows if "error" in r or r["max_rel_diff"] > (1e-2 if a.fold or a.nhwc else 1e-6)]
    out(json.dumps({"models": len(rows), "chains": sum(1 for r in rows if r.get("chain")),
                      "cells": sum(r.get("cells", 0) for r in rows),
                      "max_rel_diff": max((r.get("max_rel_diff", 0.0) for r in rows), default=0.0), "bad": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
