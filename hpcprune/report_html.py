"""The report's figures, as PNG files and as one self-contained HTML page (``report --png/--html``).

:func:`build_figures` draws every figure of the report (:mod:`hpcprune.plots`), :func:`write_pngs`
writes them as PNG files, :func:`render_html` puts the runs table, the config diff, the groups not
pruned, the figures (inline PNG) and the timings into one HTML page. The run files are read by
:mod:`hpcprune.report` (``Run``); its public names for these functions are re-exported there.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Any, Sequence

import numpy as np

from .report import COLUMNS, STAGES, Run, _fmt, config_diff, method_families


# ---- figures and PNG files --------------------------------------------------------------------------
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
    out = _head(runs, title) + _runs_table(runs) + _config_diff_html(runs) + _excluded_html(runs)
    out.append('<h2 id="pareto-sec">Pareto front</h2>')
    out += [_img(f) for f in figs if f.id.startswith("pareto")] or ['<p class="note">No run has a pruned metric yet.</p>']
    out.append('<h2 id="alloc-sec">Allocation</h2><p class="note">Channels kept per group (bars) against the dense '
               "width (dashed outline). Runs that differ only in <code>prune.method</code> share one chart.</p>")
    allocs = [_img(f) for f in figs if f.id.startswith("alloc-")]
    out.append('<div class="pair">' + "".join(allocs) + "</div>" if allocs else '<p class="note">No allocation yet.</p>')
    out += _sensitivity_html(runs, by_id)
    out.append('<h2 id="ft-sec">Fine-tuning</h2>')
    out.append(_img(by_id["finetune"]) if "finetune" in by_id else '<p class="note">No fine-tuning history.</p>')
    out.append('<h2 id="time-sec">Timings</h2>')
    if "timings" in by_id:
        out.append(_img(by_id["timings"]))
    out.append(_timings_table(runs))
    out.append("</main></body></html>")
    return "\n".join(out)


def _head(runs: Sequence[Run], title: str) -> list[str]:
    """The page up to its first section: title, metric note, navigation."""
    return [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
            f"<style>{_CSS}</style></head><body><main>",
            f"<h1>{html.escape(title)}</h1>",
            f'<p class="note">{len(runs)} run(s). Metric: '
            + ", ".join(sorted({f"{r.metric_name} ({'higher' if r.higher_is_better else 'lower'} is better)" for r in runs}))
            + ". Kept fractions and speed-ups are of the fine-tuned model (of the pruned one when fine-tuning has not run).</p>",
            '<nav><a href="#runs">runs</a><a href="#diff">config diff</a><a href="#pareto-sec">Pareto</a>'
            '<a href="#alloc-sec">allocation</a><a href="#sens-sec">sensitivity</a><a href="#ft-sec">fine-tuning</a>'
            '<a href="#time-sec">timings</a></nav>']


def _runs_table(runs: Sequence[Run]) -> list[str]:
    out = ['<h2 id="runs">Runs</h2><table id="runs-table"><thead><tr><th>label</th>'
           + "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS) + "</tr></thead><tbody>"]
    for r in runs:
        st = html.escape(str(r.row.get("status")))
        out.append(f'<tr class="{st}" data-path="{html.escape(r.path, quote=True)}"><td>{html.escape(r.label)}</td>'
                   + "".join(_cell(r.row.get(k), None if k not in ("run", "status", "method", "target") else False, k)
                             for k, _ in COLUMNS) + "</tr>")
    out.append("</tbody></table>")
    return out


def _config_diff_html(runs: Sequence[Run]) -> list[str]:
    diff = config_diff(runs)
    out = ['<h2 id="diff">Config diff</h2>']
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
    return out


def _excluded_html(runs: Sequence[Run]) -> list[str]:
    """Groups the groups stage did not prune, and why (verification, output layers); nothing if none."""
    excl = [(r, e) for r in runs for e in r.excluded]
    if not excl:
        return []
    out = ['<h2 id="excluded">Groups not pruned</h2><table><thead><tr><th>run</th><th>group</th>'
           '<th>layer types</th><th>why</th></tr></thead><tbody>']
    for r, e in excl:
        out.append(f"<tr><td>{html.escape(r.label)}</td><td>{html.escape(str(e[0]))}</td>"
                   f"<td>{html.escape(', '.join(e[1]))}</td><td>{html.escape(str(e[2]))}</td></tr>")
    out.append("</tbody></table>")
    return out


def _sensitivity_html(runs: Sequence[Run], by_id: dict[str, Any]) -> list[str]:
    out = ['<h2 id="sens-sec">Sensitivity</h2><p class="note">One group pruned at a time; colour: metric change '
           "against the dense model (red: worse). Groups in model order.</p>"]
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
    return out


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


