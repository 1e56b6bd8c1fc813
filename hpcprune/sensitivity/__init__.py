"""Sensitivity analysis: the (group, ratio) cell grid, its schedule over ranks, cell evaluation.

A cell prunes one group at one ratio (least important channels first) and evaluates the model on
the fixed calibration batches. Cells are evaluated by zeroing the group's channels in place on one
model per rank and restoring them afterwards (no deep copy, no re-trace). For an ``nn.Sequential``
model the activations entering the first block a group touches are the same for every ratio of
that group: they are computed once per group and only the rest of the network runs per ratio.

Scheduling: the cells of a group form chunks (a group's ratios, split when there are many ranks);
rank 0 hands chunks out dynamically, most expensive first, and evaluates chunks itself between
serving requests. Every worker holds a second chunk in reserve so it never waits for rank 0.

With many ranks (more than the work has good chunks for: see ``team_size``) the workers form
teams. Rank 0 then only dispatches, to team leaders; a team evaluates a chunk together, each
member on its share of the calibration batches and of the BatchNorm re-estimation batches, and
adds the shares up after each cell (two small allreduces). Nothing is computed twice: a group's
prefix is computed once per team, in shares, instead of once per rank that takes one of its cells.

A cell's numbers depend only on the model, the group, the ratio and the batches, never on which
rank computed it or in which order (sums of shares agree with one rank's to rounding, ~1e-7).

The modules, by concern (each imports only those above it):

- ``records``     status codes, ``Chunk`` (work), ``CellResult`` (a result)
- ``early_stop``  the early-stop rule, for the engine and for the stage's record
- ``bn``          BatchNorm re-estimation after a cut, folding into convolutions
- ``schedule``    chunks, the dispatcher, team sizes (no MPI, no model)
- ``split``       one cell over several ranks: shards and teams
- ``cells``       ``Evaluator``: a chunk's cells on one rank, with its caches; the model as a chain
- ``protocol``    ``run_sensitivity``: rank 0, workers, team members over MPI
"""
from .bn import fold_pairs
from .cells import DAMAGES, Evaluator, flatten_chain, nhwc
from .early_stop import past_floor, skip_past_floor, skipped, stop_rule, stops
from .protocol import run_sensitivity
from .records import DONE, PENDING, SKIPPED, CellResult, Chunk
from .schedule import Dispatcher, make_chunks, team_ranks, team_size
from .split import Gather, Team, make_teams, shard_batches, team_share

__all__ = [
    "DAMAGES", "DONE", "PENDING", "SKIPPED", "CellResult", "Chunk", "Dispatcher", "Evaluator", "Gather", "Team",
    "flatten_chain", "fold_pairs", "make_chunks", "make_teams", "nhwc", "past_floor", "run_sensitivity",
    "shard_batches", "skip_past_floor", "skipped", "stop_rule", "stops", "team_ranks", "team_share", "team_size",
]
