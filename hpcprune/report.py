"""Compare runs: a table in the terminal, one self-contained HTML page, PNG figures, CSV.

    python -m hpcprune.report RUN.h5 [RUN.h5 | DIR ...]     # a directory is searched for run.h5
        [--sort COLUMN [--desc]] [--filter KEY=VALUE ...]
        [--html OUT.html] [--png DIR] [--csv OUT.csv]

``--filter`` takes a dotted key of the run's stored config (``prune.method=uniform``,
``prune.target.macs=0.3``) or a table column (``status=complete``); repeated filters must all hold.
Only the run file is read (plus ``sweep.log`` next to it for per-stage timings); torch is not
imported. Run files of a schema this code does not know are refused with one line each and a
non-zero exit; the readable ones are still reported.

This module reads the run files (:func:`load_run`) and does the table, sorting, filtering and CSV;
the figures, PNG files and the HTML page are :mod:`hpcprune.report_html` (its functions are also
reachable here, as before: ``report.render_html``, ``report.build_figures``, ...).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .config import RESUME_IGNORED, flat
from .errors import HpcpruneError
from .store import TIMED_STAGES, RunFile, RunFileError

COLUMNS = [
    ("run", "run"), ("status", "status"), ("method", "method"), ("target", "target"),
    ("dense", "dense"), ("pruned", "pruned"), ("final", "final"), ("macs_kept", "MACs kept"),
    ("params_kept", "params kept"), ("speedup", "speed-up"), ("energy", "J/sample"), ("groups", "groups"), ("excluded", "excluded"),
    ("world", "ranks"), ("ft_tasks", "DDP"), ("front", "front"), ("grid", "sens grid"),
    ("t_sens", "sens s"), ("t_ft", "ft s"), ("wall", "wall s"),
]
# what each column holds (``--help``, README)
LEGEND = {
    "run": "the run directory", "status": "complete, failed (with the reason) or running",
    "method": "prune.method", "target": "the budgets (prune.target.*: fractions of the dense model to keep)",
    "dense": "the dense model's metric (accuracy, or perplexity for language models)",
    "pruned": "the metric after pruning (BatchNorm re-estimated), before fine-tuning",
    "final": "the metric after fine-tuning", "MACs kept": "the final model's MACs / the dense model's",
    "params kept": "parameters likewise", "speed-up": "dense latency / final latency, timed in alternation",
    "J/sample": "energy per sample of the final model (NVML or RAPL; - where not measurable)",
    "groups": "groups pruned (channels, neurons, heads, blocks)", "excluded": "groups verification excluded (kept whole)",
    "ranks": "MPI ranks of the last attempt", "DDP": "fine-tune tasks", "front": "on the Pareto front of its task, or dominated",
    "sens grid": "the sensitivity grid computed here, or the run it was copied from",
    "sens s": "sensitivity wall seconds", "ft s": "seconds of the fine-tune epochs (training and validation)",
    "wall s": "wall seconds over every attempt of the run",
}
STAGES = TIMED_STAGES  # the stages timed per run, in README's order
# config keys that do not change results (those a resume may change): ignored when deciding
# whether runs differ only in prune.method
NEUTRAL_KEYS = RESUME_IGNORED
_STAGE_LINE = re.compile(r"stage (\w+): ([0-9.]+) s\b")


class ReportError(HpcpruneError, ValueError):
    """Bad report arguments (unknown column, unknown filter key)."""


def _get(attrs: Any, key: str) -> Any:
    v = attrs.get(key) if attrs is not None else None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode()
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _strs(a: Any) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).ravel()]


@dataclass
class Run:
    """Everything the report shows about one run file, read once."""

    path: str
    row: dict[str, Any]
    label: str = ""
    config: dict[str, Any] = field(default_factory=dict)   # flat, dotted keys
    metric_name: str = "metric"
    higher_is_better: bool = True
    dense: dict[str, Any] = field(default_factory=dict)    # /baseline attrs
    pruned: dict[str, Any] = field(default_factory=dict)   # /pruned attrs
    final: dict[str, Any] = field(default_factory=dict)    # /final attrs
    groups: list[str] = field(default_factory=list)        # model order
    excluded: list[list] = field(default_factory=list)     # [name, layer types, reason] per group not pruned
    status_reason: str = ""                                 # why a failed run stopped
    forced: list[dict] = field(default_factory=list)        # resumes with resume.force over a changed config
    sizes: list[int] = field(default_factory=list)
    sens: dict[str, Any] | None = None
    alloc: dict[str, Any] | None = None
    history: np.ndarray | None = None
    history_columns: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    timing_source: str = ""
    wall: float | None = None
    worlds: dict[str, Any] = field(default_factory=dict)

    @property
    def alloc_label(self) -> str:
        method = self.row.get("method") or "?"
        return f"{self.label} ({method})" if self.label != method else method


def _attrs(f: Any, name: str) -> dict[str, Any]:
    return {k: _get(f[name].attrs, k) for k in f[name].attrs} if name in f else {}


def load_run(path: str) -> Run:
    """Read one run file (RunFileError when it is not a run file of a known schema)."""
    import yaml

    rf = RunFile(path)
    with rf.read() as f:
        root = _attrs(f, "/")
        base, alloc, pr, fin, ft, sens = (_attrs(f, n) for n in ("baseline", "allocation", "pruned", "final", "finetune", "sensitivity"))
        run = Run(path=rf.path, row={})
        try:
            run.config = flat(yaml.safe_load(root.get("config") or "") or {})
        except yaml.YAMLError:
            run.config = {}
        run.metric_name = str(base.get("metric_name") or sens.get("metric_name") or "metric")
        run.higher_is_better = bool(base.get("higher_is_better", True))
        run.dense, run.pruned, run.final = base, pr, fin
        if "groups/name" in f:
            run.groups = _strs(f["groups/name"][()])
            run.sizes = [int(x) for x in f["groups/size"][()]]
            run.excluded = json.loads(_get(f["groups"].attrs, "excluded") or "[]")
        if "sensitivity/metric" in f and run.groups:
            run.sens = _read_sensitivity(f["sensitivity"], sens, base)
        if "allocation/ratio" in f and bool(alloc.get("complete")):
            run.alloc = {"ratio": f["allocation/ratio"][()].astype(float), "keep": f["allocation/keep"][()].astype(int),
                         "attrs": alloc}
        if "finetune/history" in f:
            ds = f["finetune/history"]
            run.history = ds[()].astype(float)
            run.history_columns = _strs(ds.attrs.get("columns", ["epoch", "train_loss", "val_metric", "val_loss", "lr", "seconds"]))
        run.wall = _get(root, "wall_s_total") or _get(root, "wall_s")  # every invocation (a resume adds to it)
        run.worlds = {"sweep": _get(root, "world_size"), "sensitivity": sens.get("world_size"), "finetune": ft.get("world_size")}
        _read_timings(run, f, root, sens)
        run.status_reason = str(root.get("status_reason") or "")
        try:
            run.forced = list(json.loads(root.get("config_history") or "[]"))
        except ValueError:
            run.forced = []
        run.row = _row(run, rf.path, root, base, alloc, pr, fin, ft, sens)
    return run


def _read_sensitivity(s: Any, sens: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The sensitivity grid (``/sensitivity`` datasets) with the dense reference its cells compare to."""
    # the cells are measured on the calibration set; the run file's dense reference is the
    # val metric unless a dense calibration metric is recorded
    if sens.get("dense_calib_metric") is not None:
        ref, ref_name = float(sens["dense_calib_metric"]), "dense model on the calibration set"
    else:
        ref = float(sens.get("dense_metric", base.get("metric", math.nan)))
        ref_name = ("dense model on the validation set (the run file records no dense metric on the "
                    "calibration set, which the cells are measured on)")
    return {"ratios": s["ratios"][()].astype(float), "metric": s["metric"][()].astype(float),
            "loss": s["loss"][()].astype(float), "status": s["status"][()].astype(int),
            "seconds": s["seconds"][()].astype(float), "rank": s["rank"][()].astype(int),
            "reference": ref, "reference_name": ref_name, "attrs": sens}


def _read_timings(run: Run, f: Any, root: dict[str, Any], sens: dict[str, Any]) -> None:
    """``run.timings`` (seconds per stage) and ``run.timing_source``: a ``seconds`` attribute on the
    stage groups, else the root attribute ``stage_seconds`` (JSON), else the "stage NAME: X s" lines
    of sweep.log next to the run file."""
    stored = {s: _get(f[s].attrs, "seconds") for s in STAGES if s in f}
    stored = {s: float(v) for s, v in stored.items() if v is not None}
    if not stored and root.get("stage_seconds"):
        try:
            stored = {k: float(v) for k, v in json.loads(root["stage_seconds"]).items() if k in STAGES and v is not None}
        except (ValueError, TypeError, AttributeError):
            stored = {}
    if stored:
        run.timings, run.timing_source = stored, "run file"
    else:
        run.timings = _timings_from_log(os.path.join(os.path.dirname(run.path), "sweep.log"))
        run.timing_source = "sweep.log" if run.timings else ""
    if "sensitivity" not in run.timings and sens.get("wall_s") is not None:
        run.timings["sensitivity"] = float(sens["wall_s"])
        run.timing_source = run.timing_source or "run file"


def _row(run: Run, path: str, root: dict[str, Any], base: dict[str, Any], alloc: dict[str, Any], pr: dict[str, Any],
         fin: dict[str, Any], ft: dict[str, Any], sens: dict[str, Any]) -> dict[str, Any]:
    """The run's table row (:data:`COLUMNS`, plus ``metric`` and ``path``)."""
    row: dict[str, Any] = {"run": os.path.relpath(os.path.dirname(path)), "path": path}
    row["status"] = str(root.get("status"))
    row["world"] = int(root.get("world_size") or 1)
    row["wall"] = run.wall
    row["metric"] = run.metric_name
    row["dense"] = _get(base, "metric")
    row["pruned"] = _get(pr, "metric")
    row["final"] = _get(fin, "metric")
    row["method"] = str(alloc.get("method") or run.config.get("prune.method") or "")
    targets = json.loads(alloc["targets"]) if alloc.get("targets") else {
        k.split(".")[-1]: v for k, v in run.config.items() if k.startswith("prune.target.") and v is not None}
    row["target"] = ",".join(f"{k}={v}" for k, v in targets.items())
    src = fin or pr
    row["macs_kept"] = _get(src, "macs_kept")
    row["params_kept"] = _get(src, "params_kept")
    row["speedup"] = _get(src, "latency_speedup")
    row["energy"] = _get(src, "energy_j_per_sample")  # NaN (not measured: energy_source says why) -> missing
    row["ft_tasks"] = _get(ft, "world_size")
    row["groups"] = len(run.groups) if run.groups else None
    # excluded by verification (a group that feeds the output is kept on purpose, not counted)
    row["excluded"] = sum(1 for e in run.excluded if "feeds the model's output" not in str(e[2])) if run.groups else None
    row["grid_source"] = _get(sens, "source")  # "" computed here; a run or cache file it was copied from
    row["t_sens"] = _get(sens, "wall_s") if not sens.get("source") else None  # a copied grid: its source's time, not this run's
    hist = run.history
    sec = run.history_columns.index("seconds") if "seconds" in run.history_columns else None
    row["t_ft"] = float(hist[:, sec].sum()) if hist is not None and len(hist) and sec is not None else None
    return row


def _timings_from_log(log_path: str) -> dict[str, float]:
    """Seconds per stage from sweep.log; a resumed run's attempts are added up."""
    out: dict[str, float] = {}
    try:
        with open(log_path, errors="replace") as fh:
            for line in fh:
                m = _STAGE_LINE.search(line)
                if m and m.group(1) in STAGES:
                    out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    except OSError:
        pass
    return out


def pareto_front(points: list[tuple[float, float, str]], higher_x: bool, higher_y: bool) -> list[str]:
    """Labels of the non-dominated points of ``(x, y, label)``: no other point is at least as good on
    both axes and better on one (x: a cost or a speed-up, ``higher_x`` says which way is better)."""
    out = []
    for x, y, lab in points:
        dominated = False
        for x2, y2, lab2 in points:
            if lab2 == lab:
                continue
            bx, by = (x2 >= x if higher_x else x2 <= x), (y2 >= y if higher_y else y2 <= y)
            sx, sy = (x2 > x if higher_x else x2 < x), (y2 > y if higher_y else y2 < y)
            if bx and by and (sx or sy):
                dominated = True
                break
        if not dominated:
            out.append(lab)
    return out


def task_key(run: Run) -> str:
    """What a run's metric is comparable within: its model and data config (``model.*``, ``data.*``, the
    dense checkpoint; not ``data.calib_samples``, which only changes how it was pruned). Fronts are
    per task: a run on another model or data set dominates nothing."""
    keys = sorted(k for k in run.config if (k.startswith(("model.", "data.")) and k != "data.calib_samples")
                  or k == "checkpoint")
    return json.dumps([[k, run.config[k]] for k in keys], default=str)


def mark_sweep(runs: Sequence[Run]) -> None:
    """Per row: ``front`` (``yes`` / ``dominated`` on final metric against MACs kept, among the runs
    shown that have both and share its task (:func:`task_key`); ``-`` otherwise) and ``grid`` (``own``
    when the run computed its sensitivity grid, ``from <label>`` when it was copied from a run shown,
    ``cache`` from the cache directory, ``reused`` from a run not shown; ``/sensitivity@source`` says which)."""
    # the final metric of the runs that have one (a failed or unfinished run is on no front)
    pts = [(float(r.row["macs_kept"]), float(r.row["final"]), r.label)
           for r in runs if r.row.get("macs_kept") is not None and r.row.get("final") is not None]
    task = {r.label: task_key(r) for r in runs}
    higher = {task_key(r): r.higher_is_better for r in runs}  # each task's own metric: accuracy up, perplexity down
    front: set[str] = set()
    for t in set(task.values()):
        front |= set(pareto_front([p for p in pts if task[p[2]] == t], False, higher[t]))
    by_path = {os.path.abspath(r.path): r.label for r in runs}
    for r in runs:
        if r.label in {p[2] for p in pts}:
            r.row["front"] = "yes" if r.label in front else "dominated"
        src = r.row.get("grid_source")
        if src is not None:
            shown = by_path.get(os.path.abspath(src))
            r.row["grid"] = ("own" if src == "" else f"from {shown}" if shown is not None
                             else "cache" if "sensitivity-" in os.path.basename(src) else "reused")


def summarize(path: str) -> dict[str, Any]:
    """One table row for a run file."""
    return load_run(path).row


def label_runs(runs: Sequence[Run]) -> None:
    """Short unique labels: the run directories without their common prefix."""
    dirs = [os.path.dirname(r.path) for r in runs]
    if len(dirs) == 1:
        runs[0].label = os.path.basename(dirs[0]) or dirs[0]
        return
    common = os.path.commonpath(dirs)
    for r, d in zip(runs, dirs):
        r.label = os.path.relpath(d, common) if d != common else os.path.basename(d)
    seen: dict[str, int] = {}
    for r in runs:  # the same directory given twice
        n = seen.get(r.label, 0)
        seen[r.label] = n + 1
        if n:
            r.label = f"{r.label}#{n + 1}"


# ---- table ------------------------------------------------------------------------------------------
SECONDS = {"t_sens", "t_ft", "wall"}


def _fmt(v: Any, key: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if key in SECONDS:
            return f"{v:.1f}"
        if key == "energy":  # joules per sample: 3 significant digits at any scale
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"  # perplexities keep two decimals
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [[h for _, h in COLUMNS]] + [[_fmt(r.get(k), k) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def column_key(name: str) -> str:
    """A column by key (``macs_kept``) or header (``"MACs kept"``), case-insensitive."""
    for k, h in COLUMNS:
        if name.lower() in (k.lower(), h.lower()):
            return k
    raise ReportError(f"--sort {name!r} is not a column (choose from {', '.join(k for k, _ in COLUMNS)})")


def sort_runs(runs: list[Run], column: str, desc: bool = False) -> list[Run]:
    """Sort by a column; numbers numerically, missing values last in either direction."""
    key = column_key(column)
    have = [r for r in runs if r.row.get(key) is not None]
    missing = [r for r in runs if r.row.get(key) is None]
    numeric = all(isinstance(r.row[key], (int, float)) and not isinstance(r.row[key], bool) for r in have)
    have.sort(key=(lambda r: float(r.row[key])) if numeric else (lambda r: str(r.row[key])), reverse=desc)
    return have + missing


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _matches(have: Any, want_text: str) -> bool:
    want = _parse_value(want_text)
    if isinstance(have, (int, float)) and isinstance(want, (int, float)) and not isinstance(have, bool):
        return math.isclose(float(have), float(want), rel_tol=1e-9, abs_tol=1e-12)
    return have == want or str(have) == want_text


def filter_runs(runs: list[Run], filters: Sequence[str]) -> list[Run]:
    """Keep runs whose config (dotted keys) or table column equals every KEY=VALUE."""
    out = list(runs)
    columns = {k for k, _ in COLUMNS}
    for spec in filters:
        key, sep, value = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ReportError(f"--filter {spec!r}: use KEY=VALUE, e.g. prune.method=uniform")
        in_config = any(key in r.config for r in runs)
        if not in_config and key not in columns:
            prefix = [k for k in sorted({k for r in runs for k in r.config}) if k.startswith(key + ".")]
            hint = f" (did you mean {', '.join(prefix[:4])}?)" if prefix else ""
            raise ReportError(f"--filter {spec!r}: no run has the config key {key!r}{hint}")
        if in_config:
            out = [r for r in out if key in r.config and _matches(r.config[key], value)]
        else:
            out = [r for r in out if _matches(r.row.get(key), value)]
    return out


def write_csv(path: str, runs: Sequence[Run]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[k for k, _ in COLUMNS] + ["metric", "path"], extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow({k: ("" if v is None else v) for k, v in r.row.items()})


# ---- comparisons ------------------------------------------------------------------------------------
def config_diff(runs: Sequence[Run]) -> list[tuple[str, list[Any]]]:
    """(key, value per run) for the config keys whose values differ between the runs."""
    keys = sorted({k for r in runs for k in r.config})
    missing = object()
    out = []
    for k in keys:
        vals = [r.config.get(k, missing) for r in runs]
        if len({json.dumps(v, sort_keys=True, default=str) if v is not missing else "\0missing" for v in vals}) > 1:
            out.append((k, [None if v is missing else v for v in vals]))
    return out


def method_families(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs grouped so that the runs of one group differ (if at all) only in prune.method."""
    fams: dict[str, list[Run]] = {}
    for r in runs:
        if r.alloc is None:
            continue
        rest = {k: v for k, v in r.config.items() if k != "prune.method" and not k.startswith(NEUTRAL_KEYS)}
        fams.setdefault(json.dumps(rest, sort_keys=True, default=str) + "|" + ",".join(r.groups), []).append(r)
    return list(fams.values())


# ---- command line -----------------------------------------------------------------------------------
def find_runs(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(glob.glob(os.path.join(p, "**", "run.h5"), recursive=True))
        else:
            out.append(p)
    return out


def _parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hpcprune.report", description="Compare hpcprune run files.",
        epilog="columns: " + "; ".join(f"{h}: {LEGEND.get(h, '')}" for _, h in COLUMNS))
    ap.add_argument("runs", nargs="+", help="run.h5 files, or directories searched recursively for run.h5")
    ap.add_argument("--sort", default=None, metavar="COLUMN", help=f"sort by a column ({', '.join(k for k, _ in COLUMNS)})")
    ap.add_argument("--desc", action="store_true", help="sort in descending order (missing values stay last)")
    ap.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                    help="keep runs whose config KEY (dotted, e.g. prune.method) or column equals VALUE; repeatable")
    ap.add_argument("--csv", default=None, metavar="OUT.csv", help="write the table as CSV")
    ap.add_argument("--html", default=None, metavar="OUT.html", help="write one self-contained HTML page with the figures")
    ap.add_argument("--png", default=None, metavar="DIR", help="write the figures as PNG files into DIR")
    return ap


def _error(msg: str) -> None:
    print(f"hpcprune.report: error: {msg}", file=sys.stderr)


def _load_all(paths: Sequence[str]) -> tuple[list[Run], int]:
    """The readable runs of ``paths``, and how many were refused (one error line each)."""
    runs, refused = [], 0
    for p in paths:
        try:
            runs.append(load_run(p))
        except (RunFileError, OSError, KeyError) as e:
            _error(str(e) if not isinstance(e, KeyError) else f"{os.path.abspath(p)}: incomplete run file (missing {e})")
            refused += 1
    return runs, refused


def _write_outputs(args: argparse.Namespace, runs: Sequence[Run]) -> None:
    """--csv, --png, --html (OSError when one cannot be written)."""
    if args.csv:
        _parent(args.csv)
        write_csv(args.csv, runs)
    if args.html or args.png:
        from . import plots, report_html

        figs = report_html.build_figures(runs)
        try:
            if args.png:
                for p in report_html.write_pngs(args.png, figs):
                    print(f"wrote {p}", file=sys.stderr)
            if args.html:
                _parent(args.html)
                with open(args.html, "w") as fh:
                    fh.write(report_html.render_html(runs, figs))
                print(f"wrote {args.html}", file=sys.stderr)
        finally:
            plots.close(figs)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    paths = find_runs(args.runs)
    if not paths:
        _error(f"no run files found in {' '.join(args.runs)}")
        return 2
    runs, refused = _load_all(paths)
    if not runs:
        return 2
    label_runs(runs)
    try:
        if args.filter:
            runs = filter_runs(runs, args.filter)
        if args.sort:
            runs = sort_runs(runs, args.sort, args.desc)
    except ReportError as e:
        _error(str(e))
        return 2
    if not runs:
        _error(f"no run matches {' '.join('--filter ' + f for f in args.filter)}")
        return 1
    mark_sweep(runs)
    print(format_table([r.row for r in runs]))
    for r in runs:  # why a run stopped: the one line the sweep printed, kept in the run file
        if r.row.get("status") == "failed" and r.status_reason:
            print(f"{r.row['run']}: failed: {r.status_reason}")
        for h in r.forced:  # its numbers come from two configs: say which stages had which
            print(f"{r.row['run']}: resumed with resume.force at {h.get('at')}: {'; '.join(h.get('changed', []))}; "
                  f"stages made with the earlier config: {', '.join(h.get('stages_done', [])) or 'none'}")
    try:
        _write_outputs(args, runs)
    except OSError as e:
        _error(f"cannot write {e.filename}: {e.strerror}")
        return 2
    return 2 if refused else 0


# the figures, PNG files and HTML page moved to hpcprune.report_html: the old names still work here
_HTML_NAMES = ("build_figures", "figure_png", "write_pngs", "render_html")


def __getattr__(name: str) -> Any:
    if name in _HTML_NAMES:
        from . import report_html

        return getattr(report_html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
