"""Sensitivity grids and dense models computed once, found again by later runs.

A sensitivity grid depends only on the dense weights, the data and calibration set, the groups, the
importance criterion, the ratio grid and the settings that change its numbers; a dense model trained
here (``checkpoint=null``) only on the model, the data, the training settings and the seed. Each
gets a **content key** (sha256 over those inputs; result-neutral keys, ``RESUME_IGNORED``, left out),
and a run looks for a finished one under its key before computing it:

- in ``cache_dir`` (a shared directory: ``sensitivity-<key>.h5``, ``dense-<key>.safetensors``), when
  the config sets one;
- in the run files of the other runs of its Hydra multirun (the run directory's parent holds
  ``multirun.yaml``: ``python -m hpcprune.sweep -m prune.target.macs=0.3,0.5``).

The groups stage's findings (the groups verification excluded, the exact cost model) are found the
same way in the run files of the multirun (``groups_key``: the architecture and the cuts verified).

What a run reused is recorded: ``/sensitivity@source``, ``/baseline@source`` and ``/groups@source`` (the run file or cache
file it was read from; empty when computed here), with ``@key``. Runs that start together (a
multirun on a parallel launcher, Slurm array tasks) take a lock per key in the shared directory:
the first computes, the others wait for it and then copy its result, so a grid is computed once.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import time
from typing import Any

import torch

from .config import RESUME_IGNORED, flat
from .slots import shared_dirs

log = logging.getLogger("hpcprune.stages")

KEY_VERSION = 1  # changes when what a key covers changes: older entries are then not found


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node


def _key(kind: str, parts: dict[str, Any]) -> str:
    """sha256 of the parts (flattened, result-neutral keys dropped), 32 hex digits."""
    items = {}
    for name, value in parts.items():
        value = _plain(value)
        for k, v in (flat(value, f"{name}.") if isinstance(value, dict) else {name: value}).items():
            if not any(k == p or k.startswith(p + ".") for p in RESUME_IGNORED):
                items[k] = v
    blob = json.dumps({"kind": kind, "version": KEY_VERSION, "items": items}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def weights_digest(state: dict[str, Any]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and values (a weights file's own sha256 is no
    identity: safetensors writes its header's entries in no fixed order). ~1 GB/s."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sensitivity_key(cfg: Any, dense_digest: str, groups: list[str]) -> str:
    """The content key of a sensitivity grid: the dense weights (:func:`weights_digest`), the groups
    (names, in order), and every setting the cells' numbers follow: model, data, importance,
    sensitivity, groups, ``prune.round_to`` and the seed (BatchNorm re-estimation batches)."""
    return _key("sensitivity", {"dense_digest": dense_digest, "groups_kept": groups, "model": cfg.model, "data": cfg.data,
                                "importance": cfg.importance, "sensitivity": cfg.sensitivity, "groups": cfg.groups,
                                "prune.round_to": cfg.prune.round_to, "seed": cfg.seed,
                                **({"prune.bias_compensation": True} if cfg.prune.get("bias_compensation") else {})})


def groups_key(cfg: Any) -> str:
    """The content key of a groups stage's findings (the groups verification excluded and why, the
    exact cost model's terms): the architecture (model config, ``checkpoint``), the example input
    (data config), ``groups``, ``prune.max_ratio`` and ``prune.round_to`` (the cuts verified), the seed,
    and the versions of hpcprune, torch and Torch-Pruning (what the findings were computed with).
    The budgets are not part of it: each run checks its own against the cost model."""
    from importlib.metadata import version

    from . import __version__

    return _key("groups", {"model": cfg.model, "checkpoint": cfg.get("checkpoint"), "data": cfg.data, "groups": cfg.groups,
                           "prune.max_ratio": cfg.prune.max_ratio, "prune.round_to": cfg.prune.round_to, "seed": cfg.seed,
                           "versions": [__version__, torch.__version__, version("torch-pruning")]})


def _from_siblings(cfg: Any, run_dir: str, group: str, key_attr: str, key: str, read: Any) -> tuple[str, Any] | None:
    """(the run file, ``read(h5 group)``) of the first other run of the multirun whose finished
    ``/<group>`` has ``@<key_attr>`` == ``key``; None. A run file being replaced, or of an older schema
    (``read`` raising KeyError), is not a source."""
    import h5py

    _, multirun = shared_dirs(cfg, run_dir)
    for path in _siblings(multirun, run_dir):
        try:
            with h5py.File(path, "r") as f:
                h = f.get(group)
                if h is None or not bool(h.attrs.get("complete", False)) or h.attrs.get(key_attr, "") != key:
                    continue
                return path, read(h)
        except (OSError, KeyError):
            continue
    return None


def find_groups(cfg: Any, run_dir: str, key: str) -> tuple[str, list[list[Any]], dict[str, Any], list[str]] | None:
    """Another run of the multirun whose finished ``/groups`` has ``@key`` == ``key``: (its run file,
    the excluded groups ``[name, layer types, reason]``, the cost terms ``{kind: (coef, exps)}``, the
    kept groups' names in order); None."""

    def read(h: Any) -> tuple[list[list[Any]], dict[str, Any], list[str]]:
        terms = {k[:-5]: (h["cost"][k][()], h["cost"][k[:-5] + "_exps"][()]) for k in h["cost"] if k.endswith("_coef")}
        return (json.loads(h.attrs["excluded"]), terms,
                [n.decode() if isinstance(n, bytes) else str(n) for n in h["name"][()]])

    found = _from_siblings(cfg, run_dir, "groups", "key", key, read)
    return None if found is None else (found[0], *found[1])


def dense_key(cfg: Any) -> str:
    """The content key of a dense model trained here: model, data, ``baseline``'s training settings
    (epochs, batch size, learning rate; not its latency settings) and the seed."""
    train = {k: v for k, v in _plain(cfg.baseline).items() if not k.startswith("latency") and k != "copy_checkpoint"}
    return _key("dense", {"model": cfg.model, "data": cfg.data, "baseline": train, "seed": cfg.seed})


class Claim:
    """The lock of ``kind``/``key`` in the shared directory (the cache, else the multirun's directory;
    nothing to lock without either), held while this run computes it: :meth:`acquire` waits,
    logging every minute, while another run holds it. The operating system drops it if the process
    dies."""

    def __init__(self, cfg: Any, run_dir: str, kind: str, key: str) -> None:
        cache, multirun = shared_dirs(cfg, run_dir)
        where = cache or multirun
        self.kind, self.key = kind, key
        self.path = os.path.join(where, f".hpcprune-{kind}-{key}.lock") if where else None
        self.fh: Any = None

    def acquire(self) -> "Claim":
        if self.path is None:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fh = open(self.path, "a+")
        t0, said = time.monotonic(), None
        while True:
            try:
                fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                now = time.monotonic()
                if said is None or now - said >= 60:
                    log.info("%s: another run is computing the same %s (key %s, lock %s): waiting for it (%.0f s)",
                             self.kind, self.kind, self.key[:12], self.path, now - t0)
                    said = now
                time.sleep(1.0)

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def _siblings(multirun: str | None, run_dir: str) -> list[str]:
    if multirun is None:
        return []
    own = os.path.abspath(os.path.join(run_dir, "run.h5"))
    return [p for p in sorted(glob.glob(os.path.join(multirun, "*", "run.h5"))) if os.path.abspath(p) != own]


def find_sensitivity(cfg: Any, run_dir: str, key: str) -> str | None:
    """A finished grid under ``key``: the cache file, or another run file of the multirun; None."""
    import h5py

    cache, multirun = shared_dirs(cfg, run_dir)
    candidates = ([os.path.join(cache, f"sensitivity-{key}.h5")] if cache else []) + _siblings(multirun, run_dir)
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            with h5py.File(path, "r") as f:
                s = f.get("sensitivity")
                if s is not None and bool(s.attrs.get("complete", False)) and s.attrs.get("key", "") == key:
                    return path
        except OSError:  # a run file being replaced, a file that is not HDF5: not a source
            continue
    return None


def copy_sensitivity(src: str, f: Any, key: str) -> None:
    """Copy ``/sensitivity`` of run or cache file ``src`` into the open run file ``f`` (a
    transaction), recording ``@source`` and ``@key``."""
    import h5py

    if "sensitivity" in f:
        del f["sensitivity"]
    with h5py.File(src, "r") as s:
        s.copy(s["sensitivity"], f, name="sensitivity")
    f["sensitivity"].attrs["source"] = os.path.abspath(src)
    f["sensitivity"].attrs["key"] = key


def publish_sensitivity(cfg: Any, run_path: str, key: str) -> None:
    """Put this run's finished grid into the cache directory (a temporary file, renamed), if set."""
    import h5py

    cache = str(cfg.cache_dir) if cfg.get("cache_dir") else None
    if cache is None:
        return
    dest = os.path.join(cache, f"sensitivity-{key}.h5")
    if os.path.exists(dest):
        return
    tmp = f"{dest}.{os.getpid()}.tmp"
    with h5py.File(run_path, "r") as s, h5py.File(tmp, "w") as d:
        s.copy(s["sensitivity"], d, name="sensitivity")
        d["sensitivity"].attrs["source"] = ""  # computed by the run below
        d.attrs["run_file"] = os.path.abspath(run_path)
    os.replace(tmp, dest)
    log.info("sensitivity: grid put in the cache as %s", dest)


def find_dense(cfg: Any, run_dir: str, key: str) -> tuple[str, Any] | None:
    """A dense model trained under ``key``: (where from, its state dict), or None. From the cache's
    ``dense-<key>.safetensors`` or another run of the multirun that trained it (its recorded sha256
    checked on reading)."""
    from .store import RunFile, load_safetensors, read_weights

    cache, _ = shared_dirs(cfg, run_dir)
    if cache:
        path = os.path.join(cache, f"dense-{key}.safetensors")
        if os.path.isfile(path):
            return path, load_safetensors(path)
    found = _from_siblings(cfg, run_dir, "baseline", "dense_key", key, lambda h: None)
    return None if found is None else (found[0], read_weights(RunFile(found[0]), "baseline"))


def eval_key(cfg: Any, dense_digest: str, device: str, metric: str) -> str:
    """The content key of a dense model's evaluation (metric, loss, MACs): its weights
    (:func:`weights_digest`), the model and data configs (the validation set, the example input),
    the kind of device it is evaluated on and the metric. Latency and energy have none: each run
    measures them in its own conditions."""
    return _key("dense-eval", {"dense_digest": dense_digest, "model": cfg.model, "data": cfg.data,
                               "device": device, "metric": metric})


def find_evaluation(cfg: Any, run_dir: str, key: str) -> tuple[str, dict[str, Any]] | None:
    """(the run file, its ``metric``, ``loss``, ``macs``) of another run of the multirun whose finished
    ``/baseline`` has evaluation key ``key``; None."""
    return _from_siblings(cfg, run_dir, "baseline", "eval_key", key, lambda b: {
        "metric": float(b.attrs["metric"]), "loss": float(b.attrs["loss"]), "macs": int(b.attrs["macs"])})


def publish_dense(cfg: Any, state: dict[str, Any], key: str) -> None:
    """Put a dense model trained here into the cache directory, if set."""
    from .store import save_safetensors

    cache = str(cfg.cache_dir) if cfg.get("cache_dir") else None
    if cache is None:
        return
    dest = os.path.join(cache, f"dense-{key}.safetensors")
    if not os.path.exists(dest):
        os.makedirs(cache, exist_ok=True)
        save_safetensors(dest, state)
        log.info("baseline: dense model put in the cache as %s", dest)
