"""A pruned Hugging Face model as a config that plain ``transformers`` builds at the pruned shapes:
``AutoModelFor...from_pretrained(dir)`` loads it without hpcprune (used by :func:`hpcprune.save_hf_dir`).

What one config can say (read in transformers 5.24's sources): every supported family (Llama,
Qwen2/3, Mistral, Gemma/Gemma 2, Phi, Phi-3, OPT, GPT-2, GPT-NeoX, BERT, RoBERTa, DistilBERT, ViT,
T5) sizes all its layers from one global value per width: ``intermediate_size`` (``ffn_dim``,
``n_inner``, ``hidden_dim``, ``d_ff``), ``num_attention_heads`` / ``num_key_value_heads``, and
``num_hidden_layers`` (``num_decoder_layers`` for T5's decoder). transformers 5.24 has per-layer
configs (``PreTrainedConfig.per_layer_config``, the ``HeterogeneousConfigMixin``), but only a few
model files read them (Gemma 4 and its embedding / diffusion / unified variants, Dots3, Step3p7,
NeoMME: mostly their attention's head width, KV heads or sliding window per layer; Gemma 3n's own
``intermediate_size`` list aside); Llama and the families above read ``config.intermediate_size``
and ``config.num_key_value_heads`` and raise ``AmbiguousGlobalPerLayerAttributeError`` when those
are per layer (``LlamaConfig`` cannot even save per-layer head counts: its check reads the global
one). So:

- **MLP neurons**: when every kept layer keeps the same number (a uniform cut), that number is the
  MLP width key (Phi-3's fused ``gate_up_proj`` too: its kept rows are ``[gate; up]`` of the kept
  neurons, what Phi-3 builds at the smaller width);
- **heads**: when every attention keeps the same number of KV groups, ``num_attention_heads`` and
  ``num_key_value_heads`` are the kept counts and ``head_dim`` is set to the head width (Llama,
  Qwen, Mistral, Gemma, Phi, Phi-3 and ViT read it). Families that size a head only as
  ``hidden_size / num_attention_heads`` (GPT-2, GPT-NeoX, OPT, BERT, RoBERTa, DistilBERT) build
  other shapes from that config and are refused by the shape check below: their MLP widths and
  removed layers still go plain, their heads only through hpcprune's directory;
- **removed layers**: the layer list is renumbered (kept layers in order), the layer count key is
  the number kept and lists with one entry per layer (``layer_types``) keep the kept layers'
  entries; T5 is refused when its first layer goes (only that layer holds the position bias table);
- widths that differ between layers: not expressible (the reason names the widths).

Nothing is assumed: the config's model is built on the meta device and every tensor's shape must
equal the renumbered pruned state dict's, then the written directory is loaded with
``from_pretrained`` and its outputs compared with the pruned model's (:func:`check_plain`).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .graph import Graph, GroupInfo
from .tp_layers import is_conv1d

MLP_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "hidden_dim", "d_ff", "ffn_hidden_size")  # the MLP width's config name
DECODER_LAYER_KEYS = ("num_decoder_layers", "decoder_layers")  # a decoder stack's own layer count
# wrapper -> the Auto class that loads the directory (and the one its test names)
AUTO_CLASS = {"HFCausalLM": "AutoModelForCausalLM", "HFEncoderLM": "AutoModelForMaskedLM",
              "HFImageClassifier": "AutoModelForImageClassification", "HFSeq2SeqLM": "AutoModelForSeq2SeqLM"}
# wrapper -> transformers' table of the architectures its Auto class builds (model type -> class name)
_AUTO_TABLE = {"HFCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "HFEncoderLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
               "HFImageClassifier": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
               "HFSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"}


def wrapper_of(arch: str) -> str | None:
    """The hpcprune wrapper that runs transformers architecture ``arch`` (a class name such as
    ``LlamaForCausalLM``), from transformers' own Auto tables; None when none does."""
    from transformers.models.auto import modeling_auto

    for wrapper, table in _AUTO_TABLE.items():
        for names in getattr(modeling_auto, table).values():
            if arch in ((names,) if isinstance(names, str) else tuple(names)):
                return wrapper
    return None


def is_projection(mod: Any) -> bool:
    """An ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2's transposed linear)."""
    return isinstance(mod, nn.Linear) or (mod is not None and is_conv1d(mod))


@dataclass
class Layer:
    """One layer of a stack (a ``ModuleList`` of blocks) after pruning."""

    stack: str  # the layer list's module name in the wrapper ("hf.model.layers")
    index: int  # its position in the dense list
    removed: bool = False
    mlp: int | None = None  # MLP neurons kept (None: no neuron group in this layer)
    kv_heads: int | None = None  # KV groups kept (None: no head group)


def layers_of(model: nn.Module, groups: Sequence[GroupInfo], plan: dict[str, Sequence[int]]) -> tuple[list[Layer], str]:
    """Every layer of the pruned wrapper ``model`` with its kept widths, from the dense ``groups`` and
    the ``plan`` (kept units or root channels per group; a group not in it is kept whole), and a
    reason (empty when none) why they do not map onto layers (a group outside every layer, two
    neuron groups in one layer)."""
    blocks = [g.block for g in groups if g.kind == "block" and g.block]
    stacks = sorted({b.rpartition(".")[0] for b in blocks})
    layers = {f"{s}.{i}": Layer(s, i) for s in stacks for i in range(len(model.get_submodule(s)))}
    for g in groups:
        kept = g.size if g.name not in plan else len(Graph.plan_units(g, plan[g.name]))
        if g.kind == "block":
            layers[g.block].removed = kept == 0  # type: ignore[index]
            continue
        owner = next((n for n in layers if g.name.startswith(n + ".")), None)
        if owner is None:
            if kept == g.size:
                continue
            return [], f"group {g.name} lies outside the layer lists ({', '.join(stacks) or 'none'})"
        field_ = {"neurons": "mlp", "heads": "kv_heads"}.get(g.kind)
        if field_ is None:
            return [], f"group {g.name} cuts {g.kind}, which no config width describes"
        if getattr(layers[owner], field_) is not None:
            return [], f"layer {owner} holds two {g.kind} groups (one config width per layer and kind)"
        setattr(layers[owner], field_, kept)
    return list(layers.values()), ""


def _differ(what: str, values: dict[str, int], key: str, arch: str) -> str:
    shown = ", ".join(f"{n}: {v}" for n, v in list(values.items())[:6])
    return (f"layers keep different {what} ({shown}{', ...' if len(values) > 6 else ''}); {arch} reads one "
            f"{key} for every layer (its transformers code reads no per-layer value)")


def _label(l: Layer, layers: Sequence[Layer]) -> str:
    """``layer 3``, or ``decoder 3`` in a model with several layer lists."""
    return f"layer {l.index}" if len({x.stack for x in layers}) == 1 else f"{l.stack.rsplit('.', 2)[-2]} {l.index}"


def mlp_key(config: Any, dense_width: int | None) -> str | None:
    """The config's name for the MLP width (one of :data:`MLP_KEYS` holding ``dense_width``, or
    None meaning its default, as GPT-2's ``n_inner``)."""
    return next((k for k in MLP_KEYS if hasattr(config, k) and getattr(config, k) in (dense_width, None)), None)


def plain_config(config: Any, arch: str, layers: Sequence[Layer], dense: dict[str, int], n_rep: int,
                 head_dim: int) -> tuple[Any, str]:
    """``(config, "")``: a copy of the dense ``config`` whose global widths are the pruned ones; or
    ``(None, reason)`` when one config cannot hold them. ``dense``: ``{"mlp": neurons per layer,
    "kv_heads": KV groups per attention}`` before pruning (absent: the kind was not found)."""
    kept = [l for l in layers if not l.removed]
    cfg = copy.deepcopy(config)
    mlp = {_label(l, layers): l.mlp for l in kept if l.mlp is not None}
    if len(set(mlp.values())) > 1:
        return None, _differ("MLP widths", mlp, "MLP width", arch)
    if mlp and set(mlp.values()) != {dense.get("mlp")}:
        key = mlp_key(cfg, dense.get("mlp"))
        if key is None:
            return None, f"{type(cfg).__name__} names its MLP width none of {', '.join(MLP_KEYS)}"
        setattr(cfg, key, next(iter(mlp.values())))
    kv = {_label(l, layers): l.kv_heads for l in kept if l.kv_heads is not None}
    if len(set(kv.values())) > 1:
        gqa = getattr(cfg, "num_key_value_heads", None) is not None
        return None, _differ("KV head counts" if gqa else "head counts", kv, "num_key_value_heads" if gqa else
                             "num_attention_heads", arch)
    if kv and set(kv.values()) != {dense.get("kv_heads")}:
        units = next(iter(kv.values()))
        try:
            cfg.num_attention_heads = units * n_rep
            if getattr(cfg, "num_key_value_heads", None) is not None or n_rep > 1:
                cfg.num_key_value_heads = units
            cfg.head_dim = head_dim  # families that read it keep the head width; the others fail the shape check
        except AttributeError:  # a derived property (Falcon's head_dim = hidden_size / num_attention_heads)
            return None, (f"{type(cfg).__name__} derives the head width from hidden_size / num_attention_heads: "
                          f"{arch} cannot be built with fewer heads of the same width")
    stacks = sorted({l.stack for l in layers})
    for stack in stacks:
        mine = [l for l in layers if l.stack == stack]
        if not any(l.removed for l in mine):
            continue
        if mine[0].removed and hasattr(cfg, "relative_attention_num_buckets"):
            return None, f"{stack}.0 is removed and only that layer holds {arch}'s relative position bias table"
        key = next((k for k in DECODER_LAYER_KEYS if hasattr(cfg, k)), None) if "decoder" in stack and len(stacks) > 1 else None
        setattr(cfg, key or "num_hidden_layers", sum(not l.removed for l in mine))
        if len(stacks) == 1:
            _slice_layer_lists(cfg, [l.index for l in mine if not l.removed], len(mine))
    return cfg, ""


def described_config(config: Any, layers: Sequence[Layer], dense: dict[str, int], n_rep: int, head_dim: int) -> Any:
    """A copy of the dense ``config`` that describes the pruned widths, for the directory of a model
    plain transformers cannot build: a width every kept layer shares is set globally, widths that
    differ go to transformers' ``per_layer_config`` (``config.per_layer_config[i].intermediate_size``),
    with ``allow_global_per_layer_attribute_access`` set so that config classes whose checks read the
    global value (``LlamaConfig.validate_architecture``) still save and load it. Removed layers keep
    their entries (``num_hidden_layers`` counts the dense layers). Models with several layer lists
    (T5) get only the global values."""
    cfg = copy.deepcopy(config)
    kept = [l for l in layers if not l.removed]
    key = mlp_key(cfg, dense.get("mlp"))
    per: dict[int, dict[str, int]] = {}

    def put(values: dict[int, int], settings: Any) -> None:
        if len(set(values.values())) == 1:
            for k, v in settings(next(iter(values.values()))).items():
                setattr(cfg, k, v)
        elif len({l.stack for l in layers}) == 1:
            for i, v in values.items():
                per.setdefault(i, {}).update(settings(v))

    mlp = {l.index: l.mlp for l in kept if l.mlp is not None}
    if key is not None and mlp and set(mlp.values()) != {dense.get("mlp")}:
        put(mlp, lambda v: {key: v})
    kv = {l.index: l.kv_heads for l in kept if l.kv_heads is not None}
    if kv and set(kv.values()) != {dense.get("kv_heads")}:
        gqa = getattr(cfg, "num_key_value_heads", None) is not None
        put(kv, lambda v: {"num_attention_heads": v * n_rep, **({"num_key_value_heads": v} if gqa else {})})
        cfg.head_dim = head_dim
    if per:
        cfg.per_layer_config = per
        cfg.allow_global_per_layer_attribute_access = True
    return cfg


def _slice_layer_lists(cfg: Any, kept: list[int], n: int) -> None:
    """Config lists with one entry per layer (``layer_types``, ``mlp_layer_types``) keep the kept
    layers' entries."""
    for key, value in cfg.to_dict().items():
        if key.endswith("layer_types") and isinstance(value, list) and len(value) == n:
            setattr(cfg, key, [value[i] for i in kept])


@contextlib.contextmanager
def renumbered(model: nn.Module, layers: Sequence[Layer], config: Any) -> Iterator[nn.Module]:
    """The wrapper's ``hf`` model with removed layers dropped from their lists (the kept ones
    renumbered in order) and ``config`` as its config, for saving; put back on exit."""
    hf = model.hf
    saved: list[tuple[nn.Module, str, Any]] = [(hf, "config", hf.config)]
    for stack in sorted({l.stack for l in layers if l.removed}):
        parent, _, child = stack.rpartition(".")
        owner = model.get_submodule(parent)
        old = getattr(owner, child)
        drop = {l.index for l in layers if l.stack == stack and l.removed}
        saved.append((owner, child, old))
        setattr(owner, child, nn.ModuleList([m for i, m in enumerate(old) if i not in drop]))
    hf.config = config
    try:
        yield hf
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def shape_mismatch(hf: nn.Module, config: Any) -> str:
    """Empty when ``type(hf)(config)`` (built on the meta device) has exactly ``hf``'s tensors and
    shapes; else the first difference, as text."""
    with torch.device("meta"):
        probe = type(hf)(config)
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    for k in sorted(set(want) | set(have)):
        if want.get(k) != have.get(k):
            return (f"{type(hf).__name__} built from that config has {k} {want.get(k, 'missing')}, the pruned model "
                    f"{have.get(k, 'nothing')}")
    return ""


def tolerance(dtype: torch.dtype) -> float:
    """Largest |difference| / max(1, max |reference|) two runs of the same model may differ by."""
    return 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2


def check_plain(path: str, wrapper: str, model: nn.Module, example: torch.Tensor) -> float:
    """Load ``path`` with ``transformers.<Auto class>.from_pretrained`` (strict: no missing,
    unexpected or mismatched tensor), wrap it as ``wrapper`` and return max |its output - ``model``'s|
    on ``example``. Raises ValueError naming what did not load."""
    from .zoo import hf as zhf

    tf = zhf._transformers()
    auto = getattr(tf, AUTO_CLASS[wrapper])
    loaded, info = auto.from_pretrained(path, output_loading_info=True)
    bad = {k: sorted(map(str, v))[:3] for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise ValueError(f"{AUTO_CLASS[wrapper]}.from_pretrained({path}) loads with {bad or info['error_msgs']}")
    again = getattr(zhf, wrapper)(loaded).eval()
    with torch.no_grad():
        return float((again(example).float() - model(example).float()).abs().max())
