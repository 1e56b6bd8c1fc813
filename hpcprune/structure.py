"""What a model tells hpcprune about its transformer structure: attention heads and whole blocks.

Torch-Pruning's dependency graph sees channels; it cannot know that the output rows of a query
projection come in heads of ``head_dim``, nor remove a whole residual block (its issue #254). A
model exposes both through one optional method::

    def prune_structure(self) -> Structure: ...

- ``heads``: one :class:`HeadSpec` per attention layer. The prunable unit is a *KV group*: one
  key/value head and the ``n_rep`` query heads that share it (grouped-query attention); with
  ``n_rep == 1`` (multi-head attention) that is a single head. Removing whole KV groups keeps
  every attention valid: the number of query heads per KV head does not change, and the head count
  follows from the weights (``view(..., -1, head_dim)``).
- ``blocks``: qualified names of residual blocks (decoder layers) that can be skipped outright: the
  block's output is its input. A removed block is replaced by ``skip`` (default :class:`Skip`,
  which returns its first argument), so other modules keep their names and state-dict keys.
- ``ignore``: layers whose output channels Torch-Pruning must not cut one by one (the attention
  projections: channels inside a head are not independent).
- ``refused``: groups the model has but that cannot be pruned, and why (recorded as excluded).

Built-in models implement it (``zoo.gpt.TinyGPT``; the Hugging Face wrappers in ``zoo.hf`` read it from
the model's config and modules, ``zoo.hf_structure``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .errors import HpcpruneError


@dataclass
class HeadSpec:
    """One attention layer's projections, in units of KV groups.

    ``q``: layers whose output rows hold the query heads (``n_rep * head_dim`` rows per unit);
    ``kv``: layers whose output rows hold the key and value heads (``head_dim`` rows per unit);
    ``o``: the layer whose input columns hold the attention output (laid out like ``q``);
    ``fused``: layers whose rows hold q, k and v of every unit, in blocks of ``fused_parts`` rows per
    unit; ``attrs``: ``(module, attribute, value per unit)`` rescaled when units go, for
    implementations that store a head count (empty for models that infer it from the weights); an
    attribute ``config.<name>`` sets ``<name>`` on the module's own copy of its ``config``.
    """

    name: str  # the attention module (the group is named ``f"{name}:heads"``)
    q: list[str]
    kv: list[str]
    o: str
    head_dim: int
    units: int  # KV heads (= attention heads when n_rep == 1)
    n_rep: int = 1  # query heads per KV head
    attrs: list[tuple[str, str, int]] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)  # layers whose rows hold q, k and v together (see fused_parts)
    # rows per unit of each consecutive block of a fused layer's rows: () = [q; k; v] blocks,
    # (n_rep * head_dim, head_dim, head_dim); (3 * head_dim,) = one [q k v] run per head (GPT-NeoX)
    fused_parts: tuple[int, ...] = ()
    # modules holding one output channel per head (unit 1): an nn.Embedding whose columns are a per-head
    # table (a relative position bias), a Linear whose rows produce one (Swin V2's bias MLP)
    per_head: list[str] = field(default_factory=list)


@dataclass
class Structure:
    heads: list[HeadSpec] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    skip: Callable[[nn.Module], nn.Module] | None = None  # block -> its replacement (default Skip)
    refused: dict[str, str] = field(default_factory=dict)  # group name -> why it cannot be pruned (reported as excluded)


class StructureError(HpcpruneError, ValueError):
    """A model whose structure hpcprune cannot read (no attention that fits its config)."""


class Skip(nn.Module):
    """A removed residual block: returns its input unchanged (extra arguments are ignored)."""

    def forward(self, x, *args, **kwargs):  # noqa: D401
        return x


_HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "heads", "num_attention_heads", "nheads", "n_heads_q", "h")


def structure_of(model: nn.Module) -> Structure:
    """The model's declared structure; for a model that declares none, the attention layers
    :func:`detect_heads` recognises (their head groups, their projections in ``ignore``)."""
    fn = getattr(model, "prune_structure", None)
    if callable(fn):
        return fn()
    return detected_structure(model)


def detected_structure(model: nn.Module) -> Structure:
    """The structure of a model that declares none: the attention layers :func:`detect_heads`
    recognises (their head groups; their projections in ``ignore``), everything else left to
    Torch-Pruning."""
    heads = detect_heads(model)
    return Structure(heads=heads, ignore=[n for h in heads for n in (*h.fused, *h.q, *h.kv)])


def detect_heads(model: nn.Module) -> list[HeadSpec]:
    """Attention layers written the usual way, recognised without a declaration: a module with an
    integer head count (``num_heads``, ``n_head``, ``heads``, ``h``, ...: one of :data:`_HEAD_ATTRS`)
    whose own ``nn.Linear`` children (or those of a child ``nn.ModuleList``, as in The Annotated
    Transformer) are either a fused ``qkv`` (``out_features == 3 * E``) or three projections q, k,
    v (``out_features == E``, in that order of definition), and one output
    projection (``in_features == E``), with ``E`` divisible by the head count. The head count
    attribute is rescaled when heads go (so ``reshape(B, T, 3, self.heads, -1)`` follows). Whether the
    forward really computes per head as assumed is not guessed: the groups stage verifies every head
    group against the dense model with the removed heads' output columns zeroed, and excludes it,
    naming the reason, when it does not (a head dimension computed as ``C // self.num_heads`` from
    the residual width, a parameter sized by the head count such as Swin's relative position bias).
    ``nn.MultiheadAttention`` is not matched here (Torch-Pruning's own pruner cuts it)."""
    out: list[HeadSpec] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            continue
        attr = next((a for a in _HEAD_ATTRS if isinstance(getattr(mod, a, None), int)
                     and not isinstance(getattr(mod, a), bool) and getattr(mod, a) > 1), None)
        if attr is None:
            continue
        H = int(getattr(mod, attr))
        spec = _match_attention(name, _projections(name, mod), H)
        if spec is not None:
            spec.attrs.append((name, attr, 1))
            out.append(spec)
    return out


def _projections(name: str, mod: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` children of ``mod`` in order of definition, with those of a child
    ``nn.ModuleList`` in its place (The Annotated Transformer's ``self.linears``: q, k, v, out)."""
    lin = []
    for n, c in mod.named_children():
        full = f"{name}.{n}" if name else n
        if isinstance(c, nn.Linear):
            lin.append((full, c))
        elif isinstance(c, nn.ModuleList):
            lin += [(f"{full}.{i}", e) for i, e in c.named_children() if isinstance(e, nn.Linear)]
    return lin


def _match_attention(name: str, lin: list[tuple[str, nn.Linear]], H: int) -> HeadSpec | None:
    fused = [(n, c) for n, c in lin if c.out_features % 3 == 0 and (c.out_features // 3) % H == 0]
    for qkv_name, qkv in fused:
        E = qkv.out_features // 3
        outs = [n for n, c in lin if n != qkv_name and c.in_features == E]
        if len(outs) == 1:
            return HeadSpec(name, [], [], outs[0], E // H, H, fused=[qkv_name])
    for i in range(len(lin) - 2):
        (qn, q), (kn, k), (vn, v) = lin[i:i + 3]
        E = q.out_features
        if E % H or not (k.out_features == v.out_features == E and q.in_features == k.in_features == v.in_features):
            continue
        outs = [n for n, c in lin if n not in (qn, kn, vn) and c.in_features == E]
        if len(outs) == 1:
            return HeadSpec(name, [qn], [kn, vn], outs[0], E // H, H)
    return None
