"""submitit executors from the ``launcher`` config: ``local`` (processes on this node, the default),
``slurm`` (SlurmExecutor) and ``debug`` (in-process, one task)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from .world import clean_env

LAUNCHERS = ("local", "slurm", "debug")


@contextlib.contextmanager
def _mpi_free_environ() -> Iterator[None]:
    """Submit with the MPI launcher's variables removed: the job's processes inherit os.environ."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(clean_env(saved))
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


def results(job: Any) -> list[Any]:
    """Every task's return value (raises submitit's FailedJobError / UncompletedJobError)."""
    return list(job.results())
