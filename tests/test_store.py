import h5py
import pytest

from hpcprune.store import SCHEMA_VERSION, RunDirLocked, RunFile, RunFileError, RunLock


def test_transaction_is_all_or_nothing(tmp_path):
    rf = RunFile(str(tmp_path / "run.h5"))
    rf.create("a: 1\n", {"world_size": 1})
    with pytest.raises(RuntimeError):
        with rf.write() as f:
            f.create_group("baseline").attrs["complete"] = True
            raise RuntimeError("killed mid-write")
    assert rf.done_stages() == []
    assert not (tmp_path / "run.h5.tmp").exists()
    with rf.write() as f:
        f.create_group("baseline").attrs["complete"] = True
    assert rf.done_stages() == ["baseline"]


def test_foreign_and_newer_files_refused(tmp_path):
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as f:
        f.attrs["format"] = "someone-else"
    with pytest.raises(RunFileError, match="not an hpcprune run file"):
        RunFile(str(foreign)).check()
    newer = RunFile(str(tmp_path / "newer.h5"))
    newer.create("a: 1\n", {})
    with h5py.File(newer.path, "a") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(RunFileError, match="newer"):
        newer.check()
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # truncated
    with pytest.raises(RunFileError, match="not a readable HDF5"):
        RunFile(str(junk)).check()


def test_a_run_directory_stands_for_its_run_file(tmp_path):
    """``load_pruned(run_dir)`` and friends: the directory's run.h5 (an h5py IsADirectoryError before);
    a directory without one is named as such."""
    rf = RunFile(str(tmp_path / "run.h5"))
    rf.create("a: 1\n", {})
    assert RunFile(str(tmp_path)).path == rf.path and RunFile(tmp_path).attrs()["format"] == "hpcprune-run"
    RunFile(str(tmp_path)).check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFileError, match="empty: a directory without a run.h5"):
        RunFile(str(tmp_path / "empty")).check()


def test_lock_is_exclusive_and_released(tmp_path):
    a = RunLock(str(tmp_path)).acquire()
    with pytest.raises(RunDirLocked, match="in use by pid"):
        RunLock(str(tmp_path)).acquire()
    a.release()
    RunLock(str(tmp_path)).acquire().release()


# ---- schema 2: weights beside the run file ----------------------------------------------------
import os
import shutil
import time
from collections import OrderedDict

import numpy as np
import torch

from hpcprune.store import WeightsError, has_weights, load_safetensors, read_weights, save_safetensors, write_weights

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# the overrides the fixtures in tests/data were made with (see tests/data/README.md)
V1_CONFIG = ["threads=1", "baseline.epochs=2", "finetune.epochs=1", "launcher=debug", "sensitivity.ratios=[0.3,0.6]",
             "baseline.latency_repeats=1", "baseline.latency_batch=8",
             "model.widths=[16,32,64]", "prune.round_to=1"]  # the v1 files were made with the embedded default of their day


def _new_run(tmp_path):
    rf = RunFile(str(tmp_path / "run.h5"))
    rf.create("a: 1\n", {})
    return rf


def test_weights_round_trip_bf16_tied_metadata(tmp_path):
    rf = _new_run(tmp_path)
    emb = torch.randn(7, 4).to(torch.bfloat16)
    state = OrderedDict([
        ("embed.weight", emb), ("z.half", torch.randn(3, 2).half()), ("bn.num_batches_tracked", torch.tensor(5)),
        ("empty", torch.zeros(0, 3)), ("t.weight", torch.randn(4, 5).t()),  # non-contiguous
        ("head.weight", emb),  # tied: the same tensor under another name
    ])
    state._metadata = OrderedDict([("", {"version": 1}), ("bn", {"version": 2})])
    with rf.write() as f:
        rec = write_weights(rf, "pruned", state, f.create_group("pruned"))
    assert rec["weights_file"] == "pruned.safetensors" and os.path.getsize(tmp_path / "pruned.safetensors") == rec["weights_bytes"]
    with h5py.File(rf.path, "r") as f:
        assert "weights" not in f["pruned"] and f["pruned"].attrs["weights_sha256"] == rec["weights_sha256"]
        assert has_weights(f, "pruned") and not has_weights(f, "final")
    back = read_weights(rf, "pruned")
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert back["head.weight"] is back["embed.weight"]  # reloads tied
    assert back._metadata == state._metadata
    # a module's versioned _load_from_state_dict sees the versions
    bn = torch.nn.BatchNorm1d(3)
    sd = bn.state_dict()
    rf2 = RunFile(str(tmp_path / "b" / "run.h5"))
    os.makedirs(tmp_path / "b")
    rf2.create("a: 1\n", {})
    write_weights(rf2, "final", sd)  # its own transaction
    assert read_weights(rf2, "final")._metadata == sd._metadata
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_changed_checkpoint_refused_with_one_line(tmp_path):
    rf = _new_run(tmp_path)
    ck = tmp_path / "dense.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, ck)  # nested: read back through the same loader
    with rf.write() as f:
        rec = write_weights(rf, "baseline", {"w": torch.ones(3)}, f.create_group("baseline"), reference=str(ck))
    assert rec["weights_file"] == str(ck) and rec["weights_reference"] and not (tmp_path / "dense.safetensors").exists()
    assert torch.equal(read_weights(rf, "baseline")["w"], torch.ones(3))
    # rewritten with the same content (a new mtime): the sha256 still matches
    time.sleep(0.01)
    data = ck.read_bytes()
    ck.write_bytes(data)
    assert torch.equal(read_weights(rf, "baseline")["w"], torch.ones(3))
    torch.save({"state_dict": {"w": torch.zeros(3)}}, ck)  # same size, other numbers
    with pytest.raises(WeightsError) as e:
        read_weights(rf, "baseline")
    msg = str(e.value)
    assert "\n" not in msg and "changed since it was recorded" in msg and str(ck) in msg
    ck.unlink()
    with pytest.raises(WeightsError, match="is gone"):
        read_weights(rf, "baseline")


def test_v1_file_loads_reports_and_upgrades(tmp_path):
    import hpcprune
    from hpcprune import report

    for name in ("v1_complete.h5", "v1_pruned.h5"):
        d = tmp_path / name[:-3]
        d.mkdir()
        shutil.copy(os.path.join(DATA, name), d / "run.h5")
        path = str(d / "run.h5")
        RunFile(path).check()
        model = hpcprune.load_pruned(path)
        assert 0 < sum(p.numel() for p in model.parameters()) < 77754  # pruned, below the dense count
        with torch.no_grad():
            assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
        row = report.summarize(path)
        assert row["status"] == ("complete" if name == "v1_complete.h5" else "failed")
        assert "0.9550" in report.format_table([row])
        assert report.main([path]) == 0
    # a status change by this version marks the file schema 2; its weights inside still load
    rf = RunFile(str(tmp_path / "v1_complete" / "run.h5"))
    rf.set_status("complete")
    assert rf.attrs()["schema_version"] == SCHEMA_VERSION == 2
    assert set(read_weights(rf, "final")) == set(read_weights(rf, "pruned"))


def test_v2_run_small_and_v1_resume(tmp_path, caplog, capsys):
    """A v1 run stopped after prune resumes to complete with this version (fine-tune weights the v2
    way); a fresh run of the embedded default keeps its run file small, the weights beside it. The
    sweep's stages run in this process (launcher=debug: the fine-tune too), as its entry point runs
    them; tests/faults check what the process adds (exit codes, stderr)."""
    import logging

    import hpcprune
    from conftest import sweep_in_process

    caplog.set_level(logging.INFO, logger="hpcprune")
    d = tmp_path / "v1"
    d.mkdir()
    shutil.copy(os.path.join(DATA, "v1_pruned.h5"), d / "run.h5")
    assert sweep_in_process(d, *V1_CONFIG) == 0
    assert "done: baseline, groups, sensitivity, allocation, pruned)" in caplog.text
    with h5py.File(d / "run.h5", "r") as f:
        assert f.attrs["status"] == "complete" and f.attrs["schema_version"] == 2
        assert "weights" in f["pruned"] and f["final"].attrs["weights_file"] == "final.safetensors"
    assert (d / "final.safetensors").exists() and not (d / "pruned.safetensors").exists()
    hpcprune.load_pruned(str(d / "run.h5"))

    # the v1 run's dense weights as a user's checkpoint (nested under state_dict)
    ck = tmp_path / "dense.pt"
    torch.save({"state_dict": dict(read_weights(RunFile(str(d / "run.h5")), "baseline"))}, ck)

    def sweep(run_dir, *extra):
        return sweep_in_process(run_dir, *V1_CONFIG, "finetune.epochs=0", "sensitivity.ratios=[0.5]", f"checkpoint={ck}", *extra)

    n = tmp_path / "copied"
    assert sweep(n, "baseline.copy_checkpoint=true") == 0
    assert os.path.getsize(n / "run.h5") < 200 * 1024
    for name in ("dense", "pruned", "final"):
        assert (n / f"{name}.safetensors").exists()
    with h5py.File(n / "run.h5", "r") as f:
        assert not any("weights" in f[s] for s in ("baseline", "pruned", "final"))
        assert f["baseline"].attrs["weights_file"] == "dense.safetensors" and not f["baseline"].attrs["weights_reference"]

    r = tmp_path / "referenced"
    assert sweep(r) == 0
    assert not (r / "dense.safetensors").exists()
    with h5py.File(r / "run.h5", "r") as f:
        assert f["baseline"].attrs["weights_file"] == str(ck) and f["baseline"].attrs["weights_reference"]
    hpcprune.load_pruned(str(r / "run.h5"))
    state = torch.load(ck, weights_only=True)
    state["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, ck)  # the user's checkpoint changes: the run refuses it, in one line
    capsys.readouterr()
    assert sweep(r) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("[hpcprune]")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("hpcprune: error:") and f"the dense checkpoint {ck} changed since it was recorded" in lines[0]


class _Projected(torch.nn.Module):
    """A random projection kept as a non-persistent buffer, drawn with torch.nn.init: not in the
    state dict, so a model built to be loaded must still initialise it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.register_buffer("proj", torch.nn.init.orthogonal_(torch.empty(4, 4)), persistent=False)


_CAPTURED: dict = {}


class _CapturesInit(torch.nn.Linear):
    """Keeps a reference to torch.nn.init.zeros_ taken while it is built, as transformers' import-time
    table of init functions does when transformers is first imported during such a build."""

    def __init__(self):
        super().__init__(4, 3)
        _CAPTURED["zeros_"] = torch.nn.init.zeros_


def test_an_init_function_kept_from_a_build_to_load_initialises_afterwards():
    """An init function referenced during build_to_load (transformers' TORCH_INIT_FUNCTIONS, imported
    by load_pruned's first build) skipped forever: later models kept uninitialised tensors (a BERT
    loaded by transformers got garbage token_type_ids; save_hf_dir fell back, at random)."""
    from hpcprune import runs

    runs.build_to_load({"_target_": "test_store._CapturesInit"})
    t = torch.ones(3)
    _CAPTURED["zeros_"](t)
    assert torch.equal(t, torch.zeros(3))


def test_a_model_built_to_be_loaded_skips_init_unless_the_state_dict_misses_a_tensor(monkeypatch):
    from hpcprune import runs

    calls = []
    real = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: calls.append(1) or real(self))
    plain = {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 3}
    m = runs.build_to_load(plain)
    assert isinstance(m, torch.nn.Linear) and calls == [1]  # reset_parameters ran, its nn.init calls did nothing
    assert torch.nn.init.kaiming_uniform_ is not None and torch.nn.init.kaiming_uniform_.__module__ == "torch.nn.init"
    torch.manual_seed(0)
    want = _Projected().proj
    torch.manual_seed(0)
    got = runs.build_to_load({"_target_": "test_store._Projected"})
    torch.testing.assert_close(got.proj, want)  # built again, initialised: the buffer is the real projection




def test_an_initialiser_imported_by_name_is_skipped_too_and_put_back(monkeypatch):
    """nn.MultiheadAttention calls the xavier_uniform_ torch/nn/modules/activation.py imported by
    name (vit_h_14: 2.6 s of random draws per build meant for loading): skipped during the build, the
    module's own name restored after it."""
    import torch.nn.modules.activation as activation

    from hpcprune import runs

    original = activation.xavier_uniform_
    drawn = []
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: drawn.append(self.shape) or self)
    runs.build_to_load({"_target_": "torch.nn.MultiheadAttention", "embed_dim": 8, "num_heads": 2})
    assert (24, 8) not in drawn  # the packed in_proj_weight: not initialised
    assert activation.xavier_uniform_ is original
    torch.nn.MultiheadAttention(8, 2)
    assert (24, 8) in drawn  # outside the build: initialised as before



class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.head = torch.nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight
        self.norm = torch.nn.BatchNorm1d(4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_weights_are_loaded_without_a_copy_keeping_ties_and_frozen_layers(tmp_path):
    """runs.load_weights: a safetensors file's tensors become the model's (no copy); a tied
    parameter stays one parameter, a frozen one stays frozen; the values are the stored ones."""
    from hpcprune import runs

    src = _Tied()
    src.norm.running_mean.add_(1.0)
    save_safetensors(str(tmp_path / "w.safetensors"), src.state_dict())
    state = load_safetensors(str(tmp_path / "w.safetensors"))
    model = _Tied()
    runs.load_weights(model, state)
    assert model.emb.weight is model.head.weight and len(list(model.parameters())) == len(list(src.parameters()))
    assert model.emb.weight.data_ptr() == state["emb.weight"].data_ptr()  # the stored tensor itself
    assert not model.frozen.weight.requires_grad and model.emb.weight.requires_grad
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    model.emb.weight.data.add_(1.0)  # written copy-on-write: the file keeps its values
    assert torch.equal(load_safetensors(str(tmp_path / "w.safetensors"))["emb.weight"], src.emb.weight)


def test_weights_that_cannot_be_taken_as_they_are_are_copied():
    """Tied names stored as two tensors, or another dtype: copied into the model's own tensors
    (load_state_dict as before), ties and dtypes kept."""
    from hpcprune import runs

    src = _Tied()
    state = {k: v.clone() for k, v in src.state_dict().items()}  # emb.weight and head.weight: two tensors
    model = _Tied()
    runs.load_weights(model, state)
    assert model.emb.weight is model.head.weight and torch.equal(model.emb.weight, src.emb.weight)
    state = {k: v.double() if v.is_floating_point() else v for k, v in src.state_dict().items()}
    model = _Tied()
    runs.load_weights(model, state)
    assert model.frozen.weight.dtype == torch.float32 and torch.equal(model.frozen.weight, src.frozen.weight)


@pytest.mark.parametrize("links", [True, False])
def test_weights_equal_to_another_stages_are_a_hard_link_or_else_written(tmp_path, monkeypatch, links):
    """``same_as``: a run that is not fine-tuned records its pruned weights as its final ones. The
    file is hard-linked (not written or hashed again), the record the source's digest and size; on a
    file system without hard links the weights are written. Either way they read back and verify."""
    rf = _new_run(tmp_path)
    state = OrderedDict([("a.weight", torch.randn(5, 3)), ("a.bias", torch.randn(5))])
    src = write_weights(rf, "pruned", state)
    if not links:
        def no_link(*a, **k):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    rec = write_weights(rf, "final", state, same_as=src)
    same = os.path.samefile(tmp_path / "final.safetensors", tmp_path / "pruned.safetensors")
    assert same == links and rec["weights_file"] == "final.safetensors"
    assert (rec["weights_sha256"], rec["weights_bytes"]) == (src["weights_sha256"], src["weights_bytes"])
    back = read_weights(rf, "final")  # verified against its record first
    assert all(torch.equal(back[k], v) for k, v in state.items())
    # the source rewritten later (a new file renamed over it): the final file keeps what it recorded
    write_weights(rf, "pruned", OrderedDict([("a.weight", torch.zeros(5, 3)), ("a.bias", torch.zeros(5))]))
    assert torch.equal(read_weights(rf, "final")["a.weight"], state["a.weight"])
    # a source that no longer matches its record is not linked silently
    with open(tmp_path / "pruned.safetensors", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(WeightsError):
        write_weights(rf, "final", state, same_as=rf.attrs("pruned"))

def test_equal_weights_give_equal_files_whatever_the_metadata_order(tmp_path):
    """Equal weights gave other file bytes (safetensors writes its metadata mapping in a random
    order; a state dict's _metadata may come in another order too), so the recorded sha256 could
    not tell equal weights apart."""
    import hashlib
    from collections import OrderedDict

    from hpcprune.store import load_safetensors, save_safetensors

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    a, b = m.state_dict(), m.state_dict()
    b._metadata = OrderedDict(reversed(list(a._metadata.items())))
    digests = set()
    for i in range(8):  # safetensors' own metadata mapping came out in either order, save by save
        save_safetensors(str(tmp_path / f"{i}.safetensors"), (a, b)[i % 2])
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    back = load_safetensors(str(tmp_path / "0.safetensors"))
    assert list(back) == list(a) and back._metadata == dict(a._metadata)
