"""The prunable structure of a Hugging Face ``transformers`` model, read from its config and its
modules (no per-family module names): what :meth:`hpcprune.zoo.hf._HFWrapper.prune_structure`
returns (see :mod:`hpcprune.structure`).

From the config: the residual width ``d = config.hidden_size``, the query heads ``H =
config.num_attention_heads``, the key/value heads ``KV = config.num_key_value_heads`` (``H`` when
absent), the head width ``hd = config.head_dim`` (``d // H`` when absent); ``transformers``'
``attribute_map`` gives these names for GPT-2 (``n_embd``, ``n_head``), T5 (``d_model``,
``num_heads``, ``d_kv``), DistilBERT (``dim``, ``n_heads``) and the others. ``n_rep = H // KV``
query heads share one key/value head (grouped-query attention).

From the modules, with ``projections`` = ``nn.Linear`` and HF ``Conv1D`` layers in module order:

- **layers**: every ``nn.ModuleList`` whose children are all of one class and hold an attention
  (decoder / encoder layers; T5's encoder and decoder ``block`` lists) is a stack; each child is a
  removable block.
- **attention**: inside a layer, projections whose parent module has an integer attribute equal to
  ``hd`` (the head width every attention implementation keeps: ``head_dim``, ``head_size``,
  ``attention_head_size``, ``key_value_proj_dim``) and that are either three consecutive
  projections reading the same input with outputs ``(n_rep * u * hd, u * hd, u * hd)`` in any order
  (q, k, v; ``u`` KV heads), or one fused projection with ``(n_rep + 2) * u * hd`` outputs; the
  output projection is the next one in module order that reads ``n_rep * u * hd`` channels and
  writes the width the projections read (``o_proj``, ``attention.output.dense``, ``c_proj``,
  ``dense``). The unit is one KV group (``u`` units), so grouped-query attention stays valid.
  Fused rows are ``[q; k; v]`` blocks (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``), or, for the
  model types in :data:`INTERLEAVED_QKV`, one ``[q k v]`` run per head (GPT-NeoX's
  ``query_key_value``, viewed as ``(..., heads, 3 * hd)``). A layout that does not match what the
  forward computes is caught by ``verify.verify_groups`` (the head oracle) and the group excluded.
- **head counts**: integer attributes of the attention module that its methods read and whose
  name says heads (``num_heads``, ``num_attention_heads``, ``all_head_size``, ``split_size``,
  ``inner_dim``, ...), and ``self.config.<...heads>`` reads (Phi-3 reads
  ``config.num_attention_heads``; each such attention then gets its own copy of the config), are
  rescaled with the kept units.
- **refused heads**, with the reason: an attention holding a parameter with one entry per head
  besides its projections (Cohere's per-head ``q_norm``), a list of per-head modules (StableLM's
  ``q_layernorm.norms``) or a norm over all heads' channels together (OLMo2's ``k_norm``), none of
  which the cut follows; the whole stack's heads when such a parameter is in some layers only (T5's
  ``relative_attention_bias``, whose bias the stack computes in its first layer and passes to every
  other layer), or when the model adds ALiBi slopes (Bloom, MPT, Falcon with ``alibi``: built for the
  config's head count in the model's forward).
- **ignored layers**: the attention projections, every projection writing the residual width ``d``
  (``o_proj``/``down_proj``/``fc2``/``wo``/MLM transforms, pooler) and the output embedding, so that
  Torch-Pruning's remaining groups are the MLP neurons (gated or not, a fused ``gate_up_proj``
  included) and the residual width and embeddings are kept (Gemma's ``embed_scale`` and every
  rotary ``inv_freq`` depend only on ``d`` and ``hd``, which no cut changes).
- **removed layers** are replaced by what the layer's forward returns: the hidden states (``Skip``),
  a 1-tuple (transformers 4.x, :class:`TupleSkip`), or the hidden states and the ``*position_bias``
  arguments it was given (T5, :class:`PassOnSkip`).

Limits: a config whose MLP width equals ``d`` has its MLP up projection ignored as a residual writer
(no neuron groups); a fused layout interleaved per head in a model type not in
:data:`INTERLEAVED_QKV` is excluded by verification, with the reason.
"""
from __future__ import annotations

import ast
import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..structure import HeadSpec, Skip, Structure, StructureError
from ..tp_layers import is_conv1d

# model types whose fused qkv rows are one [q k v] run per (KV) head rather than [q; k; v] blocks
INTERLEAVED_QKV = frozenset({"gpt_neox"})
_COUNT_NAMES = ("inner_dim", "split_size")  # head-count-sized widths whose names do not say "head"
_WIDTH_NAMES = ("head_dim", "head_size", "attention_head_size")  # one head's width: never rescaled


@dataclass
class _Proj:
    name: str
    parent: str
    d_in: int
    d_out: int


def _dims(mod: nn.Module) -> tuple[int, int] | None:
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    if is_conv1d(mod):
        return int(mod.nx), int(mod.nf)
    return None


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _kv_heads(config: Any, H: int) -> int:
    """KV heads of a config: ``num_key_value_heads``; Falcon's own keys (``num_kv_heads`` with the
    new decoder architecture, one KV head when ``multi_query``, else ``H``); ``H``."""
    kv = getattr(config, "num_key_value_heads", None)
    if kv is None and getattr(config, "model_type", "") == "falcon":
        kv = config.num_kv_heads if config.new_decoder_architecture else (1 if config.multi_query else H)
    return int(kv or H)


def _interleaved(config: Any) -> bool:
    """Whether a fused qkv projection holds one ``[q.. k v]`` run per KV head (GPT-NeoX; Falcon
    unless it is multi-query on the old architecture, and GPTBigCode unless multi-query, whose rows
    are ``[q; k; v]``)."""
    kind = getattr(config, "model_type", "")
    if kind == "falcon":
        return bool(config.new_decoder_architecture or not config.multi_query)
    if kind == "gpt_bigcode":  # multi-head: c_attn viewed as (heads, 3 * head_dim); multi-query: [q; k; v]
        return not config.multi_query
    return kind in INTERLEAVED_QKV


def _config_dims(config: Any) -> tuple[int, int, int, int]:
    """(d, H, n_rep, hd) from a transformers config (see the module docstring). StructureError when
    the config has no single residual width and head count (a convolutional network's
    ``hidden_sizes``, a hierarchical transformer's per-stage ``num_heads``)."""
    d, H = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (d, H)):
        raise StructureError(f"model: {type(config).__name__} has no single hidden_size and num_attention_heads "
                             f"(hidden_size={d!r}, num_attention_heads={H!r})")
    d, H = int(d), int(H)
    KV = _kv_heads(config, H)
    hd = int(getattr(config, "head_dim", None) or d // H)
    return d, H, max(1, H // KV), hd


def hf_structure(model: nn.Module, hf: nn.Module) -> Structure:
    """The structure of ``model`` (a wrapper holding the ``transformers`` model ``hf`` as a
    submodule): KV-group heads per attention, layers as blocks, the layers to leave to
    Torch-Pruning. Raises :class:`StructureError` when no layer with an attention is found."""
    d, H, n_rep, hd = _config_dims(hf.config)
    interleaved = _interleaved(hf.config)
    mods = dict(model.named_modules())
    projs = [_Proj(n, _parent(n), *_dims(m)) for n, m in mods.items() if _dims(m) is not None]
    heads: list[HeadSpec] = []
    blocks: list[str] = []
    refused: dict[str, str] = {}
    attn: set[str] = set()  # every attention projection, refused ones included
    for stack in _stacks(mods):
        found = [h for block in stack for h in _attentions([p for p in projs if p.name.startswith(block + ".")], mods,
                                                             n_rep, hd, interleaved)]
        if not found:
            continue
        blocks += stack
        attn |= {n for h in found for n in (*h.fused, *h.q, *h.kv, h.o)}
        tables = {h.name: _head_table(h, mods) for h in found}
        first = next((t for t in tables.values() if t), None)
        # a per-head table in some layers only (T5's relative_attention_bias, in the first): its bias is passed on
        passed = (f"{first}, and its head-sized position bias is passed from layer to layer in this stack (as in T5): "
                  "heads cannot go layer by layer") if first and not all(tables.values()) else None
        alibi = _alibi(hf.config)
        for h in found:
            own = (tables[h.name] and tables[h.name] + _NOT_CUT) or _head_modules(h, mods, d)
            why = passed or alibi or own
            if why:
                refused[f"{h.name}:heads"] = why + " (MLP neurons and whole layers can still be pruned)"
            else:
                h.attrs = _count_attrs(h, mods[h.name])
                heads.append(h)
    for b in blocks:  # mixture-of-experts weights held as one 3-D parameter per projection: not cut, said so
        for name, m in mods[b].named_modules(prefix=b):
            fused = [(pn, tuple(p.shape)) for pn, p in m.named_parameters(recurse=False) if p.dim() == 3]
            if fused and not any(name.startswith(a + ".") or name == a for a in attn):
                refused[f"{name}:experts"] = (
                    f"{name} holds its experts' weights as 3-D parameters ({', '.join(f'{pn} {sh}' for pn, sh in fused)}): "
                    "the experts and their neurons are not cut (the heads, a shared or dense MLP and whole layers can be)")
    if not blocks:
        raise StructureError(f"model: {type(hf).__name__} has no layer list with an attention whose projections fit its "
                             f"config (hidden_size={d}, num_attention_heads={H}, head_dim={hd}, {n_rep} query heads per "
                             "KV head); give the model a prune_structure() (hpcprune/structure.py)")
    out_emb = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    head = [n for n, m in mods.items() if out_emb is not None and m is out_emb][:1]
    ignore = [p.name for p in projs if p.name in attn or p.d_out == d] + head  # attention, residual writers, output
    return Structure(heads=heads, blocks=blocks, ignore=list(dict.fromkeys(ignore)),
                     skip=skip_factory([mods[b] for b in blocks]), refused=refused)


def _stacks(mods: dict[str, nn.Module]) -> list[list[str]]:
    """Qualified child names of every ModuleList whose children are all of one class (outermost only;
    layers already removed, replaced by a skip, are left out)."""
    out: list[list[str]] = []
    for name, m in mods.items():
        if not isinstance(m, nn.ModuleList) or any(name.startswith(b + ".") for s in out for b in s):
            continue
        kept = [i for i, c in enumerate(m) if not isinstance(c, (Skip, TupleSkip, PassOnSkip))]
        if kept and len({type(m[i]) for i in kept}) == 1:
            out.append([f"{name}.{i}" if name else str(i) for i in kept])
    return out


def _has_head_width(mod: nn.Module, hd: int) -> bool:
    return any(isinstance(v, int) and not isinstance(v, bool) and v == hd for v in vars(mod).values())


def _attentions(projs: list[_Proj], mods: dict[str, nn.Module], n_rep: int, hd: int, interleaved: bool) -> list[HeadSpec]:
    """The attentions among one layer's projections (module order), as in the module docstring."""
    out: list[HeadSpec] = []
    i = 0
    while i < len(projs):
        spec, used = _separate(projs, i, mods, n_rep, hd)
        if spec is None:
            spec, used = _fused(projs, i, mods, n_rep, hd, interleaved)
        if spec is None:
            i += 1
            continue
        out.append(spec)
        i = used + 1
    return out


def _output(projs: list[_Proj], start: int, width: int, d_in: int, parent: str) -> int | None:
    """The output projection: the next projection reading ``width`` channels and writing ``d_in``, or
    one defined before the input projections in the same module (Phi-3 defines ``o_proj`` first)."""
    fits = [j for j in range(len(projs)) if projs[j].d_in == width and projs[j].d_out == d_in]
    return next((j for j in fits if j >= start), next((j for j in fits if projs[j].parent == parent), None))


def _separate(projs: list[_Proj], i: int, mods: dict[str, nn.Module], n_rep: int, hd: int) -> tuple[HeadSpec | None, int]:
    three = projs[i:i + 3]
    if len(three) < 3 or len({p.parent for p in three}) != 1 or len({p.d_in for p in three}) != 1:
        return None, i
    if not _has_head_width(mods[three[0].parent], hd):
        return None, i
    kv_out = min(p.d_out for p in three)
    if kv_out % hd or sorted(p.d_out for p in three) != sorted([n_rep * kv_out, kv_out, kv_out]):
        return None, i
    q = next(p for p in three if p.d_out == n_rep * kv_out)
    kv = [p.name for p in three if p is not q]
    o = _output(projs, i + 3, q.d_out, q.d_in, q.parent)
    if o is None or i <= o < i + 3:
        return None, i
    spec = HeadSpec(name=q.parent, q=[q.name], kv=kv, o=projs[o].name, head_dim=hd, units=kv_out // hd, n_rep=n_rep)
    return spec, max(o, i + 2)


def _fused(projs: list[_Proj], i: int, mods: dict[str, nn.Module], n_rep: int, hd: int,
           interleaved: bool) -> tuple[HeadSpec | None, int]:
    p = projs[i]
    per = (n_rep + 2) * hd
    if p.d_out % per or not _has_head_width(mods[p.parent], hd):
        return None, i
    units = p.d_out // per
    o = _output(projs, i + 1, n_rep * units * hd, p.d_in, p.parent)
    if o is None or o == i:
        return None, i
    parts = (per,) if interleaved else (n_rep * hd, hd, hd)
    return HeadSpec(name=p.parent, q=[], kv=[], o=projs[o].name, head_dim=hd, units=units, n_rep=n_rep, fused=[p.name],
                    fused_parts=parts), max(o, i)


def _head_table(h: HeadSpec, mods: dict[str, nn.Module]) -> str | None:
    """A reason when the attention holds a parameter with one entry per query head besides its projections."""
    mine = {*h.fused, *h.q, *h.kv, h.o}
    heads = h.units * h.n_rep
    for pname, p in mods[h.name].named_parameters():
        owner = f"{h.name}.{pname.rsplit('.', 1)[0]}" if "." in pname else h.name
        if owner in mine or p.dim() < 2 or heads not in p.shape:
            continue
        return f"{h.name}.{pname} {tuple(p.shape)} holds a value per head"
    return None


_NOT_CUT = ", which hpcprune does not cut with the heads: a cut would leave the kept heads other heads' values"


def _head_modules(h: HeadSpec, mods: dict[str, nn.Module], d: int) -> str | None:
    """A reason when the attention holds per-head state its projections' cut does not follow: a module
    list with one module per head (StableLM's ``q_layernorm.norms``), or a norm over all heads' channels
    together (OLMo2's ``q_norm`` over the whole projection: its scale mixes the heads)."""
    mine = {*h.fused, *h.q, *h.kv, h.o}
    heads, hd = h.units * h.n_rep, h.head_dim
    for name, m in mods[h.name].named_modules(prefix=h.name):
        if name in mine or name == h.name:
            continue
        if isinstance(m, nn.ModuleList) and len(m) in (heads, h.units) and any(True for _ in m.parameters()):
            return f"{name} holds one {type(m[0]).__name__} per head ({len(m)})" + _NOT_CUT
        w = getattr(m, "weight", None)
        widths = {heads * hd, h.units * hd} - {d}
        if "norm" in type(m).__name__.lower() and isinstance(w, nn.Parameter) and w.dim() == 1 and w.numel() in widths:
            return (f"{name} ({type(m).__name__} over {w.numel()} channels) normalises every head's channels together: "
                    "cutting a head would change the others' scale")
    return None


def _alibi(config: Any) -> str | None:
    """A reason when the model adds ALiBi position slopes (Bloom, MPT, Falcon with ``alibi``): its forward
    builds one slope per head for ``config``'s head count and hands them to every layer."""
    attn = getattr(config, "attn_config", None)  # MPT: an object, or a dict in older configs
    uses = bool(getattr(config, "alibi", False)) or config.model_type == "bloom" or \
        bool(attn.get("alibi", False) if isinstance(attn, dict) else getattr(attn, "alibi", False))
    if not uses:
        return None
    return (f"{config.model_type} adds ALiBi position biases: its forward builds one slope per head for "
            "the config's head count and passes them to every layer, so a layer with fewer heads would get other "
            "heads' slopes: heads cannot be cut")


@functools.lru_cache(maxsize=None)
def _reads(cls: type) -> tuple[frozenset[str], frozenset[str]]:
    """(``self.<x>`` names, ``self.config.<x>`` names) read by the methods of ``cls`` and its bases
    (not ``__init__``), once per class; ``{"*"}`` when a source cannot be read (every attribute counts)."""
    own, cfg = set(), set()
    for k in inspect.getmro(cls):
        if k in (nn.Module, object):
            break
        for name, fn in vars(k).items():
            if name == "__init__" or not inspect.isfunction(fn):
                continue
            try:
                src = inspect.getsource(fn)
            except (OSError, TypeError):
                return frozenset({"*"}), frozenset()
            own |= set(re.findall(r"self\.(\w+)", src))
            cfg |= set(re.findall(r"self\.config\.(\w+)", src))
    return frozenset(own), frozenset(cfg)


def _count_attrs(h: HeadSpec, attn: nn.Module) -> list[tuple[str, str, int]]:
    """``(module, attribute, value per unit)`` for the head counts the attention's methods read."""
    own, cfg = _reads(type(attn))
    heads, q_width = h.units * h.n_rep, h.units * h.n_rep * h.head_dim

    def per_unit(value: Any) -> int | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        return {heads: h.n_rep, h.units: 1, q_width: h.n_rep * h.head_dim}.get(value)

    out = []
    for a, v in vars(attn).items():
        said = ("head" in a or a in _COUNT_NAMES) and a not in _WIDTH_NAMES
        if said and ("*" in own or a in own) and per_unit(v) is not None:
            out.append((h.name, a, per_unit(v)))
    config = getattr(attn, "config", None)
    for a in sorted(cfg):
        v = getattr(config, a, None)
        if "head" in a and a not in _WIDTH_NAMES and per_unit(v) is not None:
            out.append((h.name, f"config.{a}", per_unit(v)))
    return out


# ---- removed layers ---------------------------------------------------------------------------------
def _returns_tuple(block: nn.Module) -> int:
    """How many values a layer's forward returns as a tuple (0: the hidden states tensor alone), from its
    body where that says it: ``return hidden_states`` (its first argument) everywhere is a tensor, whatever
    the annotation says (Gemma 3's says tuple); a ``return a, b`` is a 2-tuple (Falcon's, Bloom's and
    DeBERTa-v2's layers return ``(hidden_states, attn_weights)``); otherwise from the return annotation
    (transformers 4.x layers: a tuple, ``(hidden_states,)`` first; 5.x: the tensor)."""
    forward = type(block).forward
    returns, first = _returns(forward)
    if returns and all(isinstance(r, ast.Name) and r.id == first for r in returns):
        return 0
    sizes = [len(r.elts) for r in returns if isinstance(r, ast.Tuple)]
    if sizes:
        return max(sizes)
    try:
        ann = inspect.signature(forward).return_annotation
    except (TypeError, ValueError):
        return 0
    return 1 if ann is not inspect.Signature.empty and "tuple" in str(ann).lower() else 0


def _returns(fn: Callable) -> tuple[list[ast.AST], str | None]:
    """The values of ``fn``'s own ``return`` statements (not a nested function's), and the name of its
    first argument after ``self``; ([], None) when the source cannot be read."""
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return [], None
    body = tree.body[0] if tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if body is None:
        return [], None
    args = [a.arg for a in body.args.args]
    first = args[1] if len(args) > 1 else None
    out: list[ast.AST] = []
    stack: list[ast.AST] = list(body.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Return) and node.value is not None:
            out.append(node.value)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))
    return out, first


def _passed_on(block: nn.Module) -> list[tuple[int, str]]:
    """(position after the hidden states, name) of the forward's ``*position_bias`` arguments: values
    a layer hands on to the next one (T5's relative position biases)."""
    try:
        names = [n for n in inspect.signature(block.forward).parameters]
    except (TypeError, ValueError):
        return []
    return [(i, n) for i, n in enumerate(names) if i > 0 and n.endswith("position_bias")]


class TupleSkip(nn.Module):
    """A removed layer whose model expects a tuple back: ``(hidden_states,)`` (transformers 4.x layers),
    or ``(hidden_states, None, ...)`` of ``size`` values (a layer that returns its attention weights too)."""

    def __init__(self, size: int = 1) -> None:
        super().__init__()
        self.size = int(size)

    def forward(self, x, *args, **kwargs):  # noqa: D401
        return (x,) + (None,) * (self.size - 1)


class PassOnSkip(nn.Module):
    """A removed layer that hands on what it was given: ``(hidden_states, *passed)`` where ``passed``
    are its ``*position_bias`` arguments (T5: a layer returns the position biases the next one uses;
    the first layer computes them, so without it the others compute their own zero bias)."""

    def __init__(self, passed: list[tuple[int, str]]) -> None:
        super().__init__()
        self.passed = list(passed)

    def forward(self, x, *args, **kwargs):  # noqa: D401
        return (x, *(kwargs[n] if n in kwargs else (args[i - 1] if i - 1 < len(args) else None) for i, n in self.passed))


def skip_factory(blocks: list[nn.Module]) -> Callable[[nn.Module], nn.Module] | None:
    """The replacement of a removed layer, by what the layer's forward returns; None (the default
    :class:`hpcprune.structure.Skip`) when every layer returns its hidden states as a tensor."""
    if not any(_passed_on(b) or _returns_tuple(b) for b in blocks):
        return None

    def skip(block: nn.Module) -> nn.Module:
        passed = _passed_on(block)
        if passed:
            return PassOnSkip(passed)
        size = _returns_tuple(block)
        return TupleSkip(size) if size else Skip()

    return skip
