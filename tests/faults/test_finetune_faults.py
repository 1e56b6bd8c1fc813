"""A fine-tune DDP task that dies (launcher=local: a submitit job of 2 processes, gloo): the job
fails, the sweep exits non-zero within a bound with one line naming the fine-tune job, the run file
says ``status=failed`` with that reason, and no process of the run is left."""
import os
import signal
import time

import h5py
import pytest

from conftest import LEAN, Job, error_lines, fault_env, ov, run_procs, sweep_cmd, wait_gone

pytestmark = [pytest.mark.faults, pytest.mark.slow]

BOUND_S = 60  # from the fault to the sweep's exit


def config(dense_ckpt, *extra):
    return ov(LEAN, [f"checkpoint={dense_ckpt}", "launcher=local", "finetune.epochs=2", *extra])


def task_pid(run_dir, rank):
    """pid of the fine-tune job's task ``rank`` (submitit sets SUBMITIT_LOCAL_GLOBALID)."""
    for pid, cmd in run_procs(run_dir):
        if "submitit.core._submit" not in cmd:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"SUBMITIT_LOCAL_GLOBALID={rank}".encode() in env:
            return pid
    return None


def _wait(cond, job, timeout=300, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        assert job.alive(), f"the sweep ended before {what}:\n{job.stderr()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _failed_clearly(job, d, rc, ended):
    """``ended``: seconds from the fault to the sweep's exit."""
    err = job.stderr()
    assert rc not in (0, None), err[-3000:]
    assert ended < BOUND_S, f"the sweep took {ended:.0f} s to end after the fault"
    wait_gone(d, timeout=30)  # controller and the surviving task are gone too
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("hpcprune: error: stage final: RuntimeError: fine-tune job ") and " failed: " in lines[0], lines[0]
    assert f"(logs: {d / 'finetune' / 'submitit'}" in lines[0]
    with h5py.File(d / "run.h5") as f:
        assert f.attrs["status"] == "failed"
        assert f.attrs["status_reason"].startswith("RuntimeError: fine-tune job ")
        assert f["pruned"].attrs["complete"] and "final" not in f
    return lines[0], ended


@pytest.fixture(scope="module")
def raising_task(tmp_path_factory, dense_ckpt):
    """Task 1 (RANK=1) raises in its 3rd training step; the sweep runs to its end."""
    base = tmp_path_factory.mktemp("ft_raise")
    d = base / "run"
    mark = base / "fault_time"
    cfg = config(dense_ckpt, "model=resnet_tiny", "model._target_=faulty.raising_resnet", "+model.rank_var=RANK", "+model.when=train",
                 "+model.fail_after=2")
    job = Job(sweep_cmd(d, *cfg), base / "log", env=fault_env(FAULTY_MARK=mark))
    try:
        rc = job.wait(timeout=400)
        exit_at = time.time()
    finally:
        job.cleanup()
    assert mark.exists(), job.stderr()[-3000:]
    return job, d, rc, exit_at - float(mark.read_text())


def test_task_raising_fails_the_sweep(raising_task):
    job, d, rc, ended = raising_task
    line, ended = _failed_clearly(job, d, rc, ended)
    print(f"ended {ended:.1f} s after the fault: {line}")


def test_task_raising_message_names_the_cause(raising_task):
    job, d, rc, ended = raising_task
    line = error_lines(job.stderr())[0]
    assert "InjectedFault: injected fault on RANK=1" in line, line


def _fault_after_first_checkpoint(tmp_path, dense_ckpt, epochs, fault):
    """A sweep whose fine-tune job gets ``fault(run_dir, job)`` once its first checkpoint exists;
    (job, run_dir, exit code, seconds from the fault to the sweep's exit)."""
    d = tmp_path / "run"
    job = Job(sweep_cmd(d, *config(dense_ckpt, f"finetune.epochs={epochs}")), tmp_path / "log")
    try:
        _wait(lambda: (d / "finetune" / "checkpoint.pt").exists(), job, what="the first fine-tune checkpoint")
        fault(d, job)
        fault_at = time.monotonic()
        rc = job.wait(timeout=BOUND_S + 30)
        ended = time.monotonic() - fault_at
    finally:
        job.cleanup()
    return job, d, rc, ended


def test_task_sigkilled_mid_training(tmp_path, dense_ckpt):
    """SIGKILL of task 1 in the second of 3 epochs (after the first checkpoint)."""
    def kill_task1(d, job):
        pid = task_pid(d, 1)
        assert pid, run_procs(d)
        os.kill(pid, signal.SIGKILL)

    job, d, rc, ended = _fault_after_first_checkpoint(tmp_path, dense_ckpt, 3, kill_task1)
    line, ended = _failed_clearly(job, d, rc, ended)
    print(f"ended {ended:.1f} s after the kill: {line}")


def test_task_sigkilled_before_rendezvous(tmp_path, dense_ckpt):
    d = tmp_path / "run"
    job = Job(sweep_cmd(d, *config(dense_ckpt)), tmp_path / "log")
    try:
        pid = _wait(lambda: task_pid(d, 1), job, what="fine-tune task 1")
        os.kill(pid, signal.SIGKILL)  # it is still importing torch: task 0 waits for it at the rendezvous
        fault_at = time.monotonic()
        try:
            rc = job.wait(timeout=BOUND_S)
        except Exception:
            raise AssertionError(f"the sweep still runs {BOUND_S} s after fine-tune task 1 was killed") from None
        ended = time.monotonic() - fault_at
    finally:
        job.cleanup()
        wait_gone(d, timeout=30)
    _failed_clearly(job, d, rc, ended)


def test_sigterm_of_the_sweep_stops_its_finetune_job(tmp_path, dense_ckpt):
    """SIGTERM to the sweep process alone (a workflow manager's kill) while its fine-tune job trains:
    the job's tasks go with it (no orphan keeps training into the run directory), the sweep exits
    non-zero with one line, and the run file says failed, and why."""
    def terminate_sweep(d, job):
        assert task_pid(d, 0) and task_pid(d, 1), run_procs(d)
        os.kill(job.pid, signal.SIGTERM)

    job, d, rc, ended = _fault_after_first_checkpoint(tmp_path, dense_ckpt, 200, terminate_sweep)
    line, ended = _failed_clearly(job, d, rc, ended)
    assert "stopped: the sweep got SIGTERM" in line, line
    print(f"ended {ended:.1f} s after SIGTERM: {line}")
