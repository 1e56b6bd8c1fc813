"""The sensitivity stage (every rank): the metric of every (group, ratio) cell, cells handed out by
rank 0 (``hpcprune.sensitivity``), rank 0 flushing them to the run file as they arrive.

Every rank runs it, done or not: a partly done grid (a killed run) computes only its pending cells.
A grid not begun is first looked for under its content key (``hpcprune.reuse``: the cache
directory, the other runs of a multirun) and copied when found (``/sensitivity@source``).
Writes ``/sensitivity``: metric, loss, seconds, rank, status per cell (and kl with
``sensitivity.damage=kl``: the mean KL divergence from the dense model's predictions; flushed every
``sensitivity.flush_s`` seconds; ``complete`` with the last flush).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import numpy as np
import torch

from .. import metrics, reuse
from ..sensitivity import DONE, PENDING, Evaluator, bn, run_sensitivity, skip_past_floor, stop_rule
from ..store import RunFile, RunFileError, put_sensitivity_cells, write_sensitivity_cells
from ..errors import HpcpruneError
from ..launch import _SigTerm, _sigterm_raises
from .context import Context, Record, train_batches

log = logging.getLogger("hpcprune.stages")


class Stopped(HpcpruneError):
    """The sweep was told to stop (SIGTERM) and kept what it had done."""


STATUS_CODES = "0 pending, 1 done, 2 skipped (early stop)"


def run(ctx: Context, cfg: Any, rf: RunFile) -> Record | None:
    ratios = [float(r) for r in cfg.sensitivity.ratios]
    state = _load_state(rf, len(ctx.graph.groups), ratios, str(cfg.sensitivity.damage)) if ctx.main else None
    key, source, claim = None, None, None
    if ctx.main:
        # the dense weights' digest the baseline stage recorded (a run file from before it: computed here)
        digest = str(ctx.base.get("dense_digest", "") or "") or reuse.weights_digest(ctx.model.state_dict())
        key = reuse.sensitivity_key(cfg, digest, [g.name for g in ctx.graph.groups])
        if (state["status"] == PENDING).all():  # nothing computed yet: a finished grid under the key, or compute it
            source, claim = _source(ctx, cfg, key)
    pending = None
    if ctx.main:  # a reused grid leaves nothing to compute
        pending = np.zeros(state["status"].shape, dtype=bool) if source is not None else state["status"] == PENDING
    pending = ctx.world.bcast(pending)
    if source is not None:
        log.info("sensitivity: the grid under key %s is reused from %s", key[:12], source)
        return lambda f: reuse.copy_sensitivity(source, f, key)
    if not pending.any():
        return None
    try:
        return _compute(ctx, cfg, rf, state, ratios, pending, key, claim)
    except BaseException:
        if claim is not None:
            claim.release()
        raise


def _source(ctx: Context, cfg: Any, key: str) -> tuple[str | None, Any]:
    """(a finished grid's file, None) or (None, the held claim to compute it here)."""
    source = reuse.find_sensitivity(cfg, ctx.run_dir, key)
    if source is not None:
        return source, None
    claim = reuse.Claim(cfg, ctx.run_dir, "sensitivity", key).acquire()
    source = reuse.find_sensitivity(cfg, ctx.run_dir, key)  # another run may have finished it while this one waited
    if source is not None:
        claim.release()
        return source, None
    return None, claim


def _compute(ctx: Context, cfg: Any, rf: RunFile, state: Any, ratios: list[float], pending: np.ndarray,
             key: str | None, claim: Any) -> Record | None:
    """Evaluate the pending cells on every rank; rank 0 returns the stage's record."""
    floor = cfg.sensitivity.early_stop_floor
    stop = stop_rule(ctx.metric, floor, bool(metrics.METRIC_HIGHER_IS_BETTER[ctx.metric]))
    evaluator = _evaluator(ctx, cfg, ratios)
    # damage is measured against the dense model on the same calibration batches, in the same layout
    dense_calib = evaluator.dense_sums()
    if ctx.main and evaluator.damage == "kl":
        _check_stale_bn(evaluator, int(cfg.sensitivity.bn_recalib_batches))
    t0 = time.perf_counter()
    cells = None
    if ctx.main:
        cells = _Cells(rf, state, ratios, ctx.metric, floor, float(cfg.sensitivity.flush_s), {
            "metric_name": ctx.metric, "dense_metric": ctx.base["metric"], "dense_loss": ctx.base["loss"],
            "dense_calib_metric": dense_calib.metric(ctx.metric), "dense_calib_loss": dense_calib.mean_loss(),
            "calib_samples": len(ctx.data.calib), "world_size": ctx.world.size, "status_codes": STATUS_CODES,
            "damage": evaluator.damage, "kl_topk": int(cfg.sensitivity.kl_topk) if evaluator.damage == "kl" else 0,
            "key": key, "source": "",
        })
    bar = None
    if ctx.main:
        from tqdm import tqdm

        bar = tqdm(total=int(pending.sum()), desc="sensitivity", unit="cell", file=sys.stderr, disable=None)
    try:
        with _sigterm_raises():  # rank 0's main thread: Slurm's time limit, scancel, a workflow manager
            results = run_sensitivity(ctx.world, evaluator, pending, ctx.module_macs, cells.add if cells else None, stop,
                                      bar, cfg.sensitivity.team_size)
    except _SigTerm:
        done = cells.flush() if cells is not None else 0
        raise Stopped(f"stopped: SIGTERM during the sensitivity grid; {done} of its {int(state['status'].size)} cells are "
                      "in the run file, a rerun in this run directory evaluates the others") from None
    except BaseException:
        if cells is not None:  # the cells done so far are kept whatever stops the grid: a rerun does the others
            cells.flush()
        raise
    finally:
        evaluator.close()
    if bar is not None:
        bar.close()
    ctx.model.cpu()
    if cells is None:
        return None
    wall = time.perf_counter() - t0
    log.info("sensitivity: %d cells on %d ranks in %.1f s", len(results), ctx.world.size, wall)
    ctx.after_commit.append(lambda: reuse.publish_sensitivity(cfg, rf.path, key))
    if claim is not None:
        ctx.after_commit.append(claim.release)
    return cells.record(wall)


# KL (nats per sample or token) of the dense model with its BatchNorm statistics re-estimated from
# its stored ones, above which damage=kl warns
STALE_BN_KL = 1e-3


def _check_stale_bn(evaluator: Evaluator, recal_batches: int) -> float:
    """With ``damage=kl`` and BatchNorm re-estimation in the cells, the KL reference is the dense
    model's stored statistics while every cell re-estimates them: measure the KL of the dense model
    with all of them re-estimated (restored after) and warn, with it, above ``STALE_BN_KL`` (an
    undertrained baseline: every cell, even one cutting nothing, would carry it as damage). Returns
    the KL (0 without BatchNorms to re-estimate)."""
    bns = bn.running_bns([evaluator.model])
    if not (evaluator.recal_batches and bns):
        return 0.0

    def forward() -> None:
        for x, _ in evaluator.recal_batches:
            evaluator.model(x)

    with torch.inference_mode():
        saved = bn.reestimate(bns, forward)
        try:
            kl = evaluator.dense_sums().mean_kl()
        finally:
            bn.restore(saved)
    if kl > STALE_BN_KL:
        log.warning("sensitivity: damage=kl: the dense model with its BatchNorm statistics re-estimated on %d training "
                    "batches, as every cell re-estimates them after its cut, is already %.3g nats from the dense model "
                    "the KL is measured against (stale statistics: an undertrained baseline); every cell carries that as "
                    "damage, one that cuts nothing too. Train the baseline further, or set sensitivity.bn_recalib_batches=0, "
                    "or use sensitivity.damage=loss", recal_batches, kl)
    return kl


def _evaluator(ctx: Context, cfg: Any, ratios: list[float]) -> Evaluator:
    s = cfg.sensitivity
    return Evaluator(
        ctx.model.to(ctx.device), ctx.graph.groups, ctx.orders, ratios, ctx.calib, ctx.example[:1].to(ctx.device),
        ctx.ignore, bool(s.cache_prefix),
        recal_batches=[(x.to(ctx.device), y) for x, y in train_batches(ctx, cfg, int(s.bn_recalib_batches))],
        channels_last=bool(s.get("channels_last", False)),
        fold_bn=bool(s.get("fold_bn", False)),
        graph=ctx.graph, round_to=int(cfg.prune.round_to), compensation=ctx.compensation,
        damage=str(s.damage), kl_topk=int(s.kl_topk),
    )


def _load_state(rf: RunFile, G: int, ratios: list[float], damage: str = "loss") -> dict[str, np.ndarray]:
    """The cell arrays: as a partly done run left them, or all pending (``kl``: with
    ``sensitivity.damage=kl`` only)."""
    R = len(ratios)
    with rf.read() as f:
        if "sensitivity" in f:
            s = f["sensitivity"]
            if list(s["ratios"][()]) != ratios:
                raise RunFileError(f"{rf.path}: stored ratio grid {list(s['ratios'][()])} differs from {ratios}")
            state = {k: s[k][()] for k in ("metric", "loss", "seconds", "rank", "status")}
            for k, like in (("prefix_seconds", np.zeros(G)), ("recal_prefix_seconds", np.zeros(G)),
                            ("recal_seconds", np.full((G, R), np.nan)), ("team", np.ones((G, R), dtype=np.int32))):
                state[k] = s[k][()] if k in s else like
            if damage == "kl":
                state["kl"] = s["kl"][()] if "kl" in s else np.full((G, R), np.nan)
            return state
    return {
        "metric": np.full((G, R), np.nan), "loss": np.full((G, R), np.nan), "seconds": np.full((G, R), np.nan),
        "rank": np.full((G, R), -1, dtype=np.int32), "status": np.zeros((G, R), dtype=np.int8),
        "prefix_seconds": np.zeros(G),  # time to compute a group's cached activations (last chunk)
        "recal_prefix_seconds": np.zeros(G),  # of which for the BatchNorm re-estimation batches
        "recal_seconds": np.full((G, R), np.nan),  # of a cell's seconds: re-estimating BatchNorm statistics
        "team": np.ones((G, R), dtype=np.int32),  # ranks that evaluated the cell together (rank: the leader)
        **({"kl": np.full((G, R), np.nan)} if damage == "kl" else {}),  # mean KL from the dense model (nats per sample or token)
    }


class _Cells:
    """Rank 0's copy of the grid: cells arrive from every rank (:meth:`add`), are written every
    ``flush_s`` seconds, and the last of them with the stage's record (:meth:`record`)."""

    def __init__(self, rf: RunFile, state: dict[str, np.ndarray], ratios: list[float], metric: str, floor: Any,
                 flush_s: float, attrs: dict[str, Any]) -> None:
        self.rf, self.state, self.ratios, self.metric, self.floor = rf, state, ratios, metric, floor
        self.flush_s, self.attrs = flush_s, attrs
        self.buffer: list[Any] = []
        self.last = time.perf_counter()

    def add(self, results: list[Any]) -> None:
        self.buffer.extend(results)
        if time.perf_counter() - self.last >= self.flush_s:
            self._apply()
            write_sensitivity_cells(self.rf, self.state, self.attrs, ratios=self.ratios)
            self.last = time.perf_counter()

    def flush(self) -> int:
        """Write every cell received so far (the grid stops: they are kept for a rerun); the
        number of cells done. A failure to write is logged, not raised (the stop's own error is
        what the user sees)."""
        try:
            self._apply()
            write_sensitivity_cells(self.rf, self.state, self.attrs, ratios=self.ratios)
        except Exception:  # noqa: BLE001
            log.warning("sensitivity: the cells done so far could not be written", exc_info=True)
        return int((self.state["status"] != PENDING).sum())

    def record(self, wall: float) -> Record:
        self._apply()
        return lambda f: put_sensitivity_cells(f, self.state, self.attrs, ratios=self.ratios, complete=True, wall=wall)

    def _apply(self) -> None:
        state = self.state
        for c in self.buffer:
            if c.status == DONE:
                sums = metrics.EvalSums(*c.sums)
                loss = sums.mean_loss()
                # a model whose output is NaN has no metric either (argmax of NaN logits is class 0)
                state["metric"][c.group, c.ratio] = sums.metric(self.metric) if not math.isnan(loss) else math.nan
                state["loss"][c.group, c.ratio] = loss
                if "kl" in state:
                    state["kl"][c.group, c.ratio] = sums.mean_kl() if not math.isnan(loss) else math.nan
            state["status"][c.group, c.ratio] = c.status
            if c.prefix_s > 0:
                state["prefix_seconds"][c.group] = c.prefix_s
                state["recal_prefix_seconds"][c.group] = c.recal_prefix_s
            state["seconds"][c.group, c.ratio] = c.seconds
            state["recal_seconds"][c.group, c.ratio] = c.recal_s
            state["team"][c.group, c.ratio] = c.team
            state["rank"][c.group, c.ratio] = c.rank
        self.buffer.clear()
        # several ranks may have evaluated chunks of one group at once: the rule once more on the whole record
        skip_past_floor(state, self.floor, bool(metrics.METRIC_HIGHER_IS_BETTER[self.metric]))

