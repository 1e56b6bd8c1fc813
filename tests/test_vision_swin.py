"""torchvision Swin (V1, V2) with prunable heads and blocks (hpcprune.zoo.vision_swin).

Needs torchvision (the ``vision`` extra, not installed in CI: skipped there; run in .venv-vision,
where benchmarks/zoo_coverage.py runs the whole sweep on every Swin model)."""
import copy

import pytest
import torch

tv = pytest.importorskip("torchvision")

from hpcprune.graph import Graph  # noqa: E402
from hpcprune.verify import verify_groups  # noqa: E402
from hpcprune.zoo.vision import torchvision_model  # noqa: E402
from hpcprune.zoo.vision_swin import prunable_swin  # noqa: E402


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_heads_same_function_then_cut_like_zeroed_heads(name):
    torch.manual_seed(0)
    ref = tv.models.get_model(name, weights=None, num_classes=10).eval()
    for p in ref.parameters():  # non-zero position-bias tables and logit scales
        if p.dim() and p.shape[-1] in (3, 6, 12, 24):
            p.data.normal_()
    x = torch.randn(2, 3, 32, 32)
    model = prunable_swin(copy.deepcopy(ref))
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    graph = Graph(model, x)
    excluded = {e.name: e.reason for e in verify_groups(graph, x, 0.9)}
    heads = [g for g in graph.groups if g.kind == "heads"]
    blocks = [g for g in graph.groups if g.kind == "block"]
    assert len(heads) == 12 and len(blocks) == 12, excluded
    # head 2 out of features.5.0 (12 heads): the cut model equals the dense one whose proj ignores that head
    attn = model.features[5][0].attn
    d = attn.qkv.weight.shape[0] // (3 * attn.num_heads)
    dense = copy.deepcopy(model)
    dense.features[5][0].attn.proj.weight.data[:, 2 * d:3 * d] = 0
    graph.prune_group("features.5.0.attn:heads", [2])
    assert attn.num_heads == 11 and attn.qkv.weight.shape[0] == 33 * d
    table = attn.cpb_mlp[2].weight if attn.v2 else attn.relative_position_bias_table.weight
    assert 11 in table.shape
    torch.testing.assert_close(model(x), dense(x))


def test_torchvision_model_gives_swin_its_structure():
    m = torchvision_model("swin_t", num_classes=10, image_size=32)
    s = m.prune_structure()
    assert len(s.heads) == 12 and s.heads[0].per_head == ["features.1.0.attn.relative_position_bias_table"]
    assert copy.deepcopy(m).prune_structure().heads[0].name == "features.1.0.attn"
