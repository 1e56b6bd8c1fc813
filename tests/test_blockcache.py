"""Inside a block: what a group's cells skip (torch.fx plans), and that the rest gives the block's
own output with the group cut."""
import torch
from torch import nn

from hpcprune import blockcache
from hpcprune.graph import Graph, slice_group
from hpcprune.zoo.models import BasicBlock


def _block(stride, in_ch, out_ch, inplace=False):
    torch.manual_seed(0)
    b = BasicBlock(in_ch, out_ch, stride).eval()
    b.relu = nn.ReLU(inplace=inplace)
    for m in b.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return b


def _assert_plan_gives_the_cut_block(plan, model, g, x, keep):
    """The plan's output from the dense cached values equals the block run with the group sliced."""
    with torch.no_grad():
        values = blockcache.capture(plan, x)
        sl = slice_group(dict(model.named_modules()), g, keep)
        want = plan.block(x)
        got = blockcache.run(plan, values, torch.tensor(keep))
        sl.restore()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_inner_group_skips_the_first_conv_and_the_shortcut():
    b = _block(1, 8, 8)
    model = nn.Sequential(b)
    x = torch.randn(4, 8, 6, 6)
    graph = Graph(model, x[:1], [])
    (g,) = [g for g in graph.groups if g.name == "0.conv1"]
    members = {m.module: m.out for m in g.members}
    plan = blockcache.plan_block(b, "0", members, no_unchanged_bn=True)
    assert [n.name for n in plan.cached] == ["shortcut", "conv1"] and "conv1" in [n.name for n in plan.sliced]
    assert [n.name for n in plan.run] == ["bn1", "relu", "conv2", "bn2", "add", "relu_1"]
    _assert_plan_gives_the_cut_block(plan, model, g, x, [0, 2, 3, 7])


def test_width_group_with_a_projection_keeps_or_refuses_its_batchnorms():
    """The stage width through conv2 and the projection shortcut: both convs' dense outputs are
    cached and sliced; with BatchNorm re-estimation in cells, the unchanged bn1 would be skipped,
    so there is no plan."""
    b = _block(2, 4, 8)
    model = nn.Sequential(b, nn.Conv2d(8, 3, 1))
    x = torch.randn(4, 4, 8, 8)
    graph = Graph(model, x[:1], [])
    (g,) = [g for g in graph.groups if any(m.module == "0.conv2" and m.out for m in g.members)]
    members = {m.module: m.out for m in g.members}
    assert blockcache.plan_block(b, "0", members, no_unchanged_bn=True) is None
    plan = blockcache.plan_block(b, "0", members, no_unchanged_bn=False)
    assert {n.name for n in plan.sliced} == {"conv2", "shortcut_0"}
    _assert_plan_gives_the_cut_block(plan, model, g, x, [1, 4, 5])


def test_no_plan_when_a_cell_would_overwrite_a_cached_value():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.conv2(self.act(self.conv1(x))) + x

    b = Block()
    assert blockcache.plan_block(b, "0", {"0.conv1": True, "0.conv2": False}, no_unchanged_bn=False) is None
    b.act = nn.ReLU()
    assert blockcache.plan_block(b, "0", {"0.conv1": True, "0.conv2": False}, no_unchanged_bn=False) is not None
