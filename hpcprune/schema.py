"""The typed schema of ``conf/config.yaml``: the keys hpcprune owns, their types and choices.

:class:`SweepConfig` is registered in Hydra's ConfigStore as ``hpcprune_schema`` (:func:`register`,
run when this module is imported; ``hpcprune.conf``, the package Hydra reads the configs from,
imports it) and is the first entry of config.yaml's defaults list, so Hydra checks every value and
override against it while it composes: ``threads=abc``, ``prune.method=magic`` or
``baseline.epoch=3`` stop there, naming the key (``hpcprune.sweep`` turns the message into one
line before the run starts). What the types cannot say (ranges, files, a launcher's name, a key
Hydra's ``+KEY=VALUE`` adds even to a typed section, such as ``+prune.target.flops=0.5``) is
checked by :func:`hpcprune.config.validate`.

One default per key: every field here is ``MISSING``; the values, and the comments that explain
them, are config.yaml's alone (tests/test_schema.py checks that every field stays MISSING here and
that config.yaml sets every one). ``model``, ``data`` and ``launcher`` are open (``Any``): their keys
are the user's and the group option's. Hydra adds ``hydra`` itself.

Only the standard library, omegaconf and Hydra's ConfigStore are imported (no torch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from omegaconf import MISSING

SCHEMA_NAME = "hpcprune_schema"  # config.yaml: ``defaults: [hpcprune_schema, ...]``


class Choice(str, Enum):
    """A config value from a fixed set. A ``str``: it compares, hashes, prints and formats as its
    value (``str(Method["global"]) == "global"``), as the plain strings the code had before; the
    composed config saves it as that string (``OmegaConf.to_yaml``)."""

    __str__ = str.__str__
    __format__ = str.__format__


def _choice(name: str, values: tuple[str, ...]) -> Any:
    # the functional form: "global" is a Python keyword; OmegaConf converts a string by member name
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


# the choices; hpcprune.allocate.METHODS, hpcprune.importance.CRITERIA, hpcprune.graph.KINDS name the
# same (tests/test_schema.py holds them equal)
Method = _choice("Method", ("uniform", "global", "sensitivity"))
Importance = _choice("Importance", ("l1", "l2", "bn_scale", "taylor", "activation", "fluctuation", "random"))
GroupKind = _choice("GroupKind", ("channels", "neurons", "heads", "block"))
# what runs the model when a latency is measured (hpcprune.metrics.LATENCY_RUNTIMES)
LatencyRuntime = _choice("LatencyRuntime", ("torch", "onnxruntime"))
# which clock times a forward in a latency measurement (hpcprune.metrics.LATENCY_CLOCKS)
LatencyClock = _choice("LatencyClock", ("auto", "wall", "thread"))
# what a sensitivity cell's damage is measured by (hpcprune.sensitivity.DAMAGES)
Damage = _choice("Damage", ("loss", "kl"))


@dataclass
class BaselineConfig:
    epochs: int = MISSING
    train_pretrained: bool = MISSING  # a model that comes with trained weights (runs.mark_pretrained) is trained too
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    aux_weight: float = MISSING  # each auxiliary training output adds this x its loss (metrics.training_loss)
    latency_batch: int = MISSING
    latency_repeats: int = MISSING
    latency_threads: int = MISSING
    latency_clock: LatencyClock = MISSING  # type: ignore[valid-type]
    energy: bool = MISSING  # measure joules per sample (hpcprune.energy) on /baseline, /pruned, /final
    copy_checkpoint: bool = MISSING


@dataclass
class GroupsConfig:
    ignore: List[str] = MISSING
    kinds: Optional[List[GroupKind]] = MISSING  # type: ignore[valid-type]
    strict: bool = MISSING
    timeout_s: Any = MISSING  # seconds, int or float as given (OmegaConf 2.3 has no Union; validate checks it)


@dataclass
class SensitivityConfig:
    ratios: List[float] = MISSING
    batch_size: int = MISSING
    cache_prefix: bool = MISSING
    channels_last: bool = MISSING
    fold_bn: bool = MISSING
    early_stop_floor: Optional[float] = MISSING
    bn_recalib_batches: int = MISSING
    team_size: Any = MISSING  # auto, or a number of ranks (validate)
    flush_s: float = MISSING
    damage: Damage = MISSING  # type: ignore[valid-type]
    kl_topk: int = MISSING


@dataclass
class TargetConfig:  # hpcprune.allocate.COSTS: one field per cost
    macs: Optional[float] = MISSING
    params: Optional[float] = MISSING
    latency: Optional[float] = MISSING
    energy: Optional[float] = MISSING


@dataclass
class PruneConfig:
    method: Method = MISSING  # type: ignore[valid-type]
    target: TargetConfig = field(default_factory=TargetConfig)
    latency_attempts: int = MISSING
    latency_runtime: LatencyRuntime = MISSING  # type: ignore[valid-type]
    max_ratio: float = MISSING
    round_to: int = MISSING
    exact_time_s: float = MISSING
    bn_recalib_batches: int = MISSING
    bias_compensation: bool = MISSING


@dataclass
class DistillConfig:
    weight: float = MISSING
    temperature: float = MISSING


@dataclass
class FinetuneConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    aux_weight: float = MISSING
    distill: DistillConfig = field(default_factory=DistillConfig)
    tensorboard: bool = MISSING  # rank 0 writes TensorBoard events under <run dir>/tensorboard (hpcprune.tb)
    min_metric: Optional[float] = MISSING  # accuracy gate: the fine-tuned metric at least (at most, lower-is-better)
    max_drop: Optional[float] = MISSING  # accuracy gate: the metric at most this much worse than the dense model's


@dataclass
class ResumeConfig:
    force: bool = MISSING


@dataclass
class SweepConfig:
    # the group options (conf/model, conf/data, conf/launcher, or the user's): open; first, as the
    # defaults list composed them before the schema (the saved config keeps its key order)
    model: Any = MISSING
    data: Any = MISSING
    launcher: Any = MISSING
    seed: int = MISSING
    device: str = MISSING  # auto | cpu | cuda | cuda:N (validate)
    threads: int = MISSING
    checkpoint: Optional[str] = MISSING
    cache_dir: Optional[str] = MISSING  # sensitivity grids and dense models kept for later runs (hpcprune.reuse)
    local_parallelism: int = MISSING  # points of a local submitit multirun run at once (0: CPUs / threads)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    importance: Importance = MISSING  # type: ignore[valid-type]
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)


OPEN = ("model", "data", "launcher")  # the sections whose keys the schema leaves to the configs


def keys(node: Any = SweepConfig, prefix: str = "") -> list[str]:
    """The schema's keys outside the open sections, dotted (``prune.target.macs``), in its order."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(node)
    out: list[str] = []
    for f in dataclasses.fields(node):
        if not prefix and f.name in OPEN:
            continue
        sub = hints[f.name]
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            out += keys(sub, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def register() -> None:
    """Store :class:`SweepConfig` as ``hpcprune_schema`` in Hydra's ConfigStore (again: a no-op change)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=SweepConfig)


register()
