"""Dense training and fine-tuning losses: auxiliary classifiers trained, untrained parameters named."""
import collections
import logging
import os
import sys

import torch
from omegaconf import OmegaConf
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import archs  # noqa: E402

from hpcprune import metrics  # noqa: E402
from hpcprune.stages import train_dense  # noqa: E402

Outputs = collections.namedtuple("Outputs", ["logits", "aux_logits"])


class AuxNet(nn.Module):
    """GoogLeNet-style: an auxiliary classifier on an early feature map, returned in training only."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.head = nn.Linear(32, num_classes)
        self.aux = nn.Linear(16, num_classes)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        logits = self.head(torch.relu(self.body(h)).mean((2, 3)))
        return Outputs(logits, self.aux(h.mean((2, 3)))) if self.training else logits


def test_auxiliary_outputs_are_those_as_wide_as_the_logits():
    logits, aux, feats = torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 16)
    y = torch.randint(0, 10, (4,))
    loss, n = metrics.training_loss(Outputs(logits, aux), y, 0.3)
    assert n == 1 and torch.allclose(loss, metrics.task_loss(logits, y) + 0.3 * metrics.task_loss(aux, y))
    assert metrics.training_loss((logits, feats), y, 0.3)[1] == 0  # (logits, features): not an auxiliary classifier
    assert metrics.training_loss({"logits": logits, "aux": aux}, y, 0.3)[1] == 1
    assert metrics.training_loss(logits, y, 0.3) == (metrics.task_loss(logits, y), 0)


def test_dense_training_trains_an_auxiliary_classifier_and_names_one_it_does_not(caplog):
    """baseline.aux_weight=0.3: the auxiliary classifier learns (its loss is in the sum); at 0 its
    weights get no gradient, stay as initialised, and a warning names them after the first epoch."""
    data = archs.data_images(calib_samples=64, val_samples=64)
    torch.set_num_threads(1)
    for weight in (0.3, 0.0):
        torch.manual_seed(0)
        model = AuxNet()
        before = model.aux.weight.detach().clone()
        cfg = OmegaConf.create({"seed": 0, "baseline": {"epochs": 1, "batch_size": 64, "lr": 0.003, "weight_decay": 0.0,
                                                        "aux_weight": weight}})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hpcprune.stages"):
            train_dense(model, data, cfg, "cpu")
        text = caplog.text
        assert "dense training: epoch 1/1, loss" in text
        if weight:
            assert not torch.equal(model.aux.weight, before)
            assert "1 auxiliary output(s)" in text and "got no gradient" not in text, text
        else:
            assert torch.equal(model.aux.weight, before)
            assert "2 trainable parameters got no gradient in a whole epoch (aux.weight, aux.bias)" in text, text


def test_a_model_with_every_parameter_frozen_is_not_trained(caplog):
    """Nothing to train: one warning, the model unchanged (AdamW refused an empty parameter list)."""
    data = archs.data_images(calib_samples=64, val_samples=64)
    model = AuxNet()
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = OmegaConf.create({"seed": 0, "baseline": {"epochs": 1, "batch_size": 64, "lr": 0.003, "weight_decay": 0.0}})
    with caplog.at_level(logging.INFO, logger="hpcprune.stages"):
        train_dense(model, data, cfg, "cpu")
    assert "every parameter of the model is frozen" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not model.training
