"""Evaluation, cost (params, MACs) and measured latency.

Evaluation returns partial sums (``EvalSums``) so that shares of a calibration set evaluated on
different ranks add up to exactly what one rank computes.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

# metric name -> True when higher is better
METRIC_HIGHER_IS_BETTER = {"accuracy": True, "perplexity": False}
# what runs the model in :func:`latency_ms` (``prune.latency_runtime``; hpcprune.schema.LatencyRuntime)
LATENCY_RUNTIMES = ("torch", "onnxruntime")
# which clock times a forward (``baseline.latency_clock``; hpcprune.schema.LatencyClock): :func:`latency_clock`
LATENCY_CLOCKS = ("auto", "wall", "thread")


@dataclass
class EvalSums:
    """Sums over samples: correct predictions, summed loss, sample (or token) count, and summed
    KL divergence from the dense model's predictions (:func:`kl_sums`; 0 where not measured)."""

    correct: float = 0.0
    loss: float = 0.0
    count: float = 0.0
    kl: float = 0.0

    def __add__(self, other: "EvalSums") -> "EvalSums":
        return EvalSums(self.correct + other.correct, self.loss + other.loss, self.count + other.count,
                        self.kl + other.kl)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.correct, self.loss, self.count, self.kl)

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

    def mean_kl(self) -> float:
        return self.kl / self.count if self.count else math.nan


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


def classes_last(logits: torch.Tensor) -> torch.Tensor:
    """Logits with the class axis last: a dense prediction's (batch, classes, H, W[, D]) (PyTorch's
    layout for segmentation, class axis 1) as (batch, H, W[, D], classes); others as they are
    ((batch, classes), a language model's (batch, tokens, vocab))."""
    return logits.movedim(1, -1) if logits.dim() >= 4 else logits


def task_loss(logits: Any, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of a model output (``logits_of``): (batch, classes) against (batch,) labels, a
    language model's (batch, tokens, vocab) against (batch, tokens) next tokens, or a dense
    prediction's (batch, classes, H, W) against (batch, H, W) labels (segmentation). 16-bit logits
    (bfloat16, float16) are upcast to float32 first (log-softmax over a vocabulary in bfloat16 loses
    ~2 significant digits); the gradient flows back through the cast."""
    logits = logits_of(logits)
    if logits.is_floating_point() and logits.dtype.itemsize < 4:
        logits = logits.float()
    if logits.dim() == 3:  # language model: (batch, tokens, vocab)
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction=reduction)
    return F.cross_entropy(logits, target, reduction=reduction)


def auxiliary_outputs(out: Any, main: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of a model's output (a tuple, list, named tuple or dict, one level of nesting)
    other than ``main`` (:func:`logits_of`) with ``main``'s shape: auxiliary classifiers' logits, as
    torchvision's GoogLeNet (``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)``) and Inception v3
    return in training. Features of another shape (a tuple ``(logits, features)``) are not counted."""
    def items(o: Any) -> list:
        return list(o.values()) if isinstance(o, dict) else list(o) if isinstance(o, (list, tuple)) else [o]

    flat = [t for o in (items(out) if isinstance(out, (dict, list, tuple)) else []) for t in items(o)]
    return [t for t in flat if isinstance(t, torch.Tensor) and t is not main and t.shape == main.shape
            and t.is_floating_point()]


def training_loss(out: Any, target: torch.Tensor, aux_weight: float = 0.0) -> tuple[torch.Tensor, int]:
    """The training loss of a model output: :func:`task_loss` of its main output plus ``aux_weight``
    times that of each auxiliary output (:func:`auxiliary_outputs`; GoogLeNet's deep supervision,
    Szegedy et al. 2015, weighs each auxiliary classifier's loss by 0.3). Returns (the loss, how many
    auxiliary outputs the model returned)."""
    main = logits_of(out)
    aux = auxiliary_outputs(out, main) if not isinstance(out, torch.Tensor) else []
    loss = task_loss(main, target)
    if aux and aux_weight:
        loss = loss + aux_weight * sum(task_loss(a, target) for a in aux)
    return loss, len(aux)


class GradientCheck:
    """Which trainable parameters of ``model`` never get a gradient: call :meth:`step` after each
    ``backward()`` (with ``zero_grad(set_to_none=True)`` before it) over a whole epoch (a layer a
    stochastic-depth forward skips in one step gets one in another), then :meth:`missing`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.seen: set[int] = set()

    def step(self) -> None:
        if len(self.seen) < len(self.params):
            self.seen.update(i for i, (_, p) in enumerate(self.params) if i not in self.seen and p.grad is not None)

    def missing(self) -> list[str]:
        return [n for i, (n, _) in enumerate(self.params) if i not in self.seen]

    def warning(self, stage: str) -> str | None:
        """One line naming the parameters no step reached, or None."""
        miss = self.missing()
        if not miss:
            return None
        return (f"{stage}: {len(miss)} trainable parameters got no gradient in a whole epoch "
                f"({', '.join(miss[:4])}{' ...' if len(miss) > 4 else ''}): the loss does not reach them, so they keep "
                "their values (an output the loss does not use, or a layer the forward skips?)")


def batch_sums(logits: Any, target: torch.Tensor) -> EvalSums:
    """(correct, summed loss, count) of one batch: per sample for classification, per token for a
    language model, per pixel for a dense prediction (its accuracy is pixel accuracy)."""
    logits = logits_of(logits)
    loss = task_loss(logits.float(), target, reduction="sum").item()
    if logits.dim() >= 3:
        return EvalSums(float((classes_last(logits).argmax(-1) == target).sum()), loss, float(target.numel()))
    return EvalSums(float((logits.argmax(-1) == target).sum()), loss, float(target.shape[0]))


# KL divergence from the dense model (``sensitivity.damage=kl``): the dense model's top-k
# next-token (or class) log-probabilities travel packed in the target tensor, so that every way the
# calibration batches are cut (shards, a team's re-batched samples) carries them along.
def reference_targets(logits: Any, target: torch.Tensor, topk: int) -> torch.Tensor:
    """The dense model's predictions packed with the labels, for :func:`kl_sums`.

    ``logits``: the dense model's output on a batch, (batch, classes) or (batch, tokens, vocab);
    ``target``: its labels, (batch,) or (batch, tokens). Returns a float64 tensor of shape
    ``target.shape + (2 + 2k,)``, k = min(``topk``, classes): the label, the log-probability of the
    classes outside the top k (-inf when k covers them all), the top-k class indices, their
    log-probabilities. Labels and indices are exact in float64 (up to 2**53)."""
    lp = torch.log_softmax(classes_last(logits_of(logits)).float(), dim=-1)
    k = min(int(topk), lp.shape[-1])
    top_lp, top_i = lp.topk(k, dim=-1)
    tail = _tail_logp(lp, top_i)
    return torch.cat([target.unsqueeze(-1).double(), tail.unsqueeze(-1).double(), top_i.double(), top_lp.double()], -1)


def _tail_logp(lp: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``top_i`` (-inf when there is none). Overwrites ``lp``'s
    top-k entries (no copy of a vocabulary-wide tensor): the callers' own log-softmax, read before."""
    if top_i.shape[-1] == lp.shape[-1]:
        return torch.full(lp.shape[:-1], -math.inf, dtype=lp.dtype, device=lp.device)
    return lp.scatter_(-1, top_i, -math.inf).logsumexp(-1)


def kl_sums(logits: Any, packed: torch.Tensor) -> EvalSums:
    """:func:`batch_sums` against ``packed`` (:func:`reference_targets`), plus the summed KL
    divergence KL(dense || this model) of the predictive distributions coarsened to the dense
    model's top-k classes and the rest (a lower bound of the full KL that equals it when k covers
    every class; nats, summed over samples or tokens).

    KL from the dense model as a pruning damage: Muralidharan et al., "Compact Language Models via
    Pruning and Knowledge Distillation" (Minitron, 2024). Unlike the loss increase it does not
    depend on which next token the calibration text happens to hold, so a few calibration windows
    rank small damages with less noise."""
    logits = classes_last(logits_of(logits))
    k = (packed.shape[-1] - 2) // 2
    target = packed[..., 0].long()
    lq = torch.log_softmax(logits.float(), dim=-1)  # once: the loss is read off it too
    sums = EvalSums(float((logits.argmax(-1) == target).sum()), -float(lq.gather(-1, target.unsqueeze(-1)).sum()),
                    float(target.numel()))
    top_i = packed[..., 2:2 + k].long()
    p_lp = packed[..., 2 + k:].to(lq.dtype)
    q_lp = lq.gather(-1, top_i)
    p_tail = packed[..., 1].to(lq.dtype)
    q_tail = _tail_logp(lq, top_i)
    kl = (p_lp.exp() * (p_lp - q_lp)).sum(-1)
    kl = kl + torch.where(p_tail > -math.inf, p_tail.exp() * (p_tail - q_tail), torch.zeros_like(p_tail))
    sums.kl = float(kl.sum())
    return sums


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


def latency_clock(clock: str, device: str, threads: int, runtime: str = "torch") -> str:
    """The clock :func:`latency_ms` uses for ``baseline.latency_clock``: ``wall`` or ``thread``.

    ``thread`` is the calling thread's CPU time (``time.thread_time``, Linux
    ``CLOCK_THREAD_CPUTIME_ID``): with torch on the CPU at one intra-op thread the whole forward runs
    on that thread, so its CPU time is the latency the forward has on a core of its own, without
    the time it waits descheduled on a shared, oversubscribed node. What still disturbs it only
    adds time (caches refilled after another process ran on the core, interrupts), so the
    **minimum** over the repeats estimates the undisturbed forward, as ``timeit`` advises for
    repeated timings. Measured on a 2-core machine at load 5-8 (a 32-64-128 ResNet on 8x8 inputs
    and its pruned copy, batch 128, 20 repeats, timed again and again): the dense/pruned ratio of
    wall-clock medians spread over 0.8-2.0, of thread-time minima over 1.65-1.80. ``auto``:
    ``thread`` there, ``wall`` elsewhere
    (a GPU, several threads, ONNX Runtime). ValueError when ``thread`` is asked for where it does
    not time the forward."""
    if clock not in LATENCY_CLOCKS:
        raise ValueError(f"latency clock {clock!r}: choose from {', '.join(LATENCY_CLOCKS)}")
    single = not str(device).startswith("cuda") and threads == 1 and runtime == "torch"
    if clock == "thread" and not single:
        raise ValueError(f"baseline.latency_clock=thread times the calling thread: it needs torch on the CPU at "
                         f"baseline.latency_threads=1 (here device {device}, {threads} thread(s), runtime {runtime})")
    return "thread" if clock == "thread" or (clock == "auto" and single) else "wall"


# glibc malloc's fixed thresholds while timing (bytes): allocations below MMAP come from the heap, and
# up to TRIM of free heap stays mapped (see steady_allocator)
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 64 << 20, 512 << 20
_ALLOCATOR_SET = False


def steady_allocator() -> bool:
    """Fix glibc malloc's mmap and trim thresholds for this process (once; ``mallopt``), so that a
    forward's activations are not handed back to the operating system after every pass and faulted
    in again on the next. By default both thresholds start at 128 KiB and only rise as the process
    frees large blocks: the same forward was ~30 % slower early in a sweep (the dense model's
    latency, timed right after loading) than minutes later (the pruned models'), CPU time spent in
    page faults, and the run's speed-up and latency fractions disagreed. A long-running inference
    server is in the later state; so are all of hpcprune's timings now. Freed memory above
    ``_TRIM_THRESHOLD`` still goes back. True when set (Linux with glibc), else False (a no-op)."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
        _ALLOCATOR_SET = bool(libc.mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc
        return False
    return _ALLOCATOR_SET


def latency_ms(model: nn.Module, example: torch.Tensor, batch_size: int, warmup: int = 3, repeats: int = 10, threads: int = 1,
               runtime: str = "torch", clock: str = "wall") -> float:
    """Time of one forward at ``batch_size`` on the example's device, in milliseconds, over
    ``repeats`` passes after ``warmup``: the median wall-clock time (``clock="wall"``;
    ``time.perf_counter``, between CUDA synchronizations on a GPU), or the minimum CPU time of the
    calling thread (``clock="thread"``; :func:`latency_clock` says where it applies and why the
    minimum).

    On the CPU it runs at ``threads`` torch threads (0: as set), so that numbers compare across runs
    and machines load (spinning OpenMP threads on busy cores inflate times a hundredfold).
    ``runtime="onnxruntime"``: the model exported to ONNX and run by an ONNX Runtime session
    instead (:func:`hpcprune.export.onnxruntime_latency_ms`, ``threads`` intra-op threads, wall clock)."""
    if runtime == "onnxruntime":
        from .export import onnxruntime_latency_ms

        return onnxruntime_latency_ms(model, example, batch_size, warmup, repeats, threads)
    return latencies_ms([model], example, batch_size, warmup, repeats, threads, runtime, clock)[0]


def latencies_ms(models: Sequence[nn.Module], example: torch.Tensor, batch_size: int, warmup: int = 3, repeats: int = 10,
                 threads: int = 1, runtime: str = "torch", clock: str = "wall") -> list[float]:
    """:func:`latency_ms` of each of ``models`` (milliseconds, in order), timed in alternation: one
    pass of each in turn, ``warmup + repeats`` rounds, so that every model is timed under the same
    machine conditions (a speed-up against the dense model on a node whose load changes from one
    second to the next). ONNX Runtime: one model after the other (each its own session)."""
    if runtime == "onnxruntime":
        return [latency_ms(m, example, batch_size, warmup, repeats, threads, runtime, clock) for m in models]
    if runtime != "torch":
        raise ValueError(f"latency runtime {runtime!r}: choose from {', '.join(LATENCY_RUNTIMES)}")
    steady_allocator()
    saved = torch.get_num_threads()
    if threads > 0 and not example.is_cuda:
        torch.set_num_threads(threads)
    try:
        if clock == "thread":
            return [min(t) for t in _pass_times(models, example, batch_size, warmup, repeats, time.thread_time)]
        return [statistics.median(t) for t in _pass_times(models, example, batch_size, warmup, repeats, time.perf_counter)]
    finally:
        torch.set_num_threads(saved)


@torch.inference_mode()
def _pass_times(models: Sequence[nn.Module], example: torch.Tensor, batch_size: int, warmup: int, repeats: int,
                now: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Per model, milliseconds of each of its ``repeats`` timed forwards by the clock ``now`` (the
    models take turns, one pass each)."""
    for m in models:
        m.eval()
    reps = math.ceil(batch_size / example.shape[0])
    x = example.repeat(reps, *([1] * (example.dim() - 1)))[:batch_size]
    cuda = x.is_cuda
    times: list[list[float]] = [[] for _ in models]
    for i in range(warmup + repeats):
        for m, t in zip(models, times):
            if cuda:
                torch.cuda.synchronize(x.device)
            t0 = now()
            m(x)
            if cuda:
                torch.cuda.synchronize(x.device)
            if i >= warmup:
                t.append((now() - t0) * 1000.0)
    return times


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
