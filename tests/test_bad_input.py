"""Bad input stops at once with one clear line naming the value, a non-zero exit, on every rank.

The line itself is checked in this process, case by case: a bad group option, or a value of the
wrong type or not among a key's choices (the schema, hpcprune/schema.py), by the sweep's dry
composition (``hpcprune.sweep.precheck_argv``, what ``main`` runs before Hydra), a bad value of the
right type by ``hpcprune.stages.validate`` on the composed config (what rank 0 runs before it touches the run
directory); the sweep prints either as ``hpcprune: error: <line>``. A few real processes (one and two
MPI ranks) check the rest of the claim end to end: the exit code, that one line and nothing else on
stderr, no run file.
"""
import os

import torch

import pytest

from conftest import FAST, compose, run_sweep, sweep_in_process
from hpcprune.stages import ConfigError, validate
from hpcprune.sweep import precheck_argv

# a group option that does not exist: refused by the composition itself
COMPOSE_CASES = [
    (["model=nosuchmodel"], "model=nosuchmodel: unknown model 'nosuchmodel'"),
    (["data=nosuchdata"], "data=nosuchdata: unknown data 'nosuchdata'"),
    (["launcher=kubernetes"], "launcher=kubernetes: unknown launcher 'kubernetes'"),
]

# a value of the wrong type, or not one of the key's choices: refused by the composition (the schema)
SCHEMA_CASES = [
    (["prune.method=magic"], "prune.method=magic:", "expected one of [uniform, global, sensitivity]"),
    (["importance=vibes"], "importance=vibes:", "expected one of [l1, l2, bn_scale, taylor, activation, fluctuation, random]"),
    (["sensitivity.channels_last=maybe"], "sensitivity.channels_last=maybe:", "not a valid bool"),
    (["groups.kinds=[channels,rows]"], "groups.kinds=[channels,rows]:", "Invalid value 'rows', expected one of"),
    (["threads=abc"], "threads=abc:", "could not be converted to Integer"),
    (["prune.target.macs=most"], "prune.target.macs=most:", "could not be converted to Float"),
]

# a value the config composes with, refused by validate(): (overrides, the line's start, more of it)
VALUE_CASES = [
    (["prune.target.macs=1.5"], "prune.target.macs=1.5:", "in (0, 1)"),
    (["prune.target.macs=0"], "prune.target.macs=0.0:", "in (0, 1)"),  # typed float: the config holds 0.0
    (["prune.target.macs=null"], "prune.target=", "give at least one target"),
    (["+prune.target.flops=0.5"], "prune.target.flops=0.5:", "unknown target"),
    (["sensitivity.ratios=[0.5,1.2]"], "sensitivity.ratios=[0.5, 1.2]:", "ratio 1.2 is outside (0, 1)"),
    (["sensitivity.ratios=[0.5,0.2]"], "sensitivity.ratios=[0.5, 0.2]:", "strictly increasing"),
    (["sensitivity.ratios=[]"], "sensitivity.ratios=[]:", "the ratio grid is empty"),
    (["checkpoint=/nonexistent/dense.pt"], "checkpoint=/nonexistent/dense.pt:", "no such file"),
    (["launcher.master_port=80"], "launcher.master_port=80:", "a TCP port"),
    (["sensitivity.team_size=0"], "sensitivity.team_size=0:", "must be auto or a positive integer"),
    (["prune.max_ratio=1.0"], "prune.max_ratio=1.0:", "must be in (0, 1)"),
    (["prune.round_to=0"], "prune.round_to=0:", "must be a positive integer"),
    (["prune.exact_time_s=0"], "prune.exact_time_s=0.0:", "must be a positive number of seconds"),
    (["groups.kinds=[]"], "groups.kinds=[]:", "give a non-empty list of group kinds"),
    (["groups.timeout_s=-1"], "groups.timeout_s=-1:", "must be a number of seconds"),
    (["groups.timeout_s=soon"], "groups.timeout_s=soon:", "must be a number of seconds"),
    (["finetune.distill.weight=2"], "finetune.distill.weight=2.0:", "must be in [0, 1]"),
    (["finetune.epochs=-1"], "finetune.epochs=-1:", "must be a non-negative integer"),
    (["sensitivity.batch_size=0"], "sensitivity.batch_size=0:", "must be a positive integer"),
    (["device=tpu"], "device=tpu:", "use auto, cpu, cuda or cuda:N"),
]


def test_good_configs_validate():
    """What the cases below change is valid as given: each refusal is the bad value's."""
    for overrides in ([], FAST, [*FAST, "prune.target.macs=null", "prune.target.latency=0.5", "sensitivity.team_size=2",
                                 "launcher.master_port=29500", "device=cuda:1", "groups.kinds=[channels]"]):
        assert precheck_argv(list(overrides)) is None
        validate(compose(overrides))


@pytest.mark.parametrize("overrides,line", COMPOSE_CASES, ids=[c[0][0].split("=")[0] for c in COMPOSE_CASES])
def test_unknown_group_option_one_line(overrides, line):
    err = precheck_argv([*FAST, *overrides])
    assert err is not None and err.startswith(line) and "\n" not in err, err
    assert "choose from: " in err  # the options there are


@pytest.mark.parametrize("overrides,start,needle", SCHEMA_CASES, ids=[c[0][0].split("=")[0] for c in SCHEMA_CASES])
def test_bad_type_or_choice_one_line(overrides, start, needle):
    err = precheck_argv([*FAST, *overrides])
    assert err is not None and "\n" not in err and err.startswith(start) and needle in err, err


@pytest.mark.parametrize("overrides,start,needle", VALUE_CASES, ids=[c[0][0].lstrip("+")[:32] for c in VALUE_CASES])
def test_bad_value_one_line(overrides, start, needle):
    assert precheck_argv([*FAST, *overrides]) is None  # it composes: the value is refused, not the command line
    cfg = compose([*FAST, *overrides])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(start) and needle in msg, msg


# ---- end to end: the process --------------------------------------------------------------------
def _one_error_line(p, needle):
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith("[hpcprune]") and "%|" not in l]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("hpcprune: error:") and needle in lines[0], lines[0]


def test_target_out_of_reach_on_the_architecture(tmp_path, dense_ckpt):
    """A target no allocation within prune.max_ratio can meet: found by the groups stage, on the
    architecture, before any training or sensitivity cell (one line: the sweep prints the message)."""
    with pytest.raises(ConfigError) as e:
        sweep_in_process(tmp_path / "run", *FAST, f"checkpoint={dense_ckpt}", "prune.target.macs=0.05",
                         "prune.max_ratio=0.5")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("prune.target.macs=0.05 cannot be met: with prune.max_ratio=0.5") and \
        "found on the architecture, before any training" in msg, msg


def test_a_refusal_names_the_excluded_groups_and_records_them(tmp_path):
    """A target out of reach because verification excluded a group: the line names it (it stays
    whole), and the run file keeps what the groups stage found (/groups, not complete: a rerun does
    the stage again), so the report shows the exclusion."""
    import h5py
    import json

    run = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        sweep_in_process(run, *[o for o in FAST if not o.startswith("data.")], "model=custom",
                         "model._target_=archs2.channel_roll", "data=custom", "data._target_=archs.data_images",
                         "+data.calib_samples=16", "prune.target.macs=0.05")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("prune.target.macs=0.05 cannot be met") and \
        "1 group excluded above stays whole (stem.0)" in msg, msg
    with h5py.File(run / "run.h5") as f:
        g = f["groups"]
        assert not g.attrs["complete"] and [x[0] for x in json.loads(g.attrs["excluded"])][:1] == ["stem.0"]
    from hpcprune import report

    assert report.load_run(str(run / "run.h5")).excluded[0][0] == "stem.0"


def test_a_frozen_model_to_be_fine_tuned_is_refused_before_any_training(tmp_path):
    """Every parameter frozen and finetune.epochs > 0: the fine-tune would fail after the whole grid;
    the groups stage says so in one line, on the architecture, before dense training."""
    import h5py

    run = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        sweep_in_process(run, *[o for o in FAST if not o.startswith("data.")], "model=custom",
                         "model._target_=archs2.frozen_cnn", "data=custom", "data._target_=archs.data_images",
                         "+data.calib_samples=16")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("groups: every parameter of the model is frozen") and "finetune.epochs=0" in msg, msg
    with h5py.File(run / "run.h5") as f:
        assert "baseline" not in f and "sensitivity" not in f

def test_no_whole_fine_tune_batch_refused_before_the_run(tmp_path, dense_ckpt, capsys):
    """A fine-tune batch larger than the training set (on its DDP tasks) would train on nothing after
    all the compute: refused at the start, naming the key, before the run file exists."""
    assert sweep_in_process(tmp_path / "run", *FAST, f"checkpoint={dense_ckpt}", "finetune.batch_size=100000") != 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("hpcprune: error:")]
    assert len(lines) == 1 and "finetune.batch_size=100000: the training set's" in lines[0] and "lower" in lines[0], lines
    assert not (tmp_path / "run" / "run.h5").exists()


def float_targets(calib_samples=16, multi_label=False):
    """scikit-learn's digits with float targets: the digit's value (a regression), or one-hot rows
    (multi-label): tasks hpcprune does not train (its loss is cross-entropy over class indices)."""
    from torch.utils.data import TensorDataset

    from hpcprune.zoo.data import _bundle, digits

    d = digits(calib_samples=calib_samples, val_samples=64)

    def as_float(ds):
        x, y = ds.tensors
        return TensorDataset(x, torch.nn.functional.one_hot(y, 10).float() if multi_label else y.float())
    return _bundle(as_float(d.train), as_float(d.val), calib_samples, 0, 10)


def pair_input(calib_samples=16):
    """scikit-learn's digits, each sample given as a (image, extra features) pair: two inputs."""
    from hpcprune.zoo.data import digits

    d = digits(calib_samples=calib_samples, val_samples=64)
    d.example_input = (d.example_input, torch.zeros(len(d.example_input), 4))
    return d


@pytest.mark.parametrize("target,needle", [
    ("test_bad_input.float_targets", "the training targets are float32 (one sample's: shape ())"),
    ("test_bad_input.float_targets +data.multi_label=true", "the training targets are float32 (one sample's: shape (10,))"),
    ("test_bad_input.pair_input", "example_input is a tuple of 2, not one tensor"),
], ids=["regression", "multi-label", "two-inputs"])
def test_a_task_hpcprune_does_not_train_is_refused_before_the_run(tmp_path, capsys, target, needle):
    """Float targets (a regression, multi-label rows) or two inputs per sample: each failed only in a
    later stage (after the groups stage, after dense training); now one line naming the data's
    target and what it gives, before the run file exists."""
    target, *more = target.split()
    assert sweep_in_process(tmp_path / "run", *[o for o in FAST if not o.startswith("data.")], "data=custom",
                            f"data._target_={target}", "+data.calib_samples=16", *more) != 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("hpcprune: error:")]
    assert len(lines) == 1 and f"data (_target_={target}): {needle}" in lines[0], lines
    assert not (tmp_path / "run" / "run.h5").exists()


def _digits_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(16, 10))


def scripted_cnn():
    return torch.jit.script(_digits_cnn())


def lazy_cnn():
    return torch.nn.Sequential(torch.nn.LazyConv2d(8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 10))


def masked_cnn():
    """Unstructured-pruned already (torch.nn.utils.prune: weight_orig and a weight_mask buffer)."""
    from torch.nn.utils import prune

    model = _digits_cnn()
    for i in (0, 3):
        prune.l1_unstructured(model[i], "weight", amount=0.3)
    return model


@pytest.mark.parametrize("target,needle", [
    ("scripted_cnn", "a TorchScript module (RecursiveScriptModule, from torch.jit.script / torch.jit.trace): hpcprune "
                     "prunes the eager nn.Module"),
    ("lazy_cnn", "0 (LazyConv2d) has uninitialised (lazy) parameters"),
    ("masked_cnn", "carries an unstructured pruning mask (torch.nn.utils.prune: weight_orig and weight_mask); make it "
                   "permanent before structured pruning: torch.nn.utils.prune.remove(layer, 'weight')"),
])
def test_a_model_that_is_not_a_plain_eager_module_is_refused_naming_the_remedy(tmp_path, capsys, target, needle):
    """A TorchScript module, lazy layers and torch.nn.utils.prune's masks: one line saying what the
    model is and what to change (before: a vague "no prunable group (layer types:
    RecursiveScriptModule)", torch's own uninitialised-parameter error with no stage, advice to remove
    a weight norm)."""
    try:  # refused before the run (a return code and the line) or by the groups stage (its ConfigError, in process)
        assert sweep_in_process(tmp_path / "run", *FAST, f"model._target_=test_bad_input.{target}") != 0
        lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("hpcprune: error:")]
    except ConfigError as e:
        lines = [str(e)]
    assert len(lines) == 1 and "\n" not in lines[0] and needle in lines[0], lines


E2E = [
    (["model=nosuchmodel"], COMPOSE_CASES[0][1]),  # the dry composition, before Hydra
    (["prune.target.macs=1.5"], "prune.target.macs=1.5: a target is the fraction"),  # validate, on rank 0
]


@pytest.mark.parametrize("overrides,needle", E2E, ids=["compose", "validate"])
def test_bad_override_process(tmp_path, overrides, needle):
    """Exit code 2, the one line alone on stderr, no run file."""
    p = run_sweep(tmp_path / "run", *FAST, *overrides, check=False, timeout=120)
    _one_error_line(p, needle)
    assert p.returncode == 2
    assert not os.path.exists(tmp_path / "run" / "run.h5")


@pytest.mark.parametrize("sweep,needle", [
    (["prune.target.macs=0.4,1.5", "prune.method=uniform,global"],
     "prune.target.macs=1.5: a target is the fraction of the dense cost to keep, in (0, 1) (the sweep's point "
     "prune.target.macs=1.5, prune.method=uniform; no point was started)"),
    (["model=resnet_tiny,nosuchmodel"], "(the sweep's point model=nosuchmodel; no point was started)"),
], ids=["value", "compose"])
def test_bad_point_of_a_multirun_refused_before_any_point_starts(tmp_path, sweep, needle):
    """Every point of a --multirun is composed and validated first: the bad one is named in one line,
    exit code 2, and the good points did not run (no sweep directory)."""
    p = run_sweep(tmp_path / "unused", "-m", *FAST, *sweep, f"hydra.sweep.dir={tmp_path / 'multi'}", check=False, timeout=120)
    _one_error_line(p, needle)
    assert p.returncode == 2 and not os.path.exists(tmp_path / "multi")


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("overrides,needle", [COMPOSE_CASES[0][:2], VALUE_CASES[4][::2]], ids=["model", "ratios"])
def test_bad_override_under_mpi(tmp_path, overrides, needle):
    p = run_sweep(tmp_path / "run", *FAST, *overrides, ranks=2, check=False, timeout=60)
    assert p.returncode != 0
    errors = [l for l in p.stderr.splitlines() if l.startswith("hpcprune: error:")]
    assert len(errors) == 1 and needle in errors[0], p.stderr
    assert not os.path.exists(tmp_path / "run" / "run.h5")


def test_foreign_run_file_untouched(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.h5").write_bytes(b"not an hdf5 file at all")
    p = run_sweep(d, *FAST, check=False, timeout=60)
    assert p.returncode != 0 and "not a readable HDF5 file" in p.stderr
    assert (d / "run.h5").read_bytes() == b"not an hdf5 file at all"


def test_multirun_dir_with_now_interpolation_still_counts_failed_points(tmp_path):
    """hydra.sweep.dir=DIR/${now:%H-%M-%S} on the command line: the summary reads the directory the
    points really use (it read the unresolved text, found nothing and exited 0)."""
    p = run_sweep(tmp_path / "unused", "-m", *FAST, "model=mlp", "baseline.epochs=0", "finetune.epochs=0",
                  "groups.ignore=[nope]", f"hydra.sweep.dir={tmp_path / 'multi'}/${{now:%H-%M-%S}}", check=False, timeout=120)
    assert p.returncode == 3, p.stderr[-2000:]
    (sub,) = os.listdir(tmp_path / "multi")
    assert "${" not in sub and f"1 run(s) of the sweep failed (of 1): {tmp_path / 'multi' / sub / '0'}" in p.stderr


class _FailsInTraining(torch.nn.Sequential):
    """A user's model with a bug that only training meets."""

    def forward(self, x):
        if self.training:
            raise RuntimeError("my_forward: batch statistics missing\n(a second line)")
        return super().forward(x)


def fails_in_training():
    from hpcprune.zoo.models import resnet

    return _FailsInTraining(*resnet(1, 10, (8, 16), (1, 1)))


def test_an_unexpected_error_names_its_stage_and_the_log(tmp_path):
    """An error hpcprune did not foresee (here the user's forward, in dense training) is one line naming
    the stage it stopped, the exception's first line and where its traceback is; status failed."""
    import io

    import h5py

    from hpcprune.stages import Sweep
    from hpcprune.world import World, run_guarded

    err = io.StringIO()
    cfg = compose([*FAST, "model=custom", "model._target_=test_bad_input.fails_in_training", "baseline.epochs=1",
                   "prune.target.macs=0.8"])
    world = World(None)
    world.abort = lambda code: None  # in-process: no MPI to abort
    assert run_guarded(world, lambda: Sweep(cfg, world, str(tmp_path / "run")).run(), err_stream=err) == 1
    assert err.getvalue().splitlines() == ["hpcprune: error: stage baseline: RuntimeError: my_forward: batch statistics "
                                           "missing ... (traceback in sweep.log)"]
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert f.attrs["status"] == "failed" and "my_forward" in f.attrs["status_reason"]
