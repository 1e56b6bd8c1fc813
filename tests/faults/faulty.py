"""Models that fail on purpose, as Hydra ``_target_``s for the fault tests (no hooks in hpcprune).

The sweep subprocesses import this module by name (``model._target_=faulty.raising_resnet``): the
tests put this folder on their ``PYTHONPATH``. Every factory returns the built-in
``hpcprune.zoo.models.resnet`` with forward hooks added, so state-dict keys, groups and
checkpoints are those of ``model=resnet_tiny``.

- ``raising_resnet``: the classifier's forward raises on one rank after ``fail_after`` forward calls
  in inference mode (sensitivity cells and evaluations), or, with ``when=train``, on one fine-tune
  DDP task during training. The rank is read from ``rank_var`` (``PMI_RANK``: an mpiexec rank;
  ``RANK``: a fine-tune task). ``FAULTY_OFF=1`` in the environment disables the fault (a rerun).
  ``FAULTY_MARK`` names a file that gets the time of the fault.
- ``nan_resnet``: the output of each module listed in ``nan_modules`` becomes NaN whenever that
  module's output is narrower than the dense model's: sensitivity cells that slice channels out of
  it (and the pruned model) output NaN in inference mode (cells, evaluations; not the groups stage's
  verification); the dense model is fine. ``nan_modules=all`` hooks every
  convolution and BatchNorm: the whole sensitivity grid is NaN.
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn

from hpcprune.zoo.models import resnet


class InjectedFault(RuntimeError):
    pass


def raising_resnet(fail_after: int = 0, fail_rank: int = 1, rank_var: str = "PMI_RANK", when: str = "eval",
                   **kwargs) -> nn.Module:
    model = resnet(**kwargs)
    calls = [0]

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if os.environ.get("FAULTY_OFF") == "1" or os.environ.get(rank_var) != str(fail_rank):
            return None
        if when == "eval" and not torch.is_inference_mode_enabled():
            return None
        if when == "train" and not (mod.training and torch.is_grad_enabled()):
            return None
        calls[0] += 1
        if calls[0] > fail_after:
            mark = os.environ.get("FAULTY_MARK")
            if mark:
                with open(mark, "w") as f:
                    f.write(repr(time.time()))
            raise InjectedFault(f"injected fault on {rank_var}={fail_rank} after {fail_after} forward calls")
        return None

    dict(model.named_modules())[_classifier(model)].register_forward_hook(hook)
    return model


def nan_resnet(nan_modules: list[str] | str = "all", **kwargs) -> nn.Module:
    model = resnet(**kwargs)
    mods = dict(model.named_modules())
    # "all": every convolution and BatchNorm (sensitivity cells may take a group's first convolution's
    # output from a cache instead of running it; the BatchNorm after it runs)
    kinds = (nn.Conv2d, nn.BatchNorm2d)
    names = [n for n, m in mods.items() if isinstance(m, kinds)] if nan_modules == "all" else list(nan_modules)
    for name in names:
        mod = mods[name]
        width = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.num_features

        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor, width: int = width) -> torch.Tensor | None:
            # only where cells and evaluations run (inference mode): the groups stage's verification
            # (plain no_grad) would otherwise exclude the group before any cell sees the fault
            if out.shape[1] != width and torch.is_inference_mode_enabled():
                return out * float("nan")
            return None

        mods[name].register_forward_hook(hook)
    return model


def _classifier(model: nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
