"""One run of the sweep, on every rank: lock, create or resume the run file, then the stage table.

``run()`` is called on every rank. Rank 0 validates the config, locks the run directory, checks the
inputs (data, model, checkpoint, free disk) and creates or resumes the run file before anything
else happens; a problem there is one line and exit status 2 on every rank. Then the loop over
``hpcprune.stages.STAGES``: rank 0 owns the run file (the only writer, one transaction per write)
and runs every stage but sensitivity while the other ranks wait at a sleeping barrier; every rank
evaluates sensitivity cells. Each stage is skipped when the run file already holds it, timed, and
its record committed; the run's status is ``running``, then ``complete`` or ``failed``.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Any

import torch
from torch import nn
from omegaconf import OmegaConf

from . import __version__
from .config import ConfigError, RESUME_IGNORED, flat, instantiate, load_dense_checkpoint, validate
from .errors import HpcpruneError
from .runs import build_data, build_model
from .stages import EVERY_RANK, STAGES, Stage
from .stages.context import Context, analyse
from .store import RunFile, RunLock, verify_weights
from .world import World

# the logger sweep.log's stage lines always had (cluster_docs/run_file.md: "hpcprune.stages: stage NAME: X.X s")
log = logging.getLogger("hpcprune.stages")


def run(cfg: Any, world: World, run_dir: str, on_accept: Any = None) -> int:
    """One run on this rank; 0, or 2 when rank 0 refused it (every rank returns the same)."""
    return Sweep(cfg, world, run_dir, on_accept).run()


class AccuracyGateError(HpcpruneError, RuntimeError):
    """The fine-tuned model misses the accuracy gate (``finetune.min_metric`` / ``finetune.max_drop``)."""


class Sweep:
    def __init__(self, cfg: Any, world: World, run_dir: str, on_accept: Any = None) -> None:
        self.cfg = cfg
        self.on_accept = on_accept  # rank 0, once the run directory is locked and its config accepted
        self.world = world
        self.run_dir = os.path.abspath(run_dir)
        self.rf = RunFile(os.path.join(self.run_dir, "run.h5"))
        self.main = world.is_main
        self.lock: RunLock | None = None
        self.hosts: list[str] = []
        self.data: Any = None  # built while the run is prepared (rank 0: checked there)
        self.arch_model: Any = None  # rank 0: the model the inputs check built, for the groups stage
        self._forced: dict[str, Any] | None = None  # rank 0: a resume.force over a changed config (config_history)
        self.finished = False  # a complete run started again with its own config: nothing to run or record

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> int:
        t_start = time.perf_counter()
        self.hosts = sorted(set(self.world.allgather(socket.gethostname())))  # every rank's node, for the record
        if not self._accepted():
            return 2
        if self.finished:  # its record (statuses, seconds, world size) is left as the run that did the work wrote it
            if self.main:
                self.lock.release()  # type: ignore[union-attr]
                self._print_summary()
            self.world.barrier()
            return 0
        # rank 0 works alone (others sleep) in every stage but sensitivity: it may use every core,
        # and the same thread count with 1 or N ranks keeps dense training bit-identical
        threads = self.world.set_threads(int(self.cfg.threads), alone=True)
        device = self.world.device(str(self.cfg.device))
        torch.manual_seed(int(self.cfg.seed))
        log.info("rank %d/%d on %s, device %s, %d threads, run dir %s", self.world.rank, self.world.size,
                 socket.gethostname(), device, threads, self.run_dir)
        if self.main:
            targets = {k: v for k, v in self.cfg.prune.target.items() if v is not None}
            names = {"macs": "MACs", "params": "parameters", "latency": "latency", "energy": "energy per sample"}
            log.info("target: keep at most %s of the dense model (prune.target.*; =null drops one, several must all be met)",
                     ", ".join(f"{float(v):g} of the {names.get(k, k)}" for k, v in targets.items()) or "all")
        try:
            data = self.data if self.data is not None else build_data(self.cfg.data)
            arch_model, self.arch_model = self.arch_model, None  # handed to the context (the groups stage lets it go)
            self._stages(Context(self.world, self.run_dir, device, data, arch_model=arch_model))
            if self.main:
                self._accuracy_gate()
                total = float(self.rf.attrs().get("wall_s_total", 0.0) or 0.0) + time.perf_counter() - t_start
                self.rf.set_status("complete", wall_s=time.perf_counter() - t_start, wall_s_total=total)
                self._print_summary()
        except BaseException as e:
            if self.main and self.rf.exists():
                try:
                    self.rf.set_status("failed", f"{type(e).__name__}: {e}")
                except Exception as e2:  # the original error matters more: one line, traceback in sweep.log
                    log.warning("could not record the failure in the run file (%s: %s)", type(e2).__name__, e2)
                    log.debug("recording the failure", exc_info=True)
            raise
        finally:
            if self.lock is not None:
                self.lock.release()
        self.world.barrier()  # waiting ranks sleep here while rank 0 fine-tunes
        return 0

    def _stages(self, ctx: Context) -> None:
        """README's stage table, in order (``hpcprune.stages.STAGES``)."""
        for stage in STAGES:
            try:
                if stage.who == EVERY_RANK:
                    self._share_cores(stage.key)
                if stage.dense and ctx.model is None:
                    ctx = analyse(ctx, self.cfg, self.rf)  # every rank, once: the importance scores are all-reduced
                if stage.who == EVERY_RANK:
                    self._timed(stage, ctx)
                    self.world.set_threads(int(self.cfg.threads), alone=True)
                    continue
                if self.main and not self._done(stage.key):
                    self._timed(stage, ctx)
            except Exception as e:  # an unexpected error's one line names the stage (world.run_guarded)
                if not hasattr(e, "hpcprune_stage"):
                    try:
                        e.hpcprune_stage = stage.key  # type: ignore[attr-defined]
                    except AttributeError:  # an exception type that takes no attributes
                        pass
                raise
            self.world.barrier()  # the other ranks sleep here while rank 0 works

    def _share_cores(self, key: str) -> None:
        threads = self.world.set_threads(int(self.cfg.threads))
        log.info("%s: %d torch threads per rank (rank %d may use %d CPUs, which %d rank(s) of its node may use)",
                 key, threads, self.world.rank, self.world.cores(), self.world.sharing)

    def _timed(self, stage: Stage, ctx: Context) -> None:
        """Run ``stage``, commit its record, log and record its seconds (added to an earlier attempt's)."""
        t0 = time.perf_counter()
        record = stage.run(ctx, self.cfg, self.rf)
        if record is not None:
            with self.rf.write() as f:
                record(f)
        seconds = time.perf_counter() - t0
        if self.main:
            log.info("stage %s: %.1f s", stage.key, seconds)
        if record is not None:
            # a transaction of its own, as before the stage table: the record's transaction could take
            # it, but tests/faults/test_kill_resume.py stops the k-th transaction of a lean run (k up
            # to 18 of its 21) and would run past the end with 6 fewer
            with self.rf.write() as f:
                f[stage.key].attrs["seconds"] = seconds + float(f[stage.key].attrs.get("seconds", 0.0))
        while ctx.after_commit:
            ctx.after_commit.pop(0)()

    def _accuracy_gate(self) -> None:
        """``finetune.min_metric`` / ``finetune.max_drop``: a fine-tuned model that misses them ends the
        run as ``failed`` with one line (its results stay recorded), so a sweep separates usable points."""
        ft = self.cfg.finetune
        lo, drop = ft.get("min_metric"), ft.get("max_drop")
        if lo is None and drop is None:
            return
        from . import metrics

        base, final = self.rf.attrs("baseline"), self.rf.attrs("final")
        name, got, dense = str(base["metric_name"]), float(final["metric"]), float(base["metric"])
        sign = 1.0 if metrics.METRIC_HIGHER_IS_BETTER[name] else -1.0  # worse = sign * (limit - got) > 0
        if lo is not None and sign * (float(lo) - got) > 0:
            raise AccuracyGateError(f"the fine-tuned {name} {got:.4f} misses finetune.min_metric={lo} (dense {dense:.4f}); "
                                    "its results are recorded; lower the gate or give the fine-tune more epochs")
        if drop is not None and sign * (dense - got) > float(drop) + 1e-12:
            raise AccuracyGateError(f"the fine-tuned {name} {got:.4f} is {abs(dense - got):.4f} worse than the dense "
                                    f"{dense:.4f}, more than finetune.max_drop={drop}; its results are recorded; "
                                    "relax the gate, the budget, or give the fine-tune more epochs")

    def _done(self, stage: str) -> bool:
        return stage in self.rf.done_stages()

    def _print_summary(self) -> None:
        from .report import format_table, load_run, mark_sweep

        run = load_run(self.rf.path)
        run.label = "-"
        mark_sweep([run])  # front and sens grid as `hpcprune.report` shows them for this one run
        if run.row.get("grid") not in (None, "own", "cache"):
            run.row["grid"] = "reused"  # from another run of the sweep (/sensitivity@source says which)
        print(format_table([run.row]), flush=True)
        print(f"run file: {self.rf.path}", flush=True)

    # ---- before the stages: rank 0 accepts or refuses the run ---------------------------------------
    def _accepted(self) -> bool:
        """Rank 0 prepares the run while the others build their data; a refusal is one line (rank 0)
        and every rank returns it."""
        early = None
        if not self.main:  # while rank 0 prepares (and builds its data there, to check it)
            try:
                self.data = build_data(self.cfg.data)
            except Exception as e:  # raised below, unless rank 0 stops every rank with one line
                early = e
        problem = self._prepare() if self.main else None
        problem, self.finished = self.world.bcast((problem, self.finished))
        if problem:
            if self.main:
                print(f"hpcprune: error: {problem}", file=sys.stderr, flush=True)
                log.debug("refused before the run started: %s", problem)  # sweep.log says why the directory is empty
            return False
        if early is not None:
            raise early
        if self.main and self.on_accept is not None:
            self.on_accept()
        return True

    def _prepare(self) -> str | None:
        """Rank 0: validate, lock the run directory, open or create the run file. An error string
        (not an exception) so that every rank exits the same way."""
        try:
            validate(self.cfg)
            os.makedirs(self.run_dir, exist_ok=True)
            if not os.access(self.run_dir, os.W_OK):
                return f"hydra.run.dir={self.run_dir}: the run directory is not writable"
            self.lock = RunLock(self.run_dir).acquire()
            resolved = OmegaConf.to_yaml(self.cfg, resolve=True)
            if self.rf.exists():
                self.rf.check()
                self._check_resume(resolved)
                verify_weights(self.rf, "baseline")  # a referenced dense checkpoint that changed: one line
                done = self.rf.done_stages()
                if not self._forced and self.rf.attrs().get("status") == "complete" and all(st.key in done for st in STAGES):
                    for stage in ("pruned", "finetune", "final"):  # a weights file gone or changed: one line, as the dense one
                        verify_weights(self.rf, stage)
                    self.finished = True
                    log.info("%s is complete, every stage done: nothing to run (the run file is left as it is)", self.rf.path)
                    return None
            # bad data, model or checkpoint, or too little disk: one line, before the run file is touched
            self._check_inputs()
            if self.rf.exists():
                forced = {}
                if self._forced:  # the config the remaining stages use; the earlier ones kept
                    history = json.loads(self.rf.attrs().get("config_history", "[]") or "[]") + [self._forced]
                    forced = {"config": resolved, "config_history": json.dumps(history)}
                self.rf.set_status("running", "", world_size=self.world.size, hosts=json.dumps(self.hosts), **forced)
                log.info("resuming %s (done: %s)", self.rf.path, ", ".join(self.rf.done_stages()) or "nothing")
            else:
                self.rf.create(resolved, self._meta())
        except (HpcpruneError, OSError, ValueError, RuntimeError) as e:
            if not isinstance(e, (HpcpruneError, OSError)):  # another library's word on bad input, or a bug
                log.debug("preparing the run", exc_info=True)
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            return str(e)
        return None

    def _check_inputs(self) -> None:
        """Rank 0: build the data and the model, load the dense checkpoint, check the free disk space."""
        self.data = instantiate("data", build_data, self.cfg.data)
        torch.manual_seed(int(self.cfg.seed))  # the architecture's weights (the groups stage verifies on them) the same
        model = instantiate("model", build_model, self.cfg.model)  # in every process, whatever ran in it before
        _check_eager(model, self.cfg)
        if self.cfg.checkpoint and not (self.rf.exists() and self._done("baseline")):
            load_dense_checkpoint(model, str(self.cfg.checkpoint))
        # the run directory holds up to three copies of the weights (dense, pruned, fine-tuned: *.safetensors
        # beside run.h5, each written through a temporary copy); the fine-tune checkpoint adds weights + optimizer state
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        need = 10 * weights + (1 << 20)
        st = os.statvfs(self.run_dir)
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise ConfigError(f"hydra.run.dir={self.run_dir}: {free / 2**20:.1f} MiB free on its file system, the run needs "
                              f"about {need / 2**20:.1f} MiB (run file, its temporary copy, fine-tune checkpoint)")
        self.arch_model = model  # the groups stage verifies this instance (no second build of a large model)
        self._check_batches()
        self._check_task()

    def _check_task(self) -> None:
        """Rank 0: what the data holds is what every stage feeds the model and the loss: one input
        tensor per batch (``model(x)``), and integer targets (class indices, token ids or per-pixel
        classes) for the cross-entropy that trains, calibrates and scores. ConfigError naming what
        the data gives, before any compute: a tuple input or float targets failed only in a later
        stage (a regression's float labels after the groups stage, a multi-label's after dense training)."""
        where = f"data (_target_={self.cfg.data.get('_target_', '?')})"
        x = self.data.example_input
        if not isinstance(x, torch.Tensor):
            kind = type(x).__name__ + (f" of {len(x)}" if isinstance(x, (tuple, list, dict)) else "")
            raise ConfigError(f"{where}: example_input is a {kind}, not one tensor: hpcprune calls model(x) with one "
                              "input tensor per batch (training, evaluation, tracing, export); give the model one input "
                              "(concatenate the inputs, or wrap the model in a module whose forward splits one tensor)")
        try:
            sample = self.data.train[0]
        except (TypeError, NotImplementedError, IndexError, KeyError):  # an iterable-only or empty dataset: not checked here
            return
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            return
        y = sample[1]
        dtype = y.dtype if isinstance(y, torch.Tensor) else torch.tensor(y).dtype if isinstance(y, (int, float)) else None
        if dtype is not None and (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else ()
            raise ConfigError(
                f"{where}: the training targets are {str(dtype).removeprefix('torch.')} (one sample's: shape {shape}), not "
                "integer class indices: hpcprune trains, calibrates and scores with cross-entropy over classes (or tokens); "
                "regression and multi-label (float) targets are not supported; give each sample its class as a torch.long")

    def _check_batches(self) -> None:
        """Rank 0: every training epoch has at least one whole batch (both loaders drop the last
        partial one), else a stage would train on nothing, after all the compute before it."""
        from .launch import num_tasks

        n = len(self.data.train)
        tasks = num_tasks(self.cfg.launcher)
        checks = [("finetune", int(self.cfg.finetune.epochs), int(self.cfg.finetune.batch_size) * tasks, f" on {tasks} DDP task(s)")]
        if not self.cfg.checkpoint:
            checks.append(("baseline", int(self.cfg.baseline.epochs), int(self.cfg.baseline.batch_size), ""))
        for stage, epochs, need, where in checks:
            if epochs > 0 and n < need:
                raise ConfigError(f"{stage}.batch_size={self.cfg[stage].batch_size}: the training set's {n} samples make no "
                                  f"whole batch{where} (the last partial batch is dropped); lower {stage}.batch_size "
                                  f"or give the data more samples")

    def _check_resume(self, resolved: str) -> None:
        stored = flat(OmegaConf.to_container(OmegaConf.create(self.rf.attrs()["config"])))
        now = flat(OmegaConf.to_container(OmegaConf.create(resolved)))
        # keys a later hpcprune added (absent from the stored config, outside model./data.) take their
        # defaults on resume: a run file made by an earlier version resumes without resume.force
        added = [k for k in now if k not in stored and not k.startswith(("model.", "data."))]
        if added:
            log.info("resume: keys this run file predates, at their current values: %s", ", ".join(added))
        diff = [
            f"{k}: {stored.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(stored) | set(now))
            if stored.get(k) != now.get(k) and not k.startswith(RESUME_IGNORED) and k not in added
        ]
        if diff and not self.cfg.resume.force:
            raise ConfigError(
                f"{self.rf.path} was made with a different config ({'; '.join(diff[:8])}"
                f"{f'; and {len(diff) - 8} more' if len(diff) > 8 else ''}); "
                f"use another {self._dir_key()}, or resume.force=true to continue anyway"
            )
        if diff:  # forced: the stages done keep what they computed, the rest run with the new config
            done = self.rf.done_stages()
            log.warning("resume.force: continuing %s with a changed config (%s); the stages done (%s) are not "
                        "recomputed, the others run with the new values; the run file records both configs "
                        "(config_history)", self.rf.path, "; ".join(diff), ", ".join(done) or "none")
            self._forced = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages_done": done, "changed": diff,
                            "previous_config": self.rf.attrs()["config"]}

    def _dir_key(self) -> str:
        """The setting that names this run's directory: ``hydra.sweep.dir`` for a point of a multirun
        (its directory is the sweep's plus the point's number), else ``hydra.run.dir``."""
        parent = os.path.dirname(os.path.abspath(self.run_dir))
        return "hydra.sweep.dir" if os.path.isfile(os.path.join(parent, "multirun.yaml")) else "hydra.run.dir"

    def _meta(self) -> dict[str, Any]:
        import h5py
        import torch_pruning as tp

        hosts = self.hosts or [socket.gethostname()]
        return {
            "world_size": self.world.size,
            "hosts": json.dumps(hosts),
            "versions": json.dumps(
                {"hpcprune": __version__, "torch": torch.__version__, "torch_pruning": tp.__version__,
                 "h5py": h5py.__version__, "python": sys.version.split()[0]}
            ),
            "run_dir": self.run_dir,
        }


def _check_eager(model: nn.Module, cfg: Any) -> None:
    """The model is an eager ``nn.Module`` whose parameters have their shapes: a TorchScript module
    (its layers cannot be cut, its graph not traced) and lazy layers (``nn.LazyConv2d``: no shape
    until a first forward) are refused in one line naming what to change, before any compute."""
    where = f"model (_target_={cfg.model.get('_target_', '?')})"
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(f"{where}: a TorchScript module ({type(model).__name__}, from torch.jit.script / torch.jit.trace): "
                          "hpcprune prunes the eager nn.Module; return the model before scripting it (script the pruned "
                          "model afterwards: torch.jit.script(hpcprune.load_pruned(run.h5)))")
    lazy = next(((n, m) for n, m in model.named_modules()
                 if any(nn.parameter.is_lazy(t) for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))), None)
    if lazy is not None:
        n, m = lazy
        raise ConfigError(f"{where}: {n or 'the model'} ({type(m).__name__}) has uninitialised (lazy) parameters: their "
                          "shapes come from a first forward; call the model once on an example batch in your model "
                          "function, or use the sized layer (nn.Conv2d, nn.Linear, ...)")
