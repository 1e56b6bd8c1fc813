"""The baseline stage (rank 0): the dense model, from the checkpoint or trained here, measured.

Writes ``/baseline``: metric, loss, params, MACs, latency, the example input, and the dense weights
(``dense.safetensors`` beside the run file, or a reference to the user's checkpoint).
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import h5py
import torch

from .. import metrics
from ..config import load_dense_checkpoint
from ..runs import build_model
from ..store import RunFile, put_attrs, replace_group, write_weights
from .context import Context, Record

log = logging.getLogger("hpcprune.stages")


def run(ctx: Context, cfg: Any, rf: RunFile) -> Record:
    model = build_model(cfg.model)
    if cfg.checkpoint:
        load_dense_checkpoint(model, str(cfg.checkpoint))
        trained = False
    else:
        train_dense(model, ctx.data, cfg, ctx.device)
        trained = True
    model = model.cpu().eval()
    example = ctx.example
    val = metrics.make_batches(ctx.data.val, 256)
    sums = metrics.evaluate(model, val)
    macs = metrics.macs(model, example[:1])
    lat = metrics.latency_ms(model.to(ctx.device), example.to(ctx.device), cfg.baseline.latency_batch,
                             repeats=cfg.baseline.latency_repeats, threads=int(cfg.baseline.latency_threads))
    model.cpu()
    rec = dict(
        metric=sums.metric(ctx.metric), loss=sums.mean_loss(), metric_name=ctx.metric,
        higher_is_better=metrics.METRIC_HIGHER_IS_BETTER[ctx.metric], params=metrics.params(model),
        macs=macs, latency_ms=lat, latency_batch=cfg.baseline.latency_batch,
        latency_device=str(ctx.device), trained_here=trained,
    )
    log.info("dense: %s %.4f, %d params, %d MACs, %.2f ms", ctx.metric, rec["metric"], rec["params"], rec["macs"], lat)
    # a referenced checkpoint is recorded by path and digest, not copied (unless baseline.copy_checkpoint)
    reference = str(cfg.checkpoint) if cfg.checkpoint and not cfg.baseline.copy_checkpoint else None

    def write(f: h5py.File) -> None:
        g = replace_group(f, "baseline")
        put_attrs(g, rec)
        write_weights(rf, "baseline", model.state_dict(), g, reference=reference)
        g.create_dataset("example_input", data=example.numpy())
        g.attrs["complete"] = True

    return write


def train_dense(model: torch.nn.Module, data: Any, cfg: Any, device: str) -> None:
    """Train the dense model from scratch (rank 0 only; other ranks wait, sleeping)."""
    from tqdm import tqdm

    b = cfg.baseline
    torch.manual_seed(int(cfg.seed))
    model.to(device).train()
    loader = torch.utils.data.DataLoader(data.train, batch_size=int(b.batch_size), shuffle=True,
                                         generator=torch.Generator().manual_seed(int(cfg.seed)), drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=float(b.lr), weight_decay=float(b.weight_decay))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(b.lr), total_steps=max(1, int(b.epochs) * len(loader)))
    for _ in tqdm(range(int(b.epochs)), desc="dense training", unit="epoch", file=sys.stderr, disable=None):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = metrics.task_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
