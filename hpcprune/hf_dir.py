"""A pruned Hugging Face model as a directory that reloads without the run file
(``hpcprune.save_hf_dir`` / ``hpcprune.load_hf_dir``; ``hpcprune.export`` re-exports both).

Two kinds of directory; :func:`save_hf_dir` writes the first where it can and says which (one
line, returned as :attr:`HFDir.line` and logged, and at the top of the directory's ``README.md``):

- **transformers** (plain): when one config can describe the pruned model (every layer keeps the
  same MLP width and KV heads; removed layers are dropped and the others renumbered:
  :mod:`hpcprune.hf_plain` says which families and cuts), ``config.json`` (the config class's own
  ``save_pretrained``) and ``model.safetensors`` (the model's ``save_pretrained``) at the pruned
  shapes: ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads it without hpcprune.
  Before the files are kept they are loaded so and run on the run's example input; the outputs
  must equal the pruned model's (float32: within 1e-5 of their scale).
- **hpcprune** (the fallback: layers of different widths): ``config.json`` describes the pruned
  widths through transformers' ``per_layer_config`` (which ``AutoConfig`` reads but Llama and
  the other families' modeling code do not), ``model.safetensors`` the pruned weights under the
  dense layer names, ``hpcprune_plan.json`` the base config, the wrapper, per pruned group its
  member layers (dimension, channels per unit, fused blocks) and kept units, and removed blocks.
  :func:`load_hf_dir` builds the base architecture on the meta device, cuts every group, replaces
  removed blocks by skips and loads the weights strictly; it is checked the same way.

Both get the tokenizer files of the run's model or data (``model.path``, a ``data.tokenizer``
folder; SmolLM2's and a ``model=hf`` GGUF file's from the GGUF file) when it has one.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from . import hf_plain
from .errors import HpcpruneError
from .graph import GroupInfo, Member, skip_block, slice_group
from .structure import structure_of

FORMAT = "hpcprune-hf-2"  # 1: config.json was the base config and members had no fused blocks (still read)
_WRAPPERS = tuple(hf_plain.AUTO_CLASS)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json")
log = logging.getLogger(__name__)


class HFDirError(HpcpruneError, ValueError):
    """A run or directory :func:`save_hf_dir` / :func:`load_hf_dir` cannot use."""


class HFDirExists(HpcpruneError, FileExistsError):
    """The output directory already holds a model."""


@dataclass
class HFDir:
    """What :func:`save_hf_dir` wrote: ``loader`` ``transformers`` (plain ``from_pretrained``) or
    ``hpcprune`` (:func:`load_hf_dir`), ``reason`` why transformers alone cannot (empty for plain),
    ``max_abs_diff`` between the reloaded model's outputs and the pruned model's on the run's
    example input. ``os.fspath`` / ``str`` give the path."""

    path: str
    loader: str
    reason: str
    max_abs_diff: float
    auto_class: str = ""

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    @property
    def line(self) -> str:
        if self.loader == "transformers":
            return (f"{self.path}: plain transformers directory: {self.auto_class}.from_pretrained loads it "
                    f"(max |difference| to the pruned model {self.max_abs_diff:.3g})")
        return (f"{self.path}: hpcprune directory (load it with hpcprune.load_hf_dir; max |difference| "
                f"{self.max_abs_diff:.3g}): transformers cannot build it: {self.reason}")


def save_hf_dir(run_path: str, out_dir: str, weights: str = "final") -> HFDir:
    """Write the pruned model of run file ``run_path`` (``weights``: final, pruned or plan) to
    ``out_dir`` (created; must not hold a model.safetensors): a plain transformers directory when
    one config can describe it, else an hpcprune one (module docstring). Raises
    :class:`HFDirError` when the model is no Hugging Face wrapper, :class:`HFDirExists` when
    ``out_dir`` holds a model, ValueError when the reloaded model does not compute the same."""
    from .runs import RunFile, example_input, load_config, pruned_model, read_plan

    run = RunFile(run_path)
    cfg = load_config(run)
    model = pruned_model(run, cfg, weights=weights)
    plan = read_plan(run)
    source = {"run": os.path.abspath(run_path), "weights": weights, "model_config": _plain(cfg.model)}
    out = write_hf_dir(model, _group_infos(run), plan, out_dir, example_input(run)[:2], source)
    copy_tokenizer(_plain(cfg), out_dir)
    return out


def write_hf_dir(model: nn.Module, groups: Sequence[GroupInfo], plan: dict[str, Sequence[int]], out_dir: str,
                 example: torch.Tensor, source: dict[str, Any] | None = None) -> HFDir:
    """:func:`save_hf_dir` for a pruned wrapper ``model`` (eval mode) given the dense model's
    ``groups`` (all of them: its block groups give the layer lists) and ``plan`` (kept units or root
    channels per group; a group not in it is kept whole); ``example`` is checked on the reloaded model."""
    wrapper = type(model).__name__
    if wrapper not in _WRAPPERS:
        raise HFDirError(f"the model is a {wrapper}, not a Hugging Face wrapper ({', '.join(_WRAPPERS)}); "
                         "use hpcprune.load_pruned(run file) instead")
    if os.path.exists(os.path.join(out_dir, "model.safetensors")):
        raise HFDirExists(f"{out_dir}: already holds a model.safetensors; choose a new directory")
    os.makedirs(out_dir, exist_ok=True)
    layers, reason = hf_plain.layers_of(model, groups, plan)
    dense, n_rep, hd = _dense_widths(model, groups)
    arch = type(model.hf).__name__
    config = None
    if not reason:
        config, reason = hf_plain.plain_config(model.hf.config, arch, layers, dense, n_rep, hd)
    result = None
    if config is not None:
        result = _write_plain(model, wrapper, layers, config, out_dir, example)
        reason = result.reason
    if result is None or result.loader != "transformers":
        result = _write_plan(model, wrapper, groups, plan, layers, (dense, n_rep, hd), out_dir, example, reason, source)
    _readme(result, source, layers)
    log.info(result.line)
    return result


def _dense_widths(model: nn.Module, groups: Sequence[GroupInfo]) -> tuple[dict[str, int], int, int]:
    """({"mlp": dense MLP width, "kv_heads": dense KV groups per attention}, query heads per KV head, head width)."""
    from .zoo.hf_structure import _config_dims

    dense = {}
    for kind, key in (("neurons", "mlp"), ("heads", "kv_heads")):
        sizes = {g.size for g in groups if g.kind == kind}
        if len(sizes) == 1:
            dense[key] = sizes.pop()
    _, _, n_rep, hd = _config_dims(model.hf.config)
    return dense, n_rep, hd


def _write_plain(model: nn.Module, wrapper: str, layers: list[hf_plain.Layer], config: Any, out_dir: str,
                 example: torch.Tensor) -> HFDir:
    """Save the renumbered model at ``config``'s shapes into a temporary folder in ``out_dir``, load
    it with plain transformers and compare; move its files into ``out_dir`` when it computes the
    same, else return an HFDir with loader ``hpcprune`` and the reason."""
    auto = hf_plain.AUTO_CLASS[wrapper]
    fail = lambda why: HFDir(out_dir, "hpcprune", why, float("nan"))  # noqa: E731
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".plain-")
    try:
        try:
            with hf_plain.renumbered(model, layers, config) as hf, _quiet():
                mismatch = hf_plain.shape_mismatch(hf, config)
                if mismatch and config.num_attention_heads != model.hf.config.num_attention_heads:
                    mismatch += (f" (its heads were cut: {type(hf).__name__} sizes a head as hidden_size / "
                                 "num_attention_heads, not by head_dim)")
                if mismatch:
                    return fail(mismatch)
                config.architectures = [type(hf).__name__]
                hf.save_pretrained(tmp)
            with _quiet():
                diff = hf_plain.check_plain(tmp, wrapper, model, example)
        except Exception as e:  # noqa: BLE001 - why transformers cannot build or load it is the reason recorded
            return fail(f"transformers refuses the pruned config ({type(e).__name__}: {_first_line(e)})")
        if not diff <= hf_plain.tolerance(_dtype(model)) * _scale(model, example):
            return fail(f"{auto}.from_pretrained builds a model whose outputs differ by {diff:.3g} (a value the "
                        "config derives that pruning changed)")
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        return HFDir(out_dir, "transformers", "", diff, auto)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_plan(model: nn.Module, wrapper: str, groups: Sequence[GroupInfo], plan: dict[str, Sequence[int]],
                layers: list[hf_plain.Layer], widths: tuple[dict[str, int], int, int], out_dir: str, example: torch.Tensor,
                reason: str, source: dict[str, Any] | None) -> HFDir:
    """The hpcprune directory (module docstring), loaded back with :func:`load_hf_dir` and compared."""
    from safetensors.torch import save_model

    cut = [_group_record(model, g, plan[g.name]) for g in groups if g.name in plan and _pruned(g, plan[g.name])]
    base = copy.deepcopy(model.hf.config)
    base.architectures = [type(model.hf).__name__]  # unset on models built from a config
    try:
        with _quiet():  # transformers warns once per per-layer key its checks read globally
            hf_plain.described_config(base, layers, *widths).save_pretrained(out_dir)
    except Exception as e:  # noqa: BLE001 - a config class that refuses the description: the base config then
        log.info("%s: config.json is the dense config (%s refuses the pruned widths: %s)", out_dir, type(base).__name__,
                 _first_line(e))
        base.save_pretrained(out_dir)
    tmp = tempfile.NamedTemporaryFile(dir=out_dir, suffix=".tmp", delete=False)
    tmp.close()
    save_model(model.hf, tmp.name)  # tied weights (embedding = output head) are stored once
    doc = {"format": FORMAT, "wrapper": wrapper, "dtype": str(_dtype(model)).removeprefix("torch."),
           "base_config": base.to_dict(), "groups": cut, **(source or {})}
    with open(os.path.join(out_dir, "hpcprune_plan.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp.name, os.path.join(out_dir, "model.safetensors"))
    again = load_hf_dir(out_dir)
    with torch.no_grad():
        diff = float((again(example).float() - model(example).float()).abs().max())
    if not diff <= hf_plain.tolerance(_dtype(model)) * _scale(model, example):
        raise ValueError(f"{out_dir}: the reloaded model's outputs differ from the pruned model's by {diff:.3g}")
    return HFDir(out_dir, "hpcprune", reason, diff)


def _pruned(g: GroupInfo, kept: Sequence[int]) -> bool:
    from .graph import Graph

    return len(Graph.plan_units(g, kept)) < g.size


def _group_record(model: nn.Module, g: GroupInfo, kept: Sequence[int]) -> dict[str, Any]:
    """A pruned group as plain data for ``hpcprune_plan.json``. Members list ``[module, out, unit,
    chunks, parts]``; a group whose units are strided over its root's channels (Phi-3's fused
    ``gate_up_proj``: neuron u is rows u and u + size) is written as members of ``chunks`` equal
    blocks, the member's pruned width over the kept units, so that slicing reproduces the cut."""
    from .cuts import _dim_size
    from .graph import Graph

    units = Graph.plan_units(g, kept)
    members = [[m.module, m.out, m.unit, m.chunks, list(m.parts)] for m in g.members]
    if g.kind != "block" and not g.sliceable:
        mods = dict(model.named_modules())
        if g.channels <= g.size or any(not hf_plain.is_projection(mods.get(m.module)) for m in g.members):
            raise HFDirError(f"group {g.name}: its layers ({', '.join(g.layer_types)}) index channels through a mapping "
                             "the directory format cannot record; use hpcprune.load_pruned(run file)")
        members = []
        for m in g.members:
            chunks, rem = divmod(_dim_size(mods[m.module], m.out), len(units))
            if rem:
                raise HFDirError(f"group {g.name}: {m.module} holds no whole number of blocks of the kept units")
            members.append([m.module, m.out, 1, chunks, []])
    return {"name": g.name, "kind": g.kind, "size": g.size, "kept": [int(k) for k in units], "block": g.block,
            "members": members, "attrs": [list(a) for a in g.attrs]}


def load_hf_dir(path: str) -> nn.Module:
    """The pruned model in ``path`` (written by :func:`save_hf_dir`), in eval mode, as hpcprune's
    wrapper (the transformers model is ``.hf``): a plain directory through ``from_pretrained``, an
    hpcprune one rebuilt from its plan. Raises :class:`HFDirError` for a foreign directory."""
    from .zoo import hf as zhf

    tf = zhf._transformers()
    plan_file = os.path.join(path, "hpcprune_plan.json")
    if not os.path.exists(plan_file):
        config = tf.AutoConfig.from_pretrained(path)
        arch = (config.architectures or [""])[0]
        wrapper = hf_plain.wrapper_of(arch)
        if wrapper is None:
            raise HFDirError(f"{path}: config.json names architecture {arch!r}, which no hpcprune wrapper runs")
        with _quiet():
            hf = getattr(tf, hf_plain.AUTO_CLASS[wrapper]).from_pretrained(path)
        return getattr(zhf, wrapper)(hf).eval()
    with open(plan_file) as fh:
        doc = json.load(fh)
    if doc.get("format") not in ("hpcprune-hf-1", FORMAT):
        raise HFDirError(f"{path}: hpcprune_plan.json has format {doc.get('format')!r}, expected {FORMAT!r}")
    if doc["format"] == FORMAT:
        base = dict(doc["base_config"])
        config = tf.AutoConfig.for_model(base.pop("model_type"), **base)
    else:
        config = tf.AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    cls = getattr(tf, arch, None) if arch else None
    if cls is None:
        raise HFDirError(f"{path}: its config names architecture {arch!r}, which this transformers does not have")
    from transformers.initialization import no_init_weights

    # uninitialised parameters (the weights file fills them); the buffers the model derives from its
    # config (rotary inv_freq, Gemma's embed_scale, position ids) computed as its __init__ computes them,
    # float32 where from_pretrained(dtype=...) keeps them so
    with no_init_weights():
        hf = cls._from_config(config, dtype=getattr(torch, doc.get("dtype", "float32")))
    model = getattr(zhf, doc["wrapper"])(hf)
    _cut(model, doc["groups"])
    _load_weights(model.hf, os.path.join(path, "model.safetensors"), path)
    return model.eval()


def _cut(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Cut the base wrapper to the recorded groups (channels and neurons first, then heads, blocks)."""
    structure = structure_of(model)
    mods = dict(model.named_modules())
    order = ("neurons", "channels", "heads", "block")
    for d in sorted(groups, key=lambda d: order.index(d["kind"])):
        members = [Member(m[0], bool(m[1]), int(m[2]), *([int(m[3]), tuple(m[4])] if len(m) > 3 else [])) for m in d["members"]]
        g = GroupInfo(d["name"], d["kind"], d["size"], members, True, True, [tuple(a) for a in d["attrs"]], d["block"])
        if g.kind == "block":
            skip_block(model, g, structure).saved.clear()
        else:
            slice_group(mods, g, d["kept"], permanent=True)


def _load_weights(hf: nn.Module, file: str, path: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_model

    from .compensate import create_missing_biases

    # tie shared parameters (embedding = output head; no_init_weights skipped the tying in init_weights)
    # before loading, so that the one stored copy of a tied tensor (safetensors keeps one name) fills every name
    hf.tie_weights()
    with safe_open(file, framework="pt") as fh:  # biases prune.bias_compensation added (hpcprune.compensate)
        create_missing_biases(hf, {k: fh.get_slice(k).get_shape() for k in fh.keys() if k.endswith(".bias")})
    missing, unexpected = load_model(hf, file, strict=False)
    state = hf.state_dict(keep_vars=True)
    loaded = {state[k].data_ptr() for k in state if k not in set(missing)}
    buffers = {n for n, _ in hf.named_buffers()}
    missing = [m for m in missing if m not in buffers and state[m].data_ptr() not in loaded]
    if missing or unexpected:
        raise HFDirError(f"{path}: weights do not match the pruned architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")


def copy_tokenizer(cfg: dict[str, Any], out_dir: str) -> list[str]:
    """Copy the tokenizer files of the run's model directory (``model.path``) or tokenizer folder
    (``data.tokenizer``) into ``out_dir``; SmolLM2's (``data.tokenizer=smollm2``) and a ``model=hf``
    GGUF file's are written from the GGUF file. Returns the file names written (none for byte-level data)."""
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    for src in (model.get("path"), data.get("tokenizer")):
        if isinstance(src, str) and os.path.isdir(src):
            names = [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
            if names:
                for n in names:
                    shutil.copyfile(os.path.join(src, n), os.path.join(out_dir, n))
                return names
    from .zoo.hf import gguf_tokenizer, load_tokenizer

    if data.get("tokenizer") == "smollm2":
        return list(load_tokenizer("smollm2").save_pretrained(out_dir))
    gguf = os.path.join(str(model.get("path")), str(model.get("gguf_file"))) if model.get("gguf_file") else model.get("path")
    for src in (gguf, data.get("tokenizer")):  # model=hf from a .gguf file: its vocabulary
        if isinstance(src, str) and gguf_tokenizer(src) is not None:
            return list(load_tokenizer(src).save_pretrained(out_dir))
    return []


def _group_infos(run: Any) -> list[GroupInfo]:
    """Every group of the run's dense model as GroupInfo (units, attributes, blocks; also those
    ``groups.kinds`` left out: the layer lists come from the block groups)."""
    from .graph import Graph
    from .runs import dense_model, example_input, ignore_names, load_config

    cfg = load_config(run)
    model = dense_model(run, cfg)
    graph = Graph(model, example_input(run), ignore_names(model, list(cfg.groups.ignore or [])))
    return list(graph.all_groups)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _scale(model: nn.Module, example: torch.Tensor) -> float:
    with torch.no_grad():
        return max(1.0, float(model(example).float().abs().max()))


class _quiet:
    """transformers' progress bars and info logs off (loading and saving print bars per shard)."""

    def __enter__(self) -> None:
        from .zoo.hf import _transformers

        self.tf = _transformers()
        self.bars = self.tf.utils.logging.is_progress_bar_enabled()
        self.level = self.tf.utils.logging.get_verbosity()
        self.tf.utils.logging.disable_progress_bar()
        self.tf.utils.logging.set_verbosity_error()

    def __exit__(self, *exc: Any) -> None:
        if self.bars:
            self.tf.utils.logging.enable_progress_bar()
        self.tf.utils.logging.set_verbosity(self.level)


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def _readme(d: HFDir, source: dict[str, Any] | None, layers: list[hf_plain.Layer]) -> None:
    removed = [f"{l.stack}.{l.index}" for l in layers if l.removed]
    widths = "; ".join(f"layer {l.index}: " + ("removed" if l.removed else
                       ", ".join(f"{k} {v}" for k, v in (("MLP", l.mlp), ("KV heads", l.kv_heads)) if v is not None) or "as dense")
                       for l in layers if len({x.stack for x in layers}) == 1)
    run = (source or {}).get("run", "?")
    if d.loader == "transformers":
        text = _PLAIN_README.format(line=d.line, run=run, auto=d.auto_class, widths=widths or "-",
                                    removed=", ".join(removed) or "none")
    else:
        text = _PLAN_README.format(line=d.line, run=run, widths=widths or "-", removed=", ".join(removed) or "none")
    with open(os.path.join(d.path, "README.md"), "w") as fh:
        fh.write(text)


_PLAIN_README = """# A pruned model written by hpcprune

{line}

From run file `{run}`. Loads with transformers alone:

```python
import transformers
model = transformers.{auto}.from_pretrained("this/directory")
```

Kept widths per layer: {widths}. Removed layers (the others renumbered in order): {removed}.
Checked when written: loaded so, its outputs on the run's example input equal the pruned model's.
"""

_PLAN_README = """# A pruned model written by hpcprune

{line}

From run file `{run}`. Load it with hpcprune (`pip install hpcprune[llm]`):

```python
import hpcprune
model = hpcprune.load_hf_dir("this/directory")  # an hpcprune wrapper; the transformers model is model.hf
logits = model(input_ids)                       # [batch, tokens, vocabulary]
```

`config.json` describes the pruned widths (`AutoConfig.from_pretrained(dir).per_layer_config[i]`);
`model.safetensors` holds the pruned weights under the dense layer names; `hpcprune_plan.json` the
base config and the kept units of every pruned group (heads, MLP neurons) and removed blocks.
Kept widths per layer: {widths}. Removed layers (skips): {removed}.
"""
