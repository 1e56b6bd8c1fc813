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

Built-in models implement it (``zoo.gpt.TinyGPT``, the Hugging Face wrappers in ``zoo.hf``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass
class HeadSpec:
    """One attention layer's projections, in units of KV groups.

    ``q``: layers whose output rows hold the query heads (``n_rep * head_dim`` rows per unit);
    ``kv``: layers whose output rows hold the key and value heads (``head_dim`` rows per unit);
    ``o``: the layer whose input columns hold the attention output (laid out like ``q``);
    ``attrs``: ``(module, attribute, value per unit)`` rescaled when units go, for implementations
    that store a head count (None for models that infer it from the weights).
    """

    name: str  # the attention module (the group is named ``f"{name}:heads"``)
    q: list[str]
    kv: list[str]
    o: str
    head_dim: int
    units: int  # KV heads (= attention heads when n_rep == 1)
    n_rep: int = 1  # query heads per KV head
    attrs: list[tuple[str, str, int]] = field(default_factory=list)


@dataclass
class Structure:
    heads: list[HeadSpec] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    skip: Callable[[nn.Module], nn.Module] | None = None  # block -> its replacement (default Skip)


class Skip(nn.Module):
    """A removed residual block: returns its input unchanged (extra arguments are ignored)."""

    def forward(self, x, *args, **kwargs):  # noqa: D401
        return x


def structure_of(model: nn.Module) -> Structure:
    """The model's declared structure (empty for models that declare none)."""
    fn = getattr(model, "prune_structure", None)
    return fn() if callable(fn) else Structure()
