"""Smoke test of the architecture suite in tests/archs.py: every case builds, runs and is small."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import archs  # noqa: E402

_DATA: dict = {}


def _data(fn):
    if fn not in _DATA:
        _DATA[fn] = fn(calib_samples=32, val_samples=400, seed=0)
    return _DATA[fn]


def test_registry_matches_docstring():
    doc = archs.__doc__
    for name, (model_fn, data_fn) in archs.CASES.items():
        assert f"\n{name} " in doc, f"case {name} is missing from the docstring table"
        assert getattr(archs, model_fn.__name__) is model_fn and model_fn.__name__ == name
        assert getattr(archs, data_fn.__name__) is data_fn
    assert len(archs.CASES) >= 28


@pytest.mark.parametrize("name", sorted(archs.CASES))
def test_case(name):
    torch.set_num_threads(1)
    model_fn, data_fn = archs.CASES[name]
    data = _data(data_fn)
    classes = 3 if name == "unet_seg" else 10  # the segmentation case: 3 classes per pixel
    assert data.num_classes == classes and len(data.val) == 400 and len(data.calib) == 32
    assert data.example_input.shape[0] == 8
    torch.manual_seed(0)
    model = model_fn().eval()
    torch.manual_seed(0)
    again = model_fn().eval()
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), f"{name}: construction not deterministic at {k}"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 60_000, f"{name}: {n_params} parameters"
    x = torch.stack([data.val[i][0] for i in range(16)])
    with torch.no_grad():
        y = model(x)
        y8 = model(data.example_input)
    out = (classes, 16, 16) if name == "unet_seg" else (classes,)
    assert y.shape == (16, *out) and y8.shape == (8, *out)
    assert torch.isfinite(y).all() and torch.isfinite(y8).all()
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
