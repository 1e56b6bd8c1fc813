"""What a valid configuration is, checked on rank 0 before the run directory is touched.

:func:`validate` checks what the schema's types cannot (:mod:`hpcprune.schema`: Hydra refuses a
value of the wrong type or an unknown choice while it composes), one small check per section of
``conf/config.yaml``; the first bad value stops the run with a :class:`ConfigError` that names the
key, its value and what to give instead.
:func:`instantiate` and :func:`load_dense_checkpoint` turn a failing model, data or checkpoint into
the same kind of one line. ``RESUME_IGNORED`` is the one list of result-neutral keys: a resume may
change them, and the report ignores them when it compares runs.

Only the standard library is imported at module level: ``hpcprune.report`` imports this module and
does not import torch (nor, until it validates, Hydra's schema).
"""
from __future__ import annotations

import os
from typing import Any, Callable, NoReturn

from .errors import HpcpruneError

# keys that may change between a run and its resumption without changing any result (beyond
# rounding, ~1e-7, as with another world size: layouts, BatchNorm folding, teams)
RESUME_IGNORED = ("launcher", "threads", "device", "resume", "sensitivity.flush_s", "groups.timeout_s", "sensitivity.team_size",
                  "baseline.copy_checkpoint", "finetune.tensorboard", "cache_dir", "finetune.min_metric", "finetune.max_drop", "sensitivity.channels_last", "sensitivity.fold_bn", "hydra",
                  "local_parallelism")


class ConfigError(HpcpruneError, ValueError):
    """A bad config value, or a model, data set or checkpoint the config names that cannot be used."""


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"dotted.key": value}``."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def targets(cfg: Any) -> dict[str, float]:
    """The budgets given (``prune.target.*`` that are not null), as fractions of the dense cost."""
    t = cfg.prune.target
    return {k: float(t[k]) for k in t if t[k] is not None}


# ---- validation: the schema's types, then one check per section, in config.yaml's order -----------
def validate(cfg: Any) -> None:
    """Raise ConfigError naming the first bad value.

    Types and choices are the schema's (:mod:`hpcprune.schema`, checked by Hydra while it composes
    the packaged config); a config composed without it (a primary config of the user's own that
    does not start from ``config``) is checked against it here, and a key it does not set is
    refused. The checks below are what a type cannot say: ranges, files, a launcher's name."""
    cfg = _typed(cfg)
    for check in _CHECKS:
        check(cfg)


def _bad(key: str, value: Any, why: str) -> NoReturn:
    raise ConfigError(f"{key}={value}: {why}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _typed(cfg: Any) -> Any:
    """``cfg`` typed by the schema (itself when Hydra composed it with ``hpcprune_schema``); every
    key of the schema outside model, data and launcher set."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .schema import SweepConfig, keys

    if OmegaConf.get_type(cfg) is not SweepConfig:
        body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(SweepConfig), body)
        except OmegaConfBaseException as e:
            key = e.full_key or "config"
            msg = str(getattr(e, "msg", e)).strip().splitlines()[0]
            raise ConfigError(f"{key}={OmegaConf.select(body, key, default='?')}: {msg}") from None
    for key in keys():  # MISSING (a primary config that does not set it) or deleted (~KEY)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node or OmegaConf.is_missing(node, leaf):
            raise ConfigError(f"{key}: not set (hpcprune's config.yaml sets it; give {key}=VALUE)")
    return cfg


def _check_targets(cfg: Any) -> None:
    from .allocate import COSTS

    t = cfg.prune.target
    given = {k: t[k] for k in t if t[k] is not None}
    for k in given:
        if k not in COSTS:  # +prune.target.NAME=... adds a key even to the schema's section
            _bad(f"prune.target.{k}", given[k], f"unknown target (choose from {', '.join(COSTS)})")
        if not _is_number(given[k]) or not 0 < given[k] < 1:
            _bad(f"prune.target.{k}", given[k], "a target is the fraction of the dense cost to keep, in (0, 1)")
    if not given:
        _bad("prune.target", dict(t), f"give at least one target ({', '.join(COSTS)})")


def _check_ratios(cfg: Any) -> None:
    ratios = list(cfg.sensitivity.ratios)
    if not ratios:
        _bad("sensitivity.ratios", ratios, "the ratio grid is empty")
    for r in ratios:
        if not 0 < r < 1:
            _bad("sensitivity.ratios", ratios, f"ratio {r} is outside (0, 1)")
    if any(b <= a for a, b in zip(ratios, ratios[1:])):
        _bad("sensitivity.ratios", ratios, "ratios must be strictly increasing")


def _check_sensitivity(cfg: Any) -> None:
    team = cfg.sensitivity.team_size  # typed Any: auto or an integer
    if team != "auto" and (isinstance(team, bool) or not isinstance(team, int) or team < 1):
        _bad("sensitivity.team_size", team, "must be auto or a positive integer (ranks that evaluate one cell together)")
    if cfg.sensitivity.kl_topk < 1:
        _bad("sensitivity.kl_topk", cfg.sensitivity.kl_topk, "must be a positive integer (the dense model's most likely "
             "classes or tokens the KL divergence keeps apart)")


def _check_prune(cfg: Any) -> None:
    if not 0 < cfg.prune.max_ratio < 1:
        _bad("prune.max_ratio", cfg.prune.max_ratio, "must be in (0, 1)")
    if cfg.prune.round_to < 1:
        _bad("prune.round_to", cfg.prune.round_to, "must be a positive integer")
    if not cfg.prune.exact_time_s > 0:
        _bad("prune.exact_time_s", cfg.prune.exact_time_s, "must be a positive number of seconds")
    if str(cfg.prune.latency_runtime) == "onnxruntime":
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            _bad("prune.latency_runtime", "onnxruntime", f"{', '.join(missing)} not installed; pip install hpcprune[deploy], "
                 "or prune.latency_runtime=torch")


def _check_measured(cfg: Any) -> None:
    """A thread-clock latency where it times the forward, and an energy budget only where energy is
    measured: refused here, before any training, naming the reason (``hpcprune.energy``)."""
    from .metrics import latency_clock

    b, t = cfg.baseline, cfg.prune.target
    energy = t.get("energy") is not None
    if str(b.latency_clock) != "thread" and not energy:
        return
    device = _rank0_device(str(cfg.device))
    try:
        latency_clock(str(b.latency_clock), device, int(b.latency_threads), str(cfg.prune.latency_runtime))
    except ValueError as e:
        _bad("baseline.latency_clock", "thread", str(e).partition(": ")[2] + "; or baseline.latency_clock=auto")
    if not energy:
        return
    if not b.energy:
        _bad("prune.target.energy", t.energy, "an energy budget needs baseline.energy=true (the dense model's joules per sample)")
    from .energy import unavailable_reason

    reason = unavailable_reason(device)
    if reason:
        _bad("prune.target.energy", t.energy, f"energy cannot be measured on this machine ({reason}); drop the energy "
             "budget or run where NVML/RAPL are readable")


def _rank0_device(spec: str) -> str:
    """The device rank 0 will use for ``device=spec`` (``hpcprune.world.World.device``)."""
    if spec in ("auto", "cuda"):
        import torch

        return "cuda:0" if torch.cuda.is_available() else ("cpu" if spec == "auto" else "cuda")
    return spec


def _check_groups(cfg: Any) -> None:
    from .schema import GroupKind

    kinds = cfg.groups.kinds
    if kinds is not None and not len(kinds):
        _bad("groups.kinds", list(kinds), f"give a non-empty list of group kinds ({', '.join(GroupKind)}), or null for all")
    if not _is_number(cfg.groups.timeout_s) or cfg.groups.timeout_s < 0:  # typed Any: int or float
        _bad("groups.timeout_s", cfg.groups.timeout_s, "must be a number of seconds >= 0 (0: no limit)")


def _check_launcher(cfg: Any) -> None:
    from .launch import LAUNCHERS

    if cfg.launcher.name not in LAUNCHERS:
        _bad("launcher.name", cfg.launcher.name, f"unknown launcher (choose from {', '.join(LAUNCHERS)})")
    port = cfg.launcher.get("master_port")  # launcher is the user's section: debug has no port
    if port is not None and (not isinstance(port, int) or not 1024 <= port <= 65535):
        _bad("launcher.master_port", port, "a TCP port in 1024-65535, or null to derive one from the job id")


def _check_finetune(cfg: Any) -> None:
    from omegaconf import OmegaConf

    drop = cfg.finetune.get("max_drop")
    if drop is not None and drop < 0:
        _bad("finetune.max_drop", drop, "must be >= 0 (how much worse than the dense model's metric a run may end)")
    w = cfg.finetune.distill.weight
    if not 0 <= w <= 1:
        _bad("finetune.distill.weight", w, "must be in [0, 1]")
    for key in ("baseline.aux_weight", "finetune.aux_weight"):
        a = OmegaConf.select(cfg, key)
        if a is not None and a < 0:
            _bad(key, a, "must be >= 0 (each auxiliary output's share of the training loss; 0: not trained)")


def _check_counts(cfg: Any) -> None:
    from omegaconf import OmegaConf

    for key in ("finetune.epochs", "baseline.epochs", "prune.bn_recalib_batches", "sensitivity.bn_recalib_batches"):
        v = OmegaConf.select(cfg, key)
        if v < 0:
            _bad(key, v, "must be a non-negative integer")
    for key in ("finetune.batch_size", "baseline.batch_size", "sensitivity.batch_size"):
        v = OmegaConf.select(cfg, key)
        if v < 1:
            _bad(key, v, "must be a positive integer")
    if int(cfg.get("local_parallelism", 0)) < 0:
        _bad("local_parallelism", cfg.local_parallelism, "must be 0 (this machine's CPUs / threads) or a positive number of points")


def _check_paths(cfg: Any) -> None:
    if cfg.checkpoint is not None and not os.path.isfile(str(cfg.checkpoint)):
        _bad("checkpoint", cfg.checkpoint, "no such file")
    cache = cfg.get("cache_dir")
    if cache is not None and os.path.exists(str(cache)) and not os.path.isdir(str(cache)):
        _bad("cache_dir", cache, "is a file, not a directory")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        _bad("device", cfg.device, "use auto, cpu, cuda or cuda:N")


_CHECKS: tuple[Callable[[Any], None], ...] = (
    _check_targets, _check_ratios, _check_sensitivity, _check_prune, _check_groups, _check_launcher,
    _check_finetune, _check_counts, _check_paths, _check_measured,
)


# ---- the inputs the config names ------------------------------------------------------------------
def instantiate(key: str, build: Callable[[Any], Any], node: Any) -> Any:
    """Build ``model`` or ``data`` from its config; a failure becomes one line naming the value
    (Hydra wraps the error in an InstantiationException whose message spans several lines)."""
    try:
        return build(node)
    except Exception as e:
        cause: BaseException = e
        while type(cause).__name__ == "InstantiationException" and cause.__cause__ is not None:
            cause = cause.__cause__
        lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()] or [type(cause).__name__]
        msg = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]  # "Error loading 'x':\n<why>"
        if type(cause).__name__ == "InstantiationException":
            msg = msg.split(", set env var HYDRA_FULL_ERROR")[0]
        elif not msg.startswith(f"{key}."):
            msg = f"{type(cause).__name__}: {msg}"
        if not msg.startswith(f"{key}."):
            unknown = _unknown_target(str(node.get("_target_", "")))
            msg = f"{key}._target_={node.get('_target_')}: {unknown or msg}"
        if isinstance(cause, ModuleNotFoundError) or "No module named" in msg:
            msg += " (its package must be importable where this runs: PYTHONPATH=<its parent folder>, or pip install it)"
        raise ConfigError(msg) from None


def _unknown_target(target: str) -> str | None:
    """For a ``_target_`` whose module imports but has no such name (a misspelling): which module,
    which name, and the closest names it has. None when that is not the problem."""
    import difflib
    import importlib

    mod_name, _, attr = target.rpartition(".")
    if not mod_name:
        return None
    try:
        mod = importlib.import_module(mod_name)
    except Exception:  # noqa: BLE001 - the module itself is the problem: the original message says why
        return None
    if hasattr(mod, attr):
        return None
    names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n, None))]
    close = difflib.get_close_matches(attr, names, n=3)
    return f"module {mod_name} has no {attr!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")


def load_dense_checkpoint(model: Any, path: str) -> None:
    """Load the user's checkpoint (``checkpoint=``) into ``model``; ConfigError (one line) when the
    file is not a state dict or does not fit the model."""
    from .store import load_checkpoint

    try:
        state = load_checkpoint(path)  # the same loader reads a referenced checkpoint back (store.read_weights)
    except ValueError as e:
        raise ConfigError(f"checkpoint={path}: {e}") from None
    try:
        model.load_state_dict(state)
    except Exception as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ConfigError(f"checkpoint={path}: does not fit the model ({first})") from None
