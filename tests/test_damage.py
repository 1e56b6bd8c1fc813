"""``sensitivity.damage=kl``: the KL divergence from the dense model's predictions as a cell's damage
(hpcprune.metrics.kl_sums). It is the KL divergence (exactly, when the top k cover every class; a
lower bound otherwise); the cells measure the Torch-Pruning-pruned model's; the allocation
stage allocates on it."""
import copy

import h5py
import numpy as np
import pytest
import torch
from conftest import sweep_in_process
from torch.nn import functional as F

from hpcprune import importance, metrics
from hpcprune.allocate import units_cut
from hpcprune.graph import Graph, GroupInfo, keep_count
from hpcprune.sensitivity import DONE, Evaluator, run_sensitivity
from hpcprune.world import World
from hpcprune.zoo.models import MLP


def _kl(p_logits, q_logits):
    return float(F.kl_div(torch.log_softmax(q_logits, -1), torch.log_softmax(p_logits, -1), log_target=True, reduction="sum"))


@pytest.mark.parametrize("shape", [(6, 10), (2, 5, 50)])
def test_kl_sums_is_the_kl_divergence_from_the_dense_model(shape):
    torch.manual_seed(0)
    dense = torch.randn(*shape) * 2
    other = dense + torch.randn(*shape)
    y = torch.randint(0, shape[-1], shape[:-1])
    full = metrics.reference_targets(dense, y, 1000)
    assert full.shape == (*shape[:-1], 2 + 2 * shape[-1]) and full.dtype == torch.float64
    assert metrics.kl_sums(dense, full).kl == pytest.approx(0.0, abs=1e-5)
    got = metrics.kl_sums(other, full)
    assert got.kl == pytest.approx(_kl(dense, other), rel=1e-5)
    assert got.as_tuple()[:3] == pytest.approx(metrics.batch_sums(other, y).as_tuple()[:3], rel=1e-6)  # as without
    # the top 4 and the rest: the KL of the coarsened distributions, below the full one, above 0
    top4 = metrics.kl_sums(other, metrics.reference_targets(dense, y, 4)).kl
    assert 0.0 < top4 < got.kl
    lp, lq = torch.log_softmax(dense, -1), torch.log_softmax(other, -1)
    idx = lp.topk(4, -1).indices
    rest = torch.ones_like(lp, dtype=torch.bool).scatter(-1, idx, False)
    coarse_p = torch.cat([lp.gather(-1, idx), lp.masked_fill(~rest, -torch.inf).logsumexp(-1, keepdim=True)], -1)
    coarse_q = torch.cat([lq.gather(-1, idx), lq.masked_fill(~rest, -torch.inf).logsumexp(-1, keepdim=True)], -1)
    want = float((coarse_p.exp() * (coarse_p - coarse_q)).sum())
    assert top4 == pytest.approx(want, rel=1e-5)
    # sums over shares of the samples add up (teams re-batch samples; the packed targets go along)
    halves = [metrics.kl_sums(o, t) for o, t in zip(other.split(1), full.split(1))]
    assert sum(h.kl for h in halves) == pytest.approx(got.kl, rel=1e-6)


@pytest.mark.parametrize("cache_prefix", [True, False])
def test_kl_cells_equal_the_pruned_copies_divergence(cache_prefix):
    """Each cell's KL equals the KL of a deepcopy pruned by Torch-Pruning from the dense model's
    predictions, its loss the plain cell's; the model is left as it was."""
    torch.manual_seed(0)
    model = MLP(64, 10, (32, 16)).eval()
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    batches = [(x[:40], y[:40]), (x[40:], y[40:])]
    graph = Graph(model, x[:1], ["5"])
    orders = {n: importance.prune_order(s) for n, s in importance.group_scores(graph, "l2").items()}
    ratios = [0.25, 0.5, 0.75]
    G = len(graph.groups)
    cells = {}
    for damage in ("loss", "kl"):
        ev = Evaluator(model, graph.groups, orders, ratios, batches, x[:1], ["5"], cache_prefix=cache_prefix, damage=damage)
        assert ev.dense_sums().kl == pytest.approx(0.0, abs=1e-5)
        cells[damage] = {(c.group, c.ratio): c.sums for c in run_sensitivity(World(None), ev, np.ones((G, 3), bool), None)
                         if c.status == DONE}
        ev.close()
    assert len(cells["kl"]) == G * 3
    with torch.no_grad():
        dense_out = [model(b) for b, _ in batches]
    for (gi, ri), sums in cells["kl"].items():
        g = graph.groups[gi]
        pruned = copy.deepcopy(model)
        Graph(pruned, x[:1], ["5"]).prune_group(g.name, orders[g.name][: g.size - keep_count(g.size, ratios[ri])])
        with torch.no_grad():
            want = sum(_kl(d, pruned(b)) for d, (b, _) in zip(dense_out, batches))
        assert sums[3] == pytest.approx(want, rel=1e-4, abs=1e-6), (g.name, ratios[ri])
        np.testing.assert_allclose(sums[:3], cells["loss"][(gi, ri)][:3], rtol=1e-6)
        assert cells["loss"][(gi, ri)][3] == 0.0


@pytest.mark.slow
def test_sweep_allocates_on_the_kl_divergence(tmp_path):
    """model=llama_tiny with sensitivity.damage=kl: ``/sensitivity/kl`` holds each cell's mean KL
    (>= 0; the loss is recorded as before) and the allocation's predicted damage is the sum of the
    interpolated KL curves at its ratios, not of the loss curves."""
    pytest.importorskip("transformers")
    run = tmp_path / "run"
    ratios = [0.3, 0.6]
    assert sweep_in_process(run, "threads=1", "launcher=debug", "model=llama_tiny", "data=text", "baseline.epochs=0",
                            "finetune.epochs=0", f"sensitivity.ratios=[{ratios[0]},{ratios[1]}]", "baseline.latency_repeats=1",
                            "prune.round_to=1", "groups.kinds=[neurons,heads]", "sensitivity.damage=kl",
                            "sensitivity.kl_topk=16", "prune.target.macs=null", "prune.target.params=0.85") == 0
    with h5py.File(run / "run.h5", "r") as f:
        s = f["sensitivity"]
        assert s.attrs["damage"] == "kl" and s.attrs["kl_topk"] == 16 and s.attrs["complete"]
        kl, loss, status = s["kl"][()], s["loss"][()], s["status"][()]
        ref = float(s.attrs["dense_calib_loss"])
        a = f["allocation"]
        alloc, predicted = a["ratio"][()], float(a.attrs["predicted_loss_increase"])
        groups = [GroupInfo(str(n), str(k), int(z), [], True) for n, k, z in
                  zip(f["groups/name"].asstr()[()], f["groups/kind"].asstr()[()], f["groups/size"][()])]
        assert f.attrs["status"] == "complete" and f["final"].attrs["params_kept"] <= 0.85 + 1e-9
    done = status == DONE
    assert done.all() and np.isfinite(kl).all() and (kl > -1e-6).all() and np.isfinite(loss).all()
    grid = [0.0] + ratios

    def on(curves):  # linear in the units each ratio cuts (a head group of llama_tiny: 2 units)
        return sum(float(np.interp(units_cut(g, r), [units_cut(g, x) for x in grid], [0.0, *row]))
                   for g, r, row in zip(groups, alloc, curves))

    assert predicted == pytest.approx(on(kl), rel=1e-6, abs=1e-9)
    assert predicted != pytest.approx(on(loss - ref), rel=1e-3)


def test_stale_batchnorm_statistics_are_measured_and_restored(caplog):
    """damage=kl with BatchNorm re-estimation: the KL of the dense model with re-estimated
    statistics is measured (a warning names it when stale) and the stored statistics are put back."""
    from hpcprune.stages.sensitivity import STALE_BN_KL, _check_stale_bn
    from hpcprune.zoo.models import resnet

    torch.manual_seed(0)
    model = resnet(1, 10, (8, 16), (1, 1)).eval()
    for m in model.modules():  # statistics far from what the data gives: stale
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    graph = Graph(model, x[:1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = Evaluator(model, graph.groups, {}, [0.5], [(x, y)], x[:1], damage="kl", recal_batches=[(x[16:], y[16:])])
    with caplog.at_level("WARNING", logger="hpcprune.stages"):
        kl = _check_stale_bn(ev, 1)
    assert kl > STALE_BN_KL and "stale statistics" in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ev.dense_sums().mean_kl() == pytest.approx(0.0, abs=1e-6)
    ev.close()
    no_recal = Evaluator(model, graph.groups, {}, [0.5], [(x, y)], x[:1], damage="kl")
    assert _check_stale_bn(no_recal, 0) == 0.0


def test_a_dense_prediction_is_scored_per_pixel_with_its_class_axis_first():
    """Segmentation logits (N, K, H, W) against labels (N, H, W): loss, pixel accuracy and the KL
    damage over the class axis 1, one count per pixel, equal to the same logits laid out (N*H*W, K)."""
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    flat, flat_labels = logits.permute(0, 2, 3, 1).reshape(-1, 3), labels.reshape(-1)
    s, ref = metrics.batch_sums(logits, labels), metrics.batch_sums(flat, flat_labels)
    assert (s.count, s.correct) == (40, ref.correct) and s.loss == pytest.approx(ref.loss, rel=1e-6)
    packed = metrics.reference_targets(logits, labels, topk=2)
    assert packed.shape == (2, 4, 5, 2 + 2 * 2)
    k = metrics.kl_sums(logits, packed)
    assert k.count == 40 and k.correct == s.correct and abs(k.kl) < 1e-9
