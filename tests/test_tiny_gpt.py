"""The tiny GPT on CPython's stdlib text: real data, a model that learns, and the whole sweep with
``model=tiny_gpt data=text``."""
import copy
import os

import h5py
import pytest
import torch
from omegaconf import OmegaConf

import hpcprune
from hpcprune import metrics
from hpcprune.graph import Graph, n_keep
from hpcprune.runs import build_data, ignore_names, load_config
from hpcprune.stages import train_dense
from hpcprune.store import RunFile
from hpcprune.zoo.gpt import tiny_gpt
from hpcprune.zoo.text import EOF_BYTE, corpus, stdlib_text, unigram_perplexity

from conftest import run_sweep

SMALL = dict(train_bytes=65536, val_bytes=16384, calib_samples=32)


def _model():  # conf/model/tiny_gpt.yaml
    return tiny_gpt(vocab=256, context=64, d_model=64, layers=2, heads=4, head_dim=16, mlp_hidden=256)


def test_text_data_is_real_and_deterministic():
    a, b = stdlib_text(seed=0, **SMALL), stdlib_text(seed=0, **SMALL)
    assert a.metric == "perplexity" and a.num_classes == 256
    assert len(a.train) == (65536 - 1) // 64 and len(a.val) == (16384 - 1) // 64 and len(a.calib) == 32
    for i in (0, 7, len(a.train) - 1):
        (xa, ya), (xb, yb) = a.train[i], b.train[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.long and xa.shape == (64,)
        assert torch.equal(xa[1:], ya[:-1])  # the target is the next byte
    assert torch.equal(a.calib[0][0], b.calib[0][0]) and torch.equal(a.val[3][0], b.val[3][0])
    assert a.example_input.shape == (8, 64) and a.example_input.dtype == torch.long
    # real Python source from this interpreter's standard library; val files are held out
    (val, train), (val_files, train_files) = corpus(None, [16384, 65536], 32768, 0)
    assert not set(val_files) & set(train_files)
    assert all(f.endswith(".py") and not {"test", "tests", "idle_test", "site-packages"} & set(f.split(os.sep)) for f in val_files + train_files)
    assert bytes(a.train[0][0].tolist()) == train[:64] and bytes(a.val[0][0].tolist()) == val[:64]
    assert train.count(b"def ") > 50 and train.count(b"import ") > 10 and train.count(bytes([EOF_BYTE])) >= 1
    other = stdlib_text(seed=1, **SMALL)  # the seed chooses the files
    assert not torch.equal(other.train[0][0], a.train[0][0])


@pytest.mark.slow
def test_tiny_gpt_learns_below_unigram():
    """A short in-process dense training (~90 steps, ~10 s on one core) beats byte frequencies."""
    torch.manual_seed(0)
    data = stdlib_text(seed=0, **SMALL)
    (val, train), _ = corpus(None, [SMALL["val_bytes"], SMALL["train_bytes"]], 32768, 0)
    unigram = unigram_perplexity(train, val)
    model = _model()
    cfg = OmegaConf.create({"seed": 0, "baseline": {"epochs": 6, "batch_size": 64, "lr": 0.003, "weight_decay": 0.0005}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = metrics.evaluate(model, metrics.make_batches(data.val, 256)).metric("perplexity")
        train_dense(model, data, cfg, "cpu")
        after = metrics.evaluate(model, metrics.make_batches(data.val, 256)).metric("perplexity")
    finally:
        torch.set_num_threads(threads)
    assert before > 200 and 15 < unigram < 40  # untrained: about uniform over 256 bytes
    assert after < 0.75 * unigram, (after, unigram)


def test_groups_and_pruning_keep_a_valid_model():
    """Groups on the GPT: Torch-Pruning's residual width (embeddings, LayerNorms, o/down outputs,
    every input) and each block's MLP neurons; hpcprune's head group (whole heads of q/k/v rows and
    o columns) and block group per block. q/k/v are never cut channel by channel (that would break
    the heads); the vocabulary output is never cut."""
    model = _model().eval()
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    ignore = ignore_names(model, ["head"])  # the output layer (found by the groups stage's verification)
    assert ignore[0] == "head" and "blocks.1.attn.v" in ignore
    graph = Graph(model, x[:1], ignore)
    assert [(g.name, g.kind, g.size, g.maskable, g.sliceable) for g in graph.groups] == [
        ("tok", "channels", 64, False, True),  # LayerNorms: not maskable, sliceable
        ("blocks.0:block", "block", 1, False, False),
        ("blocks.0.attn:heads", "heads", 4, True, True),
        ("blocks.0.mlp.up", "neurons", 256, True, True),
        ("blocks.1:block", "block", 1, False, False),
        ("blocks.1.attn:heads", "heads", 4, True, True),
        ("blocks.1.mlp.up", "neurons", 256, True, True),
    ]
    residual = {(m.module, m.out) for m in graph.groups[0].members}
    assert {("tok", True), ("pos", True), ("blocks.0.ln1", True), ("blocks.1.attn.o", True), ("blocks.1.mlp.down", True),
            ("ln_f", True), ("blocks.0.attn.q", False), ("head", False)} <= residual
    for g in graph.groups:
        pruned = copy.deepcopy(model)
        n = g.size - n_keep(g, 0.5)
        Graph(pruned, x[:1], ignore).prune_group(g.name, list(range(0, 2 * n, 2)))
        assert pruned(x).shape == (2, 64, 256)  # the vocabulary stays whole
        assert metrics.params(pruned) < metrics.params(model)


def test_whole_heads_slice_out():
    """Removing heads = slicing q/k/v rows and o columns in blocks of head_dim: the result equals
    the dense model with those heads' values zeroed (their output is then exactly 0)."""
    torch.manual_seed(0)
    model = _model().eval()
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    drop = [1, 3]
    keep = torch.tensor([c for h in range(4) if h not in drop for c in range(16 * h, 16 * h + 16)])
    masked, sliced = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for h in drop:
            masked.blocks[0].attn.v.weight[16 * h : 16 * h + 16] = 0
            masked.blocks[0].attn.v.bias[16 * h : 16 * h + 16] = 0
        attn = sliced.blocks[0].attn
        for name in ("q", "k", "v"):
            lin = getattr(attn, name)
            new = torch.nn.Linear(lin.in_features, len(keep))
            new.weight.copy_(lin.weight[keep])
            new.bias.copy_(lin.bias[keep])
            setattr(attn, name, new)
        o = torch.nn.Linear(len(keep), attn.o.out_features)
        o.weight.copy_(attn.o.weight[:, keep])
        o.bias.copy_(attn.o.bias)
        attn.o = o
    assert sliced.blocks[0].attn.heads == 2
    torch.testing.assert_close(sliced(x), masked(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sweep_tiny_gpt_text(tmp_path):
    """``model=tiny_gpt data=text`` through every stage (small sizes), rebuilt from the run file."""
    run = tmp_path / "run"
    run_sweep(run, "model=tiny_gpt", "data=text", "launcher=debug", "threads=1", "baseline.epochs=2",
              "data.train_bytes=32768", "data.val_bytes=16384", "data.calib_samples=64", "finetune.epochs=1",
              "sensitivity.ratios=[0.25,0.5]", "baseline.latency_repeats=2", "baseline.latency_batch=8",
              timeout=240)
    path = str(run / "run.h5")
    with h5py.File(path) as f:
        assert f.attrs["status"] == "complete"
        base, fin = f["baseline"].attrs, f["final"].attrs
        assert base["metric_name"] == "perplexity" and not base["higher_is_better"]
        assert [n.decode() if isinstance(n, bytes) else n for n in f["groups/name"][()]] == [
            "tok", "blocks.0:block", "blocks.0.attn:heads", "blocks.0.mlp.up", "blocks.1:block", "blocks.1.attn:heads", "blocks.1.mlp.up"]
        assert (f["sensitivity/status"][()] == 1).all()
        assert fin["params"] < base["params"] and fin["macs"] <= 0.5 * base["macs"]
        stored = float(fin["metric"])
    assert 1.0 < stored < 256.0
    model = hpcprune.load_pruned(path)
    data = build_data(load_config(RunFile(path)).data)
    sums = metrics.evaluate(model, metrics.make_batches(data.val, 256))
    assert sums.metric("perplexity") == stored
