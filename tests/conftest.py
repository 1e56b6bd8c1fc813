import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
MPIEXEC = os.path.join(os.path.dirname(PY), "mpiexec")

# a small, fast configuration of the embedded default (digits + tiny ResNet)
FAST = [
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
    """One complete fast single-process run, shared by tests that only read it."""
    d = tmp_path_factory.mktemp("fast") / "run"
    run_sweep(d, *FAST)
    return d


def have_mpiexec():
    return os.path.exists(MPIEXEC) or shutil.which("mpiexec") is not None
