"""TensorBoard event files of the running fine-tune (rank 0 only), so that

    tensorboard --logdir outputs/

shows every run's curves while its job runs, on Slurm too. The run file stays the record: it gets
the same history when the job ends. Events go to ``<run dir>/tensorboard/`` through
``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package: the ``observe`` extra).

Tags (``step``: optimizer steps since the fine-tune began, over all ranks' data):

- ``finetune/train_loss`` per step (rank 0's batch loss);
- ``finetune/lr`` per step;
- ``finetune/epoch_train_loss``, ``finetune/val_<metric>`` and ``finetune/val_loss`` per epoch (every
  rank's data), at the epoch's last step;
- ``finetune/samples_per_s`` per epoch: training samples of every rank per second of the epoch.
"""
from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def _writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def available() -> bool:
    """Whether TensorBoard event files can be written here (the ``tensorboard`` package imports)."""
    return _writer_class() is not None


class TrainLog:
    """Scalars of one fine-tune into ``log_dir`` (created); a no-op on ranks other than 0 or when
    ``enabled`` is false. Steps continue across a resumed job (``start_step``): TensorBoard draws
    the resumed curve as one line."""

    def __init__(self, log_dir: str, rank: int, enabled: bool, start_step: int = 0) -> None:
        self.step = start_step
        self.writer = None
        if rank != 0 or not enabled:
            return
        cls = _writer_class()
        if cls is None:
            log.warning("finetune.tensorboard=true but the tensorboard package is not installed "
                        "(pip install hpcprune[observe]): no event files")
            return
        os.makedirs(log_dir, exist_ok=True)
        self.writer = cls(log_dir=log_dir, purge_step=start_step or None)

    def train_step(self, loss: float, lr: float) -> None:
        """One optimizer step: its batch loss and learning rate."""
        self.step += 1
        if self.writer is not None:
            self.writer.add_scalar("finetune/train_loss", loss, self.step)
            self.writer.add_scalar("finetune/lr", lr, self.step)

    def epoch(self, train_loss: float, metric_name: str, metric: float, val_loss: float, samples_per_s: float) -> None:
        """The epoch's means over every rank, at the current step; flushed to disk at once."""
        if self.writer is None:
            return
        w = self.writer
        w.add_scalar("finetune/epoch_train_loss", train_loss, self.step)
        w.add_scalar(f"finetune/val_{metric_name}", metric, self.step)
        w.add_scalar("finetune/val_loss", val_loss, self.step)
        w.add_scalar("finetune/samples_per_s", samples_per_s, self.step)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
