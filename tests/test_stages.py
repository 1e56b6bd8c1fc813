"""What the stages hand each other in one process (in-process sweeps, the run file read back)."""
import os
import types

import pytest
import torch

from hpcprune.stages import baseline
from hpcprune.store import RunFile, read_weights

from conftest import compose, default_model, sweep_in_process

QUICK = ["threads=1", "baseline.epochs=0", "finetune.epochs=0", "sensitivity.ratios=[0.5]", "baseline.latency_repeats=1",
         "baseline.latency_batch=8", "prune.target.macs=0.7", "finetune.tensorboard=false"]


def test_the_dense_stage_takes_the_verified_model_instead_of_building_it_again(tmp_path, monkeypatch):
    def no_second_build(*args, **kwargs):
        raise AssertionError("the dense stage built the model again")

    monkeypatch.setattr(baseline, "build_model", no_second_build)
    assert sweep_in_process(tmp_path / "run", *QUICK) == 0
    stored = read_weights(RunFile(str(tmp_path / "run" / "run.h5")), "baseline")
    want = default_model().state_dict()  # seed 0, as a fresh build: the groups stage's cuts all undone
    assert list(stored) == list(want)
    for k, v in want.items():
        assert torch.equal(stored[k], v), k


def test_without_the_verified_model_the_dense_stage_builds_the_same_one(monkeypatch):
    cfg = compose(QUICK)
    torch.rand(1000)  # whatever ran before (the groups stage's random draws) changes nothing
    ctx = types.SimpleNamespace(arch_model=None)
    model, loaded = baseline.arch_model(ctx, cfg)
    assert not loaded
    want = default_model().state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_a_complete_run_started_again_is_left_as_it_is(tmp_path, capsys):
    """Started again with its own config, a complete run runs nothing and records nothing (its
    seconds and world size stay those of the run that did the work); it prints its summary."""
    import hashlib

    run = tmp_path / "run"
    assert sweep_in_process(run, *QUICK) == 0
    before = hashlib.sha256((run / "run.h5").read_bytes()).hexdigest()
    capsys.readouterr()
    assert sweep_in_process(run, *QUICK) == 0
    assert hashlib.sha256((run / "run.h5").read_bytes()).hexdigest() == before
    assert "run file:" in capsys.readouterr().out
    assert sweep_in_process(run, *QUICK, "prune.target.macs=0.6", "resume.force=true") == 0  # a changed config runs
    assert hashlib.sha256((run / "run.h5").read_bytes()).hexdigest() != before


class CountingNet(torch.nn.Module):
    """A tiny CNN on the digits that counts its forwards in a persistent buffer (unused by its output)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(16, num_classes)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.seen += 1
        return self.fc(self.body(x))


def counting_net(num_classes: int = 10) -> torch.nn.Module:
    return CountingNet(num_classes)


def test_a_model_whose_forward_updates_a_buffer_is_built_again_for_the_dense_stage(tmp_path, monkeypatch):
    """The groups stage's forwards leave their count in such a model: the dense stage does not take
    it, and the stored dense weights are those of a run resumed after the groups stage."""
    args = [*QUICK, "model=custom", "model._target_=test_stages.counting_net", "prune.round_to=1"]
    assert sweep_in_process(tmp_path / "a", *args) == 0
    real = baseline.arch_model

    def stop_once(ctx, cfg):
        monkeypatch.setattr(baseline, "arch_model", real)
        raise RuntimeError("stopped after the groups stage")

    monkeypatch.setattr(baseline, "arch_model", stop_once)
    with pytest.raises(RuntimeError, match="stopped after the groups stage"):
        sweep_in_process(tmp_path / "b", *args)
    assert sweep_in_process(tmp_path / "b", *args) == 0  # resumed: the groups stage is not run again
    for stage in ("baseline", "pruned", "final"):
        a, b = (read_weights(RunFile(str(tmp_path / d / "run.h5")), stage) for d in "ab")
        assert list(a) == list(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (stage, k)


def test_a_complete_run_whose_weights_file_is_gone_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert sweep_in_process(run, *QUICK) == 0
    os.remove(run / "final.safetensors")
    capsys.readouterr()
    assert sweep_in_process(run, *QUICK) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hpcprune: error:")]
    assert len(err) == 1 and "final.safetensors" in err[0] and "is gone" in err[0], err


def bf16_mlp():
    """A model of one's own in bfloat16 (tests/test_stages.py's, for ``model._target_``)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 10)).to(torch.bfloat16)


def bf16_digits(calib_samples=64, val_samples=64, seed=0):
    """scikit-learn's digits with bfloat16 inputs (the model's dtype), integer labels."""
    from torch.utils.data import TensorDataset

    from hpcprune.zoo.data import _split, digits

    d = digits(calib_samples=calib_samples, val_samples=val_samples, seed=seed)
    x = torch.cat([d.train.tensors[0], d.val.tensors[0]]).to(torch.bfloat16)
    y = torch.cat([d.train.tensors[1], d.val.tensors[1]])
    assert isinstance(d.train, TensorDataset)
    return _split(x, y, val_samples, calib_samples, seed)


def test_a_bfloat16_model_and_input_of_ones_own(tmp_path):
    """A bfloat16 model fed bfloat16 inputs goes through the whole sweep: its example input is stored
    (numpy has no bfloat16: as float32, exactly, with its dtype) and read back as it was."""
    import hpcprune
    from hpcprune.runs import example_input

    run = tmp_path / "run"
    assert sweep_in_process(run, *QUICK, "model._target_=test_stages.bf16_mlp", "data._target_=test_stages.bf16_digits") == 0
    rf = RunFile(str(run / "run.h5"))
    x = example_input(rf)
    assert x.dtype == torch.bfloat16 and torch.equal(x, bf16_digits().example_input)
    model = hpcprune.load_pruned(str(run / "run.h5"))
    assert model(x).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
