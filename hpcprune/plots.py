"""The report's figures (matplotlib, Agg backend, no display needed).

Every function takes ``report.Run`` objects and returns ``Figure`` objects: the matplotlib figure
plus ``data``, the numbers that were actually drawn, so that tests compare them with the run files
instead of comparing pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import CenteredNorm  # noqa: E402
from matplotlib.figure import Figure as MplFigure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .store import TIMED_STAGES  # noqa: E402

if TYPE_CHECKING:
    from .report import Run

PENDING, DONE, SKIPPED = 0, 1, 2  # /sensitivity/status codes (hpcprune.sensitivity)
STAGE_ORDER = TIMED_STAGES
STAGE_LABEL = {"baseline": "baseline", "groups": "groups", "sensitivity": "sensitivity", "allocation": "allocation",
               "pruned": "prune", "final": "fine-tune", "other": "other"}
STAGE_COLOUR = {"baseline": "#4c72b0", "groups": "#8c8c8c", "sensitivity": "#dd8452", "allocation": "#937860",
                "pruned": "#55a868", "final": "#c44e52", "other": "#dddddd"}
DPI = 90


@dataclass
class Figure:
    id: str                    # HTML element id and PNG file stem
    title: str
    alt: str                   # the image's alt text
    fig: Any                   # matplotlib.figure.Figure
    data: dict[str, Any] = field(default_factory=dict)
    caption: str = ""
    png: bytes | None = None   # rendered once, by report_html.figure_png


def _worse_is_red(higher_is_better: bool) -> Any:
    # the signed change (metric - reference) is coloured so that worse is always red
    return plt.get_cmap("RdBu" if higher_is_better else "RdBu_r")


# ---- sensitivity ------------------------------------------------------------------------------------
def sensitivity_heatmap(run: "Run", index: int) -> Figure | None:
    s = run.sens
    if s is None:
        return None
    change = s["metric"] - s["reference"]
    status = s["status"]
    shown = np.ma.masked_where(status != DONE, change)
    G, R = change.shape
    fig, ax = _subplots(figsize=(1.6 + 0.62 * R, 1.3 + 0.36 * G), dpi=DPI, layout="constrained")
    finite = np.abs(change[status == DONE])
    finite = finite[np.isfinite(finite)]
    half = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    cmap = _worse_is_red(run.higher_is_better).with_extremes(bad="#f2f2f2")
    im = ax.imshow(shown, cmap=cmap, norm=CenteredNorm(0.0, half), aspect="auto")
    annotate = G * R <= 400
    for g in range(G):
        for r in range(R):
            if status[g, r] == DONE:
                if annotate and np.isfinite(change[g, r]):
                    v = change[g, r]
                    dark = abs(v) > 0.6 * half
                    ax.text(r, g, f"{v:+.3f}".replace("+0.000", "0").replace("-0.000", "0"), ha="center", va="center",
                            fontsize=7, color="white" if dark else "black")
            else:
                skipped = status[g, r] == SKIPPED
                ax.add_patch(Rectangle((r - 0.5, g - 0.5), 1, 1, facecolor="#d9d9d9" if skipped else "white",
                                       hatch="///" if skipped else None, edgecolor="#999999", linewidth=0.3))
                if annotate:
                    ax.text(r, g, "skip" if skipped else "pend", ha="center", va="center", fontsize=6.5, color="#555555")
    ax.set_xticks(range(R), [f"{x:g}" for x in s["ratios"]])
    ax.set_yticks(range(G), [f"{n} ({w})" for n, w in zip(run.groups, run.sizes)], fontsize=8)
    ax.set_xlabel("fraction of the group's channels removed")
    ax.set_ylabel("group (width), model order")
    ax.set_title(f"{run.label}: {run.metric_name} change vs dense", fontsize=10)
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label(f"{run.metric_name} − dense (red: worse)", fontsize=8)
    counts = {k: int((status == code).sum()) for k, code in (("done", DONE), ("skipped", SKIPPED), ("pending", PENDING))}
    alt = (f"Sensitivity heatmap of run {run.label}: {G} groups by {R} ratios, {run.metric_name} change vs dense; "
           f"{counts['done']} done, {counts['skipped']} skipped, {counts['pending']} pending cells")
    caption = (f"Reference: {s['reference_name']}. Hatched grey: skipped (early stop); white 'pend': not computed yet. "
               f"{counts['done']} done, {counts['skipped']} skipped, {counts['pending']} pending.")
    return Figure(f"sens-heatmap-{index}", f"Sensitivity: {run.label}", alt, fig,
                  {"run": run.path, "groups": list(run.groups), "ratios": s["ratios"].tolist(), "change": change,
                   "status": status.copy(), "reference": s["reference"], "counts": counts}, caption)


def sensitivity_curves(run: "Run", index: int) -> Figure | None:
    s = run.sens
    if s is None:
        return None
    fig, ax = _subplots(figsize=(6.4, 1.3 + 0.36 * max(len(run.groups), 8)), dpi=DPI, layout="constrained")
    x = np.concatenate([[0.0], s["ratios"]])
    curves = {}
    many = len(run.groups) > 10
    cmap = plt.get_cmap("viridis" if many else "tab10")
    for g, name in enumerate(run.groups):
        y = np.where(s["status"][g] == DONE, s["metric"][g], np.nan)
        y = np.concatenate([[s["reference"]], y])
        curves[name] = y
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.3, color=cmap(g / max(1, len(run.groups) - 1) if many else g), label=name)
    ax.axhline(s["reference"], color="black", linestyle="--", linewidth=0.8, label="dense")
    ax.set_xlabel("fraction of the group's channels removed (one group at a time)")
    ax.set_ylabel(f"{run.metric_name} on the calibration set")
    ax.set_title(f"{run.label}: per-group sensitivity curves", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(run.groups) > 8 else 1, loc="best")
    return Figure(f"sens-curves-{index}", f"Sensitivity curves: {run.label}",
                  f"Per-group sensitivity curves of run {run.label}: {run.metric_name} against pruning ratio for {len(run.groups)} groups",
                  fig, {"run": run.path, "x": x, "curves": curves},
                  f"Ratio 0 and the dashed line: the reference, {s['reference_name']}. Skipped and pending cells are left out.")


# ---- allocation -------------------------------------------------------------------------------------
def allocation_chart(runs: Sequence["Run"], fig_id: str, title: str) -> Figure | None:
    runs = [r for r in runs if r.alloc is not None]
    if not runs:
        return None
    groups, sizes = list(runs[0].groups), np.asarray(runs[0].sizes)
    G, n = len(groups), len(runs)
    fig, ax = _subplots(figsize=(max(6.0, 1.2 + G * (0.35 + 0.25 * n)), 3.8), dpi=DPI, layout="constrained")
    x = np.arange(G)
    ax.bar(x, sizes, width=0.86, color="none", edgecolor="#444444", linestyle="--", linewidth=1.0, label="dense width")
    width = 0.8 / n
    colours = plt.get_cmap("tab10")
    kept: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        keep = np.asarray(r.alloc["keep"], dtype=float)
        name = r.alloc_label
        kept[name] = keep.astype(int).tolist()
        bars = ax.bar(x - 0.4 + width * (i + 0.5), keep, width=width * 0.95, color=colours(i % 10), label=name)
        if G * n <= 40:
            ax.bar_label(bars, labels=[f"{int(k)}" for k in keep], fontsize=6.5, padding=1)
    ax.set_xticks(x, groups, rotation=30 if G > 6 else 0, ha="right" if G > 6 else "center", fontsize=8)
    ax.set_ylabel("channels kept")
    ax.set_xlabel("group, model order")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, float(sizes.max()) * 1.15)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return Figure(fig_id, title,
                  f"Allocation bar chart: channels kept per group against the dense width for {', '.join(kept)}",
                  fig, {"groups": groups, "dense": sizes.astype(int).tolist(), "kept": kept,
                        "runs": [r.path for r in runs]})


# ---- Pareto front -----------------------------------------------------------------------------------
PARETO_AXES = (("macs_kept", "MACs kept (fraction of dense)", False), ("params_kept", "params kept (fraction of dense)", False),
               ("latency_speedup", "latency speed-up vs dense (×)", True))
# a fourth panel where some run measured its energy (hpcprune.energy; NaN otherwise)
ENERGY_AXIS = ("energy_kept", "energy per sample kept (fraction of dense)", False)


def task_key(run: "Run") -> str:
    from .report import task_key as key

    return key(run)


def _front(points: list[tuple[float, float, str]], higher_x: bool, higher_y: bool) -> list[str]:
    """Labels of the non-dominated points (``hpcprune.report.pareto_front``)."""
    from .report import pareto_front

    return pareto_front(points, higher_x, higher_y)


def pareto(runs: Sequence["Run"], fig_id: str = "pareto") -> Figure | None:
    runs = [r for r in runs if r.final.get("metric") is not None or r.pruned.get("metric") is not None]
    if not runs:
        return None
    metric_name = runs[0].metric_name
    higher = runs[0].higher_is_better
    panels = PARETO_AXES + ((ENERGY_AXIS,) if any((r.final or r.pruned).get("energy_kept") is not None for r in runs) else ())
    fig, axes = _subplots(1, len(panels), figsize=(14 * len(panels) / 3, 4.4), dpi=DPI, layout="constrained")
    data: dict[str, Any] = {"metric": metric_name, "axes": {}}
    colours = plt.get_cmap("tab10")
    for ax, (key, xlabel, higher_x) in zip(axes, panels):
        # this panel's own front: a run dominated on MACs may be on the front of params or latency
        items = []
        for i, r in enumerate(runs):
            src = r.final if r.final.get("metric") is not None else r.pruned
            x, y = src.get(key), src.get("metric")
            if x is not None and y is not None:
                items.append((i, r, src, float(x), float(y)))
        dense = sorted({(1.0, float(r.dense["metric"])) for r in runs if r.dense.get("metric") is not None})
        # one front per task (report.task_key): a run on another model or data set dominates nothing
        tasks: dict[str, list[tuple[float, float, str]]] = {}
        for _, r, _, x, y in items:
            tasks.setdefault(task_key(r), []).append((x, y, r.label))
        for j, r in enumerate(runs):
            if r.dense.get("metric") is not None:
                tasks.setdefault(task_key(r), []).append((1.0, float(r.dense["metric"]), f"dense#{j}"))
        up = {task_key(r): r.higher_is_better for r in runs}  # each task's own metric direction
        fronts = [[p for p in pts if p[2] in set(_front(pts, higher_x, up[t]))] for t, pts in tasks.items()]
        front = [p[2] for f in fronts for p in f]
        drawn = []
        for i, r, src, x, y in items:
            c = colours(i % 10)
            dominated = r.label not in front
            what = ", ".join(str(v) for v in (r.row.get("method"), r.row.get("target")) if v)
            ax.scatter([x], [y], s=46, color=c, zorder=3, label=f"{r.label} ({what})" if what else r.label,
                       alpha=0.35 if dominated else 1.0, marker="X" if dominated else "o")
            ax.annotate(r.label + (" (dominated)" if dominated else ""), (x, y), textcoords="offset points",
                        xytext=(5, 4), fontsize=7.5, alpha=0.6 if dominated else 1.0)
            px, py = r.pruned.get(key), r.pruned.get("metric")
            if src is r.final and px is not None and py is not None:
                ax.scatter([px], [py], s=30, facecolors="none", edgecolors=[c], zorder=3)
                ax.annotate("", (x, y), (px, py), arrowprops=dict(arrowstyle="->", color=c, alpha=0.5, linewidth=0.8))
            drawn.append({"run": r.path, "label": r.label, "x": x, "y": y,
                          "pruned_x": px, "pruned_y": py, "fine_tuned": src is r.final})
        for j, (dx, dy) in enumerate(dense):
            ax.scatter([dx], [dy], marker="*", s=160, color="black", zorder=4, label="dense" if j == 0 else None)
        labelled = False
        for f in fronts:
            fpts = sorted(f, key=lambda p: p[0])
            if len(fpts) > 1:
                ax.plot([p[0] for p in fpts], [p[1] for p in fpts], color="#999999", linewidth=1, linestyle="-", zorder=1,
                        label=None if labelled else "Pareto front")
                labelled = True
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"final {metric_name}")
        ax.grid(alpha=0.3)
        data["axes"][key] = {"points": drawn, "dense": [list(d) for d in dense], "front": front}
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Pareto front: final {metric_name} ({'higher' if higher else 'lower'} is better) vs cost; "
                 "hollow = before fine-tuning, ★ = dense", fontsize=10)
    return Figure(fig_id, f"Pareto front ({metric_name})",
                  f"Pareto front of {len(runs)} runs: final {metric_name} against MACs kept, params kept, latency speed-up"
                  f"{' and energy kept' if len(panels) > 3 else ''}, dense model marked",
                  fig, data)


# ---- fine-tuning ------------------------------------------------------------------------------------
def finetune_curves(runs: Sequence["Run"], fig_id: str = "finetune") -> Figure | None:
    runs = [r for r in runs if r.history is not None and len(r.history)]
    if not runs:
        return None
    fig, (a1, a2) = _subplots(1, 2, figsize=(12, 3.8), dpi=DPI, layout="constrained")
    colours = plt.get_cmap("tab10")
    data: dict[str, Any] = {}
    for i, r in enumerate(runs):
        h, cols = r.history, r.history_columns
        ep = h[:, cols.index("epoch")] + 1
        loss = h[:, cols.index("train_loss")]
        val = h[:, cols.index("val_metric")]
        c = colours(i % 10)
        a1.plot(ep, loss, marker="o", markersize=3, color=c, label=r.label)
        xs, ys = ep, val
        if r.pruned.get("metric") is not None:  # epoch 0: the pruned model before fine-tuning
            xs, ys = np.concatenate([[0.0], ep]), np.concatenate([[r.pruned["metric"]], val])
        a2.plot(xs, ys, marker="o", markersize=3, color=c, label=r.label)
        data[r.path] = {"label": r.label, "epoch": ep, "train_loss": loss, "val_metric": val}
    for dm in sorted({float(r.dense["metric"]) for r in runs if r.dense.get("metric") is not None}):
        a2.axhline(dm, color="black", linestyle="--", linewidth=0.8)
    a1.set_xlabel("epoch")
    a1.set_ylabel("train loss (mean over the epoch)")
    a1.set_title("fine-tuning: train loss", fontsize=10)
    a2.set_xlabel("epoch (0 = pruned, before fine-tuning)")
    a2.set_ylabel(f"val {runs[0].metric_name}")
    a2.set_title(f"fine-tuning: val {runs[0].metric_name} (dashed: dense)", fontsize=10)
    for a in (a1, a2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    return Figure(fig_id, "Fine-tuning", f"Fine-tuning curves of {len(runs)} runs: train loss and val {runs[0].metric_name} per epoch",
                  fig, data)


# ---- timings ----------------------------------------------------------------------------------------
def timings_chart(runs: Sequence["Run"], fig_id: str = "timings") -> Figure | None:
    runs = [r for r in runs if r.timings or r.wall is not None]
    if not runs:
        return None
    fig, ax = _subplots(figsize=(12, 1.4 + 0.42 * len(runs)), dpi=DPI, layout="constrained")
    data: dict[str, Any] = {}
    y = np.arange(len(runs))
    for i, r in enumerate(runs):
        left = 0.0
        segs = {s: r.timings[s] for s in STAGE_ORDER if r.timings.get(s) is not None}
        if r.wall is not None and r.wall - sum(segs.values()) > 0.05 * r.wall:
            segs["other"] = r.wall - sum(segs.values())
        for s, v in segs.items():
            ax.barh(i, v, left=left, color=STAGE_COLOUR[s], edgecolor="white", linewidth=0.5,
                    label=STAGE_LABEL[s] if s not in data.get("_labels", set()) else None)
            data.setdefault("_labels", set()).add(s)
            left += v
        ax.text(left, i, f"  {left:.0f} s  (ranks {r.row.get('world') or '-'}, DDP {r.row.get('ft_tasks') or '-'})",
                va="center", fontsize=7.5)
        data[r.path] = {"label": r.label, "segments": segs, "source": r.timing_source}
    data.pop("_labels", None)
    ax.set_yticks(y, [r.label for r in runs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (wall clock, rank 0)")
    ax.set_title("time per stage", fontsize=10)
    ax.set_xlim(0, max((sum(d["segments"].values()) for d in data.values()), default=1) * 1.3)
    fig.legend(fontsize=7.5, ncol=7, loc="outside lower center", frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return Figure(fig_id, "Time per stage", f"Stacked bars of seconds per stage for {len(runs)} runs", fig, data)


def _subplots(*grid: int, figsize: tuple[float, float], dpi: float, layout: str) -> tuple[Any, Any]:
    """``plt.subplots`` on a figure pyplot does not keep: a report of many runs draws more than
    pyplot's 20 open figures (its "More than 20 figures" warning), and nothing holds them after
    they are rendered."""
    fig = MplFigure(figsize=figsize, dpi=dpi, layout=layout)
    return fig, fig.subplots(*grid)


def close(figs: Sequence[Figure]) -> None:
    """Free the figures' drawings (they are not pyplot's: nothing else holds them)."""
    for f in figs:
        f.fig.clear()


def nan_to_none(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v
