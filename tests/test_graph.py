"""Groups, masking and physical pruning on small built-in models (in-process, fast)."""
import copy

import numpy as np
import pytest
import torch

from hpcprune import allocate, importance, metrics
from hpcprune.costs import ExactCost, probes_from_graph
from hpcprune.graph import Graph, keep_count, mask_group
from hpcprune.zoo.models import MLP, resnet


def _models():
    torch.manual_seed(0)
    return {
        "resnet": (resnet(1, 10, (8, 16, 32), (1, 2, 1)), torch.randn(4, 1, 8, 8), ["5.fc"]),
        "mlp": (MLP(64, 10, (32, 16)), torch.randn(4, 1, 8, 8), ["5"]),
    }


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("name", ["resnet", "mlp"])
def test_mask_equals_physical_prune(name):
    model, x, ignore = _models()[name]
    _randomize_bn(model)
    model.eval()
    graph = Graph(model, x, ignore)
    assert graph.groups and all(g.maskable for g in graph.groups)
    scores = importance.group_scores(graph, "l2")
    modules = dict(model.named_modules())
    for g in graph.groups:
        for ratio in (0.3, 0.7):
            n = g.size - keep_count(g.size, ratio)
            idxs = importance.prune_order(scores[g.name])[:n]
            with torch.no_grad():
                mask = mask_group(modules, g, idxs)
                masked = model(x).clone()
                mask.restore()
                pruned = copy.deepcopy(model)
                Graph(pruned, x, ignore).prune_group(g.name, idxs)
                out = pruned(x)
            torch.testing.assert_close(out, masked, atol=1e-5, rtol=1e-5)
            assert metrics.params(pruned) < metrics.params(model)
    # masks restore the exact original weights
    fresh = _models()[name][0]
    _ = fresh


def test_classifier_never_pruned_and_names_stable():
    model, x, ignore = _models()["resnet"]
    g1 = [(g.name, g.size, g.kind) for g in Graph(model, x, ignore).groups]
    g2 = [(g.name, g.size, g.kind) for g in Graph(copy.deepcopy(model), x, ignore).groups]
    assert g1 == g2
    for g in Graph(model, x, ignore).groups:
        assert not any(m.module == "5.fc" and m.out for m in g.members)
    assert all(kind == "channels" for _, _, kind in g1)


def test_restore_is_exact():
    model, x, ignore = _models()["resnet"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = Graph(model, x, ignore)
    modules = dict(model.named_modules())
    for g in graph.groups:
        mask_group(modules, g, list(range(0, g.size, 2))).restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("round_to", [1, 4])
def test_cost_model_is_exact(round_to):
    model, x, ignore = _models()["resnet"]
    graph = Graph(model, x, ignore)
    cm = allocate.CostModel.from_exact(graph.groups, ExactCost.derive(model, x[:1], probes_from_graph(graph)))
    rng = np.random.default_rng(0)
    for _ in range(3):
        ratios = rng.uniform(0, 0.8, len(graph.groups))
        pruned = copy.deepcopy(model)
        pg = Graph(pruned, x, ignore)
        for g, r in zip(pg.groups, ratios):
            pg.prune_group(g.name, list(range(g.size - keep_count(g.size, r, round_to))))
        assert cm.cost("macs", ratios, round_to) == pytest.approx(metrics.macs(pruned, x[:1]), rel=1e-9)
        assert cm.cost("params", ratios, round_to) == pytest.approx(metrics.params(pruned), rel=1e-9)
        for g, r in zip(Graph(pruned, x, ignore).groups, ratios):
            assert g.size % round_to == 0 or g.size < round_to


def test_allocators_meet_targets_and_report_unreachable():
    model, x, ignore = _models()["resnet"]
    graph = Graph(model, x, ignore)
    cm = allocate.CostModel.from_exact(graph.groups, ExactCost.derive(model, x[:1], probes_from_graph(graph)))
    scores = importance.group_scores(graph, "l1")
    targets = {"macs": 0.4, "params": 0.5}
    grid = [0.2, 0.4, 0.6, 0.8]
    damage = np.array([[0.01 * (i + 1) * r for r in grid] for i in range(len(graph.groups))])
    for alloc in (
        allocate.uniform(cm, targets, 0.9),
        allocate.global_ranking(cm, scores, targets, 0.9),
        allocate.sensitivity(cm, grid, damage, targets, 0.9),
    ):
        assert alloc.predicted["macs"] <= 0.4 and alloc.predicted["params"] <= 0.5
        assert (alloc.ratios <= 0.9 + 1e-9).all()
    with pytest.raises(allocate.BudgetError, match="best reachable value"):
        allocate.uniform(cm, {"macs": 0.01}, 0.5)


def test_sensitivity_prefers_insensitive_groups():
    model, x, ignore = _models()["resnet"]
    graph = Graph(model, x, ignore)
    cm = allocate.CostModel.from_exact(graph.groups, ExactCost.derive(model, x[:1], probes_from_graph(graph)))
    grid = [0.25, 0.5, 0.75]
    damage = np.ones((len(graph.groups), 3)) * np.array(grid) * 10
    damage[2] = 0.0  # group 2 costs nothing to prune
    alloc = allocate.sensitivity(cm, grid, damage, {"macs": 0.8}, 0.75)
    assert alloc.ratios[2] == max(alloc.ratios)


@pytest.mark.parametrize("permanent", [False, True])
def test_slice_cuts_a_tied_parameter_once(permanent):
    """An embedding tied to the output head (one Parameter, two members of the width group) is cut
    once; after a permanent cut both layers still share one (new) Parameter."""
    from hpcprune.graph import GroupInfo, Member, slice_group

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 10, bias=False))
    model[2].weight = model[0].weight
    g = GroupInfo("0", "channels", 6, [Member("0", True), Member("1", True), Member("2", False)], False, True)
    x = torch.tensor([[1, 2, 3]])
    keep = [0, 2, 3, 5]
    want = torch.nn.functional.linear(
        torch.nn.functional.layer_norm(model[0].weight[x][..., keep], (4,), model[1].weight[keep], model[1].bias[keep]),
        model[0].weight[:, keep])
    ref = model(x)
    sl = slice_group(dict(model.named_modules()), g, keep, permanent=permanent)
    torch.testing.assert_close(model(x), want)
    assert model[0].weight.shape == (10, 4) and model[2].weight is model[0].weight
    if not permanent:
        sl.restore()
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
    else:
        assert isinstance(model[0].weight, torch.nn.Parameter)
