"""Threads per rank with ``threads=0``."""
from hpcprune.world import sharing


def test_threads_share_only_the_cpus_a_rank_shares():
    """A rank bound to CPUs of its own uses them all; unbound ranks divide the node's CPUs."""
    assert sharing([0, 1], [[0, 1], [0, 1]]) == 2  # two unbound ranks on 2 CPUs: 1 thread each
    assert sharing([0, 1, 2, 3], [[0, 1, 2, 3], [4, 5, 6, 7]]) == 1  # srun --cpu-bind: 4 threads each
    assert sharing([0, 1], [[0, 1], [1, 2], [5]]) == 2
    assert sharing([0], []) == 1


def test_finetune_threads_follow_the_config(monkeypatch):
    """The fine-tune job's torch threads: the config's ``threads`` when > 0 (it was ignored: a
    ``threads=1`` run fine-tuned on every core), else the CPUs / local tasks, capped by OMP_NUM_THREADS."""
    import os

    from hpcprune.finetune import _threads

    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert _threads({"config": {"threads": 1}, "local_tasks": 1}, 1) == 1
    assert _threads({"config": {"threads": 3}, "local_tasks": 2}, 2) == 3
    assert _threads({"config": {"threads": 0}, "local_tasks": 1}, 1) == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _threads({"config": {"threads": 0}, "local_tasks": 1}, 1) == 1


def test_a_task_error_is_named_by_its_exception_line():
    """A task's traceback whose exception message runs over several lines (DDP's unused-parameter
    error ends with advice): the one line is the exception's, not the last line of advice."""
    from hpcprune.launch import _exception_line

    tb = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n    raise RuntimeError(msg)\n"
          "RuntimeError: Expected to have finished reduction in the prior iteration.\n"
          "Parameter indices which did not receive grad for rank 1: 3 4\n"
          " In addition, you can set the environment variable TORCH_DISTRIBUTED_DEBUG to either INFO or DETAIL\n")
    assert _exception_line(tb).startswith("RuntimeError: Expected to have finished reduction")
    assert _exception_line("torch.OutOfMemoryError: CUDA out of memory") == "torch.OutOfMemoryError: CUDA out of memory"
    assert _exception_line("just a line\nand another") == "and another" and _exception_line("") is None
