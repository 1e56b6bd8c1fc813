"""Sensitivity over real mpiexec ranks: identical matrices for 1, 2 and 3 ranks, and a run killed
mid-sensitivity (SIGKILL of the whole mpiexec process group) resumes to the identical matrix,
computing only the missing cells."""
import os
import re
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, run_sweep, sweep_cmd

SENS = [
    "threads=1",
    "baseline.epochs=4",
    "finetune.epochs=0",
    "launcher=debug",
    "baseline.latency_repeats=3",
    "sensitivity.batch_size=2",  # many small batches: cells slow enough to be killed midway
    "data.calib_samples=256",
]

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def _matrix(path):
    with h5py.File(path) as f:
        return f["sensitivity/loss"][()], f["sensitivity/metric"][()], f["sensitivity/status"][()], f["sensitivity/rank"][()]


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("w1") / "run"
    run_sweep(d, *SENS)
    return d


@pytest.fixture(scope="module")
def one_rank(one_rank_run):
    return _matrix(one_rank_run / "run.h5")


@pytest.fixture(scope="module")
def trained(one_rank_run, tmp_path_factory):
    """one_rank's dense weights as ``checkpoint=``: the runs compared with it start from the very same
    dense model and skip the training."""
    import torch

    from hpcprune.store import RunFile, read_weights

    path = tmp_path_factory.mktemp("ckpt") / "trained.pt"
    torch.save(dict(read_weights(RunFile(str(one_rank_run / "run.h5")), "baseline")), path)
    return f"checkpoint={path}"


def test_three_ranks_identical(tmp_path, one_rank, trained):
    run_sweep(tmp_path / "w3", *SENS, trained, ranks=3, timeout=400)
    loss, metric, status, rank = _matrix(tmp_path / "w3" / "run.h5")
    assert (status == 1).all()
    assert set(rank.ravel()) == {0, 1, 2}
    np.testing.assert_allclose(loss, one_rank[0], atol=1e-5)
    np.testing.assert_allclose(metric, one_rank[1], atol=1e-5)


def test_team_shares_cells_equals_one_rank(tmp_path, one_rank, trained):
    """4 ranks as a dispatcher and two teams (ranks 1-2 and rank 3; sensitivity.team_size=2) whose
    members split every cell's calibration samples and BatchNorm re-estimation batches: one rank's
    numbers. With an early-stop floor between two measured values, exactly the cells after each
    group's first one below it are skipped (a team decides on the whole cell's sums)."""
    metric = one_rank[1]
    values = np.unique(metric.round(6))
    floor = float((values[len(values) // 2 - 1] + values[len(values) // 2]) / 2)
    expected = np.ones(metric.shape, np.int8)
    for g in range(metric.shape[0]):
        below = np.nonzero(metric[g] < floor)[0]
        if len(below):
            expected[g, below[0] + 1:] = 2
    assert (expected == 2).any() and (expected[:, 0] == 1).all()
    d = tmp_path / "team"
    run_sweep(d, *SENS, trained, "sensitivity.team_size=2", f"sensitivity.early_stop_floor={floor}", ranks=4, timeout=400)
    loss, got, status, rank = _matrix(d / "run.h5")
    np.testing.assert_array_equal(status, expected)
    done = status == 1
    np.testing.assert_allclose(loss[done], one_rank[0][done], atol=1e-5)
    np.testing.assert_allclose(got[done], metric[done], atol=1e-5)
    with h5py.File(d / "run.h5") as f:
        team = f["sensitivity/team"][()]
        recal = f["sensitivity/recal_seconds"][()]
    assert set(zip(rank.ravel(), team.ravel())) == {(1, 2), (3, 1)}  # leaders report; rank 0 only dispatched
    assert (recal[done] > 0).any()


def test_kill_mid_sensitivity_resumes(tmp_path, one_rank, trained):
    d = tmp_path / "killed"
    proc = subprocess.Popen(sweep_cmd(d, *SENS, trained, "sensitivity.flush_s=0", ranks=2), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    h5 = d / "run.h5"
    done_before = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            time.sleep(0.2)
            if proc.poll() is not None:
                break
            try:
                with h5py.File(h5, "r") as f:
                    if "sensitivity" in f:
                        n = int((f["sensitivity/status"][()] == 1).sum())
                        if n >= 8:
                            break
            except (OSError, KeyError):
                continue
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: mpiexec and both ranks
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # the run file survived the kill and holds what was gathered
    with h5py.File(h5, "r") as f:
        assert f.attrs["status"] == "running"
        st = f["sensitivity/status"][()]
        secs_before = f["sensitivity/seconds"][()]
        done_before = st == 1
        assert 8 <= done_before.sum() < st.size
    p = run_sweep(d, *SENS, trained, ranks=2, timeout=400)
    missing = int(st.size - done_before.sum())
    m = re.search(r"sensitivity: (\d+) cells", p.stderr)
    assert m and int(m.group(1)) == missing, p.stderr[-2000:]
    loss, metric, status, _ = _matrix(h5)
    assert (status == 1).all()
    np.testing.assert_allclose(loss, one_rank[0], atol=1e-5)
    np.testing.assert_allclose(metric, one_rank[1], atol=1e-5)
    with h5py.File(h5, "r") as f:  # cells finished before the kill were not computed again
        np.testing.assert_array_equal(f["sensitivity/seconds"][()][done_before], secs_before[done_before])
        assert f.attrs["status"] == "complete"


def test_more_ranks_than_cells(tmp_path, one_rank):
    """3 ranks for 2 cells: each cell's batches are split over ranks; same numbers as 1 rank (the
    KL divergence from the dense model too: its predictions travel with the shards' batches)."""
    few = [*SENS, "model=mlp", "sensitivity.ratios=[0.5]", "sensitivity.damage=kl"]
    run_sweep(tmp_path / "one", *few, timeout=300)
    run_sweep(tmp_path / "few", *few, ranks=3, timeout=300)
    ref = _matrix(tmp_path / "one" / "run.h5")
    loss, metric, status, _ = _matrix(tmp_path / "few" / "run.h5")
    assert loss.shape == (2, 1) and (status == 1).all()
    np.testing.assert_allclose(loss, ref[0], atol=1e-5)
    np.testing.assert_allclose(metric, ref[1], atol=1e-5)
    with h5py.File(tmp_path / "one" / "run.h5") as a, h5py.File(tmp_path / "few" / "run.h5") as b:
        assert (a["sensitivity/kl"][()] > 0).all()
        np.testing.assert_allclose(b["sensitivity/kl"][()], a["sensitivity/kl"][()], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("criterion", ["taylor", "activation"])
def test_data_driven_scores_over_two_ranks_equal_one(tmp_path, trained, criterion):
    """Taylor and activation statistics: each rank scores a share of the batches, sums all-reduced."""
    fast = [*SENS, trained, f"importance={criterion}", "sensitivity.ratios=[0.5]", "sensitivity.batch_size=64"]
    run_sweep(tmp_path / "one", *fast)
    run_sweep(tmp_path / "two", *fast, ranks=2)
    with h5py.File(tmp_path / "one" / "run.h5") as a, h5py.File(tmp_path / "two" / "run.h5") as b:
        assert a["importance"].attrs["criterion"] == criterion
        for name in a["importance"]:
            np.testing.assert_allclose(b["importance"][name][()], a["importance"][name][()], rtol=1e-6, atol=1e-12)
        np.testing.assert_array_equal(a["pruned/plan"]["0.0"][()], b["pruned/plan"]["0.0"][()])
