"""Hugging Face model families through hpcprune: tiny random configs built with ``transformers``' own
classes (nothing downloaded), wrapped as hpcprune wraps them, their groups found from config and
modules (``zoo.hf_structure``), every group verified, the exact cost model derived, and a plan
applied the way the prune stage applies it (``Graph(...).apply_plan`` on a fresh copy).

Per family: the expected group kinds appear (T5's heads are refused with the reason: its position
bias is shared by the whole stack); verification excludes nothing but the output layer; the pruned
model runs, keeps the output's shape, equals the dense model with the removed units masked in place,
and, where the config can express the pruned widths, equals a model built at those widths with the
pruned weights (so buffers derived from the config, Gemma's ``embed_scale`` and every rotary
``inv_freq``, are right); its parameters and MACs equal the cost model's prediction; a plan that
keeps everything leaves the output unchanged."""
import copy

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from hpcprune import allocate, importance, metrics  # noqa: E402
from hpcprune.costs import ExactCost, probes_from_graph  # noqa: E402
from hpcprune.graph import Graph, mask_group, n_keep  # noqa: E402
from hpcprune.runs import ignore_names  # noqa: E402
from hpcprune.verify import OUTPUT, verify_groups  # noqa: E402
from hpcprune.zoo import hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")

L, D, I, H = 2, 32, 48, 4  # layers, residual width, MLP width, query heads (head width 8)
LM = dict(vocab_size=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)
STD = dict(hidden_size=D, num_hidden_layers=L)  # the usual config names
# family: (wrapper, config class, model class, config, MLP-width key, head widths expressible in the config)
FAMILIES = {
    "llama": ("HFCausalLM", "LlamaConfig", "LlamaForCausalLM", dict(**LM, **STD, num_key_value_heads=2, head_dim=8),
              "intermediate_size", True),
    "qwen2": ("HFCausalLM", "Qwen2Config", "Qwen2ForCausalLM", dict(**LM, **STD, num_key_value_heads=2, head_dim=8),
              "intermediate_size", True),
    "qwen3": ("HFCausalLM", "Qwen3Config", "Qwen3ForCausalLM", dict(**LM, **STD, num_key_value_heads=2, head_dim=8),
              "intermediate_size", True),
    "mistral": ("HFCausalLM", "MistralConfig", "MistralForCausalLM", dict(**LM, **STD, num_key_value_heads=2, head_dim=8),
                "intermediate_size", True),
    "gemma": ("HFCausalLM", "GemmaConfig", "GemmaForCausalLM", dict(**LM, **STD, num_key_value_heads=2, head_dim=8),
              "intermediate_size", True),
    "gemma2": ("HFCausalLM", "Gemma2Config", "Gemma2ForCausalLM", dict(**LM, **STD, num_key_value_heads=2, head_dim=8),
               "intermediate_size", True),
    "phi": ("HFCausalLM", "PhiConfig", "PhiForCausalLM", dict(**LM, **STD), "intermediate_size", False),
    "phi3": ("HFCausalLM", "Phi3Config", "Phi3ForCausalLM", dict(**LM, **STD, num_key_value_heads=2, head_dim=8),
             "intermediate_size", True),
    "opt": ("HFCausalLM", "OPTConfig", "OPTForCausalLM", dict(**LM, **STD, word_embed_proj_dim=D), "ffn_dim", False),
    "gpt2": ("HFCausalLM", "GPT2Config", "GPT2LMHeadModel", dict(**LM, **STD, n_positions=64), "n_inner", False),
    "gpt_neox": ("HFCausalLM", "GPTNeoXConfig", "GPTNeoXForCausalLM", dict(**LM, **STD), "intermediate_size", False),
    # Falcon: its own KV keys; the new decoder architecture fuses [q q k v] per KV group, the old one
    # without multi-query [q k v] per head (both interleaved; found by hpcprune from the config)
    "falcon": ("HFCausalLM", "FalconConfig", "FalconForCausalLM",
               dict(**LM, **STD, new_decoder_architecture=True, num_kv_heads=2, bias=False), "ffn_hidden_size", False),
    "falcon_mha": ("HFCausalLM", "FalconConfig", "FalconForCausalLM",
                   dict(**LM, **STD, new_decoder_architecture=False, multi_query=False, bias=True), "ffn_hidden_size", False),
    "bert": ("HFEncoderLM", "BertConfig", "BertForMaskedLM", dict(vocab_size=128, **STD, max_position_embeddings=64),
             "intermediate_size", False),
    "roberta": ("HFEncoderLM", "RobertaConfig", "RobertaForMaskedLM", dict(vocab_size=128, **STD, max_position_embeddings=64),
                "intermediate_size", False),
    "distilbert": ("HFEncoderLM", "DistilBertConfig", "DistilBertForMaskedLM",
                   dict(vocab_size=128, **STD, max_position_embeddings=64), "hidden_dim", False),
    "vit": ("HFImageClassifier", "ViTConfig", "ViTForImageClassification",
            dict(**STD, image_size=16, patch_size=4, num_labels=10, head_dim=8), "intermediate_size", True),
    "t5": ("HFSeq2SeqLM", "T5Config", "T5ForConditionalGeneration",
           dict(vocab_size=128, **STD, num_decoder_layers=L, d_kv=8, decoder_start_token_id=0, pad_token_id=0), "d_ff", False),
}
KINDS = {"t5": {"neurons", "block"}}  # T5: heads refused (see the module docstring); every other: all three


def _hf(name: str, inter: int = I, heads: int = H, kv_heads: int | None = None) -> torch.nn.Module:
    _, cfg_cls, model_cls, cfg, inter_key, _ = FAMILIES[name]
    tf = hf._transformers()
    cfg = dict(cfg, **{inter_key: inter, "num_attention_heads": heads})
    if "num_key_value_heads" in cfg:
        cfg["num_key_value_heads"] = kv_heads or cfg["num_key_value_heads"]
    config = getattr(tf, cfg_cls)(**cfg)
    return getattr(tf, model_cls)(config).float().eval()


def _family(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = getattr(hf, FAMILIES[name][0])(_hf(name)).eval()
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking weights: no two heads or neurons alike, no two norms alike either
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen) if name == "vit" else torch.randint(3, 128, (2, 16), generator=gen)
    return model, x


def _plan(graph: Graph, ratios: np.ndarray, scores: dict) -> dict[str, list[int]]:
    """The prune stage's plan (``stages.context.plan``): the lowest-scored units go first."""
    orders = {g.name: importance.prune_order(scores[g.name]) for g in graph.groups}
    return {g.name: (sorted(orders[g.name][g.size - n_keep(g, float(r)):]) if g.kind in ("heads", "block")
                     else g.unit_channels(orders[g.name][g.size - n_keep(g, float(r)):]))
            for g, r in zip(graph.groups, ratios)}


def _pruned(model: torch.nn.Module, x: torch.Tensor, plan: dict[str, list[int]]) -> torch.nn.Module:
    pruned = copy.deepcopy(model)
    Graph(pruned, x[:1], ignore_names(pruned, [])).apply_plan(plan)
    return pruned.eval()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_groups_prune_and_costs(name):
    torch.set_num_threads(1)
    model, x = _family(name)
    with torch.no_grad():
        dense = model(x)
    graph = Graph(model, x[:1], ignore_names(model, []))
    assert {g.kind for g in graph.groups} == KINDS.get(name, {"neurons", "heads", "block"})
    assert len([g for g in graph.groups if g.kind == "block"]) == L * (2 if name == "t5" else 1)
    refused = {e.name for e in graph.excluded}
    if name == "t5":  # encoder self-, decoder self- and cross-attention of both layers
        assert len(refused) == 3 * L and all("per head" in e.reason for e in graph.excluded)
    else:
        assert not refused
    verify_groups(graph, x, 0.5)
    assert {e.reason for e in graph.excluded if e.name not in refused} <= {OUTPUT}  # only a classifier (ViT)
    cost = allocate.CostModel.from_exact(graph.groups, ExactCost.derive(model, x[:1], probes_from_graph(graph)))
    scores = importance.group_scores(graph, "l2")
    dense_params, dense_macs = metrics.params(model), metrics.macs(model, x[:1])
    kinds = np.array([g.kind for g in graph.groups])
    last_block = max(i for i, k in enumerate(kinds) if k == "block")
    width = np.where(kinds == "block", 0.0, 0.5)  # half the MLP neurons and KV groups of every layer
    mixed = np.where(kinds == "block", 0.0, 0.25)
    mixed[last_block] = 1.0  # and one layer removed
    for ratios in (width, mixed):
        pruned = _pruned(model, x, _plan(graph, ratios, scores))
        with torch.no_grad():
            y = pruned(x)
        assert y.shape == dense.shape and torch.isfinite(y).all()
        assert metrics.params(pruned) == pytest.approx(cost.fraction("params", ratios) * dense_params, rel=1e-9)
        assert metrics.macs(pruned, x[:1]) == pytest.approx(cost.fraction("macs", ratios) * dense_macs, rel=1e-9)
        assert metrics.params(pruned) < dense_params
        n_blocks = len([g for g in graph.groups if g.kind == "block"])
        assert len(pruned.prune_structure().blocks) == n_blocks - int(ratios[last_block] >= 0.5)  # read again, pruned
    # the width plan on the groups that can be masked exactly (not Phi-3's strided gate_up neurons), as masks on
    # the dense model: the same function
    plan = _plan(graph, np.array([0.5 if g.maskable and g.kind != "block" else 0.0 for g in graph.groups]), scores)
    pruned = _pruned(model, x, plan)
    mods = dict(model.named_modules())
    masks = [mask_group(mods, g, [i for i in range(g.size) if i not in set(graph.plan_units(g, plan[g.name]))])
             for g in graph.groups if g.maskable and g.kind != "block"]
    try:
        with torch.no_grad():
            masked = model(x)
    finally:
        for m in reversed(masks):
            m.restore()
    with torch.no_grad():
        y = pruned(x)
        torch.testing.assert_close(y, masked, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(y, dense, atol=1e-4)
        kept_all = _pruned(model, x, _plan(graph, np.zeros(len(graph.groups)), scores))
        torch.testing.assert_close(kept_all(x), dense, atol=0, rtol=0)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f[5]] + ["gpt2", "bert", "t5"])
def test_pruned_equals_model_built_at_its_widths(name):
    """The pruned model's weights in a model built at the pruned widths (every layer: half the MLP
    neurons; where the config names the head width, half the KV groups) compute the same outputs:
    nothing the model derives from its config at construction (embedding scale, rotary
    frequencies, head counts, sliding windows) is left at the dense value."""
    torch.set_num_threads(1)
    model, x = _family(name)
    graph = Graph(model, x[:1], ignore_names(model, []))
    verify_groups(graph, x, 0.5)  # as the groups stage: ViT's classifier is kept
    heads = FAMILIES[name][5]
    ratios = np.array([0.5 if g.kind == "neurons" or (heads and g.kind == "heads") else 0.0 for g in graph.groups])
    pruned = _pruned(model, x, _plan(graph, ratios, importance.group_scores(graph, "l1")))
    kv = FAMILIES[name][3].get("num_key_value_heads", H)
    rebuilt = _hf(name, inter=I // 2, heads=H // 2 if heads else H, kv_heads=kv // 2 if heads else kv)
    rebuilt.load_state_dict(pruned.hf.state_dict(), strict=True)
    rebuilt = getattr(hf, FAMILIES[name][0])(rebuilt).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), rebuilt(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["phi3", "gpt2"])
def test_head_scores_of_fused_projections_by_hand(name):
    """The l2 score of KV group 1, by hand: its rows in each block of the fused projection (Phi-3's
    ``qkv_proj``: [q 32; k 16; v 16] rows, 2 query heads of 8 per KV group; GPT-2's ``c_attn``, an HF
    Conv1D with weight [in, out] and bias: [q; k; v] columns of 32) and its input channels of the
    output projection."""
    model, x = _family(name)
    graph = Graph(model, x[:1], ignore_names(model, []))
    g = next(g for g in graph.groups if g.kind == "heads")
    attn = model.get_submodule(g.name.split(":")[0])
    sq = lambda t: float((t.detach().double() ** 2).sum())  # noqa: E731
    if name == "phi3":
        rows = [*range(16, 32), *range(40, 48), *range(56, 64)]
        want = sq(attn.qkv_proj.weight[rows]) + sq(attn.o_proj.weight[:, 16:32])
    else:
        cols = [*range(8, 16), *range(40, 48), *range(72, 80)]
        want = sq(attn.c_attn.weight[:, cols]) + sq(attn.c_attn.bias[cols]) + sq(attn.c_proj.weight[8:16])
    assert float(importance.group_scores(graph, "l2")[g.name][1]) == pytest.approx(want, rel=1e-12)


def test_config_that_does_not_fit_the_modules_is_refused_in_one_line():
    from hpcprune.structure import StructureError

    model, _ = _family("llama")
    model.hf.config.head_dim = 5  # no projection splits into heads of 5
    with pytest.raises(StructureError, match=r"LlamaForCausalLM .*head_dim=5") as e:
        model.prune_structure()
    assert "\n" not in str(e.value)


# families whose heads (or experts) hpcprune cannot cut: refused on the architecture, each with its reason
REFUSED = {
    "stablelm_qk_layernorm": ("StableLmConfig", "StableLmForCausalLM", dict(num_key_value_heads=2, qk_layernorm=True),
                              ":heads", "self_attn.q_layernorm.norms holds one LayerNorm per head (4)"),
    "cohere_qk_norm": ("CohereConfig", "CohereForCausalLM", dict(num_key_value_heads=2, use_qk_norm=True),
                       ":heads", "self_attn.q_norm.weight (4, 8) holds a value per head"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2),
              ":heads", "self_attn.k_norm (Olmo2RMSNorm over 16 channels) normalises every head's channels together"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=L, n_head=H), ":heads", "bloom adds ALiBi position biases"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
                ":experts", "holds its experts' weights as 3-D parameters"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_uncuttable_heads_and_experts_refused_with_their_reason(name):
    """Per-head state the cut would not follow (a list of per-head norms, a per-head norm weight, a norm
    over all heads together, ALiBi slopes) and fused 3-D expert weights: excluded on the architecture, one
    reason per layer naming that layer's own module; the rest (neurons, layers) still pruned. Before,
    StableLM's per-head norms made a silently wrong cut and the others failed with raw shape errors."""
    cfg_cls, model_cls, extra, kind, phrase = REFUSED[name]
    tf = hf._transformers()
    cfg = dict(LM, hidden_size=D, intermediate_size=I, num_attention_heads=H, **extra)
    if name != "bloom":
        cfg["num_hidden_layers"] = L
    torch.manual_seed(0)
    model = hf.HFCausalLM(getattr(tf, model_cls)(getattr(tf, cfg_cls)(**cfg)).float()).eval()
    x = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    graph = Graph(model, x, ignore_names(model, []))
    refused = [e for e in graph.excluded if e.name.endswith(kind)]
    assert len(refused) == L, [(e.name, e.reason) for e in graph.excluded]
    for e in refused:
        assert phrase in e.reason and "\n" not in e.reason, e.reason
        own = e.name.split(":")[0]  # the reason names its own layer's module, not another layer's
        assert name == "bloom" or (e.reason.startswith(own) and e.reason[len(own)] in ". "), e.reason
    assert {g.kind for g in graph.groups} >= {"block"}


@pytest.mark.parametrize("cfg_cls,model_cls,wrapper,extra", [
    ("Gemma3TextConfig", "Gemma3ForCausalLM", "HFCausalLM", dict(num_key_value_heads=2, head_dim=8)),  # annotated tuple, returns the tensor
    ("DebertaV2Config", "DebertaV2ForMaskedLM", "HFEncoderLM", dict()),  # returns (hidden_states, att_matrix)
], ids=["gemma3", "deberta_v2"])
def test_removed_layers_return_what_the_layer_returned(cfg_cls, model_cls, wrapper, extra):
    """A removed layer's stand-in returns what the layer's body returns (a tensor, or a tuple of that
    length with None after the hidden states), not what a stale annotation says: every layer is removable
    (verified on the architecture), and the model without a layer equals a hand-built one-layer model."""
    tf = hf._transformers()
    cfg = dict(LM, hidden_size=D, intermediate_size=I, num_attention_heads=H, num_hidden_layers=L, **extra)
    torch.manual_seed(0)
    model = getattr(hf, wrapper)(getattr(tf, model_cls)(getattr(tf, cfg_cls)(**cfg)).float()).eval()
    x = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    graph = Graph(model, x, ignore_names(model, []))
    verify_groups(graph, x, 0.5)
    blocks = [g for g in graph.groups if g.kind == "block"]
    assert len(blocks) == L and not [e for e in graph.excluded if e.name.endswith(":block")], graph.excluded
    pruned = _pruned(model, x, {blocks[1].name: []})
    ref = copy.deepcopy(model)
    del next(m for m in ref.hf.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == L)[1]
    with torch.no_grad():
        assert torch.allclose(metrics.logits_of(pruned(x)), metrics.logits_of(ref(x)), atol=1e-5)


def test_gpt_bigcode_multi_head_fused_rows_are_per_head():
    """GPTBigCode without multi-query views c_attn as (heads, 3 * head_dim), as GPT-NeoX: its heads are
    groups that pass verification (the model without them equals the dense one with their outputs
    zeroed); with multi-query its rows are [q; k; v] and its one KV group is a group of one unit."""
    tf = hf._transformers()
    for multi_query, units in ((False, H), (True, 1)):
        cfg = tf.GPTBigCodeConfig(vocab_size=128, n_embd=D, n_layer=L, n_head=H, n_inner=I, multi_query=multi_query)
        torch.manual_seed(0)
        model = hf.HFCausalLM(tf.GPTBigCodeForCausalLM(cfg).float()).eval()
        x = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(1))
        graph = Graph(model, x, ignore_names(model, []))
        verify_groups(graph, x, 0.5)
        assert [g.size for g in graph.groups if g.kind == "heads"] == [units] * L, graph.excluded
