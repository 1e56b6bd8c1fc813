"""Threads per rank with ``threads=0``."""
from hpcprune.world import sharing


def test_threads_share_only_the_cpus_a_rank_shares():
    """A rank bound to CPUs of its own uses them all; unbound ranks divide the node's CPUs."""
    assert sharing([0, 1], [[0, 1], [0, 1]]) == 2  # two unbound ranks on 2 CPUs: 1 thread each
    assert sharing([0, 1, 2, 3], [[0, 1, 2, 3], [4, 5, 6, 7]]) == 1  # srun --cpu-bind: 4 threads each
    assert sharing([0, 1], [[0, 1], [1, 2], [5]]) == 2
    assert sharing([0], []) == 1
