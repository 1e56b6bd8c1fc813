"""The DDP fine-tuning job (one submitit job, N tasks, one torch.distributed group).

Each task rebuilds the pruned model from the run file (dense weights + plan + pruned weights, read
with ``store.read_weights``: the safetensors files beside the run file, or the user's dense
checkpoint the run references, so both must be on a file system every node sees), trains its share of
the data (DistributedSampler), and rank 0 writes a checkpoint after every epoch (atomic rename).
On requeue (Slurm preemption or timeout) submitit calls ``checkpoint()``; the new job resumes from
the last completed epoch: weights, optimizer, scheduler, history. The same happens when Slurm
restarts the job without asking (``scontrol requeue``, node failure) and when a sweep is rerun after
a failed fine-tune. A checkpoint is used only by the fine-tune it was made for (same starting
weights, same finetune/data/seed settings; see ``_key``). The job never writes the run file: rank 0
returns the history and the final weights' path, and the driver records them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
import zlib
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .metrics import EvalSums, GradientCheck, batch_sums, classes_last, logits_of, training_loss
from .tb import TrainLog


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()  # as bytes: numpy has no bfloat16
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _key(cfg: Any, start_digest: str) -> str:
    """What a checkpoint must match to be resumed: the starting weights and every setting that changes
    the training (not the launcher, threads or device)."""
    from omegaconf import OmegaConf

    settings = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in ("finetune", "data", "seed")}
    return hashlib.sha256((json.dumps(settings, sort_keys=True, default=str) + start_digest).encode()).hexdigest()[:16]


def _threads(spec: dict[str, Any], world: int) -> int:
    """Torch threads per task: the config's ``threads`` when > 0, else the task's CPUs (Slurm's
    --cpus-per-task when set, capped by the CPUs this process may run on), else this node's CPUs /
    tasks on this node; ``OMP_NUM_THREADS``, when set, caps what 0 chooses (as ``World.set_threads``).
    (The config's ``threads`` used to be looked up under a key the spec never had: a ``threads=1``
    run fine-tuned on every core, and two such runs on 2 cores -- a local multirun's points, pytest's
    workers -- ran their OpenMP threads against each other, each epoch 5-9x slower.)"""
    from .world import omp_cap

    threads = int(spec["config"].get("threads", 0) or 0)
    if threads > 0:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and per_task.isdigit() and int(per_task) > 0:
        return omp_cap(min(cores, int(per_task)))
    return omp_cap(max(1, cores // max(1, int(spec.get("local_tasks", world)))))


# DDP rendezvous ports: below Linux's default ephemeral range (32768-60999), where any outgoing
# connection on the node (another job's gloo sockets, a database client) may hold the port for a while
_PORTS = (20000, 32000)


def master_port(job_id: str) -> int:
    """The rendezvous port of a fine-tune job: the same in every task, from the job id alone, so that
    jobs sharing a node spread over the range (submitit's own pick is drawn from 20000-60000)."""
    lo, hi = _PORTS
    return lo + zlib.crc32(str(job_id).encode()) % (hi - lo)


def _drop_stale_result(job_env: Any) -> None:
    """Remove this task's result file from an earlier run of this job (before a requeue).

    When rank 0 leaves for a requeue (checkpoint on USR2, preemption), the other ranks' collectives
    fail and submitit records their error as the task's result. The requeued run overwrites it only
    when that task finishes again: until then the driver could read task 0's new result next to
    task 1's old error and report a failure. Every task removes its own before the DDP rendezvous,
    which rank 0 must pass before it can write anything.
    """
    try:
        os.remove(job_env.paths.result_pickle)
    except (FileNotFoundError, KeyError):  # KeyError: no SUBMITIT_FOLDER (not under submitit)
        pass


class _Terminated:
    """SIGTERM under Slurm: Slurm is ending this run (scancel, scontrol requeue, preemption, time
    limit) and sends SIGKILL KillWait seconds later. submitit ignores SIGTERM, so the task would train
    on meanwhile; when it finished in that window, it would report a result for a job that Slurm
    then runs again (requeue), and the rerun would delete and rewrite results under the driver. So
    after SIGTERM a task starts no new epoch and returns nothing: it waits to be killed (rank 0 still
    takes USR2, submitit's checkpoint-and-requeue signal)."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.active = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        if self.active:
            previous = signal.getsignal(signal.SIGTERM)

            def handler(signum: int, frame: Any) -> None:
                self.at = self.at or time.time()
                if callable(previous):
                    previous(signum, frame)  # submitit's: logs it

            signal.signal(signal.SIGTERM, handler)

    def wait_if_ending(self, where: str, limit_s: float = 600.0) -> None:
        if self.at is None:
            return
        print(f"finetune: SIGTERM from Slurm: stopping {where}, waiting for the end of this run", flush=True)
        while time.time() - self.at < limit_s:
            time.sleep(1.0)
        raise RuntimeError(f"got SIGTERM but Slurm did not end the job within {limit_s:.0f} s")


class FinetuneJob:
    """Callable submitted to submitit; ``spec`` is plain data (resolved config, paths)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(FinetuneJob(self.spec))

    def __call__(self) -> dict[str, Any]:
        import torch.distributed as dist
        from omegaconf import OmegaConf

        from .runs import build_data, dense_model, pruned_model
        from .store import RunFile

        spec = self.spec
        rank, world = 0, 1
        if spec["distributed"]:
            import submitit

            job = submitit.JobEnvironment()
            _drop_stale_result(job)
            os.environ["MASTER_PORT"] = str(spec.get("master_port") or master_port(job.job_id))
            env = submitit.helpers.TorchDistributedEnvironment()
            env.export(set_cuda_visible_devices=False, overwrite=True)
            rank, world = env.rank, env.world_size
        cfg = OmegaConf.create(spec["config"])
        ft = cfg.finetune
        torch.set_num_threads(_threads(spec, world))
        use_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}" if use_cuda else "cpu")
        if spec["distributed"]:
            dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        try:
            return self._train(spec, cfg, ft, rank, world, device, build_data, dense_model, pruned_model, RunFile)
        finally:
            if spec["distributed"] and dist.is_initialized():
                dist.destroy_process_group()

    def _train(self, spec, cfg, ft, rank, world, device, build_data, dense_model, pruned_model, RunFile) -> dict[str, Any]:
        import torch.distributed as dist

        run = RunFile(spec["run_file"])
        torch.manual_seed(cfg.seed)
        data = build_data(cfg.data)
        model = pruned_model(run, cfg, weights="pruned").to(device)
        teacher = _teacher(dense_model, run, cfg, device) if ft.distill.weight > 0 else None
        ddp = model
        if world > 1:
            # find_unused_parameters: a model whose forward leaves parameters out of some steps (stochastic
            # depth, layer drop, a branch taken by the data) fails DDP's reduction without it; the cost is
            # one walk of the autograd graph per step
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                      find_unused_parameters=True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("finetune: every parameter of the pruned model is frozen (requires_grad=False): nothing to "
                             "fine-tune; set finetune.epochs=0")
        opt = torch.optim.AdamW(trainable, lr=ft.lr, weight_decay=ft.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, ft.epochs))  # stepped once per epoch
        sampler = torch.utils.data.distributed.DistributedSampler(
            data.train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        loader = torch.utils.data.DataLoader(data.train, batch_size=ft.batch_size, sampler=sampler, drop_last=True)
        terminated = _Terminated()
        ckpt_path = os.path.join(spec["work_dir"], "checkpoint.pt")
        key = _key(cfg, _digest(model))
        history, start = _resume(ckpt_path, key, model, opt, sched, device, rank, ft.epochs)
        tb = TrainLog(spec.get("tensorboard_dir") or os.path.join(spec["work_dir"], "tensorboard"), rank,
                      bool(ft.get("tensorboard", False)), start * len(loader))
        val_idx = list(range(rank, len(data.val), world))  # exact shards, no padding
        val = torch.utils.data.DataLoader(torch.utils.data.Subset(data.val, val_idx), batch_size=256)
        notes: list[str] = []
        for epoch in range(start, ft.epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            lr = opt.param_groups[0]["lr"]
            check = GradientCheck(model) if epoch == start else None
            loss_sum, n = _train_epoch(ddp, teacher, loader, opt, device, ft.distill, lambda loss: tb.train_step(loss, lr),
                                       float(ft.get("aux_weight", 0.0)), check)
            note = check.warning("fine-tuning") if check is not None else None
            if note:
                notes.append(note)  # logged by the sweep (stages.finetune), printed here
                if rank == 0:
                    print(f"WARNING: {notes[-1]}", flush=True)
            sched.step()
            if world > 1:
                # DDP copies rank 0's buffers (BatchNorm statistics) at the start of each forward, so
                # after the last one every rank holds its own: validate and save rank 0's model on all
                for buf in model.buffers():
                    dist.broadcast(buf, 0)
            train_loss, metric, val_loss = _evaluate(model, val, device, world, loss_sum, n, data.metric)
            row = [epoch, train_loss, metric, val_loss, lr, time.perf_counter() - t0]
            history.append(row)
            tb.epoch(train_loss, data.metric, metric, val_loss, n * world / max(row[5], 1e-9))
            if rank == 0:
                _save_checkpoint(ckpt_path, {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                             "scheduler": sched.state_dict(), "history": history, "key": key})
                print(f"finetune epoch {epoch + 1}/{ft.epochs}: loss {row[1]:.4f} val {data.metric} {row[2]:.4f}", flush=True)
            if world > 1:
                dist.barrier()
            if math.isnan(row[1]):
                raise FloatingPointError(f"fine-tuning loss became NaN at epoch {epoch}")
            terminated.wait_if_ending(f"after epoch {epoch + 1} (checkpoint saved)")
        tb.close()
        terminated.wait_if_ending("before returning results")
        out: dict[str, Any] = {"rank": rank, "world_size": world, "digest": _digest(model)}
        if rank == 0:
            final = os.path.join(spec["work_dir"], "final.pt")
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, final + ".tmp")
            os.replace(final + ".tmp", final)
            out.update(history=history, weights=final, warnings=notes)
        return out


def _teacher(dense_model: Any, run: Any, cfg: Any, device: torch.device) -> nn.Module:
    """The dense model as a frozen distillation teacher."""
    teacher = dense_model(run, cfg).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _resume(ckpt_path: str, key: str, model: nn.Module, opt: Any, sched: Any, device: torch.device, rank: int,
            epochs: int) -> tuple[list[list[float]], int]:
    """(history, first epoch to run): from the checkpoint of this fine-tune, if there is one (weights,
    optimizer and scheduler loaded), else ([], 0)."""
    if not os.path.exists(ckpt_path):
        return [], 0
    ck = torch.load(ckpt_path, map_location=device, weights_only=False)
    if ck.get("key") != key:
        if rank == 0:
            print(f"finetune: ignoring {ckpt_path}: it belongs to another fine-tune (other starting "
                  "weights or finetune/data/seed settings); starting at epoch 1", flush=True)
        return [], 0
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    start = ck["epoch"] + 1
    if rank == 0:
        print(f"finetune: resuming from {ckpt_path}: {start} of {epochs} epochs done", flush=True)
    return ck["history"], start


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write the checkpoint atomically (a temporary file, renamed)."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _train_epoch(ddp: nn.Module, teacher: nn.Module | None, loader: Any, opt: Any, device: torch.device,
                 distill: Any, on_step: Any = None, aux_weight: float = 0.0,
                 check: GradientCheck | None = None) -> tuple[float, int]:
    """One pass over this rank's share of the training data: (summed loss, samples). The loss is
    :func:`hpcprune.metrics.training_loss` (auxiliary outputs at ``aux_weight``); with a teacher,
    it mixes in the KL divergence to its softened outputs (``distill.weight``, ``temperature``).
    ``on_step(loss)`` is called after every optimizer step with the batch's loss; ``check`` sees
    every step's gradients."""
    T = float(distill.temperature)
    ddp.train()
    loss_sum, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = ddp(x)
        logits = logits_of(out)
        loss, _ = training_loss(out, y, aux_weight)
        if teacher is not None:
            with torch.no_grad():
                t_logits = logits_of(teacher(x))
            kd = F.kl_div(  # in float32 (16-bit logits upcast, as in task_loss)
                F.log_softmax(classes_last(logits).float() / T, -1).flatten(0, -2),
                F.log_softmax(classes_last(t_logits).float() / T, -1).flatten(0, -2),
                reduction="batchmean",
                log_target=True,
            ) * (T * T)
            w = float(distill.weight)
            loss = (1 - w) * loss + w * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if check is not None:
            check.step()
        opt.step()
        batch_loss = loss.item()
        loss_sum += batch_loss * x.shape[0]
        n += x.shape[0]
        if on_step is not None:
            on_step(batch_loss)
    return loss_sum, n


def _evaluate(model: nn.Module, val: Any, device: torch.device, world: int, loss_sum: float, n: int,
              metric: str) -> tuple[float, float, float]:
    """(mean training loss, validation metric, mean validation loss), summed over every rank."""
    import torch.distributed as dist

    sums = EvalSums()
    model.eval()
    with torch.inference_mode():
        for x, y in val:
            sums = sums + batch_sums(model(x.to(device)), y.to(device))
    tot = torch.tensor([sums.correct, sums.loss, sums.count, loss_sum, n], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(tot)
    s = EvalSums(*tot[:3].tolist())
    return tot[3].item() / max(1.0, tot[4].item()), s.metric(metric), s.mean_loss()
