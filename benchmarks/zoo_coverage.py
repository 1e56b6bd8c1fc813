"""Which torchvision classification models go through the whole hpcprune sweep (not run in CI).

    .venv-vision/bin/python benchmarks/zoo_coverage.py [--models a,b,c] [--timeout 180] [--jobs 2]
        [--root DIR] [--out DIR] [--log benchmarks/results/zoo_coverage.log]

Needs torchvision (pip install -e .[vision]; see README). For every model of
``torchvision.models.list_models(module=torchvision.models)`` (classification only) it runs the real
sweep in a subprocess on a small ImageFolder made from scikit-learn's digits
(benchmarks/make_digits_folder.py, 10 images per class, at the model's ``min_image_size``) with
tiny settings (random dense weights, no training, one sensitivity ratio, BatchNorm re-estimated on 16
images, no fine-tuning), then
checks the run file:

- status: completed, refused (the sweep's one error line), crashed (a traceback), timeout
- groups kept / excluded: ``/groups`` (``/groups@excluded``, less the classifier, which is always
  kept because it feeds the output; with the excluded groups' layer types)
- MACs error: ``/final@macs`` against a fresh count of ``hpcprune.load_pruned(run.h5)`` with
  ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on one example, with
  ``nn.MultiheadAttention``'s fused fast path off (``torch.backends.mha.set_fastpath_enabled``; its
  fused kernel has no flop formula); the same for the dense model (``/baseline@macs``)
- reload: ``load_pruned`` re-evaluated on the validation set equals ``/final@metric`` and ``@loss``
- seconds: wall time of the sweep, and its CPU seconds (user + system, one torch thread): the time
  it would take on an idle core, whatever else runs on the machine

It prints (and tees to --log) a markdown table, summary counts and, as its last line, one JSON
object with the counts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXCLUDE = ("quantized", "segmentation", "detection", "video", "optical_flow", "raft")

SWEEP_ARGS = [
    "model=torchvision", "data=image_folder", "threads=1", "launcher=debug", "device=cpu",
    "baseline.epochs=0", "finetune.epochs=0", "sensitivity.ratios=[0.5]",
    "sensitivity.bn_recalib_batches=1", "prune.bn_recalib_batches=1", "baseline.latency_repeats=1",
    "baseline.latency_batch=2", "data.calib_samples=16", "prune.target.macs=0.7",
    "data.train_transforms=none",
    # BatchNorm re-estimated on one batch of 16 training images: as many as the calibration set (the
    # default batch of 64 made re-estimation 2/3 of EfficientNetV2-L's sensitivity stage)
    "baseline.batch_size=16",
]

def sweep_args(threads: int) -> list[str]:
    """SWEEP_ARGS with ``threads`` torch threads per sweep."""
    return [f"threads={threads}" if arg == "threads=1" else arg for arg in SWEEP_ARGS]


# checks on a finished run file, in a fresh process (the sweep's imports stay out of this one)
CHECK = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
from torch.utils.flop_counter import FlopCounterMode
import hpcprune
from hpcprune import metrics
from hpcprune.runs import build_data, dense_model, example_input, load_config
from hpcprune.store import RunFile

path = sys.argv[1]
rf = RunFile(path)
out = {}
with rf.read() as f:
    if "groups" in f:
        g = f["groups"]
        out["groups"] = int(len(g["name"])) if "name" in g else 0
        ex = [e for e in json.loads(g.attrs.get("excluded", "[]")) if "feeds the model's output" not in str(e[2])]
        out["excluded"] = len(ex)  # the classifier (kept: it feeds the output) is not counted
        out["excluded_reasons"] = sorted({str(e[2])[:120] for e in ex})
        out["excluded_types"] = sorted({t for e in ex for t in e[1]})
    from hpcprune.store import STAGES
    out["stages"] = [s for s in STAGES if s in f and bool(f[s].attrs.get("complete", False))]
    base_macs = float(f["baseline"].attrs["macs"]) if "baseline" in f and "macs" in f["baseline"].attrs else None
    fin = dict(f["final"].attrs) if "final" in f else None

# nn.MultiheadAttention's fused inference path (_native_multi_head_attention) has no flop formula:
# off, with PyTorch's public switch, so that the counter sees its projections and products
torch.backends.mha.set_fastpath_enabled(False)


def flops(m):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x)
    return fc.get_total_flops() / 2

cfg = load_config(rf)
try:
    # a sweep stopped before its baseline stage (a timeout in the group search) has nothing more to check
    x = example_input(rf)[:1] if "baseline" in out["stages"] else None
    if base_macs is not None and x is not None:
        d = dense_model(rf, cfg)
        fd = flops(d)
        out["macs_err_dense"] = (base_macs - fd) / fd if fd else None
    if fin is not None and x is not None:
        m = hpcprune.load_pruned(path)
        fp = flops(m)
        out["macs_err"] = (float(fin["macs"]) - fp) / fp if fp else None
        data = build_data(cfg.data)
        sums = metrics.evaluate(m, metrics.make_batches(data.val, 256))
        metric, loss = sums.metric(data.metric), sums.mean_loss()
        out["reload_metric_diff"] = abs(metric - float(fin["metric"]))
        out["reload_loss_diff"] = abs(loss - float(fin["loss"]))
        out["reload_ok"] = out["reload_metric_diff"] < 1e-9 and out["reload_loss_diff"] <= 1e-5 * max(1.0, abs(float(fin["loss"])))
except Exception as e:
    lines = str(e).strip().splitlines()
    out["check_error"] = f"check: {type(e).__name__}: {lines[0][:150] if lines else ''}"
print("CHECK " + json.dumps(out))
"""


class Tee:
    """Print and append to the log (the log keeps every run's table: earlier runs are not overwritten)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "a")
        self.lock = threading.Lock()

    def __call__(self, line: str = "") -> None:
        with self.lock:
            print(line, flush=True)
            self.f.write(line + "\n")
            self.f.flush()


def models_to_run(only: str | None) -> list[str]:
    import torchvision.models as M

    names = [n for n in sorted(M.list_models(module=M)) if not any(k in n for k in EXCLUDE)]
    if only:
        want = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [w for w in want if w not in names]
        if unknown:
            sys.exit(f"--models: not torchvision classification models: {', '.join(unknown)}")
        names = want
    return names


def digits_folder(root: str | None, size: int, cache: dict, lock: threading.Lock) -> str:
    """The digits ImageFolder at ``size`` px (made once per size; 10 images per class)."""
    with lock:
        if size in cache:
            return cache[size]
        base = root or os.path.join(tempfile.gettempdir(), "hpcprune_zoo_digits")
        path = os.path.join(base, f"digits{size}")
        if not os.path.isdir(os.path.join(path, "9")):
            subprocess.run([sys.executable, os.path.join(HERE, "make_digits_folder.py"), path, "--size", str(size),
                            "--limit", "10"], check=True, stdout=subprocess.DEVNULL)
        cache[size] = path
        return path


def last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far (/proc/PID/stat fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _run_timed(cmd: list[str], env: dict, out: Any, timeout: float) -> tuple[int | None, float]:
    """Run ``cmd``; its exit code (None when stopped: past ``timeout`` CPU seconds, or 4x that in
    wall seconds) and the CPU seconds (user + system) it used. The sweep runs one torch thread in
    one process, so its CPU time is what its wall time would be on an idle core, whatever else loads
    the machine: the limit and the table's "CPU s" column do not depend on the machine's load."""
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    end = time.perf_counter() + 4 * timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            return os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime
        if time.perf_counter() > end or _cpu_seconds(p.pid) > timeout:
            p.kill()
            _, _, ru = os.wait4(p.pid, 0)
            return None, ru.ru_utime + ru.ru_stime
        time.sleep(0.5)


def run_one(name: str, a: argparse.Namespace, cache: dict, lock: threading.Lock) -> dict:
    from hpcprune.zoo.vision import min_image_size

    size = min_image_size(name)
    root = digits_folder(a.root, size, cache, lock)
    run_dir = os.path.join(a.out, name)
    if os.path.isdir(run_dir):  # a fresh run, never a resume of an older one
        import shutil

        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "hpcprune.sweep", *sweep_args(a.threads), f"model.name={name}", f"data.root={root}",
           f"data.image_size={size}", f"hydra.run.dir={run_dir}",
           f"groups.timeout_s={a.timeout}"]  # a graph build that hangs is refused in time, not timed out
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), PYTHONWARNINGS="ignore")
    row: dict = {"model": name, "size": size}
    os.makedirs(run_dir)
    out_path = os.path.join(run_dir, "coverage_output.txt")  # the sweep's stdout and stderr, kept on a timeout too
    t0 = time.perf_counter()
    with open(out_path, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        rc, cpu = _run_timed(cmd, env, f, a.timeout)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["cpu_s"] = round(cpu, 1)
    with open(out_path, errors="replace") as f:
        text = f.read()
    if rc is None:
        row["status"] = "timeout"
    elif rc == 0:
        row["status"] = "completed"
    elif "Traceback (most recent call last)" in text:
        row["status"] = "crashed"
        row["error"] = last_error_line(text)
    else:
        row["status"] = "refused"
        row["error"] = last_error_line(text)
    run_file = os.path.join(run_dir, "run.h5")
    if os.path.isfile(run_file):
        try:
            p = subprocess.run([sys.executable, "-c", CHECK, run_file], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=2 * a.timeout)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("CHECK ")]
            if lines:
                row.update(json.loads(lines[-1][6:]))
            else:
                row["check_error"] = last_error_line(p.stderr)
        except subprocess.TimeoutExpired:
            row["check_error"] = "check timed out"
    if not a.keep_weights:  # checked: the weights go (VGG's run directory holds 5 GB), the logs and run file stay
        import shutil

        for entry in os.listdir(run_dir):
            path = os.path.join(run_dir, entry)
            if entry.endswith(".safetensors"):
                os.remove(path)
            elif entry == "finetune" and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
    return row


def fmt(v: object, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if pct and isinstance(v, (int, float)):
        return f"{100 * v:+.1f} %"
    return str(v)


def summarize_rows(rows: dict[str, dict], names: list[str], log: Any) -> None:
    """The markdown table, the summary counts and (last line) the counts as one JSON object."""
    log("")
    log("| model | px | status | last stage done | groups | excluded | MACs err (pruned) | MACs err (dense) | reload identical | s | CPU s | error |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in names:
        r = rows[n]
        last = r["stages"][-1] if r.get("stages") else "-"
        log(f"| {n} | {r.get('size', '-')} | {r['status']} | {last} | {fmt(r.get('groups'))} | {fmt(r.get('excluded'))}{' (' + ', '.join(r['excluded_types'][:4]) + ')' if r.get('excluded_types') else ''} | "
            f"{fmt(r.get('macs_err'), True)} | {fmt(r.get('macs_err_dense'), True)} | {fmt(r.get('reload_ok'))} | "
            f"{fmt(r.get('seconds'))} | {fmt(r.get('cpu_s'))} | {(r.get('error') or r.get('check_error') or '').replace('|', '/')} |")
    counts: dict[str, int] = {"models": len(names)}
    for s in ("completed", "refused", "crashed", "timeout"):
        counts[s] = sum(1 for r in rows.values() if r["status"] == s)
    counts["reload_identical"] = sum(1 for r in rows.values() if r.get("reload_ok") is True)
    counts["reload_differs"] = sum(1 for r in rows.values() if r.get("reload_ok") is False)
    counts["with_excluded_groups"] = sum(1 for r in rows.values() if (r.get("excluded") or 0) > 0)
    # the bar: recorded MACs within 1 % of a fresh count, dense and pruned
    counts["macs_err_over_1pct"] = sum(1 for r in rows.values()
                                       if any(abs(r.get(k) or 0.0) > 0.01 for k in ("macs_err", "macs_err_dense")))
    counts["silently_wrong"] = counts["reload_differs"] + counts["macs_err_over_1pct"]
    counts["done_over_60s"] = sum(1 for r in rows.values() if r["status"] in ("completed", "refused")
                                  and (r.get("seconds") or 0) > 60)
    counts["refused_over_60s"] = sum(1 for r in rows.values() if r["status"] == "refused" and (r.get("seconds") or 0) > 60)
    # the same on CPU seconds: one torch thread, so this is the wall time on an idle core
    counts["done_over_60_cpu_s"] = sum(1 for r in rows.values() if r["status"] in ("completed", "refused")
                                       and (r.get("cpu_s") or 0) > 60)
    log("")
    log("summary: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    reasons: dict[str, int] = {}
    for r in rows.values():
        for why in r.get("excluded_reasons", []):
            reasons[why] = reasons.get(why, 0) + 1
    if reasons:
        log("exclusion reasons (models): " + "; ".join(f"{k} ({v})" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])))
    log(json.dumps(counts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hpcprune sweep over torchvision's classification models")
    ap.add_argument("--models", help="comma-separated subset (default: all classification models)")
    ap.add_argument("--timeout", type=int, default=180,
                    help="CPU seconds per model's sweep (default 180; wall time is capped at 4x)")
    ap.add_argument("--jobs", type=int, default=2, help="sweeps at once (default 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per sweep (default 1: CPU seconds are then the time on an idle core)")
    ap.add_argument("--root", help="where the digits ImageFolders go (default: the temp dir)")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "hpcprune_zoo_runs"), help="run directories")
    ap.add_argument("--keep-weights", action="store_true",
                    help="keep each run's weights (*.safetensors, finetune/); by default they are removed once checked")
    ap.add_argument("--log", default=os.path.join(HERE, "results", "zoo_coverage.log"))
    ap.add_argument("--rows", default=None, help="append each model's result here as a JSON line as soon as it is known "
                    "(a stopped run keeps what it measured); default: the log's name with .jsonl")
    ap.add_argument("--table-from", default=None, metavar="ROWS.jsonl",
                    help="print the table and summary of saved rows (no sweeps)")
    a = ap.parse_args(argv)
    if a.table_from:
        with open(a.table_from) as fh:
            saved = [json.loads(ln) for ln in fh if ln.strip()]
        log = Tee(a.log)
        log(f"# rows read from {a.table_from}")
        summarize_rows({r["model"]: r for r in saved}, [r["model"] for r in saved], log)
        return 0
    names = models_to_run(a.models)
    log = Tee(a.log)
    rows_path = a.rows or os.path.splitext(a.log)[0] + ".jsonl"
    import torch
    import torchvision

    log(f"# hpcprune on torchvision's zoo: {len(names)} models, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, limit {a.timeout} CPU s per sweep, {a.jobs} at a time, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    log("# sweep: python -m hpcprune.sweep " + " ".join(sweep_args(a.threads)) + " model.name=NAME data.root=DIGITS data.image_size=SIZE"
        f" groups.timeout_s={a.timeout}")
    cache: dict = {}
    lock = threading.Lock()
    rows: dict[str, dict] = {}

    def job(n: str) -> None:
        try:
            r = run_one(n, a, cache, lock)
        except Exception as e:  # the harness itself: never lose the other models
            r = {"model": n, "status": "crashed", "error": f"harness: {type(e).__name__}: {e}"}
        rows[n] = r
        with lock:
            with open(rows_path, "a") as fh:
                fh.write(json.dumps(r, default=str) + "\n")
        log(f"- {n}: {r['status']} in {r.get('seconds', '-')} s ({r.get('cpu_s', '-')} CPU s)" + (f": {r['error']}" if r.get("error") else ""))

    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        list(ex.map(job, names))

    summarize_rows(rows, names, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
