"""The groups stage (rank 0, first, on the architecture before any training): the dependency graph,
every group verified, the exact cost model, every target checked for reachability.

Writes ``/groups``: name, kind, size, members, MACs per unit, the excluded groups and why, and the
cost model's terms.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from .. import allocate, reuse
from ..config import ConfigError, targets
from ..graph import Excluded, Graph
from ..runs import build_model
from ..store import RunFile, replace_group
from .context import Context, Record, build_graph

log = logging.getLogger("hpcprune.stages")  # one logger for every stage: sweep.log's lines name it


def run(ctx: Context, cfg: Any, rf: RunFile) -> Record:
    """Rank 0, on the architecture (the config's model, with the checkpoint when one is given): the
    dependency graph, every group verified (``verify.verify_groups``), the exact cost model, and
    every target checked for reachability, before any training or evaluation."""
    from ..verify import verify_groups

    model = ctx.arch_model or build_model(cfg.model)
    ctx.arch_model = None  # handed over: no second copy of a large model from here on
    model = model.eval()
    marks = _marks(model)
    _check_logits(model, ctx)
    if int(cfg.finetune.epochs) > 0 and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("groups: every parameter of the model is frozen (requires_grad=False): the fine-tune would "
                          "have nothing to train; set finetune.epochs=0 (and baseline.epochs=0), or unfreeze the layers "
                          "to train in the model's function")
    t0 = time.perf_counter()
    graph, ignore = build_graph(model, cfg, ctx.example)
    log.info("groups: dependency graph in %.1f s: %d groups found, %d more excluded by the search", time.perf_counter() - t0,
             len(graph.groups), len(graph.excluded))
    last = [time.perf_counter()]

    def progress(i: int, n: int, seconds: float) -> None:
        if time.perf_counter() - last[0] > 10.0:
            last[0] = time.perf_counter()
            log.info("groups: verified %d of %d groups (%.0f s)", i, n, seconds)

    key = reuse.groups_key(cfg)
    found = reuse.find_groups(cfg, ctx.run_dir, key)
    if found is not None:
        source, excluded, terms, names = found
        graph.exclude([Excluded(str(n), list(t), str(r)) for n, t, r in excluded])
        if [g.name for g in graph.groups] != names:  # the same key, another graph: an hpcprune bug, or a changed model file
            log.warning("groups: %s recorded other groups under key %s: verified here", source, key[:12])
            found = None
            graph, ignore = build_graph(model, cfg, ctx.example)
        else:
            log.info("groups: the verification and cost model under key %s are reused from %s", key[:12], source)
            _report_excluded(graph, model, cfg)
    try:
        if found is None:
            source = ""
            verify_groups(graph, ctx.example, float(cfg.prune.max_ratio), int(cfg.prune.round_to), int(cfg.seed), progress)
            _report_excluded(graph, model, cfg)
            exact = _derive_cost(graph, model, ctx.example, cfg)
            cost, terms = allocate.CostModel.from_exact(graph.groups, exact), exact.terms
        else:
            cost = allocate.CostModel(graph.groups, terms)
        _check_budgets(cost, cfg, graph)
    except ConfigError:  # the run is refused: what verification found stays in the run file (the report shows it)
        with rf.write() as f:
            _write_refused(f, graph, ignore)
        raise
    gs = graph.groups
    log.info("%d groups: %s", len(gs), ", ".join(
        f"{g.name}({g.size})" if not g.channels or g.channels == g.size else f"{g.name}({g.size} units of {g.channels // g.size} channels)"
        for g in gs))
    _hand_back(ctx, model, marks)
    return lambda f: _write(f, graph, ignore, terms, cost, key, source)


def _marks(model: nn.Module) -> tuple[list[tuple], list[tuple[str, torch.Tensor]]]:
    """What the stage's tracing and counting set on a model and must take off again: every module's
    hooks (Torch-Pruning traces with forward hooks) and every parameter's ``requires_grad``
    (``flops.counting_env`` clears them while counting); and every buffer's values (a copy: a
    forward that updates one, a counter, leaves the stage's forwards in it)."""
    flags: list[tuple] = [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                          for n, m in model.named_modules()]
    flags += [(n, p.requires_grad) for n, p in model.named_parameters()]
    return flags, [(n, b.detach().clone()) for n, b in model.named_buffers()]


def _same_marks(a: tuple[list, list], b: tuple[list, list]) -> bool:
    return a[0] == b[0] and [n for n, _ in a[1]] == [n for n, _ in b[1]] and all(
        u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v) for (_, u), (_, v) in zip(a[1], b[1]))


def _hand_back(ctx: Context, model: nn.Module, marks: tuple[list, list]) -> None:
    """The verified model to the dense stage (``baseline.arch_model``), which would otherwise build
    and initialise it again: every cut was restored (``verify_groups`` checks the tensors, sizes and
    output after all of them) and :func:`_marks` are as before the stage; else it is dropped and the
    dense stage builds its own."""
    if not _same_marks(_marks(model), marks):
        log.debug("groups: the stage left hooks, flags or buffer values on the model: the dense stage builds it again")
        return
    ctx.arch_model = model


def _check_logits(model: nn.Module, ctx: Context) -> None:
    """The model's main output (``metrics.logits_of``: the tensor, a tuple's first, a dict's
    ``logits``) must be the logits of the data's task: one value per class for classification (so
    ``(features, logits)`` is not scored, trained and pruned as logits), at least one per token of the
    vocabulary for language models. ConfigError naming both widths, before any compute."""
    import torch

    from ..metrics import logits_of
    from ..units import runs_on

    try:
        with torch.no_grad():
            out = logits_of(model(ctx.example[:2]))
    except Exception:
        runs_on(model, ctx.example[:2], ConfigError)  # the same error again, as one line naming the input shape
        raise
    dense = out.dim() >= 4  # a dense prediction (segmentation): (batch, classes, H, W), the class axis 1
    width, classes = int(out.shape[1] if dense else out.shape[-1]), int(ctx.data.num_classes)
    token = ctx.metric == "perplexity"
    if token and classes == 256 and width > classes:
        log.warning("groups: the data's tokens are UTF-8 bytes (256 ids) but the model predicts %d tokens: a model "
                    "with its own tokenizer wants data=text_files (data.tokenizer is model.path by default)", width)
    if (token and width < classes) or (not token and width != classes):
        raise ConfigError(
            f"model: its main output (the output itself, a tuple's first tensor or a dict's 'logits') has shape "
            f"(batch, {', '.join(str(int(d)) for d in out.shape[1:])}), {width} values per {'token' if token else 'pixel' if dense else 'sample'}, but the data has {classes} "
            f"{'tokens in its vocabulary' if token else 'classes'}: return the logits first, or give the model "
            f"{classes} outputs (found on the architecture, before any training)")


def _check_budgets(cost: allocate.CostModel, cfg: Any, graph: Graph | None = None) -> None:
    """Every MACs/params budget reachable with the ratios the allocation may choose: up to
    ``prune.max_ratio``, and for ``prune.method=sensitivity`` up to the largest measured ratio
    (its curves end there). ConfigError naming the keys to change, and the groups verification
    excluded (they stay whole: often why a target is out of reach), before any training."""
    from ..verify import OUTPUT

    failed = [e.name for e in (graph.excluded if graph is not None else []) if e.reason != OUTPUT]
    whole = (f"; {len(failed)} group{'s' if len(failed) > 1 else ''} excluded above stay{'' if len(failed) > 1 else 's'} "
             f"whole ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''})" if failed else "")
    budgets = {k: v for k, v in targets(cfg).items() if k not in allocate.MEASURED}  # measured on the pruned model only
    if not budgets:
        return
    max_ratio, round_to = float(cfg.prune.max_ratio), int(cfg.prune.round_to)
    sens = str(cfg.prune.method) == "sensitivity"
    top = max(float(r) for r in cfg.sensitivity.ratios)
    if sens and top < max_ratio:
        full, most = np.full(len(cost.groups), top), np.full(len(cost.groups), max_ratio)
        for k, t in budgets.items():
            best = cost.fraction(k, full, round_to)
            # (out of reach at prune.max_ratio too: a larger ratio cannot help, _check_reachable says what can)
            if best > t + 1e-12 and cost.fraction(k, most, round_to) <= t + 1e-12:
                raise ConfigError(
                    f"prune.target.{k}={t} cannot be met by prune.method=sensitivity: its curves end at the largest "
                    f"of sensitivity.ratios={[float(r) for r in cfg.sensitivity.ratios]}, where every group keeps "
                    f"{best:.4f} of the {k}{whole}; add a larger ratio (up to prune.max_ratio={max_ratio}) or relax the "
                    "target (found on the architecture, before any training)")
    try:
        allocate._check_reachable(cost, budgets, max_ratio, round_to, blocks=sens)
    except allocate.BudgetError as e:
        raise ConfigError(f"{e}{whole} (found on the architecture, before any training)") from None


def _report_excluded(graph: Graph, model: nn.Module, cfg: Any) -> None:
    """One line per group verification excluded; ConfigError with ``groups.strict`` or when no group is left."""
    from ..verify import OUTPUT

    failed = [e for e in graph.excluded if e.reason != OUTPUT]
    for e in graph.excluded:
        if e.reason == OUTPUT:
            log.info("groups: %s not pruned (%s): it feeds the model's output", e.name, ", ".join(e.layer_types))
        else:
            log.warning("groups: %s excluded (%s): %s", e.name, ", ".join(e.layer_types), e.reason)
    if failed and cfg.groups.strict:
        e = failed[0]
        raise ConfigError(f"groups.strict=true: group {e.name} ({', '.join(e.layer_types)}) cannot be pruned: {e.reason}; "
                          f"add it to groups.ignore=[{e.name}] or set groups.strict=false to prune the others")
    if not graph.groups:
        types = sorted({t for e in failed for t in e.layer_types}) or sorted({type(m).__name__ for m in model.modules()
                                                                               if not list(m.children())})
        why = (f"; {failed[0].name}: {failed[0].reason}" if failed
               else "; every group found feeds the model's output (the output layer is never cut)")
        raise ConfigError(f"model {cfg.model.get('_target_')}: no prunable group (layer types: {', '.join(types[:12])}){why}; "
                          "where the model has attention heads or blocks, declare them with prune_structure() "
                          "(hpcprune/structure.py); or choose other groups.kinds / groups.ignore")


def _derive_cost(graph: Graph, model: nn.Module, example: Any, cfg: Any) -> Any:
    """The exact cost model (``costs.ExactCost``); a group whose cut no cost model follows is excluded."""
    from ..costs import ExactCost, probes_from_graph

    exact = None
    while exact is None:
        try:
            exact = ExactCost.derive(model, example[:1], probes_from_graph(graph))
        except ValueError as e:  # a group whose cut changes the computation in a way no cost model follows
            bad = next((g for g in graph.groups if str(e).startswith(f"group {g.name}:")), None)
            if bad is None:
                raise
            log.warning("groups: %s excluded (%s): %s", bad.name, ", ".join(bad.layer_types), str(e).split(": ", 1)[1])
            graph.exclude([Excluded(bad.name, list(bad.layer_types), str(e).split(": ", 1)[1])])
            if not graph.groups:
                raise ConfigError(f"model {cfg.model.get('_target_')}: no prunable group; {e}") from None
    return exact


def _write_refused(f: h5py.File, graph: Graph, ignore: list[str]) -> None:
    """``/groups`` of a run the groups stage refused: the groups kept and excluded (with why), not
    complete (a rerun does the stage again)."""
    h = replace_group(f, "groups")
    text = h5py.string_dtype()
    h.create_dataset("name", data=np.array([g.name for g in graph.groups], dtype=object), dtype=text)
    h.create_dataset("size", data=np.array([g.size for g in graph.groups], dtype=np.int64))
    h.attrs["excluded"] = json.dumps([[e.name, e.layer_types, e.reason] for e in graph.excluded])
    h.attrs["ignored"] = json.dumps(ignore)
    h.attrs["complete"] = False


def _write(f: h5py.File, graph: Graph, ignore: list[str], terms: dict[str, Any], cost: allocate.CostModel, key: str,
           source: str) -> None:
    gs = graph.groups
    per_unit = []
    for i, g in enumerate(gs):
        r = np.zeros(len(gs))
        r[i] = 1.0 - (g.size - 1) / g.size
        per_unit.append(cost.dense["macs"] - cost.cost("macs", r))
    text = h5py.string_dtype()
    h = replace_group(f, "groups")
    h.create_dataset("name", data=np.array([g.name for g in gs], dtype=object), dtype=text)
    h.create_dataset("kind", data=np.array([g.kind for g in gs], dtype=object), dtype=text)
    h.create_dataset("size", data=np.array([g.size for g in gs], dtype=np.int64))
    h.create_dataset("channels", data=np.array([g.channels or g.size for g in gs], dtype=np.int64))
    h.create_dataset("maskable", data=np.array([g.maskable for g in gs]))
    h.create_dataset("macs_per_channel", data=np.array(per_unit, dtype=np.float64))
    h.create_dataset("layer_types", data=np.array([json.dumps(g.layer_types) for g in gs], dtype=object), dtype=text)
    h.create_dataset(
        "members", data=np.array([json.dumps([[m.module, "out" if m.out else "in", m.unit] for m in g.members]) for g in gs], dtype=object), dtype=text
    )
    h.attrs["excluded"] = json.dumps([[e.name, e.layer_types, e.reason] for e in graph.excluded])
    h.attrs["ignored"] = json.dumps(ignore)
    h.attrs["key"], h.attrs["source"] = key, source
    cg = h.create_group("cost")
    for kind, (coef, exps) in terms.items():
        cg.create_dataset(f"{kind}_coef", data=np.asarray(coef, dtype=np.float64))
        cg.create_dataset(f"{kind}_exps", data=np.asarray(exps, dtype=np.int8))
    cg.attrs["dense_macs"], cg.attrs["dense_params"] = float(cost.dense["macs"]), float(cost.dense["params"])
    h.attrs["complete"] = True
