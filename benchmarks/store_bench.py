"""Run-file transactions against model size: one sensitivity flush and one status change.

Each size gets a synthetic run directory (``--dir``, default a temporary folder; deleted after): a
run file with ``--groups`` groups (names, kinds, sizes, ``--channels`` importance scores each) and
random weights of that many parameters written by the real code: schema 2
(``store.write_weights``: dense, pruned and fine-tuned safetensors files beside ``run.h5``) or,
when this script runs against an hpcprune without ``write_weights`` (schema 1, e.g. a checkout of
an older commit on ``PYTHONPATH``), ``store.write_state_dict`` into ``/baseline/weights`` as the
old sweep did (the dense weights only: what the file holds during the sensitivity stage).

Measured, median of ``--repeats``:

- flush: one write of the G x R sensitivity cell arrays, as the sensitivity stage
  (``hpcprune/stages/sensitivity.py``) does (schema 2: ``store.write_sensitivity_cells``; schema 1:
  the same transaction inline, copied from the old ``Sweep._flush_cells``), some cells changed
  between flushes;
- status: ``RunFile.set_status``.

Peak RSS: resident memory of this process (rank 0 in a sweep) sampled from ``/proc/self/statm``
every 0.5 ms by a thread during each flush; ``peak_rss_mb`` is the highest sample over the flushes,
``flush_rss_mb`` the highest increase over the RSS just before a flush (the flush's own memory:
the in-memory image of the run file and its copies). The weights are written by a child process:
this one never holds them (a sweep's rank 0 holds its model besides, the same for both schemas).

    python benchmarks/store_bench.py                         # 1M, 135M, 1B
    PYTHONPATH=/old/checkout python benchmarks/store_bench.py --sizes 1M,135M   # schema 1

The last line printed is one JSON object: {"schema", "flush_ms", "status_ms", "peak_rss_mb",
"flush_rss_mb", "run_file_mb", "weights_mb"}, each but schema keyed by size (``weights_mb``: all
weights written; schema 2: the three files, dense and two of about half its size; schema 1: the
dense weights inside ``run.h5``).

Results: ``benchmarks/results/store_bench.log`` (schema 2), ``store_bench_v1.log`` (schema 1,
hpcprune at commit 12598b4, 1M and 135M).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from hpcprune import store
from hpcprune.store import RunFile

SIZES = {"1M": 1_000_000, "135M": 135_000_000, "1B": 1_000_000_000}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class RssSampler:
    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "RssSampler":
        self.before = rss_mb()
        self.peak = self.before
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


def synthetic_state(n: int, dtype: torch.dtype, chunk: int = 4 << 20, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` random parameters in tensors of at most ``chunk`` elements (a model's many layers)."""
    g = torch.Generator().manual_seed(seed)
    state, i, left = {}, 0, n
    while left > 0:
        m = min(chunk, left)
        rows = 1024 if m % 1024 == 0 else 1
        state[f"layers.{i}.weight"] = torch.randn(rows, m // rows, generator=g, dtype=torch.float32).to(dtype)
        left -= m
        i += 1
    return state


def cell_state(G: int, R: int) -> dict[str, np.ndarray]:
    return {
        "metric": np.full((G, R), np.nan), "loss": np.full((G, R), np.nan), "seconds": np.full((G, R), np.nan),
        "rank": np.full((G, R), -1, dtype=np.int32), "status": np.zeros((G, R), dtype=np.int8),
        "prefix_seconds": np.zeros(G), "recal_prefix_seconds": np.zeros(G),
        "recal_seconds": np.full((G, R), np.nan), "team": np.ones((G, R), dtype=np.int32),
    }


ATTRS = {"metric_name": "perplexity", "dense_metric": 12.5, "dense_loss": 2.5, "dense_calib_metric": 12.0,
         "dense_calib_loss": 2.48, "calib_samples": 256, "world_size": 64,
         "status_codes": "0 pending, 1 done, 2 skipped (early stop)"}


def flush(rf: RunFile, state: dict[str, np.ndarray], ratios: list[float]) -> None:
    if hasattr(store, "write_sensitivity_cells"):  # schema 2: the sweep's own code path
        store.write_sensitivity_cells(rf, state, ATTRS, ratios=ratios)
        return
    with rf.write() as f:  # schema 1: the sensitivity flush of hpcprune 0.1.0, its write inline
        s = f["sensitivity"] if "sensitivity" in f else f.create_group("sensitivity")
        if "ratios" not in s:
            s.create_dataset("ratios", data=np.array(ratios))
        for k, v in state.items():
            if k in s:
                s[k][...] = v
            else:
                s.create_dataset(k, data=v)
        for k, v in ATTRS.items():
            s.attrs[k] = v


def make_run(run_dir: str, n: int, dtype: torch.dtype, G: int, R: int, channels: int) -> float:
    """The synthetic run directory; returns the MB of weights written."""
    os.makedirs(run_dir, exist_ok=True)
    rf = RunFile(os.path.join(run_dir, "run.h5"))
    rf.create("model: synthetic\n", {"world_size": 64, "hosts": json.dumps(["node001"]), "run_dir": run_dir})
    rng = np.random.default_rng(0)
    with rf.write() as f:
        g = f.create_group("groups")
        g.create_dataset("name", data=np.array([f"model.layers.{i}.mlp" for i in range(G)], dtype=object),
                         dtype=store.h5py.string_dtype())
        g.create_dataset("kind", data=np.array(["neurons"] * G, dtype=object), dtype=store.h5py.string_dtype())
        g.create_dataset("size", data=np.full(G, channels, dtype=np.int64))
        imp = g.create_group("importance")
        for i in range(G):
            imp.create_dataset(f"model.layers.{i}.mlp", data=rng.random(channels))
        g.attrs["complete"] = True
    state = synthetic_state(n, dtype)
    mb = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    if hasattr(store, "write_weights"):
        with rf.write() as f:
            b = f.create_group("baseline")
            store.write_weights(rf, "baseline", state, b)
            b.attrs["complete"] = True
        half = {k: v for i, (k, v) in enumerate(state.items()) if i % 2 == 0} or state
        for stage in ("pruned", "final"):  # the pruned and fine-tuned weights too: a status change ignores them
            store.write_weights(rf, stage, half)
        mb += 2 * sum(t.numel() * t.element_size() for t in half.values()) / 2**20
    else:
        with rf.write() as f:
            b = f.create_group("baseline")
            store.write_state_dict(b.create_group("weights"), state)
            b.attrs["complete"] = True
    del state
    gc.collect()
    return mb


def bench(size: str, root: str, args: argparse.Namespace) -> dict[str, float]:
    n = SIZES[size]
    dtype = getattr(torch, args.dtype_1b) if n >= 10**9 else torch.float32
    run_dir = os.path.join(root, size)
    t0 = time.perf_counter()
    # in a child process: this one (rank 0's stand-in) never holds the weights
    import multiprocessing as mp

    with mp.get_context("fork").Pool(1) as pool:
        mb = pool.apply(make_run, (run_dir, n, dtype, args.groups, len(args.ratios), args.channels))
    setup_s = time.perf_counter() - t0
    rf = RunFile(os.path.join(run_dir, "run.h5"))
    G, R = args.groups, len(args.ratios)
    state = cell_state(G, R)
    rng = np.random.default_rng(1)
    flush(rf, state, args.ratios)  # the first flush creates the datasets
    flush_ms, peaks, deltas = [], [], []
    for _ in range(args.repeats):
        cells = rng.integers(0, G * R, size=max(1, G * R // args.repeats))
        state["metric"].flat[cells] = rng.random(len(cells))
        state["loss"].flat[cells] = rng.random(len(cells))
        state["seconds"].flat[cells] = rng.random(len(cells))
        state["status"].flat[cells] = 1
        state["rank"].flat[cells] = rng.integers(0, 64, len(cells))
        gc.collect()
        with RssSampler() as s:
            t = time.perf_counter()
            flush(rf, state, args.ratios)
            flush_ms.append((time.perf_counter() - t) * 1e3)
        peaks.append(s.peak)
        deltas.append(s.peak - s.before)
    status_ms = []
    for i in range(args.repeats):
        t = time.perf_counter()
        rf.set_status("running" if i % 2 else "failed", "" if i % 2 else "RuntimeError: benchmark")
        status_ms.append((time.perf_counter() - t) * 1e3)
    out = {"flush_ms": statistics.median(flush_ms), "status_ms": statistics.median(status_ms),
           "peak_rss_mb": max(peaks), "flush_rss_mb": max(deltas),
           "run_file_mb": os.path.getsize(rf.path) / 2**20, "weights_mb": mb, "setup_s": setup_s,
           "dtype": str(dtype).replace("torch.", "")}
    shutil.rmtree(run_dir)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,135M,1B", help="comma-separated, of " + ", ".join(SIZES))
    ap.add_argument("--groups", type=int, default=300)
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--channels", type=int, default=256, help="importance scores per group")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype-1b", default="bfloat16", help="weights dtype at 1B parameters (others: float32)")
    ap.add_argument("--dir", default=None, help="where the run directories go (default: a temporary folder)")
    args = ap.parse_args()
    schema = store.SCHEMA_VERSION
    root = tempfile.mkdtemp(prefix="store_bench_", dir=args.dir)
    print(f"hpcprune {os.path.dirname(store.__file__)}, schema {schema}, {args.groups} groups x {len(args.ratios)} ratios, "
          f"median of {args.repeats}, run dirs in {root}", flush=True)
    res = {}
    try:
        for size in args.sizes.split(","):
            res[size] = bench(size, root, args)
            r = res[size]
            print(f"  {size}: flush {r['flush_ms']:.1f} ms, status {r['status_ms']:.1f} ms, peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(+{r['flush_rss_mb']:.0f} MB in a flush), run.h5 {r['run_file_mb']:.2f} MB, weights {r['weights_mb']:.0f} MB "
                  f"{r['dtype']} (setup {r['setup_s']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"{'params':>6}  {'flush ms':>9}  {'status ms':>9}  {'peak RSS MB':>11}  {'flush +RSS MB':>13}  {'run.h5 MB':>9}  {'weights MB':>10}")
    for size, r in res.items():
        print(f"{size:>6}  {r['flush_ms']:9.1f}  {r['status_ms']:9.1f}  {r['peak_rss_mb']:11.0f}  {r['flush_rss_mb']:13.0f}  "
              f"{r['run_file_mb']:9.2f}  {r['weights_mb']:10.0f}")
    keys = ("flush_ms", "status_ms", "peak_rss_mb", "flush_rss_mb", "run_file_mb", "weights_mb")
    print(json.dumps({"schema": schema, **{k: {s: round(r[k], 2) for s, r in res.items()} for k in keys}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
