"""The MPI world: rank, size, device, work split, gather, and ending every rank on any error.

mpi4py is imported only when the process was started by an MPI launcher (``mpiexec``/``srun
--mpi=pmi2``); a plain ``python -m hpcprune.sweep`` is a world of one and never touches MPI.
Waiting ranks never block inside an MPI collective: MPICH busy-polls there and would burn the
cores that the working ranks (or the fine-tune job) need. They post a non-blocking request and
sleep between tests instead.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

from .errors import HpcpruneError

log = logging.getLogger(__name__)

# environment variables that MPI launchers set in every rank they start
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
# prefixes of variables a child process must not inherit from an MPI rank (see clean_env)
_MPI_ENV_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPIR_", "MPICH_", "MPI_", "OMPI_", "I_MPI_", "FI_PROVIDER")


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` without the MPI launcher's variables, for processes started from a rank.

    A process that inherits ``PMI_*`` from rank 0 of ``mpiexec -n 2`` and initialises MPI aborts in
    MPI_Init ("PMI_Init returned -1").
    """
    env = dict(os.environ if env is None else env)
    return {k: v for k, v in env.items() if not k.startswith(_MPI_ENV_PREFIXES)}


class MPIMismatch(HpcpruneError, RuntimeError):
    """The MPI launcher and mpi4py's MPI library disagree on the world size."""



def omp_cap(threads: int) -> int:
    """``threads`` capped by ``OMP_NUM_THREADS`` when it is set (a shared node's user or a job script
    that asked for fewer): what ``threads=0`` resolves to everywhere (ranks, fine-tune tasks, local
    multirun slots)."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(omp)) if omp.isdigit() and int(omp) > 0 else threads

class World:
    """Rank and size of this process; a single-process world when not under an MPI launcher."""

    def __init__(self, comm: Any = None) -> None:
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.local_rank, self.local_size = 0, 1
        self.sharing = 1  # ranks on this node whose CPU sets overlap this rank's (itself included)
        if comm is not None:
            from mpi4py import MPI

            local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
            self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
            cpus = self.cpus()
            self.sharing = sharing(cpus, local.allgather(cpus))
            local.Free()
        self.is_main = self.rank == 0

    @classmethod
    def from_env(cls) -> "World":
        if not launched_by_mpi():
            return cls(None)
        from mpi4py import MPI  # noqa: WPS433 - imported only under an MPI launcher

        world = cls(MPI.COMM_WORLD)
        expected = next((int(os.environ[v]) for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE") if os.environ.get(v, "").isdigit()), None)
        if expected is not None and expected != world.size:
            # e.g. MPICH's mpiexec starting an Open MPI build of mpi4py: every process would be a
            # world of one, all computing everything and racing for the same run directory
            raise MPIMismatch(
                f"the launcher started {expected} ranks but MPI reports a world of {world.size}: mpi4py uses "
                f"another MPI library ({MPI.Get_library_version().splitlines()[0].strip()}) than this mpiexec; "
                "use the mpiexec of that MPI (the mpich wheel's: .venv/bin/mpiexec) or srun --mpi=pmi2"
            )
        return world

    # ---- collectives that do not spin -------------------------------------------------------
    def _wait(self, request: Any, poll_s: float = 0.02) -> Any:
        while True:
            done, value = request.test()
            if done:
                return value
            time.sleep(poll_s)

    def barrier(self) -> None:
        """A barrier that sleeps instead of busy-polling while it waits."""
        if self.comm is not None:
            self._wait(self.comm.Ibarrier())

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Broadcast a picklable object; non-root ranks wait sleeping (a barrier first), then receive."""
        if self.comm is None:
            return obj
        self.barrier()
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (a short blocking call: startup only)."""
        if self.comm is None or self.size == 1:
            return [obj]
        return self.comm.allgather(obj)

    def allreduce_sum(self, values: Any) -> Any:
        if self.comm is None:
            return values
        import numpy as np
        from mpi4py import MPI

        arr = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(arr)
        self.barrier()
        self.comm.Allreduce(arr, out, op=MPI.SUM)
        return out

    def abort(self, code: int = 1) -> None:
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)
        sys.exit(code)

    # ---- threads and devices ----------------------------------------------------------------
    @staticmethod
    def cpus() -> list[int]:
        """The CPUs this process may run on (its affinity: a Slurm task's binding, a cgroup's cpuset)."""
        return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))

    @staticmethod
    def cores() -> int:
        return len(World.cpus())

    def set_threads(self, threads: int, alone: bool = False) -> int:
        """Torch intra-op threads: ``threads`` or, when 0, this rank's share of its CPUs: all of them
        when the launcher bound each rank to its own CPUs (``srun --cpu-bind``, ``mpiexec -bind-to``),
        divided by the ranks sharing them otherwise; with ``alone`` (the other ranks sleep meanwhile)
        every CPU this process may use. ``OMP_NUM_THREADS``, when set, caps what 0 chooses (a shared
        node's user or a job script that asked for fewer)."""
        import torch

        if threads <= 0:
            threads = omp_cap(self.cores() if alone else max(1, self.cores() // self.sharing))
        torch.set_num_threads(threads)
        return threads

    def device(self, spec: str) -> str:
        """``auto``: one GPU per local rank when there are GPUs, else cpu; or an explicit device."""
        import torch

        if spec == "auto":
            if torch.cuda.is_available():
                return f"cuda:{self.local_rank % torch.cuda.device_count()}"
            return "cpu"
        if spec == "cuda" and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return spec


def sharing(mine: Sequence[int], everyone: Sequence[Sequence[int]]) -> int:
    """How many of the node's ranks (``everyone``'s CPU sets, this rank's among them) may run on a CPU
    this rank may run on: 1 for ranks bound to CPUs of their own, the ranks on the node when none is
    bound. At least 1."""
    own = set(mine)
    return max(1, sum(1 for cpus in everyone if own & set(cpus)))


def run_guarded(world: World, fn: Callable[[], int], err_stream: Any = None) -> int:
    """Run ``fn``; on an exception print one line naming the rank and end every rank (MPI_Abort),
    exit status 2 for a user's error (as for a bad config value found before the run starts), 1 for
    anything else.

    A user's error (:class:`~hpcprune.errors.HpcpruneError`: the line says it all) is logged as that
    line; anything else is a bug and its traceback goes to the rank's log (sweep.log on rank 0)."""
    try:
        return fn()
    except SystemExit:
        raise
    except BaseException as e:  # noqa: B902 - any failure on any rank must end all ranks
        where = f"rank {world.rank}/{world.size}: " if world.size > 1 else ""
        stream = err_stream or sys.stderr
        if isinstance(e, HpcpruneError):  # a user's error: its line alone
            line = f"{e}"
        else:  # another library's error or a bug: the stage it stopped, its first line, where its traceback is
            stage = getattr(e, "hpcprune_stage", None)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
            line = (f"{f'stage {stage}: ' if stage else ''}{type(e).__name__}: {lines[0]}{' ...' if len(lines) > 1 else ''}"
                    f"{' (traceback in sweep.log)' if world.rank == 0 else ''}")
        print(f"hpcprune: error: {where}{line}", file=stream, flush=True)
        if isinstance(e, HpcpruneError):
            log.debug("stopped on rank %d: %s: %s", world.rank, type(e).__name__, e)
        else:
            log.debug("fatal error on rank %d", world.rank, exc_info=True)
        code = 2 if isinstance(e, HpcpruneError) else 1  # 2: the user's input (as before the run starts); 1: a bug
        world.abort(code)
        return code
