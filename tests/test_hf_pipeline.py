"""Hugging Face models through the whole sweep (tiny random Llama with grouped-query attention, and
BERT): 1 and 2 real MPI ranks agree, KV groups go whole, the run file and the exported directory
rebuild the pruned model with identical outputs."""
import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import hpcprune  # noqa: E402
from hpcprune.structure import Skip  # noqa: E402

from conftest import run_sweep  # noqa: E402

pytestmark = pytest.mark.slow  # whole sweeps in subprocesses

SMALL = ["data=text", "launcher=debug", "baseline.epochs=1", "data.train_bytes=32768", "data.val_bytes=8192",
         "data.calib_samples=32", "finetune.epochs=0", "sensitivity.ratios=[0.25,0.5,0.75]", "baseline.latency_repeats=2",
         "baseline.latency_batch=4", "importance=activation"]


def _x():
    return torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))


@pytest.mark.mpi
def test_llama_sweep_two_ranks_equal_one_reload_and_export(tmp_path):
    run_sweep(tmp_path / "one", "model=llama_tiny", *SMALL, "prune.target.macs=0.6", "threads=1", timeout=300)
    run_sweep(tmp_path / "two", "model=llama_tiny", *SMALL, "prune.target.macs=0.6", ranks=2, timeout=300)
    a_path = str(tmp_path / "one" / "run.h5")
    with h5py.File(a_path) as a, h5py.File(tmp_path / "two" / "run.h5") as b:
        kinds = {k.decode() if isinstance(k, bytes) else k for k in a["groups/kind"][()]}
        assert kinds == {"neurons", "heads", "block"}  # residual width and embeddings are left alone
        assert (a["sensitivity/status"][()] == 1).all()
        np.testing.assert_allclose(b["sensitivity/loss"][()], a["sensitivity/loss"][()], rtol=0, atol=1e-6)
        assert a["pruned"].attrs["macs_kept"] <= 0.6
    model = hpcprune.load_pruned(a_path)
    out_dir = tmp_path / "export"
    out = hpcprune.save_hf_dir(a_path, str(out_dir))  # plain transformers, or hpcprune's plan when widths differ
    own = {"hpcprune_plan.json"} if out.loader == "hpcprune" else {"generation_config.json"}
    assert {p.name for p in out_dir.iterdir()} == {"config.json", "model.safetensors", "README.md"} | own
    again = hpcprune.load_hf_dir(str(out_dir))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    with pytest.raises(FileExistsError, match="already holds"):
        hpcprune.save_hf_dir(a_path, str(out_dir))


def test_gqa_kv_groups_go_whole(tmp_path):
    """Uniform head pruning of a GQA Llama (4 query / 2 KV heads): one KV head and both of its query
    heads go; the model keeps 2 query heads per KV head, its output equals the in-run pruned model."""
    run_sweep(tmp_path / "run", "model=llama_tiny", *SMALL, "groups.kinds=[heads]", "prune.method=uniform",
              "prune.target.macs=0.9", "threads=1", timeout=300)
    path = str(tmp_path / "run" / "run.h5")
    model = hpcprune.load_pruned(path)
    for layer in model.hf.model.layers:
        attn = layer.self_attn
        assert attn.k_proj.out_features == attn.v_proj.out_features == 16  # 1 KV head x 16
        assert attn.q_proj.out_features == attn.o_proj.in_features == 32  # its 2 query heads
        assert attn.num_key_value_groups == 2
    with h5py.File(path) as f:
        plan = {n: f["pruned/plan"][n][()].tolist() for n in f["pruned/plan"]}
        stored = float(f["pruned"].attrs["metric"])
    assert all(len(v) == 1 for n, v in plan.items() if n.endswith(":heads"))
    out = hpcprune.save_hf_dir(path, str(tmp_path / "export"))
    assert out.loader == "transformers"  # every layer keeps one KV group: one config says so
    x = _x()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert (plain.config.num_attention_heads, plain.config.num_key_value_heads) == (2, 1)
    with torch.no_grad():
        torch.testing.assert_close(hpcprune.load_hf_dir(str(tmp_path / "export"))(x), model(x), atol=0, rtol=0)
        torch.testing.assert_close(plain(input_ids=x, use_cache=False).logits, model(x), atol=0, rtol=0)
    assert np.isfinite(stored)


def test_tied_embeddings_export(tmp_path):
    """A Llama whose output head shares the token embedding (SmolLM2's layout): the run file and the
    exported directory store the tensor once, and both reload to identical outputs."""
    run_sweep(tmp_path / "run", "model=llama_tiny", "model.tie_embeddings=true", *SMALL, "prune.target.macs=0.7",
              "threads=1", timeout=300)
    path = str(tmp_path / "run" / "run.h5")
    from hpcprune.store import RunFile, read_weights
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "pruned.safetensors"), "pt") as fh:  # one tensor, the other name an alias
        assert ("hf.model.embed_tokens.weight" in fh.keys()) != ("hf.lm_head.weight" in fh.keys())
    w = read_weights(RunFile(path), "pruned")
    assert w["hf.model.embed_tokens.weight"] is w["hf.lm_head.weight"]
    model = hpcprune.load_pruned(path)
    assert model.hf.lm_head.weight.data_ptr() == model.hf.model.embed_tokens.weight.data_ptr()
    hpcprune.save_hf_dir(path, str(tmp_path / "export"))
    again = hpcprune.load_hf_dir(str(tmp_path / "export"))
    assert again.hf.lm_head.weight.data_ptr() == again.hf.model.embed_tokens.weight.data_ptr()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_bert_depth_only_reload(tmp_path):
    """BERT, whole encoder layers only: the removed layer is a skip in the model rebuilt from the run
    file, and gone from the exported directory (one layer, renumbered), which computes the same."""
    run_sweep(tmp_path / "run", "model=bert_tiny", *SMALL, "groups.kinds=[block]", "prune.target.macs=null",
              "prune.target.params=0.9", "threads=1", timeout=300)
    path = str(tmp_path / "run" / "run.h5")
    model = hpcprune.load_pruned(path)
    skipped = [isinstance(layer, Skip) for layer in model.hf.bert.encoder.layer]
    assert sum(skipped) == 1
    out = hpcprune.save_hf_dir(path, str(tmp_path / "export"))
    assert out.loader == "transformers"
    again = hpcprune.load_hf_dir(str(tmp_path / "export"))
    assert len(again.hf.bert.encoder.layer) == again.hf.config.num_hidden_layers == len(skipped) - 1
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
