"""A tiny GPT-style decoder (pre-LN, causal self-attention, GELU MLP) for byte-level language modelling.

Written for structural pruning:

- The attention projections ``q``, ``k``, ``v`` (``d_model -> heads * head_dim``) and ``o``
  (``heads * head_dim -> d_model``) are separate ``nn.Linear`` layers. The number of heads is read
  from the weights at every forward (``q.out_features // head_dim``), so removing whole heads means
  slicing ``q``/``k``/``v`` output rows and ``o`` input columns in blocks of ``head_dim``; the model
  stays valid. ``head_dim`` itself is fixed: removing single channels inside a head breaks it (the
  reshape into heads fails), so these projections are pruned by whole heads only
  (:meth:`TinyGPT.prune_structure`).
- The MLP is ``up`` (``nn.Linear``), GELU, ``down`` (``nn.Linear``): its hidden neurons are a plain
  prunable group.
- The residual stream (token and position embeddings, every block's ``o``/``down`` output and every
  LayerNorm) is one group coupled through the adds.
- The output head is untied from the token embedding: Torch-Pruning must never cut the vocabulary
  (the head's outputs), and hpcprune ignores the last ``nn.Linear`` at its output. With tied weights
  one parameter would be the embedding (vocabulary x width) and the head at once, so pruning the
  residual width would cut the same tensor through two layers, and the vocabulary dimension would be
  the output dimension of a layer the dependency graph does not ignore.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..structure import HeadSpec, Structure


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        inner = heads * head_dim
        self.q = nn.Linear(d_model, inner)
        self.k = nn.Linear(d_model, inner)
        self.v = nn.Linear(d_model, inner)
        self.o = nn.Linear(inner, d_model)

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim); heads follow from the (pruned) width
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d_model: int, heads: int, head_dim: int, mlp_hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, head_dim)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder-only transformer: ``forward(x: LongTensor[B, T]) -> logits[B, T, vocab]``.

    Parameters
    ----------
    vocab: token ids are ``0 .. vocab-1`` (256 for bytes).
    context: the longest sequence (learned position embeddings).
    d_model: residual stream width.
    layers: transformer blocks.
    heads, head_dim: attention heads and their (fixed) width.
    mlp_hidden: MLP hidden neurons per block.
    """

    def __init__(self, vocab: int = 256, context: int = 64, d_model: int = 128, layers: int = 2, heads: int = 4,
                 head_dim: int = 32, mlp_hidden: int = 512) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList([Block(d_model, heads, head_dim, mlp_hidden) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)  # untied (see the module docstring); the last Linear
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, 0.02 / (2 * layers) ** 0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def prune_structure(self) -> Structure:
        """Heads, blocks and the layers Torch-Pruning must leave alone (see :mod:`hpcprune.structure`).

        Every block's attention is a head group (multi-head: one head per unit); every block can be
        skipped (``x + f(x)`` twice: the identity keeps the residual stream valid). ``q``, ``k`` and
        ``v`` are ignored by Torch-Pruning, which would couple them (and ``o``'s input) into one group
        of single channels: removing channels inside a head breaks the reshape into heads of
        ``head_dim`` (or, for a multiple of ``head_dim``, silently mixes heads)."""
        heads, ignore = [], []
        for i, block in enumerate(self.blocks):
            a = f"blocks.{i}.attn"
            if not isinstance(block, Block):  # already removed (a skip module)
                continue
            heads.append(HeadSpec(a, [f"{a}.q"], [f"{a}.k", f"{a}.v"], f"{a}.o", block.attn.head_dim, block.attn.heads))
            ignore += [f"{a}.q", f"{a}.k", f"{a}.v"]
        return Structure(heads=heads, blocks=[f"blocks.{i}" for i in range(len(self.blocks))], ignore=ignore)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context ({self.context})")
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def tiny_gpt(vocab: int = 256, context: int = 64, d_model: int = 128, layers: int = 2, heads: int = 4, head_dim: int = 32,
             mlp_hidden: int = 512) -> TinyGPT:
    """Hydra ``_target_`` for :class:`TinyGPT`."""
    return TinyGPT(vocab, context, d_model, layers, heads, head_dim, mlp_hidden)
