"""Exact costs (hpcprune.costs): PyTorch's flop counter on the dense model and a few cuts per group
give polynomials that equal the counted MACs and parameters of the cut model at every allocation."""
import contextlib
import copy
import random

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from hpcprune import allocate, costs
from hpcprune.graph import GroupInfo, n_keep
from hpcprune.structure import Skip

torch.set_num_threads(1)


# ---- probes ---------------------------------------------------------------------------------------
class FactoryProbe:
    """Group ``key`` of a model built by ``make(**widths)``: a cut builds the model with ``m`` units."""

    def __init__(self, make, widths, key):
        self.make, self.widths, self.key = make, dict(widths), key
        self.name, self.size, self.block = key, widths[key], None

    @contextlib.contextmanager
    def cut(self, m):
        yield self.make(**{**self.widths, self.key: m})


class BlockProbe:
    """A residual block of ``model``, replaced in place by a Skip while cut to 0."""

    def __init__(self, model, block):
        self.model, self.block, self.name, self.size = model, block, block, 1

    @contextlib.contextmanager
    def cut(self, m):
        parent_name, _, child = self.block.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        saved = getattr(parent, child)
        if m == 0:
            setattr(parent, child, Skip())
        try:
            yield self.model
        finally:
            setattr(parent, child, saved)


def tp_cut(model, x, kept):
    """A copy of ``model`` with layer ``name``'s output group cut to its first ``kept[name]`` channels
    (Torch-Pruning, one group after another)."""
    c = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(c, example_inputs=x)
    for name, m in kept.items():
        layer = c.get_submodule(name)
        pruner = dg.get_pruner_of_module(layer)
        n = pruner.get_out_channels(layer)
        if m < n:
            dg.get_pruning_group(layer, pruner.prune_out_channels, list(range(m, n))).prune()
    return c


class TPProbe:
    def __init__(self, model, x, layer):
        self.model, self.x, self.name, self.block = model, x, layer, None
        self.size = model.get_submodule(layer).out_channels

    @contextlib.contextmanager
    def cut(self, m):
        yield tp_cut(self.model, self.x, {self.name: m})


def check_random(ex, build, x, sizes, blocks=(), n=6, seed=0):
    """Derived MACs and params equal the counts of the built model at random allocations."""
    rng = random.Random(seed)
    for _ in range(n):
        kept = [rng.randint(0, 1) if i in blocks else rng.randint(1, N) for i, N in enumerate(sizes)]
        model = build(kept)
        assert ex.evaluate("macs", kept) == costs.count_macs(model, x), kept
        assert ex.evaluate("params", kept) == costs.count_params(model), kept
        f = np.array(kept, dtype=np.float64) / np.array(sizes)
        assert ex.cost("macs", f) == pytest.approx(costs.count_macs(model, x), rel=1e-12, abs=1e-6)


# ---- (a) a plain CNN, cut with Torch-Pruning ---------------------------------------------------------
class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.BatchNorm2d(12)
        self.c3 = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(F.relu(self.c3(x)).mean((2, 3)))


def test_plain_cnn_exact_at_random_allocations():
    torch.manual_seed(0)
    model, x = CNN().eval(), torch.randn(2, 3, 12, 12)
    names = ["c1", "c2", "c3"]
    ex = costs.ExactCost.derive(model, x, [TPProbe(model, x[:1], n) for n in names])
    assert ex.dense == {"macs": costs.count_macs(model, x), "params": costs.count_params(model)}
    # 3*8*9*144 + 8*12*9*36 + 12*6*36 + 6*5 per sample (BatchNorm is not a MAC)
    assert ex.dense["macs"] == 3 * 8 * 9 * 144 + 8 * 12 * 9 * 36 + 12 * 6 * 36 + 6 * 5
    check_random(ex, lambda k: tp_cut(model, x[:1], dict(zip(names, k))), x, [8, 12, 6], n=4)


# ---- (b) a U-Net skip: concat of two groups into one conv, a transposed conv --------------------------
class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1 = nn.Conv2d(3, 6, 3, padding=1)
        self.e2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.up = nn.ConvTranspose2d(8, 5, 2, stride=2)
        self.d = nn.Conv2d(6 + 5, 7, 3, padding=1)
        self.head = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        a = F.relu(self.e1(x))
        b = F.relu(self.e2(a))
        u = self.up(b)
        return self.head(F.relu(self.d(torch.cat([a, u], 1))))


def test_transposed_conv_counts_input_pixels_not_stride_squared():
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2)
    x = torch.randn(3, 4, 5, 5)
    assert costs.count_macs(conv, x) == 4 * 6 * 9 * 25  # Cin Cout k k Hin Win, per sample
    from hpcprune import metrics
    assert sum(metrics.module_macs(conv, x[:1]).values()) == 4 * 6 * 9 * 11 * 11  # the old counter: ~stride^2 more


def test_concat_is_additive_and_exact():
    torch.manual_seed(0)
    model, x = UNet().eval(), torch.randn(1, 3, 8, 8)
    names = ["e1", "e2", "up", "d"]
    ex = costs.ExactCost.derive(model, x, [TPProbe(model, x, n) for n in names])
    coef, exps = ex.terms["macs"]
    # the conv after the concat: (nA + nC) * nD, two terms, each a product of two groups
    assert any((e == [1, 0, 0, 1]).all() for e in exps) and any((e == [0, 0, 1, 1]).all() for e in exps)
    assert not any(e[0] and e[2] for e in exps)  # never nA * nC
    check_random(ex, lambda k: tp_cut(model, x, dict(zip(names, k))), x, [6, 8, 5, 7], n=4)


# ---- (c) nn.MultiheadAttention in a tiny ViT ---------------------------------------------------------
class ViT(nn.Module):
    def __init__(self, heads=3, hidden=10, head_dim=4, classes=5):
        super().__init__()
        d = heads * head_dim
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        h = self.ln1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.fc2(F.gelu(self.fc1(self.ln2(t))))
        return self.head(t.mean(1))


def vit_macs(heads, hidden, head_dim=4, classes=5, tokens=4, pixels=16):
    d = heads * head_dim
    return (3 * 16 * d * tokens  # patch conv
            + tokens * d * 3 * d  # in_proj (q, k, v)
            + 2 * heads * tokens * tokens * head_dim  # scores and weighted sum
            + tokens * d * d  # out_proj
            + 2 * tokens * d * hidden + d * classes)


def test_multihead_attention_projections_and_products_counted():
    x = torch.randn(2, 3, 8, 8)
    assert costs.count_macs(ViT().eval(), x) == vit_macs(3, 10)
    attn = nn.MultiheadAttention(12, 3, batch_first=True).eval()  # need_weights=True: explicit bmm path
    q = torch.randn(1, 4, 12)
    assert costs.count_macs(nn.Sequential(), q) == 0
    rec = costs.record(attn, (q, q, q))
    assert rec.get_total_flops() // 2 == 4 * 12 * 36 + 2 * 3 * 16 * 4 + 4 * 12 * 12
    # F.multi_head_attention_forward uses out_proj's weight without running out_proj: every op is the
    # attention module's own (a module-hook counter sees none of them)
    assert {op.module() for op in rec.ops} == {""}


def test_vit_exact_at_random_allocations():
    torch.manual_seed(0)
    widths = {"heads": 3, "hidden": 10}
    make = lambda heads, hidden: ViT(heads, hidden).eval()  # noqa: E731
    x = torch.randn(1, 3, 8, 8)
    ex = costs.ExactCost.derive(make(**widths), x, [FactoryProbe(make, widths, k) for k in widths])
    assert ex.dense["macs"] == vit_macs(3, 10)
    assert ex.terms["macs"][1][:, 0].max() == 2  # d x d projections: quadratic in the heads
    check_random(ex, lambda k: make(*k), x, [3, 10])


# ---- (d) a residual stream: in and out of one layer are the same group -------------------------------
class Stream(nn.Module):
    def __init__(self, d=6, vocab=7):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight  # tied

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.mix(x)
        return self.out(x)


def test_residual_stream_is_quadratic_and_exact():
    make = lambda d: Stream(d).eval()  # noqa: E731
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    ex = costs.ExactCost.derive(make(6), ids, [FactoryProbe(make, {"d": 6}, "d")])
    assert ex.dense["macs"] == 5 * 6 * 6 + 5 * 6 * 7
    for d in range(1, 7):
        assert ex.evaluate("macs", [d]) == costs.count_macs(make(d), ids) == 5 * d * d + 5 * d * 7
    g = [GroupInfo("d", "channels", 6, [], True)]
    cm = allocate.CostModel.from_exact(g, ex)
    a, b, c = cm.poly_in("macs", 0, np.zeros(1))
    assert c == pytest.approx(5 * 36) and b == pytest.approx(5 * 6 * 7) and a == 0
    for r in (0.0, 0.5, 0.8):
        f = cm.keep_fraction(0, r)
        assert cm.cost("macs", np.array([r])) == pytest.approx(a + b * f + c * f * f)


# ---- (g) parameters, a tied parameter once -----------------------------------------------------------
def test_params_exact_with_a_tied_parameter():
    make = lambda d: Stream(d).eval()  # noqa: E731
    ids = torch.tensor([[1, 2, 3]])
    ex = costs.ExactCost.derive(make(6), ids, [FactoryProbe(make, {"d": 6}, "d")])
    assert ex.dense["params"] == 7 * 6 + 6 * 6 + 6 == costs.count_params(make(6))
    for d in range(1, 7):
        assert ex.evaluate("params", [d]) == 7 * d + d * d + d == costs.count_params(make(d))


# ---- (e) functional linear with a bare Parameter, recurrent layers -----------------------------------
class FuncGRU(nn.Module):
    def __init__(self, h=6, k=5, d=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(h, d))
        self.gru = nn.GRU(h, k, batch_first=True)
        self.out = nn.Linear(k, 3)

    def forward(self, x):
        y, _ = self.gru(F.linear(x, self.w))
        return self.out(y[:, -1])


def gru_macs(h, k, steps=5, d=4):
    return steps * d * h + steps * 3 * k * (h + k) + 3 * k


def test_functional_linear_and_gru_counted_and_exact():
    torch.manual_seed(0)
    widths = {"h": 6, "k": 5}
    make = lambda h, k: FuncGRU(h, k).eval()  # noqa: E731
    x = torch.randn(1, 5, 4)
    assert costs.count_macs(make(6, 5), x) == gru_macs(6, 5)
    ex = costs.ExactCost.derive(make(**widths), x, [FactoryProbe(make, widths, k) for k in widths])
    check_random(ex, lambda k: make(*k), x, [6, 5])


def test_hf_conv1d_counted():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(12, 8)  # addmm with a (in, out) weight
    assert costs.count_macs(conv, torch.randn(2, 5, 8)) == 5 * 8 * 12


def test_lstm_counted_on_the_cpu():
    """On the CPU nn.LSTM runs oneDNN's mkldnn_rnn_layer (no formula): counting turns oneDNN off."""
    lstm = nn.LSTM(4, 5, batch_first=True)
    assert costs.count_macs(lstm, torch.randn(1, 3, 4)) == 3 * 4 * 5 * (4 + 5)


def test_cnn_counted_with_onednn_on_lists_the_ops_counted_with_it_off():
    """Counting leaves oneDNN on where no recurrent layer needs it off (3x faster convolutions on
    the CPU): the same aten ops, dims and flops as with it off."""
    from hpcprune import flops

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                          nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(1, 3, 12, 12)
    model(x)
    assert not flops._needs_onednn_off(model) and flops._needs_onednn_off(nn.Sequential(nn.GRU(3, 4)))
    on = flops.record(model, x)
    with torch.backends.mkldnn.flags(enabled=False):
        off = flops.record(model, x)
    assert [(o.signature(), o.dims, o.flops) for o in on.ops] == [(o.signature(), o.dims, o.flops) for o in off.ops]
    assert on.get_total_flops() == off.get_total_flops() > 0
    assert torch.backends.mkldnn.enabled  # left as it was


# ---- (f) a removable block ---------------------------------------------------------------------------
class Blocks(nn.Module):
    class Block(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

        def forward(self, x):
            return x + self.fc2(F.relu(self.fc1(x)))

    def __init__(self, h=6, d=4):
        super().__init__()
        self.blocks = nn.ModuleList([self.Block(d, 8), self.Block(d, h)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_removed_block_drops_its_ops():
    torch.manual_seed(0)
    model, x = Blocks().eval(), torch.randn(1, 4)
    make = lambda h: Blocks(h).eval()  # noqa: E731
    probes = [BlockProbe(model, "blocks.0"), FactoryProbe(make, {"h": 6}, "h"), BlockProbe(model, "blocks.1")]
    ex = costs.ExactCost.derive(model, x, probes)
    assert ex.dense["macs"] == 2 * 4 * 8 + 2 * 4 * 6 + 4 * 3
    assert ex.evaluate("macs", [0, 6, 1]) == 2 * 4 * 6 + 4 * 3
    assert ex.evaluate("macs", [1, 3, 0]) == ex.evaluate("macs", [1, 6, 0]) == 2 * 4 * 8 + 4 * 3
    assert ex.evaluate("macs", [0, 3, 0]) == 4 * 3
    assert ex.evaluate("params", [1, 2, 1]) == costs.count_params(make(2))
    assert ex.evaluate("params", [0, 2, 0]) == 4 * 3 + 3
    gs = [GroupInfo("b0", "block", 1, [], False, block="blocks.0"), GroupInfo("h", "neurons", 6, [], True),
          GroupInfo("b1", "block", 1, [], False, block="blocks.1")]
    cm = allocate.CostModel.from_exact(gs, ex)
    assert cm.cost("macs", np.array([1.0, 0.0, 1.0])) == 4 * 3  # f = 0 with exponent 0 counts as 1
    assert cm.cost("macs", np.array([0.0, 0.5, 0.0])) == pytest.approx(2 * 4 * 8 + 2 * 4 * 3 + 4 * 3)
    a, b, c = cm.poly_in("macs", 2, np.array([0.0, 0.5, 0.0]))
    assert (a, b, c) == pytest.approx((2 * 4 * 8 + 4 * 3, 2 * 4 * 3, 0))


# ---- errors ------------------------------------------------------------------------------------------
class Branchy(nn.Module):
    def __init__(self, w=4):
        super().__init__()
        self.a = nn.Linear(3, w)
        self.b = nn.Linear(w, 2) if w % 2 == 0 else None
        self.c = nn.Linear(w, 2)

    def forward(self, x):
        y = self.a(x)
        return self.c(y) + (self.b(y) if self.b is not None else 0)


class Square(nn.Module):
    def __init__(self, w=4):
        super().__init__()
        self.a = nn.Linear(3, w * w)

    def forward(self, x):
        return self.a(x)


def test_a_cut_that_changes_the_ops_is_refused():
    make = lambda w: Branchy(w).eval()  # noqa: E731
    with pytest.raises(ValueError, match="group w: its cut changes which operations the model runs"):
        costs.ExactCost.derive(make(4), torch.randn(1, 3), [FactoryProbe(make, {"w": 4}, "w")])


def test_a_dimension_not_affine_in_the_units_is_refused():
    make = lambda w: Square(w).eval()  # noqa: E731
    with pytest.raises(ValueError, match="group w: op #0 aten.addmm in a has a dimension that is not affine"):
        costs.ExactCost.derive(make(4), torch.randn(1, 3), [FactoryProbe(make, {"w": 4}, "w")])


# ---- the cost model and the allocation methods, from the graph's own cuts ----------------------------
def test_cost_model_from_graph_probes_predicts_the_pruned_model():
    from hpcprune.graph import Graph
    from hpcprune.zoo.models import resnet

    torch.manual_seed(0)
    model = resnet(widths=[8, 16], blocks=[1, 1]).eval()
    x = torch.randn(1, 1, 8, 8)
    graph = Graph(model, x, ["3.fc"])
    ex = costs.ExactCost.derive(model, x, costs.probes_from_graph(graph))
    dense_before = copy.deepcopy(model.state_dict())
    cm = allocate.CostModel.from_exact(graph.groups, ex)
    assert cm.dense["macs"] == costs.count_macs(model, x) and cm.dense["params"] == costs.count_params(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense_before.items())  # probes restored it
    alloc = allocate.uniform(cm, {"macs": 0.6}, 0.9, round_to=2)
    ratios = alloc.ratios
    pruned = copy.deepcopy(model)
    g2 = Graph(pruned, x, ["3.fc"])
    g2.apply_plan({g.name: list(range(n_keep(g, r, 2))) for g, r in zip(graph.groups, ratios)})
    assert cm.cost("macs", ratios, 2) == pytest.approx(costs.count_macs(pruned, x), rel=1e-12)
    assert cm.cost("params", ratios, 2) == pytest.approx(costs.count_params(pruned), rel=1e-12)
    G = len(graph.groups)
    damage = np.tile([0.1, 0.3, 0.9], (G, 1)) * (1 + np.arange(G))[:, None]
    sens = allocate.sensitivity(cm, [0.25, 0.5, 0.75], damage, {"macs": 0.5}, 0.9)
    assert sens.predicted["macs"] <= 0.5


def test_tiny_gpt_heads_blocks_and_stream_exact():
    """Heads (in-place slices), blocks (skips), the residual stream and MLP neurons of the built-in
    GPT: the cost model predicts the physically pruned model's counts."""
    from hpcprune.graph import Graph
    from hpcprune.runs import ignore_names
    from hpcprune.zoo.gpt import tiny_gpt

    torch.manual_seed(0)
    model = tiny_gpt(vocab=64, context=8, d_model=16, layers=2, heads=4, head_dim=4, mlp_hidden=12).eval()
    x = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    ignore = ignore_names(model, [])
    graph = Graph(model, x, ignore)
    ex = costs.ExactCost.derive(model, x, costs.probes_from_graph(graph))
    cm = allocate.CostModel.from_exact(graph.groups, ex)
    rng = np.random.default_rng(0)
    for _ in range(2):
        ratios = rng.uniform(0, 0.8, len(graph.groups))
        pruned = copy.deepcopy(model)
        g2 = Graph(pruned, x, ignore)
        g2.apply_plan({g.name: list(range(n_keep(g, r))) for g, r in zip(graph.groups, ratios)})
        assert cm.cost("macs", ratios) == pytest.approx(costs.count_macs(pruned, x), rel=1e-12)
        assert cm.cost("params", ratios) == pytest.approx(costs.count_params(pruned), rel=1e-12)


def test_grouped_mm_of_mixture_of_experts_counted():
    """``torch._grouped_mm`` (transformers' grouped experts): each expert's tokens times its weight,
    counted as the same products done one expert at a time (FlopCounterMode has no formula for it)."""
    import torch

    from hpcprune import metrics

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")

    class Experts(torch.nn.Module):
        def __init__(self, grouped: bool) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 16, 8))
            self.grouped = grouped

        def forward(self, x):  # 12 token rows, 3 per expert
            if self.grouped:
                return torch._grouped_mm(x, self.w, offs=torch.tensor([3, 6, 9, 12], dtype=torch.int32))
            return torch.cat([x[3 * e:3 * e + 3] @ self.w[e] for e in range(4)])

    x = torch.randn(12, 16)
    grouped, eager = Experts(True), Experts(False)
    eager.w = grouped.w
    assert torch.allclose(grouped(x), eager(x), atol=1e-5)
    assert metrics.macs(grouped, x) == metrics.macs(eager, x) == 12 * 16 * 8 // 12  # per sample (12 rows)


def test_steady_allocator_fixes_glibc_thresholds_once():
    """The latency and energy loops set glibc's mmap/trim thresholds (a forward's activations stay in
    the heap between passes); a second call is a no-op."""
    import platform

    from hpcprune import metrics

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert metrics.steady_allocator() is True and metrics.steady_allocator() is True


@pytest.mark.parametrize("case", ["lenet_flatten", "mobilenetv2", "squeezenet", "convnext", "conv1d_resnet",
                                  "grouped_convtranspose", "embedding_mean"])
def test_levels_recorded_from_a_chain_element_give_the_whole_forwards_polynomials(case, monkeypatch):
    """A cut group's level is recorded from the first chain element holding one of its layers (the
    ops before keep their dense dims) to the last one it changed (the ops after, on dense shapes,
    keep theirs): the same exact polynomials as recording the whole forward."""
    import archs
    import archs2

    from hpcprune.graph import Graph
    from hpcprune.runs import ignore_names

    model_fn, data_fn = {**archs.CASES, **archs2.CASES}[case]
    spliced = []  # levels whose ops past the cut's last element are the dense recording's
    same = costs._same_shapes
    monkeypatch.setattr(costs, "_same_shapes", lambda a, b: same(a, b) and not spliced.append(1))
    out = []
    for starts in (True, False):
        if not starts:
            monkeypatch.setattr(costs._ChainStarts, "make", classmethod(lambda cls, *a, **k: None))
        torch.manual_seed(0)
        model = model_fn().eval()
        x = data_fn(calib_samples=16, val_samples=16).example_input[:1]
        graph = Graph(model, x, ignore_names(model, []))
        probes = costs.probes_from_graph(graph)
        if starts:
            st = costs._ChainStarts.make(model, x, costs.record(model, x).ops, probes)
            assert st is not None and max(st.entry([p]) for p in probes) > 0
        ex = costs.ExactCost.derive(model, x, probes)
        out.append((ex.exact, ex.dense))
    assert out[0] == out[1]
    # past the cut's last element, the dense recording's ops were used (the models with a later element)
    assert bool(spliced) == (case != "embedding_mean"), len(spliced)


def test_a_parameter_expanded_over_the_batch_is_counted():
    """DETR's object queries, Perceiver's latents: ``self.query.expand(n, -1, -1)`` into a Linear. Under
    no_grad that view requires grad without a grad_fn, and FlopCounterMode's module tracker failed on
    it ("Expected gradient function to be set"), ending the groups stage."""
    from torch import nn

    from hpcprune.flops import count_macs

    class Queries(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.proj = nn.Parameter(torch.randn(1, 4, 8)), nn.Linear(8, 8)

        def forward(self, x):
            return (self.proj(self.query.expand(x.shape[0], -1, -1)) + x).mean(1)

    model = Queries()
    assert count_macs(model, torch.randn(2, 4, 8)) == 4 * 8 * 8
    assert all(p.requires_grad for p in model.parameters())  # put back


@pytest.mark.parametrize("case", ["mha_vit", "mobilenetv2", "gru_seq"])
def test_one_set_of_counting_switches_for_a_whole_derivation(case, monkeypatch):
    """The cost model sets the counting switches (eval, no MHA fast path, parameters not requiring
    grad, oneDNN off for recurrent layers) once for all its recordings of graph probes: the same
    exact polynomials as switching per recording, and the model's modes, flags and MHA fast path
    put back afterwards."""
    import archs
    import archs2

    from hpcprune import flops
    from hpcprune.graph import Graph
    from hpcprune.runs import ignore_names

    model_fn, data_fn = {**archs.CASES, **archs2.CASES}[case]
    walks = []
    switches = flops._switches
    monkeypatch.setattr(flops, "_switches", lambda m: walks.append(1) or switches(m))
    out = []
    for once in (True, False):
        if not once:
            monkeypatch.setattr(costs, "counting_switches", lambda m: contextlib.nullcontext())  # as before
        torch.manual_seed(0)
        model = model_fn().train()
        x = data_fn(calib_samples=16, val_samples=16).example_input[:1]
        graph = Graph(model, x, ignore_names(model, []))
        model.get_submodule(next(n for n, _ in model.named_modules() if n)).eval()  # one module's own mode
        modes = {n: m.training for n, m in model.named_modules()}
        walks.clear()
        fast = torch.backends.mha.get_fastpath_enabled()
        ex = costs.ExactCost.derive(model, x, costs.probes_from_graph(graph))
        out.append((ex.exact, ex.dense, len(walks)))
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert all(p.requires_grad for p in model.parameters()) and torch.is_grad_enabled()
        assert torch.backends.mha.get_fastpath_enabled() == fast
    assert out[0][:2] == out[1][:2]
    assert out[0][2] == 1 and out[1][2] > len(graph.groups)  # once, against once per recording
