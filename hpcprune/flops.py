"""Exact MACs and parameter counts of one forward: PyTorch's flop counter, with every counted op recorded.

MACs are PyTorch's own: ``torch.utils.flop_counter`` (``FlopCounterMode`` and its registry of aten op
-> flop formula) counts 2 flops per multiply-accumulate of every matmul, convolution and attention
product the forward really runs (functional calls, ``nn.MultiheadAttention``'s packed projection,
recurrent layers and HF ``Conv1D``'s addmm included, whatever module issues them); MACs = flops / 2.
Element-wise work (norms, activations, adds, softmax) has no formula and is not counted.

Counting runs under a few switches that make CPU kernels visible to the counter without changing
what is computed: ``nn.MultiheadAttention``'s fused fast path off (its ``_native_multi_head_attention``
has no formula), oneDNN off in models with recurrent layers (``nn.LSTM`` on the CPU runs
``mkldnn_rnn_layer``, no formula), and formulas added for ops the registry lacks (the CPU flash
attention, ``mv``, ``addmv``, ``dot``, ``addbmm``).

:func:`record` keeps every counted op (:class:`Op`: its dims, its module scope, its flops) in call
order; :mod:`hpcprune.costs` derives the exact cost polynomials from such recordings.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten

_ROOT = "\x00root"  # the model's own name in the module tracker


# ---- formulas the registry lacks (flops, 2 per multiply-accumulate, as the registry's) ----------------
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _mv_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    m, k = a_shape
    return 2 * m * k


def _addmv_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return _mv_flop(a_shape, b_shape)


def _dot_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


def _addbmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    b, m, k = a_shape
    return 2 * b * m * k * b_shape[2]


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``torch._grouped_mm`` (mixture-of-experts layers: every expert's tokens times its weight):
    2D x 3D (tokens by expert offsets), 3D x 3D (a batch of groups) and 3D x 2D contract the last
    dimension of ``a`` into every output element; 2D x 2D splits the contraction (K) by offsets
    into groups, so each output element of group g sums over its part of K only. Rows past the last
    offset count as computed (shapes only are known here: an upper bound by the padding)."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    aten._scaled_dot_product_fused_attention_overrideable: _sdpa_cpu_flop,
    aten.mv: _mv_flop,
    aten.addmv: _addmv_flop,
    aten.dot: _dot_flop,
    aten.vdot: _dot_flop,
    aten.addbmm: _addbmm_flop,
}
if hasattr(aten, "_grouped_mm"):  # torch >= 2.8
    EXTRA_FORMULAS[aten._grouped_mm] = _grouped_mm_flop

# ops that multiply-accumulate but have no formula: reported (``ExactCost.uncounted``), not counted
_HEAVY = re.compile(r"mm|conv|attention|rnn|lstm|gru|matmul|dot|einsum|linear|_mv|tensordot|baddbmm", re.I)


def _needs_onednn_off(model: nn.Module) -> bool:
    """Whether counting ``model`` needs oneDNN off: only recurrent layers reach the flop counter
    differently with it (``nn.LSTM`` dispatches ``mkldnn_rnn_layer``, which has no formula).
    Convolutions and matmuls reach it as the same aten ops either way (oneDNN is chosen inside the
    kernel), and run about 3x faster with it (``efficientnet_v2_l``: 0.13 s against 0.40 s a
    recording), which is most of the groups stage's cost model on a CNN."""
    return any(isinstance(m, nn.RNNBase) for m in model.modules())


@contextlib.contextmanager
def counting_env(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, the fused ``nn.MultiheadAttention`` fast path off, and oneDNN off
    where the model has recurrent layers (:func:`_needs_onednn_off`); the same switches for a model
    and every cut of it, so their recordings list the same ops. Parameters are marked as not
    requiring gradients meanwhile: under ``no_grad`` a view of one (``self.query.expand(n, -1, -1)``:
    DETR's object queries, Perceiver's latents) still requires grad but has no ``grad_fn``, and
    ``FlopCounterMode``'s module tracker fails on it ("Expected gradient function to be set",
    PyTorch 2.13).

    Inside :func:`counting_switches` of the same model (the cost model's whole derivation: a
    recording per group) it only disables autograd, so that the switches are not set and walked
    again per recording (12 ms a recording on EfficientNetV2-L's 1400 modules)."""
    with contextlib.ExitStack() as stack:
        if id(model) not in _switched:
            stack.enter_context(counting_switches(model))
        with torch.no_grad():
            yield


_switched: set[int] = set()  # ids of the models inside counting_switches now


@contextlib.contextmanager
def counting_switches(model: nn.Module) -> Iterator[None]:
    """:func:`counting_env`'s switches without disabling autograd, held across several recordings
    of ``model`` and of its in-place cuts (re-entrant: an inner one does nothing). A cut made
    meanwhile keeps them: Torch-Pruning's new tensors copy ``requires_grad`` from the ones they
    replace; a module the cut puts in must be put in eval mode by whoever cuts. Not for cuts that
    trace a dependency graph (its tracing needs parameters that require gradients)."""
    if id(model) in _switched:
        yield
        return
    _switched.add(id(model))
    try:
        with _switches(model):
            yield
    finally:
        _switched.discard(id(model))


@contextlib.contextmanager
def _switches(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]  # each module's own (a frozen backbone's eval)
    fast = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with contextlib.ExitStack() as stack:
            if _needs_onednn_off(model):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # oneDNN's flag setter warns about TF32 on Intel GPUs
                    mk = torch.backends.mkldnn.flags(enabled=False)
                    mk.__enter__()

                def restore() -> None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        mk.__exit__(None, None, None)
                stack.callback(restore)
            yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        torch.backends.mha.set_fastpath_enabled(fast)
        for m, mode in modes:
            m.training = mode


def _first(x: Any) -> Any:
    """One sample of an example input (a tensor, or a tuple/list/dict of them)."""
    if isinstance(x, torch.Tensor):
        return x[:1]
    if isinstance(x, (tuple, list)):
        return type(x)(_first(v) for v in x)
    if isinstance(x, dict):
        return {k: _first(v) for k, v in x.items()}
    return x


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return model(*x)
    if isinstance(x, dict):
        return model(**x)
    return model(x)


# ---- recording ----------------------------------------------------------------------------------
@dataclass
class Op:
    """One counted op of a forward: what its flop formula needs, with every tensor dimension and
    integer argument in ``dims`` (the values a cut can change) and the rest in the signature."""

    packet: Any
    spec: Any  # pytree spec of (args, kwargs, out)
    kinds: tuple  # per leaf: "T" tensor, "I" integer, "C" constant
    consts: tuple  # per leaf: (ndim, dtype) for T, None for I, the value for C
    dims: tuple[int, ...]
    scope: frozenset[str]  # qualified names of the modules running (the model itself: "")
    flops: int

    @property
    def name(self) -> str:
        return str(self.packet)

    def signature(self) -> tuple:
        return (self.packet, str(self.spec), self.kinds, self.consts)

    def module(self) -> str:
        """The innermost module that ran the op (longest name in scope)."""
        return max(self.scope, key=lambda s: (s.count("."), len(s)), default="")

    @classmethod
    def make(cls, packet: Any, args: Any, kwargs: Any, out: Any, flops: int, scope: frozenset[str]) -> "Op":
        leaves, spec = pytree.tree_flatten((args, kwargs, out))
        kinds, consts, dims = [], [], []
        for v in leaves:
            if isinstance(v, torch.Tensor):
                kinds.append("T")
                consts.append((v.dim(), v.dtype))
                dims.extend(int(s) for s in v.shape)
            elif isinstance(v, int) and not isinstance(v, bool):
                kinds.append("I")
                consts.append(None)
                dims.append(int(v))
            else:
                kinds.append("C")
                consts.append(v if isinstance(v, (bool, float, str, type(None), torch.dtype, torch.device)) else repr(v))
        return cls(packet, spec, tuple(kinds), tuple(consts), tuple(dims), scope, int(flops))

    def formula_args(self, dims: Sequence[int], raw: bool) -> tuple[tuple, dict, Any]:
        """(args, kwargs, out) with ``dims`` put back: shapes (``torch.Size``) for shape formulas,
        meta tensors for raw ones."""
        leaves, pos = [], 0
        for kind, const in zip(self.kinds, self.consts):
            if kind == "T":
                nd, dtype = const
                shape = torch.Size(int(d) for d in dims[pos:pos + nd])
                leaves.append(torch.empty(shape, dtype=dtype, device="meta") if raw else shape)
                pos += nd
            elif kind == "I":
                leaves.append(int(dims[pos]))
                pos += 1
            else:
                leaves.append(const)
        return pytree.tree_unflatten(leaves, self.spec)


class Recorder(FlopCounterMode):
    """``FlopCounterMode`` (the same decompositions and formulas, plus :data:`EXTRA_FORMULAS`) that
    also records every counted op, in call order, with its module scope (exact qualified names of
    ``model``), and names the ops that ran without a formula."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(display=False, custom_mapping=EXTRA_FORMULAS)
        self.ops: list[Op] = []
        self.unformulated: dict[str, int] = {}
        tr = self.mod_tracker
        for name, mod in model.named_modules():
            tr._known_modules[mod] = name if name else _ROOT
            tr._seen_modules.add(mod)

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet in self.flop_registry:
            flops = int(self.flop_registry[func_packet](*args, **kwargs, out_val=out))
            for par in set(self.mod_tracker.parents):
                self.flop_counts[par][func_packet] += flops
            scope = frozenset("" if p == _ROOT else p for p in self.mod_tracker.parents if p != "Global")
            self.ops.append(Op.make(func_packet, args, kwargs, out, flops, scope))
        else:
            name = str(func_packet)
            if _HEAVY.search(name.split(".")[-1]):
                self.unformulated[name] = self.unformulated.get(name, 0) + 1
        return out


class ShapeRecorder(Recorder):
    """A :class:`Recorder` for the cut levels of a derivation, which need only every counted op's
    dims: the same dispatch and decompositions (so the same op list), no module tracking and no flop
    formula evaluated (``Op.flops`` 0, ``Op.scope`` empty); about a third cheaper per op."""

    def __enter__(self) -> "ShapeRecorder":
        from torch.utils.flop_counter import _FlopCounterMode
        self.flop_counts.clear()
        self.mode = _FlopCounterMode(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *args: Any) -> Any:
        b = self.mode.__exit__(*args)
        self.mode = None
        return b

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet in self.flop_registry:
            self.ops.append(Op.make(func_packet, args, kwargs, out, 0, frozenset()))
        return out


def record(model: nn.Module, example_input: Any, shapes_only: bool = False) -> Recorder:
    """Run one sample of ``example_input`` through ``model`` (eval, no grad) under a :class:`Recorder`
    (a :class:`ShapeRecorder` with ``shapes_only``)."""
    rec = ShapeRecorder(model) if shapes_only else Recorder(model)
    with counting_env(model), rec:
        _call(model, _first(example_input))
    return rec


def count_macs(model: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of one forward of one sample (``example_input[:1]``): PyTorch's flop
    counter's total (matmuls, convolutions, attention products), halved."""
    return record(model, example_input).get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    """Parameters, a tied parameter once."""
    return sum(p.numel() for p in model.parameters())
