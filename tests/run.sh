#!/usr/bin/env bash
# The test command (README, CI): sets up .venv when missing, then runs the whole suite.
# Slurm tests run when a Slurm controller answers (slurm/dev_cluster.sh start), else they are
# skipped and the summary says so.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh --no-run
exec .venv/bin/python -m pytest -q -rs "$@"
