"""Sensitivity grids and dense models computed once and reused (hpcprune.reuse): through a cache
directory (in process) and between the runs of a Hydra multirun (the real CLI)."""
import os

import h5py
import numpy as np
import pytest
from conftest import run_sweep, sweep_in_process

from hpcprune.reuse import weights_digest
from hpcprune.store import RunFile, read_weights

TINY = ["threads=1", "launcher=debug", "baseline.epochs=1", "finetune.epochs=0", "sensitivity.ratios=[0.3,0.6]",
        "baseline.latency_repeats=1", "sensitivity.bn_recalib_batches=0", "prune.bn_recalib_batches=1"]


def _grid(path):
    with h5py.File(path, "r") as f:
        s, b = f["sensitivity"], f["baseline"]
        return ({k: s[k][()] for k in ("metric", "loss", "status")}, dict(s.attrs), dict(b.attrs))


def test_cache_dir_gives_a_later_run_the_same_grid_and_dense_model(tmp_path):
    cache = tmp_path / "cache"
    assert sweep_in_process(tmp_path / "a", *TINY, f"cache_dir={cache}", "prune.target.macs=0.5") == 0
    assert sweep_in_process(tmp_path / "b", *TINY, f"cache_dir={cache}", "prune.target.macs=0.7") == 0
    ga, sa, ba = _grid(tmp_path / "a" / "run.h5")
    gb, sb, bb = _grid(tmp_path / "b" / "run.h5")
    assert sa["source"] == "" and ba["source"] == "" and ba["trained_here"]
    assert sb["source"] == str(cache / f"sensitivity-{sa['key']}.h5") and sb["key"] == sa["key"]
    assert bb["source"] == str(cache / f"dense-{ba['dense_key']}.safetensors") and not bb["trained_here"]
    dense = [weights_digest(read_weights(RunFile(str(tmp_path / r / "run.h5")), "baseline")) for r in "ab"]
    assert dense[0] == dense[1] and bb["metric"] == ba["metric"]
    for k in ga:
        np.testing.assert_array_equal(ga[k], gb[k])
    # another ratio grid is another key: computed, not reused
    assert sweep_in_process(tmp_path / "c", *TINY, f"cache_dir={cache}", "sensitivity.ratios=[0.3,0.5]") == 0
    gc, sc, bc = _grid(tmp_path / "c" / "run.h5")
    assert sc["source"] == "" and sc["key"] != sa["key"] and bc["source"] == bb["source"]
    assert sorted(os.listdir(cache)) == sorted(
        [f"sensitivity-{sa['key']}.h5", f"sensitivity-{sc['key']}.h5", f"dense-{ba['dense_key']}.safetensors",
         f".hpcprune-sensitivity-{sa['key']}.lock", f".hpcprune-sensitivity-{sc['key']}.lock",
         f".hpcprune-dense-{ba['dense_key']}.lock"])


@pytest.mark.slow
def test_multirun_computes_the_grid_once_and_goes_on_past_failed_points(tmp_path):
    """``-m prune.target.macs=0.5,0.7,0.001 prune.method=uniform,global,sensitivity`` on the embedded
    default: the first run trains the dense model and computes the grid, the eight others read both
    from its run file; a point equals the same point run alone; the unreachable budget's three runs
    are refused on the architecture and the sweep goes on through all nine, exiting with status 3."""
    sweep = tmp_path / "multi"
    p = run_sweep(tmp_path / "unused", "-m", *TINY, "prune.target.macs=0.5,0.7,0.001",
                  "prune.method=uniform,global,sensitivity", f"hydra.sweep.dir={sweep}", check=False, timeout=600)
    assert p.returncode == 3 and "3 run(s) of the sweep failed (of 9)" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]  # a failed point is its one line, not Hydra's traceback
    first = str(sweep / "0" / "run.h5")
    g0, s0, b0 = _grid(first)
    assert s0["source"] == "" and b0["trained_here"]
    status = {}
    for i in range(9):
        with h5py.File(sweep / str(i) / "run.h5", "r") as f:
            status[i] = (f.attrs["status"], str(f.attrs.get("status_reason", "")))
        if i < 6:  # budgets 0.5 and 0.7: complete, grid and dense model from run 0
            assert status[i][0] == "complete", status[i]
            if i:
                gi, si, bi = _grid(sweep / str(i) / "run.h5")
                assert si["source"] == first and bi["source"] == first and si["key"] == s0["key"]
                assert [bi[k] for k in ("metric", "loss", "macs")] == [b0[k] for k in ("metric", "loss", "macs")]
                assert bi["eval_source"] == first and b0["eval_source"] == ""
                with h5py.File(sweep / str(i) / "run.h5", "r") as f:
                    assert f["groups"].attrs["source"] == first  # the groups stage's findings too
                for k in g0:
                    np.testing.assert_array_equal(g0[k], gi[k])
        else:
            assert status[i][0] == "failed" and "prune.target.macs=0.001" in status[i][1], status[i]
    # point 5 (macs 0.7, sensitivity) run alone gives the same numbers
    assert sweep_in_process(tmp_path / "solo", *TINY, "prune.target.macs=0.7", "prune.method=sensitivity") == 0
    with h5py.File(tmp_path / "solo" / "run.h5", "r") as a, h5py.File(sweep / "5" / "run.h5", "r") as b:
        for k in ("metric", "macs_kept", "params_kept"):
            assert a["final"].attrs[k] == b["final"].attrs[k], k
        for k in ("metric", "loss", "macs"):  # evaluated alone; read from run 0 in the sweep
            assert a["baseline"].attrs[k] == b["baseline"].attrs[k], k
    # the sweep's report: which runs share a grid, which are on the front
    from hpcprune.report import label_runs, load_run, mark_sweep

    runs = [load_run(str(sweep / str(i) / "run.h5")) for i in range(9)]
    label_runs(runs)
    mark_sweep(runs)
    assert [r.row.get("grid") for r in runs] == ["own"] + ["from 0"] * 5 + [None] * 3
    assert all(r.row.get("front") in ("yes", "dominated") for r in runs[:6]) and "yes" in [r.row["front"] for r in runs[:6]]
    # the same sweep directory again with another config: every point is refused on its older run file
    # (which stays complete and untouched), and the sweep says so with status 3, not "complete"
    p = run_sweep(tmp_path / "unused", "-m", *TINY, "finetune.epochs=1", "prune.target.macs=0.5",
                  "prune.method=uniform,global", f"hydra.sweep.dir={sweep}", check=False, timeout=300)
    assert p.returncode == 3 and "2 run(s) of the sweep failed (of 2)" in p.stderr, p.stderr[-2000:]
    assert "different config" in p.stderr and "use another hydra.sweep.dir" in p.stderr
    with h5py.File(first, "r") as f:
        assert f.attrs["status"] == "complete" and f["baseline"].attrs["eval_source"] == ""


def test_accuracy_gate_marks_the_run_failed_and_keeps_its_results(tmp_path):
    from hpcprune.pipeline import AccuracyGateError

    with pytest.raises(AccuracyGateError, match="finetune.min_metric=0.999"):
        sweep_in_process(tmp_path, *TINY, "finetune.min_metric=0.999")
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f.attrs["status"] == "failed" and "AccuracyGateError" in f.attrs["status_reason"]
        assert f["final"].attrs["complete"] and f["final"].attrs["metric"] < 0.999
    # a relaxed gate on resume: the same results, now complete (the gate is result-neutral)
    assert sweep_in_process(tmp_path, *TINY, "finetune.min_metric=0.1") == 0
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f.attrs["status"] == "complete"


def _stamp(line):
    import datetime

    return datetime.datetime.strptime(line[:8], "%H:%M:%S")


@pytest.mark.slow
def test_multirun_on_submitit_local_runs_points_concurrently_and_computes_shared_stages_once(tmp_path):
    """``hydra/launcher=submitit_local``: both points run at once as their own jobs (their sweep.log
    spans overlap: each takes many seconds, both start together), one computes the dense model and
    the grid, the other copies them (after waiting on the key's lock when it got there first)."""
    sweep = tmp_path / "fan"
    p = run_sweep(tmp_path / "unused", "-m", "hydra/launcher=submitit_local", *TINY, "finetune.epochs=2",
                  "prune.target.macs=0.5,0.7,0.001", f"hydra.sweep.dir={sweep}", timeout=600, check=False)
    # the unreachable budget's point (its own job) is refused; the parent says so and exits 3, no traceback
    assert p.returncode == 3 and f"1 run(s) of the sweep failed (of 3): {sweep / '2'}" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    spans = []
    for i in (0, 1):
        lines = (sweep / str(i) / "sweep.log").read_text().splitlines()
        spans.append((_stamp(lines[0]), _stamp(lines[-1])))
    assert spans[0][0] <= spans[1][1] and spans[1][0] <= spans[0][1], spans  # the two runs overlap in time
    sources = [_grid(sweep / str(i) / "run.h5")[1]["source"] for i in (0, 1)]
    assert sorted(sources) == ["", str(sweep / ("0" if sources[0] == "" else "1") / "run.h5")]


@pytest.mark.slow
def test_joblib_multirun_runs_points_on_reused_workers_with_the_numbers_of_solo_runs(tmp_path):
    """``hydra/launcher=joblib``: hpcprune sets ``n_jobs`` (2 one-thread points on a 2-core machine,
    ``slots.local_slots``), the four points run on worker processes that each take several points
    (one process's imports serve them all), two at a time, the grid is computed once, and a point
    run after another one in the same process equals the same point run alone."""
    import re

    sweep = tmp_path / "jl"
    p = run_sweep(tmp_path / "unused", "-m", "hydra/launcher=joblib", *TINY, "finetune.epochs=1", "local_parallelism=2",
                  "prune.target.macs=0.5,0.7", "prune.method=uniform,sensitivity", f"hydra.sweep.dir={sweep}", timeout=600)
    assert "4 run(s) complete" in p.stdout + p.stderr, p.stderr[-3000:]
    assert "hydra.launcher.n_jobs=2" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text() or \
        "n_jobs: 2" in (sweep / "0" / ".hydra" / "hydra.yaml").read_text()
    pids, spans = [], []
    for i in range(4):
        (folder,) = os.listdir(sweep / str(i) / "finetune" / "submitit")  # <time>-<pid of the point's process>
        pids.append(int(re.search(r"-(\d+)$", folder).group(1)))
        lines = (sweep / str(i) / "sweep.log").read_text().splitlines()
        spans.append((_stamp(lines[0]), _stamp(lines[-1])))
    assert len(set(pids)) == 2, pids  # two workers, each ran two points
    assert spans[0][0] <= spans[1][1] and spans[1][0] <= spans[0][1], spans  # the first two points overlap
    sources = [_grid(sweep / str(i) / "run.h5")[1]["source"] for i in range(4)]
    assert sources.count("") == 1, sources
    late = max(range(4), key=lambda i: spans[i][0])  # started after another point of its worker
    method, budget = [("uniform", "0.5"), ("sensitivity", "0.5"), ("uniform", "0.7"), ("sensitivity", "0.7")][late]
    assert sweep_in_process(tmp_path / "solo", *TINY, "finetune.epochs=1", f"prune.target.macs={budget}",
                            f"prune.method={method}") == 0
    with h5py.File(tmp_path / "solo" / "run.h5", "r") as a, h5py.File(sweep / str(late) / "run.h5", "r") as b:
        for k in ("metric", "loss", "macs_kept", "params_kept"):
            assert a["final"].attrs[k] == b["final"].attrs[k], k


@pytest.mark.slow
def test_a_dead_worker_ends_a_joblib_multirun_with_one_line_and_status_3(tmp_path):
    """A point whose process dies (SIGKILL: what the OOM killer sends) on ``hydra/launcher=joblib``: joblib
    stops the sweep; hpcprune says so in one line (no traceback), lists the points cut short and exits
    3. ``hydra.launcher.n_jobs=0`` is refused before anything starts."""
    import subprocess

    from conftest import PY, ROOT

    pkg = tmp_path / "mods" / "killpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import os, signal\nfrom torch import nn\n\n"
        "def model(die: bool = False, num_classes: int = 10):\n"
        "    if die:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "mods"), OMP_NUM_THREADS="1")
    sweep = tmp_path / "kill"
    cmd = [PY, "-m", "hpcprune.sweep", "model._target_=killpkg.model", *TINY, "-m", "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=2", "+model.die=false,true,false", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, (p.returncode, p.stderr[-3000:])
    assert "a point's worker process died (TerminatedWorkerError" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "run(s) of the sweep failed" in p.stderr
    bad = [*cmd[:-2], "hydra.launcher.n_jobs=0", f"hydra.sweep.dir={tmp_path / 'nj0'}"]
    p = subprocess.run(bad, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "hydra.launcher.n_jobs=0: the number of worker processes" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "nj0").exists()


def test_local_slots_hold_a_local_multirun_to_its_cpus(tmp_path, monkeypatch):
    """``hpcprune.reuse.LocalSlot``: with n slots the (n+1)-th point waits until one ends; a point of a
    local submitit multirun takes one, a solo run or a Slurm point none; n from the config."""
    import threading

    from omegaconf import OmegaConf

    from hpcprune.slots import LocalSlot, local_slot, local_slots

    cfg = OmegaConf.create({"local_parallelism": 0, "threads": 1, "cache_dir": None})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert local_slots(cfg, "", 2) == 2 and local_slots(OmegaConf.merge(cfg, {"threads": 0}), "", 2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # threads=0 capped at 1 thread per point
    assert local_slots(OmegaConf.merge(cfg, {"threads": 0}), "", 2) == 2
    assert local_slots(OmegaConf.merge(cfg, {"local_parallelism": 3}), "", 2) == 3
    # a local DDP fine-tune's tasks run on this machine too: 2 tasks x 1 thread = 2 CPUs a point
    local = {"launcher": {"name": "local", "tasks": 2}}
    assert local_slots(OmegaConf.merge(cfg, local), "", 2) == 1 and local_slots(OmegaConf.merge(cfg, local), "", 8) == 4
    assert local_slots(OmegaConf.merge(cfg, {"launcher": {"name": "slurm", "tasks_per_node": 4}}), "", 2) == 2
    (tmp_path / "multirun.yaml").write_text("{}")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert isinstance(local_slot(cfg, str(tmp_path / "0"), 2), LocalSlot)
    assert local_slot(cfg, str(tmp_path.parent / "solo" / "0"), 2) is None  # not in a multirun
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert local_slot(cfg, str(tmp_path / "0"), 2) is None

    first, second = LocalSlot(str(tmp_path), 1).acquire(), LocalSlot(str(tmp_path), 1)
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(poll_s=0.05), got.set()), daemon=True)
    waiter.start()
    assert not got.wait(1.0)  # the one slot is held: the second point waits
    first.release()
    assert got.wait(30)
    second.release()
    waiter.join(5)


def test_points_of_a_multirun_with_a_checkpoint_share_the_dense_evaluation(tmp_path, dense_ckpt):
    """Two runs of one multirun directory on the same ``checkpoint=``: the second takes the first's
    dense metric, loss and MACs (``/baseline@eval_source``, the same ``@eval_key``) and still times
    the dense model itself; another data config gives another key, evaluated anew."""
    multi = tmp_path / "multi"
    multi.mkdir()
    (multi / "multirun.yaml").write_text("{}\n")  # what Hydra writes in a sweep directory
    common = [*TINY, f"checkpoint={dense_ckpt}", "prune.method=uniform", "prune.target.macs=0.7"]
    assert sweep_in_process(multi / "0", *common) == 0
    assert sweep_in_process(multi / "1", *common, "prune.target.macs=0.5") == 0
    assert sweep_in_process(multi / "2", *common, "data.val_samples=300") == 0
    b = []
    for i in range(3):
        with h5py.File(multi / str(i) / "run.h5", "r") as f:
            b.append(dict(f["baseline"].attrs))
    assert b[0]["eval_source"] == "" and b[1]["eval_source"] == str(multi / "0" / "run.h5")
    assert b[1]["eval_key"] == b[0]["eval_key"] != b[2]["eval_key"] and b[2]["eval_source"] == ""
    assert [b[1][k] for k in ("metric", "loss", "macs")] == [b[0][k] for k in ("metric", "loss", "macs")]
    assert b[1]["latency_ms"] > 0


def test_groups_stage_findings_reused_by_the_runs_of_a_multirun(tmp_path):
    """The groups stage's verification and cost model (``/groups@key``) read from an earlier run of
    the same multirun directory: the same record as computed; another ``prune.max_ratio`` (other
    cuts verified) is another key, computed again; each run's own budget is still checked."""
    multi = tmp_path / "multi"
    multi.mkdir()
    (multi / "multirun.yaml").write_text("{}\n")  # what makes a run directory's parent a multirun's
    assert sweep_in_process(multi / "0", *TINY, "prune.target.macs=0.5") == 0
    assert sweep_in_process(multi / "1", *TINY, "prune.target.macs=0.7") == 0
    assert sweep_in_process(multi / "2", *TINY, "prune.target.macs=0.7", "prune.max_ratio=0.8") == 0

    def groups(i):
        with h5py.File(multi / str(i) / "run.h5", "r") as f:
            h = f["groups"]
            return dict(h.attrs), {k: h[k][()] for k in h if k != "cost"}, {k: h["cost"][k][()] for k in h["cost"]}

    a0, d0, c0 = groups(0)
    a1, d1, c1 = groups(1)
    a2, _, _ = groups(2)
    assert a0["source"] == "" and a1["source"] == str(multi / "0" / "run.h5") and a1["key"] == a0["key"]
    assert a1["excluded"] == a0["excluded"] and d1.keys() == d0.keys() and c1.keys() == c0.keys()
    for k in d0:
        np.testing.assert_array_equal(d0[k], d1[k])
    for k in c0:
        np.testing.assert_array_equal(c0[k], c1[k])
    assert a2["source"] == "" and a2["key"] != a0["key"]
    from hpcprune.config import ConfigError

    with pytest.raises(ConfigError, match="prune.target.macs=0.001"):  # refused on the reused cost model too
        sweep_in_process(multi / "3", *TINY, "prune.target.macs=0.001")
    assert groups(1)[0]["source"] == str(multi / "0" / "run.h5")


def pretrained_resnet():
    """A user's model function whose model comes with trained weights (here: fixed random ones)."""
    import torch

    from hpcprune.runs import mark_pretrained
    from hpcprune.zoo.models import resnet

    torch.manual_seed(123)
    return mark_pretrained(resnet(1, 10, (8, 16), (1, 1)))


def test_a_pretrained_model_is_kept_not_trained(tmp_path, caplog):
    """A model marked pretrained is measured with its own weights whatever baseline.epochs says (the log
    says so); baseline.train_pretrained=true trains it like one with random weights."""
    import torch

    own = pretrained_resnet().state_dict()
    argv = [*TINY, "baseline.epochs=2", "model._target_=test_reuse.pretrained_resnet", "prune.target.macs=0.8"]
    with caplog.at_level("INFO", logger="hpcprune.stages"):
        assert sweep_in_process(tmp_path / "kept", *argv) == 0
    assert "the model's own trained weights, not trained here (baseline.epochs=2" in caplog.text
    assert sweep_in_process(tmp_path / "trained", *argv, "baseline.train_pretrained=true") == 0
    for run, trained in (("kept", False), ("trained", True)):
        with h5py.File(tmp_path / run / "run.h5", "r") as f:
            assert f["baseline"].attrs["pretrained"] and bool(f["baseline"].attrs["trained_here"]) == trained
        dense = read_weights(RunFile(str(tmp_path / run / "run.h5")), "baseline")
        same = all(torch.equal(dense[k], v) for k, v in own.items() if k in dense)
        assert same != trained, run
