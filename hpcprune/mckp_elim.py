"""Exact minimisation of the allocation's Lagrangian by variable elimination (bucket elimination,
Dechter 1999; the min-sum form of the junction-tree algorithm), with the min-marginal of every
option from one backward pass.

The Lagrangian of :mod:`hpcprune.mckp`, ``damage(x) + sum_k lam_k cost_k(x)``, is a sum of one
table per group (damage and single-group cost terms) and one table per set of groups that share a
product term (a convolution between two groups, a block and the layers inside it). Groups in no
product are minimised on their own, all at once. The others are eliminated fewest neighbours first
(residual streams, the hubs, last): eliminating ``v`` adds every table that holds ``v`` and
minimises over ``v``, leaving a table over its neighbours. The leaves (one neighbour, nothing
eliminated into them: most layers around a residual stream) go all at once, as flat arrays. A model whose
interaction graph needs a table larger than ``max_table`` (DenseNet-style concatenations couple
every layer of a dense block) is left to the MILP alone (``ok`` False).
"""
from __future__ import annotations

import heapq

import numpy as np

from .mckp_problem import Problem


class Elimination:
    """The elimination plan of a :class:`~hpcprune.mckp.Problem`, built once; :meth:`evaluate` and
    :meth:`min_marginals` take the multipliers ``lam`` (kind -> float >= 0)."""

    def __init__(self, problem: Problem, max_table: int = 2_000_000) -> None:
        c = problem.choices
        self.problem, self.G = problem, problem.G
        self.off = c.offsets
        self.size = np.diff(c.offsets)
        factors: dict[tuple[int, ...], dict[str, np.ndarray]] = {}
        for kind, b in problem.budgets.items():
            for key, coef in b.monos.items():
                key = tuple(sorted(key))
                tab = np.asarray(coef, dtype=np.float64)
                for g, e in key:
                    tab = np.multiply.outer(tab, c.keep[c.offsets[g]:c.offsets[g + 1]] ** e)
                S = tuple(g for g, _ in key)
                per = factors.setdefault(S, {})
                per[kind] = per[kind] + tab if kind in per else tab
        adj: list[set[int]] = [set() for _ in range(self.G)]
        for S in factors:
            for a in S:
                adj[a].update(x for x in S if x != a)
        self.isolated = np.array([g for g in range(self.G) if not adj[g]], dtype=np.int64)
        # the isolated groups' options as a padded (groups, most options) table of rows (-1: none)
        width = int(self.size[self.isolated].max()) if len(self.isolated) else 0
        self._iso_rows = self.off[self.isolated][:, None] + np.arange(width)[None, :]
        self._iso_rows[np.arange(width)[None, :] >= self.size[self.isolated][:, None]] = -1
        self.ok, self.order, self.scope = self._plan(adj, max_table)
        if not self.ok:
            return
        pos = {v: i for i, v in enumerate(self.order)}
        self.children: dict[int, list[int]] = {v: [] for v in self.order}
        self.roots: list[int] = []
        for v in self.order:
            sep = self.scope[v][1:]
            (self.children[sep[0]].append(v) if sep else self.roots.append(v))
        # each product table goes to the bucket of its first-eliminated group, axes in that bucket's order
        self.bucket_factors: dict[int, list[tuple[dict[str, np.ndarray], tuple[int, ...]]]] = {v: [] for v in self.order}
        for S, per in factors.items():
            v = min(S, key=pos.__getitem__)
            U = self.scope[v]
            perm = sorted(range(len(S)), key=lambda i: pos[S[i]])
            shape = tuple(int(self.size[u]) if u in S else 1 for u in U)
            self.bucket_factors[v].append(({k: np.transpose(t, perm).reshape(shape) for k, t in per.items()}, shape))
        self.leaves = [v for v in self.order if len(self.scope[v]) == 2 and not self.children[v]]
        self.inner = [v for v in self.order if not (len(self.scope[v]) == 2 and not self.children[v])]
        leaf = set(self.leaves)
        for p in self.order:
            self.children[p] = [ch for ch in self.children[p] if ch not in leaf]
        self._leaf_arrays()
        # a child's message (over its scope less itself) broadcast into its parent's bucket
        self._msg_shape = {ch: tuple(int(self.size[u]) if u in self.scope[ch][1:] else 1 for u in self.scope[p])
                           for p in self.inner for ch in self.children[p]}
        self._tables: dict[int, np.ndarray] = {}
        self._msgs: dict[int, np.ndarray] = {}
        self._steps = [(v, int(self.off[v]), int(self.off[v + 1]), (-1,) + (1,) * (len(self.scope[v]) - 1),
                        tuple(int(self.size[u]) for u in self.scope[v]), [per for per, _ in self.bucket_factors[v]],
                        [(ch, self._msg_shape[ch]) for ch in self.children[v]]) for v in self.inner]

    def _leaf_arrays(self) -> None:
        """Every leaf ``v`` (parent ``p``) as ``size[p]`` segments of ``size[v]`` elements (one per
        pair of options, ``p``'s outer): the unary row of ``v`` and the product table per kind."""
        u, seg_row, vrow, starts = [], [], [], []
        tabs: dict[str, list[np.ndarray]] = {k: [] for k in self.problem.budgets}
        n = 0
        for v in self.leaves:
            p = self.scope[v][1]
            cv, cp = int(self.size[v]), int(self.size[p])
            rows_v = np.arange(self.off[v], self.off[v + 1])
            u.append(np.tile(rows_v, cp))
            vrow.append(rows_v)
            seg_row.append(np.arange(self.off[p], self.off[p + 1]))
            starts.append(n + cv * np.arange(cp))
            n += cv * cp
            for k in tabs:
                t = sum((per[k] for per, _ in self.bucket_factors[v] if k in per), np.zeros((cv, cp)))
                tabs[k].append(np.broadcast_to(t, (cv, cp)).T.reshape(-1))
        cat = (lambda a, dt=np.int64: np.concatenate(a).astype(dt) if a else np.zeros(0, dt))
        self._lu, self._lseg, self._lsegrow = cat(u), cat(starts), cat(seg_row)
        self._lvrow = cat(vrow)
        self._ltab = {k: cat(t, np.float64) for k, t in tabs.items()}
        sizes = np.array([int(self.size[v]) for v in self.leaves], dtype=np.int64)
        psizes = np.array([int(self.size[self.scope[v][1]]) for v in self.leaves], dtype=np.int64)
        self._lfirst = np.r_[0, np.cumsum(psizes)[:-1]].astype(np.int64)  # each leaf's first segment
        self._lelem_seg = np.repeat(np.arange(len(self._lseg)), np.repeat(sizes, psizes))
        self._lv = np.array(self.leaves, dtype=np.int64)
        self._lp = np.array([self.scope[v][1] for v in self.leaves], dtype=np.int64)
        self._lsize = sizes

    def _plan(self, adj: list[set[int]], max_table: int) -> tuple[bool, list[int], dict[int, list[int]]]:
        """Min-degree elimination order (ties: the smaller table) and each bucket's scope, its own
        group first and then its neighbours in elimination order."""
        adj = [set(a) for a in adj]
        live = [g for g in range(self.G) if adj[g]]
        heap = [(len(adj[g]), int(self.size[g]), g) for g in live]
        heapq.heapify(heap)
        done: set[int] = set()
        order, nbrs = [], {}
        while heap:
            d, _, v = heapq.heappop(heap)
            if v in done or d != len(adj[v]):
                continue
            if int(np.prod([self.size[u] for u in adj[v]], dtype=np.float64)) * int(self.size[v]) > max_table:
                return False, [], {}
            order.append(v)
            done.add(v)
            nbrs[v] = set(adj[v])
            for u in adj[v]:
                adj[u].discard(v)
                adj[u].update(x for x in adj[v] if x != u)
            for u in adj[v]:
                heapq.heappush(heap, (len(adj[u]), int(self.size[u]), u))
        pos = {v: i for i, v in enumerate(order)}
        return True, order, {v: [v] + sorted(nbrs[v], key=pos.__getitem__) for v in order}

    def _unary(self, lam: dict[str, float]) -> np.ndarray:
        u = self.problem.choices.damage.astype(np.float64).copy()
        for k, lk in lam.items():
            if lk:
                u += lk * self.problem.budgets[k].lin
        return u

    def evaluate(self, lam: dict[str, float]) -> tuple[float, np.ndarray]:
        """``min_x damage(x) + sum_k lam_k cost_k(x)`` (the caller subtracts ``lam . target``) and a
        minimiser ``x`` ((G,) option rows; ties: the first option)."""
        unary = self._unary(lam)
        choice = np.zeros(self.G, dtype=np.int64)
        total = sum(lk * self.problem.budgets[k].const for k, lk in lam.items())
        if len(self.isolated):
            vals = np.where(self._iso_rows >= 0, unary[self._iso_rows], np.inf)
            j = np.argmin(vals, axis=1)
            choice[self.isolated] = self._iso_rows[np.arange(len(j)), j]
            total += float(vals[np.arange(len(j)), j].sum())
        n = len(unary)
        self._lT = unary[self._lu] + sum((lk * self._ltab[k] for k, lk in lam.items() if lk), np.zeros(len(self._lu)))
        self._lmin = np.minimum.reduceat(self._lT, self._lseg) if len(self._lseg) else np.zeros(0)
        into = np.bincount(self._lsegrow, weights=self._lmin, minlength=n)  # leaf messages, on the parents' rows
        base = unary + into
        lams = [(k, lk) for k, lk in lam.items() if lk]
        for v, lo, hi, ushape, full, facs, kids in self._steps:
            T = base[lo:hi].reshape(ushape)
            for per in facs:
                for k, lk in lams:
                    if k in per:
                        T = T + lk * per[k]
            for ch, shape in kids:
                T = T + self._msgs[ch].reshape(shape)
            if T.shape != full:
                T = np.broadcast_to(T, full)
            self._tables[v] = T
            self._msgs[v] = T.min(axis=0)
        total += float(sum(self._msgs[r] for r in self.roots))
        for v in reversed(self.inner):
            idx = tuple(int(choice[u]) - int(self.off[u]) for u in self.scope[v][1:])
            choice[v] = self.off[v] + int(np.argmin(self._tables[v][(slice(None),) + idx]))
        if len(self.leaves):  # each leaf's best option given its parent's choice
            seg = self._lfirst + choice[self._lp] - self.off[self._lp]
            width = int(self._lsize.max())
            idx = self._lseg[seg][:, None] + np.arange(width)[None, :]
            valid = np.arange(width)[None, :] < self._lsize[:, None]
            vals = np.where(valid, self._lT[np.where(valid, idx, 0)], np.inf)
            choice[self._lv] = self.off[self._lv] + np.argmin(vals, axis=1)
        return float(total), choice

    def min_marginals(self, lam: dict[str, float]) -> np.ndarray:
        """Per option (n,), the least Lagrangian value (as :meth:`evaluate`'s) with that option forced."""
        total, _ = self.evaluate(lam)
        unary = self._unary(lam)
        owner = self.problem.choices.owner
        out = np.full(len(unary), np.inf)
        iso = np.isin(owner, self.isolated)
        if iso.any():
            gmin = np.full(self.G, np.inf)
            np.minimum.at(gmin, owner[iso], unary[iso])
            out[iso] = total + unary[iso] - gmin[owner[iso]]
        raw = np.zeros(len(unary))  # inner buckets: least value of the component with the option forced
        down: dict[int, np.ndarray] = {r: np.zeros(()) for r in self.roots}
        for v in reversed(self.inner):
            U = self.scope[v]
            full = self._tables[v] + down[v].reshape((1,) + down[v].shape)
            mm = full.min(axis=tuple(range(1, len(U)))) if len(U) > 1 else full
            raw[self.off[v]:self.off[v + 1]] = mm
            out[self.off[v]:self.off[v + 1]] = total + mm - mm.min()
            for ch in self.children[v]:
                d = full - self._msgs[ch].reshape(self._msg_shape[ch])
                S = self.scope[ch][1:]
                drop = tuple(i for i, u in enumerate(U) if u not in S)
                down[ch] = d.min(axis=drop) if drop else d
        if len(self.leaves):  # a leaf's message comes back as its parent's least value less the message
            down_seg = raw[self._lsegrow] - self._lmin
            leaf_mm = np.full(len(unary), np.inf)
            np.minimum.at(leaf_mm, self._lu, self._lT + down_seg[self._lelem_seg])  # element -> its leaf option's row
            rows = self._lvrow
            lo = np.minimum.reduceat(leaf_mm[rows], np.r_[0, np.cumsum(self._lsize)[:-1]])
            out[rows] = total + leaf_mm[rows] - np.repeat(lo, self._lsize)
        return out
