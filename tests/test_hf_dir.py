"""A pruned Hugging Face model as a directory (hpcprune.save_hf_dir / write_hf_dir, load_hf_dir), on
tiny random models of tests/test_hf_families.py's families, pruned as the prune stage prunes:

- equal widths in every layer and a removed layer: a plain transformers directory; transformers'
  own Auto class loads it (for Llama in a process that never imports hpcprune) and computes exactly
  what the pruned model computes (Gemma's embed_scale, rotary inv_freq, Phi-3's fused projections);
- widths that differ between layers: the hpcprune directory, reloaded exactly by load_hf_dir (fused
  q/k/v of GPT-2 and GPT-NeoX, Phi-3's fused gate_up neurons), its config.json describing the
  per-layer widths, and the reason written in its README;
- a bfloat16 tiny Llama on text files through a whole in-process sweep: bf16 weights stored and
  reloaded, metrics recomputed from the reloaded model, and the exported directory (with the
  tokenizer) equal to it under plain from_pretrained."""
import json
import os
import subprocess

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from hpcprune import hf_dir, importance, metrics  # noqa: E402
from hpcprune.graph import Graph  # noqa: E402
from hpcprune.hf_plain import AUTO_CLASS  # noqa: E402
from hpcprune.runs import ignore_names  # noqa: E402
from hpcprune.verify import verify_groups  # noqa: E402
from hpcprune.zoo import hf  # noqa: E402

from conftest import PY, sweep_in_process  # noqa: E402
from test_hf_families import FAMILIES, I, L, _family, _plan, _pruned  # noqa: E402
from test_text_files import tiny_tokenizer, words  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")


def _prune(name, ratio_of):
    """The family's tiny model, its verified groups, a plan with ``ratio_of(group, index)`` per group, the pruned copy."""
    torch.set_num_threads(1)
    model, x = _family(name)
    graph = Graph(model, x[:1], ignore_names(model, []))
    verify_groups(graph, x, 0.5)
    ratios = np.array([ratio_of(g, i) for i, g in enumerate(graph.groups)])
    plan = _plan(graph, ratios, importance.group_scores(graph, "l2"))
    return model, x, graph, plan, _pruned(model, x, plan)


def _out(model, x):
    with torch.no_grad():
        return model(x)


# heads go only where the config names the head width (FAMILIES' last field); T5's heads are refused
@pytest.mark.parametrize("name", ["llama", "gemma", "phi3", "gpt2", "t5", "falcon"])
def test_equal_widths_give_a_directory_transformers_loads(name, tmp_path):
    heads = FAMILIES[name][5]
    last = lambda g: g.kind == "block" and g.block.endswith(f".{L - 1}")  # noqa: E731
    model, x, graph, plan, pruned = _prune(name, lambda g, i: 1.0 if last(g) else 0.5 if g.kind == "neurons" or (
        heads and g.kind == "heads") else 0.0)
    out = hf_dir.write_hf_dir(pruned, graph.groups, plan, str(tmp_path), x)
    assert (out.loader, out.reason, out.max_abs_diff) == ("transformers", "", 0.0) and os.fspath(out) == str(tmp_path)
    assert out.line in (tmp_path / "README.md").read_text() and "hpcprune_plan.json" not in os.listdir(tmp_path)
    tf = hf._transformers()
    loaded = getattr(tf, AUTO_CLASS[FAMILIES[name][0]]).from_pretrained(str(tmp_path))
    again = getattr(hf, FAMILIES[name][0])(loaded).eval()
    torch.testing.assert_close(_out(again, x), _out(pruned, x), atol=0, rtol=0)
    cfg = loaded.config
    assert getattr(cfg, FAMILIES[name][4]) == I // 2
    assert (cfg.num_decoder_layers, cfg.num_layers) == (L - 1, L - 1) if name == "t5" else cfg.num_hidden_layers == L - 1
    if heads:
        kv = FAMILIES[name][3]["num_key_value_heads"]
        assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim) == (kv // 2, 2, 8)
    again2 = hf_dir.load_hf_dir(str(tmp_path))  # hpcprune's loader reads a plain directory too
    assert type(again2).__name__ == FAMILIES[name][0]
    torch.testing.assert_close(_out(again2, x), _out(pruned, x), atol=0, rtol=0)


def test_plain_directory_loads_in_a_process_without_hpcprune(tmp_path):
    model, x, graph, plan, pruned = _prune("llama", lambda g, i: 0.5 if g.kind in ("neurons", "heads") else float(i == 0))
    assert len(pruned.prune_structure().blocks) == L - 1  # layer 0 removed: layer 1 becomes layer 0
    hf_dir.write_hf_dir(pruned, graph.groups, plan, str(tmp_path / "dir"), x)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, transformers\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'dir')!r}).eval()\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            "with torch.no_grad(): y = m(input_ids=x).logits\n"
            f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
            "assert not any(n.startswith('hpcprune') for n in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), _out(pruned, x), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["llama", "phi3", "gpt2", "gpt_neox"])
def test_different_widths_give_an_hpcprune_directory(name, tmp_path):
    """Layer 0 keeps half its MLP neurons and KV groups, layer 1 three quarters (GPT-2, GPT-NeoX:
    fused [q; k; v] / per-head [q k v] rows; Phi-3: fused qkv and gate_up)."""
    first = lambda g: ".0." in g.name  # noqa: E731
    model, x, graph, plan, pruned = _prune(name, lambda g, i: 0.0 if g.kind == "block" else 0.5 if first(g) else 0.25)
    out = hf_dir.write_hf_dir(pruned, graph.groups, plan, str(tmp_path), x, {"run": "r.h5"})
    assert out.loader == "hpcprune" and out.max_abs_diff == 0.0
    assert "layers keep different" in out.reason and out.line.split(": ", 1)[1] in (tmp_path / "README.md").read_text()
    torch.testing.assert_close(_out(hf_dir.load_hf_dir(str(tmp_path)), x), _out(pruned, x), atol=0, rtol=0)
    doc = json.loads((tmp_path / "hpcprune_plan.json").read_text())
    qkv = {"phi3": [16, 8, 8], "gpt2": [8, 8, 8], "gpt_neox": [24]}.get(name)
    if qkv:  # fused q/k/v rows recorded block by block
        assert [m[4] for g in doc["groups"] if g["kind"] == "heads" for m in g["members"]][0] == qkv
    tf = hf._transformers()
    layers = tf.AutoConfig.from_pretrained(str(tmp_path)).per_layer_config  # config.json describes the pruned widths
    key = FAMILIES[name][4]
    assert [getattr(c, key) for c in layers] == [I // 2, I - I // 4]
    with pytest.raises(Exception):  # noqa: B017 - transformers alone refuses it (no silently dense model)
        getattr(tf, AUTO_CLASS[FAMILIES[name][0]]).from_pretrained(str(tmp_path))


@pytest.mark.parametrize("name", ["falcon", "falcon_mha"])
def test_falcon_with_heads_cut_gives_an_hpcprune_directory(name, tmp_path):
    """Falcon derives its head width from hidden_size / num_attention_heads (a property without a
    setter): fewer heads of the same width are hpcprune's directory, with the reason (it was an
    AttributeError from save_hf_dir)."""
    model, x, graph, plan, pruned = _prune(name, lambda g, i: 0.5 if g.kind == "heads" else 0.0)
    out = hf_dir.write_hf_dir(pruned, graph.groups, plan, str(tmp_path), x, {"run": "r.h5"})
    assert out.loader == "hpcprune" and out.max_abs_diff == 0.0 and "derives the head width" in out.reason, out.line
    torch.testing.assert_close(_out(hf_dir.load_hf_dir(str(tmp_path)), x), _out(pruned, x), atol=0, rtol=0)


def test_refusals_are_one_line(tmp_path):
    from hpcprune.zoo.gpt import tiny_gpt

    with pytest.raises(hf_dir.HFDirError, match=r"the model is a TinyGPT, not a Hugging Face wrapper .*load_pruned"):
        hf_dir.write_hf_dir(tiny_gpt(vocab=16, context=8), [], {}, str(tmp_path / "a"), torch.zeros(1, 8, dtype=torch.long))
    (tmp_path / "model.safetensors").write_bytes(b"")
    model, x = _family("llama")
    with pytest.raises(hf_dir.HFDirExists, match="already holds a model.safetensors"):
        hf_dir.write_hf_dir(model, [], {}, str(tmp_path), x)


def test_bfloat16_llama_on_text_files_sweep_reload_and_export(tmp_path):
    """model.dtype=bfloat16 through the sweep in this process (data: a text and a JSON-lines file,
    a tokenizer folder): weights stored in bf16; the reloaded pruned and fine-tuned models give the
    metrics the run recorded; the exported directory (a uniform plan: plain) holds bf16 weights and
    the tokenizer, and from_pretrained computes exactly what load_pruned does."""
    tok = tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "a.txt").write_text(words(2000, 0))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": words(100, i)}) + "\n" for i in range(1, 15)))
    run = tmp_path / "run"
    assert sweep_in_process(run, "threads=1", "launcher=debug", "model=llama_tiny", "model.vocab=62", "model.dtype=bfloat16",
                            "data=text_files", f"data.paths=[{tmp_path}/a.txt,{tmp_path}/b.jsonl]", f"data.tokenizer={tok}",
                            "data.window=32", "baseline.epochs=1", "finetune.epochs=1", "sensitivity.ratios=[0.5]",
                            "baseline.latency_repeats=1", "baseline.latency_batch=4", "prune.method=uniform",
                            "prune.target.macs=0.8") == 0
    from safetensors import safe_open

    import h5py
    import hpcprune

    for name in ("dense", "pruned", "final"):
        with safe_open(str(run / f"{name}.safetensors"), "pt") as fh:
            assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}, name
    with h5py.File(run / "run.h5") as f:
        stored = {s: float(f[s].attrs["metric"]) for s in ("pruned", "final")}
        assert np.isfinite(f["sensitivity/loss"][()]).all()
    from hpcprune.runs import build_data, load_config
    from hpcprune.store import RunFile

    val = metrics.make_batches(build_data(load_config(RunFile(str(run / "run.h5"))).data).val, 256)
    for s in ("pruned", "final"):
        model = hpcprune.load_pruned(str(run / "run.h5"), weights=s)
        assert model.hf.dtype == torch.bfloat16 and model.hf.model.rotary_emb.inv_freq.dtype == torch.float32
        assert metrics.evaluate(model, val).metric("perplexity") == pytest.approx(stored[s], rel=1e-6)
    out = hpcprune.save_hf_dir(str(run / "run.h5"), str(tmp_path / "export"))
    assert out.loader == "transformers" and {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    tf = hf._transformers()
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(out))
    x = val[0][0][:2]
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(x), atol=0, rtol=0)
    assert tf.AutoTokenizer.from_pretrained(str(out))("w3 w7")["input_ids"] == [5, 9]
