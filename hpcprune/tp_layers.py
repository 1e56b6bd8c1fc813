"""Layer types Torch-Pruning does not know, taught to it (``customized_pruners``) and to hpcprune's
own masks and slices.

- Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``): a
  linear layer whose weight is stored transposed, ``[in (nx), out (nf)]``, computing
  ``addmm(bias, x, weight)``; its ``nf`` sizes the output view, so it must follow a cut. Torch-Pruning
  1.6 treats it as an unknown module (its parameters "unwrapped", cut along a guessed dimension):
  :class:`Conv1DPruner` (a ``torch_pruning.pruner.BasePruningFunc``, the library's documented way to
  add a layer type) cuts it like ``nn.Linear`` on the transposed dimensions.

:func:`weight_dims` tells hpcprune's masks and slices on which weight dimension a layer holds its
output and input channels. ``transformers`` is never imported here: a Conv1D is recognised only
once ``transformers`` has been imported by the model's code.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import torch_pruning as tp
from torch import nn


def conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` when ``transformers`` is loaded, else None."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_conv1d(mod: Any) -> bool:
    """Whether ``mod`` is a Hugging Face Conv1D (a transposed-weight linear layer)."""
    cls = conv1d_type()
    return cls is not None and isinstance(mod, cls)


def weight_dims(mod: nn.Module) -> tuple[int, int]:
    """(output-channel dimension, input-channel dimension) of ``mod.weight``: (0, 1) for ``nn.Linear``
    and convolutions, (1, 0) for a Hugging Face Conv1D (weight ``[in, out]``)."""
    return (1, 0) if is_conv1d(mod) else (0, 1)


class Conv1DPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning's layer functions for a Hugging Face Conv1D (weight ``[nx, nf]``, bias ``[nf]``):
    output channels are weight columns and bias entries, input channels weight rows; ``nf`` / ``nx``
    follow the cut (as ``LinearPruner`` updates ``out_features`` / ``in_features``)."""

    TARGET_MODULES = None  # the Conv1D class is only known at run time (see check())

    def check(self, layer: nn.Module, idxs: Sequence[int], to_output: bool) -> None:
        if not is_conv1d(layer):
            raise AssertionError(f"Conv1DPruner on a {type(layer).__name__}")
        super().check(layer, idxs, to_output)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        drop = set(int(i) for i in idxs)
        keep = [i for i in range(layer.nf) if i not in drop]
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        drop = set(int(i) for i in idxs)
        keep = [i for i in range(layer.nx) if i not in drop]
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.nf)

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.nx)


_CONV1D_PRUNER = Conv1DPruner()


def customized_pruners(model: nn.Module) -> dict[type, tp.pruner.function.BasePruningFunc]:
    """Torch-Pruning ``customized_pruners`` for the layer types of ``model`` it does not know."""
    cls = conv1d_type()
    if cls is not None and any(isinstance(m, cls) for m in model.modules()):
        return {cls: _CONV1D_PRUNER}
    return {}
