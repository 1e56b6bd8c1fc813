"""submitit executors from the ``launcher`` config: ``local`` (processes on this node, the default),
``slurm`` (SlurmExecutor) and ``debug`` (in-process, one task)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from typing import Any, Iterator

from .world import clean_env

LAUNCHERS = ("local", "slurm", "debug")

# variables of the Slurm job/step the sweep runs in (srun sets them in every rank). sbatch exports
# the submitting environment into the new job, so without this the fine-tune job's batch script and
# its srun would see the sweep's SLURM_STEP_*, SLURM_MPI_TYPE, SLURM_DISTRIBUTION, SLURM_MEM_PER_CPU,
# SLURM_CPU_BIND, SLURM_ARRAY_* ... (srun reads many of them as defaults; submitit reads
# SLURM_ARRAY_JOB_ID to name its files). SLURM_CONF stays: it says which cluster to talk to.
_SLURM_ENV_PREFIXES = ("SLURM_", "SLURMD_", "SRUN_")
_SLURM_ENV_KEEP = ("SLURM_CONF",)
# a torch.distributed rendezvous inherited from the sweep's environment would override the job's own
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def job_env(env: dict[str, str]) -> dict[str, str]:
    """The environment a fine-tune job is submitted with: ``env`` less the MPI launcher's, the
    enclosing Slurm job's and torch.distributed's variables."""
    return {
        k: v
        for k, v in clean_env(env).items()
        if k not in _DDP_ENV and (k in _SLURM_ENV_KEEP or not k.startswith(_SLURM_ENV_PREFIXES))
    }


@contextlib.contextmanager
def _mpi_free_environ() -> Iterator[None]:
    """Submit with the MPI launcher's and the enclosing Slurm job's variables removed (see
    ``job_env``): the job's processes inherit os.environ."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(job_env(saved))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def executor(cfg: Any, folder: str) -> Any:
    import submitit

    name = cfg.name
    if name == "debug":
        ex = submitit.DebugExecutor(folder=folder)
        return ex
    if name == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(tasks_per_node=int(cfg.tasks), nodes=1, timeout_min=int(cfg.timeout_min))
        return ex
    if name == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(cfg.max_requeue))
        params: dict[str, Any] = dict(
            nodes=int(cfg.nodes),
            ntasks_per_node=int(cfg.tasks_per_node),
            cpus_per_task=int(cfg.cpus_per_task),
            time=int(cfg.timeout_min),
            signal_delay_s=int(cfg.signal_delay_s),
            job_name=str(cfg.get("job_name") or "hpcprune-finetune"),
        )
        if cfg.gpus_per_node:
            params["gpus_per_node"] = int(cfg.gpus_per_node)
        for key in ("partition", "account", "qos", "constraint", "mem"):
            if cfg.get(key):
                params[key] = str(cfg[key])
        # one task failing ends the step: without it, the other DDP tasks wait in a collective (or the
        # rendezvous) until their timeout, holding the allocation for half an hour
        srun_args = [str(a) for a in (cfg.get("srun_args") or [])]
        if not any(a.startswith(("--kill-on-bad-exit", "-K")) for a in srun_args):
            srun_args.insert(0, "--kill-on-bad-exit=1")
        params["srun_args"] = srun_args
        if cfg.get("additional_parameters"):
            params["additional_parameters"] = dict(cfg.additional_parameters)
        ex.update_parameters(**params)
        return ex
    raise ValueError(f"launcher={name!r} is not a known launcher (choose from {', '.join(LAUNCHERS)})")


def num_tasks(cfg: Any) -> int:
    if cfg.name == "debug":
        return 1
    if cfg.name == "local":
        return int(cfg.tasks)
    return int(cfg.nodes) * int(cfg.tasks_per_node)


def submit(cfg: Any, folder: str, fn: Any) -> Any:
    ex = executor(cfg, folder)
    with _mpi_free_environ():
        return ex.submit(fn)


class JobFailed(RuntimeError):
    """The job ended without results; the message's first line says how."""


def results(job: Any, poll_s: float = 10.0) -> list[Any]:
    """Every task's return value; raises JobFailed when the job fails or ends without results.

    A Slurm job that dies without writing a result (scancel, time limit, node failure, OOM) is only
    seen through sacct. submitit alone asks sacct ever more rarely (half the job's age, up to every
    10 minutes), so a job cancelled after an hour would go unnoticed for half an hour: here sacct is
    asked every ``poll_s`` seconds, and the failure is raised within about ``poll_s`` + 15 s.
    """
    from submitit.core.utils import FailedJobError, UncompletedJobError

    watcher = getattr(job, "watcher", None) if type(job).__name__ == "SlurmJob" else None
    tasks = _LocalTasks(job) if type(job).__name__ == "LocalJob" else None
    last = time.monotonic()
    with _sigterm_raises():
        try:
            while not job.done():
                time.sleep(1.0)
                if watcher is not None and time.monotonic() - last >= poll_s:
                    watcher.update()
                    last = time.monotonic()
                if tasks is not None:
                    dead = tasks.died_without_result()
                    if dead is not None:  # the others would wait for it at the rendezvous (30 min) or forever
                        tasks.kill_live()  # the controller then ends by itself (job.cancel's SIGINT prints a traceback)
                        raise JobFailed(f"task {dead[0]} (pid {dead[1] or '?'}) died without a result (killed or crashed)")
        except _SigTerm:
            # the sweep is being stopped (kill, a scheduler's time limit): its job goes with it. Left
            # running, local tasks would be orphans, and a resumed sweep would submit a second job
            # next to a Slurm job still writing the same checkpoint
            if tasks is not None:
                tasks.kill_live()
            else:
                with contextlib.suppress(Exception):
                    job.cancel(check=False)
            raise JobFailed("stopped: the sweep got SIGTERM, and cancelled the job") from None
    try:
        return list(job.results())
    except FailedJobError as e:  # a subclass of UncompletedJobError: first
        raise JobFailed(f"a task raised {_root_cause(job) or _last_error_line(e)}") from e
    except UncompletedJobError as e:
        state = watcher.get_state(job.job_id, mode="force") if watcher is not None else getattr(job, "state", "?")
        raise JobFailed(f"it ended without a result (state {state})") from e


class _SigTerm(Exception):
    pass


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises _SigTerm in the main thread while the block runs (elsewhere: no change)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _SigTerm()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _last_error_line(e: BaseException) -> str:
    """The exception line of the remote traceback inside submitit's FailedJobError message."""
    text = str(e)
    if "----------------------" in text:
        text = text.split("----------------------")[1]
    return _exception_line(text) or type(e).__name__


# "RuntimeError: ...", "torch.OutOfMemoryError: ...", "KeyboardInterrupt": where a traceback names its exception
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)\b")


def _exception_line(text: str) -> str | None:
    """The line of a formatted traceback that names its exception (the last such line: the one
    raised, after any "During handling ..." chain), else the last line; None for no text. A message
    of several lines (DDP's unused-parameter error ends with advice) is named by its first line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if _EXC_LINE.match(ln)]
    return (named or lines or [None])[-1]


# what a DDP task reports when another task died or raised first: not the cause
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def _root_cause(job: Any) -> str | None:
    """The first task error that is not a consequence of another task's (a lost DDP peer)."""
    from submitit.core import utils

    errors = []
    for k in range(job.num_tasks):
        path = job.task(k).paths.result_pickle
        try:
            outcome, value = utils.pickle_load(path)
        except Exception:
            continue
        if outcome == "error":
            errors.append(_exception_line(str(value)) or "an error")
    causes = [e for e in errors if not any(p in e for p in _PEER_LOST)]
    return (causes or errors or [None])[0]


class _LocalTasks:
    """The processes of a submitit LocalJob's tasks (children of its controller process), to see a
    task that ends without writing a result (killed, crashed): the controller waits for every task,
    and the others wait for the dead one at the DDP rendezvous (30 minutes) or in a collective.
    The controller starts all tasks at once, so once one runs, a task id without a live process and
    without a result, twice in a row (a poll a second), has died."""

    def __init__(self, job: Any) -> None:
        self.job = job
        proc = getattr(job, "_process", None)
        self.controller = proc.pid if proc is not None else None
        self.pids: dict[int, int] = {}  # task id -> pid, as seen
        self.strikes = 0

    def _live(self) -> dict[int, int]:
        try:
            with open(f"/proc/{self.controller}/task/{self.controller}/children") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            return {}
        live = {}
        for pid in children:
            if not _alive(pid):
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                live[int(env[b"SUBMITIT_LOCAL_GLOBALID"])] = pid
            except (OSError, KeyError, ValueError):
                continue
        return live

    def kill_live(self, wait_s: float = 30.0) -> None:
        for pid in self._live().values():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while not self.job.done() and time.monotonic() < deadline:
            time.sleep(0.2)

    def died_without_result(self) -> tuple[int, int | None] | None:
        if self.controller is None:
            return None
        live = self._live()
        self.pids.update(live)
        if not live:  # not started yet, or every task has ended
            return None
        missing = [k for k in range(self.job.num_tasks)
                   if k not in live and not self.job.task(k).paths.result_pickle.exists()]
        self.strikes = self.strikes + 1 if missing else 0
        if self.strikes >= 2:
            return missing[0], self.pids.get(missing[0])
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
