"""Build models and data from a config, and rebuild dense / pruned / fine-tuned models from a run file.

A run file holds no pickled modules: a pruned model is the config's model, the stored dense
weights, the stored plan (kept channel indices per group) and, once fine-tuned, the stored final
weights. Weights are read through :func:`hpcprune.store.read_weights` (schema 2: safetensors files
beside the run file, or the referenced dense checkpoint; schema 1: datasets inside it).
"""
from __future__ import annotations

import functools
import sys
import threading
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .compensate import create_missing_biases
from .graph import Graph
from .structure import structure_of
from .store import RunFile, has_weights, read_weights


# a model function whose model comes with trained weights (a checkpoint directory, a weights file) sets this
# attribute on the module it returns: the baseline stage keeps those weights instead of training from scratch
PRETRAINED = "hpcprune_pretrained"


def mark_pretrained(model: nn.Module) -> nn.Module:
    """Mark ``model`` as coming with trained weights (``model=hf``, SmolLM2, torchvision with
    ``model.weights``): the baseline stage measures it as it is and never trains it unless
    ``baseline.train_pretrained=true``. Returns ``model``."""
    setattr(model, PRETRAINED, True)
    return model


def is_pretrained(model: nn.Module) -> bool:
    """Whether the model function marked ``model`` with :func:`mark_pretrained`."""
    return bool(getattr(model, PRETRAINED, False))


def build_model(model_cfg: Any) -> nn.Module:
    """The model of a config's ``model`` node (Hydra's ``instantiate``). ConfigError, one line
    naming the ``_target_``, when it cannot be built (its package not importable here: a run file
    read by ``load_pruned`` or ``hpcprune.export`` in another environment)."""
    from hydra.utils import instantiate

    from .config import instantiate as named

    return named("model", lambda node: instantiate(node, _convert_="all"), model_cfg)


# torch.nn.init's in-place initialisers (kaiming_uniform_, normal_, ...): what layers' reset_parameters
# and model builders call
_INITS = tuple(n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn.init, n)))
_ORIGINAL_INITS = {n: getattr(nn.init, n) for n in _INITS}
_skipping = threading.local()  # .touched: the tensors skipped by the build_to_load running in this thread


def _skippable(name: str) -> Any:
    """``torch.nn.init.<name>`` that does nothing while :func:`build_to_load` builds a model in this
    thread (it notes the tensor) and is the original otherwise. A library imported during such a
    build may keep a reference to it (transformers' ``TORCH_INIT_FUNCTIONS`` table does): that
    reference must still initialise after the build, or every model it builds later keeps
    uninitialised tensors (a BERT's ``token_type_ids`` buffer, garbage token types)."""
    original = _ORIGINAL_INITS[name]

    @functools.wraps(original)
    def init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        touched = getattr(_skipping, "touched", None)
        if touched is None:
            return original(tensor, *args, **kwargs)
        if isinstance(tensor, torch.Tensor):
            touched.append(tensor)
        return tensor
    return init


_SKIPPABLE_INITS = {n: _skippable(n) for n in _INITS}


def _bound_inits() -> list[tuple[dict, str]]:
    """(module namespace, name) for every loaded module that imported an initialiser by name
    (``from torch.nn.init import xavier_uniform_``: ``nn.MultiheadAttention``'s packed projection,
    ``nn.Transformer``), which patching ``torch.nn.init`` does not reach: vit_h_14's 32 attention
    layers drew 2.6 s of random numbers in every build meant for loading."""
    out = []
    for mod in list(sys.modules.values()):
        try:
            namespace = vars(mod)
        except Exception:  # noqa: BLE001 - an entry of sys.modules that is not a module (a shim)
            continue
        if not isinstance(namespace, dict) or mod is nn.init:
            continue
        out += [(namespace, n) for n in _INITS if namespace.get(n) is _ORIGINAL_INITS[n]]
    return out


def build_to_load(model_cfg: Any) -> nn.Module:
    """:func:`build_model` for a model whose weights are loaded next: ``torch.nn.init``'s
    initialisers are skipped while it is built (the idea of transformers' ``no_init_weights``;
    wide_resnet101_2 0.98 -> 0.01 s, vit_h_14 4.2 -> 0.07 s, once per stage that rebuilds the dense
    model). A tensor they would have initialised that the state dict does not hold (a non-persistent
    buffer) makes it build the model again, initialised: nothing is left uninitialised unless the
    state dict overwrites it."""
    touched: list[torch.Tensor] = []
    _skipping.touched = touched
    bound = _bound_inits()
    try:
        for n in _INITS:
            setattr(nn.init, n, _SKIPPABLE_INITS[n])
        for namespace, n in bound:
            namespace[n] = _SKIPPABLE_INITS[n]
        model = build_model(model_cfg)
    finally:
        _skipping.touched = None
        for n, f in _ORIGINAL_INITS.items():
            setattr(nn.init, n, f)
        for namespace, n in bound:
            namespace[n] = _ORIGINAL_INITS[n]
    held = {t.data_ptr() for t in model.state_dict().values() if isinstance(t, torch.Tensor)}
    if any(t.numel() and t.data_ptr() not in held for t in touched):
        return build_model(model_cfg)
    return model


_TASK_FIELDS = ("train", "val", "calib", "example_input", "num_classes")


def build_data(data_cfg: Any) -> Any:
    """The data config's object; a function that returns anything without :class:`hpcprune.zoo.data.TaskData`'s
    fields is refused in one line (``ConfigError``) naming what it returned."""
    from hydra.utils import instantiate

    from .config import ConfigError
    from .config import instantiate as named

    data = named("data", lambda node: instantiate(node, _convert_="all"), data_cfg)
    missing = [k for k in _TASK_FIELDS if not hasattr(data, k)]
    if missing:
        target = data_cfg.get("_target_") if hasattr(data_cfg, "get") else None
        raise ConfigError(f"data._target_={target}: returned a {type(data).__name__}, not a TaskData (it has no "
                          f"{', '.join(missing)}): return hpcprune.zoo.data.TaskData(train, val, calib, example_input, "
                          "num_classes, metric) (see examples/)")
    return data


def load_config(run: RunFile) -> DictConfig:
    return OmegaConf.create(run.attrs()["config"])


def read_plan(run: RunFile) -> dict[str, list[int]]:
    with run.read() as f:
        if "pruned/plan" not in f:
            raise KeyError(f"{run.path}: no pruning plan yet (the prune stage has not completed)")
        plan = f["pruned/plan"]
        order = [n.decode() if isinstance(n, bytes) else str(n) for n in plan.attrs["groups"]]
        return {name: plan[name][()].tolist() for name in order}


def dense_model(run: RunFile, cfg: DictConfig | None = None) -> nn.Module:
    cfg = cfg or load_config(run)
    model = build_to_load(cfg.model)
    load_weights(model, read_weights(run, "baseline"))  # strict: every parameter and persistent buffer
    return model.eval()


def load_weights(model: nn.Module, state: Any) -> None:
    """``model.load_state_dict(state)`` (strict) that takes the state dict's tensors as they are
    (``assign=True``) instead of copying each into the model's own: a safetensors file's tensors are
    its pages, mapped copy-on-write (:func:`hpcprune.store.load_safetensors`), so loading costs no
    copy (vit_h_14: 2.5 GB, 3-7 s a load on one CPU thread, four loads a run). Each parameter keeps
    its ``requires_grad``, and names that share one parameter (a tied embedding and output head)
    keep sharing it. Where that cannot hold (a state dict with other dtypes, or tied names stored as
    two tensors), the tensors are copied as ``load_state_dict`` always did."""
    own = dict(model.named_parameters(remove_duplicate=False))
    tensors = {**own, **dict(model.named_buffers(remove_duplicate=False))}
    wrapped: dict[int, nn.Parameter] = {}  # id of the model's parameter -> the loaded one that replaces it
    taken: dict[int, Any] = {}  # id of the model's parameter -> the stored tensor it takes
    out: Any = type(state)()
    assign = True
    for k, v in state.items():
        mine = tensors.get(k)
        if not isinstance(v, torch.Tensor) or mine is None or v.dtype != mine.dtype or v.device != mine.device:
            assign = False
            break
        if k in own:
            first = taken.setdefault(id(mine), v)
            if first is not v:  # one parameter of the model, two tensors in the state dict
                assign = False
                break
            if id(mine) not in wrapped:
                wrapped[id(mine)] = nn.Parameter(v, requires_grad=mine.requires_grad)
            v = wrapped[id(mine)]
        out[k] = v
    if not assign:
        model.load_state_dict(state)
        return
    if getattr(state, "_metadata", None) is not None:
        out._metadata = state._metadata
    model.load_state_dict(out, assign=True)


def example_input(run: RunFile) -> torch.Tensor:
    """The data's example input the run recorded (``/baseline/example_input``), in its own dtype
    (``@torch_dtype``: a bfloat16 input is stored as float32, which holds it exactly)."""
    with run.read() as f:
        d = f["baseline/example_input"]
        x = torch.from_numpy(d[()])
        dtype = d.attrs.get("torch_dtype")  # absent in run files written before it was recorded
    return x if dtype is None else x.to(getattr(torch, str(dtype)))


def pruned_model(run: RunFile, cfg: DictConfig | None = None, weights: str = "final") -> nn.Module:
    """The pruned model rebuilt from the dense weights and the plan, then loaded with stored weights:

    ``plan``: dense weights cut by the plan, nothing else; ``pruned``: the weights right after
    pruning (BatchNorm statistics re-estimated); ``final``: the fine-tuned weights when the run has
    them, else the pruned ones; ``dense``: the dense model itself, uncut.
    """
    if weights not in ("plan", "pruned", "final", "dense"):
        raise ValueError(f"weights={weights!r}: choose final, pruned, plan or dense")
    cfg = cfg or load_config(run)
    model = dense_model(run, cfg)
    if weights == "dense":
        return model.eval()
    ignore = list(cfg.groups.ignore) if cfg.groups.ignore else []
    graph = Graph(model, example_input(run), ignore_names(model, ignore))
    graph.apply_plan(read_plan(run))
    if weights != "plan":
        with run.read() as f:
            stored = [s for s in (("final", "pruned") if weights == "final" else ("pruned",)) if has_weights(f, s)]
        if stored:
            state = read_weights(run, stored[0])
            create_missing_biases(model, {k: v.shape for k, v in state.items()})  # prune.bias_compensation's (compensate)
            load_weights(model, state)
    return model.eval()


def load_pruned(path: str, weights: str = "final") -> nn.Module:
    """Rebuild the pruned (and, when done, fine-tuned) model of the run file at ``path``;
    ``weights``: ``final`` (default), ``pruned`` (before fine-tuning), ``plan`` (dense weights cut by
    the plan) or ``dense`` (the uncut dense model, to compare against). Raises
    :class:`hpcprune.store.RunFileError` for a file that is not a run file (or does not exist)."""
    run = RunFile(path)
    run.check()
    return pruned_model(run, weights=weights)


def ignore_names(model: nn.Module, ignore: list[str]) -> list[str]:
    """``groups.ignore`` names, then the layers the model itself declares unprunable at their
    outputs: its ``prune_structure()`` ``ignore`` list (see :mod:`hpcprune.structure`; e.g. attention
    projections whose outputs are split into heads of a fixed width: cutting single channels there
    breaks the model), or the names a ``prune_ignore()`` method returns. The layers that produce the
    model's output (a classifier, a conv classifier, a vocabulary head) need no entry: the groups
    stage finds them by what they are (cutting them changes the output's shape) and keeps them."""
    declared = getattr(model, "prune_ignore", None)
    extra = [str(n) for n in declared()] if callable(declared) else []
    extra += structure_of(model).ignore
    return list(dict.fromkeys([*ignore, *extra]))

