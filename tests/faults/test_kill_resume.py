"""SIGKILL of the whole job (its process group: the sweep, and the fine-tune job's controller and
tasks) at seeded-random moments: during sensitivity, during a run-file write, during prune, during
the fine-tune. After each kill the run file opens, holds every stage that had completed before the
kill with the numbers of an uninterrupted run, and a rerun finishes with the same final metric,
sensitivity matrix, allocation, plan and weights as the uninterrupted run.

The moments are drawn from ``random.Random(f"{seed}:{point}")``; ``HPCPRUNE_FAULT_SEED`` (default 0)
picks other ones. A stage's window is placed from the uninterrupted run's stage seconds.
"""
import glob
import os
import random
import re
import signal
import time

import h5py
import numpy as np
import pytest

from conftest import (LEAN, Job, assert_same, fault_env, ok, ov, read_done, run, snapshot, stage_keys, sweep_cmd,
                      wait_gone)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SEED = int(os.environ.get("HPCPRUNE_FAULT_SEED", "0"))
STAGES = ("baseline", "groups", "sensitivity", "allocation", "pruned", "finetune", "final")


def config(dense_ckpt, finetune=False):
    # 4 samples per calibration batch: sensitivity takes a few seconds, long enough to land in
    extra = ["sensitivity.batch_size=4", "sensitivity.flush_s=0", f"checkpoint={dense_ckpt}"]
    if finetune:
        extra += ["launcher=local", "finetune.epochs=2"]
    return ov(LEAN, extra)


def _stage_seconds(run_dir):
    with open(os.path.join(run_dir, "sweep.log")) as f:
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"stage (\w+): ([\d.]+) s", f.read())}


@pytest.fixture(scope="module")
def references(tmp_path_factory, dense_ckpt):
    """Uninterrupted runs, made on first use: {finetune: (snapshot, stage seconds)}."""
    made = {}

    def get(finetune):
        if finetune not in made:
            d = tmp_path_factory.mktemp("ref_ft" if finetune else "ref") / "run"
            ok(run(sweep_cmd(d, *config(dense_ckpt, finetune)), timeout=400))
            made[finetune] = (snapshot(d / "run.h5"), _stage_seconds(d))
        return made[finetune]

    return get


class Watcher:
    """Follows a running sweep: the stages seen complete in its run file, lines of its sweep.log."""

    def __init__(self, run_dir):
        self.run_dir = str(run_dir)
        self.h5 = os.path.join(self.run_dir, "run.h5")
        self.seen_stages = set()
        self.seen_cells = None
        self._last_read = 0.0

    def poll(self):
        if time.monotonic() - self._last_read < 0.05:
            return
        self._last_read = time.monotonic()
        done, st = read_done(self.h5)
        if done is not None:
            self.seen_stages |= set(done)
        if st is not None:
            self.seen_cells = (st == 1) if self.seen_cells is None else (self.seen_cells | (st == 1))

    def log_has(self, needle):
        try:
            with open(os.path.join(self.run_dir, "sweep.log")) as f:
                return needle in f.read()
        except OSError:
            return False


def _wait_for(job, watcher, cond, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        watcher.poll()
        if cond():
            return True
        if not job.alive():
            return False
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the kill point")


def _kill_in_stage(job, watcher, rng, start_line, window_s, lo=0.1, hi=0.9, ending=None):
    """SIGKILL the group at a random moment of a stage: ``start_line`` in sweep.log marks its start, the
    moment is drawn from the uninterrupted run's stage time, and brought forward to when ``ending()``
    turns true (the stage's last step has begun): a run faster than the reference (a quieter machine,
    xdist's other worker idle) is still killed inside the stage, not after it."""
    assert _wait_for(job, watcher, lambda: watcher.log_has(start_line)), f"ended before {start_line!r}"
    delay = rng.uniform(lo, hi) * window_s
    t0 = time.monotonic()
    early = False
    while time.monotonic() - t0 < delay and job.alive():
        watcher.poll()
        if ending is not None and ending():
            early = True
            break
        time.sleep(0.01)
    assert job.alive(), "the sweep ended before the kill"
    job.signal_group(signal.SIGKILL)
    if early:
        return f"{time.monotonic() - t0:.2f} s after {start_line!r} (drawn: {delay:.2f} s; the stage was ending)"
    return f"{delay:.2f} s after {start_line!r}"


def _cells_left(watcher, n):
    """At most ``n`` sensitivity cells not yet in the run file (flush_s=0: each result is written)."""
    return watcher.seen_cells is not None and watcher.seen_cells.size - int(watcher.seen_cells.sum()) <= n


def _kill_in_write(job, watcher):
    """SIGKILL the group while a run-file transaction is on disk (run.h5.tmp written, not renamed yet):
    the sweep runs with ``HPCPRUNE_FAILPOINT_WRITE=k`` (``store._failpoint``), so its k-th transaction
    stops there and says so in ``run.h5.tmp.stopped``; no race with a short-lived file."""
    stopped = watcher.h5 + ".tmp.stopped"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if os.path.exists(stopped):
            with open(stopped) as fh:
                what = fh.read().strip()
            job.signal_group(signal.SIGKILL)
            os.remove(stopped)
            return f"during a run-file write ({what}): run.h5.tmp was there"
        if not job.alive():
            raise AssertionError("the sweep ended before the failpoint write")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the failpoint write")


POINTS = ["sensitivity", "write-early", "write-late", "prune", "finetune-start", "finetune-epoch2"]


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_job_then_resume(tmp_path, dense_ckpt, references, point):
    finetune = point.startswith("finetune")
    ref, ref_s = references(finetune)
    rng = random.Random(f"{SEED}:{point}")
    cfg = config(dense_ckpt, finetune)
    d = tmp_path / "run"
    # the k-th run-file write (1 creates the file; a lean run makes about 20: 2-7 groups and baseline,
    # 8-14 sensitivity flushes, then allocation, prune, final, status) stops before its rename
    k = rng.randint(2, 7) if point == "write-early" else rng.randint(8, 18) if point == "write-late" else 0
    job = Job(sweep_cmd(d, *cfg), tmp_path / "log", env=fault_env(HPCPRUNE_FAILPOINT_WRITE=k) if k else None)
    watcher = Watcher(d)
    try:
        if point == "sensitivity":
            where = _kill_in_stage(job, watcher, rng, "stage baseline:", ref_s["sensitivity"], lo=0.05, hi=0.7,
                                   ending=lambda: _cells_left(watcher, 3))
        elif point == "write-early":
            where = _kill_in_write(job, watcher)
        elif point == "write-late":
            where = _kill_in_write(job, watcher)
        elif point == "prune":
            where = _kill_in_stage(job, watcher, rng, "stage allocation:", ref_s["pruned"], lo=0.05, hi=0.6,
                                   ending=lambda: watcher.log_has("pruned: "))  # logged before the stage's write
        elif point == "finetune-start":  # the job starting up or in its first epoch
            where = _kill_in_stage(job, watcher, rng, "fine-tune job", ref_s["final"], lo=0.2, hi=0.6,
                                   ending=(d / "finetune" / "checkpoint.pt").exists)  # the first epoch's
        else:  # in the second (last) epoch, after the first one's checkpoint
            ckpt = d / "finetune" / "checkpoint.pt"
            assert _wait_for(job, watcher, ckpt.exists), "ended before the first fine-tune checkpoint"
            t0 = time.monotonic()
            # up to half of epoch 2, as long as the reference's epoch 2 took, scaled by how this run's epoch 1
            # compares with the reference's (the first checkpoint holds its time): a busier or quieter
            # machine than the reference's still gets killed inside epoch 2, before its checkpoint
            import torch

            first = torch.load(ckpt, map_location="cpu", weights_only=False)["history"][0]
            speed = float(first[5]) / float(ref["finetune/history"][0, 5])
            delay = rng.uniform(0.0, 0.5) * float(ref["finetune/history"][1, 5]) * speed
            time.sleep(max(0.0, t0 + delay - time.monotonic()))
            assert job.alive(), "the sweep ended before the kill"
            job.signal_group(signal.SIGKILL)
            where = f"in fine-tune epoch 2, {delay:.2f} s after the first checkpoint (this run {speed:.2f}x the reference's time)"
        job.wait(timeout=30)
    finally:
        job.cleanup()
    wait_gone(d, timeout=30)  # the fine-tune job's controller and tasks went with the group
    msg = f"seed {SEED}, point {point}: killed {where}"
    if finetune:
        msg += f" (fine-tune checkpoint {'present' if (d / 'finetune' / 'checkpoint.pt').exists() else 'absent'})"

    # the run file opens, holds every stage seen complete before the kill, each identical to the reference
    from hpcprune.store import RunFile

    RunFile(str(d / "run.h5")).check()
    after = snapshot(d / "run.h5")
    done, st = read_done(d / "run.h5")
    assert watcher.seen_stages <= set(done), f"{msg}: stages lost: {watcher.seen_stages - set(done)}"
    for stage in done:
        keys = [k for k in stage_keys(ref, stage) if not k.endswith("/history")]
        assert_same(after, ref, keys, f"{msg}: stage {stage}")
    if st is not None and "sensitivity" not in done:  # a partial grid: its finished cells are right
        cells = st == 1
        assert watcher.seen_cells is None or not (watcher.seen_cells & ~cells).any(), f"{msg}: cells lost"
        np.testing.assert_allclose(after["sensitivity/loss"][cells], ref["sensitivity/loss"][cells], atol=1e-6)
    with h5py.File(d / "run.h5") as f:
        assert f.attrs["status"] == "running", msg  # killed: nobody could write failed
    stopped_in = {"sensitivity": "sensitivity", "prune": "pruned", "finetune-start": "final", "finetune-epoch2": "final"}.get(point)
    if stopped_in:
        assert stopped_in not in done, f"{msg}: the kill came after the stage it aimed at"
    if point.startswith("write"):
        assert os.path.exists(d / "run.h5.tmp"), msg

    # a rerun finishes with the uninterrupted run's numbers
    p = ok(run(sweep_cmd(d, *cfg), timeout=400))
    final = snapshot(d / "run.h5")
    assert final["@status"] == "complete", msg
    assert not os.path.exists(d / "run.h5.tmp"), msg
    for stage in STAGES:
        keys = [k for k in stage_keys(ref, stage) if not k.endswith("/history")]
        assert_same(final, ref, keys, f"{msg}: rerun, stage {stage}")
    # fine-tune history: every column but the epoch's seconds
    np.testing.assert_allclose(final["finetune/history"][:, :5], ref["finetune/history"][:, :5], rtol=1e-5, atol=1e-6,
                               err_msg=msg)
    resumed = re.search(r"resuming .* \(done: (.*)\)", p.stderr)
    assert resumed, p.stderr[-2000:]
    msg += f"; rerun resumed with done: {resumed.group(1)}"
    if point == "finetune-epoch2":  # the new fine-tune job went on from the first epoch's checkpoint
        logs = "".join(open(f).read() for f in glob.glob(str(d / "finetune" / "submitit" / "*" / "*_0_log.out")))
        assert "1 of 2 epochs done" in logs, msg
        msg += ", fine-tune resumed from its checkpoint"
    print(msg)


def test_sigterm_in_sensitivity_keeps_the_done_cells(tmp_path, dense_ckpt, references):
    """SIGTERM (Slurm's time limit, scancel, a workflow manager) during the sensitivity grid, with
    flushes far apart (sensitivity.flush_s=60): the cells done so far are written before the sweep
    stops with one line saying how many; the rerun evaluates the others and ends with the
    uninterrupted run's numbers. (Before, SIGTERM ended the process where it stood: the cells since
    the last flush, here all of them, were lost.)"""
    ref, _ = references(False)
    cfg = ov(config(dense_ckpt), ["sensitivity.flush_s=60"])
    d = tmp_path / "run"
    # the signal after 5 of the 18 cells (sitecustomize.py here): not after a time, which a fast
    # machine finished the whole grid within
    job = Job(sweep_cmd(d, *cfg), tmp_path / "log", env=fault_env(SIGTERM_AFTER_CELLS=5))
    try:
        code = job.wait(timeout=300)
        err = job.stderr()
    finally:
        job.cleanup()
    assert code != 0
    line = [ln for ln in err.splitlines() if ln.startswith("hpcprune: error:")]
    m = re.search(r"stopped: SIGTERM during the sensitivity grid; (\d+) of its (\d+) cells are in the run file", line[-1] if line else "")
    assert m, err[-2000:]
    done, st = read_done(d / "run.h5")
    assert "sensitivity" not in done and st is not None and int((st != 0).sum()) == int(m.group(1)) > 0, m.group(0)
    cells = st == 1
    after = snapshot(d / "run.h5")
    np.testing.assert_allclose(after["sensitivity/loss"][cells], ref["sensitivity/loss"][cells], atol=1e-6)
    ok(run(sweep_cmd(d, *cfg), timeout=400))
    final = snapshot(d / "run.h5")
    for stage in ("sensitivity", "allocation", "pruned", "final"):
        assert_same(final, ref, [k for k in stage_keys(ref, stage) if not k.endswith("/history")], f"rerun, stage {stage}")
