"""The stages of a sweep, in order, each skipped when the run file already holds its result.

``Sweep.run()`` is called on every rank. Rank 0 owns the run file (the only writer, one
transaction per write) and runs baseline, allocation, pruning and the fine-tune job; every rank
evaluates sensitivity cells. Ranks other than 0 wait at a sleeping barrier while rank 0 works.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__, allocate, importance, launch, metrics
from .graph import KINDS, Excluded, Graph, n_keep
from .runs import build_data, build_model, ignore_names, read_plan
from .sensitivity import DONE, PENDING, SKIPPED, Evaluator, run_sensitivity
from .store import (RunFile, RunFileError, RunLock, load_checkpoint, put_attrs, read_weights, replace_group, verify_weights,
                    write_sensitivity_cells, write_weights)
from .world import World

log = logging.getLogger("hpcprune.stages")

# keys that may change between a run and its resumption without changing any result (beyond
# rounding, ~1e-7, as with another world size: layouts, BatchNorm folding, teams)
_RESUME_IGNORED = ("launcher", "threads", "device", "resume", "sensitivity.flush_s", "groups.timeout_s", "sensitivity.team_size", "baseline.copy_checkpoint",
                   "sensitivity.channels_last", "sensitivity.fold_bn", "hydra")


class ConfigError(ValueError):
    pass


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad value."""

    def bad(key: str, value: Any, why: str) -> None:
        raise ConfigError(f"{key}={value}: {why}")

    t = cfg.prune.target
    given = {k: t[k] for k in t if t[k] is not None}
    for k in given:
        if k not in allocate.COSTS:
            bad(f"prune.target.{k}", given[k], f"unknown target (choose from {', '.join(allocate.COSTS)})")
        if not isinstance(given[k], (int, float)) or not 0 < given[k] < 1:
            bad(f"prune.target.{k}", given[k], "a target is the fraction of the dense cost to keep, in (0, 1)")
    if not given:
        bad("prune.target", dict(t), "give at least one target (macs, params or latency)")
    ratios = list(cfg.sensitivity.ratios)
    if not ratios:
        bad("sensitivity.ratios", ratios, "the ratio grid is empty")
    for r in ratios:
        if not isinstance(r, (int, float)) or not 0 < r < 1:
            bad("sensitivity.ratios", ratios, f"ratio {r} is outside (0, 1)")
    if any(b <= a for a, b in zip(ratios, ratios[1:])):
        bad("sensitivity.ratios", ratios, "ratios must be strictly increasing")
    for key in ("channels_last", "fold_bn"):
        if not isinstance(cfg.sensitivity.get(key, False), bool):
            bad(f"sensitivity.{key}", cfg.sensitivity[key], "must be true or false")
    team = cfg.sensitivity.get("team_size", "auto")
    if team != "auto" and (isinstance(team, bool) or not isinstance(team, int) or team < 1):
        bad("sensitivity.team_size", team, "must be auto or a positive integer (ranks that evaluate one cell together)")
    if not 0 < cfg.prune.max_ratio < 1:
        bad("prune.max_ratio", cfg.prune.max_ratio, "must be in (0, 1)")
    if int(cfg.prune.round_to) < 1:
        bad("prune.round_to", cfg.prune.round_to, "must be a positive integer")
    if cfg.prune.method not in allocate.METHODS:
        bad("prune.method", cfg.prune.method, f"unknown method (choose from {', '.join(allocate.METHODS)})")
    kinds = cfg.groups.get("kinds")
    if kinds is not None:
        if isinstance(kinds, str) or not len(kinds):
            bad("groups.kinds", kinds, f"give a non-empty list of group kinds ({', '.join(KINDS)}), or null for all")
        for k in kinds:
            if k not in KINDS:
                bad("groups.kinds", list(kinds), f"{k!r} is not a group kind (choose from {', '.join(KINDS)})")
    if not isinstance(cfg.groups.get("strict", False), bool):
        bad("groups.strict", cfg.groups.strict, "must be true or false")
    tmo = cfg.groups.get("timeout_s", 300)
    if isinstance(tmo, bool) or not isinstance(tmo, (int, float)) or tmo < 0:
        bad("groups.timeout_s", tmo, "must be a number of seconds >= 0 (0: no limit)")
    if cfg.importance not in importance.CRITERIA:
        bad("importance", cfg.importance, f"unknown criterion (choose from {', '.join(importance.CRITERIA)})")
    if cfg.launcher.name not in launch.LAUNCHERS:
        bad("launcher.name", cfg.launcher.name, f"unknown launcher (choose from {', '.join(launch.LAUNCHERS)})")
    port = cfg.launcher.get("master_port")
    if port is not None and (not isinstance(port, int) or not 1024 <= port <= 65535):
        bad("launcher.master_port", port, "a TCP port in 1024-65535, or null to derive one from the job id")
    if not 0 <= cfg.finetune.distill.weight <= 1:
        bad("finetune.distill.weight", cfg.finetune.distill.weight, "must be in [0, 1]")
    for key in ("finetune.epochs", "baseline.epochs", "prune.bn_recalib_batches", "sensitivity.bn_recalib_batches"):
        v = OmegaConf.select(cfg, key)
        if not isinstance(v, int) or v < 0:
            bad(key, v, "must be a non-negative integer")
    for key in ("finetune.batch_size", "baseline.batch_size", "sensitivity.batch_size"):
        v = OmegaConf.select(cfg, key)
        if not isinstance(v, int) or v < 1:
            bad(key, v, "must be a positive integer")
    if cfg.checkpoint is not None and not os.path.isfile(str(cfg.checkpoint)):
        bad("checkpoint", cfg.checkpoint, "no such file")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        bad("device", cfg.device, "use auto, cpu, cuda or cuda:N")


class Sweep:
    def __init__(self, cfg: DictConfig, world: World, run_dir: str, on_accept: Any = None) -> None:
        self.cfg = cfg
        self.on_accept = on_accept  # rank 0, once the run directory is locked and its config accepted
        self.world = world
        self.run_dir = os.path.abspath(run_dir)
        self.rf = RunFile(os.path.join(self.run_dir, "run.h5"))
        self.main = world.is_main
        self.lock: RunLock | None = None
        self.timings: dict[str, float] = {}
        self.data: Any = None

    # ---- driver -----------------------------------------------------------------------------------
    def run(self) -> int:
        t_start = time.perf_counter()
        self.hosts = sorted(set(self.world.allgather(socket.gethostname())))  # every rank's node, for the record
        early = None
        if not self.main:  # while rank 0 prepares (and builds its data there, to check it)
            try:
                self.data = build_data(self.cfg.data)
            except Exception as e:  # raised below, unless rank 0 stops every rank with one line
                early = e
        problem = self._prepare() if self.main else None
        problem = self.world.bcast(problem)
        if problem:
            if self.main:
                print(f"hpcprune: error: {problem}", file=sys.stderr, flush=True)
            return 2
        if early is not None:
            raise early
        if self.main and self.on_accept is not None:
            self.on_accept()
        # rank 0 works alone (others sleep) in every stage but sensitivity: it may use every core,
        # and the same thread count with 1 or N ranks keeps dense training bit-identical
        threads = self.world.set_threads(int(self.cfg.threads), alone=True)
        self.device = self.world.device(str(self.cfg.device))
        torch.manual_seed(int(self.cfg.seed))
        log.info("rank %d/%d on %s, device %s, %d threads, run dir %s", self.world.rank, self.world.size,
                 socket.gethostname(), self.device, threads, self.run_dir)
        try:
            if self.data is None:
                self.data = build_data(self.cfg.data)
            self.metric_name = self.data.metric
            # the architecture first: every group verified, costs derived, budgets checked, before any training
            if self.main and not self._done("groups"):
                self._timed("groups", self.groups)
            self.world.barrier()
            if self.main and not self._done("baseline"):
                self._timed("baseline", self.baseline)
            self.world.barrier()
            self.model = self._dense_model()
            threads = self.world.set_threads(int(self.cfg.threads))
            log.info("sensitivity: %d torch threads per rank (rank %d may use %d CPUs, which %d rank(s) of its node may use)",
                     threads, self.world.rank, self.world.cores(), self.world.sharing)
            self._analysis_setup()
            self._timed("sensitivity", self.sensitivity)
            self.world.set_threads(int(self.cfg.threads), alone=True)
            if self.main:
                for name, fn in (("allocation", self.allocation), ("pruned", self.prune), ("final", self.finetune)):
                    if not self._done(name):
                        self._timed(name, fn)
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

    def _timed(self, stage: str, fn: Any) -> None:
        was_done = self.main and self._done(stage)
        t0 = time.perf_counter()
        fn()
        self.timings[stage] = time.perf_counter() - t0
        if self.main:
            log.info("stage %s: %.1f s", stage, self.timings[stage])
            if not was_done and self._done(stage):
                with self.rf.write() as f:
                    f[stage].attrs["seconds"] = self.timings[stage] + float(f[stage].attrs.get("seconds", 0.0))

    def _done(self, stage: str) -> bool:
        return stage in self.rf.done_stages()

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
            # bad data, model or checkpoint, or too little disk: one line, before the run file is touched
            self._check_inputs()
            if self.rf.exists():
                self.rf.set_status("running", "", world_size=self.world.size, hosts=json.dumps(self.hosts))
                log.info("resuming %s (done: %s)", self.rf.path, ", ".join(self.rf.done_stages()) or "nothing")
            else:
                self.rf.create(resolved, self._meta())
        except (ConfigError, RunFileError, OSError, ValueError, RuntimeError) as e:
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            return str(e)
        return None

    def _check_inputs(self) -> None:
        """Rank 0: build the data and the model, load the dense checkpoint, check the free disk space."""
        self.data = _instantiate("data", build_data, self.cfg.data)
        model = _instantiate("model", build_model, self.cfg.model)
        if self.cfg.checkpoint and not (self.rf.exists() and self._done("baseline")):
            self._load_checkpoint(model)
        # the run directory holds up to three copies of the weights (dense, pruned, fine-tuned: *.safetensors
        # beside run.h5, each written through a temporary copy); the fine-tune checkpoint adds weights + optimizer state
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        need = 10 * weights + (1 << 20)
        st = os.statvfs(self.run_dir)
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise ConfigError(f"hydra.run.dir={self.run_dir}: {free / 2**20:.1f} MiB free on its file system, the run needs "
                              f"about {need / 2**20:.1f} MiB (run file, its temporary copy, fine-tune checkpoint)")
        self._arch_model = model  # the groups stage verifies this instance (no second build of a large model)

    def _load_checkpoint(self, model: torch.nn.Module) -> None:
        path = str(self.cfg.checkpoint)
        try:
            state = load_checkpoint(path)  # the same loader reads a referenced checkpoint back (store.read_weights)
        except ValueError as e:
            raise ConfigError(f"checkpoint={path}: {e}") from None
        try:
            model.load_state_dict(state)
        except Exception as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise ConfigError(f"checkpoint={path}: does not fit the model ({first})") from None

    def _check_resume(self, resolved: str) -> None:
        stored = _flat(OmegaConf.to_container(OmegaConf.create(self.rf.attrs()["config"])))
        now = _flat(OmegaConf.to_container(OmegaConf.create(resolved)))
        # keys a later hpcprune added (absent from the stored config, outside model./data.) take their
        # defaults on resume: a run file made by an earlier version resumes without resume.force
        added = [k for k in now if k not in stored and not k.startswith(("model.", "data."))]
        if added:
            log.info("resume: keys this run file predates, at their current values: %s", ", ".join(added))
        diff = [
            f"{k}: {stored.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(stored) | set(now))
            if stored.get(k) != now.get(k) and not k.startswith(_RESUME_IGNORED) and k not in added
        ]
        if diff and not self.cfg.resume.force:
            raise ConfigError(
                f"{self.rf.path} was made with a different config ({'; '.join(diff[:5])}); "
                "use another hydra.run.dir, or resume.force=true to continue anyway"
            )

    def _meta(self) -> dict[str, Any]:
        import h5py
        import torch_pruning as tp

        hosts = getattr(self, "hosts", None) or [socket.gethostname()]
        return {
            "world_size": self.world.size,
            "hosts": json.dumps(hosts),
            "versions": json.dumps(
                {"hpcprune": __version__, "torch": torch.__version__, "torch_pruning": tp.__version__,
                 "h5py": h5py.__version__, "python": sys.version.split()[0]}
            ),
            "run_dir": self.run_dir,
        }

    # ---- baseline ---------------------------------------------------------------------------------
    def baseline(self) -> None:
        cfg = self.cfg
        model = build_model(cfg.model)
        if cfg.checkpoint:
            self._load_checkpoint(model)
            trained = False
        else:
            train_dense(model, self.data, cfg, self.device)
            trained = True
        model = model.cpu().eval()
        example = self.data.example_input
        val = metrics.make_batches(self.data.val, 256)
        sums = metrics.evaluate(model, val)
        macs = metrics.macs(model, example[:1])
        lat = metrics.latency_ms(model.to(self.device), example.to(self.device), cfg.baseline.latency_batch,
                                 repeats=cfg.baseline.latency_repeats, threads=int(cfg.baseline.latency_threads))
        model.cpu()
        rec = dict(
            metric=sums.metric(self.metric_name), loss=sums.mean_loss(), metric_name=self.metric_name,
            higher_is_better=metrics.METRIC_HIGHER_IS_BETTER[self.metric_name], params=metrics.params(model),
            macs=macs, latency_ms=lat, latency_batch=cfg.baseline.latency_batch,
            latency_device=str(self.device), trained_here=trained,
        )
        log.info("dense: %s %.4f, %d params, %d MACs, %.2f ms", self.metric_name, rec["metric"], rec["params"], rec["macs"], lat)
        with self.rf.write() as f:
            g = replace_group(f, "baseline")
            put_attrs(g, rec)
            write_weights(self.rf, "baseline", model.state_dict(), g,
                          reference=str(cfg.checkpoint) if cfg.checkpoint and not cfg.baseline.get("copy_checkpoint", False) else None)
            g.create_dataset("example_input", data=example.numpy())
            g.attrs["complete"] = True

    def _dense_model(self) -> torch.nn.Module:
        model = build_model(self.cfg.model)
        model.load_state_dict(read_weights(self.rf, "baseline"))
        with self.rf.read() as f:
            self.base = {k: v for k, v in f["baseline"].attrs.items()}
        return model.eval()

    # ---- groups (the architecture, before any training) ---------------------------------------------
    def _graph(self, model: torch.nn.Module, exclude: Any = ()) -> Graph:
        kinds = list(self.cfg.groups.kinds) if self.cfg.groups.get("kinds") else None
        self.ignore = ignore_names(model, list(self.cfg.groups.ignore or []))
        return Graph(model, self.example[:1], self.ignore, kinds, timeout_s=float(self.cfg.groups.get("timeout_s", 300)),
                     exclude=exclude)

    def groups(self) -> None:
        """Rank 0, on the architecture (the config's model, with the checkpoint when one is given): the
        dependency graph, every group verified (``verify.verify_groups``), the exact cost model, and
        every target checked for reachability, before any training or evaluation."""
        from .costs import ExactCost, probes_from_graph
        from .verify import OUTPUT, verify_groups

        cfg = self.cfg
        self.example = self.data.example_input
        model = getattr(self, "_arch_model", None) or build_model(cfg.model)
        self._arch_model = None
        model = model.eval()
        t0 = time.perf_counter()
        graph = self._graph(model)
        log.info("groups: dependency graph in %.1f s: %d groups found, %d excluded by the search", time.perf_counter() - t0,
                 len(graph.groups), len(graph.excluded))
        last = [time.perf_counter()]

        def progress(i: int, n: int, seconds: float) -> None:
            if time.perf_counter() - last[0] > 10.0:
                last[0] = time.perf_counter()
                log.info("groups: verified %d of %d groups (%.0f s)", i, n, seconds)

        verify_groups(graph, self.example, float(cfg.prune.max_ratio), int(cfg.prune.round_to), int(cfg.seed), progress)
        failed = [e for e in graph.excluded if e.reason != OUTPUT]
        for e in graph.excluded:
            if e.reason == OUTPUT:
                log.info("groups: %s not pruned (%s): it feeds the model's output", e.name, ", ".join(e.layer_types))
            else:
                log.warning("groups: %s excluded (%s): %s", e.name, ", ".join(e.layer_types), e.reason)
        if failed and cfg.groups.get("strict", False):
            e = failed[0]
            raise ConfigError(f"groups.strict=true: group {e.name} ({', '.join(e.layer_types)}) cannot be pruned: {e.reason}; "
                              f"add it to groups.ignore=[{e.name}] or set groups.strict=false to prune the others")
        if not graph.groups:
            types = sorted({t for e in failed for t in e.layer_types}) or sorted({type(m).__name__ for m in model.modules()
                                                                                   if not list(m.children())})
            why = (f"; {failed[0].name}: {failed[0].reason}" if failed
                   else "; every group found feeds the model's output (the output layer is never cut)")
            raise ConfigError(f"model {cfg.model.get('_target_')}: no prunable group (layer types: {', '.join(types[:12])}){why}; "
                              "declare attention heads and blocks with prune_structure() (hpcprune/structure.py), or choose "
                              "other groups.kinds / groups.ignore")
        exact = None
        while exact is None:
            try:
                exact = ExactCost.derive(model, self.example[:1], probes_from_graph(graph))
            except ValueError as e:  # a group whose cut changes the computation in a way no cost model follows
                bad = next((g for g in graph.groups if str(e).startswith(f"group {g.name}:")), None)
                if bad is None:
                    raise
                log.warning("groups: %s excluded (%s): %s", bad.name, ", ".join(bad.layer_types), str(e).split(": ", 1)[1])
                graph.exclude([Excluded(bad.name, list(bad.layer_types), str(e).split(": ", 1)[1])])
                if not graph.groups:
                    raise ConfigError(f"model {cfg.model.get('_target_')}: no prunable group; {e}") from None
        cost = allocate.CostModel.from_exact(graph.groups, exact)
        targets = {k: v for k, v in self._targets().items() if k != "latency"}
        if targets:
            try:
                allocate._check_reachable(cost, targets, float(cfg.prune.max_ratio), int(cfg.prune.round_to),
                                         blocks=str(cfg.prune.method) == "sensitivity")
            except allocate.BudgetError as e:
                raise ConfigError(f"{e} (found on the architecture, before any training)") from None
        gs = graph.groups
        per_unit = []
        for i, g in enumerate(gs):
            r = np.zeros(len(gs))
            r[i] = 1.0 - (g.size - 1) / g.size
            per_unit.append(cost.dense["macs"] - cost.cost("macs", r))
        with self.rf.write() as f:
            h = replace_group(f, "groups")
            h.create_dataset("name", data=np.array([g.name for g in gs], dtype=object), dtype=_str_dtype())
            h.create_dataset("kind", data=np.array([g.kind for g in gs], dtype=object), dtype=_str_dtype())
            h.create_dataset("size", data=np.array([g.size for g in gs], dtype=np.int64))
            h.create_dataset("channels", data=np.array([g.channels or g.size for g in gs], dtype=np.int64))
            h.create_dataset("maskable", data=np.array([g.maskable for g in gs]))
            h.create_dataset("macs_per_channel", data=np.array(per_unit, dtype=np.float64))
            h.create_dataset("layer_types", data=np.array([json.dumps(g.layer_types) for g in gs], dtype=object), dtype=_str_dtype())
            h.create_dataset(
                "members", data=np.array([json.dumps([[m.module, "out" if m.out else "in", m.unit] for m in g.members]) for g in gs], dtype=object), dtype=_str_dtype()
            )
            h.attrs["excluded"] = json.dumps([[e.name, e.layer_types, e.reason] for e in graph.excluded])
            h.attrs["ignored"] = json.dumps(self.ignore)
            cg = h.create_group("cost")
            for kind, (coef, exps) in exact.terms.items():
                cg.create_dataset(f"{kind}_coef", data=np.asarray(coef, dtype=np.float64))
                cg.create_dataset(f"{kind}_exps", data=np.asarray(exps, dtype=np.int8))
            cg.attrs["dense_macs"], cg.attrs["dense_params"] = float(cost.dense["macs"]), float(cost.dense["params"])
            h.attrs["complete"] = True
        log.info("%d groups: %s", len(gs), ", ".join(
            f"{g.name}({g.size})" if not g.channels or g.channels == g.size else f"{g.name}({g.size} units of {g.channels // g.size} channels)"
            for g in gs))

    def _analysis_setup(self) -> None:
        """Every rank: the graph on the dense model (the groups the groups stage kept), importance
        scores (data-driven criteria: each rank scores its share, the sums are all-reduced), the
        calibration batches and the cost model; rank 0 records the scores once."""
        self.example = self.data.example_input
        with self.rf.read() as f:
            h = f["groups"]
            v1 = "excluded" not in h.attrs  # schema 1: no verification record; its groups are the recorded ones
            excluded = [e[0] for e in json.loads(h.attrs.get("excluded", "[]"))]
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in h["name"][()]]
            cost_terms = {k[:-5]: (h["cost"][k][()], h["cost"][k[:-5] + "_exps"][()]) for k in h.get("cost", {}) if k.endswith("_coef")}
        self.graph = self._graph(self.model, exclude=excluded)
        if v1:
            self.graph.exclude([Excluded(g.name, g.layer_types, "not a group of the run file (schema 1)")
                                for g in self.graph.groups if g.name not in names])
        if [g.name for g in self.graph.groups] != names:
            raise RunFileError(f"{self.rf.path}: the model's groups ({len(self.graph.groups)}) are not the ones its groups stage "
                               f"recorded ({len(names)}): the model changed; use another hydra.run.dir")
        self.calib = metrics.make_batches(self.data.calib, int(self.cfg.sensitivity.batch_size), self.device)
        if len(self.data.calib) == 0:
            raise ConfigError("data.calib_samples: the calibration set is empty")
        share = [(x.cpu(), y.cpu()) for x, y in self.calib[self.world.rank :: self.world.size]]
        reduce = self.world.allreduce_sum if self.world.size > 1 else None
        self.scores = importance.group_scores(self.graph, str(self.cfg.importance), share, int(self.cfg.seed), reduce)
        self.orders = {n: importance.prune_order(s) for n, s in self.scores.items()}
        self.module_macs = metrics.module_macs(self.model, self.example[:1])
        if cost_terms:
            self.cost = allocate.CostModel(self.graph.groups, cost_terms)
        else:  # a run file of schema 1: derived again on the dense model
            from .costs import ExactCost, probes_from_graph

            exact = ExactCost.derive(self.model, self.example[:1], probes_from_graph(self.graph))
            self.cost = allocate.CostModel.from_exact(self.graph.groups, exact)
        if self.main:
            with self.rf.read() as f:
                recorded = "groups/importance" in f or "importance" in f
            if not recorded:  # its own group: /groups stays as the groups stage completed it
                with self.rf.write() as f:
                    imp = f.create_group("importance")
                    for g in self.graph.groups:
                        imp.create_dataset(g.name, data=self.scores[g.name].numpy())
                    imp.attrs["criterion"] = str(self.cfg.importance)

    # ---- sensitivity ------------------------------------------------------------------------------
    def sensitivity(self) -> None:
        cfg = self.cfg
        ratios = [float(r) for r in cfg.sensitivity.ratios]
        G, R = len(self.graph.groups), len(ratios)
        state = None
        if self.main:
            state = self._sensitivity_state(ratios)
        pending = self.world.bcast(state["status"] == PENDING if state is not None else None)
        if not pending.any():
            return
        higher = bool(metrics.METRIC_HIGHER_IS_BETTER[self.metric_name])
        floor = cfg.sensitivity.early_stop_floor
        stop = None
        if floor is not None:
            name = self.metric_name
            stop = (lambda s: s.metric(name) < floor) if higher else (lambda s: s.metric(name) > floor)
        evaluator = Evaluator(
            self.model.to(self.device), self.graph.groups, self.orders, ratios, self.calib, self.example[:1].to(self.device),
            self.ignore, bool(cfg.sensitivity.cache_prefix),
            recal_batches=[(x.to(self.device), y) for x, y in self._train_batches(int(cfg.sensitivity.bn_recalib_batches))],
            channels_last=bool(cfg.sensitivity.get("channels_last", False)),
            fold_bn=bool(cfg.sensitivity.get("fold_bn", False)),
            graph=self.graph, round_to=int(cfg.prune.round_to),
        )
        # damage is measured against the dense model on the same calibration batches, in the same layout
        dense_calib = metrics.evaluate(evaluator.model, evaluator.batches)
        self.dense_calib = (dense_calib.metric(self.metric_name), dense_calib.mean_loss())
        t0 = time.perf_counter()
        buffer: list[Any] = []
        last = [time.perf_counter()]

        def on_results(res: list[Any]) -> None:
            buffer.extend(res)
            if time.perf_counter() - last[0] >= float(cfg.sensitivity.flush_s):
                self._flush_cells(state, buffer)
                last[0] = time.perf_counter()

        bar = None
        if self.main:
            from tqdm import tqdm

            bar = tqdm(total=int(pending.sum()), desc="sensitivity", unit="cell", file=sys.stderr, disable=None)
        try:
            results = run_sensitivity(self.world, evaluator, pending, self.module_macs, on_results if self.main else None, stop, bar,
                                      cfg.sensitivity.get("team_size", "auto"))
        finally:
            evaluator.close()
        if bar is not None:
            bar.close()
        self.model.cpu()
        if self.main:
            self._flush_cells(state, buffer, complete=True, wall=time.perf_counter() - t0)
            log.info("sensitivity: %d cells on %d ranks in %.1f s", len(results), self.world.size, time.perf_counter() - t0)

    def _sensitivity_state(self, ratios: list[float]) -> dict[str, np.ndarray]:
        G, R = len(self.graph.groups), len(ratios)
        with self.rf.read() as f:
            if "sensitivity" in f:
                s = f["sensitivity"]
                if list(s["ratios"][()]) != ratios:
                    raise RunFileError(f"{self.rf.path}: stored ratio grid {list(s['ratios'][()])} differs from {ratios}")
                state = {k: s[k][()] for k in ("metric", "loss", "seconds", "rank", "status")}
                for k, like in (("prefix_seconds", np.zeros(G)), ("recal_prefix_seconds", np.zeros(G)),
                                ("recal_seconds", np.full((G, R), np.nan)), ("team", np.ones((G, R), dtype=np.int32))):
                    state[k] = s[k][()] if k in s else like
                return state
        return {
            "metric": np.full((G, R), np.nan), "loss": np.full((G, R), np.nan), "seconds": np.full((G, R), np.nan),
            "rank": np.full((G, R), -1, dtype=np.int32), "status": np.zeros((G, R), dtype=np.int8),
            "prefix_seconds": np.zeros(G),  # time to compute a group's cached activations (last chunk)
            "recal_prefix_seconds": np.zeros(G),  # of which for the BatchNorm re-estimation batches
            "recal_seconds": np.full((G, R), np.nan),  # of a cell's seconds: re-estimating BatchNorm statistics
            "team": np.ones((G, R), dtype=np.int32),  # ranks that evaluated the cell together (rank: the leader)
        }

    def _early_stop(self, state: dict[str, np.ndarray]) -> None:
        """With ``sensitivity.early_stop_floor``, every cell of a group above its first done cell past
        the floor is skipped, whichever rank computed what (several ranks may have evaluated chunks
        of one group at once): the record is the one rank's, with any world size."""
        floor = self.cfg.sensitivity.early_stop_floor
        if floor is None:
            return
        higher = bool(metrics.METRIC_HIGHER_IS_BETTER[self.metric_name])
        with np.errstate(invalid="ignore"):
            past = (state["metric"] < floor) if higher else (state["metric"] > floor)
        past &= state["status"] == DONE
        for g, r in zip(*np.nonzero(past)):
            if past[g, :r].any():
                continue
            later = slice(r + 1, None)
            never = state["status"][g, later] == PENDING
            state["seconds"][g, later][never] = 0.0
            state["rank"][g, later][never] = 0
            state["status"][g, later] = SKIPPED
            state["metric"][g, later] = np.nan
            state["loss"][g, later] = np.nan

    def _flush_cells(self, state: dict[str, np.ndarray], buffer: list[Any], complete: bool = False, wall: float | None = None) -> None:
        for c in buffer:
            if c.status == DONE:
                sums = metrics.EvalSums(*c.sums)
                loss = sums.mean_loss()
                # a model whose output is NaN has no metric either (argmax of NaN logits is class 0)
                state["metric"][c.group, c.ratio] = sums.metric(self.metric_name) if not math.isnan(loss) else math.nan
                state["loss"][c.group, c.ratio] = loss
            state["status"][c.group, c.ratio] = c.status
            if c.prefix_s > 0:
                state["prefix_seconds"][c.group] = c.prefix_s
                state["recal_prefix_seconds"][c.group] = c.recal_prefix_s
            state["seconds"][c.group, c.ratio] = c.seconds
            state["recal_seconds"][c.group, c.ratio] = c.recal_s
            state["team"][c.group, c.ratio] = c.team
            state["rank"][c.group, c.ratio] = c.rank
        buffer.clear()
        self._early_stop(state)
        write_sensitivity_cells(self.rf, state, {
            "metric_name": self.metric_name, "dense_metric": self.base["metric"], "dense_loss": self.base["loss"],
            "dense_calib_metric": self.dense_calib[0], "dense_calib_loss": self.dense_calib[1],
            "calib_samples": len(self.data.calib), "world_size": self.world.size,
            "status_codes": "0 pending, 1 done, 2 skipped (early stop)",
        }, ratios=[float(r) for r in self.cfg.sensitivity.ratios], complete=complete, wall=wall)

    # ---- allocation -------------------------------------------------------------------------------
    def _targets(self) -> dict[str, float]:
        t = self.cfg.prune.target
        return {k: float(t[k]) for k in t if t[k] is not None}

    def allocation(self) -> None:
        targets = self._targets()
        if "latency" in targets:
            self._latency_table()
        self._write_allocation(self._allocate(targets), targets)

    def _allocate(self, targets: dict[str, float], start: np.ndarray | None = None) -> allocate.Allocation:
        cfg = self.cfg
        method = str(cfg.prune.method)
        max_ratio, round_to = float(cfg.prune.max_ratio), int(cfg.prune.round_to)
        if method == "uniform":
            return allocate.uniform(self.cost, targets, max_ratio, round_to)
        if method == "global":
            return allocate.global_ranking(self.cost, self.scores, targets, max_ratio, round_to)
        with self.rf.read() as f:
            loss = f["sensitivity/loss"][()]
            status = f["sensitivity/status"][()]
            ref = float(f["sensitivity"].attrs["dense_calib_loss"])
        damage = np.where(status == DONE, loss - ref, np.nan)
        damage = self._check_damage(damage, status)
        return allocate.sensitivity(self.cost, list(cfg.sensitivity.ratios), damage, targets, max_ratio, round_to, start=start)

    def _check_damage(self, damage: np.ndarray, status: np.ndarray) -> np.ndarray:
        """NaN cells (the pruned model's output was NaN) are unusable: a group's curve ends before its
        first one (as after an early stop), so the allocator never picks or interpolates across it.
        With no usable cell at all there is nothing to allocate from."""
        names = [g.name for g in self.graph.groups]
        nan = (status == DONE) & np.isnan(damage)
        if nan.any() and not np.isfinite(damage).any():
            raise RuntimeError(f"prune.method=sensitivity: every sensitivity cell's calibration loss is NaN (the model outputs "
                               f"NaN once a group is pruned), nothing to allocate from; check the model or use prune.method=uniform")
        if nan.any():
            bad = [f"{names[g]}@{float(self.cfg.sensitivity.ratios[int(r)])}" for g, r in zip(*np.nonzero(nan))]
            log.warning("sensitivity: %d cell(s) with a NaN loss, not used by the allocation: %s", len(bad), ", ".join(bad[:10]))
        damage = damage.copy()
        for g in range(damage.shape[0]):
            first = np.flatnonzero(nan[g])
            if first.size:
                damage[g, first[0]:] = np.nan
        return damage

    def _write_allocation(self, alloc: allocate.Allocation, targets: dict[str, float], adjusted: list | None = None) -> None:
        cfg = self.cfg
        method, max_ratio, round_to = str(cfg.prune.method), float(cfg.prune.max_ratio), int(cfg.prune.round_to)
        log.info("allocation (%s): ratios %s, predicted kept %s", method,
                 {g.name: round(float(r), 3) for g, r in zip(self.graph.groups, alloc.ratios)},
                 {k: round(v, 4) for k, v in alloc.predicted.items()})
        with self.rf.write() as f:
            a = replace_group(f, "allocation")
            a.create_dataset("ratio", data=alloc.ratios)
            a.create_dataset("keep", data=np.array([n_keep(g, r, round_to) for g, r in zip(self.graph.groups, alloc.ratios)]))
            put_attrs(a, {"method": method, "targets": json.dumps(self._targets()), "max_ratio": max_ratio, "round_to": round_to,
                          "predicted_macs": alloc.predicted["macs"], "predicted_params": alloc.predicted["params"],
                          "predicted_latency": alloc.predicted.get("latency"),
                          "predicted_loss_increase": alloc.predicted_loss,
                          "targets_used": json.dumps(targets), "adjustments": json.dumps(adjusted or [])})
            a.attrs["complete"] = True

    def _latency_table(self) -> None:
        """Latency with one group pruned at each grid ratio, measured once (rank 0's device) and kept
        in the run file: the allocator's latency model."""
        cfg = self.cfg
        grid = [float(r) for r in cfg.sensitivity.ratios]
        with self.rf.read() as f:
            if "latency" in f and f["latency"].attrs.get("complete", False):
                self.cost.set_latency_table(grid, f["latency/table_ms"][()], float(f["latency"].attrs["dense_ms"]))
                return
        lat = self._latency
        dense = self._dense_model()
        table = np.zeros((len(self.graph.groups), len(grid)))
        refs = []
        t0 = time.perf_counter()
        for gi, g in enumerate(self.graph.groups):
            # the dense model is measured again next to every row: a row's changes are taken against
            # a reference measured under the same machine conditions
            ref = lat(dense)
            refs.append(ref)
            for ri, r in enumerate(grid):
                model = copy.deepcopy(dense)
                n = g.size - n_keep(g, r, int(cfg.prune.round_to))  # the widths the allocator can choose
                Graph(model, self.example[:1], self.ignore).prune_group(g.name, self.orders[g.name][:n])
                table[gi, ri] = lat(model) - ref
        dense_ms = float(np.median(refs))
        table += dense_ms
        log.info("latency table: %d groups x %d ratios in %.1f s (dense %.2f ms)", *table.shape, time.perf_counter() - t0, dense_ms)
        self.cost.set_latency_table(grid, table, dense_ms)
        with self.rf.write() as f:
            h = replace_group(f, "latency")
            h.create_dataset("table_ms", data=table)
            h.create_dataset("ratios", data=np.array(grid))
            put_attrs(h, {"dense_ms": dense_ms, "batch": int(cfg.baseline.latency_batch), "threads": int(cfg.baseline.latency_threads),
                          "device": str(self.device), "complete": True})

    def _relinearize_latency(self, ratios: np.ndarray, base_ms: float, attempt: int) -> None:
        """Latency table around allocation ``ratios`` (measured ``base_ms``): per group, the latency
        with that group at full width and at each grid ratio, every other group as allocated.
        Stored as ``/latency/around_<attempt>``."""
        grid = [float(r) for r in self.cfg.sensitivity.ratios]
        G = len(self.graph.groups)
        dense = self._dense_model()

        def measure(rs: np.ndarray) -> float:
            model = copy.deepcopy(dense)
            Graph(model, self.example[:1], self.ignore).apply_plan(self._plan(rs))
            return self._latency(model)

        t0 = time.perf_counter()
        table, zero = allocate.latency_table_around(measure, grid, ratios, base_ms)
        log.info("latency table around the allocation: %d groups x %d ratios in %.1f s (base %.2f ms)", G, len(grid) + 1,
                 time.perf_counter() - t0, base_ms)
        self.cost.set_latency_table(grid, table, float(self.cost.dense["latency"]), base_ms, zero)
        with self.rf.write() as f:
            h = f["latency"].require_group(f"around_{attempt}")
            for k in list(h):
                del h[k]
            h.create_dataset("table_ms", data=table)
            h.create_dataset("zero_ms", data=zero)
            h.create_dataset("ratios", data=np.asarray(ratios, dtype=np.float64))
            h.attrs["base_ms"] = float(base_ms)

    def _latency(self, model: torch.nn.Module) -> float:
        cfg = self.cfg
        return metrics.latency_ms(model.to(self.device), self.example.to(self.device), int(cfg.baseline.latency_batch),
                                  repeats=int(cfg.baseline.latency_repeats), threads=int(cfg.baseline.latency_threads))

    def _plan(self, ratios: np.ndarray) -> dict[str, list[int]]:
        round_to = int(self.cfg.prune.round_to)
        # recorded as the root layer's kept channels (a unit of a grouped conv or GroupNorm group is
        # several channels); heads and blocks by unit
        return {g.name: (sorted(self.orders[g.name][g.size - n_keep(g, float(r), round_to):]) if g.kind in ("heads", "block")
                         else g.unit_channels(self.orders[g.name][g.size - n_keep(g, float(r), round_to):]))
                for g, r in zip(self.graph.groups, ratios)}

    # ---- prune ------------------------------------------------------------------------------------
    def prune(self) -> None:
        cfg = self.cfg
        targets = self._targets()
        if "latency" in targets:
            self._latency_table()
        with self.rf.read() as f:
            ratios = f["allocation/ratio"][()]
        adjustments: list[dict[str, float]] = []
        for attempt in range(int(cfg.prune.latency_attempts)):
            model, plan, rec = self._prune_to(ratios)
            if "latency" not in targets:
                break
            measured = rec["latency_ms"] / float(self.cost.dense["latency"])
            if measured <= targets["latency"]:
                break
            # the additive latency model (measured around the dense model) missed: measure it again
            # around the allocation just pruned, so that it is exact there, and continue the
            # allocation from that point for the same target (sensitivity: only pruning more)
            self._relinearize_latency(ratios, rec["latency_ms"], attempt)
            used = allocate.tighten_for_latency(targets, rec["macs_kept"], measured)
            adjustments.append({"attempt": attempt, "measured": measured, "macs_kept": rec["macs_kept"], "targets": used,
                                "relinearized": True})
            log.info("latency kept %.3f > target %.3f: latency table measured around this allocation; re-allocating from "
                     "it with MACs capped at %.3f", measured, targets["latency"], used["macs"])
            try:
                alloc = self._allocate(used, start=ratios)
            except allocate.BudgetError as e:
                raise RuntimeError(f"prune.target.latency={targets['latency']}: still {measured:.3f} of the dense latency after "
                                   f"{attempt} re-allocation(s), and the next step (the table measured around this allocation, "
                                   f"MACs capped at {used['macs']:.3f}) is out of reach ({e})") from e
            self._write_allocation(alloc, used, adjustments)
            ratios = alloc.ratios
        else:
            raise RuntimeError(f"prune.target.latency={targets['latency']}: still {measured:.3f} of the dense latency after "
                               f"{len(adjustments)} re-allocations (prune.latency_attempts); latency on this device may be noisy")
        self._check_targets(rec)
        log.info("pruned: %s %.4f, %.3f MACs kept, %.3f params kept, %.2f ms", self.metric_name, rec["metric"],
                 rec["macs_kept"], rec["params_kept"], rec["latency_ms"])
        with self.rf.write() as f:
            p = replace_group(f, "pruned")
            put_attrs(p, rec)
            p.attrs["bn_recalib_batches"] = int(cfg.prune.bn_recalib_batches)
            p.attrs["latency_adjustments"] = json.dumps(adjustments)
            pl = p.create_group("plan")
            for name, kept in plan.items():
                pl.create_dataset(name, data=np.array(kept, dtype=np.int64))
            pl.attrs["groups"] = np.array(list(plan), dtype=object).astype(str).tolist()
            write_weights(self.rf, "pruned", model.state_dict(), p)
            p.attrs["complete"] = True

    def _check_targets(self, rec: dict[str, Any]) -> None:
        for k, t in self._targets().items():
            kept = rec[f"{k}_kept"]
            if kept > t + 1e-9:
                raise RuntimeError(f"pruned model keeps {kept:.4f} of the dense {k}, above prune.target.{k}={t}")

    def _prune_to(self, ratios: np.ndarray) -> tuple[torch.nn.Module, dict[str, list[int]], dict[str, Any]]:
        cfg = self.cfg
        plan = self._plan(ratios)
        model = self._dense_model()
        graph = Graph(model, self.example[:1], self.ignore)
        graph.apply_plan(plan)
        recal = int(cfg.prune.bn_recalib_batches)
        if recal:
            metrics.recalibrate_bn(model, self._train_batches(recal))
        return model, plan, self._measure(model)

    def _train_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` batches of a seeded shuffle of the training data (the same on every rank)."""
        if n <= 0:
            return []
        loader = torch.utils.data.DataLoader(self.data.train, batch_size=int(self.cfg.baseline.batch_size), shuffle=True,
                                             generator=torch.Generator().manual_seed(int(self.cfg.seed)))
        batches = []
        for x, y in loader:
            batches.append((x, y))
            if len(batches) >= n:
                break
        return batches

    def _measure(self, model: torch.nn.Module) -> dict[str, Any]:
        model = model.eval()
        sums = metrics.evaluate(model, metrics.make_batches(self.data.val, 256))
        m = metrics.macs(model, self.example[:1])
        p = metrics.params(model)
        lat = self._latency(model)
        model.cpu()
        return dict(metric=sums.metric(self.metric_name), loss=sums.mean_loss(), params=p, macs=m, latency_ms=lat,
                    macs_kept=m / float(self.base["macs"]), params_kept=p / float(self.base["params"]),
                    latency_speedup=float(self.base["latency_ms"]) / lat,
                    latency_kept=lat / float(self.cost.dense.get("latency", self.base["latency_ms"])))

    # ---- fine-tune --------------------------------------------------------------------------------
    def finetune(self) -> None:
        from .finetune import FinetuneJob
        from .runs import pruned_model

        cfg = self.cfg
        work = os.path.join(self.run_dir, "finetune")
        os.makedirs(work, exist_ok=True)
        ntasks = launch.num_tasks(cfg.launcher)
        history: list[list[float]] = []
        digests: list[str] = []
        job_id = ""
        if int(cfg.finetune.epochs) > 0:
            spec = {
                "config": OmegaConf.to_container(cfg, resolve=True),
                "run_file": self.rf.path,
                "work_dir": work,
                "distributed": cfg.launcher.name != "debug",
                "local_tasks": ntasks if cfg.launcher.name == "local" else int(cfg.launcher.get("tasks_per_node", 1)),
                "master_port": cfg.launcher.get("master_port"),
            }
            # a new submitit folder per submission: job ids (Slurm after a state wipe, local pids) come
            # back, and a stale result pickle under a reused id would make a new job look finished
            folder = os.path.join(work, "submitit", time.strftime("%Y%m%d-%H%M%S-") + str(os.getpid()))
            job = launch.submit(cfg.launcher, folder, FinetuneJob(spec))
            job_id = str(job.job_id)
            log.info("fine-tune job %s: %d task(s) on launcher %s, logs in %s", job_id, ntasks, cfg.launcher.name, folder)
            try:
                outs = launch.results(job)
            except Exception as e:
                raise RuntimeError(f"fine-tune job {job_id} failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} "
                                   f"(logs: {folder})") from e
            outs = sorted(outs, key=lambda o: o["rank"])
            digests = [o["digest"] for o in outs]
            history = outs[0]["history"]
            state = torch.load(outs[0]["weights"], map_location="cpu", weights_only=True)
            model = pruned_model(self.rf, cfg, weights="pruned")
            model.load_state_dict(state)
        else:
            model = pruned_model(self.rf, cfg, weights="pruned")
        rec = self._measure(model)
        log.info("fine-tuned: %s %.4f (dense %.4f)", self.metric_name, rec["metric"], float(self.base["metric"]))
        with self.rf.write() as f:
            ft = replace_group(f, "finetune")
            ds = ft.create_dataset("history", data=np.array(history, dtype=np.float64).reshape(-1, 6))
            ds.attrs["columns"] = ["epoch", "train_loss", "val_metric", "val_loss", "lr", "seconds"]
            put_attrs(ft, {"world_size": ntasks, "launcher": str(cfg.launcher.name), "job_id": job_id,
                           "rank_digests": json.dumps(digests), "epochs": int(cfg.finetune.epochs),
                           "distill_weight": float(cfg.finetune.distill.weight)})
            ft.attrs["complete"] = True
            fin = replace_group(f, "final")
            put_attrs(fin, rec)
            write_weights(self.rf, "final", model.state_dict(), fin)
            fin.attrs["complete"] = True

    # ---- summary ----------------------------------------------------------------------------------
    def _print_summary(self) -> None:
        from .report import format_table, summarize

        row = summarize(self.rf.path)
        print(format_table([row]), flush=True)
        print(f"run file: {self.rf.path}", flush=True)


def _instantiate(key: str, build: Any, node: Any) -> Any:
    """Build ``model`` or ``data`` from its config; a failure becomes one line naming the value
    (Hydra wraps the error in an InstantiationException whose message spans several lines)."""
    try:
        return build(node)
    except Exception as e:
        cause: BaseException = e
        while type(cause).__name__ == "InstantiationException" and cause.__cause__ is not None:
            cause = cause.__cause__
        lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()] or [type(cause).__name__]
        msg = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]  # "Error loading 'x':\n<why>"
        if type(cause).__name__ == "InstantiationException":
            msg = msg.split(", set env var HYDRA_FULL_ERROR")[0]
        elif not msg.startswith(f"{key}."):
            msg = f"{type(cause).__name__}: {msg}"
        if not msg.startswith(f"{key}."):
            msg = f"{key}._target_={node.get('_target_')}: {msg}"
        raise ConfigError(msg) from None


def _str_dtype() -> Any:
    import h5py

    return h5py.string_dtype()


def train_dense(model: torch.nn.Module, data: Any, cfg: DictConfig, device: str) -> None:
    """Train the dense model from scratch (rank 0 only; other ranks wait, sleeping)."""
    from tqdm import tqdm

    b = cfg.baseline
    torch.manual_seed(int(cfg.seed))
    model.to(device).train()
    loader = torch.utils.data.DataLoader(data.train, batch_size=int(b.batch_size), shuffle=True,
                                         generator=torch.Generator().manual_seed(int(cfg.seed)), drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=float(b.lr), weight_decay=float(b.weight_decay))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(b.lr), total_steps=max(1, int(b.epochs) * len(loader)))
    for _ in tqdm(range(int(b.epochs)), desc="dense training", unit="epoch", file=sys.stderr, disable=None):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = metrics.task_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
