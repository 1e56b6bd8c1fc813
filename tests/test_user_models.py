"""User habits that broke whole runs after the groups stage (found by trying models hpcprune was
not built on): a ``.view`` flatten under channels-last cells, a dict output, and a budget the
sensitivity curves cannot reach. In process, on the tiny digits."""
import os
import sys

import h5py
import pytest
from conftest import sweep_in_process

from hpcprune.config import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TINY = ["threads=1", "launcher=debug", "baseline.epochs=1", "finetune.epochs=1", "sensitivity.ratios=[0.3,0.6]",
        "baseline.latency_repeats=1", "sensitivity.bn_recalib_batches=0", "prune.bn_recalib_batches=1",
        "prune.target.macs=0.6", "data=custom", "data._target_=archs.data_images", "+data.calib_samples=64"]


def _model(fn):
    return ["model=custom", f"model._target_=archs.{fn}"]


def test_view_flatten_runs_its_cells_in_the_default_layout(tmp_path, caplog):
    assert sweep_in_process(tmp_path, *TINY, *_model("view_flatten")) == 0  # sensitivity.channels_last=true (default)
    assert "fails on channels-last tensors" in caplog.text
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f.attrs["status"] == "complete" and float(f["final"].attrs["macs_kept"]) <= 0.6 + 1e-9


def test_a_dict_output_is_trained_measured_and_pruned(tmp_path):
    assert sweep_in_process(tmp_path, *TINY, *_model("dict_output")) == 0
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f.attrs["status"] == "complete" and f["finetune/history"].shape == (1, 6)
        assert float(f["baseline"].attrs["metric"]) > 0.1  # trained through the dict's logits (chance is 0.1)


def test_budget_beyond_the_sensitivity_curves_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"sensitivity.ratios=\[0.3, 0.6\].*before any training"):
        sweep_in_process(tmp_path, *TINY, *_model("dict_output"), "prune.target.macs=0.05")
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert "baseline" not in f
