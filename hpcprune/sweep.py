"""The sweep driver (Hydra entry point): runs the stages, resuming from the run file.

    python -m hpcprune.sweep [overrides]             # one process
    mpiexec -n 4 python -m hpcprune.sweep [...]      # sensitivity over 4 MPI ranks

Every rank runs this entry point. Rank 0 decides the run directory, owns the run file and runs
baseline, allocation, pruning and the fine-tune job; all ranks share the sensitivity cells.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from .world import MPIMismatch, World, run_guarded

log = logging.getLogger("hpcprune")
_WORLD: World | None = None
_WRITE_HYDRA_DIR = False  # rank 0 writes .hydra/ itself, once the run is accepted (_own_output_subdir)
_CONF_DIR = os.path.join(os.path.dirname(__file__), "conf")
_GROUPS = ("model", "data", "launcher")


def _choices(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(_CONF_DIR, group)) if f.endswith(".yaml"))


def precheck_argv(argv: list[str]) -> str | None:
    """Config group choices are checked before Hydra composes (its own error spans many lines)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if sep and key in _GROUPS and value not in _choices(key):
            return f"unknown {key} {value!r} (choose from: {', '.join(_choices(key))})"
    return None


_MIN_FREE = 1 << 20  # bytes: Hydra's config files, sweep.log and a first run file


def precheck_run_dir(argv: list[str]) -> str | None:
    """An explicit ``hydra.run.dir`` that cannot be written is refused before Hydra writes into it
    (Hydra's own error is a traceback). The run's real space needs are checked once the model is
    known (``Sweep._check_inputs``)."""
    value = None
    for arg in argv:
        key, sep, v = arg.partition("=")
        if sep and key.lstrip("+~") == "hydra.run.dir":
            value = v
    if value is None or "${" in value:
        return None
    probe = os.path.abspath(value)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"hydra.run.dir={value}: {probe} is not a directory"
    st = os.statvfs(probe)
    if st.f_flag & os.ST_RDONLY:
        return f"hydra.run.dir={value}: {probe} is on a read-only file system"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"hydra.run.dir={value}: {probe} is not writable"
    free = st.f_bavail * st.f_frsize
    if free < _MIN_FREE:
        return f"hydra.run.dir={value}: no space left on the file system of {probe} ({free} bytes free)"
    return None


def _inject_run_dir(world: World, argv: list[str]) -> list[str]:
    """Under MPI every rank must use the run directory rank 0 picks (Hydra's default is a timestamp)."""
    if world.size == 1:
        return argv
    stamp = world.bcast(time.strftime("%Y-%m-%d/%H-%M-%S") if world.is_main else None)
    keys = {a.split("=", 1)[0] for a in argv}
    extra = []
    if "hydra.run.dir" not in keys:
        extra.append(f"hydra.run.dir=outputs/{stamp}")
    if "hydra.sweep.dir" not in keys:
        extra.append(f"hydra.sweep.dir=multirun/{stamp}")
    if not world.is_main and "hydra.output_subdir" not in keys:
        extra.append("hydra.output_subdir=null")
    return argv + extra


def _own_output_subdir(argv: list[str]) -> tuple[list[str], bool]:
    """Hydra writes ``.hydra/`` into the run directory before the sweep can refuse it (a resume with
    another config, a locked directory), overwriting an existing run's record. Unless the user set
    ``hydra.output_subdir``, Hydra writes nothing and rank 0 writes ``.hydra/`` once the run is
    accepted (``_write_hydra_dir``). Returns the arguments and whether rank 0 writes it."""
    if any(a.split("=", 1)[0].lstrip("+~") == "hydra.output_subdir" for a in argv):
        return argv, False
    return argv + ["hydra.output_subdir=null"], True


def _write_hydra_dir(cfg: Any, run_dir: str) -> None:
    """What Hydra's ``.hydra/`` holds: the composed config, Hydra's own, the overrides."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    d = os.path.join(run_dir, ".hydra")
    os.makedirs(d, exist_ok=True)
    hc = HydraConfig.get()
    OmegaConf.save(cfg, os.path.join(d, "config.yaml"))
    OmegaConf.save(OmegaConf.create({"hydra": hc}), os.path.join(d, "hydra.yaml"))
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), os.path.join(d, "overrides.yaml"))


def _setup_logging(world: World, run_dir: str) -> None:
    root = logging.getLogger("hpcprune")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG)
    root.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {world.rank}] %(name)s: %(message)s", "%H:%M:%S")
    if world.is_main:
        os.makedirs(run_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(run_dir, "sweep.log"))
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("[hpcprune] %(message)s"))
        sh.setLevel(logging.INFO)
        root.addHandler(sh)
    else:
        os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
        fh = logging.FileHandler(os.path.join(run_dir, "logs", f"rank{world.rank}.log"))
    fh.setFormatter(fmt)
    root.addHandler(fh)


def _task(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from .stages import Sweep

    world = _WORLD or World.from_env()
    run_dir = HydraConfig.get().runtime.output_dir
    _setup_logging(world, run_dir)
    accept = (lambda: _write_hydra_dir(cfg, run_dir)) if (_WRITE_HYDRA_DIR and world.is_main) else None
    rc = run_guarded(world, lambda: Sweep(cfg, world, run_dir, on_accept=accept).run())
    if rc:
        sys.exit(rc)


def main() -> None:
    global _WORLD, _WRITE_HYDRA_DIR
    try:
        world = World.from_env()
    except MPIMismatch as e:
        if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0":
            print(f"hpcprune: error: {e}", file=sys.stderr)
        sys.exit(2)
    _WORLD = world
    argv = sys.argv[1:]
    bad = precheck_argv(argv) or precheck_run_dir(argv)
    if bad:
        if world.is_main:
            print(f"hpcprune: error: {bad}", file=sys.stderr)
        sys.exit(2)
    argv, _WRITE_HYDRA_DIR = _own_output_subdir(argv)
    sys.argv = [sys.argv[0]] + _inject_run_dir(world, argv)

    import hydra

    hydra.main(config_path="conf", config_name="config", version_base=None)(_task)()


if __name__ == "__main__":
    main()
