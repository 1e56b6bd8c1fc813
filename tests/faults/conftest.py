"""Fault injection: real processes, real signals, real files.

Helpers for tests/faults. Every conftest.py outside a package is imported as the module
``conftest`` (pytest swaps them in sys.modules), so this one also re-exports the parent's helpers:
``from conftest import FAST, run_sweep`` works in tests/ and tests/faults/ alike.
"""
import importlib.util
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "hpcprune_tests_conftest", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conftest.py"))
_parent = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_parent)
ROOT, PY, MPIEXEC, FAST = _parent.ROOT, _parent.PY, _parent.MPIEXEC, _parent.FAST
sweep_cmd, run_sweep, have_mpiexec = _parent.sweep_cmd, _parent.run_sweep, _parent.have_mpiexec
compose, sweep_in_process, copy_run, default_model = _parent.compose, _parent.sweep_in_process, _parent.copy_run, _parent.default_model

HERE = os.path.dirname(os.path.abspath(__file__))

# the embedded default, as small as it goes: the dense weights come from a checkpoint (no training),
# one latency repeat at batch 8, 3 x 6 sensitivity cells, in-process fine-tune of 0 epochs. One torch
# thread: on a shared 2-core machine OpenMP threads that wait for a descheduled peer make small
# batches 10-50x slower (seen: 177 s instead of 5 s for the sensitivity of test_mpi_faults' reference)
LEAN = [
    "threads=1",
    "baseline.latency_repeats=1",
    "baseline.latency_batch=8",
    "sensitivity.ratios=[0.25,0.5,0.75]",
    "launcher=debug",
    "finetune.epochs=0",
    "prune.bn_recalib_batches=2",
    "data.calib_samples=128",
    "prune.round_to=1",  # every cell a real cut (the injected faults count forwards; an all-NaN grid is all cells)
]

# stage attributes that are measured times, not results: they differ between identical runs
VOLATILE = {"latency_ms", "latency_speedup", "latency_kept", "latency_pair_ms", "energy_j_per_sample", "energy_kept", "seconds",
            "wall_s", "updated", "world_size", "job_id",
            "rank_digests", "launcher", "weights_mtime_ns", "weights_sha256"}  # weights: compared by value (snapshot)


# dense_ckpt (resnet_tiny's seeded initial weights as a checkpoint file): tests/conftest.py


def fault_env(**extra):
    """The sweep's environment: tests/faults importable (model ``_target_: faulty.*``), no fault
    switched on unless asked."""
    env = {k: v for k, v in os.environ.items() if k not in ("FAULTY_OFF", "FAULTY_MARK")}
    env["PYTHONPATH"] = HERE
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env=None, timeout=300):
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=env or fault_env(), capture_output=True, text=True, timeout=timeout)
    p.seconds = time.monotonic() - t0
    return p


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT\n{p.stdout[-3000:]}\nSTDERR\n{p.stderr[-5000:]}"
    return p


def error_lines(stderr):
    """The lines a user reads: without progress lines ([hpcprune] ...) and tqdm bars."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("[hpcprune]") and "%|" not in ln]


class Job:
    """A sweep started in its own session (process group), output to files (a full pipe never blocks it)."""

    def __init__(self, cmd, log_dir, env=None):
        os.makedirs(log_dir, exist_ok=True)
        self.out_path, self.err_path = os.path.join(log_dir, "stdout"), os.path.join(log_dir, "stderr")
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env or fault_env(), stdout=self._out, stderr=self._err,
                                     start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._out.flush()

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def stdout(self):
        with open(self.out_path) as f:
            return f.read()

    def cleanup(self):
        if self.alive():
            self.signal_group(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._out.close()
        self._err.close()


def run_procs(run_dir):
    """Live processes of the run in ``run_dir``: its command line names the run directory (the sweep,
    mpiexec, the ranks) or it is a fine-tune task / submitit controller working below it."""
    key = os.path.abspath(str(run_dir))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":  # exited, waiting to be reaped: not running
            continue
        if key in cmd:
            found.append((int(entry), cmd))
    return found


def rank_pid(run_dir, rank):
    """The pid of MPI rank ``rank`` of the run (its environment's PMI_RANK), or None."""
    for pid, cmd in run_procs(run_dir):
        if "hpcprune.sweep" not in cmd or "mpiexec" in cmd.split()[0]:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"PMI_RANK") == str(rank).encode():
            return pid
    return None


def wait_gone(run_dir, timeout):
    """Seconds until no process of the run is left (asserts within ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        left = run_procs(run_dir)
        if not left:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"processes of {run_dir} still alive after {timeout} s: {run_procs(run_dir)}")


def read_done(h5):
    """(complete stages, sensitivity status) of a run file being written, or (None, None) while unreadable."""
    try:
        with h5py.File(h5, "r") as f:
            done = [s for s in f if isinstance(f[s], h5py.Group) and bool(f[s].attrs.get("complete", False))]
            st = f["sensitivity/status"][()] if "sensitivity/status" in f else None
            return done, st
    except (OSError, KeyError):
        return None, None


def snapshot(h5):
    """Every number of the run file by path (``stage/dataset`` and ``stage@attr``), measured times left out."""
    out = {}
    with h5py.File(h5, "r") as f:
        def visit(name, obj):
            for k, v in obj.attrs.items():
                if k not in VOLATILE:
                    out[f"{name}@{k}"] = v
            if isinstance(obj, h5py.Dataset) and not name.endswith(("seconds", "/rank", "prefix_seconds")):
                out[name] = obj[()]
        f.visititems(visit)
        out["@status"] = f.attrs["status"]
        beside = [s for s in ("baseline", "pruned", "final") if s in f and "weights_file" in f[s].attrs]
    # schema 2: the weights files beside the run file, by value as the datasets of schema 1 were
    from hpcprune.store import RunFile, read_weights

    for stage in beside:
        for k, v in read_weights(RunFile(str(h5)), stage).items():
            out[f"{stage}/weights/{k}"] = v.float().numpy() if v.is_floating_point() else v.numpy()
    return out


def assert_same(a, b, keys, what):
    for k in keys:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=f"{what}: {k}")
        elif isinstance(x, (float, np.floating)):
            assert (np.isnan(x) and np.isnan(y)) or abs(x - y) <= 1e-6 + 1e-5 * abs(y), f"{what}: {k}: {x} != {y}"
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f"{what}: {k}")
        else:
            assert x == y, f"{what}: {k}: {x!r} != {y!r}"


def stage_keys(snap, stage):
    return [k for k in snap if k == stage or k.startswith(stage + "/") or k.startswith(stage + "@")]


def ov(*lists):
    """Hydra overrides merged by key, the last value of a key winning (Hydra refuses duplicates)."""
    merged = {}
    for lst in lists:
        for item in lst:
            key = item.split("=", 1)[0]
            merged.pop(key, None)
            merged[key] = item
    return list(merged.values())
