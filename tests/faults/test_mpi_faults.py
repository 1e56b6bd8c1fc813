"""Faults on one MPI rank during sensitivity (3 ranks): an exception (on a worker, or on a team
member waiting in its team's allreduces), a SIGKILL.

Every rank must end within 30 s, the run file must keep every cell gathered before the fault (with
``sensitivity.flush_s=0`` rank 0 writes after each result), and a rerun must compute only the
missing cells and give the uninterrupted run's numbers. The exception comes from the model itself
(``faulty.raising_resnet``: its classifier's forward raises on PMI_RANK 1 after N calls), not from
a hook in hpcprune.
"""
import os
import re
import signal
import time

import h5py
import numpy as np
import pytest

from conftest import LEAN, Job, fault_env, ok, ov, rank_pid, read_done, run, sweep_cmd, wait_gone

pytestmark = [pytest.mark.faults, pytest.mark.mpi, pytest.mark.slow]

CALIB_BATCHES = 128  # data.calib_samples / sensitivity.batch_size: forward calls per cell
# rank 1 raises inside its fourth cell: the dense calibration pass and three cells come first (a whole group
# of 3 ratios can be one chunk, reported when done: raising in the third left no cell gathered in 1 of 4 runs)
FAIL_AFTER = CALIB_BATCHES * 4 + CALIB_BATCHES // 2


# a team of 2 (ranks 1 and 2; rank 0 dispatches): each member evaluates half of each cell's batches,
# and the team reports a chunk (here a whole group) when it is done: rank 2 raises in its 13th cell
FAIL_AFTER_TEAM = CALIB_BATCHES + CALIB_BATCHES // 2 * 12 + CALIB_BATCHES // 4


def config(dense_ckpt, fail_after=FAIL_AFTER, fail_rank=1, extra=()):
    return ov(LEAN, [f"checkpoint={dense_ckpt}", "model=resnet_tiny", "model._target_=faulty.raising_resnet", f"+model.fail_after={fail_after}",
                     f"+model.fail_rank={fail_rank}", "sensitivity.batch_size=2", "data.calib_samples=256",
                     "sensitivity.flush_s=0", *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dense_ckpt):
    """The same config in one process (no PMI_RANK: the model never raises)."""
    d = tmp_path_factory.mktemp("mpi_ref") / "run"
    ok(run(sweep_cmd(d, *config(dense_ckpt)), timeout=300))
    with h5py.File(d / "run.h5") as f:
        return {k: f[f"sensitivity/{k}"][()] for k in ("loss", "metric", "status")}


def _watch(job, h5, until_cells=None, timeout=240):
    """Poll the run file while the job runs: the cells seen done (union over time). Returns when the
    job ends, or once ``until_cells`` cells are done."""
    seen = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.alive():
        _, st = read_done(h5)
        if st is not None:
            seen = (st == 1) if seen is None else (seen | (st == 1))
            if until_cells is not None and seen.sum() >= until_cells:
                return seen
        time.sleep(0.1)
    return seen


def _after_fault(h5, seen, reference):
    """The run file opens, holds every cell seen done before the fault with the reference's numbers."""
    from hpcprune.store import RunFile

    RunFile(str(h5)).check()
    with h5py.File(h5, "r") as f:
        st, loss, metric = f["sensitivity/status"][()], f["sensitivity/loss"][()], f["sensitivity/metric"][()]
        assert not f["sensitivity"].attrs.get("complete", False)
    done = st == 1
    assert seen is not None and seen.sum() >= 1, "no cell was gathered before the fault"
    assert not (seen & ~done).any(), "cells written before the fault are missing from the run file"
    assert done.sum() < done.size, "the fault came after the last cell"
    np.testing.assert_allclose(loss[done], reference["loss"][done], atol=1e-5)
    np.testing.assert_allclose(metric[done], reference["metric"][done], atol=1e-5)
    assert np.isnan(loss[~done]).all()
    return done


def _rerun_completes(d, cfg, done, reference):
    p = ok(run(sweep_cmd(d, *cfg, ranks=3), env=fault_env(FAULTY_OFF=1), timeout=400))
    m = re.search(r"sensitivity: (\d+) cells", p.stderr)
    assert m and int(m.group(1)) == done.size - done.sum(), p.stderr[-2000:]  # only the missing cells
    with h5py.File(d / "run.h5") as f:
        assert f.attrs["status"] == "complete"
        assert (f["sensitivity/status"][()] == 1).all()
        np.testing.assert_allclose(f["sensitivity/loss"][()], reference["loss"], atol=1e-5)
        np.testing.assert_allclose(f["sensitivity/metric"][()], reference["metric"], atol=1e-5)
    assert not os.path.exists(d / "run.h5.tmp")


@pytest.mark.parametrize("fail_rank,fail_after,extra", [(1, FAIL_AFTER, ()), (2, FAIL_AFTER_TEAM, ("sensitivity.team_size=2",))],
                         ids=["worker", "team_member"])
def test_exception_on_one_rank_ends_every_rank(tmp_path, dense_ckpt, reference, fail_rank, fail_after, extra):
    d = tmp_path / "run"
    cfg = config(dense_ckpt, fail_after, fail_rank, extra)
    mark = tmp_path / "fault_time"
    job = Job(sweep_cmd(d, *cfg, ranks=3), tmp_path / "log", env=fault_env(FAULTY_MARK=mark))
    try:
        seen = _watch(job, d / "run.h5")
        rc = job.wait(timeout=60)
        ended = time.time()
    finally:
        job.cleanup()
    assert mark.exists(), f"the fault never fired:\n{job.stderr()[-3000:]}"
    fault_at = float(mark.read_text())
    assert rc != 0
    assert ended - fault_at < 30, f"mpiexec ended {ended - fault_at:.1f} s after the fault"
    wait_gone(d, timeout=max(1.0, 30 - (time.time() - fault_at)))  # no rank left behind
    err = job.stderr()
    lines = [ln for ln in err.splitlines() if ln.startswith("hpcprune: error:")]
    assert len(lines) == 1, err[-3000:]
    assert f"rank {fail_rank}/3" in lines[0] and f"InjectedFault: injected fault on PMI_RANK={fail_rank}" in lines[0], lines[0]
    done = _after_fault(d / "run.h5", seen, reference)
    print(f"exception on rank {fail_rank} {extra}: mpiexec exit {rc} {ended - fault_at:.2f} s after it; {int(done.sum())}/{done.size} cells kept")
    _rerun_completes(d, cfg, done, reference)


def test_sigkill_of_rank1_ends_every_rank(tmp_path, dense_ckpt, reference):
    d = tmp_path / "run"
    cfg = config(dense_ckpt)
    job = Job(sweep_cmd(d, *cfg, ranks=3), tmp_path / "log", env=fault_env(FAULTY_OFF=1))
    try:
        seen = _watch(job, d / "run.h5", until_cells=3)
        assert job.alive(), f"the sweep ended before the kill:\n{job.stderr()[-3000:]}"
        pid = rank_pid(d, 1)
        assert pid is not None, "rank 1 not found in /proc"
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        rc = job.wait(timeout=30)
        ended = time.monotonic() - killed_at
    finally:
        job.cleanup()
    assert rc != 0
    assert ended < 30
    wait_gone(d, timeout=max(1.0, 30 - (time.monotonic() - killed_at)))
    done = _after_fault(d / "run.h5", seen, reference)
    print(f"SIGKILL of rank 1: mpiexec exit {rc} {ended:.2f} s after it; {int(done.sum())}/{done.size} cells kept")
    _rerun_completes(d, cfg, done, reference)
