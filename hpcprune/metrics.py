"""Evaluation, cost (params, MACs) and measured latency.

Evaluation returns partial sums (``EvalSums``) so that shares of a calibration set evaluated on
different ranks add up to exactly what one rank computes.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

# metric name -> True when higher is better
METRIC_HIGHER_IS_BETTER = {"accuracy": True, "perplexity": False}
# what runs the model in :func:`latency_ms` (``prune.latency_runtime``; hpcprune.schema.LatencyRuntime)
LATENCY_RUNTIMES = ("torch", "onnxruntime")


@dataclass
class EvalSums:
    """Sums over samples: correct predictions, summed loss, sample (or token) count."""

    correct: float = 0.0
    loss: float = 0.0
    count: float = 0.0

    def __add__(self, other: "EvalSums") -> "EvalSums":
        return EvalSums(self.correct + other.correct, self.loss + other.loss, self.count + other.count)

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.correct, self.loss, self.count)

    def metric(self, name: str) -> float:
        if self.count == 0:
            return math.nan
        if name == "accuracy":
            return self.correct / self.count
        if name == "perplexity":
            return math.exp(min(self.loss / self.count, 50.0))
        raise ValueError(f"unknown metric {name!r} (choose from {sorted(METRIC_HIGHER_IS_BETTER)})")

    def mean_loss(self) -> float:
        return self.loss / self.count if self.count else math.nan


def logits_of(out: Any) -> torch.Tensor:
    """The model's main output tensor (logits): the output itself, a Hugging Face ``ModelOutput``'s
    ``.logits``, a dict's ``"logits"`` (else its first tensor), or a tuple's or list's first tensor.

    Raises ``TypeError`` when the output holds no tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, dict):
        out = [out["logits"]] if isinstance(out.get("logits"), torch.Tensor) else list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            try:
                return logits_of(o)
            except TypeError:
                continue
    raise TypeError(f"the model's output ({type(out).__name__}) holds no tensor")


def task_loss(logits: Any, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of a model output (``logits_of``): (batch, classes) against (batch,) labels, or
    a language model's (batch, tokens, vocab) against (batch, tokens) next tokens."""
    logits = logits_of(logits)
    if logits.dim() == 3:  # language model: (batch, tokens, vocab)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction=reduction)
    return F.cross_entropy(logits, target, reduction=reduction)


def batch_sums(logits: Any, target: torch.Tensor) -> EvalSums:
    logits = logits_of(logits)
    loss = task_loss(logits.float(), target, reduction="sum").item()
    if logits.dim() == 3:
        return EvalSums(float((logits.argmax(-1) == target).sum()), loss, float(target.numel()))
    return EvalSums(float((logits.argmax(-1) == target).sum()), loss, float(target.shape[0]))


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> EvalSums:
    """Eval-mode partial sums over already-prepared (input, target) batches."""
    was_training = model.training
    model.eval()
    total = EvalSums()
    for x, y in batches:
        total = total + batch_sums(model(x), y)
    model.train(was_training)
    return total


def make_batches(dataset: torch.utils.data.Dataset, batch_size: int, device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole data set as a list of (input, target) batches on ``device``, in a fixed order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return [(x.to(device), y.to(device)) for x, y in loader]


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def module_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per module for one forward of ``example_input`` (per sample).

    Counted: Conv (k*k*Cin/groups*Cout per output pixel), Linear (in*out per token), BatchNorm and
    LayerNorm (one per element). Everything else (activations, adds, pooling) is not counted.
    """
    counts: dict[str, int] = {}
    hooks = []
    batch = example_input.shape[0] if isinstance(example_input, torch.Tensor) else 1

    def hook_for(name: str):
        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            if isinstance(mod, nn.modules.conv._ConvNd):
                k = math.prod(mod.kernel_size) * (mod.in_channels // mod.groups)
                macs = k * out.numel()
            elif isinstance(mod, nn.Linear):
                macs = mod.in_features * out.numel()
            elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                macs = out.numel()
            else:
                return
            counts[name] = counts.get(name, 0) + macs // batch

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            hooks.append(mod.register_forward_hook(hook_for(name)))
    try:
        with torch.inference_mode():
            was = model.training
            model.eval()
            model(example_input)
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return counts


def macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward per sample, as PyTorch's own flop formulas count what the
    forward really computes (``torch.utils.flop_counter``: matmuls, convolutions, attention; flops / 2;
    see :func:`hpcprune.flops.count_macs`). Elementwise ops and normalisations are not counted."""
    from .flops import count_macs

    return int(count_macs(model, example_input))


def latency_ms(model: nn.Module, example: torch.Tensor, batch_size: int, warmup: int = 3, repeats: int = 10, threads: int = 1,
               runtime: str = "torch") -> float:
    """Median wall time of one forward at ``batch_size`` on the example's device, in milliseconds.

    On the CPU it runs at ``threads`` torch threads (0: as set), so that numbers compare across runs
    and machines load (spinning OpenMP threads on busy cores inflate times a hundredfold).
    ``runtime="onnxruntime"``: the model exported to ONNX and run by an ONNX Runtime session
    instead (:func:`hpcprune.export.onnxruntime_latency_ms`, ``threads`` intra-op threads)."""
    if runtime == "onnxruntime":
        from .export import onnxruntime_latency_ms

        return onnxruntime_latency_ms(model, example, batch_size, warmup, repeats, threads)
    if runtime != "torch":
        raise ValueError(f"latency runtime {runtime!r}: choose from {', '.join(LATENCY_RUNTIMES)}")
    saved = torch.get_num_threads()
    if threads > 0 and not example.is_cuda:
        torch.set_num_threads(threads)
    try:
        return _latency_ms(model, example, batch_size, warmup, repeats)
    finally:
        torch.set_num_threads(saved)


@torch.inference_mode()
def _latency_ms(model: nn.Module, example: torch.Tensor, batch_size: int, warmup: int, repeats: int) -> float:
    model.eval()
    reps = math.ceil(batch_size / example.shape[0])
    x = example.repeat(reps, *([1] * (example.dim() - 1)))[:batch_size]
    cuda = x.is_cuda
    times: list[float] = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        model(x)
        if cuda:
            torch.cuda.synchronize(x.device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def recalibrate_bn(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Re-estimate BatchNorm running statistics on ``batches`` (cumulative average, no weight update)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:
        return
    saved = [(m.momentum, m.training) for m in bns]
    was = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: exact mean over the batches
        m.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for m, (mom, _) in zip(bns, saved):
        m.momentum = mom
    model.train(was)
