"""The exact sensitivity allocation (hpcprune.mckp): the brute-force optimum on small random
problems (separable, with products of groups, blocks, several budgets, latency), the budget used to
within one candidate step on real cost models, one-line errors and the greedy fallback. In-process."""
import itertools
import logging

import numpy as np
import pytest
import torch

from hpcprune import allocate, mckp
from hpcprune.costs import ExactCost, probes_from_graph
from hpcprune.graph import Graph, GroupInfo
from hpcprune.runs import ignore_names
from hpcprune.zoo.models import resnet

import archs

GRID = [0.25, 0.5, 0.75, 0.9]


def _cost_model(rng, widths, blocks=0, cross=0, latency=False):
    """A CostModel over ``widths`` channel groups and ``blocks`` block groups: one term per group,
    ``cross`` products of two channel groups (a convolution between them), each block multiplying
    one such product (a layer inside it). Positive coefficients, as counted MACs and parameters."""
    groups = [GroupInfo(f"c{i}", "channels", int(w), [], True) for i, w in enumerate(widths)]
    groups += [GroupInfo(f"b{i}", "block", 1, [], False, block=f"blocks.{i}") for i in range(blocks)]
    G, W = len(groups), len(widths)
    terms = {}
    for kind in ("macs", "params"):
        rows = [np.eye(G, dtype=np.int64)[g] for g in range(G)]
        for _ in range(cross):
            e = np.zeros(G, dtype=np.int64)
            e[rng.choice(W, 2, replace=False)] = 1
            rows.append(e)
        for b in range(blocks):
            e = np.zeros(G, dtype=np.int64)
            e[rng.choice(W, 2, replace=False)] = 1
            e[W + b] = 1
            rows.append(e)
        rows.append(np.zeros(G, dtype=np.int64))  # what no group touches (the stem, the head)
        terms[kind] = (rng.uniform(0.2, 2.0, len(rows)), np.array(rows))
    cm = allocate.CostModel(groups, terms)
    if latency:
        table = 100.0 - rng.uniform(0, 12, (G, len(GRID))).cumsum(axis=1)
        cm.set_latency_table(GRID, table, 100.0)
    return cm


def _damage(rng, G, plateaus=True):
    """Increasing measured curves (G, R); some start flat at 0 (pruning helped: clipped), some
    groups stopped early (NaN from some ratio on)."""
    d = rng.lognormal(-1, 1, (G, 1)) * np.array(GRID)[None, :] ** rng.uniform(0.7, 2.5, (G, 1))
    if plateaus:
        d[rng.random(G) < 0.3, 0] = -0.01
        stop = rng.random(G) < 0.2
        d[stop, 3:] = np.nan
    return d


def _brute_force(cm, damage, targets, max_ratio, round_to=1):
    """The least summed damage over every choice of candidate ratios (step 1.0: the grid and 0)."""
    cand = np.unique(np.r_[0.0, [r for r in GRID if r <= max_ratio + 1e-9]])
    curves = allocate._curves(cm, np.array(GRID), damage, cand, round_to)
    best = np.inf
    for combo in itertools.product(range(len(cand)), repeat=len(cm.groups)):
        loss = curves[np.arange(len(combo)), combo].sum()
        if loss < best and allocate._meets(cm, cand[list(combo)], targets, round_to):
            best = loss
    return best


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", ["separable", "products", "blocks", "macs+params+latency", "round_to=4"])
def test_exact_equals_brute_force(seed, case):
    rng = np.random.default_rng(seed)
    round_to = 4 if case == "round_to=4" else 1
    widths = rng.integers(4, 17, 5 if case != "blocks" else 4)
    cm = _cost_model(rng, widths, blocks=int(case == "blocks"), cross={"separable": 0}.get(case, 4),
                     latency=case.endswith("latency"))
    targets = {"macs": float(rng.uniform(0.3, 0.7))}
    if case.endswith("latency"):
        targets.update(params=float(rng.uniform(0.4, 0.8)), latency=0.8)
    damage = _damage(rng, len(cm.groups))
    best = _brute_force(cm, damage, targets, 0.9, round_to)
    alloc = allocate.sensitivity(cm, GRID, damage, targets, 0.9, round_to, step=1.0)
    assert alloc.predicted_loss == pytest.approx(best, rel=1e-6, abs=1e-12)
    assert all(allocate._meets(cm, alloc.ratios, {k: t}, round_to) for k, t in targets.items())
    greedy = allocate.sensitivity_greedy(cm, GRID, damage, targets, 0.9, round_to, step=1.0)
    assert alloc.predicted_loss <= greedy.predicted_loss + 1e-12


def test_branch_on_a_hub_equals_brute_force(monkeypatch):
    """A residual stream (group 0) in a product with every other group: the search branches on its
    options (hub degree lowered to reach this small case) and still finds the optimum."""
    monkeypatch.setattr(mckp, "HUB_DEGREE", 2)
    depths = []
    node = mckp._Search.node
    monkeypatch.setattr(mckp._Search, "node", lambda self, p, rows, elim=None, depth=0:
                        depths.append(depth) or node(self, p, rows, elim, depth))
    rng = np.random.default_rng(6)
    groups = [GroupInfo(f"c{i}", "channels", 8, [], True) for i in range(6)]
    eye = np.eye(6, dtype=np.int64)
    exps = np.array([eye[0] + eye[g] for g in range(1, 6)] + list(eye))
    cm = allocate.CostModel(groups, {"macs": (np.r_[rng.uniform(2, 4, 5), rng.uniform(0.1, 0.5, 6)], exps),
                                     "params": (np.ones(6), eye)})
    damage = _damage(rng, 6, plateaus=False)
    damage[0] *= 0.5
    for target in (0.6, 0.35):
        best = _brute_force(cm, damage, {"macs": target}, 0.75)
        alloc = allocate.sensitivity(cm, GRID, damage, {"macs": target}, 0.75, step=1.0)
        assert alloc.predicted_loss == pytest.approx(best, rel=1e-6) and alloc.predicted["macs"] <= target
    assert max(depths) >= 1  # it did branch


def test_without_a_lagrangian_bound_the_node_goes_to_the_milp_whole(monkeypatch):
    """Where the elimination's tables are too large (DenseNet's concatenations; here a table limit of
    1) there are no min-marginals to fix options with: branching on a hub would solve every child in
    full (DenseNet-201: no answer in 60 s), so the node is one MILP (1.5 s there), still optimal."""
    monkeypatch.setattr(mckp, "HUB_DEGREE", 2)  # group 0 is a hub of the star structure
    depths = []
    node = mckp._Search.node
    monkeypatch.setattr(mckp._Search, "node", lambda self, p, rows, elim=None, depth=0:
                        depths.append(depth) or node(self, p, rows, elim, depth))
    rng = np.random.default_rng(3)
    for _ in range(4):
        problem = _random_problem(rng, G=6, structure="star")
        targets = {"macs": float(rng.uniform(0.3, 0.8))}
        feasible = [x for x in _all_choices(problem) if problem.costs(x)["macs"] <= targets["macs"]]
        if not feasible:
            continue
        res = mckp.solve(problem, targets, max_table=1)
        assert res.status == "optimal"
        assert res.damage == pytest.approx(min(problem.choices.damage[x].sum() for x in feasible), abs=1e-9)
        assert mckp._hub(problem) is not None and max(depths) == 0  # a hub, yet no branch
        with_bound = mckp.solve(problem, targets)  # with the bound it may branch, and finds the same optimum
        assert with_bound.damage == pytest.approx(res.damage, abs=1e-9)


def _real(name):
    torch.manual_seed(0)
    if name == "resnet":
        model, x = resnet(1, 10, (8, 16, 32), (1, 2, 1)), torch.randn(2, 1, 8, 8)
    else:
        model, x = getattr(archs, name)().eval(), torch.randn(2, 1, 8, 8)
    graph = Graph(model.eval(), x, ignore_names(model, []))
    return allocate.CostModel.from_exact(graph.groups, ExactCost.derive(model, x[:1], probes_from_graph(graph)))


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "inception_concat"])
def test_lands_within_one_step_of_the_target(name):
    """Residual streams, depthwise convolutions, concatenations: for 0.5 and 0.33 of the MACs at
    once (one build), the allocation meets each target, and moving any pruned group back by one
    candidate ratio (less damage: the curves increase) would miss it. No more damage than the greedy."""
    cm = _real(name)
    G = len(cm.groups)
    rng = np.random.default_rng(1)
    grid = [0.1 * i for i in range(1, 10)]
    damage = rng.lognormal(0, 1, (G, 1)) * np.array(grid)[None, :] ** rng.uniform(1, 3, (G, 1))
    targets = [{"macs": 0.5}, {"macs": 0.33}]
    allocs = mckp.sensitivity_many(cm, grid, damage, targets, 0.9)
    cand = np.unique(np.r_[np.arange(0, 0.9 + 1e-9, 0.025), grid])
    for tg, alloc in zip(targets, allocs):
        assert alloc.predicted["macs"] <= tg["macs"]
        for g in np.flatnonzero(alloc.ratios > 0):
            back = alloc.ratios.copy()
            back[g] = cand[np.searchsorted(cand, alloc.ratios[g] - 1e-12) - 1]
            assert cm.fraction("macs", back) > tg["macs"], (cm.groups[g].name, alloc.ratios)
        assert alloc.predicted_loss <= allocate.sensitivity_greedy(cm, grid, damage, tg, 0.9).predicted_loss + 1e-12


def test_unreachable_targets_are_one_line_budget_errors():
    rng = np.random.default_rng(3)
    cm = _cost_model(rng, rng.integers(4, 17, 5), cross=3)
    damage = _damage(rng, 5, plateaus=False)
    with pytest.raises(allocate.BudgetError) as e:
        allocate.sensitivity(cm, GRID, damage, {"macs": 0.01}, 0.5)
    assert "\n" not in str(e.value) and "prune.target.macs=0.01" in str(e.value) and "prune.max_ratio=0.5" in str(e.value)
    damage[:, 1:] = np.nan  # every curve ends at 0.25: 0.5 of the MACs is out of reach
    with pytest.raises(allocate.BudgetError) as e:
        allocate.sensitivity(cm, GRID, damage, {"macs": 0.5}, 0.9)
    assert "\n" not in str(e.value) and "cannot reach the targets {'macs': 0.5}" in str(e.value)


def test_stopped_search_falls_back_with_a_warning(caplog):
    """No time for the search: a warning says so, and the allocation (the greedy's, or the
    search's incumbent when it has less damage) still meets the target."""
    rng = np.random.default_rng(0)
    cm = _cost_model(rng, rng.integers(8, 65, 40), cross=60)
    damage = _damage(rng, 40, plateaus=False)
    with caplog.at_level(logging.WARNING, logger="hpcprune.mckp"):
        alloc = allocate.sensitivity(cm, GRID, damage, {"macs": 0.45}, 0.9, time_limit_s=0.0)
    assert "the exact allocation stopped early (time limit" in caplog.text
    assert alloc.predicted["macs"] <= 0.45


def _random_problem(rng, G=5, structure="mixed"):
    """A mckp.Problem: 2-4 options per group (kept fractions falling, damage rising), MACs and
    parameters with products of two and three groups and squares, as the cost models have."""
    sizes = rng.integers(2, 5, G)
    offsets = np.r_[0, np.cumsum(sizes)]
    keep = np.concatenate([np.r_[1.0, np.sort(rng.uniform(0.1, 1, s - 1))[::-1]] for s in sizes])
    damage = np.concatenate([np.r_[0.0, np.sort(rng.uniform(0, 1, s - 1))] for s in sizes])
    choices = mckp.Choices(offsets, keep, damage)
    eye = np.eye(G, dtype=np.int64)
    rows = list(eye) + [2 * eye[1]]  # a residual stream: a square
    if structure in ("star", "mixed"):
        rows += [eye[0] + eye[g] for g in range(1, G)]
    if structure in ("cycle", "mixed"):
        rows += [eye[g] + eye[(g + 1) % G] for g in range(G)] + [eye[0] + eye[2] + eye[4]]
    exps = np.array(rows)
    budgets = {k: mckp.split_poly(choices, rng.uniform(0.1, 1, len(exps)) / len(exps), exps) for k in ("macs", "params")}
    return mckp.Problem(choices, budgets)


def _all_choices(problem):
    off = problem.choices.offsets
    return [np.array(c) for c in itertools.product(*[range(off[g], off[g + 1]) for g in range(problem.G)])]


@pytest.mark.parametrize("structure", ["star", "cycle", "mixed"])
def test_lagrangian_minimum_and_min_marginals_are_exact(structure):
    """Variable elimination: the Lagrangian's minimum, a minimiser, and every option's
    min-marginal equal enumeration over all choices."""
    from hpcprune.mckp_elim import Elimination

    rng = np.random.default_rng(len(structure))
    for _ in range(4):
        problem = _random_problem(rng, 6, structure)
        problem.choices.damage[problem.choices.offsets[0]:problem.choices.offsets[1]] *= 20  # a hub that resists
        lam = {"macs": float(rng.uniform(0, 20)), "params": float(rng.uniform(0, 20))}
        energy = lambda x: problem.choices.damage[x].sum() + sum(lam[k] * v for k, v in problem.costs(x).items())  # noqa: E731
        every = _all_choices(problem)
        values = np.array([energy(x) for x in every])
        marg = np.full(len(problem.choices.keep), np.inf)
        for x, v in zip(every, values):
            marg[x] = np.minimum(marg[x], v)
        elim = Elimination(problem)
        value, x = elim.evaluate(lam)
        assert value == pytest.approx(values.min(), abs=1e-9) and energy(x) == pytest.approx(values.min(), abs=1e-9)
        np.testing.assert_allclose(elim.min_marginals(lam), marg, atol=1e-9)


def test_milp_linearisation_is_exact():
    """The residual MILP alone (products of two and three groups, squares, two budgets), and the
    whole search with and without the Lagrangian step (a table limit of 1 skips it): the optimum
    over every choice."""
    from hpcprune.mckp_milp import KnapsackMILP

    rng = np.random.default_rng(11)
    for _ in range(6):
        problem = _random_problem(rng)
        targets = {"macs": float(rng.uniform(0.3, 0.8)), "params": float(rng.uniform(0.4, 0.9))}
        feasible = [x for x in _all_choices(problem) if all(v <= targets[k] for k, v in problem.costs(x).items())]
        results = [KnapsackMILP(problem).solve(targets), mckp.solve(problem, targets), mckp.solve(problem, targets, max_table=1)]
        if not feasible:
            assert [r.status for r in results] == ["infeasible"] * 3
            continue
        best = min(problem.choices.damage[x].sum() for x in feasible)
        for res in results:
            assert res.status == "optimal" and res.damage == pytest.approx(best, abs=1e-9)
            assert all(v <= targets[k] + 1e-6 for k, v in problem.costs(res.choice).items())


def test_a_damage_plateau_still_uses_the_budget():
    """Damage 0 up to ratio 0.5 in every group (many optima): the allocation does not stop short of
    the target: moving any pruned group back by one candidate (no more damage) would miss it."""
    rng = np.random.default_rng(2)
    cm = _cost_model(rng, rng.integers(8, 33, 8), cross=6)
    damage = np.array([[0.0, 0.0, 1.0, 3.0]]) * rng.uniform(0.5, 2, (8, 1))
    alloc = allocate.sensitivity(cm, GRID, damage, {"macs": 0.7}, 0.9)
    cand = np.unique(np.r_[np.arange(0, 0.9 + 1e-9, 0.025), GRID])
    assert alloc.predicted["macs"] <= 0.7 and alloc.predicted_loss == 0.0
    for g in np.flatnonzero(alloc.ratios > 0):
        back = alloc.ratios.copy()
        back[g] = cand[np.searchsorted(cand, alloc.ratios[g] - 1e-12) - 1]
        assert cm.fraction("macs", back) > 0.7


def test_curves_are_linear_in_the_units_a_ratio_cuts():
    """A group of 3 heads cuts nothing at 0.15 and 0.3 and one head from 0.35 to 0.6: its predicted damage
    and latency there are the one-head cell's (a line in ratio from (0.3, 0) to (0.45, d) priced the
    one-head cut at 0.35 at d / 3 while saving its whole cost, so heads were cut for almost nothing); a
    wide group stays a line through its cells, in the channels each ratio really cuts."""
    groups = [GroupInfo("h", "heads", 3, [], True), GroupInfo("c", "channels", 100, [], True)]
    terms = {k: (np.ones(3), np.array([[1, 0], [0, 1], [0, 0]])) for k in ("macs", "params")}
    cm = allocate.CostModel(groups, terms)
    grid = np.array([0.15, 0.3, 0.45, 0.6])
    damage = np.array([[0.0, 0.0, 0.3, 0.3], [0.1, 0.2, 0.3, 0.4]])
    cand = np.array([0.0, 0.1, 0.3, 0.35, 0.5, 0.6, 0.65, 0.075])
    curves = allocate._curves(cm, grid, damage, cand)
    np.testing.assert_allclose(curves[0, :7], [0, 0, 0, 0.3, 0.3, 0.3, np.inf])
    assert curves[1, 7] == pytest.approx(0.1 * 7 / 15)  # 0.075 of 100 keeps ceil(92.5) = 93: 7 channels cut
    cm.set_latency_table(grid, np.array([[100.0, 100.0, 90.0, 90.0], [97.0, 94.0, 91.0, 88.0]]), 100.0)
    assert cm.latency_delta(0, 0.35) == pytest.approx(-10.0) and cm.latency_delta(0, 0.3) == pytest.approx(0.0)
    assert cm.latency_delta(1, 0.2) == pytest.approx(-4.0)
    # a ninth of the params to remove: one head (damage 0.3) or, on the 0.025 steps, 35 channels (0.2 + 5/15 * 0.1)
    a = allocate.sensitivity(cm, grid, damage, {"params": 1 - 1 / 9}, 0.9)
    assert a.ratios[0] == 0.0 and a.ratios[1] == pytest.approx(0.35) and a.predicted_loss == pytest.approx(0.2 + 0.1 * 5 / 15)
