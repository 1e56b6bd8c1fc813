"""The embedded default's speed-up, run after run, on a loaded machine.

Runs ``python -m hpcprune.sweep`` (the defaults, plus any overrides given) ``--runs`` times, each in a
fresh ``hydra.run.dir``, while a second process spins (``while True: pass``) on one core, and reads
each run file's final ``latency_speedup`` (dense latency / fine-tuned model's latency, as the summary
row's ``speed-up``: the dense and the final model timed in alternation), with the MACs kept, the
latencies, their clock and the sweep's wall and CPU seconds. One line per run, then a JSON summary as the last line::

    python benchmarks/default_speedup.py --runs 10 --log benchmarks/results/default_speedup.log
    python benchmarks/default_speedup.py --runs 3 --no-load prune.round_to=1   # compare a setting
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import h5py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(run_dir: str, overrides: list[str]) -> dict:
    """One sweep in ``run_dir``: its final speed-up and costs, its wall and CPU seconds."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "hpcprune.sweep", f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        return {"run_dir": run_dir, "error": (p.stderr.strip().splitlines() or ["?"])[-1], "wall_s": round(wall, 1)}
    with h5py.File(os.path.join(run_dir, "run.h5"), "r") as f:
        b, fin = f["baseline"].attrs, f["final"].attrs
        return {"run_dir": run_dir, "speedup": float(fin["latency_speedup"]), "macs_kept": float(fin["macs_kept"]),
                "dense_ms": float(b["latency_ms"]), "final_ms": float(fin["latency_ms"]), "batch": int(b["latency_batch"]),
                "pair_ms": [float(v) for v in fin.get("latency_pair_ms", [])],  # dense, final: timed in alternation
                "clock": str(b.get("latency_clock", "wall")),
                "keep": f["allocation/keep"][()].tolist(), "final_metric": float(fin["metric"]),
                "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=1.3, help="the speed-up every run must exceed")
    ap.add_argument("--no-load", action="store_true", help="no spinning process beside the sweeps")
    ap.add_argument("--log", default=None, help="append the lines to this file too")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every sweep")
    args = ap.parse_args(argv)
    log = open(args.log, "a") if args.log else None

    def out(line: str) -> None:
        print(line, flush=True)
        if log:
            log.write(line + "\n")
            log.flush()

    spin = None if args.no_load else subprocess.Popen([sys.executable, "-c", "while True: pass"])
    tmp = tempfile.mkdtemp(prefix="hpcprune-speedup-")
    out(f"# {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {args.runs} default sweeps, overrides {args.overrides or 'none'}, "
        f"{'one core loaded by a spinning process' if spin else 'no extra load'}; load average before {os.getloadavg()}")
    rows = []
    try:
        for i in range(args.runs):
            row = one_run(os.path.join(tmp, str(i)), args.overrides)
            row["loadavg_1m"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            out(json.dumps(row))
    finally:
        if spin is not None:
            spin.terminate()
            spin.wait()
        if not args.keep:
            subprocess.run(["rm", "-rf", tmp], check=False)
    ups = [r["speedup"] for r in rows if "speedup" in r]
    summary = {"runs": args.runs, "completed": len(ups), "threshold": args.threshold,
               "above": sum(u > args.threshold for u in ups), "speedups": [round(u, 3) for u in ups],
               "min": round(min(ups), 3) if ups else None, "median": round(statistics.median(ups), 3) if ups else None,
               "macs_kept": [round(r["macs_kept"], 3) for r in rows if "macs_kept" in r],
               "wall_s_median": statistics.median(r["wall_s"] for r in rows) if rows else None,
               "cpu_s_median": statistics.median(r["cpu_s"] for r in rows if "cpu_s" in r) if ups else None,
               "overrides": args.overrides, "load": not args.no_load}
    out(json.dumps(summary))
    if log:
        log.close()
    return 0 if ups and summary["above"] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
