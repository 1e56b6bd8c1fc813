"""Real Slurm: `sbatch slurm/sweep.sbatch` on a running cluster (the one-node dev cluster:
`slurm/dev_cluster.sh start`). srun starts 2 MPI ranks, the fine-tune is a second Slurm job (submitit)
of 2 DDP tasks; a requeued fine-tune job resumes, a cancelled one fails the sweep clearly.

The tests marked ``slurm`` are skipped when `scontrol ping` gets no answer. The others check the
pieces that need no cluster (the environment a fine-tune job is submitted with, the sbatch script's
defaults) and always run.
"""
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid

import h5py
import numpy as np
import pytest

from conftest import FAST, ROOT

SCRIPT = os.path.join(ROOT, "slurm", "sweep.sbatch")
STATE = os.environ.get("HPCPRUNE_SLURM_STATE", "/var/tmp/hpcprune-slurm")
# every sweep here: the small fast config, fine-tune as a Slurm job of 2 tasks; sbatch gives 2 ranks
OVERRIDES = [*FAST, "launcher=slurm", "launcher.tasks_per_node=2"]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def slurm_env():
    """os.environ for the Slurm commands: the dev cluster's SLURM_CONF when no system config is
    there, and the test's own interpreter's venv for the job when it is not the repository's."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    dev_conf = os.path.join(STATE, "etc", "slurm.conf")
    if "SLURM_CONF" not in env and not os.path.exists("/etc/slurm/slurm.conf") and os.path.exists(dev_conf):
        env["SLURM_CONF"] = dev_conf
    if os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        env["HPCPRUNE_VENV"] = sys.prefix
    return env


def _slurm_down_reason():
    if shutil.which("scontrol") is None:
        return "no scontrol on PATH"
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30, env=slurm_env())
    except subprocess.TimeoutExpired:
        return "scontrol ping timed out"
    if "is UP" not in p.stdout:
        lines = [ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip().strip("*")]
        return lines[0] if lines else "no answer"
    return None


_DOWN = _slurm_down_reason()


def needs_slurm(test):
    """On the cluster: skipped without one, and slow. (Under xdist this file runs on one worker, one test
    at a time: slurm_run is made once, and the dev cluster's 8 CPUs hold the jobs of one test.)"""
    test = pytest.mark.skipif(_DOWN is not None, reason=f"Slurm not running: start it with slurm/dev_cluster.sh start ({_DOWN})")(test)
    return pytest.mark.slurm(pytest.mark.slow(test))


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, env=slurm_env(), **kw)


def job_state(job_id):
    """The job's state from accounting (the newest record), '' while unknown."""
    p = run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", str(job_id)], timeout=30)
    lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def wait_job(job_id, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        state = job_state(job_id)
        if state.split(" ")[0] in TERMINAL:
            return state
        time.sleep(1)
    held = queue()
    run(["scancel", str(job_id)])
    raise AssertionError(f"job {job_id} did not end within {timeout} s (state {job_state(job_id)}); the queue:\n{held}")


_SUBMITTED = []  # (job name, run directory or None) of each sweep job: see _cancel_leftovers


def submit(out_dir, *overrides, run_dir=None, wait=False, timeout=600):
    """sbatch slurm/sweep.sbatch from the repository root; (job id, sbatch's CompletedProcess)."""
    name = f"hpcprune-test-{uuid.uuid4().hex[:8]}"
    cmd = ["sbatch", "--parsable", "--ntasks=2", f"--output={out_dir}/slurm-%j.out", f"--job-name={name}"]
    if wait:
        cmd.append("--wait")
    if run_dir:
        overrides = (*overrides, f"hydra.run.dir={run_dir}")
    _SUBMITTED.append((name, run_dir))
    try:
        p = run([*cmd, SCRIPT, *overrides], cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"sbatch --wait: the job did not end within {timeout} s") from e
    m = re.match(r"(\d+)", p.stdout.strip())
    assert m, f"sbatch printed no job id:\n{p.stdout}\n{p.stderr}"
    return m.group(1), p


@pytest.fixture(autouse=True)
def _cancel_leftovers():
    """A failed test leaves no sweep or fine-tune job of its own in the queue."""
    yield
    if _DOWN is not None:
        return
    queued = dict(ln.split() for ln in run(["squeue", "-h", "-o", "%i %j"], timeout=30).stdout.splitlines() if ln.strip())
    leftovers = set()
    for name, run_dir in _SUBMITTED:
        jobs = [j for j, n in queued.items() if n == name]
        dirs = [run_dir] if run_dir else [os.path.join(ROOT, "outputs", f"slurm-{j}") for j in jobs]
        leftovers.update(jobs, filter(None, (finetune_job_id(d) for d in dirs)))
    _SUBMITTED.clear()
    leftovers &= set(queued)
    if leftovers:
        run(["scancel", *sorted(leftovers)], timeout=30)


def job_output(out_dir, job_id):
    path = os.path.join(out_dir, f"slurm-{job_id}.out")
    return open(path).read() if os.path.exists(path) else ""


def queue():
    """squeue's view (every job, with why a pending one waits): a timed-out wait says what held it."""
    return run(["squeue", "-o", "%i %j %T %R %C"], timeout=30).stdout.strip()


def wait_for(what, fn, timeout, poll=0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = fn()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout} s; the queue:\n{queue()}")


def finetune_job_id(run_dir):
    """The fine-tune job's id, from the submitit folder the sweep submitted it from."""
    pkls = glob.glob(os.path.join(run_dir, "finetune", "submitit", "*", "*_submitted.pkl"))
    return os.path.basename(pkls[0]).split("_")[0] if pkls else None


def checkpoint_epoch(run_dir):
    import torch

    path = os.path.join(run_dir, "finetune", "checkpoint.pt")
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
    except (OSError, EOFError, RuntimeError, KeyError):  # not there yet, or being replaced
        return None


def without_finetune(src_run_dir, dest):
    """A copy of a finished run that stops after pruning: the sweep resumes it at the fine-tune."""
    os.makedirs(dest)
    for name in os.listdir(src_run_dir):  # the run file and the weights beside it (schema 2)
        if name == "run.h5" or name.endswith(".safetensors"):
            shutil.copy(os.path.join(src_run_dir, name), os.path.join(dest, name))
    with h5py.File(os.path.join(dest, "run.h5"), "a") as f:
        for g in ("finetune", "final"):
            del f[g]
        f.attrs["status"] = "running"
    return str(dest)


# ---- without a cluster ---------------------------------------------------------------------------
def test_job_env_drops_enclosing_job_and_mpi_variables():
    from hpcprune.launch import job_env

    env = {"PATH": "/bin", "HOME": "/root", "SLURM_CONF": "/x/slurm.conf", "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0",
           "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "4", "SLURM_MEM_PER_CPU": "100", "SLURM_MPI_TYPE": "pmi2",
           "SLURMD_NODENAME": "n1", "SRUN_DEBUG": "3", "PMI_RANK": "0", "PMI_FD": "5", "PMI_SIZE": "2",
           "MASTER_PORT": "29500", "SBATCH_ACCOUNT": "proj"}
    assert job_env(env) == {"PATH": "/bin", "HOME": "/root", "SLURM_CONF": "/x/slurm.conf", "SBATCH_ACCOUNT": "proj"}


@pytest.mark.parametrize("given,expect_launcher,expect_dir", [
    ([], "launcher=slurm", "hydra.run.dir=outputs/slurm-4242"),
    (["launcher=local", "hydra.run.dir=/tmp/mine"], "launcher=local", "hydra.run.dir=/tmp/mine"),
    (["+hydra.run.dir=/tmp/x"], "launcher=slurm", "+hydra.run.dir=/tmp/x"),
])
def test_sbatch_script_defaults(tmp_path, given, expect_launcher, expect_dir):
    """The script outside Slurm, with a stand-in srun that prints its arguments."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/args\n')
    (fake / "srun").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=ROOT,
               HPCPRUNE_VENV=sys.prefix)
    p = subprocess.run(["bash", SCRIPT, "prune.target.macs=0.4", *given], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:4] == ["--mpi=pmi2", "--kill-on-bad-exit=1", "python", "-u"], args
    assert args.count(expect_launcher) == 1 and args.count(expect_dir) == 1, args
    assert sum(a.lstrip("+").startswith(("launcher=", "hydra.run.dir=")) for a in args) == 2, args
    assert "prune.target.macs=0.4" in args


def test_sbatch_script_without_venv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "HPCPRUNE_VENV")}
    env.update(SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=str(tmp_path))
    p = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert p.returncode == 2 and "no virtual environment" in p.stderr, p.stderr


# ---- on a running cluster ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    """One whole sweep through `sbatch --wait slurm/sweep.sbatch`, run directory left to its default
    (outputs/slurm-<jobid> under the submit directory), then moved out of the repository."""
    out = str(tmp_path_factory.mktemp("slurm-a"))
    t0 = time.monotonic()
    job_id, p = submit(out, *OVERRIDES, wait=True, timeout=900)
    seconds = time.monotonic() - t0
    default_dir = os.path.join(ROOT, "outputs", f"slurm-{job_id}")
    run_dir = os.path.join(out, "run")
    if os.path.isdir(default_dir):
        shutil.move(default_dir, run_dir)
    return {"job_id": job_id, "rc": p.returncode, "out": job_output(out, job_id), "run_dir": run_dir,
            "default_dir_used": os.path.isdir(run_dir), "seconds": seconds}


@needs_slurm
def test_sbatch_whole_pipeline(slurm_run):
    r = slurm_run
    print(f"sbatch --wait sweep: {r['seconds']:.1f} s")
    assert r["rc"] == 0, r["out"][-5000:]
    assert r["default_dir_used"], f"no outputs/slurm-{r['job_id']} run directory:\n{r['out'][-3000:]}"
    run_dir = r["run_dir"]
    assert os.path.exists(os.path.join(run_dir, "logs", "rank1.log"))  # rank 1 of srun's step logged there
    with h5py.File(os.path.join(run_dir, "run.h5")) as f:
        assert f.attrs["status"] == "complete", f.attrs["status_reason"]
        assert f.attrs["world_size"] == 2
        assert set(f["sensitivity/rank"][()].ravel()) == {0, 1}
        assert (f["sensitivity/status"][()] == 1).all()
        ft = f["finetune"].attrs
        assert ft["launcher"] == "slurm" and ft["world_size"] == 2
        digests = json.loads(ft["rank_digests"])
        assert len(digests) == 2 and digests[0] == digests[1]
        assert f["finetune/history"].shape == (2, 6)
        ft_job = str(ft["job_id"])
        assert ft_job and ft_job != r["job_id"]
        assert f["final"].attrs["macs_kept"] <= 0.5
    # the fine-tune was its own Slurm job, of 2 tasks, and it completed
    p = run(["sacct", "-n", "-P", "-o", "JobID,JobName,State,NTasks", "-j", ft_job], timeout=30)
    rows = [ln.split("|") for ln in p.stdout.split()]
    assert rows[0][1] == "hpcprune-finetune" and rows[0][2] == "COMPLETED", p.stdout
    assert any(row[0] == f"{ft_job}.0" and row[3] == "2" for row in rows), p.stdout
    assert f"fine-tune job {ft_job}: 2 task(s) on launcher slurm" in r["out"]


@needs_slurm
def test_requeued_finetune_resumes(slurm_run, tmp_path):
    """The fine-tune job is interrupted twice while it trains: by USR2 (what Slurm sends before the
    time limit or on preemption: submitit calls FinetuneJob.checkpoint() and requeues the job) and by
    `scontrol requeue` (killed and restarted with no warning). It resumes from its checkpoint each
    time and ends with the same history and weights as an uninterrupted fine-tune run beside it."""
    assert slurm_run["rc"] == 0, "the whole-pipeline sweep failed"
    epochs = 8  # two interruptions, each after a checkpoint of its own run, and epochs left after both
    over = [*OVERRIDES, f"finetune.epochs={epochs}", "resume.force=true"]
    ref_dir = without_finetune(slurm_run["run_dir"], tmp_path / "reference")
    req_dir = without_finetune(slurm_run["run_dir"], tmp_path / "requeued")
    out = str(tmp_path)
    t0 = time.monotonic()
    ref_job, _ = submit(out, *over, run_dir=ref_dir)
    req_job, _ = submit(out, *over, run_dir=req_dir)

    ft = wait_for("fine-tune job submitted", lambda: finetune_job_id(req_dir), 300)

    def log0():
        logs = glob.glob(os.path.join(req_dir, "finetune", "submitit", "*", f"{ft}_0_log.out"))
        return open(logs[0]).read() if logs else ""

    def resumed():  # epochs done at each resumption, from task 0's log (appended to across restarts)
        return [int(n) for n in re.findall(r"finetune: resuming from \S+: (\d+) of", log0())]

    def requeues():
        p = run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", ft], timeout=30)
        return p.stdout.split().count("REQUEUED")

    interrupted_at = []
    for i, how in enumerate(("USR2", "requeue")):
        def ready():  # a checkpoint written by the current run of the job (after its resumption, if any)
            r, e = resumed(), checkpoint_epoch(req_dir)
            return len(r) == i and e is not None and e >= (r[-1] if r else 0)

        wait_for(f"a checkpoint to interrupt ({how})", ready, 300, poll=0.1)
        epoch = checkpoint_epoch(req_dir)
        assert epoch < epochs - 1, f"the fine-tune was nearly done before it could be interrupted ({how})"
        cmd = ["scancel", "--signal=USR2", ft] if how == "USR2" else ["scontrol", "requeue", ft]
        p = run(cmd, timeout=30)
        assert p.returncode == 0, p.stderr
        interrupted_at.append(epoch)
        wait_for(f"{how}: the job back in the queue", lambda: requeues() == i + 1, 120, poll=0.5)

    for job in (ref_job, req_job):
        state = wait_job(job, 600)
        assert state == "COMPLETED", f"sweep job {job}: {state}\n{job_output(out, job)[-4000:]}"
    print(f"two sweeps (one fine-tune interrupted at epochs {interrupted_at}): {time.monotonic() - t0:.1f} s")

    # restarts seen by Slurm, and by the job: each run resumed after the last checkpoint it saw
    assert requeues() == 2 and job_state(ft) == "COMPLETED"
    assert "Calling checkpoint method" in log0(), log0()[-3000:]  # the USR2 path went through checkpoint()
    assert len(resumed()) == 2 and all(e + 1 <= n < epochs for e, n in zip(interrupted_at, resumed())), (interrupted_at, resumed())

    with h5py.File(os.path.join(ref_dir, "run.h5")) as fa, h5py.File(os.path.join(req_dir, "run.h5")) as fb:
        for f in (fa, fb):
            assert f.attrs["status"] == "complete"
            assert f["finetune/history"].shape == (epochs, 6)
            np.testing.assert_array_equal(f["finetune/history"][:, 0], np.arange(epochs))
        # same numbers as without interruption (seconds, the last column, aside), same final weights
        np.testing.assert_allclose(fb["finetune/history"][:, :5], fa["finetune/history"][:, :5], rtol=0, atol=1e-6)
        assert json.loads(fb["finetune"].attrs["rank_digests"]) == json.loads(fa["finetune"].attrs["rank_digests"])
        assert fb["final"].attrs["metric"] == fa["final"].attrs["metric"]


@needs_slurm
def test_cancelled_finetune_fails_sweep(slurm_run, tmp_path):
    """scancel of the fine-tune job: the sweep job exits non-zero with one clear line within a
    minute, and the run file says failed, and why."""
    assert slurm_run["rc"] == 0, "the whole-pipeline sweep failed"
    run_dir = without_finetune(slurm_run["run_dir"], tmp_path / "run")
    out = str(tmp_path)
    job, _ = submit(out, *OVERRIDES, "finetune.epochs=500", "resume.force=true", run_dir=run_dir)
    ft = wait_for("fine-tune job submitted", lambda: finetune_job_id(run_dir), 300)
    wait_for("first checkpoint", lambda: checkpoint_epoch(run_dir) is not None, 300)
    t0 = time.monotonic()
    assert run(["scancel", ft], timeout=30).returncode == 0
    state = wait_job(job, 120)
    seconds = time.monotonic() - t0
    print(f"scancel -> sweep job ended: {seconds:.1f} s")
    text = job_output(out, job)
    assert state.startswith("FAILED"), f"{state}\n{text[-3000:]}"
    assert seconds < 60, f"the sweep noticed the cancelled fine-tune job only after {seconds:.0f} s"
    errors = [ln for ln in text.splitlines() if ln.startswith("hpcprune: error:")]
    assert len(errors) == 1, text[-3000:]
    assert f"fine-tune job {ft} failed: it ended without a result (state CANCELLED" in errors[0], errors[0]
    with h5py.File(os.path.join(run_dir, "run.h5")) as f:
        assert f.attrs["status"] == "failed"
        assert f"fine-tune job {ft} failed" in f.attrs["status_reason"] and "CANCELLED" in f.attrs["status_reason"]
        assert "finetune" not in f


@needs_slurm
def test_finetune_task_failing_at_rendezvous_ends_the_job(slurm_run, tmp_path):
    """Task 0 of the fine-tune job cannot open the DDP rendezvous (its port is taken): srun ends task 1
    too (--kill-on-bad-exit, which task 1 would otherwise spend in the rendezvous until its 30-minute
    timeout, holding the allocation), the job fails, and the sweep job fails with one line naming it."""
    assert slurm_run["rc"] == 0, "the whole-pipeline sweep failed"
    run_dir = without_finetune(slurm_run["run_dir"], tmp_path / "run")
    out = str(tmp_path)
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        job, _ = submit(out, *OVERRIDES, f"launcher.master_port={port}", "resume.force=true", run_dir=run_dir)
        ft = wait_for("fine-tune job submitted", lambda: finetune_job_id(run_dir), 300)
        wait_for("fine-tune job running", lambda: job_state(ft) not in ("", "PENDING"), 120, poll=0.5)
        t0 = time.monotonic()
        state = wait_job(job, 180)
    seconds = time.monotonic() - t0
    print(f"fine-tune job started -> sweep job ended: {seconds:.1f} s")
    text = job_output(out, job)
    assert state.startswith("FAILED"), f"{state}\n{text[-3000:]}"
    assert job_state(ft).startswith("FAILED"), job_state(ft)
    errors = [ln for ln in text.splitlines() if ln.startswith("hpcprune: error:")]
    assert len(errors) == 1, text[-3000:]
    assert f"fine-tune job {ft} failed" in errors[0], errors[0]
    with h5py.File(os.path.join(run_dir, "run.h5")) as f:
        assert f.attrs["status"] == "failed" and f"fine-tune job {ft} failed" in f.attrs["status_reason"]


@needs_slurm
def test_multirun_points_as_a_slurm_job_array_share_the_dense_model_and_grid(tmp_path):
    """``-m hydra/launcher=submitit_slurm``: Hydra's submitit plugin submits the two points as one job
    array; both tasks run at once (accounting shows their times overlap), one trains the dense model
    and computes the grid, the other copies them from its run file."""
    sweep = tmp_path / "sweep"
    p = run([sys.executable, "-m", "hpcprune.sweep", "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=20",
             "hydra.launcher.cpus_per_task=1", "hydra.launcher.tasks_per_node=1", "threads=1", "launcher=debug",
             "baseline.epochs=1", "finetune.epochs=1", "sensitivity.ratios=[0.3,0.6]", "baseline.latency_repeats=1",
             "sensitivity.bn_recalib_batches=0", "prune.target.macs=0.5,0.7", f"hydra.sweep.dir={sweep}"],
            cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    sources = []
    for i in (0, 1):
        with h5py.File(sweep / str(i) / "run.h5") as f:
            assert f.attrs["status"] == "complete", f.attrs["status_reason"]
            sources.append((str(f["sensitivity"].attrs["source"]), str(f["baseline"].attrs["source"])))
    computed = [i for i, s in enumerate(sources) if s == ("", "")]
    assert len(computed) == 1, sources
    other = str(sweep / str(computed[0]) / "run.h5")
    assert sources[1 - computed[0]] == (other, other)
    array = next(d for d in os.listdir(sweep / ".submitit") if re.fullmatch(r"\d+", d))
    deadline = time.time() + 120  # Hydra has the tasks' results before Slurm's accounting says they ended
    while True:
        q = run(["sacct", "-X", "-n", "-P", "-o", "JobID,Start,End,State", "-j", array], timeout=30)
        rows = [ln.split("|") for ln in q.stdout.split() if "_" in ln.split("|")[0]]
        if (len(rows) == 2 and all(r[3] == "COMPLETED" for r in rows)) or time.time() > deadline:
            break
        time.sleep(2)
    assert len(rows) == 2 and all(r[3] == "COMPLETED" for r in rows), q.stdout
    (s0, e0), (s1, e1) = [(r[1], r[2]) for r in rows]  # ISO times: compare as text
    assert s0 <= e1 and s1 <= e0, rows
