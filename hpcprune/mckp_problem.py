"""The problem of :mod:`hpcprune.mckp`: every group's options, the budgets as polynomials over
them, the cost of a choice and of every single-group move (exact, vectorised), and the two moves
that turn a Lagrangian minimiser into a good incumbent (:func:`give_back`, :func:`repair`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Key = tuple[tuple[int, int], ...]  # a product monomial: (group, power) pairs, two or more groups


@dataclass
class Choices:
    """The options of all groups, flattened: group ``g`` owns rows ``offsets[g]:offsets[g + 1]``;
    ``keep`` (n,): the group's kept fraction at that option; ``damage`` (n,): predicted damage."""

    offsets: np.ndarray
    keep: np.ndarray
    damage: np.ndarray

    @property
    def owner(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))


@dataclass
class Budget:
    """One cost kind: ``const + lin[x] + sum_m coef_m prod_{(g, e) in m} keep[x_g] ** e`` (units of
    the target: fractions of the dense cost). ``lin`` (n,): terms of one group and additive tables."""

    lin: np.ndarray
    const: float
    monos: dict[Key, float] = field(default_factory=dict)


@dataclass
class Result:
    """What :func:`solve` found."""

    choice: np.ndarray | None  # (G,) chosen option (row of Choices) per group; None: no solution
    status: str  # "optimal", "infeasible", "time limit", or HiGHS's message
    damage: float
    bound: float  # the best lower bound proven
    seconds: float
    options_left: int = 0  # options of the residual MILP after fixing


def split_poly(choices: Choices, coef: np.ndarray, exps: np.ndarray) -> Budget:
    """The :class:`Budget` of the cost polynomial ``sum_t coef[t] prod_g f_g ** exps[t, g]``
    (``coef`` (T,), ``exps`` (T, G) non-negative ints: ``CostModel.terms[kind]``) over ``choices``."""
    n, G = len(choices.keep), len(choices.offsets) - 1
    t, g = np.nonzero(exps)
    e = exps[t, g].astype(np.int64)
    count = np.bincount(t, minlength=len(coef))
    const = float(coef[count == 0].sum())
    one = count[t] == 1
    top = int(e.max()) if len(e) else 0
    per_group = np.zeros((G, top + 1))
    np.add.at(per_group, (g[one], e[one]), coef[t[one]])
    lin = np.zeros(n)
    for p in range(1, top + 1):
        lin += per_group[choices.owner, p] * choices.keep ** p
    monos: dict[Key, float] = {}
    tm, gm, em = t[~one], g[~one], e[~one]
    if len(tm):
        starts = np.flatnonzero(np.r_[True, tm[1:] != tm[:-1]])
        for s, stop in zip(starts, np.r_[starts[1:], len(tm)]):
            key = tuple(zip(gm[s:stop].tolist(), em[s:stop].tolist()))
            monos[key] = monos.get(key, 0.0) + float(coef[tm[s]])
    return Budget(lin, const, monos)


class Problem:
    """Options and budgets; evaluates the costs of a choice and the cost change of every single-group move."""

    def __init__(self, choices: Choices, budgets: dict[str, Budget]) -> None:
        self.choices, self.budgets = choices, budgets
        self.G = len(choices.offsets) - 1
        self._flat = {k: self._flatten(b) for k, b in budgets.items()}
        nbrs: list[set[int]] = [set() for _ in range(self.G)]  # groups sharing a product term
        for b in budgets.values():
            for key in b.monos:
                for g, _ in key:
                    nbrs[g].update(h for h, _ in key if h != g)
        self.neighbours = [sorted(n) for n in nbrs]

    @staticmethod
    def _flatten(b: Budget) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        keys = list(b.monos)
        m = np.repeat(np.arange(len(keys)), [len(k) for k in keys]).astype(np.int64)
        g = np.array([ge[0] for k in keys for ge in k], dtype=np.int64)
        e = np.array([ge[1] for k in keys for ge in k], dtype=np.int64)
        coef = np.array([b.monos[k] for k in keys], dtype=np.float64)
        starts = np.flatnonzero(np.r_[True, m[1:] != m[:-1]]) if len(m) else np.zeros(0, np.int64)
        return m, g, e, coef, starts

    def costs(self, choice: np.ndarray) -> dict[str, float]:
        """Cost per kind of ``choice`` ((G,) option rows)."""
        keep = self.choices.keep[choice]
        out = {}
        for k, b in self.budgets.items():
            m, g, e, coef, starts = self._flat[k]
            prod = np.multiply.reduceat(keep[g] ** e, starts) if len(m) else np.zeros(0)
            out[k] = float(b.const + b.lin[choice].sum() + coef @ prod)
        return out

    def move_costs(self, choice: np.ndarray) -> dict[str, np.ndarray]:
        """Per kind, the cost (n,) after moving the owner of each option to it, every other group as in ``choice``."""
        keep_now = self.choices.keep[choice]
        owner, keep = self.choices.owner, self.choices.keep
        out = {}
        for k, total in self.costs(choice).items():
            m, g, e, coef, starts = self._flat[k]
            delta = self.budgets[k].lin - self.budgets[k].lin[choice][owner]
            if len(m):
                val = keep_now[g] ** e
                other = np.ones(len(m))
                length = np.diff(np.r_[starts, len(m)])[m]
                pos = np.arange(len(m)) - starts[m]
                for j in range(int(length.max())):  # the product of every other factor of the monomial
                    ok = (j < length) & (j != pos)
                    other[ok] *= val[starts[m[ok]] + j]
                top = int(e.max())
                poly = np.zeros((self.G, top + 1))
                np.add.at(poly, (g, e), coef[m] * other)
                for p in range(1, top + 1):
                    delta += poly[owner, p] * (keep ** p - keep_now[owner] ** p)
            out[k] = total + delta
        return out

    def restrict(self, alive: np.ndarray) -> tuple["Problem", np.ndarray]:
        """The problem over the options where ``alive`` (n,) holds (at least one per group), and the
        rows they had. A group left with one option is a constant in every product it is in: the
        product loses it (one group left: a linear term; none: a constant)."""
        rows = np.flatnonzero(alive)
        c = self.choices
        offsets = np.r_[0, np.cumsum(np.bincount(c.owner[rows], minlength=self.G))]
        sub = Choices(offsets, c.keep[rows], c.damage[rows])
        fixed = np.diff(offsets) == 1
        budgets = {}
        for k, b in self.budgets.items():
            lin, const, monos = b.lin[rows].copy(), b.const, {}
            for key, coef in b.monos.items():
                rest = tuple((g, e) for g, e in key if not fixed[g])
                if len(rest) < len(key):
                    coef *= float(np.prod([sub.keep[offsets[g]] ** e for g, e in key if fixed[g]]))
                if len(rest) >= 2:
                    monos[rest] = monos.get(rest, 0.0) + coef
                elif rest:
                    (g, e), = rest
                    lin[offsets[g]:offsets[g + 1]] += coef * sub.keep[offsets[g]:offsets[g + 1]] ** e
                else:
                    const += coef
            budgets[k] = Budget(lin, const, monos)
        return Problem(sub, budgets), rows


def give_back(problem: Problem, choice: np.ndarray, targets: dict[str, float], max_rounds: int = 10_000) -> np.ndarray:
    """Moves of single groups to a smaller ratio (an earlier option) that lose no damage and keep
    every target met, best first (most damage given back, then the most cost added back), until
    none is left: an optimum on a damage plateau (or a Lagrangian minimiser) then uses its budget
    instead of stopping short of the target. Each round takes, best first, every move whose group
    shares no product term with a group already moved in that round: their cost changes then add
    up exactly."""
    c = problem.choices
    owner = c.owner
    choice = choice.copy()
    rank = np.arange(len(c.keep)) - c.offsets[owner]
    for _ in range(max_rounds):
        now = problem.costs(choice)
        after = problem.move_costs(choice)
        ok = (rank < rank[choice][owner]) & (c.damage <= c.damage[choice][owner])
        for k, t in targets.items():
            ok &= after[k] <= t
        if not ok.any():
            return choice
        cand = np.flatnonzero(ok)
        first = cand[np.r_[True, owner[cand][1:] != owner[cand][:-1]]]  # per group the smallest ratio that meets
        gain = c.damage[choice][owner[first]] - c.damage[first]
        added = sum(after[k][first] for k in targets)
        spent = {k: now[k] for k in targets}
        blocked: set[int] = set()
        for o in first[np.lexsort((-added, -gain))]:
            g = int(owner[o])
            if g in blocked or any(spent[k] + after[k][o] - now[k] > t for k, t in targets.items()):
                continue
            for k in targets:
                spent[k] += after[k][o] - now[k]
            choice[g] = o
            blocked.add(g)
            blocked.update(problem.neighbours[g])
    return choice


def repair(problem: Problem, choice: np.ndarray, targets: dict[str, float], max_rounds: int = 10_000) -> np.ndarray | None:
    """From a choice over its targets, the single-group move with the least damage added per cost
    saved on the missed targets, until every target is met (None: no move saves any more). From
    the Lagrangian minimiser just below the optimal multiplier, a few moves reach the budget."""
    c = problem.choices
    choice = choice.copy()
    for _ in range(max_rounds):
        now = problem.costs(choice)
        over = [k for k, t in targets.items() if now[k] > t]
        if not over:
            return choice
        after = problem.move_costs(choice)
        saved = sum((now[k] - after[k]) / (now[k] - targets[k]) for k in over)
        ok = saved > 1e-15
        if not ok.any():
            return None
        cand = np.flatnonzero(ok)
        added = c.damage[cand] - c.damage[choice][c.owner[cand]]
        best = cand[np.lexsort((-saved[cand], added / saved[cand]))[0]]
        choice[c.owner[best]] = best
    return None
