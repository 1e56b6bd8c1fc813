"""Compare runs: a table in the terminal, one self-contained HTML page, PNG figures, CSV.

    python -m hpcprune.report RUN.h5 [RUN.h5 | DIR ...]     # a directory is searched for run.h5
        [--sort COLUMN [--desc]] [--filter KEY=VALUE ...]
        [--html OUT.html] [--png DIR] [--csv OUT.csv]

``--filter`` takes a dotted key of the run's stored config (``prune.method=uniform``,
``prune.target.macs=0.3``) or a table column (``status=complete``); repeated filters must all hold.
Only the run file is read (plus ``sweep.log`` next to it for per-stage timings); torch is not
imported. Run files of a schema this code does not know are refused with one line each and a
non-zero exit; the readable ones are still reported.
"""
from __future__ import annotations

import argparse
import base64
import csv
import glob
import html
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .store import RunFile, RunFileError

COLUMNS = [
    ("run", "run"), ("status", "status"), ("method", "method"), ("target", "target"),
    ("dense", "dense"), ("pruned", "pruned"), ("final", "final"), ("macs_kept", "MACs kept"),
    ("params_kept", "params kept"), ("speedup", "speed-up"), ("groups", "groups"), ("excluded", "excluded"),
    ("world", "ranks"), ("ft_tasks", "DDP"),
    ("t_sens", "sens s"), ("t_ft", "ft s"), ("wall", "wall s"),
]
STAGES = ("baseline", "groups", "sensitivity", "allocation", "pruned", "final")
# config keys that do not change results (as in stages._RESUME_IGNORED): ignored when deciding
# whether runs differ only in prune.method
NEUTRAL_KEYS = ("launcher", "threads", "device", "resume", "sensitivity.flush_s", "hydra")
_STAGE_LINE = re.compile(r"stage (\w+): ([0-9.]+) s\b")


class ReportError(ValueError):
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


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


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
            run.config = flatten(yaml.safe_load(root.get("config") or "") or {})
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
            s = f["sensitivity"]
            # the cells are measured on the calibration set; the run file's dense reference is the
            # val metric unless a dense calibration metric is recorded
            if sens.get("dense_calib_metric") is not None:
                ref, ref_name = float(sens["dense_calib_metric"]), "dense model on the calibration set"
            else:
                ref = float(sens.get("dense_metric", base.get("metric", math.nan)))
                ref_name = ("dense model on the validation set (the run file records no dense metric on the "
                            "calibration set, which the cells are measured on)")
            run.sens = {"ratios": s["ratios"][()].astype(float), "metric": s["metric"][()].astype(float),
                        "loss": s["loss"][()].astype(float), "status": s["status"][()].astype(int),
                        "seconds": s["seconds"][()].astype(float), "rank": s["rank"][()].astype(int),
                        "reference": ref, "reference_name": ref_name, "attrs": sens}
        if "allocation/ratio" in f and bool(alloc.get("complete")):
            run.alloc = {"ratio": f["allocation/ratio"][()].astype(float), "keep": f["allocation/keep"][()].astype(int),
                         "attrs": alloc}
        if "finetune/history" in f:
            ds = f["finetune/history"]
            run.history = ds[()].astype(float)
            run.history_columns = _strs(ds.attrs.get("columns", ["epoch", "train_loss", "val_metric", "val_loss", "lr", "seconds"]))
        run.wall = _get(root, "wall_s")
        run.worlds = {"sweep": _get(root, "world_size"), "sensitivity": sens.get("world_size"), "finetune": ft.get("world_size")}
        # per-stage seconds: a `seconds` attribute on the stage groups, else the root attribute
        # `stage_seconds` (JSON), else the "stage NAME: X s" lines of sweep.log next to the run file
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
            run.timings = _timings_from_log(os.path.join(os.path.dirname(rf.path), "sweep.log"))
            run.timing_source = "sweep.log" if run.timings else ""
        if "sensitivity" not in run.timings and sens.get("wall_s") is not None:
            run.timings["sensitivity"] = float(sens["wall_s"])
            run.timing_source = run.timing_source or "run file"

        row: dict[str, Any] = {"run": os.path.relpath(os.path.dirname(rf.path)), "path": rf.path}
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
        row["ft_tasks"] = _get(ft, "world_size")
        row["groups"] = len(run.groups) if run.groups else None
        # excluded by verification (a group that feeds the output is kept on purpose, not counted)
        row["excluded"] = sum(1 for e in run.excluded if "feeds the model's output" not in str(e[2])) if run.groups else None
        row["t_sens"] = _get(sens, "wall_s")
        hist = run.history
        sec = run.history_columns.index("seconds") if "seconds" in run.history_columns else None
        row["t_ft"] = float(hist[:, sec].sum()) if hist is not None and len(hist) and sec is not None else None
        run.row = row
    return run


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
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
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


def build_figures(runs: Sequence[Run]) -> list[Any]:
    """Every figure of the report, in page order."""
    from . import plots

    figs: list[Any] = []
    by_metric: dict[str, list[Run]] = {}
    for r in runs:
        by_metric.setdefault(r.metric_name, []).append(r)
    for i, (name, rs) in enumerate(by_metric.items()):
        f = plots.pareto(rs, "pareto" if i == 0 else f"pareto-{name}")
        if f:
            figs.append(f)
    for i, fam in enumerate(method_families(runs)):
        methods = {r.row.get("method") for r in fam}
        if len(fam) > 1 and len(methods) == len(fam):
            title = f"Allocation: methods compared ({', '.join(sorted(str(m) for m in methods))})"
        elif len(fam) > 1:
            title = f"Allocation: {len(fam)} runs with the same config"
        else:
            title = f"Allocation: {fam[0].label} ({fam[0].row.get('method')})"
        f = plots.allocation_chart(fam, f"alloc-{i}", title)
        if f:
            figs.append(f)
    for i, r in enumerate(runs):
        for fn in (plots.sensitivity_heatmap, plots.sensitivity_curves):
            f = fn(r, i)
            if f:
                figs.append(f)
    for fn in (plots.finetune_curves, plots.timings_chart):
        f = fn(runs)
        if f:
            figs.append(f)
    return figs


def figure_png(f: Any) -> bytes:
    """The figure as PNG bytes (rendered once for both --png and --html)."""
    if f.png is None:
        buf = io.BytesIO()
        f.fig.savefig(buf, format="png", dpi=f.fig.dpi)
        f.png = buf.getvalue()
    return f.png


def write_pngs(out_dir: str, figs: Sequence[Any]) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for f in figs:
        p = os.path.join(out_dir, f"{f.id}.png")
        with open(p, "wb") as fh:
            fh.write(figure_png(f))
        paths.append(p)
    return paths


# ---- HTML -------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1360px;margin:0 auto;padding:12px 20px 40px}
h1{font-size:22px;margin:8px 0 4px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
p.note,figcaption{color:#555;font-size:12.5px;margin:4px 0}
table{border-collapse:collapse;font-size:12.5px;background:#fff;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;white-space:nowrap}
th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{color:#b00} tr.running td{color:#a60}
figure{margin:8px 0;background:#fff;border:1px solid #e4e4e4;padding:6px;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;display:block}
.pair{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.pair figure{flex:1 1 600px}
nav a{margin-right:12px;font-size:13px}
code{background:#eee;padding:0 3px;border-radius:3px}
"""


def _cell(v: Any, num: bool | None = None, key: str = "", fmt: str = "") -> str:
    num = isinstance(v, (int, float)) and not isinstance(v, bool) if num is None else num
    text = format(v, fmt) if fmt and isinstance(v, float) else _fmt(v, key)
    return f'<td class="num">{html.escape(text)}</td>' if num else f"<td>{html.escape(text)}</td>"


def _img(f: Any) -> str:
    b64 = base64.b64encode(figure_png(f)).decode()
    cap = f"<figcaption>{html.escape(f.caption)}</figcaption>" if f.caption else ""
    return (f'<figure id="{f.id}"><img id="img-{f.id}" title="{html.escape(f.title, quote=True)}" '
            f'alt="{html.escape(f.alt, quote=True)}" '
            f'src="data:image/png;base64,{b64}">{cap}</figure>')


def render_html(runs: Sequence[Run], figs: Sequence[Any], title: str = "hpcprune report") -> str:
    by_id = {f.id: f for f in figs}
    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
           f"<style>{_CSS}</style></head><body><main>",
           f"<h1>{html.escape(title)}</h1>",
           f'<p class="note">{len(runs)} run(s). Metric: '
           + ", ".join(sorted({f"{r.metric_name} ({'higher' if r.higher_is_better else 'lower'} is better)" for r in runs}))
           + ". Kept fractions and speed-ups are of the fine-tuned model (of the pruned one when fine-tuning has not run).</p>",
           '<nav><a href="#runs">runs</a><a href="#diff">config diff</a><a href="#pareto-sec">Pareto</a>'
           '<a href="#alloc-sec">allocation</a><a href="#sens-sec">sensitivity</a><a href="#ft-sec">fine-tuning</a>'
           '<a href="#time-sec">timings</a></nav>']
    # runs table
    out.append('<h2 id="runs">Runs</h2><table id="runs-table"><thead><tr><th>label</th>'
               + "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS) + "</tr></thead><tbody>")
    for r in runs:
        st = html.escape(str(r.row.get("status")))
        out.append(f'<tr class="{st}" data-path="{html.escape(r.path, quote=True)}"><td>{html.escape(r.label)}</td>'
                   + "".join(_cell(r.row.get(k), None if k not in ("run", "status", "method", "target") else False, k)
                             for k, _ in COLUMNS) + "</tr>")
    out.append("</tbody></table>")
    # config diff
    diff = config_diff(runs)
    out.append('<h2 id="diff">Config diff</h2>')
    if len(runs) < 2:
        out.append('<p class="note" id="config-diff">One run: nothing to compare.</p>')
    elif not diff:
        out.append('<p class="note" id="config-diff">The runs have identical configs.</p>')
    else:
        out.append('<table id="config-diff"><thead><tr><th>key</th>'
                   + "".join(f"<th>{html.escape(r.label)}</th>" for r in runs) + "</tr></thead><tbody>")
        for k, vals in diff:
            out.append(f"<tr><td><code>{html.escape(k)}</code></td>"
                       + "".join(f"<td>{html.escape('(absent)' if v is None else json.dumps(v) if not isinstance(v, str) else v)}</td>"
                                 for v in vals) + "</tr>")
        out.append("</tbody></table>")
    # figures
    excl = [(r, e) for r in runs for e in r.excluded]
    if excl:  # groups the groups stage did not prune, and why (verification, output layers)
        out.append('<h2 id="excluded">Groups not pruned</h2><table><thead><tr><th>run</th><th>group</th>'
                   '<th>layer types</th><th>why</th></tr></thead><tbody>')
        for r, e in excl:
            out.append(f"<tr><td>{html.escape(r.label)}</td><td>{html.escape(str(e[0]))}</td>"
                       f"<td>{html.escape(', '.join(e[1]))}</td><td>{html.escape(str(e[2]))}</td></tr>")
        out.append("</tbody></table>")
    out.append('<h2 id="pareto-sec">Pareto front</h2>')
    out += [_img(f) for f in figs if f.id.startswith("pareto")] or ['<p class="note">No run has a pruned metric yet.</p>']
    out.append('<h2 id="alloc-sec">Allocation</h2><p class="note">Channels kept per group (bars) against the dense '
               "width (dashed outline). Runs that differ only in <code>prune.method</code> share one chart.</p>")
    allocs = [_img(f) for f in figs if f.id.startswith("alloc-")]
    out.append('<div class="pair">' + "".join(allocs) + "</div>" if allocs else '<p class="note">No allocation yet.</p>')
    out.append('<h2 id="sens-sec">Sensitivity</h2><p class="note">One group pruned at a time; colour: metric change '
               "against the dense model (red: worse). Groups in model order.</p>")
    any_sens = False
    for i, r in enumerate(runs):
        pair = [by_id[k] for k in (f"sens-heatmap-{i}", f"sens-curves-{i}") if k in by_id]
        if pair:
            any_sens = True
            same = next((o.label for o in runs[:i] if _same_grid(o, r)), None)
            note = f' <small class="note">(the same grid as {html.escape(same)})</small>' if same else ""
            out.append(f"<h3>{html.escape(r.label)}{note}</h3><div class=\"pair\">" + "".join(_img(f) for f in pair) + "</div>")
    if not any_sens:
        out.append('<p class="note">No sensitivity results yet.</p>')
    out.append('<h2 id="ft-sec">Fine-tuning</h2>')
    out.append(_img(by_id["finetune"]) if "finetune" in by_id else '<p class="note">No fine-tuning history.</p>')
    out.append('<h2 id="time-sec">Timings</h2>')
    if "timings" in by_id:
        out.append(_img(by_id["timings"]))
    out.append(_timings_table(runs))
    out.append("</main></body></html>")
    return "\n".join(out)


def _same_grid(a: Run, b: Run) -> bool:
    if a.sens is None or b.sens is None or a.groups != b.groups:
        return False
    return all(np.array_equal(a.sens[k], b.sens[k], equal_nan=True) for k in ("ratios", "metric", "status"))


def _timings_table(runs: Sequence[Run]) -> str:
    head = ["run", *STAGES, "wall s", "ranks", "sens ranks", "DDP tasks", "sens cell-s", "cell-s / sens s", "source"]
    rows = []
    for r in runs:
        cells = None
        if r.sens is not None:
            sec = r.sens["seconds"][r.sens["status"] != 0]
            cells = float(np.nansum(sec)) if sec.size else None
        eff = cells / r.timings["sensitivity"] if cells is not None and r.timings.get("sensitivity") else None
        vals = [r.label, *[r.timings.get(s) for s in STAGES], r.wall, r.worlds.get("sweep"), r.worlds.get("sensitivity"),
                r.worlds.get("finetune"), cells, eff, r.timing_source or "-"]
        fmts = ["", *[".1f"] * len(STAGES), ".1f", "", "", "", ".1f", ".2f", ""]
        rows.append("<tr>" + "".join(_cell(v, fmt=f) for v, f in zip(vals, fmts)) + "</tr>")
    stage_heads = [{"pruned": "prune", "final": "fine-tune"}.get(h, h) for h in head]
    return ('<table id="timings-table"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in stage_heads)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
            '<p class="note">Seconds of wall clock on rank 0 per stage (fine-tune: the whole job, start-up included). '
            "sens cell-s: the cells' seconds added up over all ranks; divided by the stage's wall clock it gives the "
            "effective parallelism. source: where the per-stage seconds come from.</p>")


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcprune.report", description="Compare hpcprune run files.")
    ap.add_argument("runs", nargs="+", help="run.h5 files, or directories searched recursively for run.h5")
    ap.add_argument("--sort", default=None, metavar="COLUMN", help=f"sort by a column ({', '.join(k for k, _ in COLUMNS)})")
    ap.add_argument("--desc", action="store_true", help="sort in descending order (missing values stay last)")
    ap.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                    help="keep runs whose config KEY (dotted, e.g. prune.method) or column equals VALUE; repeatable")
    ap.add_argument("--csv", default=None, metavar="OUT.csv", help="write the table as CSV")
    ap.add_argument("--html", default=None, metavar="OUT.html", help="write one self-contained HTML page with the figures")
    ap.add_argument("--png", default=None, metavar="DIR", help="write the figures as PNG files into DIR")
    args = ap.parse_args(argv)

    def error(msg: str) -> None:
        print(f"hpcprune.report: error: {msg}", file=sys.stderr)

    paths = find_runs(args.runs)
    if not paths:
        error(f"no run files found in {' '.join(args.runs)}")
        return 2
    runs, refused = [], 0
    for p in paths:
        try:
            runs.append(load_run(p))
        except (RunFileError, OSError, KeyError) as e:
            error(str(e) if not isinstance(e, KeyError) else f"{os.path.abspath(p)}: incomplete run file (missing {e})")
            refused += 1
    if not runs:
        return 2
    label_runs(runs)
    try:
        if args.filter:
            runs = filter_runs(runs, args.filter)
        if args.sort:
            runs = sort_runs(runs, args.sort, args.desc)
    except ReportError as e:
        error(str(e))
        return 2
    if not runs:
        error(f"no run matches {' '.join('--filter ' + f for f in args.filter)}")
        return 1
    print(format_table([r.row for r in runs]))
    try:
        if args.csv:
            _parent(args.csv)
            write_csv(args.csv, runs)
        if args.html or args.png:
            from . import plots

            figs = build_figures(runs)
            try:
                if args.png:
                    for p in write_pngs(args.png, figs):
                        print(f"wrote {p}", file=sys.stderr)
                if args.html:
                    _parent(args.html)
                    with open(args.html, "w") as fh:
                        fh.write(render_html(runs, figs))
                    print(f"wrote {args.html}", file=sys.stderr)
            finally:
                plots.close(figs)
    except OSError as e:
        error(f"cannot write {e.filename}: {e.strerror}")
        return 2
    return 2 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
