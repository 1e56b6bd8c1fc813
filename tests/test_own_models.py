"""A user's own model and data (examples/): --config-dir, hydra.searchpath, model._target_ alone.

Composition checks run in-process (the sweep's dry composition, Hydra's compose API); one real
sweep of the examples package and one refused choice run as subprocesses.
"""
import os
import subprocess

import h5py
import pytest
from hydra import compose, initialize_config_module

from conftest import PY, ROOT
from hpcprune.sweep import own_target_argv, precheck_argv

EXAMPLES = os.path.join(ROOT, "examples")
CONF = os.path.join(EXAMPLES, "conf")
TINY = ["threads=1", "launcher=debug", "baseline.epochs=1", "finetune.epochs=0", "sensitivity.ratios=[0.5]",
        "baseline.latency_repeats=1", "baseline.latency_batch=8"]
DEFAULT_MODEL_KEYS = {"in_channels", "widths", "blocks", "stem_stride", "num_classes"}
DEFAULT_DATA_KEYS = {"calib_samples", "val_samples", "seed"}


def composed(argv):
    """The config the sweep runs for ``argv`` (packaged primary config; after the argv rewrite)."""
    overrides = own_target_argv(argv)
    with initialize_config_module(config_module="hpcprune.conf", version_base=None):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


# ---- the dry composition: what hydra.main will see ----------------------------------------------
@pytest.mark.parametrize("argv", [
    ["--config-dir", CONF, "model=my_cnn", "data=my_digits"],
    ["-cd", CONF, "model=my_cnn", "data=my_digits"],
    [f"hydra.searchpath=[file://{CONF}]", "model=my_cnn", "data=my_digits"],
    ["model._target_=my_models.cnn", "data._target_=my_models.digits"],
    ["model=custom", "model._target_=my_models.cnn", "+model.width=32"],
], ids=["config-dir", "cd", "searchpath", "target-only", "custom-explicit"])
def test_own_configs_accepted(argv):
    assert precheck_argv(own_target_argv(argv)) is None


def test_unknown_choice_lists_config_dir_options():
    err = precheck_argv(["--config-dir", CONF, "model=nosuch"])
    assert err.startswith("model=nosuch: unknown model 'nosuch'") and "\n" not in err
    options = err.split("choose from: ")[1].rstrip(")").split(", ")
    assert "my_cnn" in options and "resnet_tiny" in options
    err = precheck_argv([f"hydra.searchpath=[file://{CONF}]", "data=nosuch"])
    assert "unknown data 'nosuch'" in err and "my_digits" in err
    assert "my_cnn" not in precheck_argv(["model=nosuch"])  # the packaged options only


def test_searchpath_in_primary_config(tmp_path):
    """A user's primary config that declares hydra.searchpath and picks its options."""
    (tmp_path / "mine.yaml").write_text(
        "defaults:\n  - config\n  - override model: my_cnn\n  - override data: my_digits\n  - _self_\n"
        f"hydra:\n  searchpath:\n    - file://{CONF}\n")
    assert precheck_argv(["--config-dir", str(tmp_path), "--config-name", "mine"]) is None
    err = precheck_argv(["-cd", str(tmp_path), "-cn", "mine", "model=nope"])
    assert err.startswith("model=nope: unknown model 'nope'") and "my_cnn" in err
    # the primary config's own model choice keeps its keys: only its _target_ is replaced
    argv = ["-cd", str(tmp_path), "-cn", "mine", "model._target_=my_models.cnn"]
    assert own_target_argv(argv) == argv


@pytest.mark.parametrize("argv,needle", [
    (["--config-name", "nope"], "--config-name nope: no such primary config"),
    (["seed=[1,"], "seed=[1,: not a valid override"),
    (["nokey=3"], "nokey=3: no such key 'nokey' in the config"),
    (["prune.taget.macs=0.4"], "no such key 'prune.taget.macs' in the config; did you mean prune.target.macs"),
    (["--config-dir", "/nonexistent/conf", "model=x"], "--config-dir /nonexistent/conf: no such directory"),
    (["model=custom"], "model._target_ is not set"),
    (["+experiment=nope"], "unknown experiment 'nope'"),
])
def test_composition_errors_one_line(argv, needle):
    err = precheck_argv(argv)
    assert err is not None and needle in err and "\n" not in err, err


def test_multirun_not_composed():
    assert precheck_argv(["-m", "model=nosuch,mlp"]) is None
    assert precheck_argv(["--multirun", "model=nosuch"]) is None


# ---- model._target_ alone: the user's own model, none of the default's keys ---------------------
def test_target_alone_passes_no_default_keys():
    cfg = composed(["model._target_=my_models.cnn", "data._target_=my_models.digits"])
    assert dict(cfg.model) == {"_target_": "my_models.cnn"}
    assert dict(cfg.data) == {"_target_": "my_models.digits"}
    assert cfg.hydra.runtime.choices.model == "custom" and cfg.hydra.runtime.choices.data == "custom"


def test_target_with_own_keys():
    cfg = composed(["model._target_=my_models.cnn", "+model.width=32"])
    assert dict(cfg.model) == {"_target_": "my_models.cnn", "width": 32}
    assert set(cfg.data) >= DEFAULT_DATA_KEYS  # data untouched: the default data set
    cfg = composed(["model=custom", "model._target_=my_models.cnn", "+model.width=32"])
    assert dict(cfg.model) == {"_target_": "my_models.cnn", "width": 32}


def test_explicit_choice_keeps_its_keys():
    cfg = composed(["model=resnet_tiny", "model._target_=my_models.cnn"])
    assert cfg.model._target_ == "my_models.cnn" and set(cfg.model) >= DEFAULT_MODEL_KEYS
    cfg = composed(["+experiment=tiny_gpt_text", "model._target_=my_models.cnn"])
    assert cfg.hydra.runtime.choices.model == "tiny_gpt"


def test_rewrite_under_multirun_stays_with_the_overrides():
    argv = ["-m", "model._target_=my_models.cnn", "seed=1,2"]
    assert own_target_argv(argv) == argv + ["model=custom"]  # among the overrides, after -m
    assert own_target_argv(["-m", "model=mlp,resnet_tiny", "model._target_=x.y"]) == \
        ["-m", "model=mlp,resnet_tiny", "model._target_=x.y"]


# ---- real runs ---------------------------------------------------------------------------------
def _sweep(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=EXAMPLES)
    return subprocess.run([PY, "-m", "hpcprune.sweep", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_examples_sweep_with_config_dir(tmp_path):
    d = tmp_path / "run"
    p = _sweep("--config-dir", "examples/conf", "model=my_cnn", "data=my_digits", f"hydra.run.dir={d}", *TINY,
               timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    with h5py.File(d / "run.h5") as f:
        assert f.attrs["status"] == "complete"
    # the run read where the model's package is not importable: one line that says so, not a traceback
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    e = subprocess.run([PY, "-m", "hpcprune.export", str(d / "run.h5"), "--format", "torchscript", "--out", str(tmp_path / "x")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in e.stderr.splitlines() if ln.strip()]
    assert e.returncode == 2 and len(lines) == 1, e.stderr[-3000:]
    assert "model._target_=my_models.cnn: " in lines[0] and "No module named 'my_models'" in lines[0] and "PYTHONPATH" in lines[0]


def test_unknown_choice_with_config_dir_refused(tmp_path):
    d = tmp_path / "run"
    p = _sweep("--config-dir", "examples/conf", "model=nosuch", f"hydra.run.dir={d}", *TINY)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("hpcprune: error: model=nosuch: unknown model 'nosuch'") and "my_cnn" in lines[0]
    assert not d.exists()  # refused before Hydra wrote anything
