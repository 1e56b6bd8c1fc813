"""The command line's own parts, in process: overrides added around Hydra's options, a misspelt
``_target_`` named with the closest names, a failed run's reason in the report."""
import subprocess
import sys

import pytest

from hpcprune.config import ConfigError, instantiate
from hpcprune.sweep import _with_overrides


@pytest.mark.parametrize("argv, want", [
    (["threads=1", "--cfg", "job"], ["--cfg", "job", "threads=1", "hydra.output_subdir=null"]),
    (["--config-dir", "d", "model=mine", "--info", "config"], ["--config-dir", "d", "--info", "config", "model=mine",
                                                               "hydra.output_subdir=null"]),
    (["-m", "prune.target.macs=0.3,0.5"], ["-m", "prune.target.macs=0.3,0.5", "hydra.output_subdir=null"]),
    (["--info", "model=mine"], ["--info", "model=mine", "hydra.output_subdir=null"]),
])
def test_overrides_go_after_the_options(argv, want):
    assert _with_overrides(argv, ["hydra.output_subdir=null"]) == want


def test_cfg_job_after_overrides_prints_the_config(tmp_path):
    p = subprocess.run([sys.executable, "-m", "hpcprune.sweep", "threads=1", f"hydra.run.dir={tmp_path}/r", "--cfg", "job"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "threads: 1" in p.stdout and not (tmp_path / "r").exists()


def test_misspelt_target_names_the_module_and_the_closest_names():
    from omegaconf import OmegaConf
    from hydra.utils import instantiate as hydra_instantiate

    node = OmegaConf.create({"_target_": "hpcprune.zoo.models.resnett"})
    with pytest.raises(ConfigError) as e:
        instantiate("model", hydra_instantiate, node)
    assert str(e.value) == "model._target_=hpcprune.zoo.models.resnett: module hpcprune.zoo.models has no 'resnett' (did you mean resnet?)"
    node = OmegaConf.create({"_target_": "no_such_package_xyz.build"})
    with pytest.raises(ConfigError, match="no_such_package_xyz"):
        instantiate("model", hydra_instantiate, node)


def test_report_says_why_a_run_failed(tmp_path, dense_ckpt, capsys):
    from conftest import FAST, sweep_in_process

    from hpcprune import report

    with pytest.raises(ConfigError):
        sweep_in_process(tmp_path / "run", *FAST, f"checkpoint={dense_ckpt}", "prune.target.macs=0.05", "prune.max_ratio=0.5")
    capsys.readouterr()
    assert report.main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "failed: ConfigError: prune.target.macs=0.05 cannot be met" in out, out
