"""What the engine's parts hand each other: cell status codes, a chunk of work, a cell's result."""
from __future__ import annotations

from dataclasses import dataclass

PENDING, DONE, SKIPPED = 0, 1, 2  # /sensitivity/status codes in the run file


@dataclass
class CellResult:
    group: int
    ratio: int
    status: int
    sums: tuple[float, float, float, float]  # EvalSums.as_tuple(): correct, loss, count, kl
    seconds: float
    rank: int
    shard: int = 0  # a cell split over ranks: this share of its calibration batches
    shards: int = 1
    prefix_s: float = 0.0  # time to compute the chunk's cached activations (first cell of a chunk)
    recal_s: float = 0.0  # of ``seconds``: re-estimating the BatchNorm statistics
    recal_prefix_s: float = 0.0  # of ``prefix_s``: the cached activations of the re-estimation batches
    team: int = 1  # ranks that evaluated the cell together (``rank`` is the team's leader)


@dataclass
class Chunk:
    group: int
    ratios: list[int]  # ratio indices, ascending
    cost: float = 0.0
    shard: int = 0  # with more ranks than cells, a cell's calibration batches are split
    shards: int = 1
