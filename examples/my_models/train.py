"""Train the example CNN on the example digits and save its state_dict, a checkpoint for
``checkpoint=...`` (hpcprune then skips its own dense training):

    PYTHONPATH=examples python -m my_models.train my_cnn.pt [epochs]
"""
from __future__ import annotations

import sys

import torch

from . import cnn, digits


def main(path: str, epochs: int = 10) -> None:
    torch.manual_seed(0)
    data, model = digits(), cnn()
    loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    x, y = data.val.tensors
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    torch.save(model.state_dict(), path)
    print(f"{path}: val accuracy {acc:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
