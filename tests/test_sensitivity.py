"""The sensitivity engine gives the naive loop's numbers (deepcopy, prune, full forward per cell)."""
import copy

import numpy as np
import pytest
import torch

from hpcprune import importance, metrics
from hpcprune.graph import Graph, keep_count
from hpcprune.sensitivity import DONE, SKIPPED, Chunk, Dispatcher, Evaluator, Team, make_chunks, run_sensitivity, team_size
from hpcprune.world import World
from hpcprune.zoo.models import MLP, resnet

RATIOS = [0.2, 0.5, 0.8]


class FunctionalHead(torch.nn.Module):
    """The resnet's blocks as children, the head in the model's own forward (functions and a tensor
    method between children, as torchvision's models): a chain only by tracing."""

    def __init__(self):
        super().__init__()
        body = resnet(1, 10, (8, 16, 32), (1, 2, 1))
        self.features = torch.nn.Sequential(*list(body)[:-1])
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.nn.functional.relu(self.features(x))
        x = x.mean((2, 3), keepdim=True)
        return self.fc(torch.flatten(x, 1))


class InplaceBlocks(torch.nn.Module):
    """Blocks that write into their input (``x += f(x)``, an in-place activation on the input): a
    cell must not change the cached activations that later cells and groups start from."""

    class Res(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            x += self.conv2(torch.relu(self.conv1(x)))
            return x

    class Down(torch.nn.Module):
        def __init__(self, c, d):
            super().__init__()
            self.act = torch.nn.LeakyReLU(0.1, inplace=True)
            self.conv1, self.conv2 = torch.nn.Conv2d(c, d, 3, padding=1, groups=2), torch.nn.Conv2d(d, d, 1)

        def forward(self, x):
            return self.conv2(self.act(self.conv1(self.act(x))))

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b1, self.d1, self.b2 = self.Res(8), self.Down(8, 16), self.Res(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.b2(self.d1(self.b1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class SharedFold(torch.nn.Module):
    """A convolution followed by a BatchNorm in its block, and run again outside it: not foldable."""

    class Blk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blk, self.c2, self.fc = self.Blk(), nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        x = self.blk(self.stem(x))
        x = torch.relu(self.blk.conv(x))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


class ReadsWidths(torch.nn.Module):
    """A forward that reads a layer's width (``self.fc.in_features``): cells must give it the cut one."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c2, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.c2(self.c1(x))), 1)
        return self.fc(x.view(-1, self.fc.in_features))


class MeanTokens(torch.nn.Module):
    def forward(self, x):
        return x.mean(1)


def _setup(kind):
    torch.manual_seed(0)
    builders = {"resnet": lambda: (resnet(1, 10, (8, 16, 32), (1, 2, 1)), ["5.fc"]), "traced": lambda: (FunctionalHead(), ["fc"]),
                "inplace": lambda: (InplaceBlocks(), ["fc"]), "sharedfold": lambda: (SharedFold(), ["fc"]),
                "widths": lambda: (ReadsWidths(), ["fc"])}
    if kind in builders:
        model, ignore = builders[kind]()
        x = torch.randn(64, 1, 8, 8)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.data.uniform_(-0.2, 0.2)
    elif kind == "shared":  # one conv at two places of the chain (weights shared): no prefix cache
        nn = torch.nn
        twice = nn.Conv2d(8, 8, 3, padding=1)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), twice, nn.ReLU(),
                              nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), twice, nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 10))
        x, ignore = torch.randn(64, 1, 8, 8), ["11"]
    elif kind == "tokens":  # a Linear on (N, T, C) as a chain element: its cached output's channels are the last axis
        nn = torch.nn
        model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), MeanTokens(), nn.Linear(32, 10))
        x, ignore = torch.randn(64, 6, 8), ["3"]
    else:
        model, x, ignore = MLP(64, 10, (32, 16)), torch.randn(64, 1, 8, 8), ["5"]
    model.eval()
    y = torch.randint(0, 10, (64,))
    batches = [(x[:40], y[:40]), (x[40:], y[40:])]
    graph = Graph(model, x[:1], ignore)
    scores = importance.group_scores(graph, "l2")
    orders = {n: importance.prune_order(s) for n, s in scores.items()}
    return model, x, ignore, graph, orders, batches


def _matrix(results, G):
    m = np.full((G, len(RATIOS)), np.nan)
    for c in results:
        if c.status == DONE:
            m[c.group, c.ratio] = c.sums[1] / c.sums[2]
    return m


def _naive(model, x, ignore, graph, orders, batches):
    m = np.full((len(graph.groups), len(RATIOS)), np.nan)
    for gi, g in enumerate(graph.groups):
        for ri, r in enumerate(RATIOS):
            pruned = copy.deepcopy(model)
            Graph(pruned, x[:1], ignore).prune_group(g.name, orders[g.name][: g.size - keep_count(g.size, r)])
            s = metrics.evaluate(pruned, batches)
            m[gi, ri] = s.loss / s.count
    return m


@pytest.mark.parametrize("kind", ["resnet", "mlp", "shared", "traced", "inplace", "sharedfold", "widths", "tokens"])
@pytest.mark.parametrize("cache,slice_,nhwc,fold", [(True, True, False, False), (True, True, True, True), (True, False, True, True),
                                                    (True, True, False, True), (False, False, False, False)])
def test_engine_equals_naive_loop(kind, cache, slice_, nhwc, fold):
    model, x, ignore, graph, orders, batches = _setup(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = Evaluator(model, graph.groups, orders, RATIOS, batches, x[:1], ignore, cache_prefix=cache, slice_channels=slice_,
                   channels_last=nhwc, fold_bn=fold)
    assert bool(ev._fold_pairs) == (fold and kind not in ("mlp", "shared", "widths", "tokens"))  # no chain (or BN): nothing folded
    if kind == "sharedfold":  # the convolution that also runs outside its block keeps its BatchNorm unfolded
        assert all(conv is not model.blk.conv for _, conv, _ in ev._fold_pairs)
    assert ev.channels_last == (nhwc and kind not in ("mlp", "tokens"))  # NHWC only where there are 2-D convolutions
    assert (ev.chain is None) == (not cache or kind in ("shared", "widths"))  # widths: a traced 16 would go stale
    G = len(graph.groups)
    layouts = []
    if ev.channels_last:  # sliced conv weights keep the NHWC layout while a cell runs
        from hpcprune.graph import slice_group

        g = next(g for g in graph.groups if g.sliceable)
        sl = slice_group(dict(model.named_modules()), g, list(range(g.size // 2)))
        layouts = [m.weight.is_contiguous(memory_format=torch.channels_last) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        sl.restore()
        assert all(layouts)
    res = run_sensitivity(World(None), ev, np.ones((G, len(RATIOS)), bool), metrics.module_macs(model, x[:1]))
    ev.close()
    assert all(p.is_contiguous() for p in model.parameters())  # back in the default layout
    assert len(res) == G * len(RATIOS)
    np.testing.assert_allclose(_matrix(res, G), _naive(model, x, ignore, graph, orders, batches), atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():  # nothing leaks into the model
        assert torch.equal(v, before[k]), k
    assert set(model.state_dict()) == set(before)  # no bias added by folding
    assert not any("forward" in vars(m) for m in model.modules())  # no BatchNorm left skipped


def test_cache_starts_after_the_first_block():
    model, x, ignore, graph, orders, batches = _setup("resnet")
    ev = Evaluator(model, graph.groups, orders, RATIOS, batches, x[:1], ignore)
    entries = {g.name: ev.entry(g) for g in graph.groups}
    assert entries["0.0"] == (1, True)  # the stem conv's output is cached and sliced
    assert ev.chain[entries["3.conv1"][0]][0] == "3"  # a block's own conv1 group starts at that block
    assert all(k > 0 for k, _ in entries.values())


def test_a_forward_over_children_is_traced_into_a_chain():
    """A model whose own forward applies its children one after another, functions between them, is
    a chain (the functions become steps); a top-level skip, a parameter of the model itself, a value
    used twice or a child run twice is not, nor a chain that computes another output."""
    from hpcprune.sensitivity.cells import _checked_chain, flatten_chain

    nn = torch.nn
    model = FunctionalHead().eval()
    chain = flatten_chain(model)
    names = [n for n, _ in chain]
    assert names[:2] == ["features.0.0", "features.0.1"] and names[-1] == "fc"  # nested Sequentials expanded
    assert [n for n in names if n.startswith("<")] == ["<relu>", "<mean>", "<flatten>"]
    x = torch.randn(4, 1, 8, 8)
    assert _checked_chain(model, chain, x) is chain
    h = x
    with torch.no_grad():
        for _, m in chain:
            h = m(h)
        assert torch.equal(h, model(x))

    class Skip(nn.Module):  # the input added to a child's output: two uses of one value
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x) + x)

    class Token(Skip):  # a parameter of the model itself enters the forward (a class token)
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return self.b(self.a(x) + self.bias)

    class Twice(Skip):  # one child at two places
        def forward(self, x):
            return self.b(self.a(self.a(x)))

    class Branch(Skip):  # control flow on a value: not traceable
        def forward(self, x):
            return self.b(self.a(x) if x.sum() > 0 else x)

    class Baked(Skip):  # a layer's width read in the forward: traced as a number a cut would leave stale
        def forward(self, x):
            return self.b(self.a(x).view(-1, self.b.in_features))

    class Stores(Skip):  # a forward that sets an attribute, and a skip: refused, and no Proxy left behind
        def forward(self, x):
            h = self.a(x)
            self.feat = h
            return self.b(h + x)

    for cls in (Skip, Token, Twice, Branch, Baked):
        assert flatten_chain(cls()) is None, cls.__name__
    m = Stores().train()
    m.a.eval()
    assert flatten_chain(m) is None and not hasattr(m, "feat")
    assert m.training and not m.a.training and m.b.training  # every module's mode as it was

    class Random(Skip):  # a chain, whose steps compute something else than the forward that traced it
        def forward(self, x):
            return self.b(torch.nn.functional.dropout(self.a(x), 0.5, training=True))

    m = Random().eval()
    assert flatten_chain(m) is not None
    assert _checked_chain(m, flatten_chain(m), torch.randn(8, 4)) is None


def test_a_declared_chain_is_used_once_checked(caplog):
    """``model.prune_chain()`` (a ViT: a stem reading the class token, then the blocks) is the chain
    ``chain_of`` returns once it computes the model's output; a declared chain that does not is
    refused (None: the cells run the whole forward)."""
    import types

    from hpcprune.sensitivity.cells import chain_of

    nn = torch.nn

    class Stem(nn.Module):
        def __init__(self, vit):
            super().__init__()
            object.__setattr__(self, "vit", vit)

        def forward(self, x):
            return torch.cat([self.vit.cls.expand(x.shape[0], -1, -1), self.vit.embed(x)], dim=1)

    class TinyViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 8)
            self.cls = nn.Parameter(torch.randn(1, 1, 8))
            self.blocks = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
            return self.head(self.blocks(x)[:, 0])

    def chain(self):
        return [("<stem>", Stem(self)), *[(f"blocks.{n}", m) for n, m in self.blocks.named_children()],
                ("<cls>", Take0()), ("head", self.head)]

    class Take0(nn.Module):
        def forward(self, x):
            return x[:, 0]

    m, x = TinyViT().eval(), torch.randn(2, 5, 3)
    assert chain_of(m, x) is None  # its own forward reads the class token: no chain of its children
    m.prune_chain = types.MethodType(chain, m)
    got = chain_of(m, x)
    assert [n for n, _ in got] == ["<stem>", "blocks.0", "blocks.1", "blocks.2", "<cls>", "head"]
    m.prune_chain = types.MethodType(lambda self: chain(self)[:-1], m)  # the head left out: another output
    with caplog.at_level("WARNING", logger="hpcprune.stages"):
        assert chain_of(m, x) is None
        assert chain_of(m, x) is None
    said = [r.getMessage() for r in caplog.records if "prune_chain() is not used" in r.getMessage()]
    assert len(said) == 1 and "compute another output" in said[0]  # once, with why
    m.prune_chain = types.MethodType(lambda self: [("blocks", "not a module")], m)
    with caplog.at_level("WARNING", logger="hpcprune.stages"):
        assert chain_of(m, x) is None
    assert "(name, nn.Module) pairs" in caplog.records[-1].getMessage()


def test_block_cells_of_a_traced_chain_skip_the_block():
    """A block group whose block is a chain element: its cells equal the model with the block
    replaced by its skip (skipping swaps the module in its parent, which the chain does not hold)."""
    from hpcprune.structure import Skip, Structure

    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    class BlockNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(64, 16)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.stem(torch.flatten(x, 1))
            for b in self.blocks:
                x = b(x)
            return self.head(x)

        def prune_structure(self):
            return Structure(blocks=["blocks.0", "blocks.1"], ignore=["head"])

    torch.manual_seed(0)
    model = BlockNet().eval()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    batches = [(x, y)]
    graph = Graph(model, x[:1], ["head"])
    blocks = [g for g in graph.groups if g.kind == "block"]
    assert [g.block for g in blocks] == ["blocks.0", "blocks.1"]
    orders = {g.name: list(range(g.size)) for g in graph.groups}
    ev = Evaluator(model, graph.groups, orders, [0.5], batches, x[:1], ["head"])
    assert ev.chain is not None and "blocks.0" in [n for n, _ in ev.chain]
    res = run_sensitivity(World(None), ev, np.ones((len(graph.groups), 1), bool), None)
    got = _matrix_at(res, len(graph.groups), 1)
    for gi, g in enumerate(graph.groups):
        if g.kind != "block":
            continue
        skipped_ = copy.deepcopy(model)
        setattr(skipped_.blocks, g.block.split(".")[1], Skip())
        s = metrics.evaluate(skipped_, batches)
        assert got[gi, 0] == pytest.approx(s.loss / s.count, rel=1e-6), g.name
        assert got[gi, 0] != pytest.approx(metrics.evaluate(model, batches).mean_loss(), rel=1e-3)


def _matrix_at(results, G, R):
    m = np.full((G, R), np.nan)
    for c in results:
        if c.status == DONE:
            m[c.group, c.ratio] = c.sums[1] / c.sums[2]
    return m


def test_early_stop_records_skips():
    model, x, ignore, graph, orders, batches = _setup("resnet")
    ev = Evaluator(model, graph.groups, orders, RATIOS, batches, x[:1], ignore)
    G = len(graph.groups)
    res = run_sensitivity(World(None), ev, np.ones((G, len(RATIOS)), bool), None, stop_below=lambda s: True)
    by = {(c.group, c.ratio): c.status for c in res}
    for g in range(G):
        assert by[(g, 0)] == DONE and by[(g, 1)] == SKIPPED and by[(g, 2)] == SKIPPED


def test_chunks_cover_every_pending_cell_once():
    pending = np.ones((5, 9), bool)
    pending[1, 3:] = False
    for world in (1, 2, 7, 64):
        chunks = make_chunks(pending, world)
        cells = [(c.group, r) for c in chunks for r in c.ratios]
        assert sorted(cells) == sorted(zip(*np.nonzero(pending)))


def test_sharded_cells_add_up_to_whole_cells():
    """More ranks than cells: a cell's batches are split in shards whose partial sums add up."""
    from hpcprune.sensitivity import Gather

    model, x, ignore, graph, orders, batches = _setup("resnet")
    batches = [(x[i : i + 8], torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(i))) for i in range(0, 64, 8)]
    ev = Evaluator(model, graph.groups, orders, RATIOS, batches, x[:1], ignore)
    pending = np.zeros((len(graph.groups), len(RATIOS)), bool)
    pending[1, 1] = pending[3, 2] = True  # 2 cells for 7 ranks
    chunks = make_chunks(pending, 7, len(batches))
    assert len(chunks) == 16 and {c.shards for c in chunks} == {8}  # one shard per batch
    gather = Gather()
    done = []
    for c in reversed(chunks):  # shards arrive in any order
        done += gather.add(ev.run_chunk(c, rank=0))
    whole = {(c.group, c.ratio): c for c in run_sensitivity(World(None), ev, pending, None)}
    assert len(done) == 2
    for c in done:
        np.testing.assert_allclose(c.sums, whole[(c.group, c.ratio)].sums, rtol=1e-9)


@pytest.mark.parametrize("size", [2, 3, 5])
def test_team_shares_cover_the_samples_in_order_and_even_out_work(size):
    """A team member's calibration samples and re-estimation batches: together exactly the
    evaluator's, in order; members with a re-estimation batch get fewer calibration samples."""
    model, x, ignore, graph, orders, _ = _setup("resnet")
    y = torch.arange(64) % 10
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    recal = [(x[:8], y[:8]), (x[8:16], y[8:16])]
    ev = Evaluator(model, graph.groups, orders, RATIOS, batches, x[:1], ignore, recal_batches=recal, channels_last=True)
    shares = [ev.team_share(Team(None, i, size)) for i in range(size)]
    xs = torch.cat([b[0] for calib, _ in shares for b in calib])
    assert torch.equal(xs, x) and torch.equal(torch.cat([b[1] for calib, _ in shares for b in calib]), y)
    assert all(b[0].is_contiguous(memory_format=torch.channels_last) and len(b[1]) <= 16 for calib, _ in shares for b in calib)
    assert [b for _, r in shares for b in r] == ev.recal_batches
    work = [sum(len(b[1]) for b in calib) + sum(len(b[1]) for b in r) for calib, r in shares]
    assert max(work) - min(work) <= 1, work  # (64 + 16 samples) / size each, to one sample


def test_dispatcher_keeps_a_worker_on_its_group():
    """The next chunk of the group a worker holds goes to it; others get the most expensive chunk
    of a group nobody holds; once every group is held, the most expensive chunk left."""
    chunks = [Chunk(g, [r], cost=c) for g, c in ((0, 5.0), (1, 3.0), (2, 1.0)) for r in range(3)]
    d = Dispatcher(chunks)
    assert d.next(1).group == 0 and d.next(2).group == 1 and d.next(1).group == 0 and d.next(3).group == 2
    assert d.next(2).group == 1 and d.next(4).group == 0  # worker 4 holds nothing: steals the costliest
    assert [d.next(3).group, d.next(3).group] == [2, 2] and d.next(1).group == 1 and len(d) == 0 and d.next(1) is None


def test_team_size_rule():
    assert team_size(3, 6, 256) == 1 and team_size(3, 6, 256, 2) == 2  # auto: no teams for few ranks
    assert team_size(256, 50, 2000, "auto", 4, 64) == 32  # 8 teams for 50 groups
    assert team_size(24, 50, 2000) == 1 and team_size(64, 50, 2000) == 8
    assert team_size(8, 6, 2000) == 1 and team_size(12, 6, 2000) == 8  # rank 0's share matters in small jobs
    assert team_size(256, 50, 2000, 64, 4, 64) == 35  # capped: a member keeps at least a 64-sample batch
    assert team_size(256, 50, 100, 16) == 3  # and 32 calibration samples


@pytest.mark.parametrize("slice_,fold", [(True, False), (False, False), (True, True)])
def test_bn_recalibration_in_cells_equals_pruned_copy_recalibrated(slice_, fold):
    """Cells that re-estimate BatchNorm statistics after the cut give what pruning a copy and
    re-estimating the same layers on the same batches gives; the model is left untouched."""
    model, x, ignore, graph, orders, batches = _setup("resnet")
    recal = [(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 + 0.5, None) for i in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = Evaluator(model, graph.groups, orders, RATIOS, batches, x[:1], ignore, slice_channels=slice_, recal_batches=recal,
                   fold_bn=fold)
    G = len(graph.groups)
    res = run_sensitivity(World(None), ev, np.ones((G, len(RATIOS)), bool), None)
    got = _matrix(res, G)
    plain = _matrix(run_sensitivity(World(None), Evaluator(model, graph.groups, orders, RATIOS, batches, x[:1], ignore),
                                    np.ones((G, len(RATIOS)), bool), None), G)
    assert not np.allclose(got, plain)  # re-estimation changes the picture
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for gi, g in enumerate(graph.groups):
        k, _ = ev.entry(g)
        suffix = {n for n, _ in ev.chain[k:]}
        for ri, r in enumerate(RATIOS):
            pruned = copy.deepcopy(model)
            Graph(pruned, x[:1], ignore).prune_group(g.name, orders[g.name][: g.size - keep_count(g.size, r)])
            bns = [m for n, m in pruned.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                   and any(n == s or n.startswith(s + ".") for s in suffix)]
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            with torch.no_grad():
                for xb, _ in recal:
                    pruned(xb)
            pruned.eval()
            s = metrics.evaluate(pruned, batches)
            assert got[gi, ri] == pytest.approx(s.loss / s.count, rel=1e-5, abs=1e-6), (g.name, r)
