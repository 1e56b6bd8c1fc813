"""Transformer group kinds on the built-in tiny GPT: attention heads and whole blocks next to
Torch-Pruning's neuron and width groups, in masking, slicing, pruning, costs, scores, sensitivity,
allocation, the sweep over 1 and 2 real MPI ranks, and reload from the run file."""
import copy
import json
import socket

import h5py
import numpy as np
import pytest
import torch

import hpcprune
from hpcprune.costs import ExactCost, probes_from_graph
from hpcprune import allocate, importance, metrics
from hpcprune.graph import Graph, mask_group, n_keep, skip_block, slice_group
from hpcprune.runs import build_data, ignore_names, load_config
from hpcprune.sensitivity import Chunk, Evaluator
from hpcprune.store import RunFile
from hpcprune.structure import Skip
from hpcprune.zoo.gpt import tiny_gpt

from conftest import run_sweep


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = tiny_gpt(vocab=256, context=32, d_model=32, layers=3, heads=4, head_dim=8, mlp_hidden=64).eval()
    with torch.no_grad():  # trained-looking weights: no two heads alike
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    return model, x, ignore_names(model, ["head"])  # the output layer (the groups stage finds it by verification)


def _kinds(graph):
    return {k: [g for g in graph.groups if g.kind == k] for k in ("channels", "neurons", "heads", "block")}


def test_heads_and_blocks_appear(gpt):
    model, x, ignore = gpt
    kinds = _kinds(Graph(model, x[:1], ignore))
    assert [g.name for g in kinds["heads"]] == [f"blocks.{i}.attn:heads" for i in range(3)]
    assert [g.name for g in kinds["block"]] == [f"blocks.{i}:block" for i in range(3)]
    assert all(g.size == 4 and g.maskable and g.sliceable for g in kinds["heads"])
    h = kinds["heads"][0]
    assert [(m.module, m.out, m.unit) for m in h.members] == [
        ("blocks.0.attn.q", True, 8), ("blocks.0.attn.k", True, 8), ("blocks.0.attn.v", True, 8), ("blocks.0.attn.o", False, 8)]
    assert len(kinds["neurons"]) == 3 and len(kinds["channels"]) == 1  # MLP neurons, residual width
    only = Graph(model, x[:1], ignore, kinds=["heads"])
    assert [g.kind for g in only.groups] == ["heads"] * 3
    with pytest.raises(ValueError, match="'layers' is not a group kind"):
        Graph(model, x[:1], ignore, kinds=["layers"])


def test_frozen_parameters_keep_their_groups(gpt):
    """A model loaded for inference (every parameter requires_grad=False) has the same groups."""
    model, x, ignore = gpt
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    want = [(g.name, g.kind, g.size) for g in Graph(model, x[:1], ignore).groups]
    assert [(g.name, g.kind, g.size) for g in Graph(frozen, x[:1], ignore).groups] == want
    assert not any(p.requires_grad for p in frozen.parameters())


def test_head_mask_slice_prune_agree(gpt):
    """Zeroing a head's q/k/v rows and o columns, slicing them out in place, and pruning them for
    real give the same outputs; the pruned attention has fewer heads and restores leave no trace."""
    model, x, ignore = gpt
    graph = Graph(model, x[:1], ignore)
    mods = dict(model.named_modules())
    ref = model(x)
    for g in _kinds(graph)["heads"]:
        drop = [1, 2]
        mk = mask_group(mods, g, drop)
        masked = model(x)
        mk.restore()
        sl = slice_group(mods, g, [0, 3])
        sliced = model(x)
        sl.restore()
        pruned = copy.deepcopy(model)
        Graph(pruned, x[:1], ignore).prune_group(g.name, drop)
        torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pruned(x), masked, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(masked, ref, atol=1e-4)
        layer = int(g.name.split(".")[1])
        assert pruned.blocks[layer].attn.heads == 2 and pruned.blocks[layer].attn.o.in_features == 16
        assert isinstance(pruned.blocks[layer].attn.q.weight, torch.nn.Parameter)
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)


def test_block_skip_equals_removal(gpt):
    model, x, ignore = gpt
    graph = Graph(model, x[:1], ignore)
    ref = model(x)
    for g in _kinds(graph)["block"]:
        assert n_keep(g, 0.4) == 1 and n_keep(g, 0.5) == 0
        sk = skip_block(model, g)
        skipped = model(x)
        sk.restore()
        pruned = copy.deepcopy(model)
        Graph(pruned, x[:1], ignore).prune_group(g.name, [0])
        i = int(g.block.split(".")[1])
        assert isinstance(pruned.blocks[i], Skip) and not list(pruned.blocks[i].parameters())
        torch.testing.assert_close(pruned(x), skipped, atol=0, rtol=0)
        # by hand: the other blocks only
        h = model.tok(x) + model.pos(torch.arange(x.shape[1]))
        for j, b in enumerate(model.blocks):
            h = h if j == i else b(h)
        torch.testing.assert_close(skipped, model.head(model.ln_f(h)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)


def test_costs_are_exact_with_heads_and_blocks(gpt):
    """The cost model's MACs and params match the physically pruned model for mixed plans of
    width, heads and blocks (including heads inside a removed block)."""
    model, x, ignore = gpt
    graph = Graph(model, x[:1], ignore)
    cm = allocate.CostModel.from_exact(graph.groups, ExactCost.derive(model, x[:1], probes_from_graph(graph)))
    dense_macs, dense_params = metrics.macs(model, x[:1]), metrics.params(model)
    rng = np.random.default_rng(0)
    for trial in range(6):
        ratios = rng.choice([0.0, 0.25, 0.5, 0.75], size=len(graph.groups))
        pruned = copy.deepcopy(model)
        plan = {g.name: list(range(g.size - n_keep(g, r), g.size)) for g, r in zip(graph.groups, ratios)}
        Graph(pruned, x[:1], ignore).apply_plan(plan)
        assert pruned(x).shape == (4, 32, 256)
        assert cm.fraction("macs", ratios) == pytest.approx(metrics.macs(pruned, x[:1]) / dense_macs, rel=1e-9)
        assert cm.fraction("params", ratios) == pytest.approx(metrics.params(pruned) / dense_params, rel=1e-9)


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "activation", "random"])
def test_head_scores(gpt, criterion):
    model, x, ignore = gpt
    graph = Graph(model, x[:1], ignore)
    batches = [(x[:2], x[2:]), (x[2:], x[:2])]
    scores = importance.group_scores(graph, criterion, batches)
    assert set(scores) == {g.name for g in graph.groups}
    for g in graph.groups:
        assert scores[g.name].shape == (g.size,) and torch.isfinite(scores[g.name]).all()
    if criterion == "l2":  # by hand for one head: squared norms of its q/k/v rows (+ biases) and o columns
        a = model.blocks[1].attn
        rows = slice(8, 16)
        w = {n: p.detach().double() for n, p in a.named_parameters()}
        want = sum(float((w[f"{n}.weight"][rows] ** 2).sum() + (w[f"{n}.bias"][rows] ** 2).sum()) for n in "qkv")
        want += float((w["o.weight"][:, rows] ** 2).sum())
        assert float(scores["blocks.1.attn:heads"][1]) == pytest.approx(want, rel=1e-12)
    if criterion in ("taylor", "activation"):  # sums over batches: two shares added = all batches at once
        parts = []
        importance.group_scores(graph, criterion, batches[:1], reduce=lambda a: parts.append(a) or a)
        importance.group_scores(graph, criterion, batches[1:], reduce=lambda a: parts.append(a) or a)
        summed = importance.group_scores(graph, criterion, batches[:1], reduce=lambda a: parts[0] + parts[1])
        for g in graph.groups:
            torch.testing.assert_close(summed[g.name], scores[g.name], rtol=1e-9, atol=1e-12)


def test_residual_width_slices_in_place(gpt):
    """The residual width runs through embeddings, LayerNorms and every block's projections: it
    cannot be masked (a LayerNorm sees the zeros), but it is cut in place exactly: slicing gives
    the physically pruned model's output, and restore() leaves no trace. Physical pruning keeps each
    LayerNorm's scale and shift in channel order."""
    model, x, ignore = gpt
    graph = Graph(model, x[:1], ignore)
    mods = dict(model.named_modules())
    ref = model(x)
    (res,) = [g for g in graph.groups if g.name == "tok"]
    kinds = {type(mods[m.module]).__name__ for m in res.members}
    assert {"Embedding", "LayerNorm", "Linear"} <= kinds and not res.maskable and res.sliceable
    # most channels cut: Torch-Pruning 1.6's own LayerNorm pruner would keep these 4 out of order
    keep = [5, 17, 22, 31]
    drop = [i for i in range(res.size) if i not in keep]
    sl = slice_group(mods, res, keep)
    sliced = model(x)
    assert model.tok.weight.shape == (256, 4) and model.ln_f.normalized_shape == (4,)
    sl.restore()
    pruned = copy.deepcopy(model)
    Graph(pruned, x[:1], ignore).prune_group("tok", drop)
    torch.testing.assert_close(pruned.ln_f.weight, model.ln_f.weight[keep], atol=0, rtol=0)
    torch.testing.assert_close(sliced, pruned(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sliced, ref, atol=1e-4)
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
    assert model.tok.embedding_dim == res.size and model.ln_f.normalized_shape == (res.size,)


def test_engine_equals_pruned_copies(gpt):
    """Sensitivity cells of every group kind (in-place slicing, skipping) equal evaluating
    physically pruned copies; a block's cells reuse one evaluation per state."""
    model, x, ignore = gpt
    graph = Graph(model, x[:1], ignore)
    batches = [(x[:2], x[2:]), (x[2:], x[:2])]
    ratios = [0.25, 0.5, 0.75]
    orders = {n: importance.prune_order(s) for n, s in importance.group_scores(graph, "l2").items()}
    ev = Evaluator(model, graph.groups, orders, ratios, batches, x[:1], ignore, cache_prefix=False)
    for gi, g in enumerate(graph.groups):
        cells = ev.run_chunk(Chunk(gi, list(range(len(ratios)))), rank=0)
        for c, r in zip(cells, ratios):
            pruned = copy.deepcopy(model)
            Graph(pruned, x[:1], ignore).prune_group(g.name, orders[g.name][: g.size - n_keep(g, r)])
            want = metrics.evaluate(pruned, batches).as_tuple()
            np.testing.assert_allclose(c.sums, want, rtol=1e-6, atol=1e-6)
        if g.kind == "block":
            assert cells[2].sums == cells[1].sums and cells[2].seconds < cells[1].seconds
            # the scheduler's cost counts evaluations, not ratios: ratios 0.25 (keeps the block),
            # 0.5 and 0.75 (the same skipped model) are the dense model and one evaluation
            assert ev.chunk_cost(Chunk(gi, [0, 1, 2]), None) == pytest.approx(1.1)


def test_allocator_mixes_width_and_depth(gpt):
    """One budget over width and depth: with a block that barely matters the sensitivity allocator
    removes it (its MACs and every layer inside go), uniform and global never touch blocks."""
    model, x, ignore = gpt
    graph = Graph(model, x[:1], ignore)
    cm = allocate.CostModel.from_exact(graph.groups, ExactCost.derive(model, x[:1], probes_from_graph(graph)))
    grid = [0.25, 0.5, 0.75]
    damage = np.ones((len(graph.groups), len(grid))) * np.array([0.5, 2.0, 8.0])
    blocks = [i for i, g in enumerate(graph.groups) if g.kind == "block"]
    damage[blocks] = np.array([0.0, 5.0, 5.0])  # removing a block costs 5
    damage[blocks[1]] = np.array([0.0, 0.01, 0.01])  # except the middle one
    a = allocate.sensitivity(cm, grid, damage, {"macs": 0.6}, 0.9)
    removed = [graph.groups[i].name for i in blocks if a.ratios[i] >= 0.5]
    assert removed == ["blocks.1:block"] and a.predicted["macs"] <= 0.6
    for alloc in (allocate.uniform(cm, {"macs": 0.6}, 0.9),
                  allocate.global_ranking(cm, importance.group_scores(graph, "l2"), {"macs": 0.6}, 0.9)):
        assert all(alloc.ratios[i] == 0 for i in blocks) and alloc.predicted["macs"] <= 0.6
    # depth only: the cheapest blocks go first
    only = Graph(model, x[:1], ignore, kinds=["block"])
    cmb = allocate.CostModel.from_exact(only.groups, ExactCost.derive(model, x[:1], probes_from_graph(only)))
    one = cmb.fraction("params", np.array([0.0, 0.5, 0.0]))
    assert one < 0.95
    d = allocate.sensitivity(cmb, grid, damage[blocks], {"params": one}, 0.9)
    assert d.ratios.tolist() == [0.0, 0.5, 0.0]
    d = allocate.sensitivity(cmb, grid, damage[blocks], {"params": one - 0.01}, 0.9)
    assert sorted(d.ratios.tolist()) == [0.0, 0.5, 0.5] and d.ratios[1] == 0.5  # blocks 0 and 2 tie: either goes
    assert d.predicted_loss == pytest.approx(5.01)


GPT_SWEEP = ["model=tiny_gpt", "data=text", "launcher=debug", "baseline.epochs=1", "data.train_bytes=32768",
             "data.val_bytes=8192", "data.calib_samples=32", "finetune.epochs=0", "sensitivity.ratios=[0.25,0.5,0.75]",
             "baseline.latency_repeats=2", "baseline.latency_batch=8", "importance=activation", "prune.target.macs=0.6"]


@pytest.mark.mpi
@pytest.mark.slow
def test_sweep_heads_blocks_two_ranks_equal_one_and_reload(tmp_path):
    """The tiny GPT sweep with heads and blocks: 2 real MPI ranks give the same sensitivity matrix
    and importance as 1; the run file rebuilds the pruned model with identical outputs."""
    run_sweep(tmp_path / "one", *GPT_SWEEP, "threads=1", timeout=300)
    run_sweep(tmp_path / "two", *GPT_SWEEP, ranks=2, timeout=300)
    a_path, b_path = tmp_path / "one" / "run.h5", tmp_path / "two" / "run.h5"
    with h5py.File(a_path) as a, h5py.File(b_path) as b:
        kinds = [k.decode() if isinstance(k, bytes) else k for k in a["groups/kind"][()]]
        assert {"heads", "block", "neurons", "channels"} <= set(kinds)
        np.testing.assert_allclose(b["sensitivity/loss"][()], a["sensitivity/loss"][()], rtol=0, atol=1e-6)
        for name in a["importance"]:
            np.testing.assert_allclose(b["importance"][name][()], a["importance"][name][()], rtol=1e-6, atol=1e-12)
        assert (a["sensitivity/status"][()] == 1).all()
        assert json.loads(b.attrs["hosts"]) == [socket.gethostname()] and int(b.attrs["world_size"]) == 2  # gathered from both ranks
        plan = {n: a["pruned/plan"][n][()].tolist() for n in a["pruned/plan"]}
        assert a["pruned"].attrs["macs_kept"] <= 0.6
        stored = float(a["pruned"].attrs["metric"])
    model = hpcprune.load_pruned(str(a_path))
    heads = {n: len(k) for n, k in plan.items() if n.endswith(":heads")}
    for n, kept in heads.items():
        i = int(n.split(".")[1])
        if not isinstance(model.blocks[i], Skip):
            assert model.blocks[i].attn.heads == kept
    data = build_data(load_config(RunFile(str(a_path))).data)
    assert metrics.evaluate(model, metrics.make_batches(data.val, 256)).metric("perplexity") == pytest.approx(stored, rel=1e-6)
