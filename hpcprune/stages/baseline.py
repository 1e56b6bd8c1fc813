"""The baseline stage (rank 0): the dense model, from the checkpoint or trained here, measured.

Writes ``/baseline``: metric, loss, params, MACs, latency, the example input, and the dense weights
(``dense.safetensors`` beside the run file, or a reference to the user's checkpoint). Without a
checkpoint, a dense model trained before under the same content key (``hpcprune.reuse``: the cache
directory, the other runs of a multirun) is loaded instead of trained again (``/baseline@source``).
Another run of the multirun that evaluated the same weights on the same data and kind of device
(``@eval_key``, whether they came from a checkpoint or were trained) gives its metric, loss and MACs
(``/baseline@eval_source``); latency and energy are always measured here.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import h5py
import torch

from .. import metrics, reuse
from ..config import load_dense_checkpoint
from ..runs import build_model, is_pretrained
from ..store import RunFile, put_attrs, replace_group, write_weights
from .context import Context, Record

log = logging.getLogger("hpcprune.stages")


def run(ctx: Context, cfg: Any, rf: RunFile) -> Record:
    model, loaded = arch_model(ctx, cfg)
    key, source, claim = "", "", None
    pretrained = is_pretrained(model)
    if cfg.checkpoint:
        if not loaded:
            load_dense_checkpoint(model, str(cfg.checkpoint))
        trained = False
    elif pretrained and not cfg.baseline.train_pretrained:
        if int(cfg.baseline.epochs) > 0:
            log.info("dense: the model's own trained weights, not trained here (baseline.epochs=%d trains models that "
                     "come with random weights; baseline.train_pretrained=true trains this one too)", int(cfg.baseline.epochs))
        trained = False
    else:
        key = reuse.dense_key(cfg)
        found, claim = _trained_before(ctx, cfg, key)
        if found is not None:
            source = found[0]
            model.load_state_dict(found[1])
            log.info("dense: the model trained under key %s is reused from %s", key[:12], source)
            trained = False
        else:
            try:
                train_dense(model, ctx.data, cfg, ctx.device)
            except BaseException:
                if claim is not None:
                    claim.release()
                raise
            trained = True
    model = model.cpu().eval()
    if trained:
        state = model.state_dict()  # with its _metadata (module versions); the model is not changed after this
        ctx.after_commit.append(lambda: reuse.publish_dense(cfg, state, key))
    if claim is not None:
        ctx.after_commit.append(claim.release)
    example = ctx.example
    digest = reuse.weights_digest(model.state_dict())  # once: the sensitivity stage's key reads it from /baseline
    ekey, eval_source, evaluated = _evaluate(ctx, cfg, model, digest)
    runtime = str(cfg.prune.latency_runtime)
    from .context import energy, latency, latency_clock  # the run's clock and energy meter, as for /pruned and /final

    lat = latency(ctx, cfg, model)
    joules = energy(ctx, cfg, model)
    model.cpu()
    rec = dict(
        metric=evaluated["metric"], loss=evaluated["loss"], metric_name=ctx.metric,
        higher_is_better=metrics.METRIC_HIGHER_IS_BETTER[ctx.metric], params=metrics.params(model),
        macs=evaluated["macs"], latency_ms=lat, latency_batch=cfg.baseline.latency_batch,
        latency_device=str(ctx.device), latency_runtime=runtime, latency_clock=latency_clock(ctx, cfg),
        energy_j_per_sample=joules.j_per_sample, energy_source=joules.source, trained_here=trained, pretrained=pretrained,
        dense_key=key, source=source, eval_key=ekey, eval_source=eval_source, dense_digest=digest,
    )
    log.info("dense: %s %.4f, %d params, %d MACs, latency %.2f ms", ctx.metric, rec["metric"], rec["params"], rec["macs"], lat)
    # a referenced checkpoint is recorded by path and digest, not copied (unless baseline.copy_checkpoint)
    reference = str(cfg.checkpoint) if cfg.checkpoint and not cfg.baseline.copy_checkpoint else None

    def write(f: h5py.File) -> None:
        g = replace_group(f, "baseline")
        put_attrs(g, rec)
        write_weights(rf, "baseline", model.state_dict(), g, reference=reference)
        stored = example.float() if example.dtype == torch.bfloat16 else example  # numpy has no bfloat16: exact in float32
        d = g.create_dataset("example_input", data=stored.numpy())
        d.attrs["torch_dtype"] = str(example.dtype).removeprefix("torch.")
        g.attrs["complete"] = True

    return write


def arch_model(ctx: Context, cfg: Any) -> tuple[torch.nn.Module, bool]:
    """(the architecture's model, whether ``checkpoint=`` is loaded into it): the instance the run's
    preparation built (seeded with ``seed``, the checkpoint loaded) and the groups stage verified
    and handed back unchanged, else one built again the same way (seeded, so the same weights:
    the groups stage's random draws before it change nothing). Saves a second random
    initialisation of the whole model (vit_h_14: 9 s on one CPU thread)."""
    model, ctx.arch_model = ctx.arch_model, None
    if model is not None:
        return model, bool(cfg.checkpoint)
    torch.manual_seed(int(cfg.seed))  # as the preparation built it (pipeline.Sweep._check_inputs)
    return build_model(cfg.model), False


def _evaluate(ctx: Context, cfg: Any, model: torch.nn.Module, digest: str) -> tuple[str, str, dict[str, Any]]:
    """(evaluation key, the run file it was reused from or "", metric, loss and MACs of the dense
    model, whose weights have ``digest``): another run of the multirun's evaluation of the same
    weights on the same data, or evaluated here (``reuse.eval_key``)."""
    ekey = reuse.eval_key(cfg, digest, str(ctx.device), ctx.metric)
    found = reuse.find_evaluation(cfg, ctx.run_dir, ekey)
    if found is not None:
        log.info("dense: the evaluation of the same weights on the same data (key %s) is reused from %s", ekey[:12], found[0])
        return ekey, found[0], found[1]
    sums = metrics.evaluate(model, metrics.make_batches(ctx.data.val, 256))
    return ekey, "", dict(metric=sums.metric(ctx.metric), loss=sums.mean_loss(), macs=metrics.macs(model, ctx.example[:1]))


def _trained_before(ctx: Context, cfg: Any, key: str) -> tuple[Any, Any]:
    """((where from, state dict) of a dense model trained under ``key`` before, None) or (None, the
    held claim to train it here): ``hpcprune.reuse``."""
    found = reuse.find_dense(cfg, ctx.run_dir, key)
    if found is not None:
        return found, None
    claim = reuse.Claim(cfg, ctx.run_dir, "dense", key).acquire()
    found = reuse.find_dense(cfg, ctx.run_dir, key)  # trained by another run while this one waited
    if found is not None:
        claim.release()
        return found, None
    return None, claim


def train_dense(model: torch.nn.Module, data: Any, cfg: Any, device: str) -> None:
    """Train the dense model from scratch (rank 0 only; other ranks wait, sleeping): AdamW with a
    one-cycle schedule, the loss of :func:`hpcprune.metrics.training_loss` (auxiliary classifiers at
    ``baseline.aux_weight``). Logs one line per epoch, and a warning when trainable parameters got no
    gradient in the first epoch."""
    b = cfg.baseline
    torch.manual_seed(int(cfg.seed))
    model.to(device).train()
    loader = torch.utils.data.DataLoader(data.train, batch_size=int(b.batch_size), shuffle=True,
                                         generator=torch.Generator().manual_seed(int(cfg.seed)), drop_last=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        log.warning("dense training: every parameter of the model is frozen (requires_grad=False): nothing to train "
                    "(baseline.epochs=0 says so without this line)")
        model.eval()
        return
    opt = torch.optim.AdamW(trainable, lr=float(b.lr), weight_decay=float(b.weight_decay))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(b.lr), total_steps=max(1, int(b.epochs) * len(loader)))
    check = metrics.GradientCheck(model)
    epochs, aux_weight = int(b.epochs), float(b.get("aux_weight", 0.0))
    for epoch in range(epochs):
        t0, loss_sum, n = time.perf_counter(), 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss, n_aux = metrics.training_loss(model(x), y, aux_weight)
            if epoch == 0 and n == 0 and n_aux:
                log.info("dense training: the model returns %d auxiliary output(s) as wide as its logits in training; "
                         "each adds %g x its loss (baseline.aux_weight)", n_aux, aux_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if epoch == 0:
                check.step()
            opt.step()
            sched.step()
            loss_sum += loss.item() * x.shape[0]
            n += x.shape[0]
        note = check.warning("dense training") if epoch == 0 else None
        if note:
            log.warning("%s", note)
        log.info("dense training: epoch %d/%d, loss %.4f, %.1f s", epoch + 1, epochs, loss_sum / max(n, 1),
                 time.perf_counter() - t0)
    model.eval()
