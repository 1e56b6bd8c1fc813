"""TensorBoard event files of the fine-tune (hpcprune.tb), read back with TensorBoard's own reader."""
import glob

import h5py
import numpy as np
import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@pytest.mark.slow
def test_finetune_writes_tensorboard_events_equal_to_the_run_file(fast_run):
    """The fine-tune of the shared fast run (a real submitit job) wrote per-step and per-epoch
    scalars under <run dir>/tensorboard; the per-epoch ones equal the history in the run file."""
    files = glob.glob(str(fast_run / "tensorboard" / "events.out.tfevents.*"))
    assert files, f"no event file under {fast_run / 'tensorboard'}"
    acc = EventAccumulator(str(fast_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"finetune/train_loss", "finetune/lr", "finetune/epoch_train_loss", "finetune/val_accuracy",
            "finetune/val_loss", "finetune/samples_per_s"} <= tags, tags
    with h5py.File(fast_run / "run.h5", "r") as f:
        hist = f["finetune/history"][()]
    epochs = len(hist)
    steps = [e.step for e in acc.Scalars("finetune/train_loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) % epochs == 0
    val = acc.Scalars("finetune/val_accuracy")
    assert [e.step for e in val] == [steps[-1] // epochs * (i + 1) for i in range(epochs)]
    np.testing.assert_allclose([e.value for e in val], hist[:, 2], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in acc.Scalars("finetune/val_loss")], hist[:, 3], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in acc.Scalars("finetune/epoch_train_loss")], hist[:, 1], rtol=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("finetune/samples_per_s"))


def test_no_writer_off_rank_0_or_when_disabled(tmp_path):
    from hpcprune.tb import TrainLog

    for rank, enabled in ((1, True), (0, False)):
        t = TrainLog(str(tmp_path / f"r{rank}{enabled}"), rank, enabled)
        t.train_step(1.0, 0.1)
        t.epoch(1.0, "accuracy", 0.5, 1.0, 10.0)
        t.close()
        assert not (tmp_path / f"r{rank}{enabled}").exists()
