"""Where the runs of one sweep meet (the cache directory, the multirun's directory), the slots
that hold a local multirun to its machine's CPUs, and what its points came to. No torch import: a point takes its slot before it
loads anything heavy (twelve points importing torch at once slowed the running ones)."""
from __future__ import annotations

import fcntl
import logging
import os
import time
from typing import Any

log = logging.getLogger("hpcprune.stages")


def shared_dirs(cfg: Any, run_dir: str) -> tuple[str | None, str | None]:
    """(the cache directory, or None; the multirun directory this run belongs to, or None)."""
    cache = str(cfg.cache_dir) if cfg.get("cache_dir") else None
    parent = os.path.dirname(os.path.abspath(run_dir))
    multirun = parent if os.path.isfile(os.path.join(parent, "multirun.yaml")) else None
    return cache, multirun


class LocalSlot:
    """One of ``n`` run slots of a multirun whose points are processes on one machine (Hydra's
    ``submitit_local`` launcher starts every point at once): :meth:`acquire` waits, sleeping, until
    fewer than ``n`` points of the sweep run, so that ``n`` points share the CPUs instead of all of
    them time-slicing every core. Twelve one-thread points on 2 cores each took 3-5x the CPU
    seconds of the same point alone, and the sweep as a whole
    ran slower than the points one after the other. ``n`` files ``.hpcprune-slot-<i>.lock`` in the
    multirun directory, held with ``flock`` (the operating system drops a dead point's slot)."""

    def __init__(self, multirun: str, n: int) -> None:
        self.paths = [os.path.join(multirun, f".hpcprune-slot-{i}.lock") for i in range(max(1, n))]
        self.fh: Any = None

    def acquire(self, poll_s: float = 0.5) -> "LocalSlot":
        t0, said = time.monotonic(), None
        while True:
            for path in self.paths:
                fh = open(path, "a+")
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self.fh = fh
                    if said is not None:
                        log.info("multirun: a slot is free after %.0f s (%s)", time.monotonic() - t0, path)
                    return self
                except BlockingIOError:
                    fh.close()
            now = time.monotonic()
            if said is None or now - said >= 60:
                log.info("multirun: %d point(s) of this sweep are running on this machine, as many as local_parallelism "
                         "allows: waiting for one to end (%.0f s)", len(self.paths), now - t0)
                said = now
            time.sleep(poll_s)

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def local_slots(cfg: Any, run_dir: str, cores: int) -> int:
    """How many points of a multirun on the local submitit launcher run at once: ``local_parallelism``,
    else (0) this machine's ``cores`` divided by the CPUs a point uses: ``threads`` (0 = every core, so
    one point at a time, unless ``OMP_NUM_THREADS`` caps it), times ``launcher.tasks`` when its
    fine-tune is a local DDP job (those processes run on this machine too, and DDP ranks that share a
    core wait on each other's all-reduce at every step). At least 1."""
    n = int(cfg.get("local_parallelism", 0) or 0)
    if n > 0:
        return n
    from .world import omp_cap  # no torch

    threads = int(cfg.threads) if int(cfg.threads) > 0 else omp_cap(cores)  # 0: every core, unless capped
    launcher = cfg.get("launcher") or {}
    tasks = int(launcher.get("tasks", 1) or 1) if launcher.get("name") == "local" else 1
    return max(1, cores // (threads * max(1, tasks)))


def local_slot(cfg: Any, run_dir: str, cores: int) -> LocalSlot | None:
    """The slot this run must hold (:class:`LocalSlot`), when it is a point of a multirun run as a
    local submitit job (``SUBMITIT_EXECUTOR=local``); None otherwise (Hydra's basic launcher runs the
    points one after the other; on Slurm the scheduler shares the nodes)."""
    _, multirun = shared_dirs(cfg, run_dir)
    if multirun is None or os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return None
    return LocalSlot(multirun, local_slots(cfg, run_dir, cores))


EXIT_FILE = ".hpcprune-exit"  # a multirun point's exit status, written by the point's process when it ends


def record_exit(run_dir: str, rc: int) -> None:
    """Write a multirun point's exit status into its run directory (:func:`sweep_outcome` reads it)."""
    try:
        with open(os.path.join(run_dir, EXIT_FILE), "w") as f:
            f.write(f"{int(rc)}\n")
    except OSError:  # an unwritable directory: its point was refused, and has no run file of this invocation
        pass


def sweep_outcome(sweep_dir: str, since: float) -> tuple[list[str], list[str]]:
    """(completed, failed) run directories of the multirun in ``sweep_dir`` whose points started at
    or after ``since`` (their sweep.log): failed = a non-zero exit status of this invocation (a point
    refused on a run file of an earlier, different config, which says ``complete``), no run file, or
    one whose status is not complete."""
    import h5py

    done: list[str] = []
    failed: list[str] = []
    for d in sorted(os.listdir(sweep_dir) if os.path.isdir(sweep_dir) else [], key=lambda n: (len(n), n)):
        path = os.path.join(sweep_dir, d)
        logfile = os.path.join(path, "sweep.log")
        if not os.path.isfile(logfile) or os.path.getmtime(logfile) < since:
            continue
        status = ""
        exit_file = os.path.join(path, EXIT_FILE)
        if os.path.isfile(exit_file) and os.path.getmtime(exit_file) >= since:
            try:
                with open(exit_file) as f:
                    if int(f.read().strip() or 0):
                        failed.append(path)
                        continue
            except (OSError, ValueError):
                pass
        try:
            with h5py.File(os.path.join(path, "run.h5"), "r") as f:
                status = str(f.attrs.get("status", ""))
        except OSError:  # no run file: refused before it was made
            pass
        (done if status == "complete" else failed).append(path)
    return done, failed
