"""Budgets and allocation methods: one pruning ratio per group under global cost targets.

Costs are polynomials in the groups' kept fractions ``f_g = n_g / N_g`` (``costs.ExactCost``):
``cost = sum_t coef[t] * prod_g f_g ** exps[t, g]``. They are derived from PyTorch's flop counter
on the dense model and on a few cuts of every group, so that with the channel counts ``keep_count``
gives they predict the pruned network's MACs (every matmul, convolution and attention product its
forward runs) and parameters exactly. A layer whose inputs and outputs belong to one group (a
residual stream ``x + W x``) gives a square; a layer fed by a concatenation of two groups a sum;
a block group's kept fraction is 1 or 0 and multiplies everything inside the block, so width and
depth mix in one budget.

``uniform`` and ``global`` are width methods: they leave block groups alone (ratio 0). Only
``sensitivity`` removes blocks, where that gives the least predicted damage (exact:
:mod:`hpcprune.mckp`; the greedy :func:`sensitivity_greedy` is its fallback).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import HpcpruneError
from .graph import BLOCK_RATIO, GroupInfo, n_keep

METHODS = ("uniform", "global", "sensitivity")
COSTS = ("macs", "params", "latency", "energy")
# budgets on measured costs: latency has a measured table (CostModel.set_latency_table); energy no model
# at all here: allocated as a MACs cap (allocator_targets), checked on the pruned model, tightened on a miss
MEASURED = ("latency", "energy")


class BudgetError(HpcpruneError, ValueError):
    """A target that cannot be met within the allowed per-group ratios."""


@dataclass
class Term:
    value: float
    groups: tuple[int, ...]  # indices of the groups whose kept fraction scales this term


class CostModel:
    """Cost per kind as a polynomial in the kept fractions of ``groups``.

    ``terms[kind] = (coef, exps)``: ``coef`` (T,) floats, ``exps`` (T, G) small non-negative ints.
    Build it with :meth:`from_exact` from a ``costs.ExactCost``. The old call
    ``CostModel(model, groups, module_macs)`` (one multilinear term per Conv/Linear/norm module of
    ``metrics.module_macs``) still works, deprecated: it misses attention products and functional
    ops and mis-counts concatenations, residual streams and transposed convolutions."""

    def __init__(self, groups: Sequence[GroupInfo], terms: dict[str, tuple[np.ndarray, np.ndarray]] | Any,
                 module_macs: dict[str, int] | None = None) -> None:
        if isinstance(groups, nn.Module):  # deprecated: CostModel(model, groups, module_macs)
            warnings.warn("CostModel(model, groups, module_macs) is deprecated: use "
                          "CostModel.from_exact(groups, costs.ExactCost.derive(...))", DeprecationWarning, stacklevel=2)
            model, groups = groups, terms
            terms = _module_terms(model, groups, module_macs or {})
        self.groups = list(groups)
        G = len(self.groups)
        self.sizes = np.array([g.size for g in self.groups], dtype=np.int64)
        self.is_block = np.array([g.kind == "block" for g in self.groups], dtype=bool)
        self.terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for kind, (coef, exps) in terms.items():
            coef = np.asarray(coef, dtype=np.float64).reshape(-1)
            exps = np.asarray(exps, dtype=np.int64).reshape(len(coef), G)
            if (exps < 0).any():
                raise ValueError(f"cost terms for {kind}: negative exponent")
            self.terms[kind] = (coef, exps)
        # the same terms, sparse: a term involves a few groups (a convolution: its input and output
        # groups), so products over (term, group) pairs with a non-zero exponent, not over all G
        self._sparse: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        for kind, (coef, exps) in self.terms.items():
            t, g = np.nonzero(exps)
            starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]]) if len(t) else np.zeros(0, dtype=np.int64)
            self._sparse[kind] = (t, g, exps[t, g], starts)
        self.latency: tuple[np.ndarray, np.ndarray, float] | None = None  # (grid, G x R ms, dense ms)
        self._kf: dict[tuple[int, float, int], float] = {}  # keep_fraction memo
        self._lat: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # latency curves in units cut
        self.dense = {k: self.cost(k, np.zeros(G)) for k in ("macs", "params") if k in self.terms}

    @classmethod
    def from_exact(cls, groups: Sequence[GroupInfo], exact: Any) -> "CostModel":
        """From a ``costs.ExactCost`` derived with one probe per group of ``groups``, in order."""
        sizes = [int(g.size) for g in groups]
        if list(map(int, exact.sizes)) != sizes:
            raise ValueError(f"cost model: the derived costs are for groups of sizes {list(map(int, exact.sizes))}, "
                             f"not {sizes} (one probe per group, in the same order)")
        return cls(groups, exact.terms)

    def set_latency_table(self, grid: Sequence[float], table_ms: np.ndarray, dense_ms: float,
                          base_ms: float | None = None, zero_ms: np.ndarray | None = None) -> None:
        """Measured latency with one group changed at each grid ratio (G x R, milliseconds).

        The model is additive around a reference point: ``base + sum over groups of (T_g(r_g) -
        base)``, interpolated between grid points, where ``T_g(x)`` is the latency with group ``g``
        at ratio ``x`` and every other group at the reference. The first table is measured around
        the dense model (``base`` = dense, ``T_g(0)`` = dense). Unlike MACs this is an approximation
        (latency is not additive over groups: odd channel counts, kernel choices); when the pruned
        model misses its target, the prune stage measures a new table around the allocation it got
        (``base_ms``: that model's latency; ``zero_ms``: per group, the latency with that group
        back at full width) and allocates again: the model is then exact near the point it
        re-allocates from."""
        base = float(dense_ms if base_ms is None else base_ms)
        zero = np.full(len(self.groups), base) if zero_ms is None else np.asarray(zero_ms, dtype=np.float64)
        self.latency = (np.concatenate([[0.0], np.asarray(grid, dtype=np.float64)]),
                        np.concatenate([zero[:, None], np.asarray(table_ms, dtype=np.float64)], axis=1) - base, base)
        self.dense["latency"] = float(dense_ms)
        self._lat = {}

    def latency_delta(self, g: int, ratio: float, round_to: int = 1) -> float:
        """Latency change (ms) of group ``g`` at ``ratio`` from the table: linear in the units the
        ratio cuts between the measured points (see :func:`_curves`; a block: kept or removed)."""
        assert self.latency is not None
        curve = self._lat.get((g, round_to))
        if curve is None:
            grid, delta, _ = self.latency
            curve = self._lat[(g, round_to)] = _by_units(self.groups[g], grid, delta[g], round_to)
        return float(np.interp(units_cut(self.groups[g], ratio, round_to), *curve))

    def keep_fraction(self, g: int, ratio: float, round_to: int = 1) -> float:
        key = (g, float(ratio), round_to)
        f = self._kf.get(key)
        if f is None:
            f = self._kf[key] = n_keep(self.groups[g], float(ratio), round_to) / float(self.sizes[g])
        return f

    def keep_fractions(self, ratios: np.ndarray, round_to: int = 1) -> np.ndarray:
        return np.array([self.keep_fraction(g, r, round_to) for g, r in enumerate(ratios)], dtype=np.float64)

    def cost(self, kind: str, ratios: np.ndarray, round_to: int = 1) -> float:
        if kind == "latency":
            if self.latency is None:
                raise ValueError("prune.target.latency needs a measured latency table")
            return self.latency[2] + sum(self.latency_delta(g, float(r), round_to) for g, r in enumerate(ratios))
        return float(self.terms[kind][0] @ self._term_values(kind, self.keep_fractions(np.asarray(ratios, dtype=np.float64), round_to)))

    def _term_values(self, kind: str, f: np.ndarray) -> np.ndarray:
        """prod_g f_g ** exps[t, g] per term t (0 ** 0 = 1: a removed block's absent terms)."""
        coef = self.terms[kind][0]
        t, g, e, starts = self._sparse[kind]
        vals = np.ones(len(coef))
        if len(t):
            vals[t[starts]] = np.multiply.reduceat(f[g] ** e, starts)
        return vals

    def poly_in(self, kind: str, g: int, ratios: np.ndarray, round_to: int = 1) -> np.ndarray:
        """Coefficients ``c`` of the cost as a polynomial in group ``g``'s kept fraction with every
        other group at ``ratios``: ``cost = c[0] + c[1] f + c[2] f**2 (+ ...)``; at least three
        (A, B, C), more only for a formula of higher degree."""
        coef, exps = self.terms[kind]
        f = self.keep_fractions(np.asarray(ratios, dtype=np.float64), round_to)
        f[g] = 1.0
        top = max(2, int(exps[:, g].max()) if len(coef) else 0)
        out = np.zeros(top + 1)
        if not len(coef):
            return out
        vals = self._term_values(kind, f)  # f[g] = 1: every factor but group g's
        np.add.at(out, exps[:, g], coef * vals)
        return out

    def fraction(self, kind: str, ratios: np.ndarray, round_to: int = 1) -> float:
        return self.cost(kind, ratios, round_to) / self.dense[kind]


def _module_terms(model: nn.Module, groups: Sequence[GroupInfo], module_macs: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The old multilinear model (deprecated): a module's MACs (``metrics.module_macs``) times the
    kept fraction of the group owning its outputs, times that of the group owning its inputs; a
    parameter tensor likewise; everything inside a block times the block's."""
    G = len(groups)
    out_of: dict[str, int] = {}
    in_of: dict[str, int] = {}
    for gi, g in enumerate(groups):
        for m in g.members:
            (out_of if m.out else in_of)[m.module] = gi
    blocks = [(g.block + ".", gi) for gi, g in enumerate(groups) if g.kind == "block" and g.block]
    mods = dict(model.named_modules())

    def row(name: str, mod: nn.Module, both: bool) -> np.ndarray:
        e = np.zeros(G, dtype=np.int64)
        gs = {gi for prefix, gi in blocks if name.startswith(prefix)}
        if name in out_of:
            gs.add(out_of[name])
        if both and name in in_of and not (isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1):
            gs.add(in_of[name])
        e[sorted(gs)] = 1
        return e

    rows: dict[str, tuple[list[float], list[np.ndarray]]] = {"macs": ([], []), "params": ([], [])}
    for name, value in module_macs.items():
        rows["macs"][0].append(float(value))
        rows["macs"][1].append(row(name, mods[name], True))
    seen: set[int] = set()  # a tied parameter (e.g. embedding = output head) counts once
    for name, mod in mods.items():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            rows["params"][0].append(float(p.numel()))
            rows["params"][1].append(row(name, mod, pname == "weight" and p.dim() >= 2))
    return {k: (np.array(c, dtype=np.float64), np.array(e, dtype=np.int64).reshape(len(c), G)) for k, (c, e) in rows.items()}


def latency_table_around(measure: Callable[[np.ndarray], float], grid: Sequence[float], ratios: np.ndarray,
                         base_ms: float) -> tuple[np.ndarray, np.ndarray]:
    """The latency table around allocation ``ratios`` for :meth:`CostModel.set_latency_table`:
    ``measure(r)`` (the latency of the model pruned at ratio vector ``r``, in ms) with one group at
    a time moved to each grid ratio (``table``, G x R) and back to full width (``zero``, G).

    The allocation itself is measured again before every row and each row is taken relative to
    that reference, then shifted to ``base_ms``: drift and the bias of short measurements cancel
    within a row instead of adding up over the groups (the model sums G rows)."""
    G = len(ratios)
    table, zero = np.zeros((G, len(grid))), np.zeros(G)
    for g in range(G):
        ref = measure(np.array(ratios, dtype=np.float64))
        for i, r in enumerate([0.0, *grid]):
            rs = np.array(ratios, dtype=np.float64)
            rs[g] = r
            ms = measure(rs) - ref + base_ms
            if i == 0:
                zero[g] = ms
            else:
                table[g, i - 1] = ms
    return table, zero


def allocator_targets(targets: dict[str, float]) -> dict[str, float]:
    """The targets the allocation methods take: an energy budget (``prune.target.energy``, a fraction
    of the dense joules per sample) becomes a MACs cap of the same fraction (the compute it pays
    for), then ``energy`` is dropped: no cost model here predicts energy. The prune stage measures
    the pruned model's energy and, on a miss, lowers the cap by the factor of the miss
    (:func:`tighten_for_latency` with ``kind="energy"``)."""
    out = {k: v for k, v in targets.items() if k != "energy"}
    if "energy" in targets:
        out["macs"] = min(float(out.get("macs", 1.0)), float(targets["energy"]))
    return out


def tighten_for_latency(targets: dict[str, float], macs_kept: float, latency_kept: float, kind: str = "latency") -> dict[str, float]:
    """The targets for the next allocation after a measured latency miss: the same targets, plus a
    MACs cap lower than the missed model's MACs by the factor of the miss (target / measured).
    ``kind="energy"``: the same after an energy miss (``latency_kept``: the measured energy kept).

    Why a MACs cap: the latency model is additive and measured with noise; when the noise is as
    large as a group's effect (a few percent on a busy CPU), the table alone may re-allocate to a
    model that is no faster. MACs are exact and additive, so the cap forces a real step towards the
    target, in proportion to the miss, while the table still decides which groups carry it."""
    out = dict(targets)
    cap = macs_kept * targets[kind] / latency_kept
    out["macs"] = min(float(targets.get("macs", 1.0)), cap)
    return out


@dataclass
class Allocation:
    ratios: np.ndarray
    predicted: dict[str, float]  # kept fraction per cost kind
    predicted_loss: float = math.nan


def _meets(cm: CostModel, ratios: np.ndarray, targets: dict[str, float], round_to: int) -> bool:
    return all(cm.fraction(k, ratios, round_to) <= t + 1e-12 for k, t in targets.items())


def _check_reachable(cm: CostModel, targets: dict[str, float], max_ratio: float, round_to: int, blocks: bool = True) -> None:
    full = np.where(cm.is_block & (not blocks), 0.0, max_ratio)
    for k, t in targets.items():
        best = cm.fraction(k, full, round_to)
        if best > t + 1e-12:
            what = "every group" if blocks else "every width group (uniform and global leave blocks)"
            raise BudgetError(
                f"prune.target.{k}={t} cannot be met: with prune.max_ratio={max_ratio} on {what} "
                f"the model keeps {best:.4f} of its {k} (best reachable value)"
                + (f"; prune.round_to={round_to} keeps groups narrower than {round_to} whole and the others at "
                   f"multiples of {round_to}: a smaller round_to (1: any width) reaches "
                   f"{cm.fraction(k, full, 1):.4f}" if round_to > 1 and cm.fraction(k, full, 1) < best - 1e-12 else "")
                + (f"; raise prune.max_ratio (at most 1.0: groups cut to their last unit) or relax the target"
                   if max_ratio < 1.0 else "; relax the target")
            )


def _result(cm: CostModel, ratios: np.ndarray, round_to: int, loss: float = math.nan) -> Allocation:
    return Allocation(ratios, {k: cm.fraction(k, ratios, round_to) for k in COSTS if k in cm.dense}, loss)


def uniform(cm: CostModel, targets: dict[str, float], max_ratio: float, round_to: int = 1) -> Allocation:
    """The smallest single ratio for all width groups that meets every target (bisection)."""
    _check_reachable(cm, targets, max_ratio, round_to, blocks=False)
    lo, hi = 0.0, max_ratio
    n = len(cm.groups)
    width = (~cm.is_block).astype(np.float64)
    if _meets(cm, np.zeros(n), targets, round_to):
        return _result(cm, np.zeros(n), round_to)
    for _ in range(50):
        mid = (lo + hi) / 2
        if _meets(cm, width * mid, targets, round_to):
            hi = mid
        else:
            lo = mid
    return _result(cm, width * hi, round_to)


def global_ranking(
    cm: CostModel, scores: dict[str, torch.Tensor], targets: dict[str, float], max_ratio: float, round_to: int = 1
) -> Allocation:
    """Rank all channels of all groups by importance (each group's scores divided by their mean) and
    remove the least important ones until every target is met (blocks are left alone)."""
    _check_reachable(cm, targets, max_ratio, round_to, blocks=False)
    entries = []
    for gi, g in enumerate(cm.groups):
        if g.kind == "block":
            continue
        s = scores[g.name].double()
        s = s / (s.abs().mean() + 1e-12)
        for rank_in_group, v in enumerate(torch.sort(s, stable=True).values.tolist()):
            entries.append((v, gi, rank_in_group))
    entries.sort()
    sizes = cm.sizes
    cap = np.array([g.size - n_keep(g, max_ratio, round_to) if g.kind != "block" else 0 for g in cm.groups])

    def ratios_for(k: int) -> np.ndarray:
        removed = np.zeros(len(sizes), dtype=np.int64)
        for v, gi, _ in entries[:k]:
            if removed[gi] < cap[gi]:
                removed[gi] += 1
        return removed / sizes

    lo, hi = 0, len(entries)
    while lo < hi:
        mid = (lo + hi) // 2
        if _meets(cm, ratios_for(mid), targets, round_to):
            hi = mid
        else:
            lo = mid + 1
    return _result(cm, ratios_for(lo), round_to)


def units_cut(g: GroupInfo, ratio: float, round_to: int = 1) -> int:
    """Units of group ``g`` a cut at ``ratio`` removes (``graph.n_keep``: what the cells and the prune
    stage cut; a block: 1 when removed)."""
    return g.size - n_keep(g, ratio, round_to) if g.kind != "block" else 1 - n_keep(g, ratio, round_to)


def _by_units(g: GroupInfo, ratios: np.ndarray, values: np.ndarray, round_to: int) -> tuple[np.ndarray, np.ndarray]:
    """Measured ``values`` at ``ratios`` as a curve over the units cut (increasing): ratios that cut
    the same units measured the same model, so their values are averaged."""
    cut = np.array([units_cut(g, float(r), round_to) for r in ratios], dtype=np.float64)
    us = np.unique(cut)
    return us, np.array([float(np.mean(values[cut == u])) for u in us])


def _curves(cm: CostModel, grid: np.ndarray, damage: np.ndarray, cand: np.ndarray, round_to: int = 1) -> np.ndarray:
    """Damage per group at each candidate ratio (G, len(cand)): a step for blocks; for the other
    groups linear in the number of units a ratio removes (``graph.n_keep`` with ``round_to``, as the
    cells and the prune stage cut), between the measured points (0 units: damage 0); inf beyond a
    group's last usable grid point.

    Interpolating in units, not in ratio, matters for groups of few units: a group of 3 heads cuts
    nothing at ratio 0.3 and one head at 0.35 and at 0.45, so a line in ratio from (0.3, 0) to
    (0.45, d) would price the one-head cut at 0.35 at d / 3 while its cost saving is whole."""
    n = len(cm.groups)
    curves = np.full((n, len(cand)), np.inf)
    for g in range(n):
        xs = np.concatenate([[0.0], grid])
        ys = np.concatenate([[0.0], damage[g]])
        ok = np.isfinite(ys)
        xs, ys = xs[ok], ys[ok]
        inside = cand <= xs.max() + 1e-9
        if cm.is_block[g]:  # kept below BLOCK_RATIO, removed at or above it: a step, not a line
            removed = xs >= BLOCK_RATIO - 1e-9
            curves[g, inside & (cand < BLOCK_RATIO - 1e-9)] = 0.0
            if removed.any():
                curves[g, inside & (cand >= BLOCK_RATIO - 1e-9)] = max(float(ys[removed][0]), 0.0)
            continue
        us, vs = _by_units(cm.groups[g], xs, ys, round_to)
        at = np.array([units_cut(cm.groups[g], float(r), round_to) for r in cand[inside]], dtype=np.float64)
        curves[g, inside] = np.maximum(np.interp(at, us, vs), 0.0)
    return curves


def sensitivity(
    cm: CostModel,
    grid: Sequence[float],
    damage: np.ndarray,
    targets: dict[str, float],
    max_ratio: float,
    round_to: int = 1,
    step: float = 0.025,
    start: np.ndarray | None = None,
    time_limit_s: float = 60.0,
) -> Allocation:
    """The least summed predicted damage that meets every target: the multiple-choice knapsack
    over the damage curves, solved exactly (:mod:`hpcprune.mckp`).

    ``damage[g, r]`` (G, R) is the measured loss increase when group ``g`` alone is pruned at
    ``grid[r]`` (NaN: not measured or skipped, unusable from there on). Curves are interpolated
    linearly between grid points (damage 0 at ratio 0; a step for blocks) onto the candidate
    ratios ``0, step, 2 step, ... <= max_ratio`` plus the grid's; each group takes one. The costs
    are the cost model's (MACs and parameters: exact polynomials in the kept fractions, with
    products of groups; latency: the additive table), with ``round_to`` applied. Once optimal,
    moves back that keep the targets and lose no damage use the rest of the budget. Assumes
    damages add up across groups; see cluster_docs/sensitivity_and_allocation.md.

    ``start``: continue from these ratios (G,) instead of from the dense model (only ever pruning
    more). Raises :class:`BudgetError` (one line) when no allocation meets the targets. When the
    exact search runs past ``time_limit_s`` seconds (or HiGHS fails), a warning says so and
    :func:`sensitivity_greedy` is used (or the search's best allocation, when it has less damage).
    """
    from . import mckp  # mckp builds on this module's cost model

    return mckp.sensitivity_many(cm, list(grid), damage, [targets], max_ratio, round_to, step, start, time_limit_s)[0]


def sensitivity_greedy(
    cm: CostModel,
    grid: Sequence[float],
    damage: np.ndarray,
    targets: dict[str, float],
    max_ratio: float,
    round_to: int = 1,
    step: float = 0.025,
    start: np.ndarray | None = None,
) -> Allocation:
    """The greedy allocation, the fallback of :func:`sensitivity` (same arguments): spend the
    budget where the measured damage per unit of cost saved is smallest.

    A greedy multiple-choice knapsack on the same curves and candidates: at each
    step every group may jump to any larger candidate ratio; the jump with the least damage per
    cost saved wins (this looks past plateaus instead of only at the next step). Costs saved are exact
    for the current state of all other groups (``CostModel.poly_in``: the cost is a polynomial,
    at most quadratic for matmuls and convolutions, in one group's kept fraction).
    Once the targets are met, steps back that keep them met give damage back (:func:`_give_back`:
    a jump can overshoot the target). Assumes damages add up across groups; see
    cluster_docs/sensitivity_and_allocation.md.

    ``start``: continue from these ratios instead of from the dense model (only ever pruning more),
    e.g. from an allocation whose measured latency missed, with a latency table measured around it.
    """
    _check_reachable(cm, targets, max_ratio, round_to)
    n = len(cm.groups)
    grid = np.asarray(grid, dtype=np.float64)
    cand = np.unique(np.concatenate([np.arange(0.0, max_ratio + 1e-9, step), grid[grid <= max_ratio + 1e-9]]))
    curves = _curves(cm, grid, damage, cand, round_to)
    state = np.zeros(n, dtype=np.int64)  # index into cand per group
    if start is not None:
        cand = np.unique(np.concatenate([cand, np.minimum(np.asarray(start, dtype=np.float64), max_ratio)]))
        curves = _curves(cm, grid, damage, cand, round_to)
        state = np.array([int(np.searchsorted(cand, min(float(s), max_ratio) - 1e-12)) for s in start], dtype=np.int64)
    floor = state.copy()  # only ever pruning more than ``start``
    kinds = list(targets)

    def ratios_of(st: np.ndarray) -> np.ndarray:
        return cand[st]

    while not _meets(cm, ratios_of(state), targets, round_to):
        best = _best_jump(cm, cand, curves, state, targets, round_to)
        if best is None:
            raise BudgetError(
                "prune.method=sensitivity: the measured curves cannot reach the targets "
                f"{targets} (groups stopped early or max_ratio too small); the best reachable is "
                f"{ {k: round(cm.fraction(k, ratios_of(state), round_to), 4) for k in kinds} }"
            )
        state[best[1]] = best[2]
    state = _give_back(cm, cand, curves, state, targets, round_to, floor=floor)
    r = ratios_of(state)
    loss = float(sum(curves[g, state[g]] for g in range(n)))
    return _result(cm, r, round_to, loss)


def _best_jump(cm: CostModel, cand: np.ndarray, curves: np.ndarray, state: np.ndarray, targets: dict[str, float],
               round_to: int) -> tuple[float, int, int] | None:
    """The jump (score, group, candidate index) with the least damage per cost saved from ``state``
    (kinds already met weigh 1e-3), or None when no group can save anything."""
    kinds = list(targets)
    r = cand[state]
    fr = {k: cm.fraction(k, r, round_to) for k in kinds}
    weights = {k: (1.0 if fr[k] > targets[k] + 1e-12 else 1e-3) for k in kinds}
    best = None
    for g in range(len(cm.groups)):
        if state[g] + 1 >= len(cand):
            continue
        # the cost as a polynomial in group g's kept fraction (every other group as it is now):
        # quadratic where the group feeds itself (residual streams), exact for every candidate
        f_now = cm.keep_fraction(g, r[g], round_to)
        if cm.keep_fraction(g, 1.0, round_to) >= f_now:
            continue
        polys = {k: cm.poly_in(k, g, r, round_to) / cm.dense[k] for k in kinds if k != "latency"}
        now = {k: float(np.polynomial.polynomial.polyval(f_now, c)) for k, c in polys.items()}
        for j in range(state[g] + 1, len(cand)):
            if not np.isfinite(curves[g, j]):
                break
            f_new = cm.keep_fraction(g, cand[j], round_to)
            if f_new >= f_now:
                continue
            saved = sum(weights[k] * (now[k] - float(np.polynomial.polynomial.polyval(f_new, c))) for k, c in polys.items())
            if "latency" in kinds:  # additive: the group's own measured change
                saved += weights["latency"] * (cm.latency_delta(g, r[g], round_to) - cm.latency_delta(g, cand[j], round_to)) / cm.dense["latency"]
            if saved <= 0:
                continue
            dmg = curves[g, j] - curves[g, state[g]]
            score = dmg / saved
            if best is None or score < best[0]:
                best = (score, g, j)
    return best


def _give_back(cm: CostModel, cand: np.ndarray, curves: np.ndarray, state: np.ndarray, targets: dict[str, float],
               round_to: int, floor: np.ndarray | None = None) -> np.ndarray:
    """After the greedy has met the targets: its jumps can overshoot them (a group jumped to a large
    ratio where a smaller one would have done). Undo, one group at a time, the step back that gives
    the most damage back while the targets stay met (ties: the one that adds the most cost back,
    i.e. overshoots least), until no step back does."""
    state = state.copy()
    kinds = [k for k in targets if k != "latency"]
    if not kinds or "latency" in targets:  # a measured latency is not re-predicted here
        return state
    while True:
        best = None
        r = cand[state]
        for g in range(len(state)):
            lo = int(floor[g]) if floor is not None else 0
            if state[g] <= lo:
                continue
            # the cost in group g's kept fraction, every other group as it is: exact per candidate
            polys = {k: cm.poly_in(k, g, r, round_to) / cm.dense[k] for k in kinds}
            for j in range(lo, int(state[g])):
                gain = float(curves[g, state[g]] - curves[g, j])
                if gain < 0 or not np.isfinite(gain):
                    continue
                f = cm.keep_fraction(g, cand[j], round_to)
                fr = {k: float(np.polynomial.polynomial.polyval(f, c)) for k, c in polys.items()}
                if any(fr[k] > targets[k] + 1e-12 for k in kinds):
                    continue
                added = sum(fr.values())
                if best is None or (gain, added) > best[0]:
                    best = ((gain, added), g, j)
                break  # the smallest ratio that still meets is the most given back for this group
        if best is None:  # every move lowers one ratio: this ends
            return state
        state[best[1]] = best[2]
