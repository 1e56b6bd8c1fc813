"""Deploy export of a run's model: ONNX, TorchScript or a torch.export ExportedProgram, checked
against the torch model and recorded in the run file.

    python -m hpcprune.export RUN.h5 --format onnx|torchscript|exported-program --out DIR [--weights final|pruned|plan|dense]
    hpcprune-export ...                  # the same; as a function: export_run(RUN.h5, FORMAT, DIR, weights)

**Which model.** Rebuilt from the run file (:mod:`hpcprune.runs`): ``final`` (the fine-tuned
weights, or the pruned ones while the run has none), ``pruned`` (right after pruning), ``plan``
(the dense weights cut by the plan) or ``dense``. It lands in ``DIR/<weights>.onnx`` (and
``<weights>.onnx.data`` for external weights), ``DIR/<weights>.torchscript.pt`` or
``DIR/<weights>.pt2``: exported into a temporary folder inside DIR, checked, then renamed into DIR,
so a failed export leaves neither a file nor a record.

**Inputs and outputs.** One input, ``input_ids`` when the run's example is token ids (an integer
[B, T] tensor) and ``input`` otherwise; one output, ``logits``. The batch axis is dynamic, and for
token ids the sequence axis too (1 to T, the run's example length: the longest the model was
given). The export example is the run's example at batch 2: torch.export specialises a
dimension of size 1 to a constant, silently.

**ONNX exporter.** ``torch.onnx.export(..., dynamo=True)``: torch.export captures the graph,
onnxscript translates it (``onnxscript`` is needed; opset: the exporter's default, 20 with torch
2.13). The TorchScript-based exporter (``dynamo=False``, deprecated) was tried too: it exports the
built-in CNN and the tiny GPT, but not the tiny Llama of transformers 5 (its attention-mask code
calls ``aten::diff``, which has no ONNX symbolic), while the dynamo exporter exports all three
within 6e-7 of torch (dense and pruned). Above 1 GiB of weights they go to an external-data file (the exporter's
``external_data``; a protobuf stops at 2 GB). The file is checked by ``onnx.checker`` and run by
ONNX Runtime on CPUExecutionProvider, and on CUDAExecutionProvider as well when the installed
onnxruntime has it. TorchScript: ``torch.jit.trace`` (deprecated in torch 2.13 in favour of
torch.export, still working). ExportedProgram: ``torch.export.export`` + ``torch.export.save``.

**Check.** The saved file is loaded back and run next to the torch model at batch 1 (the example's
length) and batch 5 (for token ids, at two thirds of that length): the largest
|exported - torch| over those outputs must be within ``tolerance = rtol * max(1, max |torch|)``,
``rtol`` 1e-4 for float32 weights, 1e-2 for 16-bit ones. The file, its digest and these numbers are
recorded in ``/exports/<format>_<weights>`` (cluster_docs/run_file.md), in one run-file
transaction under the run directory's lock (a sweep running there makes the export stop first).

``prune.latency_runtime=onnxruntime`` measures latencies through :func:`onnxruntime_latency_ms`
(the same ONNX export, in a temporary folder). The pruned Hugging Face directory
(``save_hf_dir``, ``load_hf_dir``) lives in :mod:`hpcprune.hf_dir`; both names are re-exported here.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .errors import HpcpruneError
from .hf_dir import load_hf_dir, save_hf_dir  # noqa: F401 - their home until this module became the deploy export

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}  # format -> file suffix
WEIGHTS = ("final", "pruned", "plan", "dense")
CHECK_BATCHES = (1, 5)
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to <name>.onnx.data
RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
INSTALL = "pip install hpcprune[deploy]"
ONNX_EXPORTER = "torch.onnx.export(dynamo=True)"


class ExportError(HpcpruneError, ValueError):
    """Bad export arguments, a run without the model asked for, a missing deploy package, a model
    the exporter cannot take, or an exported model that disagrees with torch."""


@dataclass
class IOSpec:
    """The names and dynamic axes of a model's one input and one output (the output has the same
    leading axes: [batch, classes] or [batch, sequence, vocabulary])."""

    input: str
    output: str = "logits"
    axes: dict[int, str] = field(default_factory=dict)  # input axis -> name
    max_len: int = 0  # token ids: the longest sequence (the example's length)


def io_spec(example: torch.Tensor, model: nn.Module | None = None) -> IOSpec:
    """``input_ids`` with dynamic batch and sequence axes for token ids (an integer [B, T]
    example), else ``input`` with a dynamic batch axis. With ``model``, a token model that does
    not run on a shorter sequence (a flatten into a Linear of T * width) keeps its length fixed."""
    if not example.is_floating_point() and example.dim() == 2:
        T = int(example.shape[1])
        fixed = False
        if model is not None and T > 1:
            try:
                with torch.no_grad():
                    model(example[:1, : max(1, 2 * T // 3)])
            except Exception:  # noqa: BLE001 - a model of one length: its sequence axis is not dynamic
                fixed = True
        return IOSpec("input_ids", axes={0: "batch"} if fixed else {0: "batch", 1: "sequence"}, max_len=T)
    return IOSpec("input", axes={0: "batch"})


class MainOutput(nn.Module):
    """``model`` with its main output only (``metrics.logits_of``: the logits of a tuple, a dict or
    a Hugging Face output): what is exported and timed for a model that returns several outputs
    (``(logits, features)``, an auxiliary output), as hpcprune evaluates it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .metrics import logits_of

        return logits_of(self.model(x))


def main_output(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` itself when its output on ``example`` is one tensor, else :class:`MainOutput`."""
    with torch.no_grad():
        out = model(rows(example, 1))
    return model if isinstance(out, torch.Tensor) else MainOutput(model).eval()


def rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of ``x`` repeated cyclically ([n, ...])."""
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous()


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed; {INSTALL}") from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' deprecation warnings and log lines (a torchvision op it skips) off."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _dynamic_shapes(spec: IOSpec) -> tuple[dict[int, Any]]:
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1)}
    if 1 in spec.axes:
        dims[1] = torch.export.Dim("sequence", min=1, max=spec.max_len)
    return (dims,)


# ---- the three exporters: model + example (batch >= 2) -> file, and what to record ----------------
def export_onnx(model: nn.Module, x: torch.Tensor, path: str, spec: IOSpec) -> dict[str, Any]:
    """Write ``model`` as ONNX to ``path`` (torch.onnx's dynamo exporter, named input/output,
    ``spec``'s dynamic axes; external data above 1 GiB of weights) and run ``onnx.checker`` on it.
    ``x``: the export example, batch >= 2. Returns ``opset``, ``external_data``, ``exporter``.
    ExportError: onnx, onnxscript or onnxruntime missing."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        _need(module)
    import onnx

    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = nbytes > EXTERNAL_DATA_BYTES
    with _quiet():
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, input_names=[spec.input],
                                    output_names=[spec.output], dynamic_shapes=_dynamic_shapes(spec))
        program.save(path, external_data=external)
    onnx.checker.check_model(path, full_check=True)  # by path: models with external data too
    proto = onnx.load(path, load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": int(opset), "external_data": external, "exporter": ONNX_EXPORTER}


def export_torchscript(model: nn.Module, x: torch.Tensor, path: str, spec: IOSpec) -> dict[str, Any]:
    """Trace ``model`` on ``x`` (``torch.jit.trace``) and save it to ``path``."""
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.jit.save(traced, path)
    return {"exporter": "torch.jit.trace"}


def export_program(model: nn.Module, x: torch.Tensor, path: str, spec: IOSpec) -> dict[str, Any]:
    """``torch.export.export`` with ``spec``'s dynamic axes as ``torch.export.Dim``, saved with
    ``torch.export.save`` to ``path`` (a .pt2 archive)."""
    with _quiet():
        program = torch.export.export(model, (x,), dynamic_shapes=_dynamic_shapes(spec))
        torch.export.save(program, path)
    return {"exporter": "torch.export.export"}


EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, str, IOSpec], dict[str, Any]]] = {
    "onnx": export_onnx, "torchscript": export_torchscript, "exported-program": export_program}


# ---- running the saved file ----------------------------------------------------------------------
def ort_session(path: str, providers: list[str] | None = None, threads: int = 0) -> Any:
    """An ONNX Runtime ``InferenceSession`` on ``path`` (``providers``: default CPU only;
    ``threads`` > 0: intra-op threads, one inter-op thread)."""
    ort = _need("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])


def _providers() -> list[str]:
    available = _need("onnxruntime").get_available_providers()
    return [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in available]


def _runners(fmt: str, path: str, spec: IOSpec) -> dict[str, Callable[[torch.Tensor], Any]]:
    """The saved model as functions of a CPU tensor, by what runs it (ONNX: one per provider)."""
    if fmt == "onnx":
        out = {}
        for p in _providers():
            session = ort_session(path, [p] if p == "CPUExecutionProvider" else [p, "CPUExecutionProvider"])
            out[p] = lambda x, s=session: s.run([spec.output], {spec.input: x.numpy()})[0]
        return out
    with _quiet():
        loaded = torch.jit.load(path, map_location="cpu") if fmt == "torchscript" else torch.export.load(path).module()
    return {"torch": loaded}


def check_inputs(example: torch.Tensor, spec: IOSpec, batches: tuple[int, ...] = CHECK_BATCHES) -> list[torch.Tensor]:
    """The inputs of the check: the example's rows at each batch size; for token ids every batch
    after the first also at two thirds of the length (the sequence axis)."""
    out = []
    for i, b in enumerate(batches):
        x = rows(example, b)
        out.append(x[:, : max(1, 2 * spec.max_len // 3)] if 1 in spec.axes and i else x)
    return out


def verify(fmt: str, path: str, model: nn.Module, example: torch.Tensor, spec: IOSpec) -> dict[str, Any]:
    """Run the saved ``path`` and ``model`` on :func:`check_inputs`; ExportError unless every
    output has torch's shape and max |exported - torch| <= rtol * max(1, max |torch|) (``RTOL`` by
    the weights' dtype). Returns ``max_abs_diff``, ``tolerance``, ``batch_sizes``,
    ``shapes_checked``, ``runners`` (ONNX Runtime providers, or ``torch``)."""
    inputs = check_inputs(example, spec)
    with torch.no_grad():
        refs = [model(x).float() for x in inputs]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tol = RTOL.get(dtype, 1e-4) * max([1.0] + [float(r.abs().max()) for r in refs])
    worst = 0.0
    runners = _runners(fmt, path, spec)
    for name, run in runners.items():
        for x, ref in zip(inputs, refs):
            with torch.no_grad():
                out = torch.as_tensor(np.asarray(run(x))).float()
            if out.shape != ref.shape:
                raise ExportError(f"{path}: on {name} the exported model gives shape {list(out.shape)} for input "
                                  f"{list(x.shape)}, torch {list(ref.shape)}: its axes are not dynamic; try another --format")
            diff = float((out - ref).abs().max())
            if not diff <= tol:  # NaN fails too
                raise ExportError(f"{path}: on {name} the exported model differs from torch by {diff:.3g} at input "
                                  f"{list(x.shape)} (tolerance {tol:.3g}); not recorded")
            worst = max(worst, diff)
    return {"max_abs_diff": worst, "tolerance": tol, "batch_sizes": [int(x.shape[0]) for x in inputs],
            "shapes_checked": [list(x.shape) for x in inputs], "runners": list(runners)}


# ---- from a run file -----------------------------------------------------------------------------
def run_model(run: Any, weights: str) -> tuple[nn.Module, torch.Tensor, str]:
    """The model ``weights`` names in run file ``run`` (eval mode, CPU), its example input, and
    which weights it holds (``final`` falls back to ``pruned`` before fine-tuning). ExportError
    (one line) when the stage it needs has not completed."""
    from .runs import dense_model, example_input, pruned_model
    from .store import has_weights

    done = run.done_stages()
    if "baseline" not in done:
        raise ExportError(f"{run.path}: no dense model yet (the baseline stage has not completed); "
                          "rerun the sweep in its run directory")
    if weights == "dense":
        return dense_model(run), example_input(run), "dense"
    if "pruned" not in done:
        raise ExportError(f"{run.path}: --weights {weights}: no pruned model (the prune stage has not completed); "
                          "export --weights dense, or rerun the sweep in its run directory")
    with run.read() as f:
        used = "final" if weights == "final" and has_weights(f, "final") else ("plan" if weights == "plan" else "pruned")
    return pruned_model(run, weights=weights), example_input(run), used


def _check_args(run_path: str, fmt: str, weights: str) -> None:
    """ExportError (one line) for an unknown format or weights, or a missing run file."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: unknown format (choose from {', '.join(FORMATS)})")
    if weights not in WEIGHTS:
        raise ExportError(f"--weights {weights}: unknown weights (choose from {', '.join(WEIGHTS)})")
    if not os.path.isfile(run_path):
        raise ExportError(f"{run_path}: no such run file (give the run.h5 of a sweep's run directory)")
    if not os.access(os.path.dirname(os.path.abspath(run_path)), os.W_OK | os.X_OK):
        raise ExportError(f"{run_path}: its run directory is not writable, so the export cannot be recorded; "
                          "copy the run directory somewhere writable")


def _check_out(out_dir: str, fmt: str, weights: str) -> str:
    """ExportError (one line) unless ``out_dir`` is (or can be made) a writable directory without
    this export in it; the path the exported file will have. Creates nothing."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"--out {out_dir}: is a file, not a directory; choose a directory")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out_dir}: {existing} is not a writable directory; choose another directory")
    target = os.path.join(out_dir, weights + FORMATS[fmt])
    if os.path.exists(target):
        raise ExportError(f"--out {out_dir}: already holds {os.path.basename(target)}; choose a new directory or delete it")
    return target


@contextlib.contextmanager
def _run_lock(run_path: str) -> Iterator[None]:
    """The run directory's lock (a sweep writing the run file meanwhile would lose our record or
    we its stage): ExportError when a sweep holds it."""
    from .store import RunDirLocked, RunLock

    try:
        lock = RunLock(os.path.dirname(os.path.abspath(run_path))).acquire()
    except RunDirLocked as e:
        raise ExportError(f"{run_path}: a sweep is running in its run directory ({e}); export once it has ended") from None
    try:
        yield
    finally:
        lock.release()


def _export_checked(fmt: str, model: nn.Module, example: torch.Tensor, spec: IOSpec, path: str, what: str) -> dict[str, Any]:
    """Export to ``path`` (from the example at batch 2) and :func:`verify` it; what both return,
    with ``export_s`` and ``verify_s``. An exporter's failure becomes one ExportError line."""
    t0 = time.perf_counter()
    try:
        info = EXPORTERS[fmt](model, rows(example, 2), path, spec)
    except HpcpruneError:
        raise
    except Exception as e:  # the exporter's refusal, in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"{what} does not export to {fmt} ({type(e).__name__}: {first}); try another --format") from e
    t1 = time.perf_counter()
    check = verify(fmt, path, model, example, spec)
    return {**info, **check, "export_s": t1 - t0, "verify_s": time.perf_counter() - t1}


def export_run(run_path: str, fmt: str, out_dir: str, weights: str = "final") -> dict[str, Any]:
    """Export the ``weights`` model (``final``, ``pruned``, ``plan``, ``dense``) of run file
    ``run_path`` in format ``fmt`` (``onnx``, ``torchscript``, ``exported-program``) to ``out_dir``,
    check it against torch (:func:`verify`) and record it in ``/exports/<fmt>_<weights>``.

    Returns the record (path, sha256, size_bytes, timings, max_abs_diff, tolerance, ...). Raises
    ExportError (one line) for bad arguments, a stage not done, a missing deploy package, a model
    the exporter cannot take or an output that disagrees; RunFileError for a file that is not a
    usable run file. On any error the run file is unchanged and no file is left in ``out_dir``
    (created if it did not exist)."""
    from .store import RunFile, _sha256, put_attrs, replace_group

    _check_args(run_path, fmt, weights)
    run = RunFile(run_path)
    run.check()
    if fmt == "onnx":
        for module in ("onnx", "onnxscript", "onnxruntime"):
            _need(module)
    target = _check_out(out_dir, fmt, weights)
    model, example, used = run_model(run, weights)
    model = main_output(model, example)
    spec = io_spec(example, model)
    os.makedirs(out_dir, exist_ok=True)
    with _run_lock(run_path), tempfile.TemporaryDirectory(dir=out_dir, prefix=".hpcprune-export-") as tmp:
        info = _export_checked(fmt, model, example, spec, os.path.join(tmp, os.path.basename(target)),
                               f"{run_path}: the {used} model")
        files = sorted(os.listdir(tmp))
        for name in files:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        rec = {"path": os.path.abspath(target), "files": files, "sha256": _sha256(target),
               "size_bytes": sum(os.path.getsize(os.path.join(out_dir, n)) for n in files),
               "format": fmt, "weights": weights, "weights_used": used, "input_name": spec.input,
               "output_name": spec.output, "dynamic_axes": {spec.input: spec.axes, spec.output: spec.axes},
               "torch_version": str(torch.__version__), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        if fmt == "onnx":
            rec["onnxruntime_version"] = str(_need("onnxruntime").__version__)
            rec["providers"] = rec["runners"]
        try:
            with run.write() as f:
                put_attrs(replace_group(f, f"exports/{fmt}_{weights}"), rec)
        except BaseException:
            for name in files:  # not recorded: not left behind either
                os.remove(os.path.join(out_dir, name))
            raise
    return rec


# ---- latency through ONNX Runtime (prune.latency_runtime=onnxruntime) -----------------------------
def onnxruntime_latency_ms(model: nn.Module, example: torch.Tensor, batch_size: int, warmup: int = 3, repeats: int = 10,
                           threads: int = 1) -> float:
    """Median wall time of one ONNX Runtime ``session.run`` at ``batch_size``, in milliseconds: the
    model exported by :func:`export_onnx` (dynamic batch) into a temporary folder, fed ``example``'s
    rows repeated to ``batch_size``. CPU: ``threads`` intra-op threads (0: torch's current number);
    an example on CUDA runs on CUDAExecutionProvider (ExportError when onnxruntime lacks it; the
    time then includes copying the input in and the output out)."""
    x = rows(example, batch_size).cpu().numpy()
    cuda = example.is_cuda
    if cuda and "CUDAExecutionProvider" not in _providers():
        raise ExportError("prune.latency_runtime=onnxruntime on a GPU needs onnxruntime's CUDAExecutionProvider "
                          "(pip install onnxruntime-gpu), or prune.latency_runtime=torch")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="hpcprune-latency-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:  # exported from the CPU (ONNX Runtime places the weights itself); the model goes back after
            main = main_output(model.eval().cpu(), example.cpu())
            spec = io_spec(example.cpu(), main)
            export_onnx(main, rows(example, 2).cpu(), path, spec)
        finally:
            model.to(device)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        session = ort_session(path, providers, threads=0 if cuda else (threads if threads > 0 else torch.get_num_threads()))
        times = []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            session.run([spec.output], {spec.input: x})
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


# ---- command line --------------------------------------------------------------------------------
def _error(msg: str) -> None:
    print(f"hpcprune.export: error: {msg}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]  # one line, not argparse's usage block
        _error(message)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m hpcprune.export", description="Export a run's model (ONNX, TorchScript, ExportedProgram), "
                "check it against torch and record it in the run file.")
    p.add_argument("run", help="the run file (run.h5 of a sweep's run directory)")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output directory (created; must not hold this export already)")
    p.add_argument("--weights", default="final", help=f"one of {', '.join(WEIGHTS)} (default: final)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 once exported, checked and recorded; 2 with one error line otherwise."""
    args = _parser().parse_args(argv)
    try:
        rec = export_run(args.run, args.format, args.out, args.weights)
    except HpcpruneError as e:
        _error((str(e).strip().splitlines() or [type(e).__name__])[0])
        return 2
    except OSError as e:
        _error(f"{e.filename or args.out}: {e.strerror or e}")
        return 2
    print(f"{rec['path']}: {rec['format']} ({rec['weights_used']} weights, {rec['size_bytes'] / 2**20:.2f} MiB), "
          f"exported in {rec['export_s']:.1f} s; max |diff| vs torch {rec['max_abs_diff']:.2g} <= {rec['tolerance']:.2g} "
          f"at batch {', '.join(map(str, rec['batch_sizes']))} on {', '.join(rec['runners'])}; "
          f"recorded in {os.path.abspath(args.run)}:/exports/{rec['format']}_{rec['weights']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
