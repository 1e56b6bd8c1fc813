"""scikit-learn's 8x8 handwritten digits as the ``TaskData`` hpcprune needs."""
from __future__ import annotations

import torch
from torch.utils.data import Subset, TensorDataset

from hpcprune.zoo.data import TaskData


def digits(val_samples: int = 400, calib_samples: int = 256, seed: int = 0) -> TaskData:
    """train / val split, a fixed calibration subset of train, one example batch."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:val_samples], perm[val_samples:]
    train_set = TensorDataset(x[train], y[train])
    calib_set = Subset(train_set, range(min(calib_samples, len(train))))
    return TaskData(
        train=train_set,
        val=TensorDataset(x[val], y[val]),
        calib=calib_set,
        example_input=x[train[:8]],
        num_classes=10,
    )
