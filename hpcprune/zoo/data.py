"""Built-in data sets that exist offline, as :class:`TaskData` bundles.

A user's own data plugs in through a Hydra ``_target_`` that returns a :class:`TaskData`.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset


@dataclass
class TaskData:
    """What hpcprune needs from a data set.

    ``train`` is used for dense training, fine-tuning and BatchNorm re-estimation, ``val`` for every
    reported metric, ``calib`` (a fixed subset of the training data) for sensitivity analysis and
    importance scores. ``example_input`` is one batch used to trace the model and measure latency.
    The loss is cross-entropy; ``metric`` names what is reported (``accuracy`` or ``perplexity``).
    """

    train: Dataset
    val: Dataset
    calib: Dataset
    example_input: torch.Tensor
    num_classes: int
    metric: str = "accuracy"  # see hpcprune.metrics.METRIC_HIGHER_IS_BETTER


def _split(x: torch.Tensor, y: torch.Tensor, val_count: int, calib_samples: int, seed: int) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    val_idx, train_idx = perm[:val_count], perm[val_count:]
    train = TensorDataset(x[train_idx], y[train_idx])
    val = TensorDataset(x[val_idx], y[val_idx])
    return _bundle(train, val, calib_samples, seed, int(y.max()) + 1)


def _bundle(train: Dataset, val: Dataset, calib_samples: int, seed: int, num_classes: int) -> TaskData:
    if calib_samples < 1:
        raise ValueError(f"data.calib_samples={calib_samples}: the calibration set must hold at least one sample")
    n = min(calib_samples, len(train))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed + 1)
    calib_idx = torch.randperm(len(train), generator=g)[:n].tolist()  # type: ignore[arg-type]
    calib = Subset(train, calib_idx)
    example = torch.stack([train[i][0] for i in range(min(8, len(train)))])  # type: ignore[arg-type]
    return TaskData(train=train, val=val, calib=calib, example_input=example, num_classes=num_classes)


def digits(calib_samples: int = 512, val_samples: int = 400, seed: int = 0) -> TaskData:
    """scikit-learn's ``load_digits``: 1,797 real 8x8 grey images of handwritten digits, 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    return _split(x, y, val_samples, calib_samples, seed)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(
    root: str = "/usr/share/datasets/fashion-mnist", calib_samples: int = 2000, seed: int = 0, train_samples: int = 0
) -> TaskData:
    """Fashion-MNIST from its original IDX files (Debian package ``dataset-fashion-mnist``).

    ``val`` is the official 10k test set; ``train_samples`` > 0 keeps only that many training images.
    """
    names = {
        "xtr": "train-images-idx3-ubyte.gz",
        "ytr": "train-labels-idx1-ubyte.gz",
        "xte": "t10k-images-idx3-ubyte.gz",
        "yte": "t10k-labels-idx1-ubyte.gz",
    }
    paths = {k: os.path.join(root, v) for k, v in names.items()}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"data.root={root}: Fashion-MNIST file {missing[0]} not found "
            "(apt-get install dataset-fashion-mnist, or point data.root at the IDX .gz files)"
        )

    def images(p: str, n: int = 0) -> torch.Tensor:
        raw = _read_idx(p)
        x = torch.from_numpy((raw[:n] if n > 0 else raw).copy()).float().unsqueeze(1) / 255.0  # cut before the
        return (x - 0.286) / 0.353  # float copy: 2,000 of 60,000 images normalised in 2 ms, not 0.3 s

    xtr, ytr = images(paths["xtr"], train_samples), torch.from_numpy(_read_idx(paths["ytr"]).astype(np.int64))
    if train_samples > 0:
        ytr = ytr[:train_samples]
    xte, yte = images(paths["xte"]), torch.from_numpy(_read_idx(paths["yte"]).astype(np.int64))
    return _bundle(TensorDataset(xtr, ytr), TensorDataset(xte, yte), calib_samples, seed, 10)
