"""The field cases (``../shared/field-cases``: small models of architectures that hpcprune got
wrong, with hand-cut references) through the real sweep, in process: each completes, its recorded
MACs equal FlopCounterMode's count of the reloaded model, the target is met, its ``check()``
(a hand-cut reference of the plan) reports nothing bad, and ``load_pruned`` reproduces the metric.
Skipped where the shared folder is not beside the repository."""
import importlib
import os
import sys

import h5py
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CASES_DIR = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "field-cases")
NAMES = sorted(f[:-3] for f in os.listdir(CASES_DIR) if f.endswith(".py")) if os.path.isdir(CASES_DIR) else []

sys.path.insert(0, HERE)
from test_archs import SETTINGS, TARGET, run_inprocess  # noqa: E402


@pytest.mark.skipif(not NAMES, reason=f"no field cases at {CASES_DIR}")
@pytest.mark.parametrize("name", NAMES)
def test_field_case(name, tmp_path):
    import torch

    from hpcprune import load_pruned, metrics
    from hpcprune.costs import count_macs
    from hpcprune.runs import dense_model, example_input, read_plan
    from hpcprune.store import RunFile

    torch.set_num_threads(1)
    sys.path.insert(0, CASES_DIR)
    case = importlib.import_module(name)
    overrides = ["model=custom", f"model._target_={name}.model", "data=custom", f"data._target_={name}.data",
                 *[s for s in SETTINGS if not s.startswith("data.")]]
    assert run_inprocess(tmp_path / "run", overrides) == 0
    path = str(tmp_path / "run" / "run.h5")
    rf = RunFile(path)
    with h5py.File(path) as f:
        final, dense_macs = dict(f["final"].attrs), float(f["baseline"].attrs["macs"])
    model = load_pruned(path)
    x = example_input(rf)
    counted = count_macs(model, x[:1])
    assert abs(final["macs"] - counted) <= 0.01 * counted
    assert final["macs"] / dense_macs <= TARGET + 1e-9
    sums = metrics.evaluate(model, metrics.make_batches(case.data().val, 256))
    assert sums.metric("accuracy") == pytest.approx(final["metric"], abs=1e-9)
    if hasattr(case, "check"):
        lines = case.check(dense_model(rf), load_pruned(path, weights="plan"), read_plan(rf), x)
        assert not [ln for ln in lines if ln.startswith("BAD")], lines
