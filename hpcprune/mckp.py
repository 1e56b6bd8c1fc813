"""The exact solver of ``prune.method=sensitivity``: a multiple-choice knapsack over the groups'
damage curves whose budgets are the cost model's polynomials, solved to optimality.

Every group ``g`` picks one option ``o`` (a candidate ratio; binary ``x_o``, ``sum_{o in g} x_o = 1``).
Minimise the summed predicted damage ``D(x) = sum_o damage_o x_o`` subject to every budget
``cost_k(x) <= target_k``: ``cost_k`` is the :class:`~hpcprune.allocate.CostModel` polynomial in
the kept fractions (``round_to``, whole heads and blocks included) plus, for latency, the
additive table (linear per option).

The costs are not separable per group (``CostModel._term_values``: a term is a product over
groups): a convolution between two groups costs ``c f_a f_b``, a layer inside a removable block
``c f_B f_a f_b``. They are handled exactly, by branch and bound; at every node:

1. **Lagrangian bound** ``L(lam) = min_x D(x) + sum_k lam_k (cost_k(x) - target_k) <= optimum``
   for every ``lam >= 0``. With the products it is a min-sum problem over the groups' interaction
   graph, solved exactly by variable elimination (:mod:`hpcprune.mckp_elim`); ``lam`` is
   maximised by Kelley's cutting planes (1960). The minimisers either side of the budget, moved
   onto it (:func:`~hpcprune.mckp_problem.repair`, :func:`~hpcprune.mckp_problem.give_back`),
   are incumbents.
2. **Lagrangian reduced-cost fixing**: the min-marginal of option ``o`` (the least Lagrangian
   value with ``o`` forced) bounds every solution that uses ``o``; options whose bound is not
   below the incumbent are removed. A group with one option left is a constant in its products.
3. A **branch** on the free group in most products (a residual stream: with it fixed the rest is
   nearly separable) where step 1 gave a bound, or else the **residual MILP** with the products linearised exactly
   (:mod:`hpcprune.mckp_milp`, HiGHS through ``scipy.optimize.milp``). When many groups keep a
   choice after step 2, a MILP over the options nearest the Lagrangian optimum (a core, as in
   Pisinger's 1995 algorithm) first gives a better incumbent, and step 2 is repeated with it.

Optimal for the model to ``mip_rel_gap`` (1e-6 of the damage by default; HiGHS's answers are
met with a margin of 1e-9 of the dense cost): no relaxation is returned. Once optimal, moves that
lose no damage use what is left of the budget (a damage plateau has many optima). The caller
checks the result against the real ``CostModel`` again. The problem, its costs and the moves are
:mod:`hpcprune.mckp_problem`; this module is the search and ``prune.method=sensitivity``'s entry.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from scipy.optimize import linprog

from . import allocate
from .mckp_elim import Elimination
from .mckp_milp import KnapsackMILP
from .mckp_problem import Budget, Choices, Problem, Result, give_back, repair, split_poly

__all__ = ["Budget", "Choices", "Problem", "Result", "give_back", "repair", "split_poly", "kelley", "solve",
           "sensitivity_many"]

log = logging.getLogger(__name__)


def kelley(elim: Elimination, problem: Problem, targets: dict[str, float], upper: float,
           iters: int = 80, tol: float = 1e-9) -> tuple[np.ndarray, float, list[np.ndarray]]:
    """Maximise the Lagrangian bound over ``lam >= 0`` by Kelley's cutting planes (an LP master
    over the cuts ``D(x_i) + lam . (cost(x_i) - target)``). Returns the best ``lam``, its bound and
    the minimisers met on the way (candidates for an incumbent)."""
    kinds = list(targets)
    B = np.array([targets[k] for k in kinds])
    cap = 1e4 * (abs(upper) + 1.0)  # a lam above this prices a 1e-4 share of the budget above all damage
    lam = np.zeros(len(kinds))
    best_val, best_lam, seen, cuts_a, cuts_b = -np.inf, lam, [], [], []
    for _ in range(iters):
        val, choice = elim.evaluate(dict(zip(kinds, lam)))
        val -= float(lam @ B)
        seen.append(choice)
        if val > best_val:
            best_val, best_lam = val, lam.copy()
        cost = problem.costs(choice)
        slack = np.array([cost[k] for k in kinds]) - B
        cuts_a.append(np.r_[1.0, -slack])
        cuts_b.append(float(problem.choices.damage[choice].sum()))
        if (slack <= 0).all() and abs(cuts_b[-1] - best_val) <= tol * (1 + abs(best_val)):
            break  # a minimiser meets the budgets with complementary slackness: optimal
        res = linprog(np.r_[-1.0, np.zeros(len(kinds))], A_ub=np.array(cuts_a), b_ub=np.array(cuts_b),
                      bounds=[(None, None)] + [(0.0, cap)] * len(kinds), method="highs")
        if res.status != 0 or -res.fun - best_val <= tol * (1 + abs(best_val)):
            break
        lam = res.x[1:]
    return best_lam, best_val, seen


HUB_DEGREE = 8  # branch on a group that shares products with this many groups still free (a residual stream)
HUB_DEPTH = 6  # at most this many such branchings on one path (then the residual MILP)
CORE_FREE = 100  # more groups than this left with a choice after the fixing: first solve a core (_Search.core)


class _Search:
    """Depth-first branch and bound over hub groups (module docstring): at every node the
    Lagrangian bound, reduced-cost fixing against the best damage found so far, then either a
    branch on the free group in most products or the residual MILP."""

    def __init__(self, problem: Problem, targets: dict[str, float], deadline: float, gap: float, max_table: int) -> None:
        self.root, self.targets, self.deadline, self.gap, self.max_table = problem, targets, deadline, gap, max_table
        self.best: np.ndarray | None = None
        self.best_d, self.left, self.status = np.inf, 0, "optimal"

    def offer(self, x: np.ndarray) -> None:
        """A choice (root rows) that meets the targets: kept when it has less damage."""
        x = give_back(self.root, x, self.targets)
        d = float(self.root.choices.damage[x].sum())
        if d < self.best_d:
            self.best, self.best_d = x, d

    def cutoff(self) -> float:
        """A node whose bound is above this holds nothing better than the incumbent by more than the gap."""
        return self.best_d - self.gap * abs(self.best_d) if np.isfinite(self.best_d) else np.inf

    def node(self, problem: Problem, rows: np.ndarray, elim: Elimination | None = None, depth: int = 0) -> float:
        """Search the subproblem ``problem`` (its option rows are ``rows`` of the root); its lower bound."""
        elim = elim if elim is not None else Elimination(problem, self.max_table)
        bound, mm = -np.inf, np.zeros(len(problem.choices.keep))  # no min-marginals: branch in option order
        if elim.ok:
            lam, bound, seen = kelley(elim, problem, self.targets, _extremes(problem)[1])
            met, missed = [], []  # (damage or excess, index) of the minimisers that meet / miss the targets
            for i, x in enumerate(seen):
                over = sum(max(v - self.targets[k], 0.0) for k, v in problem.costs(x).items() if k in self.targets)
                (missed if over > 0 else met).append((over if over > 0 else float(problem.choices.damage[x].sum()), i))
            near = [seen[min(m)[1]] for m in (met, missed) if m]  # the minimisers either side of the budget
            if met:
                self.offer(rows[near[0]])
            if missed:
                x = repair(problem, seen[min(missed)[1]], self.targets)
                if x is not None:
                    self.offer(rows[x])
            if bound >= self.cutoff():
                return bound
            mm = elim.min_marginals(dict(zip(self.targets, lam))) - float(lam @ np.array(list(self.targets.values())))
            if self._free(problem, mm < self.cutoff()) > CORE_FREE and _hub(problem) is None:
                self.core(problem, rows, mm, bound, near)
            alive = mm < self.cutoff()
            if not np.bincount(problem.choices.owner[alive], minlength=problem.G).all():
                return max(bound, self.cutoff())  # a group with no option left: nothing better here
            problem, sub = problem.restrict(alive)
            rows, mm = rows[sub], mm[sub]
        # a branch without the Lagrangian bound prunes nothing (no min-marginals to fix options with):
        # every child would be solved in full; HiGHS's own branch and bound on the whole node is faster
        # (DenseNet-201's 200 groups, whose concatenations make the elimination's tables too large:
        # 1.5 s optimal, against no answer in 60 s branching on hubs)
        hub = _hub(problem) if elim.ok else None
        if hub is not None and depth < HUB_DEPTH:
            lows = []
            lo, hi = problem.choices.offsets[hub], problem.choices.offsets[hub + 1]
            for o in lo + np.argsort(mm[lo:hi]):  # the hub's options, most promising first
                if time.perf_counter() > self.deadline:
                    self.status = "time limit"
                    break
                if mm[o] >= self.cutoff():
                    continue
                keep = problem.choices.owner != hub
                keep[o] = True
                child, sub = problem.restrict(keep)
                lows.append(self.node(child, rows[sub], depth=depth + 1))
            return max(bound, min(lows, default=self.cutoff()))
        return max(bound, self.residual(problem, rows))

    @staticmethod
    def _free(problem: Problem, alive: np.ndarray) -> int:
        return int((np.bincount(problem.choices.owner[alive], minlength=problem.G) > 1).sum())

    def core(self, problem: Problem, rows: np.ndarray, mm: np.ndarray, bound: float, near: list[np.ndarray]) -> None:
        """A better incumbent before the fixing: the MILP over the options nearest the Lagrangian
        optimum (min-marginal within a twentieth of the gap, and the minimisers either side of the
        budget), whose optimum is feasible for the whole problem. (An incumbent close to the optimum
        fixes far more.)"""
        core = mm <= bound + 0.05 * (self.cutoff() - bound)
        for x in near:
            core[x] = True
        if self._free(problem, core) < self._free(problem, mm < self.cutoff()):
            sub, keep = problem.restrict(core)
            status = self.status
            self.residual(sub, rows[keep])
            self.status = status  # the core's own outcome proves nothing about the whole problem

    def residual(self, problem: Problem, rows: np.ndarray) -> float:
        """The residual MILP; HiGHS accepts rows violated within its feasibility tolerance, so a
        result over a target is solved again with that target lowered by twice the excess."""
        self.left += len(problem.choices.keep)
        if len(problem.choices.keep) == problem.G:  # one option per group: nothing to solve
            x = rows[np.arange(problem.G)]
            if all(v <= self.targets[k] for k, v in self.root.costs(x).items() if k in self.targets):
                self.offer(x)
                return float(self.root.choices.damage[x].sum())
            return np.inf
        milp_ = KnapsackMILP(problem)
        margin = dict.fromkeys(self.targets, 1e-9)  # of the dense cost: a few MACs of a large model
        for _ in range(3):
            left = self.deadline - time.perf_counter()
            if left <= 0:
                self.status = "time limit"
                return -np.inf
            res = milp_.solve({k: t - margin[k] for k, t in self.targets.items()}, left, self.gap)
            if res.choice is None:
                if res.status != "infeasible":
                    self.status = res.status
                return -np.inf if res.status != "infeasible" else np.inf
            x = rows[res.choice]
            over = {k: v - self.targets[k] for k, v in self.root.costs(x).items() if k in self.targets}
            if all(v <= 0 for v in over.values()):
                self.offer(x)
                return res.damage - self.gap * abs(res.damage)
            margin = {k: margin[k] + 2 * max(over[k], 0.0) for k in self.targets}
        self.status = "HiGHS's solutions miss the targets in the cost model"
        return -np.inf


def _hub(problem: Problem) -> int | None:
    """The free group (more than one option) in products with the most free groups, if at least HUB_DEGREE."""
    free = np.diff(problem.choices.offsets) > 1
    best, deg = None, HUB_DEGREE - 1
    for g in np.flatnonzero(free):
        d = sum(1 for h in problem.neighbours[g] if free[h])
        if d > deg:
            best, deg = int(g), d
    return best


def solve(problem: Problem, targets: dict[str, float], time_limit_s: float = 60.0, mip_rel_gap: float = 1e-6,
          max_table: int = 2_000_000, elim: Elimination | None = None) -> Result:
    """The least-damage choice meeting every target (``targets``: kind -> largest allowed cost, in
    the budgets' units), optimal to ``mip_rel_gap`` (module docstring). ``elim``: the root's plan,
    built before (several targets over one problem). ``status``: "optimal"; "infeasible" (no
    choice meets the targets; ``choice`` None); otherwise the search stopped early ("time limit")
    and ``choice`` is the best found, if any."""
    t0 = time.perf_counter()
    targets = {k: float(v) for k, v in targets.items()}
    search = _Search(problem, targets, t0 + time_limit_s, mip_rel_gap, max_table)
    bound = search.node(problem, np.arange(len(problem.choices.keep)), elim)
    status = search.status
    if status == "optimal" and search.best is None:
        status = "infeasible"
    return Result(search.best, status, search.best_d if search.best is not None else np.nan,
                  min(bound, search.best_d), time.perf_counter() - t0, search.left)


def _extremes(problem: Problem) -> tuple[float, float]:
    """(least, most) total damage over all choices."""
    d, off = problem.choices.damage, problem.choices.offsets
    return float(np.minimum.reduceat(d, off[:-1]).sum()), float(np.maximum.reduceat(d, off[:-1]).sum())


# ---- the sensitivity allocation -----------------------------------------------------------------
def _options(cm: allocate.CostModel, cand: np.ndarray, curves: np.ndarray, floor: np.ndarray, round_to: int,
             latency: bool) -> tuple[Choices, np.ndarray, np.ndarray | None]:
    """The options of every group: candidates from ``floor`` on with a finite curve (the floor
    itself always: where ``start`` left the group), less those another option of the group beats:
    same costs and no more damage (the smaller ratio stays), or, when every cost grows with every
    kept fraction (no negative coefficient), no more of any cost and less damage. Returns the
    choices, each option's candidate index and its latency change (None without latency)."""
    G, C = curves.shape
    kf = np.array([[cm.keep_fraction(g, r, round_to) for r in cand] for g in range(G)])
    lat = np.array([[cm.latency_delta(g, r, round_to) for r in cand] for g in range(G)]) if latency else np.zeros((G, C))
    d = np.where(np.isfinite(curves), curves, np.inf)
    idx = np.arange(C)
    usable = (np.isfinite(d) & (idx[None, :] >= floor[:, None])) | (idx[None, :] == floor[:, None])
    d = np.where(np.isfinite(d), d, 0.0)  # only a floor past the curve's end: its damage is already spent
    monotone = all((coef >= 0).all() for coef, _ in cm.terms.values())
    a, b = (slice(None), slice(None), None), (slice(None), None, slice(None))  # [g, i, j]: option j beats i?
    same = (kf[a] == kf[b]) & (lat[a] == lat[b])
    beats = same & ((d[b] < d[a]) | ((d[b] == d[a]) & (idx[None, None, :] < idx[None, :, None])))
    if monotone:
        beats |= (kf[b] <= kf[a]) & (lat[b] <= lat[a]) & (d[b] < d[a])
    alive = usable & ~(beats & usable[:, None, :]).any(axis=2)
    g_of, c_of = np.nonzero(alive)
    offsets = np.r_[0, np.cumsum(alive.sum(axis=1))]
    return Choices(offsets, kf[g_of, c_of], d[g_of, c_of]), c_of, (lat[g_of, c_of] if latency else None)


def sensitivity_many(cm: allocate.CostModel, grid: list[float], damage: np.ndarray, targets_list: list[dict[str, float]],
                     max_ratio: float, round_to: int = 1, step: float = 0.025, start: np.ndarray | None = None,
                     time_limit_s: float = 60.0) -> list[allocate.Allocation]:
    """``allocate.sensitivity`` for several budgets at once (the options, budgets and elimination
    plan are built once). ``damage`` (G, R) as there; ``targets_list``: one ``{kind: kept
    fraction}`` per allocation. Raises ``allocate.BudgetError`` (one line) for a target no
    allocation reaches. When the exact search stops early (``time_limit_s``) or HiGHS fails, a
    warning says so and the greedy (``allocate.sensitivity_greedy``) is used, or the search's own
    incumbent when that has less damage."""
    for targets in targets_list:
        allocate._check_reachable(cm, targets, max_ratio, round_to)
    grid_a = np.asarray(grid, dtype=np.float64)
    cand = np.unique(np.concatenate([np.arange(0.0, max_ratio + 1e-9, step), grid_a[grid_a <= max_ratio + 1e-9]]))
    floor = np.zeros(len(cm.groups), dtype=np.int64)
    if start is not None:
        s = np.minimum(np.asarray(start, dtype=np.float64), max_ratio)
        cand = np.unique(np.concatenate([cand, s]))
        floor = np.searchsorted(cand, s - 1e-12).astype(np.int64)
    curves = allocate._curves(cm, grid_a, damage, cand, round_to)
    kinds = sorted({k for t in targets_list for k in t})
    t0 = time.perf_counter()
    choices, cidx, lat = _options(cm, cand, curves, floor, round_to, "latency" in kinds)
    budgets = {k: split_poly(choices, cm.terms[k][0] / cm.dense[k], cm.terms[k][1]) for k in kinds if k != "latency"}
    if "latency" in kinds:
        budgets["latency"] = Budget(lat / cm.dense["latency"], cm.latency[2] / cm.dense["latency"])
    problem = Problem(choices, budgets)
    elim = Elimination(problem)
    log.debug("exact allocation: %d groups, %d options, built in %.2f s", problem.G, len(choices.keep),
              time.perf_counter() - t0)
    return [_allocate_one(cm, problem, elim, cand[cidx], targets, (grid, damage, max_ratio, round_to, step, start),
                          time_limit_s) for targets in targets_list]


def _allocate_one(cm: allocate.CostModel, problem: Problem, elim: Elimination, ratio_of: np.ndarray,
                  targets: dict[str, float], greedy_args: tuple, time_limit_s: float) -> allocate.Allocation:
    """One allocation of :func:`sensitivity_many` (``ratio_of``: each option's ratio; ``greedy_args``:
    (grid, damage, max_ratio, round_to, step, start) for the fallback)."""
    grid, damage, max_ratio, round_to, step, start = greedy_args
    res = solve(problem, targets, time_limit_s, elim=elim)
    if res.status == "infeasible":
        last = ratio_of[problem.choices.offsets[1:] - 1]
        reach = {k: round(cm.fraction(k, last, round_to), 4) for k in targets}
        raise allocate.BudgetError(f"prune.method=sensitivity: the measured curves cannot reach the targets {targets} "
                                   f"(groups stopped early or max_ratio too small); the best reachable is {reach}")
    ratios = ratio_of[res.choice] if res.choice is not None else None
    meets = ratios is not None and allocate._meets(cm, ratios, targets, round_to)
    if res.status == "optimal" and meets:
        log.info("exact allocation: optimal in %.2f s (%d groups; %d options left to the MILP)",
                 res.seconds, problem.G, res.options_left)
        return allocate._result(cm, ratios, round_to, res.damage)
    why = res.status if res.status != "optimal" else "its result misses a target in the cost model"
    log.warning("prune.method=sensitivity: the exact allocation stopped early (%s after %.1f s); falling back to the "
                "greedy allocation%s", why, res.seconds,
                " (prune.exact_time_s gives the exact search more time)" if res.status == "time limit" else "")
    greedy = allocate.sensitivity_greedy(cm, grid, damage, targets, max_ratio, round_to, step, start)
    if meets and res.damage < greedy.predicted_loss:
        log.warning("prune.method=sensitivity: the exact search's best allocation so far (damage %.6g) beats the "
                    "greedy's (%.6g): using it", res.damage, greedy.predicted_loss)
        return allocate._result(cm, ratios, round_to, res.damage)
    return greedy
