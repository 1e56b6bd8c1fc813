"""Sensitivity analysis: the naive Torch-Pruning loop vs hpcprune's engine on 1 and 2 MPI ranks.

    python benchmarks/sensitivity_bench.py                 # Fashion-MNIST ResNet, 9 ratios, 2,000 images
    python benchmarks/sensitivity_bench.py --device cuda   # cells/s on a GPU (naive loop skipped with --no-naive)
    python benchmarks/sensitivity_bench.py --model tiny_gpt --calib 512 --batch-size 128   # the tiny GPT: every group kind

(a) naive: per cell deepcopy the model, build a DependencyGraph, prune the group, evaluate;
(b) the engine on 1 rank; (c) the engine on 2 ranks (mpiexec -n 2), each at 1 thread.
All three must give the same loss/accuracy matrix (1e-5). The last line is one JSON object.
``--team``: also (d) the engine on 3 ranks as a dispatcher and one team of 2 that splits every
cell's calibration samples (``sensitivity.team_size=2``, the layout of a job with many more ranks
than groups): ``team2_speedup`` = (b) / (d), 2.0 at best (rank 0 only dispatches, sleeping).

The engine runs convolutions in NHWC layout and folds BatchNorms into convolutions, as the sweep
does (``sensitivity.channels_last``, ``sensitivity.fold_bn``); ``--no-channels-last`` measures it in
the default layout, ``--no-fold-bn`` without folding, and ``--naive-nhwc`` also times the naive
loop on an NHWC model: how much of the speed-up is computing less and how much is the layout.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hpcprune import importance, metrics  # noqa: E402
from hpcprune.graph import Graph, n_keep  # noqa: E402
from hpcprune.sensitivity import DONE, Evaluator, nhwc, run_sensitivity  # noqa: E402
from hpcprune.world import World  # noqa: E402
from hpcprune.zoo import data as zdata  # noqa: E402
from hpcprune.zoo.models import resnet  # noqa: E402

RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
CACHE = os.path.expanduser("~/.cache/hpcprune")


def setup_gpt(args):
    """The built-in tiny GPT (conf/model/tiny_gpt.yaml, trained 3 epochs on stdlib text and cached):
    every group kind (residual width, MLP neurons, heads, blocks); calibration windows of 64 bytes."""
    from hpcprune.runs import ignore_names
    from hpcprune.stages import train_dense
    from hpcprune.zoo.gpt import tiny_gpt
    from hpcprune.zoo.text import stdlib_text

    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = tiny_gpt(256, 64, 64, 2, 4, 16, 256)
    data = stdlib_text(calib_samples=args.calib, train_bytes=131072, val_bytes=16384)
    ckpt = os.path.join(CACHE, "bench_tiny_gpt_3ep.pt")
    if os.path.exists(ckpt):
        model.load_state_dict(torch.load(ckpt, weights_only=True))
    else:
        os.makedirs(CACHE, exist_ok=True)
        train_dense(model, data, OmegaConf.create({"seed": 0, "baseline": {"epochs": 3, "batch_size": 64, "lr": 0.003,
                                                                           "weight_decay": 0.0005}}), "cpu")
        torch.save(model.state_dict(), ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
    model.eval()
    batches = metrics.make_batches(data.calib, args.batch_size, args.device)
    example = batches[0][0][:1]
    model.to(args.device)
    ignore = ignore_names(model, [])
    graph = Graph(model, example, ignore)
    scores = importance.group_scores(graph, "l2")
    orders = {n: importance.prune_order(s) for n, s in scores.items()}
    return model, batches, example, ignore, graph, orders


def setup(args):
    """Model (trained briefly and cached), calibration batches, groups, orders: identical on every rank."""
    if args.model == "tiny_gpt":
        return setup_gpt(args)
    torch.manual_seed(0)
    model = resnet(1, 10, (32, 64, 128), (2, 2, 2), stem_stride=2)
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.calib, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (args.calib,), generator=g)
        calib = torch.utils.data.TensorDataset(x, y)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0, generator=g)
    else:
        data = zdata.fashion_mnist(calib_samples=args.calib)
        calib = data.calib
        ckpt = os.path.join(CACHE, "bench_resnet_fmnist_1ep.pt")
        if os.path.exists(ckpt):
            model.load_state_dict(torch.load(ckpt, weights_only=True))
        else:  # one quick epoch: enough for meaningful curves; cached for later runs
            os.makedirs(CACHE, exist_ok=True)
            opt = torch.optim.AdamW(model.parameters(), 2e-3)
            loader = torch.utils.data.DataLoader(data.train, batch_size=128, shuffle=True,
                                                 generator=torch.Generator().manual_seed(0))
            model.train()
            for x, y in loader:
                opt.zero_grad()
                metrics.task_loss(model(x), y).backward()
                opt.step()
            torch.save(model.state_dict(), ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
    model.eval()
    batches = metrics.make_batches(calib, args.batch_size, args.device)
    example = batches[0][0][:1]
    model.to(args.device)
    ignore = ["7.fc"]
    graph = Graph(model, example, ignore)
    scores = importance.group_scores(graph, "l2")
    orders = {n: importance.prune_order(s) for n, s in scores.items()}
    return model, batches, example, ignore, graph, orders


def to_matrix(results, G):
    loss, acc = np.full((G, len(RATIOS)), np.nan), np.full((G, len(RATIOS)), np.nan)
    for c in results:
        if c.status == DONE:
            loss[c.group, c.ratio] = c.sums[1] / c.sums[2]
            acc[c.group, c.ratio] = c.sums[0] / c.sums[2]
    return loss, acc


def naive(model, batches, example, ignore, graph, orders):
    """What a user writes with Torch-Pruning: deepcopy, re-trace, prune, full evaluation per cell."""
    G = len(graph.groups)
    loss, acc = np.full((G, len(RATIOS)), np.nan), np.full((G, len(RATIOS)), np.nan)
    for gi, g in enumerate(graph.groups):
        for ri, r in enumerate(RATIOS):
            m = copy.deepcopy(model)
            Graph(m, example, ignore).prune_group(g.name, orders[g.name][: g.size - n_keep(g, r)])
            s = metrics.evaluate(m, batches)
            loss[gi, ri], acc[gi, ri] = s.loss / s.count, s.correct / s.count
    return loss, acc


def engine(world, model, batches, example, ignore, graph, orders, channels_last, team="auto", fold_bn=True):
    ev = Evaluator(model, graph.groups, orders, RATIOS, batches, example, ignore, channels_last=channels_last, fold_bn=fold_bn)
    pending = np.ones((len(graph.groups), len(RATIOS)), bool)
    mm = metrics.module_macs(model, example)
    world.barrier()
    t0 = time.perf_counter()
    try:
        res = run_sensitivity(world, ev, pending, mm, team_setting=team)
    finally:
        ev.close()
    return res, time.perf_counter() - t0


def worker(args):
    world = World.from_env()
    torch.set_num_threads(args.threads)
    model, batches, example, ignore, graph, orders = setup(args)
    res, secs = engine(world, model, batches, example, ignore, graph, orders, not args.no_channels_last, args.team_size,
                       not args.no_fold_bn)
    if world.is_main:
        loss, acc = to_matrix(res, len(graph.groups))
        np.savez(args.out, loss=loss, acc=acc, seconds=secs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet", choices=["resnet", "tiny_gpt"],
                    help="resnet: Fashion-MNIST ResNet; tiny_gpt: the built-in GPT on stdlib text (--calib windows)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--synthetic", action="store_true", help="random inputs (no Fashion-MNIST files needed)")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--no-mpi", action="store_true")
    ap.add_argument("--no-channels-last", action="store_true", help="the engine in the default (NCHW) layout")
    ap.add_argument("--no-fold-bn", action="store_true", help="the engine without BatchNorm folding")
    ap.add_argument("--naive-nhwc", action="store_true",
                    help="also time the naive loop on an NHWC model and batches: how much of the speed-up is the layout")
    ap.add_argument("--team", action="store_true", help="also run 3 ranks: a dispatcher and a team of 2")
    ap.add_argument("--team-size", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    model, batches, example, ignore, graph, orders = setup(args)
    G = len(graph.groups)
    print(f"{G} groups x {len(RATIOS)} ratios = {G * len(RATIOS)} cells, {args.calib} images, device {args.device}, "
          f"{args.threads} thread(s) per rank", flush=True)
    out: dict = {"model": args.model, "cells": G * len(RATIOS), "device": args.device, "threads_per_rank": args.threads}
    ref = None
    if not args.no_naive:
        t0 = time.perf_counter()
        ref = naive(model, batches, example, ignore, graph, orders)
        out["naive_s"] = time.perf_counter() - t0
        print(f"(a) naive loop:     {out['naive_s']:.1f} s", flush=True)
    if args.naive_nhwc and not args.no_naive:
        t0 = time.perf_counter()
        naive(copy.deepcopy(model).to(memory_format=torch.channels_last),
              [(nhwc(x), y) for x, y in batches], nhwc(example), ignore, graph, orders)
        out["naive_nhwc_s"] = time.perf_counter() - t0
        print(f"(a') naive loop, NHWC: {out['naive_nhwc_s']:.1f} s", flush=True)
    out["channels_last"] = not args.no_channels_last
    out["fold_bn"] = not args.no_fold_bn
    res, secs = engine(World(None), model, batches, example, ignore, graph, orders, not args.no_channels_last,
                       fold_bn=not args.no_fold_bn)
    e1 = to_matrix(res, G)
    out["engine_1rank_s"] = secs
    print(f"(b) engine, 1 rank: {secs:.1f} s", flush=True)
    identical = True
    if ref is not None:
        identical &= bool(np.allclose(e1[0], ref[0], atol=1e-5) and np.allclose(e1[1], ref[1], atol=1e-5))
        out["max_abs_diff_naive"] = float(np.nanmax(np.abs(e1[0] - ref[0])))
        out["speedup_vs_naive"] = out["naive_s"] / secs
    if not args.no_mpi:
        with tempfile.TemporaryDirectory() as tmp:
            npz = os.path.join(tmp, "e2.npz")
            mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
            cmd = [mpiexec, "-n", "2", sys.executable, os.path.abspath(__file__), "--worker", "--out", npz,
                   "--device", args.device, "--calib", str(args.calib), "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads), "--model", args.model] + (["--synthetic"] if args.synthetic else []) \
                + (["--no-channels-last"] if args.no_channels_last else []) + (["--no-fold-bn"] if args.no_fold_bn else [])
            subprocess.run(cmd, check=True)
            e2 = np.load(npz)
            out["engine_2rank_s"] = float(e2["seconds"])
            identical &= bool(np.allclose(e2["loss"], e1[0], atol=1e-5) and np.allclose(e2["acc"], e1[1], atol=1e-5))
            print(f"(c) engine, 2 ranks: {out['engine_2rank_s']:.1f} s", flush=True)
            if args.team:
                subprocess.run([*cmd[:2], "3", *cmd[3:], "--team-size", "2"], check=True)
                e3 = np.load(npz)
                out["engine_team2_s"] = float(e3["seconds"])
                out["team2_speedup"] = secs / out["engine_team2_s"]
                identical &= bool(np.allclose(e3["loss"], e1[0], atol=1e-5) and np.allclose(e3["acc"], e1[1], atol=1e-5))
                print(f"(d) engine, dispatcher + team of 2: {out['engine_team2_s']:.1f} s", flush=True)
        out["parallel_efficiency_2"] = secs / (2 * out["engine_2rank_s"])
        if "naive_s" in out:
            out["speedup_2rank_vs_naive"] = out["naive_s"] / out["engine_2rank_s"]
    out["cells_per_s_1rank"] = out["cells"] / secs
    out["identical"] = identical
    # 4 decimals, but small differences (max_abs_diff_naive) keep 3 significant digits
    print(json.dumps({k: (float(f"{v:.3g}") if isinstance(v, float) and 0 < abs(v) < 1e-3 else round(v, 4) if isinstance(v, float)
                          else v) for k, v in out.items()}))


if __name__ == "__main__":
    main()
