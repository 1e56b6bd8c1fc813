"""Torch-Pruning's upstream bugs that hpcprune patches at import, and those it works around elsewhere.

Importing this module replaces fourteen functions of Torch-Pruning (1.6) for the whole process;
:mod:`hpcprune.graph` imports it first, so the patches are in place before any ``DependencyGraph``
is built. Each section below is one upstream bug, described as it would be reported upstream:

1. ``LayernormPruner`` permutes the kept scale and shift (:func:`_layernorm_prune`).
2. ``update_index_mapping`` recomputes every index mapping of the graph on every
   ``get_pruning_group`` (:func:`_update_index_mapping`: a cost, not a wrong result).
3. ``_FlattenIndexMapping`` maps a reshape that does not touch channels to ever more indices
   (:func:`_flatten_call`: refused at once instead of running for minutes).
4. ``update_reshape_index_mapping`` divides by a width it inferred as 0
   (:func:`_update_reshape_index_mapping`: ShuffleNetV2 could not be traced at all).
5. ``ConvPruner`` cuts a grouped ``ConvTranspose`` along the wrong dimension extents
   (:func:`_conv_prune_out`, :func:`_conv_prune_in`: crashed or cut half the inputs).
6. ``GroupNormPruner`` keeps ``num_groups`` when it cuts channels: right for a cut that removes
   one position of every group, wrong for a per-channel ``GroupNorm(C, C)``, whose cut removes
   whole groups (:func:`_groupnorm_prune`: the cut model failed, ``C' % num_groups != 0``).
7. ``InstanceNormPruner`` leaves the running statistics of an ``InstanceNorm(track_running_stats=True)``
   at the old width (:func:`_instancenorm_prune`: the cut model failed in eval mode).
8. ``update_concat_index_mapping`` maps no offsets for a ``torch.cat`` with an input that has no
   autograd history (``cat([x, h], 1)`` of the model's input): channel ``c`` of ``h`` is cut as the
   next layer's input ``c`` instead of ``c + 1`` (:func:`_update_concat_index_mapping`); and it finds
   the dependencies it has mapped in time cubic in the concat's inputs (:func:`_tp_update_concat`:
   a cost, not a wrong result).
9. ``get_pruning_group`` never returns where the indices change on every round of its expansion
   (channel slices concatenated in another order, ``torch.cat([-q[..., 16:], q[..., :16]], -1)``)
   (:func:`_add_dep`: the group is refused at once, its root excluded by name).

Upstream behaviour hpcprune works around elsewhere, without patching Torch-Pruning:

- ``ConcatPruner`` / ``SplitPruner`` decrement the layer's old ``concat_sizes`` / ``split_sizes``
  list in place before assigning a new one, so a saved reference to the list holds the cut sizes:
  ``cuts.TPCut`` saves copies of list attributes, or a restored concat would mis-map every later cut.
- ``ConvPruner.prune_in_channels`` on a grouped convolution keeps, in every group, the weight's
  input columns of the first group's kept positions (``keep_idxs[:len(keep_idxs) // groups]``):
  right only when every group keeps the same positions. ``MultiheadAttentionPruner`` checks only
  that the new ``embed_dim`` divides by ``num_heads``, not that every head keeps the same width.
- ``get_pruning_group`` rooted at a Linear whose output is viewed as feature maps
  (``fc(x).view(n, C, 4, 4)``) on all its ``16 C`` rows: the reshape maps row ``r`` to channel
  ``r // 16`` but keeps ``r`` as the index's root, so the way back expands each of the ``16 C``
  (channel, root) pairs to 16 rows: ``256 C`` indices for ``16 C`` rows (with one root index it is
  right). hpcprune builds such a group from the consumer's input channels instead
  (``Graph._from_consumer``), where a unit is one feature map.
  ``units.block_width`` / ``units.unit_count`` make a group's unit one channel position in every
  block (every group of a grouped convolution, of a GroupNorm, every attention head), so any cut
  keeps every block the same width at the same positions; a group that no such unit keeps even is
  excluded. Grouped (not depthwise) convolutions are never masked or sliced by hpcprune itself
  (``Graph._maskable``: they index their inputs per group), and ``verify.verify_groups`` compares
  every cut with a reference that does not use Torch-Pruning where one exists.
- ``MultiheadAttentionPruner`` assumes ``kdim == vdim == embed_dim``: with a narrower key/value
  input it cuts ``k_proj_weight`` / ``v_proj_weight`` rows with the query's indices, leaves
  ``q_proj_weight``'s columns, sets ``kdim = vdim = embed_dim``, and the dependency graph ties the
  key/value producer to the query width (the cut model fails in ``F.multi_head_attention_forward``):
  ``units.unsupported_member`` refuses such a group by name.
- The dependency graph passes channels 1:1 through ops it does not know (``PixelShuffle``,
  ``F.unfold``, ``MaxUnpool`` with another tensor's pooling indices), and keeps literal channel
  slices ``x[:, :8]``: ``units.member_overflow`` refuses a group mapped past a member's width before
  any cut, ``units.layout_ops`` names the op in the reason of a group whose trial cut fails.
- ``GroupMagnitudeImportance`` (and the other group criteria) index some layers wrongly, e.g. a
  depthwise convolution with a channel multiplier, and fail: ``importance.group_scores`` falls back
  to the norms of the root layer's output weights for that group, with a warning.
"""
from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch_pruning as tp
from torch import nn


# ---- 1. LayernormPruner: kept scale and shift permuted ----------------------------------------------
def _layernorm_prune(self: Any, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
    """Torch-Pruning 1.6's ``LayernormPruner.prune_out_channels`` builds its kept indices as
    ``torch.tensor(list(set(range(n)) - set(idxs)))`` and calls ``keep_idxs.sort()``, which is not in
    place on a tensor: with many channels cut, the kept scale and shift come out in the order of a
    Python set, permuted against their channels. The same function with a sorted list (upstream
    bug, ``torch_pruning/pruner/function.py``; replaced here before any graph is built)."""
    dim = self.pruning_dim
    if len(layer.normalized_shape) < -dim:
        return layer
    n = layer.normalized_shape[dim]
    drop = set(int(i) for i in idxs)
    keep = [i for i in range(n) if i not in drop]
    if layer.elementwise_affine:
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, dim)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, dim)
    shape = list(layer.normalized_shape)
    shape[dim] = len(keep)
    layer.normalized_shape = tuple(shape)
    return layer


tp.pruner.function.LayernormPruner.prune_out_channels = _layernorm_prune
tp.pruner.function.LayernormPruner.prune_in_channels = _layernorm_prune


# ---- 2. update_index_mapping: every mapping recomputed on every get_pruning_group -----------------
_tp_update_index_mapping = tp.dependency.index_mapping.update_index_mapping
_mapped_at: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
_modules_of: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()


def _update_index_mapping(dg: Any) -> None:
    """Torch-Pruning recomputes every concat/split/reshape index mapping of the whole graph on every
    ``get_pruning_group`` (27 ms a call on DenseNet-121, two calls per group verified or cut); the
    mappings follow the layers' widths only, so they are recomputed only when a parameter or buffer
    shape of the model has changed since the last time (a permanent cut, a cut not yet restored)."""
    model = getattr(dg, "model", None)
    if model is None:
        return _tp_update_index_mapping(dg)
    mods = _modules_of.get(model)
    if mods is None:  # the module tree once per model (cuts replace tensors, not modules)
        mods = _modules_of[model] = [m for m in model.modules()]
    key = tuple(tuple(t.shape) for m in mods for d in (m._parameters, m._buffers) for t in d.values() if t is not None)
    # the flatten guard (3.) for this graph's model: every get_pruning_group passes here first
    _max_width[0] = max((max(shape, default=1) for shape in key), default=0)
    if _mapped_at.get(dg) != key:
        _tp_update_index_mapping(dg)
        _mapped_at[dg] = key


tp.dependency.index_mapping.update_index_mapping = _update_index_mapping


# ---- 3. _FlattenIndexMapping: a reshape that does not touch channels mapped to ever more indices ---
_tp_flatten_call = tp.dependency.index_mapping._FlattenIndexMapping.__call__
_max_width = [0]  # the largest dimension of any tensor of the model whose graph Torch-Pruning works on (set by 2.)


def _flatten_call(self: Any, idxs: Any) -> Any:
    """Torch-Pruning maps a reshape that does not touch channels (Swin's window partition of an NHWC
    tensor) as a flatten whose stride multiplies along the chain: the index lists grow past any
    layer's width (30 million indices, minutes, on Swin-T). A mapping to more indices than the
    largest dimension of any of the model's tensors is wrong: the group is refused at once."""
    if not self.reverse and _max_width[0] and len(idxs) * self._stride > _max_width[0]:
        raise ValueError(f"Torch-Pruning maps a reshape to {len(idxs) * self._stride} channel indices, more than "
                         f"any layer's width ({_max_width[0]}): a reshape it does not understand (a channel shuffle, a channels-last view)")
    return _tp_flatten_call(self, idxs)


tp.dependency.index_mapping._FlattenIndexMapping.__call__ = _flatten_call


# ---- 4. update_reshape_index_mapping: ZeroDivisionError on a reshape next to a split ---------------
_tp_update_reshape = tp.dependency.index_mapping.update_reshape_index_mapping


def _update_reshape_index_mapping(graph: Any, reshape_node: Any) -> None:
    """Torch-Pruning infers the channels on each side of a reshape and divides one by the other;
    the inference answers 0 where it cannot see a width (a ``chunk`` / ``split`` output, a model
    input), and ``in_channels // 0`` raises ``ZeroDivisionError`` while the graph is built
    (torchvision's ShuffleNetV2: ``channel_shuffle`` between ``cat`` and the next ``chunk``). A side
    of width 0 is a width it does not know: the reshape gets no index mapping, as when either side
    is ``None`` upstream. (Whether channels pass through a permuting reshape correctly is checked by
    :func:`hpcprune.graph.shuffle_groups`, not here.)"""
    try:
        _tp_update_reshape(graph, reshape_node)
    except ZeroDivisionError:  # raised before any mapping is assigned: the reshape keeps none
        pass

tp.dependency.index_mapping.update_reshape_index_mapping = _update_reshape_index_mapping


# ---- 5. ConvPruner: grouped ConvTranspose cut with the plain convolution's weight layout ----------
_tp_conv_out = tp.pruner.function.ConvPruner.prune_out_channels
_tp_conv_in = tp.pruner.function.ConvPruner.prune_in_channels


def _kept_positions(n: int, groups: int, idxs: Sequence[int], what: str) -> tuple[list[int], list[int]]:
    """Kept channels of ``n`` (in ``groups`` equal blocks) without ``idxs``, and the kept positions
    inside a block; ValueError when the blocks do not keep the same positions."""
    drop = set(int(i) for i in idxs)
    keep = [i for i in range(n) if i not in drop]
    per = n // groups
    pos = [{k - b * per for k in keep if b * per <= k < (b + 1) * per} for b in range(groups)]
    if any(p != pos[0] for p in pos):
        raise ValueError(f"a grouped ConvTranspose's {what} channels must be cut at the same positions in all "
                         f"{groups} groups")
    return keep, sorted(pos[0])


def _conv_prune_out(self: Any, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
    """Torch-Pruning 1.6's ``ConvPruner.prune_out_channels`` selects the kept output channels on
    dimension 1 of a transposed convolution's weight ``(in, out / groups, k, k)``: with ``groups > 1``
    that dimension holds the positions inside one group, so any kept index past ``out / groups``
    fails (``INDICES element is out of DATA bounds``). Here: the kept positions inside a group
    (every group keeps the same ones; ``units.unit_count`` makes a unit one position in each group).
    Other convolutions: upstream's function (upstream bug, ``torch_pruning/pruner/function.py``)."""
    if not (layer.transposed and layer.groups > 1):
        return _tp_conv_out(self, layer, idxs)
    keep, pos = _kept_positions(layer.out_channels, layer.groups, idxs, "output")
    layer.out_channels = len(keep)
    layer.weight = self._prune_parameter_and_grad(layer.weight, pos, 1)
    if layer.bias is not None:
        layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
    return layer


def _conv_prune_in(self: Any, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
    """Torch-Pruning 1.6's ``ConvPruner.prune_in_channels`` keeps, for any grouped convolution, the
    first ``1 / groups`` of the kept inputs (right for a plain convolution's weight
    ``(out, in / groups, k, k)``) and then selects them on dimension 0 of a transposed
    convolution's weight ``(in, out / groups, k, k)``, which holds every input channel: all groups
    but the first lose their inputs. Here: every kept input row of a transposed convolution (upstream
    bug, same file)."""
    if not (layer.transposed and layer.groups > 1):
        return _tp_conv_in(self, layer, idxs)
    keep, _ = _kept_positions(layer.in_channels, layer.groups, idxs, "input")
    layer.in_channels = len(keep)
    layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
    return layer


# ---- 6. GroupNormPruner: num_groups of a per-channel GroupNorm -----------------------------------------
_tp_groupnorm = tp.pruner.function.GroupNormPruner.prune_out_channels


def _groupnorm_prune(self: Any, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
    """Torch-Pruning's ``GroupNormPruner.prune_out_channels`` slices the affine parameters and sets
    ``num_channels`` but leaves ``num_groups``; a ``GroupNorm(C, C)`` (one channel per group, as
    some models normalise per channel) cut to C' channels then has C groups over C' channels and
    fails. With one channel per group, the groups follow the channels (upstream bug, same file)."""
    per_channel = layer.num_groups == layer.num_channels
    _tp_groupnorm(self, layer, idxs)
    if per_channel:
        layer.num_groups = layer.num_channels
    return layer


# ---- 7. InstanceNormPruner: running statistics left at the old width -----------------------------------
_tp_instancenorm = tp.pruner.function.InstanceNormPruner.prune_out_channels


def _instancenorm_prune(self: Any, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
    """Torch-Pruning's ``InstanceNormPruner.prune_out_channels`` slices the affine parameters only;
    an instance norm that tracks running statistics uses them in eval mode, at the old width
    (upstream bug, same file): the kept channels' statistics are kept too."""
    import torch

    keep = sorted(set(range(layer.num_features)) - {int(i) for i in idxs})
    _tp_instancenorm(self, layer, idxs)
    for name in ("running_mean", "running_var"):
        buf = getattr(layer, name, None)
        if buf is not None and buf.shape[0] != layer.num_features:
            setattr(layer, name, buf.index_select(0, torch.as_tensor(keep, dtype=torch.long, device=buf.device)).clone())
    return layer


tp.pruner.function.InstanceNormPruner.prune_out_channels = _instancenorm_prune
tp.pruner.function.InstanceNormPruner.prune_in_channels = _instancenorm_prune
tp.pruner.function.GroupNormPruner.prune_out_channels = _groupnorm_prune
tp.pruner.function.GroupNormPruner.prune_in_channels = _groupnorm_prune
tp.pruner.function.ConvPruner.prune_out_channels = _conv_prune_out
tp.pruner.function.ConvPruner.prune_in_channels = _conv_prune_in
# Torch-Pruning's importance criteria recognise a conv's cut by comparing the group's handler with the
# module-level aliases ``function.prune_conv_out/in_channels`` (bound at its import): bind them anew,
# or every convolution would silently drop out of the group scores
_conv = tp.pruner.function.PrunerBox[tp.ops.OPTYPE.CONV]
for _owner in (tp.pruner.function, tp):
    if hasattr(_owner, "prune_conv_out_channels"):
        _owner.prune_conv_out_channels, _owner.prune_conv_in_channels = _conv.prune_out_channels, _conv.prune_in_channels


# ---- 8. update_concat_index_mapping: a concat input that is not traced shifts every offset ---------
_tp_update_concat_upstream = tp.dependency.index_mapping.update_concat_index_mapping


def _tp_update_concat(graph: Any, cat_node: Any) -> None:
    """Upstream's ``update_concat_index_mapping``, step for step, but for one thing: it finds the
    dependencies it has already mapped by scanning a list with ``any(dep is d ...)`` for every
    dependency of every input, cubic in a concat's inputs (DenseNet-201's concats of up to 33
    inputs: 1.9 ms each, 98 of them in every recomputation; its cost model's joint level, every
    group cut at once, recomputes them once per group: 20 s). A set of ids gives the same mapping."""
    from torch_pruning.dependency import constants
    from torch_pruning.dependency import index_mapping as im

    if cat_node.type != tp.ops.OPTYPE.CONCAT:
        return
    saved = getattr(cat_node.grad_fn, "_saved_dim", None)
    if saved is not None and saved != 1 and saved < constants.MAX_VALID_DIM:
        return
    if cat_node.module.concat_sizes is not None:
        chs = cat_node.module.concat_sizes
    else:
        chs = [im.shape_infer.infer_channels_between(graph, n, cat_node) for n in cat_node.inputs]
        cat_node.module.concat_sizes = chs
    out_size = im.shape_infer.infer_in_channels_recursively(graph, cat_node, recursive_depth=[0])
    if out_size is not None and out_size != sum(chs):
        return  # the concat was applied on a different dimension than the feature dimension
    offsets = [0]
    for ch in chs:
        if ch is None:
            return
        offsets.append(offsets[-1] + ch)
    cat_node.module.offsets = offsets
    _map_concat_inputs(cat_node, offsets, range(len(cat_node.inputs)))


def _map_concat_inputs(cat_node: Any, offsets: list[int], positions: Any) -> None:
    """Upstream's mapping of each traced input ``i`` of a concat to its channels
    ``offsets[positions[i]:positions[i] + 2]``, both ways (the concat's dependency on the input, the
    input's on the concat; the first one not yet mapped, as upstream); nothing where the concat's
    index mapping is off."""
    from torch_pruning.dependency import index_mapping as im

    if not cat_node.enable_index_mapping:  # upstream then maps nothing (its loops set no mapping)
        return
    for owner_of, reverse in ((lambda n: cat_node, True), (lambda n: n, False)):
        addressed: set[int] = set()
        for i, in_node in zip(positions, cat_node.inputs):
            target = in_node if reverse else cat_node
            for dep in owner_of(in_node).dependencies:
                if id(dep) not in addressed and dep.target == target:
                    dep.index_mapping[1] = im._ConcatIndexMapping(offset=offsets[i: i + 2], reverse=reverse)
                    addressed.add(id(dep))
                    break


def _update_concat_index_mapping(graph: Any, cat_node: Any) -> None:
    """Torch-Pruning sizes a ``torch.cat`` from the inputs it traced; an input without autograd
    history (the model's own input, ``cat([x, h], 1)`` as in input-skip U-Nets and super-resolution
    nets; a tensor made in forward) is not one of them. The concat's width then differs from the
    traced sizes' sum, which Torch-Pruning takes for a concat over another dimension: it maps no
    offsets, and channel ``c`` of ``h`` is cut as input channel ``c`` of the next layer instead of
    ``c + 1`` (the cut model is not the dense model without those channels; verification excluded
    the group). With exactly one such input, its width is the concat's width less the traced ones',
    and its position is its place in ``CatBackward0.next_functions``: the offsets are mapped with it
    (``concat_sizes`` then lists every input, the untraced one included, as ``ConcatPruner`` expects)."""
    from torch_pruning.dependency import index_mapping as im
    from torch_pruning.dependency import constants

    fns = getattr(cat_node.grad_fn, "next_functions", None) or ()
    pos = [j for j, (fn, _) in enumerate(fns) if fn is not None]
    dim = getattr(cat_node.grad_fn, "_saved_dim", 1)
    if (cat_node.type != tp.ops.OPTYPE.CONCAT or len(fns) - len(pos) != 1 or len(pos) != len(cat_node.inputs)
            or (dim != 1 and dim < constants.MAX_VALID_DIM)):
        return _tp_update_concat(graph, cat_node)
    sizes = cat_node.module.concat_sizes
    if sizes is None or len(sizes) != len(fns):  # first time: the traced widths, then the untraced one
        traced = [im.shape_infer.infer_channels_between(graph, n, cat_node) for n in cat_node.inputs]
        out = im.shape_infer.infer_in_channels_recursively(graph, cat_node, recursive_depth=[0])
        if out is None or any(c is None for c in traced) or out - sum(traced) <= 0:
            return _tp_update_concat(graph, cat_node)
        sizes = [0] * len(fns)
        for j, c in zip(pos, traced):
            sizes[j] = c
        sizes[next(j for j in range(len(fns)) if j not in pos)] = out - sum(traced)
        cat_node.module.concat_sizes = sizes
    offsets = [0]
    for c in sizes:
        offsets.append(offsets[-1] + c)
    cat_node.module.offsets = offsets
    _map_concat_inputs(cat_node, offsets, pos)  # as upstream, each traced input at its own offsets


tp.dependency.index_mapping.update_concat_index_mapping = _update_concat_index_mapping


# ---- 9. get_pruning_group: a search that never ends ------------------------------------------------
_tp_add_dep = tp.dependency.group.Group.add_dep
_tp_get_pruning_group = tp.dependency.graph.DependencyGraph.get_pruning_group
_DEPS_PER_NODE = 20  # the most a group has needed on the zoo and tests/archs*: 2.7 per graph node (Swin-T)
_max_deps = [0]  # while get_pruning_group runs: the most entries its group may take (0: no limit)


def _get_pruning_group(self: Any, module: Any, pruning_fn: Any, idxs: Any) -> Any:
    _max_deps[0] = _DEPS_PER_NODE * len(self.module2node) + 1000
    try:
        return _tp_get_pruning_group(self, module, pruning_fn, idxs)
    finally:
        _max_deps[0] = 0


def _add_dep(self: Any, dep: Any, idxs: Any) -> None:
    """Torch-Pruning expands a group until no dependency brings new (layer, indices) pairs; through
    channel slices concatenated in another order (``torch.cat([-q[..., 16:], q[..., :16]], -1)``, a
    rotary embedding's ``rotate_half`` before any split into heads) the indices change on every
    round and the search never ends (a two-layer model ran into ``groups.timeout_s``). Past
    ``_DEPS_PER_NODE`` entries per node of the graph the group is refused at once, so that only its
    root is excluded."""
    if _max_deps[0] and len(self._group) >= _max_deps[0]:
        raise ValueError(f"Torch-Pruning's search for the group does not end ({len(self._group)} dependencies for "
                         f"{(_max_deps[0] - 1000) // _DEPS_PER_NODE} layers and ops): it reaches the same layers with "
                         "other channel indices on every round, as through slices of the channels concatenated in "
                         "another order (torch.cat([x[..., k:], x[..., :k]], -1))")
    _tp_add_dep(self, dep, idxs)


tp.dependency.group.Group.add_dep = _add_dep
tp.dependency.graph.DependencyGraph.get_pruning_group = _get_pruning_group
