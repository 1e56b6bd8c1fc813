"""Exact MACs and parameter counts, and their exact dependence on the kept units of every group.

MACs are PyTorch's own: ``torch.utils.flop_counter`` (``FlopCounterMode`` and its registry of aten op
-> flop formula) counts 2 flops per multiply-accumulate of every matmul, convolution and attention
product the forward really runs (functional calls, ``nn.MultiheadAttention``'s packed projection,
recurrent layers and HF ``Conv1D``'s addmm included, whatever module issues them); MACs = flops / 2.
Element-wise work (norms, activations, adds, softmax) has no formula and is not counted.

Counting runs under a few switches that make CPU kernels visible to the counter without changing
what is computed: ``nn.MultiheadAttention``'s fused fast path off (its ``_native_multi_head_attention``
has no formula), oneDNN off (``nn.LSTM`` on the CPU runs ``mkldnn_rnn_layer``, no formula), and
formulas added for ops the registry lacks (the CPU flash attention, ``mv``, ``addmv``, ``dot``,
``addbmm``).

:class:`ExactCost` derives, from one recording of the dense model and of a few cuts per group
(*probes*), a polynomial per cost kind in the kept fractions ``f_g = n_g / N_g``: every tensor
dimension of every counted op is affine in the groups' kept units (fitted from two cut levels and
checked), and each op's flop formula (a parameter's element count) is then interpolated exactly in
the groups that govern its dimensions. Residual streams (a layer whose input and output are the
same group) give squares; concatenations give sums; a removable block multiplies everything inside
it by its kept fraction (0 or 1).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

log = logging.getLogger(__name__)
aten = torch.ops.aten

KINDS = ("macs", "params")
_MAX_DEGREE = 4  # per group; formulas of matmuls and convolutions need at most 2 (3 for odd ops)
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


EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    aten._scaled_dot_product_fused_attention_overrideable: _sdpa_cpu_flop,
    aten.mv: _mv_flop,
    aten.addmv: _addmv_flop,
    aten.dot: _dot_flop,
    aten.vdot: _dot_flop,
    aten.addbmm: _addbmm_flop,
}

# ops that multiply-accumulate but have no formula: reported (``ExactCost.uncounted``), not counted
_HEAVY = re.compile(r"mm|conv|attention|rnn|lstm|gru|matmul|dot|einsum|linear|_mv|tensordot|baddbmm", re.I)


@contextlib.contextmanager
def counting_env(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, and the CPU kernels that bypass the flop registry switched off."""
    was = model.training
    fast = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # oneDNN's flag setter warns about TF32 on Intel GPUs
            mk = torch.backends.mkldnn.flags(enabled=False)
            mk.__enter__()
        try:
            with torch.no_grad():
                yield
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mk.__exit__(None, None, None)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        model.train(was)


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


def record(model: nn.Module, example_input: Any) -> Recorder:
    """Run one sample of ``example_input`` through ``model`` (eval, no grad) under a :class:`Recorder`."""
    rec = Recorder(model)
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


def _unique_params(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


# ---- probes ---------------------------------------------------------------------------------------
class Probe(Protocol):
    size: int  # units N_g (1 for a block)
    block: str | None  # a block group's module name

    def cut(self, m: int) -> ContextManager[nn.Module]: ...  # noqa: E704


@dataclass
class GraphProbe:
    """A probe of one group of an ``hpcprune.graph.Graph``: the graph's own in-place cut (the last
    ``N - m`` units), restored on exit."""

    graph: Any
    name: str
    size: int
    block: str | None = None

    @contextlib.contextmanager
    def cut(self, m: int) -> Iterator[nn.Module]:
        c = self.graph.cut(self.name, list(range(m, self.size)))
        try:
            yield self.graph.model
        finally:
            c.restore()


def probes_from_graph(graph: Any, groups: Sequence[Any] | None = None) -> list[GraphProbe]:
    """One probe per group of ``graph`` (``graph.groups`` by default), in that order."""
    gs = graph.groups if groups is None else groups
    return [GraphProbe(graph, g.name, int(g.size), g.block if g.kind == "block" else None) for g in gs]


# ---- exact polynomial algebra -----------------------------------------------------------------------
def _inverse(mat: list[list[Fraction]]) -> list[list[Fraction]]:
    n = len(mat)
    a = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(mat)]
    for c in range(n):
        p = next(r for r in range(c, n) if a[r][c] != 0)
        a[c], a[p] = a[p], a[c]
        pv = a[c][c]
        a[c] = [v / pv for v in a[c]]
        for r in range(n):
            if r != c and a[r][c] != 0:
                fr = a[r][c]
                a[r] = [x - fr * y for x, y in zip(a[r], a[c])]
    return [row[n:] for row in a]


def _interpolate(fn: Callable[[tuple[int, ...]], int], sizes: Sequence[int], degree: int) -> dict[tuple[int, ...], Fraction]:
    """Coefficients (per exponent tuple) of the polynomial of degree <= ``degree`` per variable in
    the fractions ``f_i = n_i / N_i`` that equals ``fn(n)`` on the grid ``n_i in N_i .. N_i + degree``."""
    k = len(sizes)
    nodes = [[Fraction(N + j, N) for j in range(degree + 1)] for N in sizes]
    invs = [_inverse([[x ** e for e in range(degree + 1)] for x in xs]) for xs in nodes]
    vals: dict[tuple[int, ...], Fraction] = {}
    for idx in itertools.product(range(degree + 1), repeat=k):
        vals[idx] = Fraction(fn(tuple(N + j for N, j in zip(sizes, idx))))
    for ax in range(k):  # coefficients = V^-1 values, one axis at a time
        new: dict[tuple[int, ...], Fraction] = {}
        for idx in itertools.product(range(degree + 1), repeat=k):
            e = idx[ax]
            s = Fraction(0)
            for j in range(degree + 1):
                s += invs[ax][e][j] * vals[idx[:ax] + (j,) + idx[ax + 1:]]
            new[idx] = s
        vals = new
    return {e: c for e, c in vals.items() if c != 0}


def _poly_at(coefs: dict[tuple[int, ...], Fraction], fr: Sequence[Fraction]) -> Fraction:
    total = Fraction(0)
    for e, c in coefs.items():
        t = c
        for x, p in zip(fr, e):
            if p:
                t *= x ** p
        total += t
    return total


def _fit_poly(fn: Callable[[tuple[int, ...]], int], sizes: Sequence[int], what: str, rng: random.Random) -> dict[tuple[int, ...], Fraction]:
    if not sizes:
        return {(): Fraction(fn(()))}
    for degree in range(2, _MAX_DEGREE + 1):
        coefs = _interpolate(fn, sizes, degree)
        ok = True
        for _ in range(2):  # exact checks off the grid, inside and below it
            n = tuple(rng.randint(1, 2 * N + 3) for N in sizes)
            if _poly_at(coefs, [Fraction(v, N) for v, N in zip(n, sizes)]) != fn(n):
                ok = False
                break
        if ok:
            return coefs
    raise ValueError(f"{what} is not a polynomial of degree <= {_MAX_DEGREE} in the kept units of its groups")


# ---- derivation -----------------------------------------------------------------------------------
def _slopes(name: str, N: int, dense: list[tuple[int, ...]], levels: list[tuple[int, list[tuple[int, ...]]]],
            labels: list[str]) -> list[np.ndarray]:
    """Per item (op or parameter), the integer slope of each of its dims in the group's kept units."""
    out = []
    for i, d in enumerate(dense):
        dv = np.array(d, dtype=np.int64)
        m1, rec1 = levels[0]
        diff = dv - np.array(rec1[i], dtype=np.int64)
        if np.any(diff % (N - m1)):
            raise ValueError(f"group {name}: {labels[i]} has a dimension that is not affine in the group's kept units "
                             f"({d} dense, {rec1[i]} keeping {m1} of {N})")
        a = diff // (N - m1)
        for m, rec in levels[1:]:
            if not np.array_equal(dv + a * (m - N), np.array(rec[i], dtype=np.int64)):
                raise ValueError(f"group {name}: {labels[i]} has a dimension that is not affine in the group's kept "
                                 f"units ({d} dense, {rec1[i]} keeping {m1}, {rec[i]} keeping {m} of {N})")
        out.append(a)
    return out


def _levels(N: int) -> list[int]:
    return sorted({max(1, N // 2), N - 1}) if N > 1 else []


def _label(op: Op, i: int) -> str:
    mod = op.module()
    return f"op #{i} {op.name}" + (f" in {mod}" if mod else "")


@dataclass
class ExactCost:
    """Cost polynomials in the kept fractions of the groups, per kind ("macs", "params").

    ``terms[kind] = (coef (T,), exps (T, G))``: cost(f) = sum_t coef[t] * prod_g f_g ** exps[t, g]
    (float64; ``exact[kind]`` holds the same with exact rational coefficients). ``dense[kind]`` is
    the dense model's count (``count_macs`` / ``count_params``). ``ops``: the dense model's counted
    ops; ``uncounted``: ops that ran without a flop formula and likely multiply-accumulate."""

    sizes: np.ndarray
    blocks: list[str | None]
    terms: dict[str, tuple[np.ndarray, np.ndarray]]
    exact: dict[str, dict[tuple[int, ...], Fraction]]
    dense: dict[str, int]
    ops: list[Op] = field(default_factory=list)
    uncounted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def fractions(self, kept: Sequence[int]) -> list[Fraction]:
        return [Fraction(int(n), int(N)) for n, N in zip(kept, self.sizes)]

    def evaluate(self, kind: str, kept: Sequence[int]) -> Fraction:
        """The exact cost with ``kept[g]`` units of group ``g`` kept (0 or 1 for a block)."""
        return _poly_at(self.exact[kind], self.fractions(kept))

    def cost(self, kind: str, fractions: np.ndarray) -> float:
        return poly_eval(*self.terms[kind], np.asarray(fractions, dtype=np.float64))

    def module_macs(self) -> dict[str, int]:
        """Dense MACs per module that ran them (the innermost; "" for the model's own forward), e.g.
        an ``nn.MultiheadAttention``'s projections and products all under the attention module."""
        out: dict[str, int] = {}
        for op in self.ops:
            m = op.module()
            out[m] = out.get(m, 0) + op.flops // 2
        return out

    @classmethod
    def derive(cls, model: nn.Module, example_input: Any, probes: Sequence[Probe], seed: int = 0) -> "ExactCost":
        t0 = time.perf_counter()
        rng = random.Random(seed)
        x = _first(example_input)
        G = len(probes)
        dense_rec = record(model, x)
        ops = dense_rec.ops
        params = _unique_params(model)
        pnames = [n for n, _ in params]
        op_labels = [_label(op, i) for i, op in enumerate(ops)]
        p_labels = [f"parameter {n}" for n in pnames]
        op_slopes: list[dict[int, np.ndarray]] = [{} for _ in ops]
        p_slopes: list[dict[int, np.ndarray]] = [{} for _ in params]
        op_blocks: list[list[int]] = [[] for _ in ops]
        p_blocks: list[list[int]] = [[] for _ in params]
        sizes = np.array([int(p.size) for p in probes], dtype=np.int64)
        blocks = [getattr(p, "block", None) for p in probes]
        for g, probe in enumerate(probes):
            gname = getattr(probe, "name", None) or f"#{g}"
            if blocks[g] is not None:
                cls._block(g, gname, blocks[g], probe, x, ops, params, op_blocks, p_blocks)
                continue
            N = int(probe.size)
            levels = []
            p_levels = []
            for m in _levels(N):
                with probe.cut(m) as cut_model:
                    rec = record(cut_model, x)
                    # shapes now: an in-place cut (data swapped) restores the same tensor objects
                    params_cut = {n: tuple(q.shape) for n, q in cut_model.named_parameters(remove_duplicate=False)}
                if len(rec.ops) != len(ops) or any(a.signature() != b.signature() for a, b in zip(ops, rec.ops)):
                    i = next((i for i, (a, b) in enumerate(zip(ops, rec.ops)) if a.signature() != b.signature()),
                             min(len(ops), len(rec.ops)))
                    what = (f"{op_labels[i]} becomes {_label(rec.ops[i], i)}" if i < min(len(ops), len(rec.ops))
                            else f"{len(ops)} counted ops dense, {len(rec.ops)} keeping {m} of {N}")
                    raise ValueError(f"group {gname}: its cut changes which operations the model runs ({what})")
                levels.append((m, [op.dims for op in rec.ops]))
                p_levels.append((m, _param_shapes(params_cut, pnames, gname, m, N)))
            if not levels:
                continue
            for i, a in enumerate(_slopes(gname, N, [op.dims for op in ops], levels, op_labels)):
                if a.any():
                    op_slopes[i][g] = a
            for i, a in enumerate(_slopes(gname, N, [s for _, s in params], p_levels, p_labels)):
                if a.any():
                    p_slopes[i][g] = a
        cache: dict[Any, dict[tuple[int, ...], Fraction]] = {}
        exact: dict[str, dict[tuple[int, ...], Fraction]] = {"macs": {}, "params": {}}
        for i, op in enumerate(ops):
            formula = dense_rec.flop_registry[op.packet]
            raw = not hasattr(formula, "__wrapped__")

            def fn(dims: tuple[int, ...], op=op, formula=formula, raw=raw) -> int:
                args, kwargs, out = op.formula_args(dims, raw)
                return int(formula(*args, **kwargs, out_val=out))

            _add(exact["macs"], cls._item(fn, op.dims, op_slopes[i], op_blocks[i], sizes, G, op_labels[i], rng, cache,
                                          key=(op.signature(),)), Fraction(1, 2))
        for i, (n, shape) in enumerate(params):
            def count(dims: tuple[int, ...]) -> int:
                return int(np.prod(dims, dtype=object)) if dims else 1
            _add(exact["params"], cls._item(count, shape, p_slopes[i], p_blocks[i], sizes, G, p_labels[i], rng, cache,
                                            key=("param",)), Fraction(1))
        dense = {"macs": dense_rec.get_total_flops() // 2, "params": count_params(model)}
        ones = [Fraction(1)] * G
        for kind in KINDS:
            got = _poly_at(exact[kind], ones)
            if got != dense[kind]:  # a bug, not a model property
                raise AssertionError(f"derived dense {kind} {got} != counted {dense[kind]}")
        terms = {k: _as_arrays(exact[k], G) for k in KINDS}
        out = cls(sizes, blocks, terms, exact, dense, ops, dict(dense_rec.unformulated), time.perf_counter() - t0)
        if out.uncounted:
            log.warning("costs: ops without a flop formula (not counted): %s", ", ".join(sorted(out.uncounted)))
        return out

    @staticmethod
    def _block(g: int, gname: str, block: str, probe: Probe, x: Any, ops: list[Op], params: list, op_blocks: list,
               p_blocks: list) -> None:
        inside = [block in op.scope for op in ops]
        prefix = block + "."
        with probe.cut(0) as cut_model:
            rec = record(cut_model, x)
            rest = {n: tuple(p.shape) for n, p in cut_model.named_parameters()}
        left = [op for op in rec.ops if block in op.scope]
        if left:
            raise ValueError(f"group {gname}: the module that replaces block {block} computes {left[0].name} "
                             "(a skip with MACs is not supported)")
        outside = [op for op, ins in zip(ops, inside) if not ins]
        if len(outside) != len(rec.ops) or any(a.signature() != b.signature() or a.dims != b.dims
                                               for a, b in zip(outside, rec.ops)):
            raise ValueError(f"group {gname}: removing block {block} changes operations outside it")
        for i, ins in enumerate(inside):
            if ins:
                op_blocks[i].append(g)
        for i, (n, shape) in enumerate(params):
            if n.startswith(prefix):
                p_blocks[i].append(g)
            elif rest.get(n) != shape:
                raise ValueError(f"group {gname}: removing block {block} changes parameter {n} outside it")

    @staticmethod
    def _item(fn: Callable[[tuple[int, ...]], int], dims: tuple[int, ...], slopes: dict[int, np.ndarray],
              blocks_in: list[int], sizes: np.ndarray, G: int, label: str, rng: random.Random, cache: dict,
              key: tuple) -> dict[tuple[int, ...], Fraction]:
        """One op's (parameter's) polynomial over all G groups."""
        gs = sorted(slopes)
        base = np.array(dims, dtype=np.int64)
        ns = [int(sizes[g]) for g in gs]
        ck = key + (tuple(dims), tuple((n, tuple(slopes[g])) for g, n in zip(gs, ns)))
        local = cache.get(ck)
        if local is None:
            def at(n: tuple[int, ...]) -> int:
                d = base.copy()
                for g, v, N in zip(gs, n, ns):
                    d += slopes[g] * (v - N)
                return fn(tuple(int(v) for v in d))
            local = _fit_poly(at, ns, label, rng)
            cache[ck] = local
        out: dict[tuple[int, ...], Fraction] = {}
        for e, c in local.items():
            full = [0] * G
            for g, p in zip(gs, e):
                full[g] = p
            for b in blocks_in:
                full[b] += 1
            out[tuple(full)] = out.get(tuple(full), Fraction(0)) + c
        return out


def _param_shapes(params: dict[str, tuple[int, ...]], names: list[str], gname: str, m: int, N: int) -> list[tuple[int, ...]]:
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"group {gname}: keeping {m} of {N} units, the model has no parameter {missing[0]}")
    return [params[n] for n in names]


def _add(acc: dict, poly: dict, scale: Fraction) -> None:
    for e, c in poly.items():
        v = acc.get(e, Fraction(0)) + c * scale
        if v:
            acc[e] = v
        else:
            acc.pop(e, None)


def _as_arrays(poly: dict[tuple[int, ...], Fraction], G: int) -> tuple[np.ndarray, np.ndarray]:
    items = sorted(poly.items())
    coef = np.array([float(c) for _, c in items], dtype=np.float64)
    exps = np.array([e for e, _ in items], dtype=np.int8).reshape(len(items), G)
    return coef, exps


def poly_eval(coef: np.ndarray, exps: np.ndarray, f: np.ndarray) -> float:
    """sum_t coef[t] * prod_g f[g] ** exps[t, g], with 0 ** 0 = 1 (a removed block's absent terms)."""
    if coef.size == 0:
        return 0.0
    top = int(exps.max()) if exps.size else 0
    powers = np.ones((f.shape[0], top + 1))
    for e in range(1, top + 1):
        powers[:, e] = powers[:, e - 1] * f
    vals = powers[np.arange(f.shape[0])[None, :], exps]  # (T, G)
    return float(coef @ vals.prod(axis=1))
