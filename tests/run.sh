#!/usr/bin/env bash
# The test command (README, CI): sets up .venv when missing, then runs the whole suite; arguments go
# to pytest (the fast loop: bash tests/run.sh -m "not slow").
# Slurm tests run when a Slurm controller answers (slurm/dev_cluster.sh start), else they are
# skipped and the summary says so.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh --no-run
dev_conf=${HPCPRUNE_SLURM_STATE:-/var/tmp/hpcprune-slurm}/etc/slurm.conf
if [ -z "${SLURM_CONF:-}" ] && [ ! -e /etc/slurm/slurm.conf ] && [ -e "$dev_conf" ]; then
  export SLURM_CONF=$dev_conf
fi
if command -v scontrol >/dev/null && timeout 30 scontrol ping 2>/dev/null | grep -q "is UP"; then
  echo "tests/run.sh: Slurm answers: the Slurm tests (marker slurm) run on it"
else
  echo "tests/run.sh: Slurm not running: the Slurm tests will be SKIPPED (start it with: slurm/dev_cluster.sh start)"
fi
# 2 pytest-xdist workers (HPCPRUNE_TEST_WORKERS=N for another count, 0 for one process): many tests
# wait on subprocesses, MPI ranks, Slurm or sleeps, or run one thread. --dist loadfile: a file's tests
# run on one worker, in order (its module fixtures are made once; the Slurm tests use the one cluster
# one at a time); conftest.py starts the longest files first
workers=${HPCPRUNE_TEST_WORKERS:-2}
xdist=()
if [ "$workers" -gt 0 ]; then
  xdist=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi
exec .venv/bin/python -m pytest -q -rs "${xdist[@]}" "$@"
