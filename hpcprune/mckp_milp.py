"""Step 3 of :mod:`hpcprune.mckp`: the residual multiple-choice knapsack as a MILP for HiGHS
(``scipy.optimize.milp``), with the cost model's products linearised exactly.

A monomial ``m = f_p**e * r`` (pivot ``p``: the group in most products, e.g. a residual stream or
a block; ``r``: the rest, one group's power or a smaller monomial, recursively) becomes
``m = sum_v v z_v``, one continuous ``z_v`` per value ``v`` of ``f_p**e`` over ``p``'s options, with
``sum_v z_v = r`` and ``lo_r X_v <= z_v <= hi_r X_v`` (``X_v``: the sum of ``p``'s options giving
``v``; ``[lo_r, hi_r]`` bounds ``r``). With binary ``x`` exactly one ``X_v`` is 1, so ``z_v = r``
there and 0 elsewhere: ``m`` is the product at every integer point (the disjunctive form of Balas
1979; McCormick's envelope, 1976, is its two-value case). Exact, not a relaxation.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

import numpy as np
from numpy.typing import ArrayLike
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from .mckp_problem import Key, Problem, Result


class KnapsackMILP:
    """The MILP of a :class:`~hpcprune.mckp.Problem`, built once; :meth:`solve` takes the targets.

    Size: ``n`` binaries, one ``u`` per (group, power) in a product, and per monomial one ``z`` per
    distinct value of its pivot (a block: 2; a channel group: its distinct kept counts)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        c = problem.choices
        n, G = len(c.keep), problem.G
        self.ncol, self.nrow = n, 0
        self._lo, self._hi, self._rows, self._rlo, self._rhi = [np.zeros(n)], [np.ones(n)], [], [], []
        self._add_rows(c.owner, np.arange(n), np.ones(n), np.ones(G), np.ones(G))  # one option per group
        self._powers: dict[tuple[int, int], int] = {}
        self._monos: dict[Key, int] = {}
        # a product's pivot: the group in most products (a residual stream, a block): once the branch
        # and bound fixes it, every product it is in is exact in the LP relaxation too
        self._degree = np.zeros(G, dtype=np.int64)
        for b in problem.budgets.values():
            for key in b.monos:
                self._degree[[g for g, _ in key]] += 1
        self.budget = {}
        for kind, b in problem.budgets.items():
            mcols = np.array([self._mono(k) for k in b.monos], dtype=np.int64)
            cols, vals = np.r_[np.arange(n), mcols], np.r_[b.lin, np.array(list(b.monos.values()), np.float64)]
            self.budget[kind] = (cols[vals != 0], vals[vals != 0], b.const)
        r, cc, v = (np.concatenate(a) for a in zip(*self._rows))
        self.A = sparse.csr_matrix((v, (r, cc)), shape=(self.nrow, self.ncol))

    def _add_cols(self, k: int, lo: float, hi: float) -> np.ndarray:
        self._lo.append(np.full(k, lo))
        self._hi.append(np.full(k, hi))
        self.ncol += k
        return np.arange(self.ncol - k, self.ncol)

    def _add_rows(self, rows: ArrayLike, cols: ArrayLike, vals: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> None:
        self._rows.append((np.asarray(rows) + self.nrow, np.asarray(cols), np.asarray(vals, np.float64)))
        self._rlo.append(np.asarray(lo, np.float64))
        self._rhi.append(np.asarray(hi, np.float64))
        self.nrow += len(lo)

    def _opts(self, g: int) -> np.ndarray:
        off = self.problem.choices.offsets
        return np.arange(off[g], off[g + 1])

    def _range(self, key: Key) -> tuple[float, float]:
        lo = hi = 1.0
        for g, e in key:
            v = self.problem.choices.keep[self._opts(g)] ** e
            lo, hi = lo * float(v.min()), hi * float(v.max())
        return lo, hi

    def _power(self, g: int, e: int) -> int:
        """Column of ``u = f_g**e = sum_o keep_o**e x_o`` (an equality row)."""
        if (g, e) not in self._powers:
            col = self._powers[(g, e)] = int(self._add_cols(1, *self._range(((g, e),)))[0])
            o = self._opts(g)
            self._add_rows(np.zeros(len(o) + 1, np.int64), np.r_[col, o], np.r_[1.0, -self.problem.choices.keep[o] ** e],
                           [0.0], [0.0])
        return self._powers[(g, e)]

    def _mono(self, key: Key) -> int:
        """Column of the product monomial ``key``, exact at every integer point."""
        if key in self._monos:
            return self._monos[key]
        keep = self.problem.choices.keep
        p = min(range(len(key)), key=lambda i: (-self._degree[key[i][0]], len(np.unique(keep[self._opts(key[i][0])]))))
        (g, e), rest = key[p], key[:p] + key[p + 1:]
        r = self._power(*rest[0]) if len(rest) == 1 else self._mono(rest)
        lo, hi = self._range(rest)
        opts = self._opts(g)
        vals, which = np.unique(keep[opts] ** e, return_inverse=True)
        V = len(vals)
        z = self._add_cols(V, 0.0, hi)
        self._add_rows(np.zeros(V + 1, np.int64), np.r_[z, r], np.r_[np.ones(V), -1.0], [0.0], [0.0])  # sum z = r
        rows, cols = np.r_[np.arange(V), which], np.r_[z, opts]
        self._add_rows(rows, cols, np.r_[np.ones(V), np.full(len(opts), -hi)], np.full(V, -np.inf), np.zeros(V))
        if lo > 0:
            self._add_rows(rows, cols, np.r_[np.ones(V), np.full(len(opts), -lo)], np.zeros(V), np.full(V, np.inf))
        col = self._monos[key] = int(self._add_cols(1, *self._range(key))[0])
        self._add_rows(np.zeros(V + 1, np.int64), np.r_[col, z], np.r_[1.0, -vals], [0.0], [0.0])  # m = sum v z_v
        return col

    def solve(self, targets: dict[str, float], time_limit_s: float = 60.0, mip_rel_gap: float = 1e-6) -> Result:
        """The least-damage choice meeting ``targets`` (kind -> largest cost) to ``mip_rel_gap``;
        ``Result.choice`` None unless HiGHS proves it optimal within ``time_limit_s``."""
        t0 = time.perf_counter()
        extra = [sparse.csr_matrix((v, (np.zeros(len(cols), np.int64), cols)), shape=(1, self.ncol))
                 for k, (cols, v, _) in self.budget.items() if k in targets]
        ub = [targets[k] - const for k, (_, _, const) in self.budget.items() if k in targets]
        n = len(self.problem.choices.keep)
        cost = np.zeros(self.ncol)
        cost[:n] = self.problem.choices.damage
        with _quiet_stdout():  # HiGHS 1.12 prints a debug line from C during some solves
            res = milp(cost, integrality=np.r_[np.ones(n), np.zeros(self.ncol - n)],
                       bounds=Bounds(np.concatenate(self._lo), np.concatenate(self._hi)),
                       constraints=LinearConstraint(sparse.vstack([self.A, *extra], format="csr"),
                                                    np.r_[np.concatenate(self._rlo), np.full(len(ub), -np.inf)],
                                                    np.r_[np.concatenate(self._rhi), ub]),
                       options={"time_limit": float(time_limit_s), "mip_rel_gap": float(mip_rel_gap)})
        seconds = time.perf_counter() - t0
        status = {0: "optimal", 1: "time limit", 2: "infeasible"}.get(int(res.status), str(res.message))
        bound = float(getattr(res, "mip_dual_bound", np.nan) or np.nan)
        if res.x is None or res.status != 0:
            return Result(None, status, np.nan, bound, seconds)
        off = self.problem.choices.offsets
        choice = np.array([off[g] + int(np.argmax(res.x[off[g]:off[g + 1]])) for g in range(self.problem.G)],
                          dtype=np.int64)
        return Result(choice, status, float(self.problem.choices.damage[choice].sum()), bound, seconds)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """File descriptor 1 to /dev/null for the duration (C code writes there, past ``sys.stdout``)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # a captured stdout without a descriptor: nothing to silence
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
