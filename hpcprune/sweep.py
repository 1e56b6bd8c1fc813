"""The sweep driver (Hydra entry point): runs the stages, resuming from the run file.

    python -m hpcprune.sweep [overrides]             # one process
    mpiexec -n 4 python -m hpcprune.sweep [...]      # sensitivity over 4 MPI ranks

Every rank runs this entry point. Rank 0 decides the run directory, owns the run file and runs
baseline, allocation, pruning and the fine-tune job; all ranks share the sensitivity cells.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

from . import schema as _schema  # noqa: F401 - registers hpcprune_schema (config.yaml's first default) before Hydra composes
from .compose_errors import _one_line, _override_key
from .world import MPIMismatch, World, run_guarded

log = logging.getLogger("hpcprune")
_WORLD: World | None = None
_WRITE_HYDRA_DIR = False  # rank 0 writes .hydra/ itself, once the run is accepted (_own_output_subdir)
_CONF_DIR = os.path.join(os.path.dirname(__file__), "conf")
_OWN_GROUPS = ("model", "data")  # groups whose ``_target_`` alone means the user's own function
_CUSTOM = "custom"  # conf/model/custom.yaml, conf/data/custom.yaml: ``_target_: ???`` and nothing else
_NOT_RUNS = ("help", "hydra_help", "info", "shell_completion")  # Hydra answers these without a run


def _hydra_args(argv: list[str]) -> Any:
    """``argv`` parsed by Hydra's own parser, as ``hydra.main`` parses it; None when it does not
    parse (Hydra then reports it itself)."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return get_args_parser().parse_args(_ordered(argv))
    except SystemExit:
        return None


class _DryHydra:
    """Hydra set up as ``hydra.main(config_path="conf", config_name="config")`` in :func:`main` sets
    itself up for ``argv`` (its search path: this package's ``conf``, or ``--config-path``; then
    ``--config-dir``; ``hydra.searchpath`` from the overrides and the primary config are applied by
    the composition itself), for :func:`hydra.compose` while the ``with`` block lasts."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.config_name = args.config_name if args.config_name is not None else "config"

    def __enter__(self) -> "_DryHydra":
        from hydra._internal.hydra import Hydra
        from hydra._internal.utils import (create_automatic_config_search_path,
                                           detect_calling_file_or_module_from_task_function)
        from hydra.core.config_search_path import SearchPathQuery
        from hydra.core.global_hydra import GlobalHydra

        calling_file, calling_module = detect_calling_file_or_module_from_task_function(_task)
        config_path = self.args.config_path if self.args.config_path is not None else "conf"
        search_path = create_automatic_config_search_path(calling_file, calling_module, config_path)
        if self.args.config_dir is not None:
            d = os.path.abspath(self.args.config_dir)
            if not os.path.isdir(d):
                raise _Refused(f"--config-dir {self.args.config_dir}: no such directory ({d})")
            search_path.prepend(provider="command-line", path=f"file://{d}", anchor=SearchPathQuery(provider="schema"))
        gh = GlobalHydra.instance()
        self.saved = gh.hydra if gh.is_initialized() else None  # a caller's own Hydra, put back on exit
        gh.clear()
        try:
            self.hydra = Hydra.create_main_hydra2(task_name="sweep", config_search_path=search_path)
        except BaseException:
            self.__exit__()
            raise
        return self

    def compose(self, overrides: list[str]) -> Any:
        import warnings

        from hydra import compose

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Hydra warns again when it composes for the run
            return compose(self.config_name, list(overrides), return_hydra_config=True)

    def options(self, group: str, overrides: list[str]) -> list[str]:
        try:
            return sorted(self.hydra.config_loader.get_group_options(group, config_name=None, overrides=list(overrides)))
        except Exception:
            return []

    def __exit__(self, *exc: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        if self.saved is not None:
            GlobalHydra.instance().initialize(self.saved)


class _Refused(Exception):
    """A composition error as one line."""


def _dry(argv: list[str]) -> tuple[Any, list[str], bool] | None:
    """Hydra's parsed arguments, its overrides and whether it composes one config for ``argv``
    (not for ``--multirun``, where it composes per job, nor for ``--help``/``--info``)."""
    args = _hydra_args(argv)
    if args is None:
        return None
    single = not args.multirun and not any(getattr(args, k, None) for k in _NOT_RUNS)
    return args, list(args.overrides), single


def precheck_argv(argv: list[str]) -> str | None:
    """Compose the config exactly as ``hydra.main`` will for ``argv`` (a dry run with
    :func:`hydra.compose`: ``--config-dir``, ``--config-name``, ``--config-path``,
    ``hydra.searchpath`` on the command line or in the primary config), before Hydra writes
    anything into a run directory. A composition error (an unknown group option, a missing config,
    an override that does not parse) is returned as one line (Hydra's own spans many lines and
    lists the search path). Not for ``--multirun``: Hydra composes each job."""
    parsed = _dry(argv)
    if parsed is None or not parsed[2]:
        return None
    args, overrides, _ = parsed
    try:
        with _DryHydra(args) as dry:
            try:
                cfg = dry.compose(overrides)
            except Exception as e:  # noqa: BLE001 - every composition error becomes one line
                return _one_line(e, dry, overrides)
    except _Refused as e:
        return str(e)
    from omegaconf import DictConfig, OmegaConf

    for group in _OWN_GROUPS:
        node = cfg.get(group)
        if isinstance(node, DictConfig) and OmegaConf.is_missing(node, "_target_"):
            return (f"{group}={cfg.hydra.runtime.choices.get(group)}: {group}._target_ is not set "
                    f"(give {group}._target_=your_package.your_function)")
    return None


MULTIRUN_PRECHECK_MAX = 512  # points of a --multirun composed and validated before its first one starts


def precheck_multirun(argv: list[str]) -> str | None:
    """For ``--multirun``: compose and validate every point of the sweep (the cartesian product of
    its comma-separated and ``range()`` overrides, as Hydra's basic sweeper expands them) before the
    first one starts, so that a bad value in the fifth point does not surface after four points'
    work (hours on a cluster). The first bad point's one line, naming its sweep values; None when all
    pass, for sweeps of more than :data:`MULTIRUN_PRECHECK_MAX` points, and for interval sweeps (a
    sweeper plugin's search space: Hydra composes those per job)."""
    import itertools

    parsed = _dry(argv)
    if parsed is None or not parsed[0].multirun or any(getattr(parsed[0], k, None) for k in _NOT_RUNS):
        return None
    args, overrides, _ = parsed
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        ovs = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - Hydra's own parse error comes with the run, as before
        return None
    choices: list[list[str]] = []
    for o in ovs:
        if not o.is_sweep_override():
            choices.append([o.input_line])
            continue
        if not o.is_discrete_sweep():
            return None
        prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++"}.get(o.type, "")
        choices.append([f"{prefix}{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
    n = 1
    for c in choices:
        n *= len(c)
    if n > MULTIRUN_PRECHECK_MAX:
        return None
    from .config import ConfigError, validate

    swept = [i for i, c in enumerate(choices) if len(c) > 1]
    try:
        with _DryHydra(args) as dry:
            for point in itertools.product(*choices):
                where = ", ".join(point[i] for i in swept)
                try:
                    cfg = dry.compose(list(point))
                except Exception as e:  # noqa: BLE001 - every composition error becomes one line
                    return f"{_one_line(e, dry, list(point))} (the sweep's point {where}; no point was started)"
                _FIRST_POINT[:] = _FIRST_POINT or [cfg]
                try:
                    validate(cfg)
                except ConfigError as e:
                    return f"{e} (the sweep's point {where}; no point was started)"
    except _Refused as e:
        return str(e)
    return None


_FIRST_POINT: list[Any] = []  # the first point's composed config, kept by precheck_multirun
# what a multirun's launcher raises when a point's process dies (a segfault, the OOM killer): joblib's
# (loky) worker, a submitit job that left no result
_POINT_DIED = ("TerminatedWorkerError", "UncompletedJobError", "BrokenProcessPool")


def _joblib_jobs(argv: list[str], cores: int) -> list[str]:
    """``hydra/launcher=joblib`` (hydra-joblib-launcher: the points of a multirun on a pool of worker
    processes of this machine, each running point after point, so torch and the stages are imported
    once per worker and not once per point) without ``hydra.launcher.n_jobs``: that many workers as
    ``slots.local_slots`` gives for the first point (``local_parallelism``, else the cores over each
    point's threads), not joblib's default of one per core, which a point of several threads
    oversubscribes. ``argv`` unchanged otherwise."""
    keys = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "=" in a}
    if keys.get("hydra/launcher") != "joblib":
        return argv
    if "hydra.launcher.n_jobs" in keys:
        given = keys["hydra.launcher.n_jobs"]
        if not re.fullmatch(r"-?\d+", given.strip()) or int(given) == 0:
            raise _Refused(f"hydra.launcher.n_jobs={given}: the number of worker processes of the joblib launcher must be "
                           "a positive integer (or -1 for one per CPU); leave it out and hpcprune sets local_parallelism's")
        return argv
    if not _FIRST_POINT:
        return argv
    from .slots import local_slots

    return _with_overrides(argv, [f"hydra.launcher.n_jobs={local_slots(_FIRST_POINT[0], '', cores)}"])


def _default_choices() -> dict[str, str]:
    """The packaged config.yaml's choices (``model: resnet_tiny``, ``data: digits``)."""
    from omegaconf import OmegaConf

    out = {}
    for entry in OmegaConf.load(os.path.join(_CONF_DIR, "config.yaml")).defaults:
        if not isinstance(entry, str):
            for k, v in entry.items():
                out[str(k)] = str(v)
    return out


def own_target_argv(argv: list[str]) -> list[str]:
    """``model._target_=pkg.fn`` without a ``model=`` choice means the user's own model: the default
    model's keys (``in_channels``, ``widths``, ...) must not go to ``pkg.fn``. Adds ``model=custom``
    (``conf/model/custom.yaml``: ``_target_: ???``, no other key; ``+model.KEY=VALUE`` adds
    arguments), and likewise ``data=custom`` for ``data._target_``.

    Why a group option chosen by this rewrite, not a resolver or a deletion after composition: the
    composed config, ``.hydra/overrides.yaml`` and the run file then say what ran (``model=custom``),
    a resume recomposes the same config from the same command line, every rank and the fine-tune
    job see one config, and ``model=custom model._target_=...`` is the same thing written out.

    Only where the choice in force is the packaged default: a group option picked by the user's
    primary config (``--config-name mine`` with ``override model: mine``) or by an experiment
    (``+experiment=...``) keeps its keys and only has its ``_target_`` replaced, as before. That
    choice is read from a dry composition without the group's own keys (and, for ``--multirun``,
    without sweeps); if that fails, the command line alone decides."""
    parsed = _dry(argv)
    if parsed is None:
        return argv
    args, overrides, single = parsed
    wanted = [
        g for g in _OWN_GROUPS
        if any(_override_key(a) == f"{g}._target_" and not a.startswith("~") for a in overrides)
        and not any(_override_key(a) == g for a in overrides)
    ]
    if not wanted:
        return argv
    keep = [a for a in overrides if not any(_override_key(a).startswith(f"{g}.") for g in wanted)]
    if not single:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        try:
            keep = [a for a in keep if not parser.parse_override(a).is_sweep_override()]
        except Exception:
            keep = []
    defaults = _default_choices()
    try:
        with _DryHydra(args) as dry:
            choices = dry.compose(keep).hydra.runtime.choices
        wanted = [g for g in wanted if choices.get(g) == defaults.get(g)]
    except Exception:
        pass
    if not wanted:
        return argv
    # next to the _target_ override: Hydra's parser takes the overrides as one run of positionals
    at = max(i for i, a in enumerate(argv) if a in overrides) + 1
    return argv[:at] + [f"{g}={_CUSTOM}" for g in wanted] + argv[at:]


_MIN_FREE = 1 << 20  # bytes: Hydra's config files, sweep.log and a first run file


def precheck_run_dir(argv: list[str]) -> str | None:
    """An explicit ``hydra.run.dir`` that cannot be written is refused before Hydra writes into it
    (Hydra's own error is a traceback). The run's real space needs are checked once the model is
    known (``pipeline.Sweep._check_inputs``)."""
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
    return _with_overrides(argv, extra)


# Hydra's options that take a value (``--cfg job``); ``--info`` takes one of its choices, optionally
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                "--experimental-rerun"}
_INFO = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _with_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` with overrides ``extra`` added after the user's own, all overrides in one run after
    the options: Hydra's parser takes its overrides as one positional list, so an override appended
    after ``--cfg job`` would be refused."""
    if not extra:
        return argv
    return _ordered(argv) + extra


def _ordered(argv: list[str]) -> list[str]:
    """``argv`` with Hydra's options first and the overrides after them, in their order (argparse
    refuses overrides on both sides of ``-m``: ``a=1 -m b=2,3``)."""
    options: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-"):
            options.append(a)
            takes = a in _VALUE_FLAGS or (a in ("--info", "-i") and i + 1 < len(argv) and argv[i + 1] in _INFO)
            if takes and i + 1 < len(argv):
                options.append(argv[i + 1])
                i += 1
        else:
            overrides.append(a)
        i += 1
    return options + overrides


def _own_output_subdir(argv: list[str]) -> tuple[list[str], bool]:
    """Hydra writes ``.hydra/`` into the run directory before the sweep can refuse it (a resume with
    another config, a locked directory), overwriting an existing run's record. Unless the user set
    ``hydra.output_subdir``, Hydra writes nothing and rank 0 writes ``.hydra/`` once the run is
    accepted (``_write_hydra_dir``). Returns the arguments and whether rank 0 writes it."""
    if any(a.split("=", 1)[0].lstrip("+~") == "hydra.output_subdir" for a in argv):
        return argv, False
    return _with_overrides(argv, ["hydra.output_subdir=null"]), True


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
    from hydra.types import RunMode

    from . import slots

    world = _WORLD or World.from_env()
    run_dir = HydraConfig.get().runtime.output_dir
    _setup_logging(world, run_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN and world.size == 1
    slot = slots.local_slot(cfg, run_dir, world.cores()) if multirun else None
    if slot is not None:
        slot.acquire()  # at most local_parallelism points of a local multirun at once; before torch is imported
    from . import pipeline

    accept = (lambda: _write_hydra_dir(cfg, run_dir)) if (_WRITE_HYDRA_DIR and world.is_main) else None
    # any error ends every rank with one line "hpcprune: error: ..." and a non-zero exit: 2 when rank 0
    # refuses the run before it starts, 1 from a stage; a user's error (HpcpruneError) is that line,
    # anything else is a bug and keeps its traceback in sweep.log (run_guarded)
    try:
        rc = run_guarded(world, lambda: pipeline.run(cfg, world, run_dir, on_accept=accept))
    except SystemExit as e:  # run_guarded ends a failed run's process (every rank: MPI_Abort)
        rc = int(e.code or 1)
        if not multirun:
            raise
    finally:
        if slot is not None:
            slot.release()
    if multirun and world.is_main:
        slots.record_exit(run_dir, rc)  # this invocation's outcome: a refused point may hold an older complete run file
    if rc and multirun:
        # one point of a sweep failed (its line is printed, its run file says why): the job returns, so
        # that Hydra goes on with the others without a traceback; main() lists the failed points at
        # the end, read from the sweep directory (the point may be a submitit job in another process)
        log.error("run %s failed (exit status %d); the sweep goes on", run_dir, rc)
        return
    if rc:
        sys.exit(rc)


def _multirun_dir(argv: list[str]) -> tuple[list[str], str | None]:
    """For ``--multirun``: the arguments with ``hydra.sweep.dir`` made explicit (Hydra's own default,
    ``multirun/DATE/TIME``) and that directory; else (argv, None)."""
    args = _hydra_args(argv)
    if args is None or not args.multirun:
        return argv, None
    given = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] == "hydra.sweep.dir"]
    if given:
        # ${now:FMT} resolved here, once, as Hydra would: the summary must read the directory the points use
        where = re.sub(r"\$\{now:([^}]*)\}", lambda m: time.strftime(m.group(1)), given[-1])
        if "${" in where:
            print(f"hpcprune: note: hydra.sweep.dir={given[-1]} has interpolations resolved by Hydra only: the sweep's "
                  "failed points are not counted at its end (python -m hpcprune.report on the directory shows them)",
                  file=sys.stderr)
            return argv, None
        argv = [a for a in argv if a.split("=", 1)[0] != "hydra.sweep.dir"]
        return _with_overrides(argv, [f"hydra.sweep.dir={where}"]), os.path.abspath(where)
    where = time.strftime("multirun/%Y-%m-%d/%H-%M-%S")
    return _with_overrides(argv, [f"hydra.sweep.dir={where}"]), os.path.abspath(where)


def main() -> None:
    global _WORLD, _WRITE_HYDRA_DIR
    try:
        world = World.from_env()
    except MPIMismatch as e:
        if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0":
            print(f"hpcprune: error: {e}", file=sys.stderr)
        sys.exit(2)
    _WORLD = world
    argv = own_target_argv(sys.argv[1:])
    bad = precheck_argv(argv) or precheck_run_dir(argv) or precheck_multirun(argv)
    if bad:
        if world.is_main:
            print(f"hpcprune: error: {bad}", file=sys.stderr)
        sys.exit(2)
    try:
        argv = _joblib_jobs(argv, world.cores())
    except _Refused as e:
        if world.is_main:
            print(f"hpcprune: error: {e}", file=sys.stderr)
        sys.exit(2)
    argv, _WRITE_HYDRA_DIR = _own_output_subdir(argv)
    argv, sweep_dir = _multirun_dir(_inject_run_dir(world, argv))
    sys.argv = [sys.argv[0]] + _ordered(argv)
    t_start = time.time() - 1.0

    import hydra

    from .slots import sweep_outcome  # no torch: the driver of a submitit multirun does not import it

    died = None
    if sweep_dir is not None:  # a launcher's error reaches the except below (Hydra would print it and exit 1); a
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # point's own failure never gets there: _task returns
    try:
        hydra.main(config_path="conf", config_name="config", version_base=None)(_task)()
    except Exception as e:  # noqa: BLE001 - a multirun's point whose process died (joblib's worker, a submitit job)
        if sweep_dir is None or type(e).__name__ not in _POINT_DIED:
            raise
        died = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        log.debug("a point's process died", exc_info=True)
    if sweep_dir is not None and world.is_main:  # a multirun: which points completed, which did not
        done, failed = sweep_outcome(sweep_dir, t_start)
        report = f"python -m hpcprune.report {os.path.relpath(sweep_dir)}"
        if died is not None and died.startswith("UncompletedJobError"):  # submitit: the other points' jobs go on
            print(f"hpcprune: error: a point's job ended without a result ({died[:300]}; a segfault or the OOM killer: "
                  f"its submitit log says which); the sweep's other jobs go on by themselves, {report} shows them once "
                  "they end", file=sys.stderr)
            failed = failed or [sweep_dir]
        elif died is not None:  # joblib: the launcher stopped every worker
            print(f"hpcprune: error: a point's worker process died ({died[:300]}; a segfault or the OOM killer: the "
                  "system log says which): joblib stopped the sweep, and the points left 'running' in their run files "
                  "were cut short (a rerun of the same command resumes them); hydra/launcher=submitit_local loses only "
                  "the point that died", file=sys.stderr)
            failed = failed or [sweep_dir]
        if failed:
            print(f"hpcprune: {len(failed)} run(s) of the sweep failed (of {len(done) + len(failed)}): {', '.join(failed)} "
                  f"({report} and each one's sweep.log say why)", file=sys.stderr)
            sys.exit(3)
        print(f"hpcprune: {len(done)} run(s) complete in {sweep_dir}; compare them with: {report}")


if __name__ == "__main__":
    main()
