"""A Pareto sweep as one multirun against the same points as solo runs (not run in CI).

    python benchmarks/sweep_bench.py [--budgets 0.3,0.4,0.5,0.6] [--methods uniform,global,sensitivity]
        [--out /tmp/sweep_bench] [--log benchmarks/results/sweep_bench.log] [--png docs/sweep_front.png]

The Fashion-MNIST ResNet (``model=resnet_fmnist data=fashion_mnist``; Debian package
dataset-fashion-mnist) at reduced settings (see ``SETTINGS``). It runs every (budget, method)
point as its own ``python -m hpcprune.sweep`` (each trains its dense model and computes its
sensitivity grid), then the same points as one ``python -m hpcprune.sweep -m ...`` (the dense model
and the grid computed once: ``hpcprune.reuse``; ``--launcher joblib``, the default: the points on
``local_parallelism`` worker processes, each running point after point; ``submitit_local``: each point
its own process, ``local_parallelism`` of them at once), one after the other, and prints both wall times and CPU seconds,
their ratio, per point the final accuracy and MACs kept of both (they must agree: the same
numbers, computed once), and as its last line one JSON object. ``--png``: the multirun's Pareto
figure (``python -m hpcprune.report DIR --png``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SETTINGS = ["model=resnet_fmnist", "data=fashion_mnist", "data.train_samples=2000", "data.calib_samples=500",
            "threads=1", "launcher=debug", "baseline.epochs=2", "finetune.epochs=1", "sensitivity.ratios=[0.3,0.6]",
            "baseline.latency_repeats=3"]


CPU_S = [0.0]  # CPU seconds of every sweep so far (user + system, the sweeps and what they started)


def _sweep(args: list[str], log: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "hpcprune.sweep", *SETTINGS, *args], cwd=REPO, env=env,
                       capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    CPU_S[0] += cpu
    if p.returncode != 0:
        raise SystemExit(f"sweep failed ({p.returncode}): {' '.join(args)}\n{p.stderr[-2000:]}")
    log.append(f"  {' '.join(args)}: {seconds:.1f} s wall, {cpu:.1f} CPU s, load average {os.getloadavg()[0]:.1f}")
    return seconds


def _point(run_h5: str) -> dict:
    import h5py

    with h5py.File(run_h5, "r") as f:
        fin, sens = f["final"].attrs, f["sensitivity"].attrs
        return {"final": float(fin["metric"]), "macs_kept": float(fin["macs_kept"]),
                "grid_source": str(sens.get("source", "")), "status": str(f.attrs["status"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.3,0.4,0.5,0.6")
    ap.add_argument("--methods", default="uniform,global,sensitivity")
    ap.add_argument("--out", default="/tmp/hpcprune_sweep_bench")
    ap.add_argument("--log", default=os.path.join(HERE, "results", "sweep_bench.log"))
    ap.add_argument("--png", default=None, help="write the multirun's Pareto figure here")
    ap.add_argument("--launcher", default="joblib", choices=["joblib", "submitit_local", "basic"],
                    help="the multirun's Hydra launcher: points on a pool of local worker processes, as concurrent local "
                         "jobs (a process each), or one after the other in one process")
    a = ap.parse_args()
    budgets, methods = a.budgets.split(","), a.methods.split(",")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    log: list[str] = [f"# sweep_bench {time.strftime('%Y-%m-%d %H:%M:%S')}: {len(budgets)} budgets x {len(methods)} methods; "
                      f"settings: {' '.join(SETTINGS)}"]
    log.append("solo runs:")
    solo: dict[tuple[str, str], dict] = {}
    t_solo = 0.0
    for b in budgets:
        for m in methods:
            d = os.path.join(a.out, "solo", f"{m}-{b}")
            t_solo += _sweep([f"prune.target.macs={b}", f"prune.method={m}", f"hydra.run.dir={d}"], log)
            solo[(b, m)] = _point(os.path.join(d, "run.h5"))
    cpu_solo = CPU_S[0]
    log.append(f"multirun (hydra/launcher={a.launcher}):")
    sweep_dir = os.path.join(a.out, "multirun")
    t_multi = _sweep(["-m", f"hydra/launcher={a.launcher}", f"prune.target.macs={a.budgets}", f"prune.method={a.methods}", f"hydra.sweep.dir={sweep_dir}"], log)
    multi: dict[tuple[str, str], dict] = {}
    i = 0
    for b in budgets:  # Hydra numbers the jobs in the order of the sweep's cartesian product
        for m in methods:
            multi[(b, m)] = _point(os.path.join(sweep_dir, str(i), "run.h5"))
            i += 1
    computed = sum(1 for p in multi.values() if p["grid_source"] == "")
    log.append("")
    log.append("| budget | method | solo final | multirun final | solo MACs kept | multirun MACs kept | multirun grid |")
    log.append("| --- | --- | --- | --- | --- | --- | --- |")
    for (b, m), s in solo.items():
        p = multi[(b, m)]
        log.append(f"| {b} | {m} | {s['final']:.4f} | {p['final']:.4f} | {s['macs_kept']:.4f} | {p['macs_kept']:.4f} | "
                   f"{'computed' if p['grid_source'] == '' else 'reused'} |")
    same = all(abs(solo[k]["final"] - multi[k]["final"]) < 1e-9 and abs(solo[k]["macs_kept"] - multi[k]["macs_kept"]) < 1e-9
               for k in solo)
    log.append("")
    log.append(f"wall: {len(solo)} solo runs {t_solo:.1f} s, one multirun {t_multi:.1f} s: {t_solo / t_multi:.2f}x faster; "
               f"grids computed in the multirun: {computed} of {len(multi)}; same numbers as solo: {same}")
    if a.png:
        pngs = os.path.join(a.out, "png")
        r = subprocess.run([sys.executable, "-m", "hpcprune.report", sweep_dir, "--png", pngs], cwd=REPO,
                           capture_output=True, text=True)
        if r.returncode == 0 and os.path.exists(os.path.join(pngs, "pareto.png")):
            shutil.copyfile(os.path.join(pngs, "pareto.png"), a.png)
            log.append(f"figure: {a.png}")
        else:
            log.append(f"figure: not written ({r.stderr.strip()[-300:]})")
    cpu_multi = CPU_S[0] - cpu_solo
    log.append(f"CPU seconds: {len(solo)} solo runs {cpu_solo:.1f}, multirun {cpu_multi:.1f}: {cpu_solo / max(cpu_multi, 1e-9):.2f}x less work")
    summary = {"points": len(solo), "solo_s": round(t_solo, 1), "multirun_s": round(t_multi, 1),
               "solo_cpu_s": round(cpu_solo, 1), "multirun_cpu_s": round(cpu_multi, 1),
               "speedup": round(t_solo / t_multi, 2), "grids_computed": computed, "same_numbers": same}
    log.append(json.dumps(summary))
    text = "\n".join(log)
    print(text)
    os.makedirs(os.path.dirname(a.log), exist_ok=True)
    with open(a.log, "w") as fh:
        fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
