"""``model=hf model.path=DIR``: any local Hugging Face checkpoint, loaded offline and wrapped for hpcprune.

``path`` is a model directory as ``save_pretrained`` writes it (``config.json`` and the weights),
or a ``.gguf`` file (or a directory with ``gguf_file`` naming one inside it: the weights are
dequantised by transformers' GGUF loader, which needs the ``gguf`` package). Loading uses
transformers' Auto classes with ``local_files_only=True`` (and ``HF_HUB_OFFLINE=1``): nothing is
downloaded. The task picks the head and hpcprune's wrapper (:mod:`hpcprune.zoo.hf`):

=====================  =============================  ======================
task                   transformers Auto class        wrapper
=====================  =============================  ======================
causal-lm              AutoModelForCausalLM           HFCausalLM
masked-lm              AutoModelForMaskedLM           HFEncoderLM
image-classification   AutoModelForImageClassification HFImageClassifier
seq2seq-lm             AutoModelForSeq2SeqLM          HFSeq2SeqLM
=====================  =============================  ======================

``task=auto`` reads it from ``config.architectures`` (transformers' own Auto tables say which Auto
class builds an architecture: :func:`hpcprune.hf_plain.wrapper_of`), else from the model type when
exactly one of the four Auto classes knows it (a GGUF file names no architecture), else from the
``auto_map`` of remote code. The prunable structure is then read from the loaded model's config and
modules as for every wrapper (:mod:`hpcprune.zoo.hf_structure`).

Every problem found before the weights load is a :class:`hpcprune.config.ConfigError` of one line
naming the ``model.`` key, its value and what to change.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any

from ..config import ConfigError
from ..hf_plain import AUTO_CLASS, wrapper_of
from ..runs import mark_pretrained

# model.task -> the wrapper (hpcprune.zoo.hf) whose Auto class (hpcprune.hf_plain.AUTO_CLASS) loads it
TASKS = {"causal-lm": "HFCausalLM", "masked-lm": "HFEncoderLM", "image-classification": "HFImageClassifier",
         "seq2seq-lm": "HFSeq2SeqLM"}
TASKS_BY_AUTO = {AUTO_CLASS[w]: t for t, w in TASKS.items()}  # AutoModelForCausalLM -> causal-lm
_CHOICES = "auto, " + ", ".join(TASKS)


_WARNED: set[str] = set()  # model paths whose bidirectional-encoder warning was logged


def hf_model(path: str, dtype: str = "float32", task: str = "auto", gguf_file: str | None = None,
             trust_remote_code: bool = False) -> Any:
    """The local Hugging Face checkpoint ``path`` (module docstring) in hpcprune's wrapper for its task.

    ``dtype``: float32, bfloat16 or float16, the parameters' dtype (``from_pretrained(dtype=...)``;
    a GGUF file is dequantised to it). ``task``: auto or one of :data:`TASKS`. ``gguf_file``: a
    ``.gguf`` name inside the directory ``path`` (or null; ``path`` may also be the ``.gguf`` file).
    ``trust_remote_code``: run the model code a config's ``auto_map`` names (off: such a model is refused).
    Returns an :class:`~hpcprune.zoo.hf.HFCausalLM` (``input_ids[B, T] -> logits[B, T, V]``),
    ``HFEncoderLM``, ``HFImageClassifier`` (``pixel_values[B, C, H, W] -> logits[B, labels]``) or
    ``HFSeq2SeqLM``. Raises :class:`~hpcprune.config.ConfigError` (one line) for a missing path, a
    directory without ``config.json``, remote code not trusted, an unknown task, an architecture no
    wrapper serves, a task the model type has no head for, transformers not installed.
    """
    from . import hf as zhf

    tf = _transformers(path)
    dt = zhf.torch_dtype(dtype)
    folder, gguf = checkpoint_files(path, gguf_file)
    raw = _raw_config(folder, gguf, path)
    _check_remote_code(raw, path, bool(trust_remote_code))
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": bool(trust_remote_code)}
    if gguf:
        zhf._need("gguf")
        kw["gguf_file"] = gguf
    config = tf.AutoConfig.from_pretrained(folder, **kw)
    wrapper = wrapper_for(config, raw, str(task), path)
    auto = getattr(tf, AUTO_CLASS[wrapper])
    if not raw.get("auto_map") and type(config) not in auto._model_mapping:
        task_name = next(t for t, w in TASKS.items() if w == wrapper)
        raise ConfigError(f"model.task={task}: model type {config.model_type!r} ({path}) has no {task_name} head in "
                          f"transformers ({AUTO_CLASS[wrapper]}); choose another model.task ({_CHOICES})")
    hf = auto.from_pretrained(folder, dtype=dt, **kw)
    if wrapper == "HFEncoderLM" and not getattr(hf.config, "is_decoder", False) and path not in _WARNED:
        _WARNED.add(path)  # once per process: the model is built again by every stage
        logging.getLogger("hpcprune.stages").warning(
            "model: %s (%s) is a bidirectional encoder: every position sees the whole window, so with next-token "
            "data (data=text, data=text_files) it reads the very token it is scored on; its perplexity is not a "
            "language model's (the pruned and dense models still compare). A causal model (model.task=causal-lm), or "
            "a masked-LM objective of your own data function, avoids it", type(hf).__name__, config.model_type)
    return mark_pretrained(getattr(zhf, wrapper)(hf))  # the checkpoint's weights: kept, not trained again


def checkpoint_files(path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(model directory, ``.gguf`` file name in it or None) for ``model.path`` / ``model.gguf_file``.
    Raises ConfigError (one line) for a path that does not exist, a file that is not ``.gguf``, a
    directory without ``config.json`` (naming its ``.gguf`` files, if any), a missing ``gguf_file``."""
    p = os.path.expanduser(str(path))
    if os.path.isfile(p):
        if not p.lower().endswith(".gguf"):
            raise ConfigError(f"model.path={path}: a file that is not .gguf; give a model directory (config.json and "
                              "weights, as save_pretrained writes it) or a .gguf file")
        if gguf_file not in (None, os.path.basename(p)):
            raise ConfigError(f"model.gguf_file={gguf_file}: model.path={path} is already a .gguf file; leave "
                              "model.gguf_file null")
        return os.path.dirname(os.path.abspath(p)), os.path.basename(p)
    if not os.path.isdir(p):
        raise ConfigError(f"model.path={path}: no such file or directory; give a local Hugging Face model directory "
                          "or a .gguf file (nothing is downloaded)")
    ggufs = sorted(os.path.basename(f) for f in glob.glob(os.path.join(p, "*.gguf")))
    if gguf_file is not None:
        if not os.path.isfile(os.path.join(p, str(gguf_file))):
            raise ConfigError(f"model.gguf_file={gguf_file}: no such file in model.path={path} (its .gguf files: "
                              f"{', '.join(ggufs) or 'none'})")
        return p, str(gguf_file)
    if not os.path.isfile(os.path.join(p, "config.json")):
        hint = f"give model.gguf_file= one of {', '.join(ggufs)}" if ggufs else "give the directory save_pretrained wrote"
        raise ConfigError(f"model.path={path}: the directory holds no config.json; {hint}")
    return p, None


def wrapper_for(config: Any, raw: dict[str, Any], task: str, path: str) -> str:
    """The wrapper's class name for ``model.task=task`` (auto: module docstring) of a model whose
    transformers config is ``config`` and raw ``config.json`` is ``raw`` ({} for GGUF). Raises
    ConfigError naming the task, or the architecture / model type it cannot tell a task for."""
    if task != "auto":
        if task not in TASKS:
            raise ConfigError(f"model.task={task}: unknown task; choose {_CHOICES}")
        return TASKS[task]
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        wrapper = wrapper_of(arch)
        if wrapper is not None:
            return wrapper
    remote = [TASKS_BY_AUTO[a] for a in raw.get("auto_map") or {} if a in TASKS_BY_AUTO]
    if len(remote) == 1:
        return TASKS[remote[0]]
    if archs:
        raise ConfigError(f"model.path={path}: architecture {archs[0]!r} has no head any hpcprune wrapper serves; give "
                          f"model.task= one of {', '.join(TASKS)} to load it with that head")
    known = [t for t, w in TASKS.items() if _auto_knows(AUTO_CLASS[w], config)]
    if len(known) == 1:
        return TASKS[known[0]]
    raise ConfigError(f"model.task=auto: cannot tell the task of model type {getattr(config, 'model_type', '?')!r} "
                      f"({path} names no architecture{'; heads: ' + ', '.join(known) if known else ''}); give "
                      f"model.task= one of {', '.join(TASKS)}")


def _auto_knows(auto_name: str, config: Any) -> bool:
    from . import hf as zhf

    return type(config) in getattr(zhf._transformers(), auto_name)._model_mapping


def _transformers(path: str) -> Any:
    from . import hf as zhf

    try:
        return zhf._transformers()
    except ImportError:
        raise ConfigError(f"model.path={path}: model=hf needs the transformers package, which is not installed; "
                          "pip install hpcprune[llm]") from None


def _raw_config(folder: str, gguf: str | None, path: str) -> dict[str, Any]:
    """``config.json`` as a dict ({} for a GGUF checkpoint without one); ConfigError when it is no JSON object."""
    file = os.path.join(folder, "config.json")
    if gguf is not None and not os.path.isfile(file):
        return {}
    try:
        with open(file) as fh:
            raw = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.path={path}: config.json cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model.path={path}: config.json holds a {type(raw).__name__}, not a JSON object")
    return raw


def _check_remote_code(raw: dict[str, Any], path: str, trust: bool) -> None:
    """Refuse a config whose model only its own code (``auto_map``) can build while ``trust`` is off:
    a model type transformers does not know. A known type with an ``auto_map`` loads transformers' code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    auto_map = raw.get("auto_map")
    if trust or not auto_map or raw.get("model_type") in CONFIG_MAPPING_NAMES:
        return
    code = sorted({str(v[0] if isinstance(v, (list, tuple)) else v).split(".")[0] for v in auto_map.values()})
    raise ConfigError(f"model.trust_remote_code=false: model type {raw.get('model_type')!r} in {path} needs its own code "
                      f"({', '.join(code)}.py, config.json auto_map); set model.trust_remote_code=true if you trust that code")
