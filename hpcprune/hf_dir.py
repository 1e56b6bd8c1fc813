"""A pruned Hugging Face model as a directory that reloads without the run file
(``hpcprune.save_hf_dir`` / ``hpcprune.load_hf_dir``; ``hpcprune.export`` re-exports both).

Layers pruned to different widths (and removed decoder layers) cannot be described by one
Hugging Face config, so ``from_pretrained`` cannot load them. The directory holds:

- ``config.json``: the *base* model's Hugging Face config (as before pruning);
- ``model.safetensors``: the pruned (fine-tuned) weights of the Hugging Face module;
- ``hpcprune_plan.json``: which wrapper, and per pruned group its member layers (which dimension,
  how many channels per unit), size attributes and kept units; removed blocks;
- ``README.md``: how to load it.

:func:`load_hf_dir` builds the base architecture from the config (no weights downloaded or read),
cuts every group to its kept units, replaces removed blocks by skips and loads the weights
(strict): the model computes exactly what the pruned model in the run computed.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from .graph import GroupInfo, Member, skip_block, slice_group
from .structure import structure_of

FORMAT = "hpcprune-hf-1"
_WRAPPERS = ("HFCausalLM", "HFEncoderLM")


def save_hf_dir(run_path: str, out_dir: str, weights: str = "final") -> str:
    """Write the pruned model of run file ``run_path`` to ``out_dir`` (created; must not hold a
    model already). Returns ``out_dir``."""
    from .runs import RunFile, load_config, pruned_model, read_plan

    run = RunFile(run_path)
    model = pruned_model(run, weights=weights)
    wrapper = type(model).__name__
    if wrapper not in _WRAPPERS:
        raise ValueError(f"{run_path}: the model is a {wrapper}, not a Hugging Face wrapper ({', '.join(_WRAPPERS)}); "
                         "use hpcprune.load_pruned(run file) instead")
    if os.path.exists(os.path.join(out_dir, "model.safetensors")):
        raise FileExistsError(f"{out_dir}: already holds a model.safetensors; choose a new directory")
    plan = read_plan(run)
    dense = _group_infos(run, set(plan))
    groups = []
    for name, kept in plan.items():
        g = dense[name]
        if len(kept) == g.size:
            continue  # untouched
        if g.kind != "block" and not g.sliceable:
            raise ValueError(f"group {name}: its layers index channels through a mapping; the directory format "
                             "supports groups whose members index the channels 1:1")
        groups.append({"name": name, "kind": g.kind, "size": g.size, "kept": [int(k) for k in kept], "block": g.block,
                       "members": [[m.module, m.out, m.unit] for m in g.members], "attrs": [list(a) for a in g.attrs]})
    os.makedirs(out_dir, exist_ok=True)
    from safetensors.torch import save_model

    config = copy.deepcopy(model.hf.config)
    config.architectures = [type(model.hf).__name__]  # unset on models built from a config
    config.save_pretrained(out_dir)
    tmp = tempfile.NamedTemporaryFile(dir=out_dir, suffix=".tmp", delete=False)
    tmp.close()
    save_model(model.hf, tmp.name)  # tied weights (embedding = output head) are stored once
    doc = {"format": FORMAT, "wrapper": wrapper, "groups": groups, "run": os.path.abspath(run_path),
           "model_config": json.loads(json.dumps(_plain(load_config(run).model)))}
    with open(os.path.join(out_dir, "hpcprune_plan.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w") as fh:
        fh.write(_README.format(run=os.path.abspath(run_path), n=len(groups)))
    os.replace(tmp.name, os.path.join(out_dir, "model.safetensors"))
    return out_dir


def load_hf_dir(path: str) -> nn.Module:
    """The pruned model in ``path`` (written by :func:`save_hf_dir`), in eval mode."""
    from .zoo import hf as zhf

    with open(os.path.join(path, "hpcprune_plan.json")) as fh:
        doc = json.load(fh)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: hpcprune_plan.json has format {doc.get('format')!r}, expected {FORMAT!r}")
    tf = zhf._transformers()
    config = tf.AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    cls = getattr(tf, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{path}: config.json names architecture {arch!r}, which this transformers does not have")
    with torch.device("meta"):  # the shapes only; real tensors come from the weights file
        hf = cls(config)
    model = getattr(zhf, doc["wrapper"])(hf)
    structure = structure_of(model)
    mods = dict(model.named_modules())
    order = ("neurons", "channels", "heads", "block")
    for d in sorted(doc["groups"], key=lambda d: order.index(d["kind"])):
        g = GroupInfo(d["name"], d["kind"], d["size"], [Member(m, bool(o), int(u)) for m, o, u in d["members"]], True, True,
                      [tuple(a) for a in d["attrs"]], d["block"])
        if g.kind == "block":
            skip_block(model, g, structure).saved.clear()
        else:
            slice_group(mods, g, d["kept"], permanent=True)
    model.hf.to_empty(device="cpu")
    # to_empty unties shared parameters: tie them again *before* loading, so that the one stored
    # copy of a tied tensor (safetensors keeps one name) fills every name
    model.hf.tie_weights()
    from safetensors.torch import load_model

    missing, unexpected = load_model(model.hf, os.path.join(path, "model.safetensors"), strict=False)
    state = model.hf.state_dict(keep_vars=True)
    loaded = {state[k].data_ptr() for k in state if k not in set(missing)}
    buffers = {n for n, _ in model.hf.named_buffers()}
    missing = [m for m in missing if m not in buffers and state[m].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the pruned architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    _reset_buffers(model.hf, config)
    return model.eval()


def _reset_buffers(hf: nn.Module, config: Any) -> None:
    """Non-persistent buffers (rotary frequencies, position ids) are not in the weights file: rebuild
    them from a freshly constructed module of the same type on CPU."""
    for name, mod in hf.named_modules():
        own = dict(mod.named_buffers(recurse=False))
        if not own:
            continue
        try:
            fresh = type(mod)(config) if "rotary" in type(mod).__name__.lower() else None
        except TypeError:
            fresh = None
        for bname, buf in own.items():
            if fresh is not None and hasattr(fresh, bname):
                setattr(mod, bname, getattr(fresh, bname).to(buf.dtype))
            elif bname == "position_ids":
                setattr(mod, bname, torch.arange(buf.shape[-1]).expand(buf.shape).clone())
            elif bname == "token_type_ids":
                setattr(mod, bname, torch.zeros(buf.shape, dtype=buf.dtype))


def _group_infos(run: Any, names: set[str]) -> dict[str, GroupInfo]:
    """The run's groups ``names`` as GroupInfo (from the dense model's graph: units, attributes, blocks)."""
    from .graph import Graph
    from .runs import dense_model, example_input, ignore_names, load_config

    cfg = load_config(run)
    model = dense_model(run, cfg)
    graph = Graph(model, example_input(run), ignore_names(model, list(cfg.groups.ignore or [])))
    return {g.name: g for g in graph.all_groups if g.name in names}


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


_README = """# A pruned model written by hpcprune

From run file `{run}`; {n} group(s) pruned. The layers have different widths (and removed
decoder layers are skips), so `transformers.AutoModel.from_pretrained` cannot load this directory.
Load it with hpcprune (`pip install hpcprune[llm]`):

```python
import hpcprune
model = hpcprune.load_hf_dir("this/directory")  # an hpcprune wrapper; the transformers model is model.hf
logits = model(input_ids)                       # [batch, tokens, vocabulary]
```

`config.json` is the base model's config, `model.safetensors` the pruned weights,
`hpcprune_plan.json` the kept units of every pruned group (heads, MLP neurons) and removed blocks.
"""
