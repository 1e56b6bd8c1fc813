"""Two sweeps in one run directory; a lock left by a killed sweep; output directories that cannot
take the run: under a regular file, read-only, full, too small, filling up during the run."""
import os
import signal
import subprocess
import time

import h5py
import pytest

from conftest import LEAN, Job, error_lines, ok, ov, run, sweep_cmd

pytestmark = pytest.mark.faults


def config(dense_ckpt, *extra):
    return ov(LEAN, [f"checkpoint={dense_ckpt}", "sensitivity.batch_size=4", *extra])


def _wait(cond, job, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        assert job.alive(), f"the sweep ended before {what}:\n{job.stderr()[-3000:]}"
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _holds_lock(d, job):
    try:
        return f"pid {job.pid} " in (d / "run.lock").read_text()
    except OSError:
        return False


def _status_is(d, status):
    try:
        with h5py.File(d / "run.h5", "r") as f:
            return f.attrs["status"] == status
    except (OSError, KeyError):
        return False


# ---- the run directory lock -------------------------------------------------------------------
@pytest.mark.slow
def test_second_sweep_refused_at_once(tmp_path, dense_ckpt):
    d = tmp_path / "run"
    cfg = config(dense_ckpt)
    first = Job(sweep_cmd(d, *cfg), tmp_path / "first")
    try:
        _wait(lambda: _holds_lock(d, first), first, what="the first sweep's lock")
        # stopped while it holds the lock: it is still there however long the second sweep takes to start
        first.signal_group(signal.SIGSTOP)
        try:
            second = run(sweep_cmd(d, *cfg), timeout=60)
            still_running = first.alive()
        finally:
            first.signal_group(signal.SIGCONT)
        rc = first.wait(timeout=300)
    finally:
        first.cleanup()
    assert second.returncode != 0
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and f"run directory {d} is in use by pid {first.pid}" in lines[0], second.stderr[-2000:]
    assert "resuming" not in second.stderr
    assert second.seconds < 30 and still_running, f"the second sweep took {second.seconds:.1f} s"
    assert rc == 0, first.stderr()[-3000:]
    with h5py.File(d / "run.h5") as f:  # the first sweep was not disturbed
        assert f.attrs["status"] == "complete" and f.attrs["status_reason"] == ""


@pytest.mark.slow
def test_lock_of_killed_sweep_does_not_block(tmp_path, dense_ckpt):
    d = tmp_path / "run"
    cfg = config(dense_ckpt)
    job = Job(sweep_cmd(d, *cfg), tmp_path / "killed")
    try:
        _wait(lambda: _holds_lock(d, job) and "stage baseline:" in (d / "sweep.log").read_text(), job,
              what="the baseline")
        job.signal_group(signal.SIGSTOP)  # no race between the check and the kill: it cannot finish meanwhile
        assert job.alive() and not _status_is(d, "complete"), "the sweep finished before it could be killed"
        job.signal_group(signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        job.cleanup()
    assert f"pid {job.pid} " in (d / "run.lock").read_text()  # the file stays; the flock died with the process
    p = ok(run(sweep_cmd(d, *cfg)))
    assert "resuming" in p.stderr
    with h5py.File(d / "run.h5") as f:
        assert f.attrs["status"] == "complete"


# ---- output directories that cannot take the run ----------------------------------------------
def _refused_early(p, needle, d):
    assert p.returncode != 0
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("hpcprune: error:") and needle in lines[0], p.stderr[-3000:]
    assert not os.path.exists(os.path.join(d, "run.h5")), "a run file was written"
    assert p.seconds < 60


def test_run_dir_under_a_regular_file(tmp_path, dense_ckpt):
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a directory\n")
    d = blocker / "run"
    p = run(sweep_cmd(d, *config(dense_ckpt)))
    _refused_early(p, f"hydra.run.dir={d}: {blocker} is not a directory", d)
    assert blocker.read_text() == "a file, not a directory\n"


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro=False) -> a fresh tmpfs under tmp_path; skipped where mounting is not permitted."""
    mounted = []

    def mount(size, ro=False):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (mount -t tmpfs: {p.stderr.strip() or p.returncode})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(where, leave):
    """Fill the file system of ``where`` until ``leave`` bytes are free."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    with open(os.path.join(where, "filler"), "wb") as f:
        f.write(b"\0" * max(0, free - leave))
        f.flush()
        os.fsync(f.fileno())


def test_read_only_file_system(tmpfs, dense_ckpt):
    fs = tmpfs("1m", ro=True)
    d = fs / "run"
    p = run(sweep_cmd(d, *config(dense_ckpt)))
    _refused_early(p, f"hydra.run.dir={d}: {fs} is on a read-only file system", d)


def test_full_disk(tmpfs, dense_ckpt):
    fs = tmpfs("1m")
    _fill(fs, 0)
    d = fs / "run"
    p = run(sweep_cmd(d, *config(dense_ckpt)))
    _refused_early(p, f"hydra.run.dir={d}: no space left on the file system of {fs}", d)


def test_too_little_space_for_the_run(tmpfs, dense_ckpt):
    """Room for Hydra's files and the log, not for the run file's weights: refused before any compute."""
    fs = tmpfs("3m")
    d = fs / "run"
    p = run(sweep_cmd(d, *config(dense_ckpt)))
    _refused_early(p, "MiB free on its file system, the run needs about", d)
    assert "dense:" not in p.stderr  # not even the baseline was measured


@pytest.mark.slow
def test_disk_fills_during_the_run(tmpfs, dense_ckpt):
    """The disk fills up after the baseline (another job's files) leaving room for a copy of the run
    file and the small stages, not for the pruned weights: the failing write is one clean error
    naming the run file, the run file keeps its finished stages, and after space is freed a rerun
    completes. (With HDF5 writing to the full disk itself, this ended in a segfault.)"""
    fs = tmpfs("8m")
    d = fs / "run"
    cfg = config(dense_ckpt)
    job = Job(sweep_cmd(d, *cfg), fs.parent / "fill-log")
    try:
        _wait(lambda: "stage baseline:" in (d / "sweep.log").read_text() if (d / "sweep.log").exists() else False,
              job, what="the baseline")
        job.signal_group(signal.SIGSTOP)  # fill the disk while the sweep stands still
        _fill(fs, os.path.getsize(d / "run.h5") + 200 * 1024)  # hpcprune 0.1.0 segfaulted here
        job.signal_group(signal.SIGCONT)
        rc = job.wait(timeout=120)
    finally:
        job.cleanup()
    err = job.stderr()
    assert rc == 1, f"exit {rc} (-11: segfault):\n{err[-3000:]}"
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    # whichever write meets the full disk first: the run file, or the pruned weights beside it
    assert (f"cannot write the run file {d / 'run.h5'} (No space left on device); its previous version is intact" in lines[0]
            or f"cannot write the weights file {d / 'pruned.safetensors'} (No space left on device); the run file is intact"
            in lines[0]), lines[0]
    with h5py.File(d / "run.h5") as f:
        for stage in ("baseline", "groups", "sensitivity", "allocation"):
            assert f[stage].attrs["complete"], stage
        assert "pruned" not in f
        # "failed" with the reason when that smaller write still fits, else "running" (killed-like)
        assert f.attrs["status"] == "running" or (f.attrs["status"] == "failed" and "No space left" in f.attrs["status_reason"])
    os.remove(fs / "filler")
    p = ok(run(sweep_cmd(d, *cfg)))
    assert "resuming" in p.stderr
    with h5py.File(d / "run.h5") as f:
        assert f.attrs["status"] == "complete"
