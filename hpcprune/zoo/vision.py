"""torchvision classification models and ImageFolder data sets (the optional ``vision`` extra).

``pip install -e .[vision]`` brings torchvision; nothing here is imported by the core, and nothing
is downloaded: models are built with random initialisation (``weights=None``), or from a local
state-dict file.

    python -m hpcprune.sweep model=torchvision model.name=resnet18 data=image_folder data.root=DIR
"""
from __future__ import annotations

import difflib
import os
import types
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from .data import TaskData, _bundle

# ImageNet statistics: what torchvision's pretrained weights expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Smallest square input each model family accepts (measured with torchvision 0.29 on a forward
# pass at random init); every model not listed works at 32 (most at 16, too small to be sensible).
#  alexnet: five convs/pools leave 0x0 below 63 px; inception_v3: its stem needs 75 px;
#  maxvit_t: every stage's feature map must divide into 7x7 partitions, 224 is the first size that
#  does (the builder fixes partition_size=7); vit_*_P: image_size must be a multiple of the patch
#  size P (vit_h_14: 28, i.e. 2x2 patches like vit_b_16 at 32).
_MIN_SIZE = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224, "vit_h_14": 28}
_EXCLUDE = ("quantized", "segmentation", "detection", "video", "optical_flow")


def _tv() -> Any:
    try:
        import torchvision  # noqa: F401
        import torchvision.models
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"model=torchvision needs torchvision ({e}): pip install -e .[vision] "
            "(a torchvision built for the installed torch)"
        ) from None
    return torchvision


def classification_models() -> list[str]:
    """Names of torchvision's image classification models (no quantized, detection, segmentation,
    video or optical-flow models)."""
    tv = _tv()
    return sorted(tv.models.list_models(module=tv.models))


def _check_name(name: str) -> None:
    names = classification_models()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else f"{len(names)} models, e.g. {', '.join(names[:6])}"
    raise ValueError(
        f"model.name={name!r} is not a torchvision classification model ({hint}; "
        "hpcprune.zoo.vision.classification_models() lists them)"
    )


def min_image_size(name: str) -> int:
    """Smallest sensible square input size (pixels) for torchvision model ``name``."""
    _check_name(name)
    return _MIN_SIZE.get(name, 32)


def torchvision_model(
    name: str,
    num_classes: int = 10,
    weights: str | None = None,
    image_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A ``torchvision.models`` classification model by name, randomly initialised.

    ``weights``: optional path to a local state-dict file (``torch.save(model.state_dict())``) for
    this architecture with ``num_classes`` outputs; nothing is downloaded. ``image_size``: the input
    size, for the models whose architecture depends on it (ViT: ``image_size``, MaxViT:
    ``input_size``); other models ignore it. ``kwargs`` go to the model's builder.
    """
    tv = _tv()
    _check_name(name)
    if image_size is not None:
        lo = min_image_size(name)
        if image_size < lo:
            raise ValueError(f"data.image_size={image_size}: {name} needs inputs of at least {lo} px")
        if name.startswith("vit_"):
            patch = int(name.rsplit("_", 1)[1])
            if image_size % patch:
                raise ValueError(f"data.image_size={image_size}: {name} needs a multiple of its patch size {patch}")
            kwargs.setdefault("image_size", image_size)
        elif name.startswith("maxvit"):
            kwargs.setdefault("input_size", (image_size, image_size))
    if name in ("googlenet", "inception_v3"):
        # no auxiliary classifiers (their outputs are not used in eval and would be trained for nothing);
        # explicit init_weights silences torchvision's FutureWarning
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    model = tv.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"model.weights={weights}: no such file (a state dict saved with torch.save)")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            first = " ".join(lines[:2])[:300]
            raise ValueError(f"model.weights={weights}: does not fit {name} with num_classes={num_classes} ({first})") from None
    if name.startswith("swin"):  # heads and blocks prunable (see hpcprune.zoo.vision_swin)
        from .vision_swin import prunable_swin

        model = prunable_swin(model)
    if name.startswith("vit_"):  # its cells, verification and cost model start at the cut's encoder block
        model.prune_chain = types.MethodType(vit_chain, model)
    if weights is not None:  # trained weights: kept, not trained again (runs.mark_pretrained)
        from ..runs import mark_pretrained

        mark_pretrained(model)
    return model


class _Transformed(Dataset):
    """A view of an ImageFolder (shared file list) with its own transform."""

    def __init__(self, base: Any, indices: list[int], transform: Any) -> None:
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.base.samples[self.indices[i]]
        img = self.base.loader(path)
        return self.transform(img), label


def _stratified_split(samples: Sequence[tuple[Any, int]], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) sample indices: ``val_fraction`` of each class, by ``seed`` (at least one image per
    class in val when the class has two)."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, y) in enumerate(samples):
        by_class.setdefault(y, []).append(i)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction))) if len(idx) > 1 else 0
        val_idx += perm[:n_val]
        train_idx += perm[n_val:]
    return train_idx, val_idx


def image_folder(
    root: str,
    image_size: int = 32,
    calib_samples: int = 256,
    val_fraction: float = 0.2,
    seed: int = 0,
    train_transforms: str = "random_resized_crop",
    resize_ratio: float = 1.14,
) -> TaskData:
    """An image classification data set in ``torchvision.datasets.ImageFolder`` layout
    (``root/CLASS/xxx.png``), split into train and val (``val_fraction`` of each class, by ``seed``).

    ``train_transforms``: ``random_resized_crop`` (RandomResizedCrop + horizontal flip) or ``none``
    (the val transform: Resize to ``image_size * resize_ratio`` + CenterCrop ``image_size``). Both
    normalise with ImageNet statistics. ``calib`` and ``example_input`` use the val transform
    (deterministic), drawn from the training images.
    """
    tv = _tv()
    from torchvision import transforms as T

    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root={root}: no such directory (an ImageFolder layout: root/CLASS/image.png)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction}: must be in (0, 1)")
    try:
        base = tv.datasets.ImageFolder(root)
    except (FileNotFoundError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise FileNotFoundError(f"data.root={root}: not a usable ImageFolder ({first})") from None
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    val_tf = T.Compose([
        T.Resize(max(image_size, round(image_size * resize_ratio))),
        T.CenterCrop(image_size),
        T.ToTensor(),
        norm,
    ])
    if train_transforms == "random_resized_crop":
        train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    elif train_transforms == "none":
        train_tf = val_tf
    else:
        raise ValueError(f"data.train_transforms={train_transforms!r}: use random_resized_crop or none")

    train_idx, val_idx = _stratified_split(base.samples, val_fraction, seed)
    if not val_idx:
        raise ValueError(f"data.root={root}: too few images for a validation split ({len(base.samples)} in all)")
    train = _Transformed(base, sorted(train_idx), train_tf)
    val = _Transformed(base, sorted(val_idx), val_tf)
    # calibration and the example batch: training images through the deterministic val transform
    plain = _Transformed(base, sorted(train_idx), val_tf)
    data = _bundle(plain, val, calib_samples, seed, len(base.classes))
    data.train = train
    return data


class _ViTStem(nn.Module):
    """A torchvision ``VisionTransformer``'s forward up to its first encoder block: patches, class
    token, position embedding, dropout (the model's own modules; held, not registered, so the
    element owns no parameters of its own)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "vit", vit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit._process_input(x)
        x = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return vit.encoder.dropout(x + vit.encoder.pos_embedding)


class _ClassToken(nn.Module):
    """``x[:, 0]``: the class token's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def vit_chain(vit: nn.Module) -> list[tuple[str, nn.Module]]:
    """A torchvision ``VisionTransformer`` as a chain (``prune_chain``, see
    :func:`hpcprune.sensitivity.cells.flatten_chain`): the stem (:class:`_ViTStem`), every encoder
    block, the final norm, the class token, the head's layers. Its forward is no chain of its own
    children (it reads the class token and the position embedding, and the encoder holds the
    blocks), so without it every sensitivity cell, verification and cost-model level of a ViT ran the
    whole forward; the chain is checked against the model's output before use."""
    chain: list[tuple[str, nn.Module]] = [("<stem>", _ViTStem(vit))]
    chain += [(f"encoder.layers.{n}", m) for n, m in vit.encoder.layers.named_children()]
    chain += [("encoder.ln", vit.encoder.ln), ("<class_token>", _ClassToken())]
    chain += [(f"heads.{n}", m) for n, m in vit.heads.named_children()]
    return chain
