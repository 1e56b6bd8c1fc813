"""``model=hf model.path=DIR`` (hpcprune.zoo.hf_local): a local Hugging Face checkpoint loaded offline.

Tiny random Llama, GPT-2, BERT and ViT models (tests/test_hf_families.py's) saved with
``save_pretrained`` into folders, loaded through the packaged ``conf/model/hf.yaml`` as the sweep
builds a model: the right wrapper from ``config.architectures`` (or the model type), logits equal
to the saved model's, bf16 as ``from_pretrained(dtype=...)`` gives it; every refusal is one line
naming the value; one whole in-process sweep of a saved Llama on text files (tokenizer from
``model.path``), whose exported directory loads with plain ``AutoModelForCausalLM`` and computes
what the run's fine-tuned model computes."""
import json
import os
import shutil
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from hpcprune.config import ConfigError, instantiate  # noqa: E402
from hpcprune.runs import build_model  # noqa: E402
from hpcprune.zoo import hf  # noqa: E402

from conftest import compose, sweep_in_process  # noqa: E402
from test_hf_families import FAMILIES, _family  # noqa: E402
from test_text_files import tiny_tokenizer, words  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")
NAMES = ("llama", "gpt2", "bert", "vit")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder written by save_pretrained, the wrapped model saved, an input)."""
    out = {}
    for name in NAMES:
        model, x = _family(name)
        folder = tmp_path_factory.mktemp(name)
        model.hf.save_pretrained(str(folder))
        out[name] = (str(folder), model, x)
    return out


def _load(*overrides):
    return instantiate("model", build_model, compose(["model=hf", *overrides]).model)


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def test_auto_task_picks_the_wrapper_and_logits_equal(saved):
    for name in NAMES:
        folder, model, x = saved[name]
        got = _load(f"model.path={folder}")
        assert type(got).__name__ == FAMILIES[name][0], name
        assert torch.equal(_logits(got, x), _logits(model, x)), name
    folder, model, x = saved["gpt2"]
    assert torch.equal(_logits(_load(f"model.path={folder}", "model.task=causal-lm"), x), _logits(model, x))
    # bf16: as from_pretrained(dtype=bfloat16) loads it (rotary inv_freq kept float32)
    folder, _, x = saved["llama"]
    got = _load(f"model.path={folder}", "model.dtype=bfloat16")
    ref = hf._transformers().AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert got.hf.dtype == torch.bfloat16 and got.hf.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(_logits(got, x), ref(input_ids=x, use_cache=False).logits)


def _no_architectures(src, dest):
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.pop("architectures")
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_no_architectures_task_from_the_model_type(saved, tmp_path):
    """A config without architectures: the model type decides when one Auto class knows it (Llama:
    causal only); BERT has causal and masked heads, so it asks for model.task."""
    folder, model, x = saved["llama"]
    got = _load(f"model.path={_no_architectures(folder, tmp_path / 'llama')}")
    assert type(got).__name__ == "HFCausalLM" and torch.equal(_logits(got, x), _logits(model, x))
    bert = _no_architectures(saved["bert"][0], tmp_path / "bert")
    assert _error(f"model.path={bert}") == (f"model.task=auto: cannot tell the task of model type 'bert' ({bert} names no "
                                            "architecture; heads: causal-lm, masked-lm); give model.task= one of causal-lm, "
                                            "masked-lm, image-classification, seq2seq-lm")
    got = _load(f"model.path={bert}", "model.task=masked-lm")
    assert type(got).__name__ == "HFEncoderLM" and torch.equal(_logits(got, saved["bert"][2]), _logits(saved["bert"][1], saved["bert"][2]))


def _error(*overrides):
    with pytest.raises(ConfigError) as e:
        _load(*overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_refusals_are_one_line_naming_the_value(saved, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant" / "m-q4.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("x")
    base = tmp_path / "base"
    cfg = hf._transformers().BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg.architectures = ["BertModel"]
    cfg.save_pretrained(str(base))
    llama = saved["llama"][0]
    cases = [
        ([f"model.path={tmp_path}/none"], f"model.path={tmp_path}/none: no such file or directory"),
        ([f"model.path={tmp_path}/empty"], f"model.path={tmp_path}/empty: the directory holds no config.json"),
        ([f"model.path={tmp_path}/quant"], f"model.path={tmp_path}/quant: the directory holds no config.json; give "
                                           "model.gguf_file= one of m-q4.gguf"),
        ([f"model.path={tmp_path}/quant", "model.gguf_file=m-q8.gguf"], "model.gguf_file=m-q8.gguf: no such file in "
                                                                         f"model.path={tmp_path}/quant (its .gguf files: m-q4.gguf)"),
        ([f"model.path={tmp_path}/notes.txt"], f"model.path={tmp_path}/notes.txt: a file that is not .gguf"),
        ([f"model.path={base}"], f"model.path={base}: architecture 'BertModel' has no head any hpcprune wrapper serves; give "
                                 "model.task= one of causal-lm, masked-lm, image-classification, seq2seq-lm"),
        ([f"model.path={llama}", "model.task=masked-lm"], f"model.task=masked-lm: model type 'llama' ({llama}) has no masked-lm "
                                                           "head in transformers (AutoModelForMaskedLM)"),
        ([f"model.path={llama}", "model.task=translation"], "model.task=translation: unknown task; choose auto, causal-lm, "
                                                             "masked-lm, image-classification, seq2seq-lm"),
        ([f"model.path={llama}", "model.dtype=float64"], "model.dtype='float64': choose float32, bfloat16 or float16"),
    ]
    for overrides, start in cases:
        assert _error(*overrides).startswith(start), overrides
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert _error(f"model.path={llama}") == (f"model.path={llama}: model=hf needs the transformers package, which is not "
                                             "installed; pip install hpcprune[llm]")


REMOTE_CODE = """from transformers import LlamaConfig, LlamaForCausalLM


class MyConfig(LlamaConfig):
    model_type = "my_llama"


class MyLM(LlamaForCausalLM):
    config_class = MyConfig
"""


def test_remote_code_only_when_trusted(tmp_path, monkeypatch):
    """A checkpoint of a model type transformers does not know, built by the folder's own
    modeling_my.py (config.json auto_map): refused by default (one line); with
    model.trust_remote_code=true its class is loaded, its auto_map picks causal-lm, logits equal."""
    from transformers import dynamic_module_utils

    folder = tmp_path / "remote"
    model = hf.llama_tiny(vocab=64, context=32, seed=4).eval()
    model.hf.save_pretrained(str(folder))
    (folder / "modeling_my.py").write_text(REMOTE_CODE)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="my_llama", architectures=["MyLM"],
               auto_map={"AutoConfig": "modeling_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    assert _error(f"model.path={folder}") == (f"model.trust_remote_code=false: model type 'my_llama' in {folder} needs its "
                                              "own code (modeling_my.py, config.json auto_map); set "
                                              "model.trust_remote_code=true if you trust that code")
    # transformers copies the code into its modules cache: here, not the user's ~/.cache
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    try:
        got = _load(f"model.path={folder}", "model.trust_remote_code=true")
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        assert (type(got).__name__, type(got.hf).__name__) == ("HFCausalLM", "MyLM")
        assert torch.equal(_logits(got, x), _logits(model, x))
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("transformers_modules"):
                del sys.modules[name]


def _tiny_gguf(file, model):
    """``model`` (a float32 HFCausalLM Llama over 257 ids) written as llama.cpp writes a GGUF file,
    with the gguf package: its metadata, a byte-level BPE vocabulary (256 bytes + "ab", one merge)
    and F32 tensors, q/k rows permuted as llama.cpp's converter permutes them."""
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    gguf = pytest.importorskip("gguf")
    c = model.hf.config
    w = gguf.GGUFWriter(str(file), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([bytes_to_unicode()[b] for b in range(256)] + ["ab"])
    w.add_token_types([1] * 257)
    w.add_token_merges(["a b"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    for k, v in model.hf.state_dict().items():
        if "rotary_emb" in k:
            continue
        a = v.numpy()
        n = heads.get(k.split(".")[-2])
        if n:  # llama.cpp's permute (rotary halves interleaved)
            a = a.reshape(n, 2, a.shape[0] // n // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(names.get_name(k, try_suffixes=(".weight",)), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_model_and_tokenizer(tmp_path):
    """A .gguf file as model.path, or its folder with model.gguf_file: the model type (the file
    names no architecture) picks HFCausalLM; the dequantised F32 weights give the same logits;
    the tokenizer data=text_files reads from model.path and save_hf_dir writes come from the file."""
    from hpcprune.hf_dir import copy_tokenizer

    model = hf.llama_tiny(vocab=257, context=32, seed=2).eval()
    _tiny_gguf(tmp_path / "tiny-f32.gguf", model)
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    for overrides in ([f"model.path={tmp_path}/tiny-f32.gguf"], [f"model.path={tmp_path}", "model.gguf_file=tiny-f32.gguf"]):
        got = _load(*overrides)
        assert type(got).__name__ == "HFCausalLM" and torch.equal(_logits(got, x), _logits(model, x)), overrides
    for name in (str(tmp_path / "tiny-f32.gguf"), str(tmp_path)):  # the file; its folder (no tokenizer files, one .gguf)
        assert hf.load_tokenizer(name)("abc", add_special_tokens=False)["input_ids"] == [256, ord("c")]
    written = copy_tokenizer({"model": {"path": str(tmp_path), "gguf_file": "tiny-f32.gguf"}, "data": {}}, str(tmp_path / "out"))
    assert "tokenizer.json" in {os.path.basename(f) for f in written}
    again = hf._transformers().AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert again("abc", add_special_tokens=False)["input_ids"] == [256, ord("c")]


def test_sweep_of_a_saved_llama_and_its_exported_directory(tmp_path):
    """model=hf on a saved tiny Llama (its folder also holds the tokenizer: data=text_files reads it
    from model.path) through a whole sweep in this process; the dense weights are the checkpoint's;
    save_hf_dir copies the tokenizer and plain from_pretrained computes the fine-tuned model's logits."""
    import h5py

    import hpcprune
    from hpcprune.runs import dense_model, load_config
    from hpcprune.store import RunFile

    folder = tmp_path / "llama"
    model = hf.llama_tiny(vocab=62, context=32, seed=3).eval()
    model.hf.save_pretrained(str(folder))
    tiny_tokenizer(folder)
    (tmp_path / "a.txt").write_text(words(2000, 0))
    run = tmp_path / "run"
    assert sweep_in_process(run, "threads=1", "launcher=debug", "model=hf", f"model.path={folder}", "data=text_files",
                            f"data.paths=[{tmp_path}/a.txt]", "data.window=32", "baseline.epochs=0", "finetune.epochs=1",
                            "finetune.batch_size=4",
                            "sensitivity.ratios=[0.5]", "baseline.latency_repeats=1", "baseline.latency_batch=4",
                            "prune.method=uniform", "prune.target.macs=0.8") == 0
    rf = RunFile(str(run / "run.h5"))
    cfg = load_config(rf)
    assert cfg.data.tokenizer == str(folder) and cfg.model.path == str(folder)
    with h5py.File(run / "run.h5") as f:
        assert f["pruned"].attrs["macs"] <= 0.8 * f["baseline"].attrs["macs"]
    x = torch.randint(0, 62, (2, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(dense_model(rf, cfg), x), _logits(model, x))  # baseline.epochs=0: the checkpoint's weights
    out = hpcprune.save_hf_dir(str(run / "run.h5"), str(tmp_path / "export"))
    assert out.loader == "transformers" and {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    loaded = hf._transformers().AutoModelForCausalLM.from_pretrained(str(out))
    final = hpcprune.load_pruned(str(run / "run.h5"), weights="final")
    assert loaded.config.intermediate_size < model.hf.config.intermediate_size
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, final(x), atol=0, rtol=0)


def test_bidirectional_encoder_warned_once(saved, caplog):
    """A masked-LM checkpoint reads the token next-token data scores it on: one warning per process
    naming the model, none for a causal model."""
    from hpcprune.zoo import hf_local

    hf_local._WARNED.clear()
    with caplog.at_level("WARNING", logger="hpcprune.stages"):
        for _ in range(2):
            _load(f"model.path={saved['bert'][0]}")
        _load(f"model.path={saved['llama'][0]}")
    lines = [r.getMessage() for r in caplog.records if "bidirectional encoder" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("model: BertForMaskedLM (bert) is a bidirectional encoder"), lines


def _vision(name):
    """Tiny random ``transformers`` image classifiers for 1x8x8 digits whose configs hold per-stage
    widths (and head counts): no single ``hidden_size`` / ``num_attention_heads``."""
    tf = hf._transformers()
    torch.manual_seed(0)
    common = dict(num_labels=10, num_channels=1)
    if name == "convnextv2":
        return tf.ConvNextV2ForImageClassification(tf.ConvNextV2Config(patch_size=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                                       num_stages=2, image_size=8, **common))
    if name == "resnet":
        return tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                               layer_type="bottleneck", **common))
    return tf.SwinForImageClassification(tf.SwinConfig(image_size=8, patch_size=2, embed_dim=8, depths=[1, 1],
                                                       num_heads=[2, 4], window_size=2, mlp_ratio=2.0, **common))


@pytest.mark.parametrize("name", ["resnet", "swin"])
def test_image_classifiers_with_per_stage_widths_get_the_structure_of_own_models(name, tmp_path):
    """HF ResNet / Swin (``hidden_sizes``, per-stage ``num_heads``) through model=hf: structured as a
    model of one's own (Torch-Pruning's channel groups, recognised attentions), not refused with an
    AttributeError on ``config.hidden_size``; their groups verified as every group is."""
    from hpcprune.graph import Graph
    from hpcprune.runs import ignore_names
    from hpcprune.verify import verify_groups

    _vision(name).save_pretrained(str(tmp_path))
    model = _load(f"model.path={tmp_path}").eval()
    assert isinstance(model, hf.HFImageClassifier)
    x = torch.randn(4, 1, 8, 8)
    graph = Graph(model, x, ignore_names(model, []))
    excluded = verify_groups(graph, x, 0.5)
    kept = [g for g in graph.groups if g.kind in ("channels", "neurons")]
    assert len(kept) >= 2, (graph.groups, excluded)
    if name == "swin":  # its attentions recognised (heads), then excluded by verification: a per-head position table
        assert any(e.name.endswith(":heads") for e in excluded)


def test_sweep_of_a_saved_convnext_v2(tmp_path):
    """model=hf on a saved tiny ConvNeXt-V2 (a CNN: no hidden_size in its config) through a whole
    sweep: it is pruned to its MACs target, and the reloaded model's MACs and metric are the run's."""
    import h5py

    import hpcprune
    from hpcprune import metrics
    from hpcprune.zoo.data import digits

    _vision("convnextv2").save_pretrained(str(tmp_path / "ckpt"))
    run = tmp_path / "run"
    assert sweep_in_process(run, "threads=1", "launcher=debug", "model=hf", f"model.path={tmp_path / 'ckpt'}",
                            "data=digits", "data.calib_samples=64", "data.val_samples=64", "baseline.epochs=0",
                            "finetune.epochs=0", "sensitivity.ratios=[0.5]", "baseline.latency_repeats=1",
                            "baseline.latency_batch=4", "prune.target.macs=0.7") == 0
    with h5py.File(run / "run.h5") as f:
        macs, metric, dense = f["final"].attrs["macs"], f["final"].attrs["metric"], f["baseline"].attrs["macs"]
    assert macs <= 0.7 * dense
    model = hpcprune.load_pruned(str(run / "run.h5")).eval()
    data = digits(calib_samples=64, val_samples=64)
    assert metrics.macs(model, data.example_input) == macs
    assert metrics.evaluate(model, metrics.make_batches(data.val, 256)).metric("accuracy") == pytest.approx(metric, rel=1e-6)
