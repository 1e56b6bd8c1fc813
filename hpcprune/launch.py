"""submitit executors from the ``launcher`` config: ``local`` (processes on this node, the default),
``slurm`` (SlurmExecutor) and ``debug`` (in-process, one task)."""
from __future__ import annotations

import contextlib
import os
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
        if cfg.get("srun_args"):
            params["srun_args"] = list(cfg.srun_args)
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
    last = time.monotonic()
    while not job.done():
        time.sleep(1.0)
        if watcher is not None and time.monotonic() - last >= poll_s:
            watcher.update()
            last = time.monotonic()
    try:
        return list(job.results())
    except FailedJobError as e:  # a subclass of UncompletedJobError: first
        raise JobFailed(f"a task raised {_last_error_line(e)}") from e
    except UncompletedJobError as e:
        state = watcher.get_state(job.job_id, mode="force") if watcher is not None else getattr(job, "state", "?")
        raise JobFailed(f"it ended without a result (state {state})") from e


def _last_error_line(e: BaseException) -> str:
    """The exception line of the remote traceback inside submitit's FailedJobError message."""
    text = str(e)
    if "----------------------" in text:
        text = text.split("----------------------")[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
