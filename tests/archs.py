"""An architecture suite for testing a structural pruner: small models on scikit-learn digits.

Every case is a pair ``(model_fn, data_fn)`` in :data:`CASES`. Model functions are named after their
case, take only keyword arguments with defaults (``num_classes=10`` and sometimes a width), and
return a fresh ``nn.Module`` whose construction is deterministic given ``torch.manual_seed``; in
eval mode each returns logits ``(N, num_classes)``. No model uses dropout. Each has < 60k
parameters and a forward of a batch of 64 takes well under 20 ms on one CPU thread. Hydra can
build both halves (``PYTHONPATH=tests``)::

    model: {_target_: archs.lenet_flatten}
    data:  {_target_: archs.data_images, calib_samples: 256}

Data functions (all take ``calib_samples=256, val_samples=400, seed=0`` and return a
:class:`hpcprune.zoo.data.TaskData` with a fixed seeded split: ``val_samples`` validation images,
the rest training, ``calib`` a seeded subset of training, ``example_input`` the first 8 training
samples). Inputs are ``load_digits`` pixels standardised as ``(p / 16 - 0.3) / 0.4``:

==================  =================  ====================================================================
data function       input shape        what it is
==================  =================  ====================================================================
``data_images``     (N, 1, 8, 8)       the digit image
``data_images16``   (N, 1, 16, 16)     the image, bilinearly upsampled 2x
``data_rgb16``      (N, 3, 16, 16)     channels: upsampled image, its horizontal flip, its transpose
``data_seq``        (N, 8, 8)          a sequence: 8 time steps (rows) x 8 features (columns)
``data_signal``     (N, 1, 64)         the image flattened row-major: a one-channel signal of length 64
``data_volume``     (N, 1, 2, 8, 8)    a volume: depth 2 = the image and its horizontal flip
``data_tokens``     (N, 64) int64      raw pixel values 0..16 as token ids (not standardised)
==================  =================  ====================================================================

Cases (kind exercised; what a correct pruner must do). "Cut" = remove whole channels / neurons.

===================  ========  ================================  ====================================================================
case                 data      kind exercised                    what a correct pruner must do
===================  ========  ================================  ====================================================================
mlp                  images    plain MLP baseline                cut hidden neuron i as row i of one Linear (and its bias) and column i of the next
lenet_flatten        images    Conv2d -> Flatten -> Linear       cutting conv channel c removes the block of H*W = 16 Linear input columns c*16 .. c*16+15
inception_concat     images    concat of conv branches           the consumer conv after torch.cat(dim=1) loses input column offset_b + i for branch b's channel i; offsets shift as earlier branches shrink
csp_chunk            images    torch.chunk on channels (CSP)     chunk(2) splits the stem output at C/2 by position: cut the same number of channels from each half (or none), so the boundary stays between the halves; the part branch follows the second half, the transition's columns follow cat([a, part(b)])
split_uneven         images    torch.split([8, 24]) (Ghost)      split sizes are literal in forward(): the split input cannot be cut (exclude that group and report it), the branches after the split can
decoder_view         images    Linear -> view -> ConvTranspose   Linear output rows come in blocks of 4*4 = 16 per channel of view(N, -1, 4, 4): cut whole blocks; ConvTranspose2d weight is (in, out, k, k): cut dim 0 for inputs, dim 1 for outputs
resnext_grouped      images    grouped conv (groups=4)           every group of the grouped conv keeps the same number of inputs and outputs; a kept output still reads its own group's kept inputs; the residual ties stem + all block outputs
mobilenetv2          images    depthwise separable / inverted    a depthwise conv's in, out and groups are cut together (one channel = one group); expand 1x1, dw and BN share one index set; residual ties project outputs across blocks
groupnorm_cnn        images    GroupNorm(4, C), residual         keep C divisible by 4 with an equal number of channels kept in each of the 4 groups (otherwise channels change group and statistics); the AdaptiveAvgPool2d(2) + flatten head reads channel c as columns 4c .. 4c+3
instancenorm_cnn     images    affine InstanceNorm2d             cut InstanceNorm weight/bias with its conv's output channels; Flatten of the 2x2 map: channel c is fc columns 4c .. 4c+3
mha_vit              images    nn.MultiheadAttention ViT         embed_dim is tied to in_proj (3 blocks of rows), out_proj, pos Parameter, LayerNorms and the patch conv; cut it only to a width num_heads divides (or exclude); count the attention products in MACs
fused_qkv_attention  seq       qkv = Linear(d, 3d), sdpa         qkv rows are 3 blocks x heads x head_dim: cut q and k head dims together, v dims with proj's columns, the same count in every head (or whole heads)
manual_attention     images16  separate q/k/v, matmul softmax    q and k keep the same dims per head (they meet in q @ k^T); v dims follow o_proj columns; the 1/sqrt(head_dim) scale is a literal of the dense width
se_resnet            images    squeeze-excitation gating         the SE output (sigmoid gates) multiplies the trunk channel-wise: the SE expand Linear's rows are tied to the trunk channels; the SE hidden width is free
shufflenet           images    channel shuffle, grouped 1x1      the shuffle reshape(N, g, C/g, H, W).transpose(1, 2) permutes channels: cuts must map indices through it and keep C/g equal per group of both grouped convs
gru_seq              seq       Conv1d front end + nn.GRU         a GRU hidden unit is 3 rows (r, z, n) of weight_ih/hh and a column of weight_hh and of the head; the input size follows the Conv1d channels
lstm_seq             seq       Linear front end + nn.LSTM        an LSTM hidden unit is 4 rows (i, f, g, o) of weight_ih/hh, a column of weight_hh and of the head
lstm2_bidir          seq       2-layer bidirectional LSTM        layer 2's input is [forward h; backward h]: a hidden unit of layer 1 is 2 columns of layer 2's weight_ih (i and H + i); directions may keep different units only if the concat offsets are tracked
conv1d_resnet        signal    Conv1d + BatchNorm1d, residual    Conv1d/BN1d cut like their 2-d kinds; the residual ties stem and block-1 outputs; the 1x1 stride-2 projection shortcut shares block 2's outputs; AdaptiveAvgPool1d(4) + flatten: channel c is head columns 4c .. 4c+3
conv3d_volume        volume    Conv3d + BatchNorm3d              Conv3d weight (out, in, d, h, w): cut dims 0/1; BatchNorm3d with it
tied_autoencoder     images    tied weights W and W.t()          encoder W (32 x 64) is used again as F.linear(h, W.t()) (decoder): cutting hidden unit i removes row i of W, which is also the decoder's column i; the Parameter stays shared
tied_shared_linear   images    two Linears share one .weight     fc_a.weight is fc_b.weight (a square 48 x 48 Parameter used in sequence): the hidden width is both its rows and columns; cut both dims with one index set and keep the sharing
bn_no_running_stats  images    BatchNorm, no running stats       BN has no running_mean/var (normalises with batch statistics even in eval): cut weight/bias only; do not try to re-estimate or copy running stats
mixer_buffer_posenc  seq       registered buffer (1, T, d)       the sinusoidal buffer pe is sized by the residual width d: cut its last dim with the width (it is not a Parameter); token-mixing Linears act on T, not d
squeezenet           images    final 1x1 conv -> pool, flatten   Fire modules concat expand1x1 and expand3x3 and one BatchNorm straddles the concat (BN entry offset_b + i goes with branch b's channel i); the classifier conv's 10 output channels are the logits: never cut them
unet                 images16  U-Net: ConvTranspose, cat skip    decoder convs read cat([encoder, up]): columns split at the encoder width; ConvTranspose2d weight is (in, out, k, k); count its MACs once per input pixel (not stride^2 too many)
densenet             images    dense block (concat of all)       every dense layer reads the cat of the stem and all earlier layers: one stem channel is a column of every later layer, the BN before it and the transition conv
resnet_projection    images    1x1 stride-2 projection shortcut  the projection shortcut (conv + BN) and the block's last conv share output channels (added); the block's input is tied to the stem, not to its output
prelu_cnn            images    PReLU per-channel                 cut PReLU's num_parameters-sized weight with the preceding conv's output channels
convnext             images16  ConvNeXt: LN over channels NHWC   the dw 7x7 conv, LayerNorm(C) on the permuted NHWC tensor, Linear(C, 4C) columns, Linear(4C, C) rows and the layer-scale gamma (C,) all share the residual width
functional_params    images    bare Parameters + F.conv2d        weights are nn.Parameter used by F.conv2d / F.linear in forward (no modules): cut them along the right dims by tracing the ops (conv channel c = 4 columns of the flattened 2x2 map), or exclude and report
wide_deep            images    two Linear+BN1d branches cat      the head's columns are [wide (32); deep (32)]: cutting a branch's neuron removes its column at that branch's offset and its BatchNorm1d entry
inception_v1_add     images    add of 4 different-depth paths    the 1x1, 1x1-3x3, 1x1-3x3-3x3 and maxpool-1x1 branches end in an add with the input: all branch outputs and the trunk share one index set; the max-pool branch passes channels through
token_transformer    tokens    nn.Embedding + transformer        Embedding(17, e) column j is every column p*e + j of the row projection (the reshape interleaves pixels and embedding dims); pos, LayerNorms, attention and MLP share d; the input is int64 token ids (never cut or perturb it)
cls_token_encoder    seq       nn.TransformerEncoderLayer, cat   a cls Parameter (1, 1, d) is concatenated along the token dim (dim 1, not channels): cut it with d; TransformerEncoderLayer's fused eval fast path must still see consistent widths
dilated_hardswish    rgb16     dilated conv, Hardswish/SiLU      dilation/padding are kept; channels_last input conversion does not change the channel dim; AdaptiveAvgPool2d(1) + flatten maps channel c to column c
upsample_fpn         images16  nn.Upsample + lateral add (FPN)   the upsampled top-down path is added to the lateral 1x1 conv: all three laterals share one index set; Upsample passes channels through
gated_glu            images    sigmoid gating and F.glu          x * sigmoid(gate(x)) ties conv and gate outputs; F.glu(dim=1) splits its input in halves: cut pairs (i, i + C/2) of the conv before it
stack_cat_spatial    images    torch.stack, cat on width dim     torch.stack([a, b], 1).amax(1) ties a and b; torch.cat(..., dim=3) joins along width: channels pass through unchanged
dw_multiplier        images    depthwise, channel multiplier 2   Conv2d(16, 32, groups=16): input channel c feeds outputs 2c and 2c+1; cut an input with both of its outputs (keep the multiplier)
reused_block         images    one module applied twice          the same conv module runs twice in sequence (a BatchNorm per use): its output channels are also its input channels (one index set for both dims), tied to the stem by the residual adds
unet_seg             seg       segmentation U-Net, per-pixel    logits (N, 3, 16, 16) against labels (N, 16, 16): loss and pixel accuracy over pixels; the 1x1 output conv is the classifier (kept); decoder reads cat([encoder, up])
===================  ========  ================================  ====================================================================
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Subset, TensorDataset

from hpcprune.zoo.data import TaskData

# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw digits: pixel values (1797, 8, 8) in 0..16 as float32, labels (1797,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    raw, y = _digits()
    return (raw / 16.0 - 0.3) / 0.4, y  # (N, 8, 8) standardised


def _task(x: torch.Tensor, y: torch.Tensor, calib_samples: int, val_samples: int, seed: int) -> TaskData:
    if calib_samples < 1:
        raise ValueError(f"calib_samples={calib_samples}: the calibration set must hold at least one sample")
    if not 0 < val_samples < len(x):
        raise ValueError(f"val_samples={val_samples}: must be between 1 and {len(x) - 1}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[val_samples:], perm[:val_samples]
    x, y = x.contiguous(), y.contiguous()
    train, val = TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va])
    n = min(calib_samples, len(tr))
    calib_idx = torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed + 1))[:n].tolist()
    return TaskData(train=train, val=val, calib=Subset(train, calib_idx), example_input=x[tr[:8]].clone(),
                    num_classes=10)


def _up16(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x.unsqueeze(1), scale_factor=2, mode="bilinear", align_corners=False)


def data_images(calib_samples: int = 256, val_samples: int = 400, seed: int = 0) -> TaskData:
    """Digits as 1x8x8 images: (N, 1, 8, 8)."""
    x, y = _images()
    return _task(x.unsqueeze(1), y, calib_samples, val_samples, seed)


def data_images16(calib_samples: int = 256, val_samples: int = 400, seed: int = 0) -> TaskData:
    """Digits bilinearly upsampled to 1x16x16: (N, 1, 16, 16)."""
    x, y = _images()
    return _task(_up16(x), y, calib_samples, val_samples, seed)


def data_rgb16(calib_samples: int = 256, val_samples: int = 400, seed: int = 0) -> TaskData:
    """Three 16x16 channels: the upsampled image, its horizontal flip, its transpose: (N, 3, 16, 16)."""
    x, y = _images()
    u = _up16(x)
    return _task(torch.cat([u, u.flip(-1), u.transpose(-1, -2)], dim=1), y, calib_samples, val_samples, seed)


def data_seg(calib_samples: int = 256, val_samples: int = 400, seed: int = 0) -> TaskData:
    """Segmentation of 16x16 digits: each pixel's label is its intensity band (0: background, 1:
    faint, 2: stroke) of the upsampled image: inputs (N, 1, 16, 16), labels (N, 16, 16), 3 classes."""
    raw, _ = _digits()
    u = _up16(raw / 16.0)
    labels = torch.bucketize(u[:, 0], torch.tensor([0.15, 0.6]))
    task = _task((u - 0.3) / 0.4, labels, calib_samples, val_samples, seed)
    return TaskData(train=task.train, val=task.val, calib=task.calib, example_input=task.example_input, num_classes=3)


def data_seq(calib_samples: int = 256, val_samples: int = 400, seed: int = 0) -> TaskData:
    """Digits as sequences of 8 time steps (rows) x 8 features (columns): (N, 8, 8)."""
    x, y = _images()
    return _task(x, y, calib_samples, val_samples, seed)


def data_signal(calib_samples: int = 256, val_samples: int = 400, seed: int = 0) -> TaskData:
    """Digits flattened row-major into a one-channel signal: (N, 1, 64)."""
    x, y = _images()
    return _task(x.reshape(len(x), 1, 64), y, calib_samples, val_samples, seed)


def data_volume(calib_samples: int = 256, val_samples: int = 400, seed: int = 0) -> TaskData:
    """Digits as volumes of depth 2 (the image, its horizontal flip): (N, 1, 2, 8, 8)."""
    x, y = _images()
    return _task(torch.stack([x, x.flip(-1)], dim=1).unsqueeze(1), y, calib_samples, val_samples, seed)


def data_tokens(calib_samples: int = 256, val_samples: int = 400, seed: int = 0) -> TaskData:
    """Raw pixel values 0..16 as int64 token ids, one per pixel: (N, 64)."""
    raw, y = _digits()
    return _task(raw.reshape(len(raw), 64).round().long(), y, calib_samples, val_samples, seed)


# ---------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d -> ReLU (optional)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _Head(nn.Module):
    """Global average pool over H, W then Linear."""

    def __init__(self, c: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------------
# 0 plain MLP
# ---------------------------------------------------------------------------------------------------


def mlp(hidden: int = 64, num_classes: int = 10) -> nn.Module:
    """Flatten -> Linear 64->64 -> ReLU -> Linear 64->64 -> ReLU -> Linear -> logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


# ---------------------------------------------------------------------------------------------------
# 1 flatten (LeNet-like)
# ---------------------------------------------------------------------------------------------------


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 8 x 4 x 4
        h = F.relu(self.conv2(h))  # 16 x 4 x 4
        return self.fc2(F.relu(self.fc1(self.flatten(h))))


def lenet_flatten(num_classes: int = 10) -> nn.Module:
    return LeNet(num_classes)


# ---------------------------------------------------------------------------------------------------
# 2 concat of conv branches (Inception-like)
# ---------------------------------------------------------------------------------------------------


class InceptionConcat(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(1, 16)
        self.b1 = cbr(16, 8, k=1)
        self.b3 = nn.Sequential(cbr(16, 8, k=1), cbr(8, 12))
        self.b5 = nn.Sequential(cbr(16, 4, k=1), cbr(4, 8), cbr(8, 8))
        self.mix = cbr(8 + 12 + 8, 32)  # the consumer of the concat
        self.head = _Head(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        h = torch.cat([self.b1(s), self.b3(s), self.b5(s)], dim=1)
        return self.head(self.mix(h))


def inception_concat(num_classes: int = 10) -> nn.Module:
    return InceptionConcat(num_classes)


# ---------------------------------------------------------------------------------------------------
# 3 chunk on channels (CSP-like) and an uneven split (Ghost-like)
# ---------------------------------------------------------------------------------------------------


class CSPChunk(nn.Module):
    def __init__(self, c: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(1, c)
        self.part = nn.Sequential(cbr(c // 2, c // 2), cbr(c // 2, c // 2))  # processes one half
        self.transition = cbr(c, c, k=1)  # after cat([identity half, processed half])
        self.head = _Head(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.stem(x), 2, dim=1)
        return self.head(self.transition(torch.cat([a, self.part(b)], dim=1)))


def csp_chunk(c: int = 32, num_classes: int = 10) -> nn.Module:
    return CSPChunk(c, num_classes)


class SplitUneven(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(1, 32)
        self.cheap = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.main = cbr(24, 24)
        self.fuse = cbr(32, 32, k=1)
        self.head = _Head(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.stem(x), [8, 24], dim=1)
        return self.head(self.fuse(torch.cat([self.cheap(a), self.main(b)], dim=1)))


def split_uneven(num_classes: int = 10) -> nn.Module:
    return SplitUneven(num_classes)


# ---------------------------------------------------------------------------------------------------
# 4 Linear -> view -> ConvTranspose2d (decoder-like)
# ---------------------------------------------------------------------------------------------------


class DecoderView(nn.Module):
    def __init__(self, c: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.fc_in = nn.Linear(64, c * 4 * 4)
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2)  # 4x4 -> 8x8
        self.up_bn = nn.BatchNorm2d(c)
        self.conv = cbr(c, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        h = F.relu(self.fc_in(x.reshape(n, -1))).view(n, -1, 4, 4)
        h = self.conv(F.relu(self.up_bn(self.up(h))))
        return self.fc(F.max_pool2d(h, 2).mean((2, 3)))


def decoder_view(c: int = 16, num_classes: int = 10) -> nn.Module:
    return DecoderView(c, num_classes)


# ---------------------------------------------------------------------------------------------------
# 5 grouped conv (ResNeXt-like)
# ---------------------------------------------------------------------------------------------------


class ResNeXtBlock(nn.Module):
    def __init__(self, c: int = 32, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = cbr(c, c, k=1)
        self.conv2 = cbr(c, c, groups=groups)
        self.conv3 = cbr(c, c, k=1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv3(self.conv2(self.conv1(x))))


def resnext_grouped(c: int = 32, groups: int = 4, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(cbr(1, c), ResNeXtBlock(c, groups), ResNeXtBlock(c, groups), _Head(c, num_classes))


# ---------------------------------------------------------------------------------------------------
# 6 depthwise separable (MobileNetV2 inverted residual)
# ---------------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int = 3, stride: int = 1) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project(self.dw(self.expand(x)))
        return x + h if self.use_res else h


class MobileNetV2Tiny(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16), InvertedResidual(16, 24, stride=2),
                                    InvertedResidual(24, 24))
        self.last = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.last(self.blocks(self.stem(x)))), 1))


def mobilenetv2(num_classes: int = 10) -> nn.Module:
    return MobileNetV2Tiny(num_classes)


# ---------------------------------------------------------------------------------------------------
# 7 GroupNorm / 8 InstanceNorm CNNs
# ---------------------------------------------------------------------------------------------------


class NormResBlock(nn.Module):
    def __init__(self, c: int, norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.n1 = norm(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.n2 = norm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.n1(self.conv1(x)))
        return F.relu(x + self.n2(self.conv2(h)))


class NormCNN(nn.Module):
    def __init__(self, c: int, norm, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.stem_norm = norm(c)
        self.block = NormResBlock(c, norm)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(c * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block(F.relu(self.stem_norm(self.stem(x))))).flatten(1))


def groupnorm_cnn(c: int = 32, num_classes: int = 10) -> nn.Module:
    return NormCNN(c, lambda ch: nn.GroupNorm(4, ch), num_classes)


class InstanceNormCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.in1 = nn.InstanceNorm2d(16, affine=True)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.in2 = nn.InstanceNorm2d(32, affine=True)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.in1(self.conv1(x)))
        h = F.max_pool2d(F.relu(self.in2(self.conv2(h))), 2)  # 4x4
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 2x2
        return self.fc(h.flatten(1))


def instancenorm_cnn(num_classes: int = 10) -> nn.Module:
    return InstanceNormCNN(num_classes)


# ---------------------------------------------------------------------------------------------------
# 9 nn.MultiheadAttention ViT
# ---------------------------------------------------------------------------------------------------


class MHABlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class MHAViT(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, d, 2, stride=2)  # 8x8 -> 4x4 = 16 tokens
        self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.02)
        self.blocks = nn.ModuleList([MHABlock(d, heads, 2 * d) for _ in range(2)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h).mean(1))


def mha_vit(d: int = 32, heads: int = 4, num_classes: int = 10) -> nn.Module:
    return MHAViT(d, heads, num_classes)


# ---------------------------------------------------------------------------------------------------
# 10 fused qkv attention with sdpa / 11 separate q, k, v with a manual softmax
# ---------------------------------------------------------------------------------------------------


class FusedQKVAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, hd)
        return self.proj(o.transpose(1, 2).reshape(B, T, -1))


class FusedBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = FusedQKVAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class FusedQKVTransformer(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.02)
        self.blocks = nn.Sequential(FusedBlock(d, heads), FusedBlock(d, heads))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x) + self.pos)).mean(1))


def fused_qkv_attention(d: int = 32, heads: int = 4, num_classes: int = 10) -> nn.Module:
    return FusedQKVTransformer(d, heads, num_classes)


class ManualAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(B, T, self.heads, -1).transpose(1, 2)
        v = self.v(x).view(B, T, self.heads, -1).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.hd), dim=-1)
        return self.o_proj((a @ v).transpose(1, 2).reshape(B, T, -1))


class ManualBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = ManualAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ManualAttentionViT(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, stride=4)  # 16x16 -> 4x4 = 16 tokens
        self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.02)
        self.blocks = nn.Sequential(ManualBlock(d, heads), ManualBlock(d, heads))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(h)).mean(1))


def manual_attention(d: int = 32, heads: int = 4, num_classes: int = 10) -> nn.Module:
    return ManualAttentionViT(d, heads, num_classes)


# ---------------------------------------------------------------------------------------------------
# 12 squeeze-excitation residual CNN
# ---------------------------------------------------------------------------------------------------


class SEBlock(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, c // r)
        self.fc2 = nn.Linear(c // r, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class SEResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = cbr(c, c)
        self.conv2 = cbr(c, c, act=False)
        self.se = SEBlock(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.se(self.conv2(self.conv1(x))))


def se_resnet(c: int = 32, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(cbr(1, c), SEResBlock(c), _Head(c, num_classes))


# ---------------------------------------------------------------------------------------------------
# 13 channel shuffle (ShuffleNet-like)
# ---------------------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c: int = 32, groups: int = 4) -> None:
        super().__init__()
        self.groups = groups
        self.gconv1 = cbr(c, c, k=1, groups=groups)
        self.dw = cbr(c, c, groups=c, act=False)
        self.gconv2 = cbr(c, c, k=1, groups=groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = channel_shuffle(self.gconv1(x), self.groups)
        return F.relu(x + self.gconv2(self.dw(h)))


def shufflenet(c: int = 32, groups: int = 4, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(cbr(1, c), ShuffleUnit(c, groups), ShuffleUnit(c, groups), _Head(c, num_classes))


# ---------------------------------------------------------------------------------------------------
# 14 GRU / 15 LSTM / bidirectional 2-layer LSTM on sequences
# ---------------------------------------------------------------------------------------------------


class ConvGRU(nn.Module):
    def __init__(self, c: int = 32, hidden: int = 48, num_classes: int = 10) -> None:
        super().__init__()
        self.front = nn.Conv1d(8, c, 3, padding=1)  # features are channels, time is length
        self.gru = nn.GRU(c, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, F)
        h = F.relu(self.front(x.transpose(1, 2))).transpose(1, 2)  # (N, T, c)
        out, _ = self.gru(h)
        return self.head(out[:, -1])


def gru_seq(c: int = 32, hidden: int = 48, num_classes: int = 10) -> nn.Module:
    return ConvGRU(c, hidden, num_classes)


class LinearLSTM(nn.Module):
    def __init__(self, c: int = 32, hidden: int = 48, num_classes: int = 10) -> None:
        super().__init__()
        self.front = nn.Linear(8, c)
        self.lstm = nn.LSTM(c, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(torch.tanh(self.front(x)))
        return self.head(h[-1])


def lstm_seq(c: int = 32, hidden: int = 48, num_classes: int = 10) -> nn.Module:
    return LinearLSTM(c, hidden, num_classes)


class BiLSTM2(nn.Module):
    def __init__(self, hidden: int = 24, num_classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)  # (N, T, 2H)
        return self.head(out.mean(1))


def lstm2_bidir(hidden: int = 24, num_classes: int = 10) -> nn.Module:
    return BiLSTM2(hidden, num_classes)


# ---------------------------------------------------------------------------------------------------
# 16 Conv1d residual CNN / 17 Conv3d
# ---------------------------------------------------------------------------------------------------


def _cbr1(cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv1d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm1d(cout)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Res1d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _cbr1(cin, cout, stride=stride)
        self.conv2 = _cbr1(cout, cout, act=False)
        self.short = _cbr1(cin, cout, k=1, stride=stride, act=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.short(x) + self.conv2(self.conv1(x)))


class Conv1dResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr1(1, 16, k=5)
        self.b1 = Res1d(16, 16)
        self.b2 = Res1d(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool1d(4)
        self.fc = nn.Linear(32 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.b2(self.b1(self.stem(x)))).flatten(1))


def conv1d_resnet(num_classes: int = 10) -> nn.Module:
    return Conv1dResNet(num_classes)


class Conv3dNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(16)
        self.conv2 = nn.Conv3d(16, 32, 3, stride=(1, 2, 2), padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3, 4)))


def conv3d_volume(num_classes: int = 10) -> nn.Module:
    return Conv3dNet(num_classes)


# ---------------------------------------------------------------------------------------------------
# 18 tied weights
# ---------------------------------------------------------------------------------------------------


class TiedAutoencoder(nn.Module):
    """Encoder Linear(64, 32); the decoder reuses the encoder's weight transposed (F.linear(h, W.t())),
    the reconstruction is added to the input, and an MLP classifies it."""

    def __init__(self, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.enc = nn.Linear(64, hidden)
        self.dec_bias = nn.Parameter(torch.zeros(64))
        self.fc1 = nn.Linear(64 + hidden, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        h = F.relu(self.enc(x))
        r = F.linear(h, self.enc.weight.t(), self.dec_bias)  # tied decoder
        return self.fc2(F.relu(self.fc1(torch.cat([x + r, h], dim=1))))


def tied_autoencoder(hidden: int = 32, num_classes: int = 10) -> nn.Module:
    return TiedAutoencoder(hidden, num_classes)


class TiedSharedLinear(nn.Module):
    """Two Linear modules whose ``.weight`` is one Parameter, applied one after the other."""

    def __init__(self, hidden: int = 48, num_classes: int = 10) -> None:
        super().__init__()
        self.fc_in = nn.Linear(64, hidden)
        self.fc_a = nn.Linear(hidden, hidden)
        self.fc_b = nn.Linear(hidden, hidden)
        self.fc_b.weight = self.fc_a.weight  # tied
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc_in(x.flatten(1)))
        h = h + F.relu(self.fc_a(h))
        h = h + F.relu(self.fc_b(h))
        return self.head(h)


def tied_shared_linear(hidden: int = 48, num_classes: int = 10) -> nn.Module:
    return TiedSharedLinear(hidden, num_classes)


# ---------------------------------------------------------------------------------------------------
# 19 BatchNorm without running statistics
# ---------------------------------------------------------------------------------------------------


class BNNoStats(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, track_running_stats=False)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32, track_running_stats=False)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)  # an ordinary one too
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)
        h = F.relu(self.bn3(self.conv3(h)))
        return self.fc(h.mean((2, 3)))


def bn_no_running_stats(num_classes: int = 10) -> nn.Module:
    return BNNoStats(num_classes)


# ---------------------------------------------------------------------------------------------------
# 20 MLP-mixer with a registered position-encoding buffer sized by the width
# ---------------------------------------------------------------------------------------------------


def _sinusoid(tokens: int, d: int) -> torch.Tensor:
    pos = torch.arange(tokens, dtype=torch.float32)[:, None]
    freq = torch.exp(-torch.arange(0, d, 2, dtype=torch.float32) * (4.0 / d))
    pe = torch.zeros(1, tokens, d)
    pe[0, :, 0::2], pe[0, :, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, d: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.tok1 = nn.Linear(tokens, 2 * tokens)
        self.tok2 = nn.Linear(2 * tokens, tokens)
        self.ln2 = nn.LayerNorm(d)
        self.ch1 = nn.Linear(d, 2 * d)
        self.ch2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, d)
        t = self.ln1(x).transpose(1, 2)  # (N, d, T)
        x = x + self.tok2(F.gelu(self.tok1(t))).transpose(1, 2)
        return x + self.ch2(F.gelu(self.ch1(self.ln2(x))))


class MixerPosEnc(nn.Module):
    def __init__(self, d: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.register_buffer("pe", _sinusoid(8, d))
        self.blocks = nn.Sequential(MixerBlock(8, d), MixerBlock(8, d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x) + self.pe)).mean(1))


def mixer_buffer_posenc(d: int = 32, num_classes: int = 10) -> nn.Module:
    return MixerPosEnc(d, num_classes)


# ---------------------------------------------------------------------------------------------------
# 21 SqueezeNet-like conv classifier (no final Linear)
# ---------------------------------------------------------------------------------------------------


class Fire(nn.Module):
    """squeeze 1x1 (+ BN) -> [expand 1x1, expand 3x3] concatenated -> one BatchNorm over the concat."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_bn = nn.BatchNorm2d(squeeze)
        self.e1 = nn.Conv2d(squeeze, e1, 1)
        self.e3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.bn = nn.BatchNorm2d(e1 + e3)  # straddles the concat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze_bn(self.squeeze(x)))
        return F.relu(self.bn(torch.cat([self.e1(s), self.e3(s)], dim=1)))


class SqueezeNetTiny(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), Fire(32, 8, 16, 16),
                                      nn.MaxPool2d(2), Fire(32, 12, 24, 24))
        self.classifier = nn.Sequential(nn.Conv2d(48, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def squeezenet(num_classes: int = 10) -> nn.Module:
    return SqueezeNetTiny(num_classes)


# ---------------------------------------------------------------------------------------------------
# 22 U-Net
# ---------------------------------------------------------------------------------------------------


class UNetTiny(nn.Module):
    """Two levels on 16x16: enc1 (16x16, 8) -> enc2 (8x8, 16) -> bottom (4x4, 32) -> up2 + cat enc2 ->
    dec2 -> up1 + cat enc1 -> dec1 -> pooled head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.enc1 = cbr(1, 8)
        self.enc2 = cbr(8, 16, stride=2)
        self.bottom = cbr(16, 32, stride=2)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec2 = cbr(16 + 16, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec1 = cbr(8 + 8, 16)
        self.head = _Head(16 + 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottom(e2)
        d2 = self.dec2(torch.cat([e2, F.relu(self.up2(b))], dim=1))
        d1 = self.dec1(torch.cat([e1, F.relu(self.up1(d2))], dim=1))
        return self.head.fc(torch.cat([d1.mean((2, 3)), b.mean((2, 3))], dim=1))


def unet(num_classes: int = 10) -> nn.Module:
    return UNetTiny(num_classes)


class UNetSeg(nn.Module):
    """A segmentation U-Net: per-pixel logits (N, classes, 16, 16) from a 1x1 conv classifier."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.enc1, self.enc2 = cbr(1, 16), cbr(16, 32, stride=2)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec = cbr(16 + 16, 16)
        self.out = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        return self.out(self.dec(torch.cat([e1, F.relu(self.up(self.enc2(e1)))], dim=1)))


def unet_seg(num_classes: int = 3) -> nn.Module:
    return UNetSeg(num_classes)


# ---------------------------------------------------------------------------------------------------
# 23 DenseNet-style dense block
# ---------------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.bn(x)))


class DenseNetTiny(nn.Module):
    def __init__(self, c0: int = 16, growth: int = 8, layers: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c0, 3, padding=1, bias=False)
        self.layers = nn.ModuleList([DenseLayer(c0 + i * growth, growth) for i in range(layers)])
        c = c0 + layers * growth
        self.trans_bn = nn.BatchNorm2d(c)
        self.trans = nn.Conv2d(c, 24, 1, bias=False)
        self.bn = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        h = F.avg_pool2d(self.trans(F.relu(self.trans_bn(torch.cat(feats, dim=1)))), 2)
        return self.fc(F.relu(self.bn(h)).mean((2, 3)))


def densenet(num_classes: int = 10) -> nn.Module:
    return DenseNetTiny(num_classes=num_classes)


# ---------------------------------------------------------------------------------------------------
# 24 ResNet with a projection shortcut
# ---------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = cbr(cin, cout, stride=stride)
        self.conv2 = cbr(cout, cout, act=False)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.conv2(self.conv1(x)))


def resnet_projection(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(cbr(1, 16), BasicBlock(16, 16), BasicBlock(16, 32, stride=2), BasicBlock(32, 32),
                         _Head(32, num_classes))


# ---------------------------------------------------------------------------------------------------
# 25 PReLU per channel
# ---------------------------------------------------------------------------------------------------


def prelu_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.PReLU(16),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.PReLU(32), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.PReLU(32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 32), nn.PReLU(32), nn.Linear(32, num_classes),
    )


# ---------------------------------------------------------------------------------------------------
# 26 ConvNeXt block (LayerNorm over channels in NHWC)
# ---------------------------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))  # layer scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(x).permute(0, 2, 3, 1)  # NHWC
        h = self.pw2(F.gelu(self.pw1(self.norm(h)))) * self.gamma
        return x + h.permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    def __init__(self, c: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 2, stride=2)  # 16x16 -> 8x8
        self.stem_norm = nn.LayerNorm(c, eps=1e-6)
        self.blocks = nn.Sequential(ConvNeXtBlock(c), ConvNeXtBlock(c))
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem_norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(self.norm(self.blocks(h).mean((2, 3))))


def convnext(c: int = 32, num_classes: int = 10) -> nn.Module:
    return ConvNeXtTiny(c, num_classes)


# ---------------------------------------------------------------------------------------------------
# 27 functional layers on bare Parameters
# ---------------------------------------------------------------------------------------------------


def _kaiming(*shape: int) -> nn.Parameter:
    w = torch.empty(*shape)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return nn.Parameter(w)


class FunctionalNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.w1, self.b1 = _kaiming(16, 1, 3, 3), nn.Parameter(torch.zeros(16))
        self.w2, self.b2 = _kaiming(32, 16, 3, 3), nn.Parameter(torch.zeros(32))
        self.w3, self.b3 = _kaiming(32, 32 * 2 * 2), nn.Parameter(torch.zeros(32))
        self.w4, self.b4 = _kaiming(num_classes, 32), nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        h = F.max_pool2d(F.relu(F.conv2d(h, self.w2, self.b2, padding=1)), 4)  # (N, 32, 2, 2)
        h = F.relu(F.linear(h.flatten(1), self.w3, self.b3))
        return F.linear(h, self.w4, self.b4)


def functional_params(num_classes: int = 10) -> nn.Module:
    return FunctionalNet(num_classes)


# ---------------------------------------------------------------------------------------------------
# 28 wide & deep
# ---------------------------------------------------------------------------------------------------


class WideDeep(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.wide = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.deep = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                  nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.head(torch.cat([self.wide(x), self.deep(x)], dim=1))


def wide_deep(num_classes: int = 10) -> nn.Module:
    return WideDeep(num_classes)


# ---------------------------------------------------------------------------------------------------
# 29 Inception-v1-style multi-branch add
# ---------------------------------------------------------------------------------------------------


class InceptionAdd(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.b1 = cbr(c, c, k=1, act=False)
        self.b2 = nn.Sequential(cbr(c, 12, k=1), cbr(12, c, act=False))
        self.b3 = nn.Sequential(cbr(c, 8, k=1), cbr(8, 12), cbr(12, c, act=False))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(c, c, k=1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b1(x) + self.b2(x) + self.b3(x) + self.b4(x))


def inception_v1_add(c: int = 16, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(cbr(1, c), InceptionAdd(c), InceptionAdd(c), _Head(c, num_classes))


# ---------------------------------------------------------------------------------------------------
# 30 Embedding on pixel tokens + small transformer
# ---------------------------------------------------------------------------------------------------


class TokenTransformer(nn.Module):
    """Each pixel value (0..16) is embedded (e = 8), the 8 embeddings of an image row are concatenated
    (reshape to (N, 8, 8 * e): embedding dim j of pixel p is column p * e + j of ``rows``) and
    projected to one row token of width d; 2 pre-LN blocks (fused qkv + sdpa, MLP); mean; head."""

    def __init__(self, e: int = 8, d: int = 32, heads: int = 4, vocab: int = 17, num_classes: int = 10) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, e)
        self.rows = nn.Linear(8 * e, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.02)
        self.blocks = nn.Sequential(FusedBlock(d, heads), FusedBlock(d, heads))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 64) int64
        h = self.rows(self.tok(x).reshape(x.size(0), 8, -1)) + self.pos
        return self.head(self.norm(self.blocks(h)).mean(1))


def token_transformer(e: int = 8, d: int = 32, heads: int = 4, num_classes: int = 10) -> nn.Module:
    return TokenTransformer(e, d, heads, 17, num_classes)


# ---------------------------------------------------------------------------------------------------
# extras: what users also bring
# ---------------------------------------------------------------------------------------------------


class ClsTokenEncoder(nn.Module):
    """nn.TransformerEncoder (pre-LN, no dropout) over 8 row tokens with a learned cls token
    concatenated along the token dim; classifies from the cls token."""

    def __init__(self, d: int = 32, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 9, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = torch.cat([self.cls.expand(h.size(0), -1, -1), h], dim=1) + self.pos
        return self.head(self.norm(self.encoder(h)[:, 0]))


def cls_token_encoder(d: int = 32, heads: int = 4, num_classes: int = 10) -> nn.Module:
    return ClsTokenEncoder(d, heads, num_classes)


class DilatedHardswish(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.conv3 = nn.Conv2d(24, 32, 3, stride=2, padding=2, dilation=2, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.act1, self.act2, self.act3 = nn.Hardswish(), nn.SiLU(), nn.Hardswish()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        h = self.act1(self.bn1(self.conv1(x)))
        h = self.act2(self.bn2(self.conv2(h)))
        h = self.act3(self.bn3(self.conv3(h)))
        return self.fc(torch.flatten(self.pool(h), 1))


def dilated_hardswish(num_classes: int = 10) -> nn.Module:
    return DilatedHardswish(num_classes)


class UpsampleFPN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.c1 = cbr(1, 16)  # 16x16
        self.c2 = cbr(16, 32, stride=2)  # 8x8
        self.c3 = cbr(32, 48, stride=2)  # 4x4
        self.lat1, self.lat2, self.lat3 = nn.Conv2d(16, 24, 1), nn.Conv2d(32, 24, 1), nn.Conv2d(48, 24, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.smooth = cbr(24, 24)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.c1(x)
        f2 = self.c2(f1)
        f3 = self.c3(f2)
        p3 = self.lat3(f3)
        p2 = self.lat2(f2) + self.up(p3)
        p1 = self.lat1(f1) + self.up(p2)
        return self.fc(self.smooth(p1).mean((2, 3)))


def upsample_fpn(num_classes: int = 10) -> nn.Module:
    return UpsampleFPN(num_classes)


class GatedGLU(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(1, 24)
        self.feat = nn.Conv2d(24, 32, 3, padding=1)
        self.gate = nn.Conv2d(24, 32, 3, padding=1)
        self.glu_in = nn.Conv2d(32, 64, 3, padding=1)  # F.glu halves this to 32
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        h = self.feat(s) * torch.sigmoid(self.gate(s))
        h = F.glu(self.glu_in(h), dim=1)
        return self.fc(F.relu(self.bn(h)).mean((2, 3)))


def gated_glu(num_classes: int = 10) -> nn.Module:
    return GatedGLU(num_classes)


class StackCatSpatial(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.a = cbr(1, 24)
        self.b = cbr(1, 24, k=5)
        self.mix = cbr(24, 32, stride=2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.stack([self.a(x), self.b(x)], dim=1).amax(dim=1)  # (N, 24, 8, 8)
        w = torch.cat([s, s.flip(-1)], dim=3)  # (N, 24, 8, 16): joined along width
        return self.fc(self.mix(w).mean((2, 3)))


def stack_cat_spatial(num_classes: int = 10) -> nn.Module:
    return StackCatSpatial(num_classes)


def dw_multiplier(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(cbr(1, 16), cbr(16, 32, groups=16), cbr(32, 32, k=1), nn.MaxPool2d(2),
                         cbr(32, 64, groups=32), cbr(64, 32, k=1), _Head(32, num_classes))


class ReusedBlock(nn.Module):
    def __init__(self, c: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(1, c)
        self.shared = nn.Conv2d(c, c, 3, padding=1, bias=False)  # applied twice
        self.bn_a, self.bn_b = nn.BatchNorm2d(c), nn.BatchNorm2d(c)  # one per use (running stats differ)
        self.head = _Head(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + F.relu(self.bn_a(self.shared(h)))
        h = h + F.relu(self.bn_b(self.shared(h)))
        return self.head(h)


def reused_block(c: int = 32, num_classes: int = 10) -> nn.Module:
    return ReusedBlock(c, num_classes)


# ---------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------
# user habits that broke whole runs after the groups stage (tests/test_user_models.py; not in CASES)
# ---------------------------------------------------------------------------------------------------


class ViewFlatten(nn.Module):
    """LeNet-style: ``x.view(x.size(0), -1)`` before the classifier (fails on channels-last tensors)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(32 * 2 * 2, 48), nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2))), 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def view_flatten(num_classes: int = 10) -> nn.Module:
    return ViewFlatten(num_classes)


class DictOutput(nn.Module):
    """Returns ``{"logits": ..., "features": ...}`` like many research codebases."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(1, 16), cbr(16, 32, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x)
        return {"features": f, "logits": self.fc(f)}


def dict_output(num_classes: int = 10) -> nn.Module:
    return DictOutput(num_classes)


CASES: dict[str, tuple] = {
    "mlp": (mlp, data_images),
    "unet_seg": (unet_seg, data_seg),
    "lenet_flatten": (lenet_flatten, data_images),
    "inception_concat": (inception_concat, data_images),
    "csp_chunk": (csp_chunk, data_images),
    "split_uneven": (split_uneven, data_images),
    "decoder_view": (decoder_view, data_images),
    "resnext_grouped": (resnext_grouped, data_images),
    "mobilenetv2": (mobilenetv2, data_images),
    "groupnorm_cnn": (groupnorm_cnn, data_images),
    "instancenorm_cnn": (instancenorm_cnn, data_images),
    "mha_vit": (mha_vit, data_images),
    "fused_qkv_attention": (fused_qkv_attention, data_seq),
    "manual_attention": (manual_attention, data_images16),
    "se_resnet": (se_resnet, data_images),
    "shufflenet": (shufflenet, data_images),
    "gru_seq": (gru_seq, data_seq),
    "lstm_seq": (lstm_seq, data_seq),
    "lstm2_bidir": (lstm2_bidir, data_seq),
    "conv1d_resnet": (conv1d_resnet, data_signal),
    "conv3d_volume": (conv3d_volume, data_volume),
    "tied_autoencoder": (tied_autoencoder, data_images),
    "tied_shared_linear": (tied_shared_linear, data_images),
    "bn_no_running_stats": (bn_no_running_stats, data_images),
    "mixer_buffer_posenc": (mixer_buffer_posenc, data_seq),
    "squeezenet": (squeezenet, data_images),
    "unet": (unet, data_images16),
    "densenet": (densenet, data_images),
    "resnet_projection": (resnet_projection, data_images),
    "prelu_cnn": (prelu_cnn, data_images),
    "convnext": (convnext, data_images16),
    "functional_params": (functional_params, data_images),
    "wide_deep": (wide_deep, data_images),
    "inception_v1_add": (inception_v1_add, data_images),
    "token_transformer": (token_transformer, data_tokens),
    "cls_token_encoder": (cls_token_encoder, data_seq),
    "dilated_hardswish": (dilated_hardswish, data_rgb16),
    "upsample_fpn": (upsample_fpn, data_images16),
    "gated_glu": (gated_glu, data_images),
    "stack_cat_spatial": (stack_cat_spatial, data_images),
    "dw_multiplier": (dw_multiplier, data_images),
    "reused_block": (reused_block, data_images),
}
"""case name -> (model function, data function); see the module docstring for what each exercises."""

DATA_FUNCTIONS = (data_images, data_images16, data_rgb16, data_seq, data_signal, data_volume, data_tokens)
