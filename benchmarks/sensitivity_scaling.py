"""Predicted scaling of the sensitivity stage, from the per-cell costs recorded in a real run file.

    python benchmarks/sensitivity_scaling.py RUN.h5 [--groups 50] [--images 2000] [--team auto|1|2|4|8]

Replays the recorded costs through hpcprune's own scheduler, for 1 ... 1024 simulated ranks, and
prints the predicted efficiency per world size:

- per cell ``/sensitivity/seconds``, of which ``recal_seconds`` re-estimated the BatchNorm
  statistics; per group ``prefix_seconds``, of which ``recal_prefix_seconds`` for the
  re-estimation batches (files written before these were recorded: split by image counts);
- the product's team size rule (``sensitivity.team_size``), chunking (``make_chunks``) and
  dispatch policy (``Dispatcher``: a free worker or team gets the next chunk of the group whose
  activations it holds, else the most expensive chunk of a group nobody holds, else the most
  expensive left); without teams rank 0 works too.

Model:
- without teams, a chunk costs its group's prefix (unless the worker's previous chunk was of the
  same group) plus its cells; a chunk split into batch shards
  (more ranks than cells) divides the calibration part by the shards but not the re-estimation,
  which every shard repeats;
- a team of s ranks divides both by s (members' calibration samples even out their work), unless
  one re-estimation batch is more than a member's share; plus two allreduces per cell
  (``--sync-ms`` each) and the leader's hand-over;
- every chunk pays ``--chunk-ms`` (message round trip, unpickling); rank 0 serves one request at a
  time (``--dispatch-ms`` each).
``--groups`` extrapolates the recorded model to another depth by resampling its groups in model
order (a ResNet-50 has about 50); ``--images`` rescales the costs to another calibration set size;
``--macs`` to a model of the same shape with more MACs per image (the fixed costs per chunk and per
collective do not grow with it). It predicts, it does not measure: network contention and stragglers are not modelled.
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
from hpcprune.sensitivity import Dispatcher, make_chunks, team_ranks, team_size  # noqa: E402


def load(path: str, groups: int | None, images: int | None, macs: float | None = None) -> dict:
    with h5py.File(path, "r") as f:
        s = f["sensitivity"]
        secs = np.nan_to_num(s["seconds"][()], nan=0.0)
        G = secs.shape[0]
        prefix = s["prefix_seconds"][()] if "prefix_seconds" in s else np.zeros(G)
        calib = int(s.attrs["calib_samples"])
        cfg = yaml.safe_load(f.attrs["config"])
        n_recal = int(cfg["sensitivity"].get("bn_recalib_batches", 0))
        if "recal_seconds" in s:
            recal = np.nan_to_num(s["recal_seconds"][()], nan=0.0)
            recal_prefix = s["recal_prefix_seconds"][()]
            measured = True
        else:  # older files: split by images
            r_img = n_recal * int(cfg["baseline"]["batch_size"])
            frac = r_img / (r_img + calib)
            recal, recal_prefix, measured = secs * frac, prefix * frac, False
    batch = int(cfg["sensitivity"]["batch_size"])
    if groups:
        idx = np.floor(np.arange(groups) * G / groups).astype(int)
        secs, prefix, recal, recal_prefix = secs[idx], prefix[idx], recal[idx], recal_prefix[idx]
    scale = (images / calib) if images else 1.0  # the calibration part scales, the re-estimation does not
    n_images = images or calib
    if macs:  # a model of the same shape with more MACs per image: every recorded second scales
        with h5py.File(path, "r") as f:
            factor = macs / float(f["baseline"].attrs["macs"])
        secs, recal, prefix, recal_prefix = secs * factor, recal * factor, prefix * factor, recal_prefix * factor
    return {
        "images": n_images, "recal_batch_images": int(cfg["baseline"]["batch_size"]),
        "eval": (secs - recal) * scale, "recal": recal, "prefix": (prefix - recal_prefix) * scale,
        "recal_prefix": recal_prefix, "n_batches": max(1, math.ceil(n_images / batch)), "n_recal": n_recal,
        "measured_split": measured,
    }


def simulate(d: dict, world: int, team: int, chunk_ms: float, dispatch_ms: float, sync_ms: float):
    E, R, P, PR = d["eval"], d["recal"], d["prefix"], d["recal_prefix"]
    nb, nr = d["n_batches"], d["n_recal"]
    pending = np.ones(E.shape, bool)
    full = lambda g, rs: P[g] + PR[g] + (E[g, rs] + R[g, rs]).sum()  # noqa: E731
    if team > 1:
        sizes = [len(p) for p in team_ranks(world, team)]
        chunks = make_chunks(pending, len(sizes), 1, full)
        units = d["images"] + nr * d["recal_batch_images"]  # a member's share evens out images of both kinds

        def cost(c, s, prefix):
            work = ((P[c.group] + PR[c.group]) if prefix else 0.0) + (E[c.group, c.ratios] + R[c.group, c.ratios]).sum()
            share = max(1.0 / s, d["recal_batch_images"] / units if nr else 0.0)
            return work * share + len(c.ratios) * (2 if nr else 1) * sync_ms / 1000.0 + 2 * chunk_ms / 1000.0
    else:
        sizes = [1] * world
        chunks = make_chunks(pending, world, nb, full)

        def cost(c, s, prefix):
            return (((P[c.group] if prefix else 0.0) + E[c.group, c.ratios].sum()) / c.shards
                    + (PR[c.group] if prefix else 0.0) + R[c.group, c.ratios].sum() + chunk_ms / 1000.0)
    for c in chunks:
        c.cost = full(c.group, c.ratios) / c.shards
    dispatcher = Dispatcher(chunks)
    held: dict[int, tuple] = {}  # worker -> (group, shard) whose activations it holds
    free = [(0.0, i) for i in range(len(sizes))]  # (time the worker or team is free, index)
    heapq.heapify(free)
    dispatch_clock, finish, work, biggest, prefixes = 0.0, 0.0, 0.0, 0.0, 0
    while len(dispatcher):
        t, i = heapq.heappop(free)
        c = dispatcher.next(i)
        dispatch_clock = max(dispatch_clock, t) + (dispatch_ms / 1000.0 if world > 1 else 0.0)
        key = (c.group, c.shard, c.shards)
        prefixes += held.get(i) != key
        dur = cost(c, sizes[i], held.get(i) != key)
        held[i] = key
        end = max(t, dispatch_clock) + dur
        finish = max(finish, end)
        work += dur * sizes[i]
        biggest = max(biggest, dur)
        heapq.heappush(free, (end, i))
    return {"time": finish, "chunks": len(chunks), "biggest": biggest, "work": work, "teams": len(sizes),
            "prefixes": prefixes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--groups", type=int, default=None, help="extrapolate to this many groups")
    ap.add_argument("--images", type=int, default=None, help="rescale to this many calibration images")
    ap.add_argument("--macs", type=float, default=None,
                    help="scale every recorded cost to a model of this many MACs per image (ResNet-50 at 224 px: 4.1e9)")
    ap.add_argument("--team", default="auto", help="ranks per team: auto (the product's rule) or a number")
    ap.add_argument("--chunk-ms", type=float, default=2.0)
    ap.add_argument("--dispatch-ms", type=float, default=0.5)
    ap.add_argument("--sync-ms", type=float, default=0.2, help="one small allreduce within a team")
    ap.add_argument("--ranks", default="1,2,4,8,16,32,64,128,256,512,1024")
    args = ap.parse_args()
    d = load(args.run, args.groups, args.images, args.macs)
    G, R = d["eval"].shape
    one = simulate(d, 1, 1, args.chunk_ms, args.dispatch_ms, args.sync_ms)
    t1, work1 = one["time"], one["work"]
    split = "measured" if d["measured_split"] else "estimated from image counts"
    print(f"{G} groups x {R} ratios = {G * R} cells, {d['n_batches']} calibration batches, "
          f"{d['n_recal']} re-estimation batches ({split}), one rank: {t1:.1f} s")
    print(f"{'ranks':>6} {'team':>5} {'chunks':>7} {'time s':>9} {'speed-up':>9} {'efficiency':>10}  limit")
    rows = []
    stop = None
    for w in [int(x) for x in args.ranks.split(",")]:
        t = team_size(w, G, d["images"], args.team if args.team == "auto" else int(args.team),
                      d["n_recal"], d["recal_batch_images"])
        r = simulate(d, w, t, args.chunk_ms, args.dispatch_ms, args.sync_ms)
        eff = t1 / (w * r["time"])
        if w > 1 and r["chunks"] * args.dispatch_ms / 1000.0 >= 0.5 * r["time"]:
            limit = "rank 0's dispatch: one process hands out every chunk"
        elif r["biggest"] >= 0.5 * r["time"]:
            limit = "granularity: the largest chunk is half the run"
        elif r["work"] / work1 > 1.15:
            limit = f"overhead: {100 * (r['work'] / work1 - 1):.0f}% more work (prefix or re-estimation repeated, per-chunk costs)"
        elif r["chunks"] < 2 * r["teams"]:
            limit = "too few chunks per worker"
        elif 1 - r["work"] / (w * r["time"]) > 0.1:
            limit = (f"balance: ranks idle {100 * (1 - r['work'] / (w * r['time'])):.0f}% of the run "
                     "(chunks of whole cells are coarse for this many workers)")
        else:
            limit = "-"
        if t > 1:
            limit = f"{r['teams']} teams, rank 0 dispatches; {limit}" if limit != "-" else f"{r['teams']} teams, rank 0 dispatches"
        if stop is None and eff < 0.8:
            stop = (w, limit)
        rows.append({"ranks": w, "team": t, "chunks": r["chunks"], "time_s": r["time"], "efficiency": eff})
        print(f"{w:>6} {t:>5} {r['chunks']:>7} {r['time']:>9.3f} {t1 / r['time']:>9.1f} {eff:>10.3f}  {limit}")
    if stop:
        print(f"predicted efficiency falls below 0.8 at {stop[0]} ranks ({stop[1]})")
    print(json.dumps({"cells": G * R, "groups": G, "batches": d["n_batches"], "one_rank_s": t1, "team": args.team,
                      "efficiency": {r["ranks"]: round(r["efficiency"], 3) for r in rows},
                      "team_size": {r["ranks"]: r["team"] for r in rows}}))


if __name__ == "__main__":
    main()
