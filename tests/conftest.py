import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
MPIEXEC = os.path.join(os.path.dirname(PY), "mpiexec")


def pytest_configure(config):
    """Under pytest-xdist (tests/run.sh: -n 2), one torch thread by default in each worker and in what
    it starts: two workers on 2 cores each running two OpenMP threads wait on each other's descheduled
    threads (small batches 10-50x slower). Set before torch is imported; a sweep's ``threads=`` still
    decides its own (the test configs say threads=1)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


# tests/run.sh: --dist loadfile (a file's tests run on one worker, in order: its module fixtures are
# made once, and the Slurm tests share the one cluster one at a time). The longest files first, then
# the other files with slow tests, then the rest: a long file started last would leave one worker idle
# while the other finishes it
_XDIST_FIRST = ("test_slurm.py", "test_kill_resume.py", "test_mpi_sensitivity.py", "test_mpi_faults.py", "test_pipeline.py",
                "test_finetune_faults.py", "test_report.py")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item):
        if item.path.name in _XDIST_FIRST:
            return _XDIST_FIRST.index(item.path.name)
        return len(_XDIST_FIRST) + (0 if item.path in slow_files else 1)

    items[:] = [item for _, item in sorted(enumerate(items), key=lambda p: (rank(p[1]), p[0]))]


# a small, fast configuration of the embedded default (digits + tiny ResNet). One torch thread per
# process: tiny models gain nothing from more, and on a busy machine (xdist's other worker, other jobs)
# OpenMP threads waiting for a descheduled peer make them 10-50x slower
FAST = [
    "threads=1",
    "baseline.epochs=6",
    "finetune.epochs=2",
    "sensitivity.ratios=[0.25,0.5,0.75]",
    "baseline.latency_repeats=3",
]


def sweep_cmd(run_dir, *overrides, ranks=0):
    cmd = [PY, "-m", "hpcprune.sweep", f"hydra.run.dir={run_dir}", *overrides]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    return cmd


def run_sweep(run_dir, *overrides, ranks=0, timeout=300, check=True):
    """Run the real sweep as a subprocess (real mpiexec ranks when ranks > 0)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    p = subprocess.run(sweep_cmd(run_dir, *overrides, ranks=ranks), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"sweep failed ({p.returncode}):\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory):
    """One complete fast single-process run, shared by tests that only read it (a test that resumes it
    works on a copy: copy_run). Under xdist one run for all workers: the first that needs it makes it,
    the others wait for it (a lock in the session's common temporary folder)."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-N/, above each worker's popen-gwK/
    d = shared / "fast_run" / "run"
    with open(shared / "fast_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "fast_run" / "made").exists():
            if d.parent.exists():
                shutil.rmtree(d.parent)  # a failed attempt's leftovers
            d.parent.mkdir()
            run_sweep(d, *FAST)
            (shared / "fast_run" / "made").touch()
    return d


def copy_run(src, dest):
    """A copy of a run directory (run file, weights beside it, .hydra/, logs) to resume or change."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("run.lock", "finetune"))
    return dest


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory):
    """resnet_tiny's dense weights (seeded init) as a state-dict file: runs skip dense training."""
    import torch

    model = default_model()
    path = tmp_path_factory.mktemp("ckpt") / "dense.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def compose(overrides=()):
    """The config ``python -m hpcprune.sweep OVERRIDES`` runs with (the packaged primary config), composed
    in this process: for the checks that need no process."""
    from hydra import compose as hcompose
    from hydra import initialize_config_module

    from hpcprune.sweep import own_target_argv

    with initialize_config_module("hpcprune.conf", version_base=None):
        return hcompose("config", overrides=own_target_argv(list(overrides)))


def default_model():
    """The default model (resnet_tiny) as the packaged config builds it, from seed 0."""
    import torch

    from hpcprune.runs import build_model

    torch.manual_seed(0)
    return build_model(compose().model)


def sweep_in_process(run_dir, *overrides):
    """``Sweep(cfg).run()`` in this process, as the sweep's entry point runs it on one rank (exit code;
    a refusal is printed to stderr as ``hpcprune: error: ...``)."""
    from hpcprune.stages import Sweep
    from hpcprune.world import World

    return Sweep(compose(overrides), World(None), str(run_dir)).run()


def have_mpiexec():
    return os.path.exists(MPIEXEC) or shutil.which("mpiexec") is not None
