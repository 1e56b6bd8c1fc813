"""More architectures users bring (issue 14), beside :mod:`archs`: small models of kinds that
``archs.CASES`` does not cover, each with what a correct structural pruner must do.

Same conventions as :mod:`archs`: model functions take keyword arguments with defaults, are
deterministic given ``torch.manual_seed``, have < 60k parameters, return logits ``(N, 10)`` in eval
mode (``tuple_aux`` returns ``(logits, aux)``), and use the data functions of :mod:`archs`.

=======================  ========  ==============================  ==================================================================
case                     data      kind exercised                  what a correct pruner must do
=======================  ========  ==============================  ==================================================================
tcn_causal               signal    dilated causal Conv1d, chomp    ``y[:, :, :-pad]`` slices time, not channels: channels pass through the chomp 1:1; the residual ties the blocks
pixel_shuffle_sr         images    PixelShuffle(2) upsampling      conv channel ``4c + k`` becomes output channel ``c``: cut blocks of 4 before the shuffle (or exclude and say so)
mha_seq_first            seq       MHA batch_first=False, no norm  the residual width is embed_dim: channel c is row c of q, k, v (so the cut changes the scores) and column c of out_proj; the cut equals a hand-built smaller MHA
mha_seq_first_kdim       seq       MHA batch_first=False, kdim     cross-attention from a 16-wide memory into a 32-wide query (kdim=vdim=16): the memory's channels are k/v_proj_weight columns; embed_dim stays a multiple of the heads
rezero_gate              images    x + alpha * f(x), alpha (1,)    the scalar gate is no channel: never cut it; f's output channels are tied to the trunk by the add
conv_bias_bn_noaffine    images    conv bias, BN affine=False      cut the conv's bias with its rows and the BN's running stats with them (the BN has no weight/bias)
groupnorm_odd            images    GroupNorm(3, 24), round_to=4    3 groups of 8: a unit is one position in each group (3 channels); kept channels a multiple of 4 and of 3
groupnorm_per_channel    images    GroupNorm(16, 16)               one channel per group: a cut removes whole groups (num_groups follows the channels)
tuple_aux                images    forward returns (logits, aux)   every output keeps its shape: the aux features' width too (a user reads them)
embedding_mean           tokens    Embedding -> mean -> Linear     an embedding column is one input column of the first Linear; token ids are never cut
spectral_norm_fc         images    parametrize.spectral_norm       a parametrised weight cannot be sliced: refuse that group in one line naming the layer and the fix
interpolate_fixed        images    F.interpolate(size=(12, 12))    resizing keeps channels 1:1; MACs of the convs after it are at 12x12
channel_slice            images    x[:, :8] / x[:, 8:] getitem     channels sliced by literal indices: the stem cannot be cut (exclude it, say why), the branches after can
unfold_patches           images    F.unfold patch embedding        unfold(2, stride 2): channel c is Linear columns 4c .. 4c+3 (or exclude and say so)
maxunpool_segnet         images    MaxPool(return_indices)+Unpool  the pooled indices are per channel: channels pass through pool and unpool 1:1
grouped_convtranspose    images16  ConvTranspose2d(groups=2)       weight (in, out/groups, k, k): an output channel is a column of its group's block; keep both groups equal
layerscale_4d            images    gamma (1, C, 1, 1) * f(x)       the layer-scale Parameter is cut on dim 1 with the channels, not on its last dim (size 1)
channel_roll             images    x + torch.roll(f(x), 4, dims=1) a shift of channels Torch-Pruning takes as elementwise: exclude the trunk naming torch.roll; f's inner conv can be cut
shuffle_by_hand          images    view, transpose(1, 2), reshape  a channel shuffle written out after a grouped conv: exclude its group naming the transpose; the stem can be cut
eca_attention            images    Conv1d over the channel axis    ECA-Net: Torch-Pruning ties the 24 channels to the Conv1d's one channel (it was kept as a 1-unit group, silently): leave the Conv1d out, cut the 24 channels (the Conv1d slides over fewer)
cbam_attention           images    CBAM: mean/amax over channels   the 2-to-1 spatial conv reads the channels reduced and its 1-channel map is broadcast over them: leave it out, cut the channels and the MLP bottleneck
input_cat                images    cat([x, h], 1) of the input     the model's input has no autograd history (Torch-Pruning does not trace it): h's channel c is the next conv's input c + 1
lrn_window               images    LocalResponseNorm(5, alpha=1)   its window mixes neighbouring channels: exclude the conv before it naming the LRN (not the plain max-pool after it)
glu_channels             images    nn.GLU(dim=1)                   output channel c is input c gated by input c + C/2: cut the conv before it in pairs (u, u + C/2)
resmlp_affine            images16  ResMLP: Affine, token Linear    per-channel (1, 1, C) Affine scales; a Linear over the 16 tokens behind a transpose is not the channels: cut the residual width past it
=======================  ========  ==============================  ==================================================================
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from archs import cbr, data_images, data_images16, data_seq, data_signal, data_tokens


class _CausalBlock(nn.Module):
    def __init__(self, c: int, dilation: int) -> None:
        super().__init__()
        self.pad = 2 * dilation
        self.conv = nn.Conv1d(c, c, 3, padding=self.pad, dilation=dilation)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)[:, :, :-self.pad]  # chomp: causal
        return x + F.relu(self.bn(y))


class TCN(nn.Module):
    def __init__(self, c: int = 24, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, c, 5, padding=2)
        self.blocks = nn.Sequential(*[_CausalBlock(c, d) for d in (1, 2, 4)])
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def tcn_causal(num_classes: int = 10) -> nn.Module:
    return TCN(24, num_classes)


class PixelShuffleSR(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(1, 16)
        self.expand = nn.Conv2d(16, 8 * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.body = cbr(8, 16, stride=2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(self.shuffle(self.expand(self.stem(x))))
        return self.fc(y.mean(dim=(2, 3)))


def pixel_shuffle_sr(num_classes: int = 10) -> nn.Module:
    return PixelShuffleSR(num_classes)


class SelfAttnSeqFirst(nn.Module):
    """One self-attention residual block on (T, N, C) tensors, no normalisation."""

    def __init__(self, d: int = 32, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, T, 8)
        h = self.embed(x.transpose(0, 1))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc(h.mean(dim=0))


def mha_seq_first(num_classes: int = 10) -> nn.Module:
    return SelfAttnSeqFirst(num_classes=num_classes)


class CrossAttnSeqFirst(nn.Module):
    """Queries (32 wide) attend to a 16-wide memory; tensors are (T, N, C) as in older PyTorch code."""

    def __init__(self, d: int = 32, dm: int = 16, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.q_in = nn.Linear(8, d)
        self.mem = nn.Linear(8, dm)
        self.attn = nn.MultiheadAttention(d, heads, kdim=dm, vdim=dm)
        self.mlp = nn.Sequential(nn.Linear(d, 48), nn.ReLU(), nn.Linear(48, d))
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, T, 8)
        s = x.transpose(0, 1)  # (T, N, 8)
        q, m = self.q_in(s), F.relu(self.mem(s))
        h = q + self.attn(q, m, m, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.fc(h.mean(dim=0))


def mha_seq_first_kdim(num_classes: int = 10) -> nn.Module:
    return CrossAttnSeqFirst(num_classes=num_classes)


class ReZeroBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.alpha = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.f(x)


def rezero_gate(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(cbr(1, 24), ReZeroBlock(24), ReZeroBlock(24), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(24, num_classes))


def conv_bias_bn_noaffine(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 24, 3, padding=1, bias=True), nn.BatchNorm2d(24, affine=False), nn.ReLU(),
                         nn.Conv2d(24, 32, 3, padding=1, stride=2, bias=True), nn.BatchNorm2d(32, affine=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def groupnorm_odd(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.GroupNorm(3, 24), nn.ReLU(),
                         nn.Conv2d(24, 24, 3, padding=1), nn.GroupNorm(3, 24), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, num_classes))


def groupnorm_per_channel(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(16, 16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(16, 16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class TupleAux(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.a = cbr(1, 16)
        self.b = cbr(16, 32, stride=2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        aux = h.mean(dim=(2, 3))  # (N, 16): features a user logs
        return self.fc(self.b(h).mean(dim=(2, 3))), aux


def tuple_aux(num_classes: int = 10) -> nn.Module:
    return TupleAux(num_classes)


class EmbeddingMean(nn.Module):
    def __init__(self, e: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(17, e)
        self.fc1 = nn.Linear(e, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.emb(tokens).mean(dim=1))))


def embedding_mean(num_classes: int = 10) -> nn.Module:
    return EmbeddingMean(num_classes=num_classes)


def spectral_norm_fc(num_classes: int = 10) -> nn.Module:
    fc1 = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(64, 48))
    return nn.Sequential(nn.Flatten(), fc1, nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, num_classes))


class InterpolateFixed(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.a = cbr(1, 16)
        self.b = cbr(16, 24, stride=2)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(self.a(x), size=(12, 12), mode="bilinear", align_corners=False)
        return self.fc(self.b(h).mean(dim=(2, 3)))


def interpolate_fixed(num_classes: int = 10) -> nn.Module:
    return InterpolateFixed(num_classes)


class ChannelSlice(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(1, 24)
        self.left = cbr(8, 16)
        self.right = cbr(16, 16)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        y = torch.cat([self.left(h[:, :8]), self.right(h[:, 8:])], dim=1)
        return self.fc(y.mean(dim=(2, 3)))


def channel_slice(num_classes: int = 10) -> nn.Module:
    return ChannelSlice(num_classes)


class UnfoldPatches(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(1, 12)
        self.embed = nn.Linear(12 * 4, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.unfold(self.stem(x), kernel_size=2, stride=2)  # (N, 12*4, 16): channel-major columns
        return self.fc(F.relu(self.embed(p.transpose(1, 2))).mean(dim=1))


def unfold_patches(num_classes: int = 10) -> nn.Module:
    return UnfoldPatches(num_classes)


class SegNetTiny(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.enc = cbr(1, 16)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.mid = cbr(16, 16)
        self.unpool = nn.MaxUnpool2d(2)
        self.dec = cbr(16, 24)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, idx = self.pool(self.enc(x))
        y = self.dec(self.unpool(self.mid(h), idx))
        return self.fc(y.mean(dim=(2, 3)))


def maxunpool_segnet(num_classes: int = 10) -> nn.Module:
    return SegNetTiny(num_classes)


class GroupedUp(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.down = cbr(1, 16, stride=2)
        self.up = nn.ConvTranspose2d(16, 24, 2, stride=2, groups=2)
        self.bn = nn.BatchNorm2d(24)
        self.head = cbr(24, 24, stride=2)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(F.relu(self.bn(self.up(self.down(x)))))
        return self.fc(y.mean(dim=(2, 3)))


def grouped_convtranspose(num_classes: int = 10) -> nn.Module:
    return GroupedUp(num_classes)


class LayerScale4d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, 2 * c, 1), nn.GELU(),
                               nn.Conv2d(2 * c, c, 1))
        self.gamma = nn.Parameter(torch.full((1, c, 1, 1), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.f(x)


def layerscale_4d(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(cbr(1, 16), LayerScale4d(16), LayerScale4d(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


class ChannelRoll(nn.Module):
    """A residual whose branch is added shifted by 4 channels (``torch.roll``, a cheap channel mixing)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(1, 16)
        self.f = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 16, 3, padding=1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + torch.roll(self.f(h), shifts=4, dims=1)
        return self.fc(h.mean(dim=(2, 3)))


def channel_roll(num_classes: int = 10) -> nn.Module:
    return ChannelRoll(num_classes)


class NonLocalNet(nn.Module):
    """A conv stem and a non-local block (Wang et al., 2018): theta, phi, g 1x1 convs, attention over
    the positions from theta^T phi (bmm: theta's and phi's channels are multiplied with each other,
    no layer reads them as inputs), g's values back through a 1x1 conv, a residual add."""

    def __init__(self, num_classes: int = 10, c: int = 16, inner: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
        self.theta, self.phi, self.g = nn.Conv2d(c, inner, 1), nn.Conv2d(c, inner, 1), nn.Conv2d(c, inner, 1)
        self.out = nn.Conv2d(inner, c, 1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        n, _, hh, ww = h.shape
        t, p, v = (m(h).flatten(2) for m in (self.theta, self.phi, self.g))  # (N, inner, HW)
        a = torch.softmax(torch.bmm(t.transpose(1, 2), p) * 0.25, dim=-1)  # (N, HW, HW)
        y = torch.bmm(v, a.transpose(1, 2)).view(n, -1, hh, ww)
        return self.fc((h + self.out(y)).mean((2, 3)))


class RotateHalf(nn.Module):
    """A rotary embedding's rotate_half on the whole width, before any split into heads:
    ``q + cat([-b, a])`` of ``a, b = q.chunk(2, -1)`` (``chunks=True``) or of slices ``q[..., 16:]``,
    ``q[..., :16]``; inputs (N, T, 16)."""

    def __init__(self, chunks: bool = True, num_classes: int = 4) -> None:
        super().__init__()
        self.chunks = chunks
        self.q, self.fc = nn.Linear(16, 32), nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        a, b = q.chunk(2, -1) if self.chunks else (q[..., :16], q[..., 16:])
        return self.fc((q + torch.cat([-b, a], -1)).mean(1))


def frozen_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN with every parameter frozen (a feature extractor handed over as it is): nothing to
    fine-tune (not a CASES entry)."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    return model.requires_grad_(False)


class ShuffleByHand(nn.Module):
    """ShuffleNet's channel shuffle written with view / transpose / reshape after a grouped conv."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.post = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.g(torch.relu(self.stem(x))))
        n, c, hh, ww = h.shape
        h = h.view(n, 4, c // 4, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        return self.fc(torch.relu(self.post(h)).mean(dim=(2, 3)))


def shuffle_by_hand(num_classes: int = 10) -> nn.Module:
    return ShuffleByHand(num_classes)


class ECAttention(nn.Module):
    """ECA-Net's channel attention: a Conv1d slides over the channels of the pooled features."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, padding=1)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        w = torch.sigmoid(self.eca(h.mean(dim=(2, 3)).unsqueeze(1)).squeeze(1))
        return self.fc((h * w[:, :, None, None]).mean(dim=(2, 3)))


def eca_attention(num_classes: int = 10) -> nn.Module:
    return ECAttention(num_classes)


class InputCat(nn.Module):
    """The model's input concatenated before the features, twice (input-skip U-Nets, SR nets)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.c1, self.c2 = cbr(1, 24), cbr(25, 32)
        self.c3 = cbr(33, 48, stride=2)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(torch.cat([x, self.c1(x)], 1))
        return self.fc(self.c3(torch.cat([x, h], 1)).mean(dim=(2, 3)))


def input_cat(num_classes: int = 10) -> nn.Module:
    return InputCat(num_classes)


def lrn_window(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.LocalResponseNorm(5, alpha=1.0, k=1.0),
                         nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, num_classes))


def glu_channels(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 48, 3, padding=1), nn.GLU(dim=1), nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


class _Affine(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.ones(1, 1, c)), nn.Parameter(torch.zeros(1, 1, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta


class _ResMLPBlock(nn.Module):
    def __init__(self, t: int, c: int) -> None:
        super().__init__()
        self.aff1, self.tok, self.aff2 = _Affine(c), nn.Linear(t, t), _Affine(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.ls1, self.ls2 = nn.Parameter(0.1 * torch.ones(c)), nn.Parameter(0.1 * torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.tok(self.aff1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.aff2(x))))


class ResMLP(nn.Module):
    """ResMLP (Touvron et al. 2021): 4x4 patches of a 16x16 image (16 tokens), Affine instead of norms."""

    def __init__(self, c: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, c, 4, 4)
        self.blocks = nn.Sequential(_ResMLPBlock(16, c), _ResMLPBlock(16, c))
        self.aff = _Affine(c)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.aff(self.blocks(self.embed(x).flatten(2).transpose(1, 2))).mean(1))


def resmlp_affine(num_classes: int = 10) -> nn.Module:
    return ResMLP(32, num_classes)


class CBAM(nn.Module):
    """CBAM (Woo et al. 2018): channel attention (a shared MLP on average- and max-pooled features)
    then spatial attention (a 7x7 conv on the channels' mean and max, broadcast over the channels)."""

    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(c, c // r, 1), nn.ReLU(), nn.Conv2d(c // r, c, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        x = x * torch.sigmoid(pooled)
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.spatial(s))


class CBAMNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.att = CBAM(24)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.att(self.c2(self.c1(x))).mean(dim=(2, 3)))


def cbam_attention(num_classes: int = 10) -> nn.Module:
    return CBAMNet(num_classes)


CASES: dict[str, tuple] = {
    "tcn_causal": (tcn_causal, data_signal),
    "pixel_shuffle_sr": (pixel_shuffle_sr, data_images),
    "mha_seq_first": (mha_seq_first, data_seq),
    "mha_seq_first_kdim": (mha_seq_first_kdim, data_seq),
    "rezero_gate": (rezero_gate, data_images),
    "conv_bias_bn_noaffine": (conv_bias_bn_noaffine, data_images),
    "groupnorm_odd": (groupnorm_odd, data_images),
    "groupnorm_per_channel": (groupnorm_per_channel, data_images),
    "tuple_aux": (tuple_aux, data_images),
    "embedding_mean": (embedding_mean, data_tokens),
    "spectral_norm_fc": (spectral_norm_fc, data_images),
    "interpolate_fixed": (interpolate_fixed, data_images),
    "channel_slice": (channel_slice, data_images),
    "unfold_patches": (unfold_patches, data_images),
    "maxunpool_segnet": (maxunpool_segnet, data_images),
    "grouped_convtranspose": (grouped_convtranspose, data_images16),
    "layerscale_4d": (layerscale_4d, data_images),
    "channel_roll": (channel_roll, data_images),
    "shuffle_by_hand": (shuffle_by_hand, data_images),
    "eca_attention": (eca_attention, data_images),
    "input_cat": (input_cat, data_images),
    "lrn_window": (lrn_window, data_images),
    "glu_channels": (glu_channels, data_images),
    "resmlp_affine": (resmlp_affine, data_images16),
    "cbam_attention": (cbam_attention, data_images),
}
"""case name -> (model function, data function); see the module docstring for what each exercises."""


class FeaturesFirst(nn.Module):
    """Returns ``(features, logits)``: the main output (the first tensor) is not the logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = cbr(1, 32, stride=2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x).mean(dim=(2, 3))
        return f, self.fc(f)


def features_first(num_classes: int = 10) -> nn.Module:
    return FeaturesFirst(num_classes)


class FixedLength(nn.Module):
    """Token ids (N, 64) -> Embedding -> Conv1d -> flatten -> Linear(64 * width): it runs on its one
    length only (an exported model's sequence axis cannot be dynamic)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(17, 8)
        self.conv = nn.Conv1d(8, 12, 3, padding=1)
        self.fc = nn.Linear(64 * 12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(self.emb(x).transpose(1, 2)))
        return self.fc(h.flatten(1))


def fixed_length(num_classes: int = 10) -> nn.Module:
    return FixedLength(num_classes)


class StochasticDepth(nn.Module):
    """Residual blocks skipped at random in training (stochastic depth): in a step that skips one,
    its parameters get no gradient, which DDP's reduction must be told about."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(1, 16)
        self.blocks = nn.ModuleList([cbr(16, 16) for _ in range(3)])
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for b in self.blocks:
            if not self.training or torch.rand(()) >= 0.5:
                h = h + b(h)
        return self.fc(h.mean(dim=(2, 3)))


def stochastic_depth(num_classes: int = 10) -> nn.Module:
    return StochasticDepth(num_classes)
