"""Compare runs: one table row per run file.

    python -m hpcprune.report outputs/*/*/run.h5 [--sort COLUMN] [--csv OUT.csv]
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
from typing import Any

from .store import RunFile, RunFileError

COLUMNS = [
    ("run", "run"), ("status", "status"), ("method", "method"), ("target", "target"),
    ("dense", "dense"), ("pruned", "pruned"), ("final", "final"), ("macs_kept", "MACs kept"),
    ("params_kept", "params kept"), ("speedup", "speed-up"), ("world", "ranks"), ("ft_tasks", "DDP"),
    ("t_sens", "sens s"), ("t_ft", "ft s"), ("wall", "wall s"),
]


def _get(attrs: dict[str, Any], key: str) -> Any:
    v = attrs.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def summarize(path: str) -> dict[str, Any]:
    run = RunFile(path)
    row: dict[str, Any] = {"run": os.path.relpath(os.path.dirname(run.path)), "path": run.path}
    with run.read() as f:
        root = dict(f.attrs)
        row["status"] = str(root.get("status"))
        row["world"] = int(root.get("world_size", 1))
        row["wall"] = _get(root, "wall_s")

        def attrs(name: str) -> dict[str, Any]:
            return dict(f[name].attrs) if name in f else {}

        base, alloc, pr, fin, ft, sens = (attrs(n) for n in ("baseline", "allocation", "pruned", "final", "finetune", "sensitivity"))
        row["metric"] = str(base.get("metric_name", "metric"))
        row["dense"] = _get(base, "metric")
        row["pruned"] = _get(pr, "metric")
        row["final"] = _get(fin, "metric")
        row["method"] = str(alloc.get("method", ""))
        targets = json.loads(alloc["targets"]) if "targets" in alloc else {}
        row["target"] = ",".join(f"{k}={v}" for k, v in targets.items())
        src = fin or pr
        row["macs_kept"] = _get(src, "macs_kept")
        row["params_kept"] = _get(src, "params_kept")
        row["speedup"] = _get(src, "latency_speedup")
        row["ft_tasks"] = _get(ft, "world_size")
        row["t_sens"] = _get(sens, "wall_s")
        hist = f["finetune/history"][()] if "finetune/history" in f else None
        row["t_ft"] = float(hist[:, 5].sum()) if hist is not None and len(hist) else None
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [[h for _, h in COLUMNS]] + [[_fmt(r.get(k)) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def find_runs(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(glob.glob(os.path.join(p, "**", "run.h5"), recursive=True))
        else:
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcprune.report", description="Compare hpcprune run files.")
    ap.add_argument("runs", nargs="+", help="run.h5 files or directories searched recursively")
    ap.add_argument("--sort", default=None, help=f"sort by column ({', '.join(k for k, _ in COLUMNS)})")
    ap.add_argument("--csv", default=None, help="also write the table as CSV")
    args = ap.parse_args(argv)
    paths = find_runs(args.runs)
    if not paths:
        print("hpcprune.report: error: no run files found", file=sys.stderr)
        return 2
    rows = []
    for p in paths:
        try:
            rows.append(summarize(p))
        except (RunFileError, OSError) as e:
            print(f"hpcprune.report: error: {e}", file=sys.stderr)
            return 2
    if args.sort:
        keys = [k for k, _ in COLUMNS]
        if args.sort not in keys:
            print(f"hpcprune.report: error: --sort {args.sort!r} is not a column ({', '.join(keys)})", file=sys.stderr)
            return 2
        rows.sort(key=lambda r: (r.get(args.sort) is None, r.get(args.sort) if r.get(args.sort) is not None else 0))
    print(format_table(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=[k for k, _ in COLUMNS] + ["metric", "path"], extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
