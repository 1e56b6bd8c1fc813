"""The fine-tune stage (rank 0 submits, a submitit job of N tasks trains with DDP): the pruned model
trained ``finetune.epochs`` epochs (``hpcprune.finetune.FinetuneJob``, checkpointed every epoch),
then measured like the pruned one. The job reads the run file; rank 0 waits for its result.

Timed and done under ``final``; writes ``/finetune`` (history, the job's tasks) and ``/final``
(metric, MACs, params, latency, ``final.safetensors``) in one transaction.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import h5py
import numpy as np
import torch
from omegaconf import OmegaConf

from .. import launch, metrics
from ..runs import pruned_model
from ..store import RunFile, put_attrs, replace_group, write_weights
from .context import Context, Record, measure, speed_note

log = logging.getLogger("hpcprune.stages")

HISTORY_COLUMNS = ["epoch", "train_loss", "val_metric", "val_loss", "lr", "seconds"]


def run(ctx: Context, cfg: Any, rf: RunFile) -> Record:
    work = os.path.join(ctx.run_dir, "finetune")
    os.makedirs(work, exist_ok=True)
    ntasks = launch.num_tasks(cfg.launcher)
    history: list[list[float]] = []
    digests: list[str] = []
    job_id = ""
    if int(cfg.finetune.epochs) > 0:
        job_id, outs = _train(cfg, rf, work, ntasks)
        digests = [o["digest"] for o in outs]
        history = outs[0]["history"]
        for note in outs[0].get("warnings", []):
            log.warning("%s", note)
        state = torch.load(outs[0]["weights"], map_location="cpu", weights_only=True)
        model = pruned_model(rf, cfg, weights="pruned")  # built once the job is done: it needs the memory meanwhile
        model.load_state_dict(state)
    else:
        model = pruned_model(rf, cfg, weights="pruned")
    rec = measure(ctx, cfg, model)
    log.info("fine-tuned: %s %.4f (dense %.4f); %s", ctx.metric, rec["metric"], float(ctx.base["metric"]),
             speed_note(rec, "fine-tuned", cfg))
    pruned_rec = rf.attrs("pruned")
    pruned = pruned_rec.get("metric")
    sign = 1.0 if metrics.METRIC_HIGHER_IS_BETTER.get(ctx.metric, True) else -1.0
    if history and pruned is not None and sign * (float(pruned) - rec["metric"]) > 0:
        log.warning("fine-tuned: its %s %.4f is worse than the pruned model's %.4f before fine-tuning (%d epoch(s) at "
                    "lr %g): give it more epochs or a lower finetune.lr; the pruned weights stay in the run directory "
                    "(hpcprune.load_pruned(run, weights=\"pruned\"))", ctx.metric, rec["metric"], float(pruned),
                    int(cfg.finetune.epochs), float(cfg.finetune.lr))

    def write(f: h5py.File) -> None:
        ft = replace_group(f, "finetune")
        ds = ft.create_dataset("history", data=np.array(history, dtype=np.float64).reshape(-1, 6))
        ds.attrs["columns"] = HISTORY_COLUMNS
        put_attrs(ft, {"world_size": ntasks, "launcher": str(cfg.launcher.name), "job_id": job_id,
                       "rank_digests": json.dumps(digests), "epochs": int(cfg.finetune.epochs),
                       "distill_weight": float(cfg.finetune.distill.weight)})
        ft.attrs["complete"] = True
        fin = replace_group(f, "final")
        put_attrs(fin, rec)
        # not fine-tuned: the final weights are the pruned ones (a hard link, not a second copy)
        write_weights(rf, "final", model.state_dict(), fin, same_as=None if int(cfg.finetune.epochs) > 0 else pruned_rec)
        fin.attrs["complete"] = True

    return write


def _train(cfg: Any, rf: RunFile, work: str, ntasks: int) -> tuple[str, list[dict[str, Any]]]:
    """Submit the fine-tune job and wait for it: (job id, every task's result in rank order)."""
    from ..finetune import FinetuneJob

    spec = {
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),  # plain data: the schema's choices as names
        "run_file": rf.path,
        "work_dir": work,
        "tensorboard_dir": os.path.join(os.path.dirname(work), "tensorboard"),
        "distributed": cfg.launcher.name != "debug",
        "local_tasks": ntasks if cfg.launcher.name == "local" else int(cfg.launcher.get("tasks_per_node", 1)),
        "master_port": cfg.launcher.get("master_port"),
    }
    # a new submitit folder per submission: job ids (Slurm after a state wipe, local pids) come
    # back, and a stale result pickle under a reused id would make a new job look finished
    folder = os.path.join(work, "submitit", time.strftime("%Y%m%d-%H%M%S-") + str(os.getpid()))
    job = launch.submit(cfg.launcher, folder, FinetuneJob(spec))
    job_id = str(job.job_id)
    log.info("fine-tune job %s: %d task(s) on launcher %s, logs in %s", job_id, ntasks, cfg.launcher.name, folder)
    try:
        outs = launch.results(job)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"fine-tune job {job_id} failed: {first} (logs: {folder})") from e
    return job_id, sorted(outs, key=lambda o: o["rank"])
