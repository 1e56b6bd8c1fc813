"""Deploy export (hpcprune.export) from real run files made in this process: the built-in CNN (its
run measures every latency through ONNX Runtime: prune.latency_runtime=onnxruntime), the tiny GPT
and a tiny Llama (transformers), each as ONNX, TorchScript and ExportedProgram. Each exported file
is loaded back here and run next to the model rebuilt from the run file at batch 1 and 5 (ONNX:
ONNX Runtime), its record read back from the run file; bad input gives one line, a non-zero exit
and leaves the run file and the output directory as they were."""
import hashlib
import os
import subprocess
import sys

import h5py
import pytest
import torch

from hpcprune import export, metrics, schema
from hpcprune.runs import dense_model, pruned_model
from hpcprune.store import RunFile

from conftest import PY, ROOT, compose, copy_run, sweep_in_process

# the smallest runs that prune: no dense training, one sensitivity ratio, uniform allocation, no fine-tuning
SMALL = ["threads=1", "launcher=debug", "baseline.epochs=0", "finetune.epochs=0", "sensitivity.ratios=[0.5]",
         "sensitivity.bn_recalib_batches=0", "baseline.latency_repeats=1", "baseline.latency_batch=4", "prune.method=uniform",
         "prune.target.macs=0.8"]
TEXT = ["data=text", "data.train_bytes=8192", "data.val_bytes=4096", "data.calib_samples=8"]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # torch.jit.load in torch 2.13
RUNS = {"cnn": ["data.calib_samples=64", "data.val_samples=64", "prune.latency_runtime=onnxruntime"],
        "gpt": ["model=tiny_gpt", *TEXT], "llama": ["model=llama_tiny", *TEXT]}


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    made = {}

    def get(name):
        if name == "llama":
            pytest.importorskip("transformers")
        if name not in made:
            d = tmp_path_factory.mktemp(name) / "run"
            assert sweep_in_process(d, *SMALL, *RUNS[name]) == 0
            made[name] = str(d / "run.h5")
        return made[name]

    return get


@pytest.fixture(scope="module")
def reference(run_path):
    """The fine-tuned (here: pruned) model rebuilt from each run file, once."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = pruned_model(RunFile(run_path(name)))
        return made[name]

    return get


def _rerun(fmt, path, x):
    """The exported file, loaded here independently of hpcprune.export, on input ``x``."""
    if fmt == "onnx":
        import onnxruntime as ort

        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
    m = torch.jit.load(path) if fmt == "torchscript" else torch.export.load(path).module()
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("fmt", list(export.FORMATS))
def test_export_runs_like_torch_and_is_recorded(run_path, reference, name, fmt, tmp_path):
    path = run_path(name)
    rec = export.export_run(path, fmt, str(tmp_path / "out"), weights="final")
    assert os.path.isfile(rec["path"]) and os.path.dirname(rec["path"]) == str(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == rec["files"]  # the temporary folder is gone
    model = reference(name)
    with h5py.File(path) as f:
        stored = dict(f[f"exports/{fmt}_final"].attrs)
        example = torch.from_numpy(f["baseline/example_input"][()])
    assert stored["sha256"] == hashlib.sha256(open(rec["path"], "rb").read()).hexdigest()
    assert stored["size_bytes"] == os.path.getsize(rec["path"]) and stored["weights_used"] == "final"
    assert list(stored["batch_sizes"]) == [1, 5] and 0 <= stored["max_abs_diff"] <= stored["tolerance"] <= 1e-3
    lm = name != "cnn"
    for b, t in ((1, None), (5, 23)) if lm else ((1, None), (5, None)):
        x = export.rows(example, b)[:, :t] if lm else export.rows(example, b)
        with torch.no_grad():
            want = model(x)
        got = _rerun(fmt, rec["path"], x)
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= stored["tolerance"]
    if fmt == "onnx":
        import onnx
        import onnxruntime

        assert stored["opset"] >= 17 and stored["onnxruntime_version"] == onnxruntime.__version__
        assert "CPUExecutionProvider" in stored["providers"] and not stored["external_data"]
        graph = onnx.load(rec["path"]).graph
        dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        assert graph.input[0].name == ("input_ids" if lm else "input") and graph.output[0].name == "logits"
        assert dims[:2] == (["batch", "sequence"] if lm else ["batch", 1])



def test_a_run_not_fine_tuned_links_its_final_weights_to_the_pruned_ones(run_path):
    """finetune.epochs=0: the final weights are the pruned ones, one file under both names."""
    rf = RunFile(run_path("cnn"))
    d = os.path.dirname(rf.path)
    assert os.path.samefile(os.path.join(d, "final.safetensors"), os.path.join(d, "pruned.safetensors"))
    assert rf.attrs("final")["weights_sha256"] == rf.attrs("pruned")["weights_sha256"]
    a, b = pruned_model(rf, weights="final").state_dict(), pruned_model(rf, weights="pruned").state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)

@pytest.mark.parametrize("case", ["tuple_aux", "fixed_length"])
def test_models_of_several_outputs_or_one_length_export(case, tmp_path):
    """A model returning (logits, features) exports its main output (the logits, as hpcprune
    evaluates it); a token model that runs at its one length only keeps that length fixed. Both
    crashed the export with a traceback."""
    data = "data_images" if case == "tuple_aux" else "data_tokens"
    d = tmp_path / "run"
    assert sweep_in_process(d, *SMALL, "model=custom", f"model._target_=archs2.{case}", "data=custom",
                            f"data._target_=archs.{data}", "+data.calib_samples=32", "+data.val_samples=32") == 0
    path = str(d / "run.h5")
    model = pruned_model(RunFile(path))
    x = export.rows(torch.from_numpy(h5py.File(path)["baseline/example_input"][()]), 3)
    with torch.no_grad():
        want = metrics.logits_of(model(x))
    for fmt in export.FORMATS:
        rec = export.export_run(path, fmt, str(tmp_path / "deploy"))
        assert rec["max_abs_diff"] <= rec["tolerance"]
        assert list(rec["dynamic_axes"]["input" if case == "tuple_aux" else "input_ids"]) == [0]  # batch only
        got = _rerun(fmt, rec["path"], x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dense_export_and_latency_runtime_recorded(run_path, tmp_path):
    """The dense model exports too; the CNN run measured every latency through ONNX Runtime and says so."""
    path = run_path("cnn")
    rec = export.export_run(path, "torchscript", str(tmp_path), weights="dense")
    x = export.rows(torch.from_numpy(h5py.File(path)["baseline/example_input"][()]), 5)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(rec["path"])(x), dense_model(RunFile(path))(x), atol=0, rtol=0)
    assert rec["weights_used"] == "dense" and os.path.basename(rec["path"]) == "dense.torchscript.pt"
    with h5py.File(path) as f:
        for stage in ("baseline", "pruned", "final"):
            assert f[stage].attrs["latency_runtime"] == "onnxruntime" and f[stage].attrs["latency_ms"] > 0
    assert tuple(schema.LatencyRuntime) == metrics.LATENCY_RUNTIMES


def test_latency_runtime_needs_the_deploy_packages(monkeypatch):
    from hpcprune.config import ConfigError, validate

    cfg = compose(["prune.latency_runtime=onnxruntime"])
    validate(cfg)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"^prune.latency_runtime=onnxruntime: onnxruntime not installed; pip install hpcprune\[deploy\]"):
        validate(cfg)


def _one_line(capsys, argv):
    rc = export.main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("hpcprune.export: error: "), err
    return err[0]


def test_bad_input_one_line_and_nothing_changed(run_path, tmp_path, capsys, monkeypatch):
    path = run_path("cnn")
    before = open(path, "rb").read()
    out = str(tmp_path / "out")
    assert "no such run file" in _one_line(capsys, [str(tmp_path / "none.h5"), "--format", "onnx", "--out", out])
    assert "--format tflite: unknown format" in _one_line(capsys, [path, "--format", "tflite", "--out", out])
    (tmp_path / "afile").write_text("x")
    assert "is a file" in _one_line(capsys, [path, "--format", "onnx", "--out", str(tmp_path / "afile")])
    assert "not a writable directory" in _one_line(capsys, [path, "--format", "onnx", "--out", str(tmp_path / "afile" / "sub")])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert "pip install hpcprune[deploy]" in _one_line(capsys, [path, "--format", "onnx", "--out", out])
    monkeypatch.delitem(sys.modules, "onnxruntime")
    # an export whose check fails (an impossible tolerance) leaves no file and no record
    monkeypatch.setitem(export.RTOL, torch.float32, -1.0)
    assert "differs from torch" in _one_line(capsys, [path, "--format", "torchscript", "--out", out])
    monkeypatch.undo()
    assert os.listdir(out) == [] and open(path, "rb").read() == before
    (tmp_path / "out" / "final.pt2").write_text("mine")
    assert "already holds final.pt2" in _one_line(capsys, [path, "--format", "exported-program", "--out", out])
    assert open(tmp_path / "out" / "final.pt2").read() == "mine" and open(path, "rb").read() == before
    # a run whose prune stage has not completed: only its dense model can be exported
    copy = copy_run(os.path.dirname(path), tmp_path / "early")
    with RunFile(str(copy / "run.h5")).write() as f:
        del f["pruned"], f["final"]
    assert "no pruned model" in _one_line(capsys, [str(copy / "run.h5"), "--format", "onnx", "--out", out])


def test_cli_subprocess_missing_run_file(tmp_path):
    p = subprocess.run([PY, "-m", "hpcprune.export", str(tmp_path / "run.h5"), "--format", "onnx", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [f"hpcprune.export: error: {tmp_path / 'run.h5'}: no such run file "
                                             "(give the run.h5 of a sweep's run directory)"]
