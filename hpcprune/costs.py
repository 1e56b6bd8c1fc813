"""Exact costs as functions of the kept units of every group: polynomials in the kept fractions.

:class:`ExactCost` derives, from one recording of the dense model and of a few cuts per group
(*probes*), a polynomial per cost kind ("macs", "params") in the kept fractions ``f_g = n_g / N_g``:
every tensor dimension of every counted op is affine in the groups' kept units (fitted from two cut
levels and checked), and each op's flop formula (a parameter's element count) is then interpolated
exactly in the groups that govern its dimensions. Residual streams (a layer whose input and output
are the same group) give squares; concatenations give sums; a removable block multiplies everything
inside it by its kept fraction (0 or 1).

The counting itself (PyTorch's flop counter, the recorded ops, ``count_macs``, ``count_params``) is
:mod:`hpcprune.flops`; its public names are re-exported here.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from .cuts import size_attrs

# the counting lived here before hpcprune.flops: its public names are re-exported
from .flops import (  # noqa: F401
    EXTRA_FORMULAS, Op, Recorder, ShapeRecorder, _first, count_macs, count_params, counting_env, counting_switches, record,  # noqa: F401
)

log = logging.getLogger(__name__)

KINDS = ("macs", "params")
_MAX_DEGREE = 4  # per group; formulas of matmuls and convolutions need at most 2 (3 for odd ops)


def _unique_params(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


# ---- probes ---------------------------------------------------------------------------------------
class Probe(Protocol):
    size: int  # units N_g (1 for a block)
    block: str | None  # a block group's module name
    # optional ``in_place: bool``: True when cuts of several probes, entered together, compose (one
    # recording then checks every group's second level at once); else each group is recorded alone

    def cut(self, m: int) -> ContextManager[nn.Module]: ...  # noqa: E704


@dataclass
class GraphProbe:
    """A probe of one group of an ``hpcprune.graph.Graph``: the graph's own in-place cut (the last
    ``N - m`` units), restored on exit."""

    graph: Any
    name: str
    size: int
    block: str | None = None
    in_place: bool = True  # cuts of several probes compose (each cuts the model the previous one left)

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


class _ChainStarts:
    """Where a cut group's recording may start: the model as a chain (the sensitivity engine's,
    ``cells.chain_of``), the dense input of every chain element, and the index of the first counted
    op of each element in the dense recording. A group's cut changes nothing before the first chain
    element holding one of its layers, so the ops there keep their dense dims and only the rest of
    the forward is recorded (about half of it on average; the cost model's levels are one recording
    per group)."""

    def __init__(self, model: nn.Module, chain: list, inputs: list, first_op: list[int], ops: list[Op]) -> None:
        self.model, self.chain, self.inputs, self.first_op, self.ops = model, chain, inputs, first_op, ops
        self.states = [_element_state(e) for _, e in chain]
        self.stops = stops_safely(model)

    @classmethod
    def make(cls, model: nn.Module, x: Any, ops: list[Op], probes: Sequence[Probe],
             budget: int = 1 << 30) -> "_ChainStarts | None":
        """None where the model is no chain, a probe does not cut ``model`` in place (a graph's own
        probe), the recording through the chain lists other ops than ``ops``, or the inputs would
        take more than ``budget`` bytes."""
        from .sensitivity.cells import chain_of

        if not probes or not all(isinstance(p, GraphProbe) and p.graph.model is model for p in probes):
            return None
        try:
            chain = chain_of(model, x)
        except Exception:  # noqa: BLE001 - no chain: every level records the whole forward
            return None
        if chain is None:
            return None
        rec = ShapeRecorder(model)
        inputs, first_op, size = [], [], 0
        with counting_env(model), rec:
            h = x
            for _, element in chain:
                inputs.append(h)
                first_op.append(len(rec.ops))
                h = element(h)
                size += h.numel() * h.element_size() if isinstance(h, torch.Tensor) else 0
                if size > budget:
                    return None
        if len(rec.ops) != len(ops) or any(a.signature() != b.signature() or a.dims != b.dims for a, b in zip(ops, rec.ops)):
            return None
        return cls(model, chain, inputs, first_op, ops)

    def entry(self, probes: Sequence[Probe]) -> int:
        """The first chain element holding a layer of any of ``probes``' groups (0: the whole forward)."""
        from .sensitivity.cells import first_element

        modules = []
        for p in probes:
            g = p.graph.group(p.name)  # type: ignore[attr-defined]
            if g.kind == "block" or not g.members:  # a skip replaces the module in its parent, not in the chain
                return 0
            modules += [m.module for m in g.members]
        return first_element(self.chain, modules)

    def record_from(self, k: int) -> list[Op]:
        """The counted ops of chain elements ``k`` on, from element ``k``'s dense input. Past the last
        element the cut changed (a parameter's or buffer's shape, a size attribute: :func:`_element_state`),
        once an element's output has the dense shapes, the rest of the forward is unchanged layers on
        dense shapes: its ops are the dense recording's, not recorded again (a channel group's cut
        reaches one or two elements of a deep chain: EfficientNetV2-L's 145 groups record 1/25 of
        what whole suffixes would)."""
        rec = ShapeRecorder(self.model)
        with counting_env(self.model), rec:
            _, stop = run_to_unchanged(self.chain, self.inputs, self.states, k, self.stops)
        return rec.ops + self.ops[self.first_op[stop]:] if stop < len(self.chain) else rec.ops


def run_to_unchanged(chain: list, inputs: list, states: list, k: int, stops: bool = True) -> tuple[Any, int]:
    """Run chain elements from ``k`` on a copy of element ``k``'s dense input (``inputs[k]``) until
    the rest of the forward is unchanged: past the last element whose :func:`_element_state` differs
    from ``states`` (what a cut changed), at the first element whose output has the dense shapes of
    the next one's input. (the activation, the index of the element it enters: ``len(chain)`` when
    it ran to the end, always so without ``stops``, see :func:`stops_safely`)."""
    n = len(chain)
    last = max((j for j in range(k, n) if _element_state(chain[j][1]) != states[j]), default=k)
    h = inputs[k]
    h = h.clone() if isinstance(h, torch.Tensor) else h  # an element may write into its input
    for j in range(k, n):
        h = chain[j][1](h)
        if stops and j >= last and j + 1 < n and _same_shapes(h, inputs[j + 1]):
            return h, j + 1
    return h, n


_TORCH_INTERNALS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")


def stops_safely(model: nn.Module) -> bool:
    """Whether the output of a chain element decides the rest of the forward, so that a cut's
    forward may stop past the last element it changed (:class:`_ChainStarts`, ``verify._Partial``):
    no forward hooks (a hook on a later layer may read any other), and no module that holds another
    module, a tensor or a bound method of a module outside its registered children, parameters and
    buffers (``self.ref = [conv0]`` read by a later element). False: every forward runs to the end."""
    from torch.nn.modules import module as tm

    if tm._global_forward_hooks or tm._global_forward_pre_hooks:
        return False
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return False
        own: set[int] | None = None  # the module itself, its submodules, their parameters and buffers
        for k, v in vars(m).items():
            if k in _TORCH_INTERNALS or k.startswith(("_forward", "_backward", "_state_dict", "_load_state_dict")):
                continue
            items = list(v.values()) if isinstance(v, dict) else list(v) if isinstance(v, (list, tuple, set)) else [v]
            for e in items:
                ref = e if isinstance(e, (nn.Module, torch.Tensor)) else getattr(e, "__self__", None)
                if not isinstance(ref, (nn.Module, torch.Tensor)):
                    continue
                if own is None:  # an LSTM's _flat_weights, a model's own bound method (prune_chain): its own
                    own = {id(x) for x in (*m.modules(), *m.parameters(), *m.buffers())}
                if id(ref) not in own:
                    return False
    return True


def _element_state(element: nn.Module) -> tuple:
    """What a cut can change in a chain element and its ops' shapes follow: every parameter's and
    buffer's shape, and every submodule's integer and tuple attributes (sizes, groups, head counts)."""
    out: list = [tuple(p.shape) for p in element.parameters()]
    out += [tuple(b.shape) for b in element.buffers()]
    out += [size_attrs(mod) for mod in element.modules()]
    return tuple(out)


def _same_shapes(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` (tensors, or tuples/lists/dicts of them) have the same structure, and
    their tensors the same shapes and dtypes, their other leaves the same values."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    for u, v in zip(la, lb):
        if isinstance(u, torch.Tensor) != isinstance(v, torch.Tensor):
            return False
        if isinstance(u, torch.Tensor):
            if u.shape != v.shape or u.dtype != v.dtype:
                return False
        elif not (type(u) is type(v) and u == v):
            return False
    return True


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
        """The exact cost polynomials of ``model`` over ``probes``' groups (the class docstring): one
        recording per channel group; when every probe cuts ``model`` in place (its own graph's), all
        of them inside one :func:`~hpcprune.flops.counting_switches`."""
        in_place = all(isinstance(p, GraphProbe) and p.graph.model is model for p in probes)
        with counting_switches(model) if in_place else contextlib.nullcontext():
            return cls._derive(model, example_input, probes, seed)

    @classmethod
    def _derive(cls, model: nn.Module, example_input: Any, probes: Sequence[Probe], seed: int) -> "ExactCost":
        t0 = time.perf_counter()
        rng = random.Random(seed)
        x = _first(example_input)
        G = len(probes)
        dense_rec = record(model, x)
        ops = dense_rec.ops
        starts = _ChainStarts.make(model, x, ops, probes)
        params = _unique_params(model)
        pnames = [n for n, _ in params]
        op_labels = [_label(op, i) for i, op in enumerate(ops)]
        p_labels = [f"parameter {n}" for n in pnames]
        op_blocks: list[list[int]] = [[] for _ in ops]
        p_blocks: list[list[int]] = [[] for _ in params]
        sizes = np.array([int(p.size) for p in probes], dtype=np.int64)
        blocks = [getattr(p, "block", None) for p in probes]
        names = [getattr(p, "name", None) or f"#{g}" for g, p in enumerate(probes)]
        for g, probe in enumerate(probes):
            if blocks[g] is not None:
                cls._block(g, names[g], blocks[g], probe, x, ops, params, op_blocks, p_blocks)
        op_slopes, p_slopes = cls._group_slopes(probes, names, sizes, blocks, x, ops, params, op_labels, p_labels, starts)
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
            log.warning("costs: ops without a flop formula (not counted): %s; the recorded MACs miss their "
                        "multiply-accumulates, and a MACs target counts without them (a params or latency target "
                        "does not depend on them)", ", ".join(sorted(out.uncounted)))
        return out

    @classmethod
    def _group_slopes(cls, probes: Sequence[Probe], names: list[str], sizes: np.ndarray, blocks: list[str | None],
                      x: Any, ops: list[Op], params: list[tuple[str, tuple[int, ...]]], op_labels: list[str],
                      p_labels: list[str], starts: "_ChainStarts | None" = None
                      ) -> tuple[list[dict[int, np.ndarray]], list[dict[int, np.ndarray]]]:
        """Per op and per parameter, ``{group: slope of each dim in the group's kept units}`` (groups with
        a zero slope left out) for every channel group; ValueError when a dim is not affine in one group's
        kept units, or not a sum over groups."""
        pnames = [n for n, _ in params]
        dense_dims = [op.dims for op in ops]
        dense_shapes = [s for _, s in params]
        # every channel group cut alone to about half its units: each op dimension's slope in the
        # group's kept units (one recorded forward per group) ...
        chan = [g for g in range(len(probes)) if blocks[g] is None and int(sizes[g]) > 1]
        half = {g: max(1, int(sizes[g]) // 2) for g in chan}
        first: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        seen: dict[int, tuple[list, list]] = {}
        for g in chan:
            seen[g] = cls._level(probes, {g: half[g]}, x, ops, op_labels, pnames, names[g], starts)
            first[g] = (_slopes(names[g], int(sizes[g]), dense_dims, [(half[g], seen[g][0])], op_labels),
                        _slopes(names[g], int(sizes[g]), dense_shapes, [(half[g], seen[g][1])], p_labels))
        # ... then checked at a second level: every group cut at once to N - 1 units, where every
        # dimension must be the dense one plus the sum of the groups' slopes (affine in each group and
        # additive over groups, as the polynomials below assume); if not, each group alone at N - 1
        second = {g: int(sizes[g]) - 1 for g in chan if int(sizes[g]) - 1 != half[g]}
        joint = all(getattr(p, "in_place", False) for p in probes)  # cuts that compose (a copy per cut does not)
        bad = -1 if not joint else cls._joint(probes, second, first, sizes, x, ops, pnames, dense_dims, dense_shapes) if second else None
        if bad is not None:
            for g, m in second.items():
                op_dims, shapes = cls._level(probes, {g: m}, x, ops, op_labels, pnames, names[g], starts)
                N = int(sizes[g])
                _slopes(names[g], N, dense_dims, [(half[g], seen[g][0]), (m, op_dims)], op_labels)
                _slopes(names[g], N, dense_shapes, [(half[g], seen[g][1]), (m, shapes)], p_labels)
            if bad >= 0:  # each group alone is affine, together they are not: no sum of polynomials follows
                i, table, labels = (bad, 0, op_labels) if bad < len(ops) else (bad - len(ops), 1, p_labels)
                g = next(g for g in second if first[g][table][i].any())
                raise ValueError(f"group {names[g]}: {labels[i]} depends on its kept units and another group's "
                                 "jointly, not as a sum")
        op_slopes: list[dict[int, np.ndarray]] = [{} for _ in ops]
        p_slopes: list[dict[int, np.ndarray]] = [{} for _ in params]
        for g in chan:
            for i, a in enumerate(first[g][0]):
                if a.any():
                    op_slopes[i][g] = a
            for i, a in enumerate(first[g][1]):
                if a.any():
                    p_slopes[i][g] = a
        return op_slopes, p_slopes

    @staticmethod
    def _level(probes: Sequence[Probe], kept: dict[int, int], x: Any, ops: list[Op], op_labels: list[str],
               pnames: list[str], what: str, starts: "_ChainStarts | None" = None
               ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """Record the model with group ``g`` cut to ``kept[g]`` units (all at once): every counted op's
        dims and every parameter's shape. ValueError when the ops are not the dense ones. With
        ``starts``, only the part of the forward from the first chain element a cut group touches is
        recorded (the ops before it are the dense ones)."""
        k = starts.entry([probes[g] for g in kept]) if starts is not None else 0
        with contextlib.ExitStack() as stack:
            for g, m in kept.items():
                model = stack.enter_context(probes[g].cut(m))
            rec_ops = starts.record_from(k) if k > 0 else record(model, x, shapes_only=True).ops  # type: ignore[union-attr]
            # shapes now: an in-place cut (data swapped) restores the same tensor objects
            shapes = {n: tuple(q.shape) for n, q in model.named_parameters(remove_duplicate=False)}
        if k > 0:
            rec_ops = ops[:starts.first_op[k]] + rec_ops  # type: ignore[union-attr]
        if len(rec_ops) != len(ops) or any(a.signature() != b.signature() for a, b in zip(ops, rec_ops)):
            i = next((i for i, (a, b) in enumerate(zip(ops, rec_ops)) if a.signature() != b.signature()),
                     min(len(ops), len(rec_ops)))
            m = ", ".join(f"{m} of {int(probes[g].size)}" for g, m in kept.items())
            change = (f"{op_labels[i]} becomes {_label(rec_ops[i], i)}" if i < min(len(ops), len(rec_ops))
                      else f"{len(ops)} counted ops dense, {len(rec_ops)} keeping {m}")
            raise ValueError(f"group {what}: its cut changes which operations the model runs ({change})")
        missing = [n for n in pnames if n not in shapes]
        if missing:
            raise ValueError(f"group {what}: cut, the model has no parameter {missing[0]}")
        return [op.dims for op in rec_ops], [shapes[n] for n in pnames]

    @classmethod
    def _joint(cls, probes: Sequence[Probe], kept: dict[int, int], first: dict, sizes: np.ndarray, x: Any,
               ops: list[Op], pnames: list[str], dense_dims: list, dense_shapes: list) -> int | None:
        """Cut every group of ``kept`` at once: None when every op's dims and parameter's shape are
        what the slopes predict, else the first item that is not (ops first, then parameters), or -1
        when the model does not run so cut (each group alone then says which one and why)."""
        try:
            op_dims, shapes = cls._level(probes, kept, x, ops, [""] * len(ops), pnames, "(all at once)")
        except Exception as e:  # noqa: BLE001
            log.debug("costs: groups cut all at once: %s: %s", type(e).__name__, e, exc_info=True)
            return -1
        delta = {g: m - int(sizes[g]) for g, m in kept.items()}
        want = (_predict(dense_dims, {g: first[g][0] for g in kept}, delta)
                + _predict(dense_shapes, {g: first[g][1] for g in kept}, delta))
        return next((i for i, (a, b) in enumerate(zip(op_dims + shapes, want)) if a != b), None)

    @staticmethod
    def _block(g: int, gname: str, block: str, probe: Probe, x: Any, ops: list[Op], params: list, op_blocks: list,
               p_blocks: list) -> None:
        inside = [block in op.scope for op in ops]
        prefix = block + "."
        with probe.cut(0) as cut_model:
            cut_model.eval()  # the skip module put in (a counting_env is already entered: it does not switch again)
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
        """One op's (parameter's) polynomial over all G groups.

        Groups with the same slope vector act on the op only through the sum of their kept units
        (the branches of a concatenation: DenseNet's layer 24 reads 24 groups through one dimension),
        so one variable per such class is fitted, ``v_c = sum_g n_g`` (dense ``S_c = sum_g N_g``), and
        ``v_c / S_c = sum_g (N_g / S_c) f_g`` is expanded afterwards: the interpolation grid is
        ``(degree + 1) ** classes``, not ``** groups``."""
        classes: dict[tuple[int, ...], list[int]] = {}
        for g in sorted(slopes):
            classes.setdefault(tuple(int(v) for v in slopes[g]), []).append(g)
        forms = list(classes.items())
        base = np.array(dims, dtype=np.int64)
        ss = [int(sum(int(sizes[g]) for g in members)) for _, members in forms]
        ck = key + (tuple(dims), tuple((S, a) for S, (a, _) in zip(ss, forms)))
        local = cache.get(ck)
        if local is None:
            vecs = [np.array(a, dtype=np.int64) for a, _ in forms]

            def at(v: tuple[int, ...]) -> int:
                d = base.copy()
                for a, x, S in zip(vecs, v, ss):
                    d += a * (x - S)
                return fn(tuple(int(x) for x in d))
            local = _fit_poly(at, ss, label, rng)
            cache[ck] = local
        out: dict[tuple[int, ...], Fraction] = {}
        expand = [_linear_powers([(g, Fraction(int(sizes[g]), S)) for g in members], G) for S, (_, members) in zip(ss, forms)]
        for e, c in local.items():
            terms: dict[tuple[int, ...], Fraction] = {tuple([0] * G): c}
            for ci, p in enumerate(e):
                if p:
                    terms = _poly_mul(terms, expand[ci](p))
            for full, v in terms.items():
                if blocks_in:
                    f = list(full)
                    for b in blocks_in:
                        f[b] += 1
                    full = tuple(f)
                out[full] = out.get(full, Fraction(0)) + v
        return out


def _poly_mul(a: dict[tuple[int, ...], Fraction], b: dict[tuple[int, ...], Fraction]) -> dict[tuple[int, ...], Fraction]:
    out: dict[tuple[int, ...], Fraction] = {}
    for ea, ca in a.items():
        for eb, cb in b.items():
            e = tuple(x + y for x, y in zip(ea, eb))
            out[e] = out.get(e, Fraction(0)) + ca * cb
    return out


def _linear_powers(weights: list[tuple[int, Fraction]], G: int) -> Callable[[int], dict[tuple[int, ...], Fraction]]:
    """``p -> (sum_g w_g f_g) ** p`` as {exponents over G groups: coefficient} (memoised per p)."""
    memo: dict[int, dict[tuple[int, ...], Fraction]] = {}
    one = {}
    for g, w in weights:
        e = [0] * G
        e[g] = 1
        one[tuple(e)] = w

    def power(p: int) -> dict[tuple[int, ...], Fraction]:
        if p not in memo:
            memo[p] = one if p == 1 else _poly_mul(power(p - 1), one)
        return memo[p]
    return power


def _predict(dense: list[tuple[int, ...]], slopes: dict[int, list[np.ndarray]], delta: dict[int, int]) -> list[tuple[int, ...]]:
    """Per item, ``dense + sum_g slope_g * delta_g`` (the dims with every group's kept units moved by delta)."""
    out = []
    for i, d in enumerate(dense):
        v = np.array(d, dtype=np.int64)
        for g, sl in slopes.items():
            v = v + sl[i] * delta[g]
        out.append(tuple(int(t) for t in v))
    return out


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
