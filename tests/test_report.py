"""python -m hpcprune.report on real run files made by the sweep: table, --sort, --filter, --csv,
the HTML page and its figures (numbers drawn == numbers in the files), refused files."""
import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import h5py
import numpy as np
import pytest
import torch

from hpcprune import plots, report
from hpcprune.store import SCHEMA_VERSION

from conftest import FAST, ROOT, run_sweep

pytestmark = pytest.mark.slow  # runs: fast_run and two more sweeps

# one dense model (the shared fast_run), then runs that reuse its weights as checkpoint=...; the
# uniform and global runs differ from each other only in prune.method
REUSE = [*FAST, "launcher=debug", "sensitivity.early_stop_floor=0.9",
         "sensitivity.bn_recalib_batches=0"]  # stale BN statistics: curves that do cross the floor


@pytest.fixture(scope="session")
def runs(fast_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    from hpcprune.store import RunFile, read_weights

    state = dict(read_weights(RunFile(str(fast_run / "run.h5")), "baseline"))
    ckpt = root / "dense.pt"
    torch.save(state, ckpt)
    made = {"dense": fast_run / "run.h5"}
    for name, extra in (("uniform", ["prune.method=uniform"]), ("global", ["prune.method=global"])):
        d = root / "sweeps" / name
        run_sweep(d, *REUSE, f"checkpoint={ckpt}", *extra)
        made[name] = d / "run.h5"
    return {k: str(v) for k, v in made.items()}


def cli(*args, cwd=None):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "hpcprune.report", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def table_rows(stdout):
    """Data rows of the terminal table: the run column (first) of each."""
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["run", "status"] and set(lines[1].replace(" ", "")) == {"-"}
    return [l.split()[0] for l in lines[2:]]


def attr(path, stage, key):
    with h5py.File(path, "r") as f:
        return f[stage].attrs[key]


def all_paths(runs):
    return [runs[k] for k in ("dense", "uniform", "global")]


# ---- table, --sort, --filter, --csv ---------------------------------------------------------------
def test_table_has_one_row_per_run(runs, tmp_path):
    p = cli(*all_paths(runs))
    assert p.returncode == 0, p.stderr
    rows = table_rows(p.stdout)
    assert rows == [os.path.relpath(os.path.dirname(x), ROOT) for x in all_paths(runs)]
    header = p.stdout.splitlines()[0]
    for _, h in report.COLUMNS:  # the columns stay
        assert h in header
    line = p.stdout.strip().splitlines()[2 + 1]  # the uniform run
    assert "uniform" in line and f"{attr(runs['uniform'], 'final', 'metric'):.4f}" in line


def test_directory_is_searched_recursively(runs):
    p = cli(os.path.dirname(os.path.dirname(runs["uniform"])))
    assert p.returncode == 0, p.stderr
    assert len(table_rows(p.stdout)) == 2


def test_sort_any_column_and_desc(runs):
    finals = {os.path.relpath(os.path.dirname(v), ROOT): float(attr(v, "final", "metric")) for v in all_paths(runs)}
    p = cli(*all_paths(runs), "--sort", "final", "--desc")
    assert p.returncode == 0, p.stderr
    got = [finals[r] for r in table_rows(p.stdout)]
    assert got == sorted(got, reverse=True)
    kept = {os.path.relpath(os.path.dirname(v), ROOT): float(attr(v, "final", "macs_kept")) for v in all_paths(runs)}
    p = cli(*all_paths(runs), "--sort", "MACs kept")  # a header works as well as a key
    got = [kept[r] for r in table_rows(p.stdout)]
    assert got == sorted(got)
    p = cli(*all_paths(runs), "--sort", "method")
    assert [l.split()[2] for l in p.stdout.strip().splitlines()[2:]] == ["global", "sensitivity", "uniform"]
    p = cli(*all_paths(runs), "--sort", "nonsense")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "'nonsense' is not a column" in p.stderr


def test_filter_by_config_values(runs):
    p = cli(*all_paths(runs), "--filter", "prune.method=uniform")
    assert p.returncode == 0, p.stderr
    assert table_rows(p.stdout) == [os.path.relpath(os.path.dirname(runs["uniform"]), ROOT)]
    p = cli(*all_paths(runs), "--filter", "sensitivity.early_stop_floor=0.9", "--filter", "prune.method=global")
    assert table_rows(p.stdout) == [os.path.relpath(os.path.dirname(runs["global"]), ROOT)]
    p = cli(*all_paths(runs), "--filter", "launcher.name=debug", "--filter", "prune.target.macs=0.5")
    assert len(table_rows(p.stdout)) == 2
    p = cli(*all_paths(runs), "--filter", "status=complete")  # a column also works
    assert len(table_rows(p.stdout)) == 3
    p = cli(*all_paths(runs), "--filter", "prune.method=magic")
    assert p.returncode == 1 and "no run matches" in p.stderr
    p = cli(*all_paths(runs), "--filter", "prune.metod=uniform")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "prune.metod" in p.stderr


def test_csv(runs, tmp_path):
    out = tmp_path / "sub" / "table.csv"
    p = cli(*all_paths(runs), "--filter", "prune.target.macs=0.5", "--sort", "params_kept", "--csv", out)
    assert p.returncode == 0, p.stderr
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == sorted([runs["dense"], runs["uniform"], runs["global"]],
                                               key=lambda x: attr(x, "final", "params_kept"))
    for r in rows:
        assert float(r["final"]) == attr(r["path"], "final", "metric")
        assert float(r["macs_kept"]) == attr(r["path"], "final", "macs_kept")
        assert r["method"] == attr(r["path"], "allocation", "method")


# ---- refused files --------------------------------------------------------------------------------
def test_foreign_and_newer_schema_refused(runs, tmp_path):
    foreign = tmp_path / "foreign" / "run.h5"
    foreign.parent.mkdir()
    with h5py.File(foreign, "w") as f:
        f.attrs["format"] = "someone-else"
    newer = tmp_path / "newer" / "run.h5"
    newer.parent.mkdir()
    shutil.copy(runs["uniform"], newer)
    with h5py.File(newer, "a") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    for bad, needle in ((foreign, "not an hpcprune run file"), (newer, f"schema version {SCHEMA_VERSION + 1} is newer")):
        p = cli(bad, "--html", tmp_path / "x.html")
        assert p.returncode != 0 and p.stdout == ""
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and str(bad) in lines[0], p.stderr
        assert not (tmp_path / "x.html").exists()
    # among readable runs: each refused file gets its line, the rest is still reported, exit != 0
    p = cli(runs["dense"], newer, foreign)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 2
    assert len(table_rows(p.stdout)) == 1


# ---- HTML and figures -----------------------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.links, self.tables, self._table, self._in_body = set(), [], [], {}, None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a)
        for k in ("src", "href"):
            if k in a and tag != "img":
                self.links.append(a[k])
        if tag in ("link", "script"):
            self.links.append(tag)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body and self._table:
            self.tables[self._table].append(a)

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False


def test_html_page_holds_every_figure(runs, tmp_path):
    out, png = tmp_path / "report.html", tmp_path / "png"
    p = cli(*all_paths(runs), "--html", out, "--png", png)
    assert p.returncode == 0, p.stderr
    page = _Page()
    page.feed(out.read_text())
    figure_ids = {"pareto", "alloc-0", "alloc-1", "finetune", "timings",
                  *(f"sens-heatmap-{i}" for i in range(3)), *(f"sens-curves-{i}" for i in range(3))}
    assert figure_ids <= page.ids
    assert {"runs-table", "config-diff", "timings-table"} <= page.ids
    # self-contained: every image embedded as a base64 PNG, nothing fetched from elsewhere
    assert len(page.imgs) == len(figure_ids)
    for img in page.imgs:
        assert img["alt"].strip()
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(l.startswith("#") for l in page.links), page.links
    # the table's rows are the runs, in order
    assert [r["data-path"] for r in page.tables["runs-table"]] == all_paths(runs)
    # the config diff: only keys that differ
    html_text = out.read_text()
    diff_keys = dict(report.config_diff([report.load_run(x) for x in all_paths(runs)]))
    assert {"prune.method", "sensitivity.early_stop_floor", "checkpoint", "launcher.name"} <= set(diff_keys)
    assert "finetune.lr" not in diff_keys and "<code>finetune.lr</code>" not in html_text
    assert len(page.tables["config-diff"]) == len(diff_keys)
    assert "Allocation: methods compared (global, uniform)" in html_text
    # --png writes the same figures
    assert {f[:-4] for f in os.listdir(png)} == figure_ids


def _loaded(runs):
    rs = [report.load_run(x) for x in all_paths(runs)]
    report.label_runs(rs)
    return rs


def test_figures_draw_the_numbers_in_the_files(runs):
    rs = _loaded(runs)
    figs = report.build_figures(rs)
    try:
        by_id = {f.id: f for f in figs}
        for i, path in enumerate(all_paths(runs)):
            with h5py.File(path, "r") as f:
                names = list(f["groups/name"].asstr()[()])
                status = f["sensitivity/status"][()]
                metric = f["sensitivity/metric"][()]
                attrs = f["sensitivity"].attrs
                ref = attrs["dense_calib_metric"] if "dense_calib_metric" in attrs else attrs["dense_metric"]
                hm = by_id[f"sens-heatmap-{i}"].data
                assert hm["groups"] == names  # model order
                np.testing.assert_array_equal(hm["status"], status)
                done = status == plots.DONE
                np.testing.assert_allclose(hm["change"][done], metric[done] - ref)
                assert hm["counts"]["skipped"] == int((status == plots.SKIPPED).sum())
                assert hm["ratios"] == f["sensitivity/ratios"][()].tolist()
                curves = by_id[f"sens-curves-{i}"].data["curves"]
                np.testing.assert_allclose(curves[names[0]][1:], np.where(done[0], metric[0], np.nan))
        # the early-stop floor skipped cells in the reused-checkpoint runs; they are drawn as skipped
        assert by_id["sens-heatmap-1"].data["counts"]["skipped"] > 0
        # allocation: the uniform and global runs differ only in prune.method: one chart with both
        allocs = [f for f in figs if f.id.startswith("alloc-")]
        assert len(allocs) == 2
        both = [f for f in allocs if len(f.data["runs"]) == 2]
        assert len(both) == 1 and set(both[0].data["runs"]) == {runs["uniform"], runs["global"]}
        assert "methods compared" in both[0].title
        for f in allocs:
            for path, (label, kept) in zip(f.data["runs"], f.data["kept"].items()):
                with h5py.File(path, "r") as h:
                    assert kept == h["allocation/keep"][()].tolist()
                    assert f.data["dense"] == h["groups/size"][()].tolist()
        # Pareto: final metric against the kept fractions and speed-up; the dense model marked
        pa = by_id["pareto"].data["axes"]
        for key in ("macs_kept", "params_kept", "latency_speedup"):
            pts = {p["run"]: p for p in pa[key]["points"]}
            assert set(pts) == set(all_paths(runs))
            for path, p in pts.items():
                assert p["x"] == attr(path, "final", key) and p["y"] == attr(path, "final", "metric")
                assert p["pruned_y"] == attr(path, "pruned", "metric")
            assert pa[key]["dense"] == [[1.0, attr(runs["dense"], "baseline", "metric")]]
            assert pa[key]["front"]  # some point is on the front
        # fine-tuning curves: the per-epoch history
        ft = by_id["finetune"].data
        for path in all_paths(runs):
            with h5py.File(path, "r") as h:
                hist = h["finetune/history"][()]
            np.testing.assert_array_equal(ft[path]["train_loss"], hist[:, 1])
            np.testing.assert_array_equal(ft[path]["val_metric"], hist[:, 2])
            np.testing.assert_array_equal(ft[path]["epoch"], hist[:, 0] + 1)
        # timings: the per-stage seconds the run file records (a `seconds` attribute per stage
        # group, else the root attribute stage_seconds), or else the "stage NAME: X s" lines of sweep.log
        tm = by_id["timings"].data
        for path in all_paths(runs):
            with h5py.File(path, "r") as h:
                per_stage = {s: float(h[s].attrs["seconds"]) for s in report.STAGES if s in h and "seconds" in h[s].attrs}
                stored = h.attrs.get("stage_seconds")
            if per_stage:
                expected, source = per_stage, "run file"
            elif stored:
                expected, source = json.loads(stored), "run file"
            else:
                expected, source = {}, "sweep.log"
                for m in re.finditer(r"stage (\w+): ([0-9.]+) s", open(os.path.join(os.path.dirname(path), "sweep.log")).read()):
                    expected[m.group(1)] = expected.get(m.group(1), 0.0) + float(m.group(2))
            segs = {k: v for k, v in tm[path]["segments"].items() if k != "other"}
            assert segs == pytest.approx(expected)
            assert tm[path]["source"] == source
    finally:
        plots.close(figs)


def test_partial_runs_are_reported(runs, tmp_path):
    """A run killed during sensitivity: pending cells are drawn as such, later sections are absent."""
    d = tmp_path / "partial"
    d.mkdir()
    path = d / "run.h5"
    shutil.copy(runs["uniform"], path)
    with h5py.File(path, "a") as f:
        for stage in ("allocation", "pruned", "finetune", "final"):
            del f[stage]
        s = f["sensitivity"]
        del s.attrs["complete"], s.attrs["wall_s"]
        st = s["status"][()]
        st[-2:, :] = 0
        s["status"][...] = st
        s["metric"][-2:, :] = np.nan
        f.attrs["status"] = "running"
        del f.attrs["wall_s"]
    run = report.load_run(str(path))
    report.label_runs([run])
    assert run.row["final"] is None and run.row["status"] == "running" and run.alloc is None
    fig = plots.sensitivity_heatmap(run, 0)
    assert fig.data["counts"]["pending"] == 2 * st.shape[1]
    plots.close([fig])
    out = tmp_path / "p.html"
    p = cli(path, runs["dense"], "--html", out)
    assert p.returncode == 0, p.stderr
    assert len(table_rows(p.stdout)) == 2
    text = out.read_text()
    assert 'id="sens-heatmap-0"' in text and 'id="sens-heatmap-1"' in text and "pending" in text


def test_timings_fall_back_to_sweep_log(runs, tmp_path):
    """Without per-stage seconds in the run file, sweep.log's "stage NAME: X s" lines are read, and a
    resumed run's attempts are added up."""
    d = tmp_path / "old"
    d.mkdir()
    shutil.copy(runs["global"], d / "run.h5")
    with h5py.File(d / "run.h5", "a") as f:
        if "stage_seconds" in f.attrs:
            del f.attrs["stage_seconds"]
        for stage in f:
            if isinstance(f[stage], h5py.Group) and "seconds" in f[stage].attrs:
                del f[stage].attrs["seconds"]
    (d / "sweep.log").write_text(
        "10:00:00 [rank 0] hpcprune.stages: stage baseline: 12.5 s\n"
        "10:00:05 [rank 0] hpcprune.stages: stage sensitivity: 30.0 s\n"
        "10:01:00 [rank 0] hpcprune.stages: resuming ...\n"
        "10:01:02 [rank 0] hpcprune.stages: stage sensitivity: 4.5 s\n"
        "10:01:09 [rank 0] hpcprune.stages: stage final: 20.0 s\n")
    run = report.load_run(str(d / "run.h5"))
    assert run.timing_source == "sweep.log"
    assert run.timings == {"baseline": 12.5, "sensitivity": 34.5, "final": 20.0}


def test_front_is_per_task():
    """A run on another model or data set dominates nothing: fronts are per task (report.task_key)."""
    from hpcprune.report import Run, mark_sweep

    def run(label, model, data, macs, final):
        return Run(path=f"/x/{label}/run.h5", row={"macs_kept": macs, "final": final}, label=label,
                   config={"model._target_": model, "data._target_": data, "data.calib_samples": len(label)})

    runs = [run("a", "resnet", "digits", 0.5, 0.90), run("c", "resnet", "digits", 0.6, 0.85),
            run("cc", "resnet", "digits", 0.45, 0.88), run("b", "mine", "bars", 0.4, 0.95)]
    mark_sweep(runs)
    assert {r.label: r.row["front"] for r in runs} == {"a": "yes", "c": "dominated", "cc": "yes", "b": "yes"}


def test_each_task_is_ranked_by_its_own_metric_and_unfinished_runs_are_on_no_front():
    """A perplexity run listed first flipped the direction for the accuracy runs (the front read
    runs[0]'s), and a run that failed in fine-tuning was on the front by its pruned metric."""
    from hpcprune.report import Run, mark_sweep

    def run(label, model, macs, final, higher=True, pruned=None):
        return Run(path=f"/x/{label}/run.h5", row={"macs_kept": macs, "final": final, "pruned": pruned}, label=label,
                   config={"model._target_": model, "data._target_": "d"}, higher_is_better=higher)

    for order in (1, -1):
        runs = [run("lm", "gpt", 0.6, 40.0, higher=False), run("lm2", "gpt", 0.5, 30.0, higher=False),
                run("a", "cnn", 0.59, 0.24), run("b", "cnn", 0.40, 0.20), run("failed", "cnn", 0.3, None, pruned=0.9)][::order]
        mark_sweep(runs)
        assert {r.label: r.row.get("front") for r in runs} == {"lm": "dominated", "lm2": "yes", "a": "yes", "b": "yes",
                                                               "failed": None}


def test_every_column_is_explained_in_the_help():
    from hpcprune.report import COLUMNS, LEGEND, _parser

    assert [h for _, h in COLUMNS] == list(LEGEND)
    text = " ".join(_parser().format_help().split())
    assert all(f"{h}: " in text for _, h in COLUMNS)


def test_a_report_of_many_runs_keeps_no_pyplot_figures(runs):
    """A report of 8 runs or more draws more than pyplot's 20 open figures (two per run): they are
    drawn on figures pyplot does not keep, so no "More than 20 figures" warning and nothing held."""
    import warnings

    import matplotlib.pyplot as plt

    from hpcprune import plots, report_html

    loaded = [report.load_run(p) for p in all_paths(runs)] * 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        figs = report_html.build_figures(loaded)
        try:
            assert len(figs) > 20 and plt.get_fignums() == []
            assert all(report_html.figure_png(f)[:4] == b"\x89PNG" for f in figs[:2])
        finally:
            plots.close(figs)
