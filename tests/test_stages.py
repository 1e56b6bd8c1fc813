"""What the stages hand each other in one process (in-process sweeps, the run file read back)."""
import types

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
