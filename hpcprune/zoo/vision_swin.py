"""torchvision's Swin Transformers (V1 and V2) with prunable attention heads and blocks.

torchvision's ``shifted_window_attention`` computes the head width as ``C // num_heads`` from the
residual width ``C`` and reshapes the attention output back to ``C``: with a head removed, the
``qkv`` rows no longer divide that way and the model fails (hpcprune's groups stage excluded every
Swin attention for this reason, leaving only MLP neurons: ``prune.target.macs=0.7`` could not be
met on ``swin_t``). Per-head tensors (V1's relative position bias table, V2's continuous position
bias MLP output and logit scale) are sized by the head count as well.

:func:`prunable_swin` replaces every ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2`` of a
torchvision Swin model by :class:`SwinHeadAttention`, which computes exactly the same function
(same parameters, same numbers) with the head width taken from ``qkv``'s rows, and keeps its
per-head tensors in modules whose columns or rows are heads (an ``nn.Embedding`` for a table, the
``Linear`` that produces V2's bias), so that a head group cuts them with the projections. The model
declares its heads and its ``SwinTransformerBlock``\\ s (residual: skipping one is the identity)
through ``prune_structure()`` (:mod:`hpcprune.structure`).

State-dict keys change for the per-head tables: ``relative_position_bias_table`` becomes
``relative_position_bias_table.weight`` and V2's ``logit_scale`` (``H, 1, 1``) becomes
``logit_scale.weight`` (``1, H``). :func:`hpcprune.zoo.vision.torchvision_model` loads a user's
torchvision state dict *before* the conversion, so torchvision checkpoints load unchanged.

Swin: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021; V2: Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022.
The forward follows torchvision 0.29's ``shifted_window_attention``.
"""
from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..structure import HeadSpec, Structure


class SwinHeadAttention(nn.Module):
    """Shifted-window multi-head self-attention whose head count and head width follow its weights.

    Input and output: ``(B, H, W, C)`` channels-last feature maps. ``qkv``: ``Linear(C, 3 * h * d)``
    with rows ``[q; k; v]``, each ``h`` heads of ``d``; ``proj``: ``Linear(h * d, C)``. V1: the bias
    table is ``relative_position_bias_table`` (``nn.Embedding((2Wh-1)(2Ww-1), h)``); V2 (cosine
    attention): ``cpb_mlp`` produces the table, ``logit_scale`` (``nn.Embedding(1, h)``) scales the
    logits.
    """

    def __init__(self, src: nn.Module) -> None:
        super().__init__()
        self.window_size = list(src.window_size)
        self.shift_size = list(src.shift_size)
        self.num_heads = int(src.num_heads)
        self.attention_dropout = float(src.attention_dropout)
        self.dropout = float(src.dropout)
        self.qkv, self.proj = src.qkv, src.proj
        self.register_buffer("relative_position_index", src.relative_position_index)
        self.v2 = hasattr(src, "cpb_mlp")
        if self.v2:
            self.cpb_mlp = src.cpb_mlp
            self.register_buffer("relative_coords_table", src.relative_coords_table)
            self.logit_scale = nn.Embedding(1, self.num_heads)
            self.logit_scale.weight.data.copy_(src.logit_scale.data.view(1, -1))
        else:
            table = src.relative_position_bias_table  # the same storage (not a copy): a build for loading
            # (runs.build_to_load) skips its initialisation and sees the table loaded
            self.relative_position_bias_table = nn.Embedding(table.shape[0], table.shape[1], _weight=table.data)

    def relative_position_bias(self) -> torch.Tensor:
        """``(1, h, N, N)`` with ``N = Wh * Ww``."""
        n = self.window_size[0] * self.window_size[1]
        idx = self.relative_position_index.view(-1)
        if self.v2:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
            bias = table[idx].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
            return 16 * torch.sigmoid(bias)
        return self.relative_position_bias_table(idx).view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws, shift = self.window_size, list(self.shift_size)
        pad_r, pad_b = (ws[1] - W % ws[1]) % ws[1], (ws[0] - H % ws[0]) % ws[0]
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, pH, pW, _ = x.shape
        shift = [0 if ws[i] >= (pH, pW)[i] else shift[i] for i in range(2)]  # a window as large as the map: no shift
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        nw = (pH // ws[0]) * (pW // ws[1])
        x = x.view(B, pH // ws[0], ws[0], pW // ws[1], ws[1], C).permute(0, 1, 3, 2, 4, 5).reshape(B * nw, ws[0] * ws[1], C)
        attn, v = self._logits(x)
        if sum(shift) > 0:
            attn = self._mask(attn, x, pH, pW, nw, shift)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), -1)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        c = x.shape[-1]
        x = x.view(B, pH // ws[0], pW // ws[1], ws[0], ws[1], c).permute(0, 1, 3, 2, 4, 5).reshape(B, pH, pW, c)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :H, :W, :].contiguous()

    def _logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention logits ``(B*nW, h, N, N)`` with the position bias added, and the values."""
        h = self.num_heads
        d = self.qkv.weight.shape[0] // (3 * h)  # the weight, not out_features: cells cut tensors in place
        bias = self.qkv.bias
        if self.v2 and bias is not None:  # V2: no key bias
            bias = torch.cat([bias[:h * d], torch.zeros_like(bias[h * d:2 * h * d]), bias[2 * h * d:]])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(x.size(0), x.size(1), 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.v2:  # cosine attention
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale.weight.view(-1, 1, 1), max=math.log(100.0)).exp()
        else:
            attn = (q * d ** -0.5).matmul(k.transpose(-2, -1))
        return attn + self.relative_position_bias(), v

    def _mask(self, attn: torch.Tensor, x: torch.Tensor, pH: int, pW: int, nw: int, shift: list[int]) -> torch.Tensor:
        """The shifted windows' mask: -100 between tokens that were not neighbours before the roll."""
        ws, h, n = self.window_size, attn.shape[1], x.size(1)
        mask = x.new_zeros((pH, pW))
        count = 0
        for hs in ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None)):
            for wsl in ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None)):
                mask[hs[0]:hs[1], wsl[0]:wsl[1]] = count
                count += 1
        mask = mask.view(pH // ws[0], ws[0], pW // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(nw, n)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // nw, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0)
        return attn.view(-1, h, n, n)


def _structure(model: nn.Module) -> Structure:
    """Every :class:`SwinHeadAttention` as a head group (one head per unit; ``qkv`` fused, the bias
    table's columns, V2's bias MLP output rows and logit scale with it) and every Swin block as a
    block group. ``qkv`` and the per-head modules are left out of Torch-Pruning's channel groups."""
    from torchvision.models.swin_transformer import SwinTransformerBlock

    heads, blocks, ignore = [], [], []
    for name, mod in model.named_modules():
        if isinstance(mod, SwinHeadAttention):
            per_head = [f"{name}.cpb_mlp.2", f"{name}.logit_scale"] if mod.v2 else [f"{name}.relative_position_bias_table"]
            d = mod.qkv.out_features // (3 * mod.num_heads)
            heads.append(HeadSpec(name, [], [], f"{name}.proj", d, mod.num_heads, attrs=[(name, "num_heads", 1)],
                                  fused=[f"{name}.qkv"], per_head=per_head))
            ignore += [f"{name}.qkv", *per_head]
        elif isinstance(mod, SwinTransformerBlock):  # V2's block subclasses it
            blocks.append(name)
    return Structure(heads=heads, blocks=blocks, ignore=ignore)


def prunable_swin(model: nn.Module) -> nn.Module:
    """Replace the window attentions of torchvision Swin ``model`` in place by
    :class:`SwinHeadAttention` (the same function) and give the model ``prune_structure()``.
    Returns ``model``."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    for name, mod in list(model.named_modules()):
        if isinstance(mod, ShiftedWindowAttention):  # V2 subclasses it
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, SwinHeadAttention(mod))
    model.prune_structure = types.MethodType(_structure, model)
    return model
