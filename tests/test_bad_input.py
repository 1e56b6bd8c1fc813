"""Bad input stops at once with one clear line naming the value, a non-zero exit, on every rank."""
import os

import pytest

from conftest import FAST, run_sweep

CASES = [
    (["model=nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["data=nosuchdata"], "unknown data 'nosuchdata'"),
    (["launcher=kubernetes"], "unknown launcher 'kubernetes'"),
    (["prune.target.macs=1.5"], "prune.target.macs=1.5"),
    (["prune.target.macs=0"], "prune.target.macs=0"),
    (["sensitivity.ratios=[0.5,1.2]"], "ratio 1.2 is outside (0, 1)"),
    (["sensitivity.ratios=[0.5,0.2]"], "strictly increasing"),
    (["sensitivity.ratios=[]"], "the ratio grid is empty"),
    (["prune.method=magic"], "prune.method=magic"),
    (["importance=vibes"], "importance=vibes"),
    (["checkpoint=/nonexistent/dense.pt"], "checkpoint=/nonexistent/dense.pt"),
    (["prune.target.macs=0.05", "prune.max_ratio=0.5"], "cannot be met"),
    (["launcher.master_port=80"], "launcher.master_port=80: a TCP port"),
    (["sensitivity.channels_last=maybe"], "sensitivity.channels_last=maybe: must be true or false"),
    (["sensitivity.team_size=0"], "sensitivity.team_size=0: must be auto or a positive integer"),
]


@pytest.mark.parametrize("overrides,needle", CASES, ids=[c[1][:30] for c in CASES])
def test_bad_override_one_line(tmp_path, overrides, needle):
    p = run_sweep(tmp_path / "run", *FAST, *overrides, check=False, timeout=120)
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith("[hpcprune]") and "%|" not in l]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("hpcprune: error:") and needle in lines[0], lines[0]


@pytest.mark.mpi
@pytest.mark.parametrize("overrides,needle", [CASES[0], CASES[3], CASES[5]], ids=["model", "target", "ratios"])
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
