"""Every group is verified on the architecture before any compute (the groups stage).

For each group, on the model itself (cut in place, then restored):

1. cut the group at its largest ratio (``prune.max_ratio``, ``prune.round_to``) and run the example
   input: the cut must run, keep the shape of every output (a tuple's or dict's second head too) (a group that changes it feeds the model's
   output: the classifier, a conv classifier, a vocabulary head; it is kept, whatever its layer
   type) and give finite values;
2. where the sensitivity cells cut the group another way than the prune stage (``slice_group`` for
   groups whose layers index the channels 1:1), both cuts must give the same output;
3. where the function of the cut model is known without Torch-Pruning (no normalisation that mixes
   channels, consumers that are convolutions or linears), the cut model must equal the dense model
   whose consumers ignore the removed channels (their input columns zeroed): this catches an index
   mapping Torch-Pruning gets wrong (a concat offset, a flatten block, a grouped convolution's
   inputs) instead of trusting it;
4. after ``restore()`` the model must hold the same tensors and sizes (checked after every group),
   and compute exactly what it computed before (checked once, after all groups).

A group that fails 1-3 is excluded with one line naming it, its layer types and why; 4 failing is a
bug in hpcprune and raises.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .cuts import expand, size_attrs
from .metrics import logits_of
from .graph import _KNOWN_BUFFERS, Excluded, Graph, GroupInfo, n_keep, slice_group
from .tp_layers import is_conv1d, weight_dims
from .units import layout_ops

log = logging.getLogger(__name__)

OUTPUT = "it feeds the model's output (its cut changes the output's shape); kept"


def _mixes(types: Sequence[str]) -> bool:
    """Members whose output depends on several channels at once (normalisations over channels; an
    ``nn.MultiheadAttention``, whose residual channel c is also row c of q, k and v: cutting it changes
    the attention scores, not only what consumers read), or tensors Torch-Pruning cuts by a guessed
    dimension: no known reference without Torch-Pruning."""
    return any(t in ("Parameter", "buffer", "MultiheadAttention")
               or (t.endswith("Norm") and not t.startswith(("BatchNorm", "InstanceNorm"))) for t in types)


def first_tensor(out: Any) -> torch.Tensor:
    """The model's main output tensor (``hpcprune.metrics.logits_of``)."""
    return logits_of(out)


def output_shapes(out: Any) -> list[tuple[int, ...]]:
    """The shapes of every tensor a model returns (nested tuples, lists, dicts, in order), or of a
    Hugging Face output's ``logits`` only (its cache is sized by the heads by design): a cut that
    changes any of them changes what the model hands its user, not only the main output."""
    if isinstance(out, torch.Tensor):
        return [tuple(out.shape)]
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return [tuple(out.logits.shape)]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [s for o in out for s in output_shapes(o)]
    return []


def verify_groups(graph: Graph, example: torch.Tensor, max_ratio: float, round_to: int = 1,
                  seed: int = 0, progress: Any = None) -> list[Excluded]:
    """Check every group of ``graph`` (see the module docstring); returns the excluded ones (also
    removed from ``graph.groups`` and added to ``graph.excluded``). ``example``: the data's example
    input (its first two samples are used)."""
    model = graph.model
    was = model.training
    model.eval()
    out: list[Excluded] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        x = _short(model, example[:2])
        before = _module_attrs(model)
        out0 = model(x)
        dense, shapes = first_tensor(out0).clone(), output_shapes(out0)
        del out0
        after = _module_attrs(model)  # attributes the model's own forward changes (a counter): not sizes a cut must put back
        volatile = {(n, k) for n, d in after.items() for k in set(d) | set(before.get(n, {}))
                    if d.get(k) != before.get(n, {}).get(k)}
        again = first_tensor(model(x))
        if not torch.equal(again, dense):
            from .config import ConfigError

            raise ConfigError(
                "groups: the model's output on the same input changes from one forward to the next in eval mode (max "
                f"difference {float((again - dense).abs().max()):.3g}): its forward updates state that its output "
                "depends on (or draws random numbers in eval mode), so no cut can be checked against it; make the "
                "forward deterministic in eval mode")
        scale = 1.0 + float(dense.abs().max())
        state = _state(model, volatile)
        prefix = _FromPrefix(model, x)
        train_only = _train_only(model, x)
        for i, g in enumerate(list(graph.groups)):
            try:
                fwd = prefix.forward(g)
                reason = _check(graph, g, x, (dense, shapes), scale, max_ratio, round_to, seed, fwd)
                if reason is not None and getattr(fwd, "partial", False):  # the whole forward gives the reason
                    reason = _check(graph, g, x, (dense, shapes), scale, max_ratio, round_to, seed, prefix.forward(g, False))
                if reason is None and train_only and g.kind in ("channels", "neurons"):
                    reason = _check_training(graph, g, x, max_ratio, round_to, seed, train_only)
            finally:
                if _state(model, volatile) != state:
                    raise RuntimeError(f"hpcprune bug: group {g.name} did not restore the model's tensors and sizes after a cut")
            if reason is not None:
                out.append(Excluded(g.name, list(g.layer_types), reason))
            if progress is not None:
                progress(i + 1, len(graph.groups), time.perf_counter() - t0)
        if not torch.equal(first_tensor(model(x)), dense):
            raise RuntimeError("hpcprune bug: the model computes something else after its groups were cut and restored")
    model.train(was)
    graph.exclude(out)
    return out


_TOKENS = 32  # token windows are verified on their first _TOKENS tokens


@contextlib.contextmanager
def _training_forward(model: nn.Module) -> Iterator[None]:
    """The model in training mode for a forward without side effects: its buffers (BatchNorm
    statistics) and the random generator's state are put back, and eval mode."""
    buffers = [(b, b.detach().clone()) for b in model.buffers() if b is not None]
    rng = torch.get_rng_state()
    model.train()
    try:
        yield
    finally:
        model.eval()
        torch.set_rng_state(rng)
        for b, saved in buffers:
            if b.shape == saved.shape:
                b.copy_(saved)


def _train_only(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The layers the model's forward runs in training mode only (an auxiliary head): the dependency
    graph is traced in eval mode and does not see them. Empty when there is none, or when the
    model does not run in training mode on ``x`` (fine-tuning would say so)."""
    names = {m: n for n, m in model.named_modules()
             if n and not list(m.children()) and not isinstance(m, torch.jit.ScriptModule)}  # no hooks on those
    seen: dict[bool, set] = {False: set(), True: set()}
    training = [False]

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        seen[training[0]].add(mod)

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        model(x)
        training[0] = True
        with _training_forward(model):
            model(x)
    except Exception:  # noqa: BLE001 - not this check's business
        return []
    finally:
        for h in handles:
            h.remove()
    return sorted(names[m] for m in seen[True] - seen[False])


def _check_training(graph: Graph, g: GroupInfo, x: torch.Tensor, max_ratio: float, round_to: int, seed: int,
                    train_only: list[str]) -> str | None:
    """Why group ``g`` is excluded when the pruned model fails in training mode (fine-tuning), where
    layers run that the eval-mode graph does not know (``train_only``); None when it runs."""
    drop = _drop(g, max_ratio, round_to, seed)
    if not drop:
        return None
    cut = graph.cut(g.name, drop)
    try:
        with _training_forward(graph.model):
            graph.model(x)
    except Exception as e:  # noqa: BLE001 - the reason is recorded, the group excluded
        where = _raised_in(e, graph.names)
        return (f"the model fails in training mode once it is cut ({type(e).__name__}{where}: {_line(e)}): "
                f"{', '.join(train_only[:3])} (run in training only: an auxiliary head) read these channels outside "
                "the dependency graph, which is traced in eval mode; the group stays whole (build the model without "
                "the training-only layers to prune it)")
    finally:
        cut.restore()
    return None


def _short(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Token ids ``[B, T]`` cut to their first ``_TOKENS`` tokens when the model runs on them (every
    channel, head and layer takes part at every position, so a cut's mapping shows as well; an LLM's
    verification costs T / _TOKENS times less), else ``x`` (images, models of a fixed length)."""
    if x.is_floating_point() or x.dim() != 2 or x.shape[1] <= _TOKENS:
        return x
    try:
        model(x[:, :_TOKENS])
    except Exception:  # noqa: BLE001 - a model that needs its full length
        return x
    return x[:, :_TOKENS].contiguous()


def _reduced_unchecked(graph: Graph, g: GroupInfo, drop: Sequence[int], x: torch.Tensor) -> str | None:
    """Why a group whose channels some layer also reads reduced (``Graph.reduced``: no zeroed-channel
    reference checks its cut, since zeros are not removal in a mean over the channels) is excluded
    anyway: Torch-Pruning's cut would move the channels (a roll, a flip, a shuffle: ``_layout``), a
    window normalises each channel over its neighbours (LRN), or the cut of ``drop`` maps onto
    indices outside a member's width or twice onto one channel; None when none of these holds."""
    why = "its channels are also read reduced (a mean or max over them, a broadcast map), so no zeroed-channel reference checks the cut"
    ops = _layout(graph, g)
    if ops:
        return f"{why}, and Torch-Pruning passes them 1:1 through {'; '.join(ops)}, which moves them; the group stays whole"
    windows = _channel_windows(graph, g, x)
    if windows:
        return f"{why}, and {'; '.join(windows)} normalises each channel over a window of its neighbours; the group stays whole"
    dg = graph.dg
    for dep, idxs in graph.tp_group(g.name, g.unit_channels(drop)):
        mod = dep.target.module
        if not isinstance(mod, nn.Module) or mod not in graph.names or not len(idxs):
            continue
        out = dg.is_out_channel_pruning_fn(dep.handler)
        pruner = dg.get_pruner_of_module(mod)
        width = None if pruner is None else (pruner.get_out_channels(mod) if out else pruner.get_in_channels(mod))
        ii = [int(i) for i in idxs]
        if width is not None and (min(ii) < 0 or max(ii) >= int(width) or len(set(ii)) != len(ii)):
            return (f"{why}, and Torch-Pruning maps the cut onto {graph.names[mod]}'s {'output' if out else 'input'} "
                    f"channels {min(ii)} .. {max(ii)} of {int(width)}; the group stays whole")
    return None


def _layout(graph: Graph, g: GroupInfo) -> list[str]:
    """The ops of the group Torch-Pruning does not follow (``units.layout_ops``)."""
    return layout_ops(graph.tp_group(g.name), graph.model) if g.kind in ("channels", "neurons") else []


def _channel_windows(graph: Graph, g: GroupInfo, x: torch.Tensor) -> list[str]:
    """'<name> (LocalResponseNorm, size n)' for each cross-channel normalisation whose input on
    ``x`` is as wide as group ``g`` (AlexNet's LRN: Torch-Pruning traces it as element-wise ops, and
    its window over neighbouring channels changes with every cut); [] when there is none."""
    lrns = [(n, m) for n, m in graph.by_name.items() if isinstance(m, (nn.LocalResponseNorm, nn.CrossMapLRN2d))]
    if not lrns or not g.channels:
        return []
    widths: dict[str, int] = {}

    def seen(name: str) -> Any:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            widths.setdefault(name, int(args[0].shape[1]))
        return hook

    hooks = [m.register_forward_hook(seen(n)) for n, m in lrns]
    try:
        with torch.no_grad():
            graph.model(x)
    except Exception:  # noqa: BLE001 - a hint only
        return []
    finally:
        for h in hooks:
            h.remove()
    return [f"{n} ({type(m).__name__}, size {m.size})" for n, m in lrns if widths.get(n) == g.channels]


def _hint(graph: Graph, g: GroupInfo, x: torch.Tensor | None = None) -> str:
    """'; it passes the channels 1:1 through <op>' for the ops of the group Torch-Pruning does not
    follow (``units.layout_ops``), the weights it cuts as bare parameters (``Graph.bare_parameters``),
    and the 1-D buffers of the group's width the forward on ``x`` uses that nothing cuts
    (:func:`_width_buffers`); or ''."""
    ops = _layout(graph, g)
    hint = f"; Torch-Pruning passes its channels 1:1 through {'; '.join(ops)}" if ops else ""
    if g.kind in ("channels", "neurons"):
        hint += graph.bare_parameters(graph.tp_group(g.name), g.channels)
        if x is not None:
            hint += _width_buffers(graph, g, x)
    return hint


def _width_buffers(graph: Graph, g: GroupInfo, x: torch.Tensor) -> str:
    """'; buffer <name> ... is not cut' for the 1-D floating-point buffers as wide as the group,
    outside the norms whose statistics Torch-Pruning cuts, that the dense forward on ``x`` uses (a
    gradient reaches them; an unused one is not named): a per-channel scale used as
    ``buf[None, :, None, None]``. hpcprune traces buffers of two or more dimensions as parameters (a
    position table), not 1-D ones (rotary frequencies, whose width is not the channels'), so such a
    buffer keeps its width while the channels go."""
    found = []
    for mname, mod in graph.model.named_modules():
        if isinstance(mod, _KNOWN_BUFFERS):  # running statistics: Torch-Pruning cuts them with their layer
            continue
        for bname, buf in mod._buffers.items():
            if buf is not None and buf.dim() == 1 and buf.is_floating_point() and buf.numel() == g.channels:
                found.append((f"{mname}.{bname}" if mname else bname, mod, bname, buf))
    if not found:
        return ""
    probes = [buf.detach().clone().requires_grad_(True) for _, _, _, buf in found]
    try:
        for (_, mod, bname, _), p in zip(found, probes):
            mod._buffers[bname] = p
        with torch.enable_grad():
            out = first_tensor(graph.model(x))
            grads = torch.autograd.grad(out.float().sum(), probes, allow_unused=True)
    except Exception:  # noqa: BLE001 - a hint only: without the check, name none
        grads = [None] * len(probes)
    finally:
        for _, mod, bname, buf in found:
            mod._buffers[bname] = buf
    used = [name for (name, _, _, _), gr in zip(found, grads) if gr is not None]
    if not used:
        return ""
    return (f"; buffer{'s' if len(used) > 1 else ''} {', '.join(used)} ({g.channels} values, the group's width) "
            f"{'are' if len(used) > 1 else 'is'} not cut with the channels: register {'them' if len(used) > 1 else 'it'} "
            "as nn.Parameter(..., requires_grad=False) to have it cut, or keep the group whole")


def _drop(g: GroupInfo, max_ratio: float, round_to: int, seed: int) -> list[int]:
    n = g.size - n_keep(g, max_ratio, round_to)
    if n == 0:  # round_to keeps the group whole, yet the cost model's probes cut it (to half and N-1 units): check a cut anyway
        n = g.size - n_keep(g, max_ratio, 1)
    if g.kind in ("channels", "neurons") and g.size >= 3 and g.size - n < 2:
        # two units kept, not one: a single channel broadcasts against an uncut tensor of the dense width
        # in an element-wise op (h + res(z) with res in no group) where any other width fails
        n = g.size - 2
    if g.kind == "block":
        n = 1
    # unit 0 always goes, the others at random: every kept unit before the next dropped one moves down a
    # place, so per-unit state the cut does not follow (a list of per-head norms) meets another unit's input
    perm = [int(i) for i in torch.randperm(g.size, generator=torch.Generator().manual_seed(seed + 7919 * g.size)) if i != 0]
    return sorted([0] + perm[: n - 1]) if n > 0 else []


class _FromPrefix:
    """The model's forward on the verification input from the dense activations entering the first
    chain element a group touches (the sensitivity engine's chain, ``cells.chain_of``): what comes
    before is the same for every cut of the group. The whole forward where the model is no chain,
    for a block group (its skip replaces the module in its parent, not in the chain), for any other
    input (the float64 recheck), or where the activations would take more than ``budget`` bytes.

    It also stops early (:class:`_Partial`): past the last chain element the cut changed, once an
    activation has its dense shapes, the rest of the forward is the same layers on the same shapes,
    and two cuts (or a cut and its reference) that agree there agree on the output. A group's checks
    then compare that activation, as the cost model's recordings do (``costs._ChainStarts``)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, budget: int = 1 << 30) -> None:
        from .sensitivity.cells import chain_of

        self.model, self.x = model, x
        self.chain = chain_of(model, x)
        self.inputs: list[Any] = []
        self.states: list[tuple] = []
        if self.chain is None:
            return
        h, size = x, 0
        for _, element in self.chain:
            self.inputs.append(h)
            h = element(h)
            size += h.numel() * h.element_size() if isinstance(h, torch.Tensor) else 0
            if size > budget:
                self.chain, self.inputs = None, []
                return
        from .costs import _element_state, stops_safely

        self.states = [_element_state(e) for _, e in self.chain]
        self.stops = stops_safely(model)

    def entry(self, g: GroupInfo) -> int:
        """The first chain element holding one of the group's layers (0: the whole forward)."""
        from .sensitivity.cells import first_element

        if self.chain is None or g.kind == "block" or not g.members:
            return 0
        return first_element(self.chain, [m.module for m in g.members])

    def forward(self, g: GroupInfo, stop: bool = True) -> Any:
        """``f(x)``: the model's output for group ``g``'s checks; with ``stop``, a :class:`_Partial`
        that may stop before the end of the chain."""
        from .sensitivity.cells import element_of

        k = self.entry(g)
        located = k > 0 or (self.chain is not None and g.kind != "block" and all(
            element_of(self.chain, m.module) is not None for m in g.members))
        if stop and located and self.stops:
            return _Partial(self, k)
        if k == 0:
            return self.model

        def f(x: torch.Tensor) -> Any:
            if x is not self.x:
                return self.model(x)
            h = self.inputs[k]
            h = h.clone() if isinstance(h, torch.Tensor) else h  # an element may write into its input
            for _, element in self.chain[k:]:  # type: ignore[index]
                h = element(h)
            return h
        return f


class _Partial:
    """A group's forward from chain element ``k`` that stops where its first call (the cut's: every
    check of a group runs the cut first) found the rest of the forward unchanged: at the first
    element ``j`` at or past the last one whose tensors or sizes the cut changed
    (``costs._element_state``) whose output has the dense shapes. Later calls (the cells' slice, the
    references) stop at the same place. ``stop``: the index of the element the activation returned
    enters (``len(chain)``: the model's output)."""

    def __init__(self, prefix: _FromPrefix, k: int) -> None:
        self.prefix, self.k, self.stop = prefix, k, None

    @property
    def partial(self) -> bool:
        return self.stop is not None and self.stop < len(self.prefix.chain)

    def reference(self, dense: Any, shapes: list, scale: float, got: torch.Tensor) -> tuple[Any, list, float]:
        """(the dense activation, its shapes, the tolerance scale) where this forward stopped; the
        model's own (``dense``, ``shapes``, ``scale``) when it ran to the end. The scale is the
        larger of the cut's activation ``got`` and the stored dense one (which an element that
        works in place on its input, a ``ReLU(inplace=True)``, may have changed since)."""
        if not self.partial:
            return dense, shapes, scale
        h = first_tensor(self.prefix.inputs[self.stop])
        big = max(float(h.abs().max()), float(got.abs().max()) if torch.isfinite(got).all() else 0.0)
        return h, output_shapes(self.prefix.inputs[self.stop]), 1.0 + big

    def __call__(self, x: torch.Tensor) -> Any:
        from .costs import run_to_unchanged

        p = self.prefix
        if x is not p.x:
            return p.model(x)
        if self.stop is None:
            h, self.stop = run_to_unchanged(p.chain, p.inputs, p.states, self.k)
            return h
        h = p.inputs[self.k]
        h = h.clone() if isinstance(h, torch.Tensor) else h  # an element may write into its input
        for j in range(self.k, self.stop):
            h = p.chain[j][1](h)
        return h


def _check(graph: Graph, g: GroupInfo, x: torch.Tensor, dense_out: tuple[torch.Tensor, list], scale: float,
           max_ratio: float, round_to: int, seed: int, fwd: Any = None) -> str | None:
    """Why group ``g`` is excluded (None: it is not); ``fwd(x)``: the model's forward for this group
    (:class:`_FromPrefix`; default the model's own)."""
    model = graph.model
    fwd = fwd or model
    dense, dense_shapes = dense_out
    drop = _drop(g, max_ratio, round_to, seed)
    if not drop:
        return None
    if g.name in graph.reduced:
        why = _reduced_unchecked(graph, g, drop, x)
        if why:
            return why
    try:
        cut = graph.cut(g.name, drop)
    except Exception as e:  # noqa: BLE001 - the reason is recorded, the group excluded
        return f"Torch-Pruning cannot cut it ({type(e).__name__}: {_line(e)})"
    slices = g.sliceable and g.kind in ("channels", "neurons")
    tp_state = _members_state(graph, g) if slices else None
    got = _run_cut(fwd, x, cut, graph.names)
    if isinstance(got, str):
        unused = _unused(graph, got, x)
        return (f"the model fails once it is cut ({got}){_fixed_width(g, got)}{unused}" + ("" if unused else
                f"{_heads_hint(g) if g.kind == 'heads' else _RNN_HINT if _in_rnn(graph, got) else _hint(graph, g, x)}"))
    got, shapes = got
    if isinstance(fwd, _Partial):  # compared where it stopped
        dense, dense_shapes, scale = fwd.reference(dense, dense_shapes, scale, got)
    if shapes != dense_shapes:  # any output, not only the main one (a second head, a dict of outputs)
        return OUTPUT
    if not torch.isfinite(got).all():
        return "the cut model's output is not finite"
    if slices:
        dropped = set(drop)  # once: per unit it was 7 s over ViT-H/14's groups (5120 units, 4608 cut)
        sl = slice_group(graph.by_name, g, [i for i in range(g.size) if i not in dropped])
        if _same_state(_members_state(graph, g), tp_state):  # the same layers, tensors and sizes: the same model
            sl.restore()
            other: Any = (got, shapes)
        else:
            other = _run_cut(fwd, x, sl, graph.names)
        if isinstance(other, str):
            return f"the cells' in-place slice fails ({other})"
        other = other[0]
        if not torch.allclose(other, got, atol=1e-4 * scale, rtol=1e-4):
            return (f"the cells' in-place slice and the pruned model disagree (max difference "
                    f"{float((other - got).abs().max()):.3g})")
    # a group whose channels some layer reads reduced (a mean over them: CBAM's spatial attention) has
    # no reference without Torch-Pruning: zeroing a channel is not removing it from the mean
    if g.kind in ("channels", "neurons") and not _mixes(g.layer_types) and g.name not in graph.reduced:
        try:
            ref = _oracle(graph, g, drop, x, fwd)
        except IndexError as e:  # a consumer indexed past its inputs: the mapping is wrong
            return f"Torch-Pruning maps the channels past a consumer's inputs ({_line(e)}){_hint(graph, g, x)}"
        diff = None if ref is None else _disagree(graph, g, drop, x, ref, got, scale, _oracle)
        if diff is not None:  # channels no layer reads as inputs (a non-local block's theta and phi, multiplied)
            made = _made_oracle(graph, g, drop, x, fwd)
            if made is not None and _disagree(graph, g, drop, x, made, got, scale, _made_oracle) is None:
                diff = None
        if diff is not None:
            windows = _channel_windows(graph, g, x)
            if windows:
                return (f"the cut model is not the dense model without these channels (max difference {diff}): "
                        f"{'; '.join(windows)} normalises each channel over a window of its neighbours, so a cut "
                        "changes the kept channels' values; the group stays whole (a BatchNorm in its place can be cut)")
            ops = _layout(graph, g)
            if ops:  # the op that moves the channels, not the layers around it, is what to name
                return (f"the cut model is not the dense model without these channels (max difference {diff}): "
                        f"Torch-Pruning passes them 1:1 through {'; '.join(ops)}, which moves them (between "
                        f"{', '.join(g.layer_types)}); the group stays whole")
            return (f"the cut model is not the dense model without these channels (max difference "
                    f"{diff}): Torch-Pruning maps the channels wrongly through {', '.join(g.layer_types)}")
    if g.kind == "heads":
        ref = _heads_oracle(graph, g, drop, x, fwd)
        diff = None if ref is None else _disagree(graph, g, drop, x, ref, got, scale, _heads_oracle)
        if diff is not None:
            return (f"the model without these heads is not the dense model with their outputs zeroed (max difference "
                    f"{diff}){_heads_hint(g)}")
    return None


def _members_state(graph: Graph, g: GroupInfo) -> list[tuple]:
    """The group's layers (and their submodules) as a cut leaves them: every parameter and buffer
    (a copy) and every integer or tuple attribute. Two cuts with equal states are one model: the
    in-place slice the cells use is then checked against the pruned model without a forward of its
    own (one forward less per group)."""
    out: list[tuple] = []
    for name in dict.fromkeys(m.module for m in g.members):
        mod = graph.by_name.get(name)
        if mod is None:  # a bare parameter: its owner's tensors are compared with the owner, if a member
            return [("unknown", name)]
        for sub_name, sub in mod.named_modules(prefix=name):
            for k, t in (*sub._parameters.items(), *sub._buffers.items()):
                out.append((sub_name, k, None if t is None else t.detach().clone()))
            out.append((sub_name, size_attrs(sub)))
    return out


def _same_state(a: list[tuple] | None, b: list[tuple] | None) -> bool:
    if a is None or b is None or len(a) != len(b) or any(e == ("unknown",) or e[0] == "unknown" for e in a):
        return False
    for u, v in zip(a, b):
        if len(u) != len(v) or u[:-1] != v[:-1]:
            return False
        x, y = u[-1], v[-1]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                    and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


_RNN_HINT = ("; a recurrent layer's input_size is fixed and hpcprune does not cut recurrent layers: the channels it reads "
             "stay whole")


def _raised_module(graph: Graph, error: str) -> tuple[str, nn.Module] | None:
    """(qualified name, module) of the module ``error`` (a :func:`_run_cut` line) names as raising
    it; ``("", model)`` for the model's own forward; None when it names none."""
    m = re.match(r"\w+ in (the model itself|[\w.]+) \(", error)
    if m is None:
        return None
    name = "" if m.group(1) == "the model itself" else m.group(1)
    mod = graph.by_name.get(name) if name else graph.model
    return None if mod is None else (name, mod)


def _in_rnn(graph: Graph, error: str) -> bool:
    """Whether ``error`` (a :func:`_run_cut` line) was raised in a recurrent layer (GRU, LSTM, RNN)."""
    found = _raised_module(graph, error)
    return found is not None and isinstance(found[1], nn.RNNBase)


def _unused(graph: Graph, error: str, x: torch.Tensor) -> str:
    """'; ...' when ``error`` (a :func:`_run_cut` line) was raised in a layer, or a module holding a
    layer, whose output does not reach the model's output: Torch-Pruning traces back from the
    outputs, so a layer whose result the forward computes and throws away (a WaveNet's last residual
    conv) is in no group, is never cut, and fails on its cut input (or its output on the cut stream).
    Told by autograd on the dense model: no gradient reaches the layer's output."""
    found = _raised_module(graph, error)
    if found is None:
        return ""
    prefix, mod = found
    traced = {graph.names.get(t) for t in graph.dg.module2node if isinstance(t, nn.Module)}
    candidates = {sub: n for n, sub in mod.named_modules(prefix=prefix) if not any(True for _ in sub.children())
                  and any(True for _ in sub.parameters(recurse=False)) and n not in traced}
    if not candidates:
        return ""
    outs: dict[str, torch.Tensor] = {}

    def keep(sub: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            outs.setdefault(candidates[sub], out)

    hooks = [sub.register_forward_hook(keep) for sub in candidates]
    try:
        with torch.enable_grad():
            out = first_tensor(graph.model(x))
            if not outs or not out.requires_grad:
                return ""
            grads = torch.autograd.grad(out.float().sum(), list(outs.values()), allow_unused=True)
    except Exception:  # noqa: BLE001 - only a hint: without it the reason stands as it is
        return ""
    finally:
        for h in hooks:
            h.remove()
    dead = [n for n, gr in zip(outs, grads) if gr is None]
    if not dead:
        return ""
    return (f"; {dead[0]}'s output does not reach the model's output (computed and not used), so Torch-Pruning "
            "leaves it out of every group: remove it from the forward (or use its output)")


def _fixed_width(g: GroupInfo, error: str) -> str:
    """'; ...' when a reshape failed to a shape holding the group's width as a number (``view(n,
    self.c, 4, 4)`` with ``self.c`` the dense width): the forward keeps the width the cut changed."""
    m = re.search(r"shape '\[([-\d, ]+)\]' is invalid", error)
    width = g.channels or g.size
    if g.kind not in ("channels", "neurons") or m is None or width < 2 or width not in [int(v) for v in m.group(1).split(",")]:
        return ""
    return (f"; its forward reshapes to a shape that holds the group's width {width} as a number (view(n, self.c, h, w) "
            "with self.c fixed at build time): write -1 there, or read the width from the layer (self.fc.out_features)")


def _heads_hint(g: GroupInfo) -> str:
    """Why a head group recognised from its projections may not cut as heads, and what to do."""
    return (f"; its forward does not compute per head as {', '.join(m.module for m in g.members)} suggest (a head "
            "width derived from the residual width, as C // self.num_heads with C = x.shape[-1]; a table sized by the "
            "head count); declare the attention with prune_structure()")


# float32 differences between a cut model and its reference: at most this (x the output's scale) is
# rounding, beyond _LOOSE it is a wrong cut; between the two the check is repeated in float64 for
# models up to _FLOAT64_PARAMS parameters. Past that the float64 copy costs more than it tells (an
# LLM's float32 rounding over its layers always lands between the two: SmolLM2-135M's 90 groups took
# 448 s to verify, 62 s without the recheck and on _TOKENS-token windows; an 8B model would need a
# 64 GB copy), and _LOOSE decides
_CLEAR, _LOOSE = 1e-6, 1e-4
_FLOAT64_PARAMS = 20_000_000


def _disagree(graph: Graph, g: GroupInfo, drop: Sequence[int], x: torch.Tensor, ref: torch.Tensor, got: torch.Tensor,
              scale: float, oracle: Any) -> str | None:
    """None when the cut model equals its reference, else the difference (text). A small float32
    difference is not taken as rounding: an index mapping that is wrong by little on randomly
    initialised weights (a ``view(b, 2, C)`` read as ``view(b, C, 2)`` feeding a softmax over two
    branches: 4e-5 at init, 0.02 once trained) is told apart from rounding in float64, where rounding
    is ~1e-15 of the output (models up to ``_FLOAT64_PARAMS`` parameters; larger ones: float32 within
    ``_LOOSE``)."""
    diff = float((ref - got).abs().max())
    if diff <= _CLEAR * scale:
        return None
    small = sum(p.numel() for p in graph.model.parameters()) <= _FLOAT64_PARAMS
    d64 = _float64_difference(graph, g, drop, x, oracle) if small else None
    if d64 is None:  # the model does not run in float64: the float32 tolerance decides
        return None if torch.allclose(ref, got, atol=_LOOSE * scale, rtol=_LOOSE) else f"{diff:.3g}"
    return None if d64 <= 1e-9 * scale else f"{diff:.3g} in float32, {d64:.3g} in float64"


def _float64_difference(graph: Graph, g: GroupInfo, drop: Sequence[int], x: torch.Tensor, oracle: Any) -> float | None:
    """max |cut - reference| with the model, its input and new tensors in float64 (None if it cannot
    run so); the model's tensors get their own dtypes back."""
    model = graph.model
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t is not None and t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    default = torch.get_default_dtype()
    try:
        for t in tensors:
            t.data = t.data.double()
        torch.set_default_dtype(torch.float64)
        x64 = x.double() if x.is_floating_point() else x
        ref = oracle(graph, g, drop, x64)
        got = _run_cut(model, x64, graph.cut(g.name, drop))
        if ref is None or isinstance(got, str):
            return None
        return float((ref - got[0]).abs().max())
    except Exception:  # noqa: BLE001 - a model written for float32 only
        return None
    finally:
        torch.set_default_dtype(default)
        for t, dt in zip(tensors, dtypes):
            t.data = t.data.to(dt)


def _heads_oracle(graph: Graph, g: GroupInfo, drop: Sequence[int], x: torch.Tensor, fwd: Any = None) -> torch.Tensor | None:
    """The dense model with the removed heads' columns of the output projection zeroed: what a model
    that computes each head independently gives without them."""
    outs = [m for m in g.members if not m.out]
    o = graph.by_name[outs[0].module] if len(outs) == 1 else None
    if not (isinstance(o, nn.Linear) or is_conv1d(o)):
        return None
    w = o.weight
    saved = w.data.clone()
    try:
        w.data.index_fill_(weight_dims(o)[1], expand(list(drop), outs[0].unit), 0)
        return first_tensor((fwd or graph.model)(x)).clone()
    finally:
        w.data = saved


def _run_cut(model: Any, x: torch.Tensor, cut: Any, names: dict | None = None) -> tuple[torch.Tensor, list] | str:
    """The model's main output and the shapes of all its outputs with ``cut`` applied (then
    restored), or the error as one line, naming the innermost of the model's modules whose forward
    raised it (``names``: module -> qualified name). ``model``: the model, or a forward of it
    (``_FromPrefix``)."""
    try:
        out = model(x)
        return first_tensor(out).clone(), output_shapes(out)
    except Exception as e:  # noqa: BLE001 - the reason is recorded, the group excluded
        where = _raised_in(e, names) if names else ""
        return f"{type(e).__name__}{where}: {_line(e)}"
    finally:
        cut.restore()


def _raised_in(e: BaseException, names: dict) -> str:
    """' in <name> (<Type>)' for the innermost module of ``names`` whose own forward (or a method
    it called) is on ``e``'s traceback; '' when none is."""
    found = None
    tb = e.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and names.get(obj) is not None:
            found = obj
        tb = tb.tb_next
    return f" in {names[found] or 'the model itself'} ({type(found).__name__})" if found is not None else ""


def _module_attrs(model: nn.Module) -> dict[str, dict]:
    """Every module's ``size_attrs``, by qualified name."""
    return {name: dict(size_attrs(mod)) for name, mod in model.named_modules(remove_duplicate=False)}


def _state(model: nn.Module, volatile: Any = frozenset()) -> list[tuple]:
    """Every parameter and buffer (name, object, shape) and every module's integer and tuple
    attributes (sizes, head counts, groups): what a cut changes and ``restore()`` must put back.
    Checked after every group; the dense output itself once, after all of them. ``volatile``:
    (module name, attribute) pairs the model's own forward changes (a counter), left out."""
    out: list[tuple] = [(n, id(t), tuple(t.shape)) for n, t in model.named_parameters(remove_duplicate=False)]
    out += [(n, id(t), tuple(t.shape)) for n, t in model.named_buffers(remove_duplicate=False)]
    for name, mod in model.named_modules(remove_duplicate=False):
        attrs = size_attrs(mod)
        if volatile:
            attrs = tuple((k, v) for k, v in attrs if (name, k) not in volatile)
        out.append((name, id(mod), attrs))
    return out


def _oracle(graph: Graph, g: GroupInfo, drop: Sequence[int], x: torch.Tensor, fwd: Any = None) -> torch.Tensor | None:
    """The dense model with the removed channels' input columns zeroed in every consumer; None when
    a consumer is not a linear or convolution (its function without the channels is not known here)."""
    dg = graph.dg
    zeroed: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for dep, idxs in graph.tp_group(g.name, g.unit_channels(drop)):
            mod = dep.target.module
            if not isinstance(mod, nn.Module) or dg.is_out_channel_pruning_fn(dep.handler):
                continue
            if not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and not is_conv1d(mod):
                return None
            w = mod.weight
            zeroed.append((w, w.data.clone()))
            i = torch.as_tensor(list(idxs), dtype=torch.long)
            if is_conv1d(mod):  # weight [in, out]: an input channel is a row
                w.data[i] = 0
            elif isinstance(mod, nn.Linear):
                w.data[:, i] = 0
            elif mod.transposed:
                w.data[i] = 0
            elif mod.groups == 1:
                w.data[:, i] = 0
            else:  # a grouped convolution: input channel c feeds the rows of its block only
                cin, cout = mod.in_channels // mod.groups, mod.out_channels // mod.groups
                for c in i.tolist():
                    b = c // cin
                    w.data[b * cout:(b + 1) * cout, c % cin] = 0
        return first_tensor((fwd or graph.model)(x)).clone()
    finally:
        for w, data in zeroed:
            w.data = data


def _made_oracle(graph: Graph, g: GroupInfo, drop: Sequence[int], x: torch.Tensor, fwd: Any = None) -> torch.Tensor | None:
    """The dense model with the removed channels zeroed where they are made: the output rows (and
    bias entries) of every linear or convolution producing them, and the scale and shift of every
    BatchNorm on them (its output is then 0). The reference where no layer reads the channels as
    inputs: a non-local block's (Wang et al., 2018) theta and phi outputs are only multiplied with
    each other (``bmm``), so :func:`_oracle`, which zeroes consumers' input columns, keeps them and
    cannot equal the cut. None when a producer is of another kind or when nothing is made here."""
    dg = graph.dg
    zeroed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def zero(t: torch.Tensor | None, i: torch.Tensor, dim: int) -> None:
        if t is not None:
            zeroed.append((t, t.data.clone()))
            t.data.index_fill_(dim, i, 0)

    try:
        for dep, idxs in graph.tp_group(g.name, g.unit_channels(drop)):
            mod = dep.target.module
            if not isinstance(mod, nn.Module) or type(mod).__module__.startswith("torch_pruning"):
                if isinstance(mod, nn.Parameter):
                    return None  # a bare parameter on the channels: what it does is not known here
                continue
            if not dg.is_out_channel_pruning_fn(dep.handler):
                continue
            i = torch.as_tensor(list(idxs), dtype=torch.long)
            if is_conv1d(mod):  # weight [in, out]: an output channel is a column
                zero(mod.weight, i, 1)
                zero(mod.bias, i, 0)
            elif isinstance(mod, nn.Linear) or (isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed):
                zero(mod.weight, i, 0)
                zero(mod.bias, i, 0)
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
                zero(mod.weight, i, 0)
                zero(mod.bias, i, 0)
            else:
                return None
        if not zeroed:
            return None
        return first_tensor((fwd or graph.model)(x)).clone()
    finally:
        for t, data in reversed(zeroed):
            t.data = data


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip()[:300] if text else type(e).__name__
