"""Predicted scaling of the sensitivity stage, from the per-cell costs recorded in a real run file.

    python benchmarks/sensitivity_scaling.py RUN.h5 [--groups 50] [--images 2000]

Replays the recorded costs (``/sensitivity/seconds`` per cell, ``/sensitivity/prefix_seconds``
per group) through hpcprune's own chunking (``sensitivity.make_chunks``) and its dispatch policy
(rank 0 hands out the most expensive chunk first to whichever rank is free; rank 0 works too)
for 1 ... 1024 simulated ranks, and prints the predicted efficiency per world size.

Model: a chunk costs its group's prefix plus its cells' costs, times its share of the batches
(shards), plus a fixed per-chunk overhead (message round trip, unpickling: ``--chunk-ms``); rank 0
serves requests one at a time (``--dispatch-ms`` each). ``--groups`` extrapolates the recorded
model to another depth by resampling its groups in model order (a ResNet-50 has about 50);
``--images`` rescales the costs to another calibration set size. It predicts, it does not measure:
network contention and stragglers are not modelled.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys

import h5py
import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hpcprune.sensitivity import make_chunks  # noqa: E402


def load(path: str, groups: int | None, images: int | None):
    with h5py.File(path, "r") as f:
        s = f["sensitivity"]
        secs = s["seconds"][()]
        prefix = s["prefix_seconds"][()] if "prefix_seconds" in s else np.zeros(secs.shape[0])
        calib = int(s.attrs["calib_samples"])
        cfg = yaml.safe_load(f.attrs["config"])
    batch = int(cfg["sensitivity"]["batch_size"])
    secs = np.nan_to_num(secs, nan=0.0)
    if groups:
        idx = np.floor(np.arange(groups) * secs.shape[0] / groups).astype(int)
        secs, prefix = secs[idx], prefix[idx]
    scale = (images / calib) if images else 1.0
    n_images = images or calib
    return secs * scale, prefix * scale, max(1, math.ceil(n_images / batch))


def simulate(secs, prefix, n_batches, world, chunk_ms, dispatch_ms):
    pending = np.ones(secs.shape, bool)
    chunks = make_chunks(pending, world, n_batches, lambda g, rs: prefix[g] + secs[g, rs].sum())
    costs = sorted(((prefix[c.group] + secs[c.group, c.ratios].sum()) / c.shards + chunk_ms / 1000.0 for c in chunks), reverse=True)
    free = [(0.0, r) for r in range(world)]  # (time the rank is free, rank)
    heapq.heapify(free)
    dispatch_clock = 0.0
    finish = 0.0
    for cost in costs:  # most expensive first, to whichever rank frees up first
        t, r = heapq.heappop(free)
        dispatch_clock = max(dispatch_clock, t) + (dispatch_ms / 1000.0 if world > 1 else 0.0)
        end = max(t, dispatch_clock) + cost
        finish = max(finish, end)
        heapq.heappush(free, (end, r))
    return finish, len(chunks), max(costs), sum(costs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--groups", type=int, default=None, help="extrapolate to this many groups")
    ap.add_argument("--images", type=int, default=None, help="rescale to this many calibration images")
    ap.add_argument("--chunk-ms", type=float, default=2.0)
    ap.add_argument("--dispatch-ms", type=float, default=0.5)
    ap.add_argument("--ranks", default="1,2,4,8,16,32,64,128,256,512,1024")
    args = ap.parse_args()
    secs, prefix, n_batches = load(args.run, args.groups, args.images)
    G, R = secs.shape
    t1, _, _, work1 = simulate(secs, prefix, n_batches, 1, args.chunk_ms, args.dispatch_ms)
    print(f"{G} groups x {R} ratios = {G * R} cells, {n_batches} calibration batches, one rank: {t1:.1f} s")
    print(f"{'ranks':>6} {'chunks':>7} {'time s':>9} {'speed-up':>9} {'efficiency':>10}  limit")
    rows = []
    stop = None
    for w in [int(x) for x in args.ranks.split(",")]:
        t, n, biggest, work = simulate(secs, prefix, n_batches, w, args.chunk_ms, args.dispatch_ms)
        eff = t1 / (w * t)
        if w > 1 and n * args.dispatch_ms / 1000.0 >= 0.5 * t:
            limit = "rank 0's dispatch: one process hands out every chunk (use larger cells or fewer ranks)"
        elif biggest >= 0.5 * t:
            limit = "granularity: the largest chunk is half the run (cells cannot split below one batch)"
        elif work / work1 > 1.15:
            limit = f"overhead: {100 * (work / work1 - 1):.0f}% more work (prefix recomputed per chunk, per-chunk costs)"
        elif n < 2 * w:
            limit = "too few chunks per rank"
        else:
            limit = "-"
        if stop is None and eff < 0.8:
            stop = (w, limit)
        rows.append({"ranks": w, "chunks": n, "time_s": t, "efficiency": eff})
        print(f"{w:>6} {n:>7} {t:>9.3f} {t1 / t:>9.1f} {eff:>10.3f}  {limit}")
    if stop:
        print(f"predicted efficiency falls below 0.8 at {stop[0]} ranks ({stop[1]})")
    print(json.dumps({"cells": G * R, "groups": G, "batches": n_batches, "one_rank_s": t1,
                      "efficiency": {r["ranks"]: round(r["efficiency"], 3) for r in rows}}))


if __name__ == "__main__":
    main()
