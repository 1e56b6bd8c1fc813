"""Bad input, each a test: one clear line naming the value, a non-zero exit, nothing damaged.

(More cases, the bad overrides, are in tests/test_bad_input.py.) Files are real: a run file is a
real run's, truncated or edited with h5py; checkpoints are written with torch.save.
"""
import hashlib
import os
import shutil

import h5py
import numpy as np
import pytest

from conftest import LEAN, MPIEXEC, PY, error_lines, ok, ov, run, sweep_cmd, sweep_in_process

pytestmark = pytest.mark.faults


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def refused(p, needle, limit_s=60):
    """Non-zero exit, one error line holding ``needle``, quickly (no compute spent)."""
    assert p.returncode != 0, p.stderr[-3000:]
    lines = error_lines(p.stderr)
    assert len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("hpcprune: error:") and needle in lines[0], lines[0]
    assert p.seconds < limit_s, f"took {p.seconds:.0f} s"
    return lines[0]


@pytest.fixture(scope="module")
def lean_run(tmp_path_factory, dense_ckpt):
    d = tmp_path_factory.mktemp("lean") / "run"
    ok(run(sweep_cmd(d, *LEAN, f"checkpoint={dense_ckpt}")))
    return d


def _copy_run(lean_run, dest):
    dest.mkdir()
    shutil.copy(lean_run / "run.h5", dest / "run.h5")
    return dest / "run.h5"


# ---- run files --------------------------------------------------------------------------------
@pytest.mark.slow  # lean_run: a whole sweep
def test_newer_schema_refused(tmp_path, lean_run, dense_ckpt):
    h5 = _copy_run(lean_run, tmp_path / "run")
    with h5py.File(h5, "a") as f:
        f.attrs["schema_version"] = 99
    before = md5(h5)
    p = run(sweep_cmd(tmp_path / "run", *LEAN, f"checkpoint={dense_ckpt}"))
    refused(p, "schema version 99 is newer")
    assert md5(h5) == before


@pytest.mark.slow  # lean_run: a whole sweep
def test_truncated_run_file_refused(tmp_path, lean_run, dense_ckpt):
    h5 = _copy_run(lean_run, tmp_path / "run")
    size = os.path.getsize(h5)
    with open(h5, "r+b") as f:
        f.truncate(size // 3)
    before = md5(h5)
    p = run(sweep_cmd(tmp_path / "run", *LEAN, f"checkpoint={dense_ckpt}"))
    line = refused(p, "not a readable HDF5 file")
    assert str(h5) in line
    assert md5(h5) == before


def test_other_programs_hdf5_refused(tmp_path, dense_ckpt):
    d = tmp_path / "run"
    d.mkdir()
    with h5py.File(d / "run.h5", "w") as f:  # what another tool might leave under that name
        f.create_dataset("images", data=np.zeros((4, 8, 8)))
        f.attrs["creator"] = "someone else"
    before = md5(d / "run.h5")
    p = run(sweep_cmd(d, *LEAN, f"checkpoint={dense_ckpt}"))
    refused(p, "not an hpcprune run file")
    assert md5(d / "run.h5") == before


@pytest.mark.slow  # lean_run: a whole sweep
def test_resume_with_other_config_refused(tmp_path, lean_run, dense_ckpt):
    h5 = _copy_run(lean_run, tmp_path / "run")
    shutil.copytree(lean_run / ".hydra", tmp_path / "run" / ".hydra")  # the run's own record of its config
    hydra_before = {f: md5(tmp_path / "run" / ".hydra" / f) for f in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    before = md5(h5)
    p = run(sweep_cmd(tmp_path / "run", *LEAN, f"checkpoint={dense_ckpt}", "prune.target.macs=0.4", "seed=3"))
    line = refused(p, "was made with a different config")
    assert "prune.target.macs: 0.5 -> 0.4" in line and "seed: 0 -> 3" in line
    assert md5(h5) == before
    assert {f: md5(tmp_path / "run" / ".hydra" / f) for f in hydra_before} == hydra_before  # not rewritten


# ---- checkpoints, data, model: refused by rank 0's input checks, in this process ---------------
def _no_result(d):
    assert not os.path.exists(d / "run.h5"), "a run file was created for a refused run"



# (the sweep runs the same Sweep.run(); test_bad_input.py checks the exit code and the single
# line of a real process for this path, and test_missing_data_path_under_mpi below under mpiexec)
def refused_in_process(capsys, d, overrides, needle):
    """Sweep.run() in this process: exit code 2, one line holding ``needle``, no run file."""
    rc = sweep_in_process(d, *overrides)
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("hpcprune: error:") and needle in lines[0], lines[0]
    _no_result(d)
    return lines[0]


def test_checkpoint_wrong_shapes(tmp_path, capsys):
    import torch

    ck = tmp_path / "wrong.pt"
    torch.save({"0.0.weight": torch.zeros(8, 1, 3, 3), "fc.weight": torch.zeros(10, 8)}, ck)
    refused_in_process(capsys, tmp_path / "run", [*LEAN, f"checkpoint={ck}"], f"checkpoint={ck}: does not fit the model")


def test_checkpoint_corrupt(tmp_path, dense_ckpt, capsys):
    ck = tmp_path / "corrupt.pt"
    with open(dense_ckpt, "rb") as f:
        ck.write_bytes(f.read()[:4000])  # a copy cut short
    refused_in_process(capsys, tmp_path / "run", [*LEAN, f"checkpoint={ck}"], f"checkpoint={ck}: not a readable torch state dict")


def test_checkpoint_not_a_state_dict(tmp_path, capsys):
    import torch

    ck = tmp_path / "list.pt"
    torch.save([1, 2, 3], ck)
    refused_in_process(capsys, tmp_path / "run", [*LEAN, f"checkpoint={ck}"], f"checkpoint={ck}: holds a list, not a state dict")


def test_missing_data_path(tmp_path, capsys):
    refused_in_process(capsys, tmp_path / "run", [*LEAN, "data=fashion_mnist", "data.root=/nonexistent"], "data.root=/nonexistent")


def test_empty_calibration_set(tmp_path, dense_ckpt, capsys):
    refused_in_process(capsys, tmp_path / "run", ov(LEAN, [f"checkpoint={dense_ckpt}", "data.calib_samples=0"]),
                       "data.calib_samples=0")


def test_unknown_model_target(tmp_path, capsys):
    refused_in_process(capsys, tmp_path / "run", [*LEAN, "model._target_=nosuch.module.net"], "model._target_=nosuch.module.net")


@pytest.mark.mpi
@pytest.mark.slow
def test_missing_data_path_under_mpi(tmp_path):
    p = run(sweep_cmd(tmp_path / "run", *LEAN, "data=fashion_mnist", "data.root=/nonexistent", ranks=2), timeout=120)
    refused(p, "data.root=/nonexistent")
    _no_result(tmp_path / "run")


# ---- more ranks than cells, NaN outputs -------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.slow
def test_four_ranks_two_cells(tmp_path):
    """mpiexec -n 4 for 2 cells: two ranks idle, the run completes with every cell done."""
    d = tmp_path / "run"
    ok(run([MPIEXEC, "-n", "4", PY, "-m", "hpcprune.sweep", f"hydra.run.dir={d}", *LEAN, "model=mlp",
            "baseline.epochs=1", "sensitivity.ratios=[0.5]", "prune.target.macs=0.7"], timeout=300))
    with h5py.File(d / "run.h5") as f:
        assert f.attrs["status"] == "complete" and f.attrs["world_size"] == 4
        assert f["sensitivity/status"].shape == (2, 1) and (f["sensitivity/status"][()] == 1).all()
        assert np.isfinite(f["sensitivity/loss"][()]).all()


@pytest.mark.slow
def test_nan_cells_recorded_and_avoided(tmp_path, dense_ckpt):
    """Pruning group 2.conv1 makes the model output NaN: its cells are NaN (loss and metric), the
    allocation leaves that group alone, the run completes."""
    d = tmp_path / "run"
    p = ok(run(sweep_cmd(d, *LEAN, f"checkpoint={dense_ckpt}", "model=resnet_tiny",
                         "model._target_=faulty.nan_resnet", "+model.nan_modules=[2.conv1]")))
    with h5py.File(d / "run.h5") as f:
        names = list(f["groups/name"].asstr()[()])
        g = names.index("2.conv1")
        loss, metric, status = f["sensitivity/loss"][()], f["sensitivity/metric"][()], f["sensitivity/status"][()]
        assert (status == 1).all()
        assert np.isnan(loss[g]).all() and np.isnan(metric[g]).all()
        others = np.arange(len(names)) != g
        assert np.isfinite(loss[others]).all() and np.isfinite(metric[others]).all()
        assert f["allocation/ratio"][g] == 0.0
        assert f.attrs["status"] == "complete" and np.isfinite(f["final"].attrs["metric"])
    assert "NaN loss, not used by the allocation: 2.conv1@0.25" in p.stderr


@pytest.mark.slow
def test_all_nan_grid_fails_clearly(tmp_path, dense_ckpt):
    d = tmp_path / "run"
    p = run(sweep_cmd(d, *LEAN, f"checkpoint={dense_ckpt}", "model=resnet_tiny", "model._target_=faulty.nan_resnet",
                      "+model.nan_modules=all"))
    line = refused(p, "every sensitivity cell's calibration loss is NaN", limit_s=300)
    assert "prune.method=sensitivity" in line
    with h5py.File(d / "run.h5") as f:
        assert f.attrs["status"] == "failed" and "NaN" in f.attrs["status_reason"]
        assert np.isnan(f["sensitivity/loss"][()]).all() and f["sensitivity"].attrs["complete"]
        assert "allocation" not in f
