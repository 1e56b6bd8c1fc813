"""Energy per inference (hpcprune.energy): the meters, the RAPL counter's wrap-around, the energy
budget refused where energy cannot be measured and re-allocated where it is."""
import json
import math
import os
import threading
import time

import h5py
import pytest

from hpcprune import energy

from conftest import FAST, default_model, sweep_in_process


def test_unavailable_meter_names_the_reason(tmp_path):
    """No powercap directory, or one without a package zone: unavailable, with the exact reason (the
    GPU side's reason too), recorded as NaN and ``unavailable: <reason>``, never estimated."""
    missing = str(tmp_path / "powercap")
    reason = energy.unavailable_reason("cpu", missing)
    assert reason.startswith(f"RAPL: {missing} missing; NVML: ") and "\n" not in reason, reason
    (tmp_path / "powercap").mkdir()
    assert energy.unavailable_reason("cpu", missing).startswith(f"RAPL: no package zone (intel-rapl:<n>) in {missing}; ")
    import torch

    res = energy.measure_model(torch.nn.Linear(4, 2), torch.zeros(1, 4), 8, "cpu", rapl_root=missing)
    assert math.isnan(res.j_per_sample) and res.source == f"unavailable: {energy.unavailable_reason('cpu', missing)}"
    if not os.path.isdir(energy.RAPL_ROOT):  # this machine: no powercap at all
        assert energy.unavailable_reason("cpu").startswith("RAPL: /sys/class/powercap missing; NVML: ")


def _zone(root, name, label, uj, top=None):
    z = root / name
    z.mkdir()
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{uj}\n")
    if top is not None:
        (z / "max_energy_range_uj").write_text(f"{top}\n")
    return z / "energy_uj"


def test_fake_rapl_counts_joules_through_wraparounds(tmp_path):
    """Two package zones written by a thread while the loop runs, one of them wrapping at 1 J every
    few passes; a core subzone (inside the package's count) is not added again. Each pass makes the
    thread add 0.2 J and 0.05 J: the meter's total is exactly passes x 0.25 J."""
    pkg0 = _zone(tmp_path, "intel-rapl:0", "package-0", 900_000, top=1_000_000)  # wraps at 1 J
    pkg1 = _zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000, top=262_143_328_850)
    core = _zone(tmp_path, "intel-rapl:0:0", "core", 0, top=1_000_000)
    meter = energy.RaplMeter(str(tmp_path))
    assert meter.source == "rapl:package-0,package-1" and meter.ranges == [1.0, 262143.32885]
    go, done, stop = threading.Event(), threading.Event(), threading.Event()
    values = {pkg0: 900_000, pkg1: 5_000_000}
    wraps = []

    def writer():
        while not stop.is_set():
            if not go.wait(0.05):
                continue
            go.clear()
            for path, add, top in ((pkg0, 200_000, 1_000_000), (pkg1, 50_000, 262_143_328_850)):
                new = values[path] + add
                if new >= top:
                    wraps.append(path)
                values[path] = new % top
                path.write_text(f"{values[path]}\n")
            core.write_text(f"{int(time.time() * 1e6) % 1_000_000}\n")  # never summed
            done.set()

    def step():  # one forward pass: the "device" spends 0.25 J and ~15 ms
        time.sleep(0.015)
        go.set()
        assert done.wait(5)
        done.clear()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        res = energy.measure(step, meter, batch=4, min_seconds=0.3, min_iterations=12)  # 12 steps wrap 3 times, however slow
    finally:
        stop.set()
        t.join(5)
    assert res.iterations >= 12 and res.seconds >= 0.3 and len(wraps) >= 3  # the 1 J zone wrapped, more than once
    assert res.joules == pytest.approx(0.25 * res.iterations, rel=1e-9)
    assert res.j_per_sample == pytest.approx(0.25 / 4, rel=1e-9) and res.source == "rapl:package-0,package-1"


def test_energy_budget_refused_before_training(tmp_path, monkeypatch, capsys):
    """prune.target.energy where no counter is readable: one line naming the value and the reason,
    exit 2, before the run directory is touched (no run file, no training)."""
    monkeypatch.setattr(energy, "RAPL_ROOT", str(tmp_path / "no-powercap"))
    d = tmp_path / "run"
    assert sweep_in_process(d, *FAST, "prune.target.energy=0.6") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hpcprune: error: prune.target.energy=0.6: energy cannot be measured on "
                                               f"this machine (RAPL: {tmp_path / 'no-powercap'} missing; NVML: "), err
    assert err[0].endswith("drop the energy budget or run where NVML/RAPL are readable")
    assert not (d / "run.h5").exists()


def test_energy_budget_missed_then_met_by_reallocation(tmp_path, dense_ckpt, monkeypatch):
    """Where energy is measured: the budget is allocated as a MACs cap of the same fraction, the pruned
    model's measured energy misses it, the cap is lowered by the factor of the miss and the second
    allocation meets it. The device is made deterministic (joules per sample = 1.2 x the MACs kept,
    at most the dense model's): everything else is the sweep's own code."""
    import torch

    from hpcprune import metrics
    from hpcprune.stages import context

    dense = metrics.macs(default_model(), torch.zeros(1, 1, 8, 8))

    def measure_energy(model, example, batch, device, threads=1, **kw):
        kept = metrics.macs(model, example[:1]) / dense
        return energy.EnergyResult(1e-3 * min(1.0, 1.2 * kept), "rapl:fake")

    monkeypatch.setattr(energy, "unavailable_reason", lambda device, rapl_root=None: None)
    monkeypatch.setattr(context, "measure_energy", measure_energy)
    d = tmp_path / "e"
    run = ["threads=1", "launcher=debug", "finetune.epochs=0", "sensitivity.ratios=[0.25,0.5,0.75]", "baseline.latency_repeats=1",
           "data.calib_samples=128", "prune.bn_recalib_batches=2", "prune.method=uniform", "prune.target.macs=null",
           "prune.target.energy=0.6", "prune.round_to=1", f"checkpoint={dense_ckpt}"]
    assert sweep_in_process(d, *run) == 0
    with h5py.File(d / "run.h5") as f:
        assert f.attrs["status"] == "complete"
        base = f["baseline"].attrs
        assert base["energy_j_per_sample"] == pytest.approx(1e-3) and base["energy_source"] == "rapl:fake"
        adjustments = json.loads(f["pruned"].attrs["latency_adjustments"])
        assert len(adjustments) == 1 and adjustments[0]["kind"] == "energy", adjustments
        a = adjustments[0]
        assert a["measured"] == pytest.approx(1.2 * a["macs_kept"]) and a["macs_kept"] <= 0.6 + 1e-9  # first cap: 0.6
        assert a["targets"]["macs"] == pytest.approx(a["macs_kept"] * 0.6 / a["measured"])
        p = f["pruned"].attrs
        assert p["energy_kept"] <= 0.6 and p["energy_kept"] == pytest.approx(1.2 * p["macs_kept"])
        assert json.loads(f["allocation"].attrs["targets_used"])["macs"] == pytest.approx(a["targets"]["macs"])
        assert f["final"].attrs["energy_source"] == "rapl:fake"
        final_j, final_kept = f["final"].attrs["energy_j_per_sample"], f["final"].attrs["energy_kept"]
    from hpcprune import plots, report

    run = report.load_run(str(d / "run.h5"))  # the report: a J/sample column, an energy panel on the Pareto figure
    assert run.row["energy"] == pytest.approx(final_j) and "J/sample" in report.format_table([run.row]).splitlines()[0]
    fig = plots.pareto([run])
    try:
        assert fig.data["axes"]["energy_kept"]["points"][0]["x"] == pytest.approx(final_kept)
    finally:
        plots.close([fig])


@pytest.mark.slow
def test_run_file_records_energy_source(fast_run):
    """The default sweep's run file: /baseline, /pruned and /final say where their energy came from;
    here (no readable counter) NaN and ``unavailable: <reason>``, and the report's J/sample is empty."""
    from hpcprune.report import summarize

    path = str(fast_run / "run.h5")
    reason = energy.unavailable_reason("cpu")
    with h5py.File(path) as f:
        for stage in ("baseline", "pruned", "final"):
            a = f[stage].attrs
            if reason:
                assert a["energy_source"] == f"unavailable: {reason}" and math.isnan(a["energy_j_per_sample"]), stage
            else:
                assert a["energy_source"].startswith("rapl:") and a["energy_j_per_sample"] > 0, stage
    assert (summarize(path)["energy"] is None) == bool(reason)
