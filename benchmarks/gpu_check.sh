#!/usr/bin/env bash
# GPU checks, run on a machine with an NVIDIA GPU and a CUDA torch (one prepared script):
#  1. the whole sweep on CUDA, fine-tune through submitit with NCCL;
#  2. the sweep under mpiexec -n 2 with both ranks on the GPU;
#  3. sensitivity cells/s, CUDA vs CPU, on the Fashion-MNIST-sized ResNet (synthetic inputs).
# Usage: bash benchmarks/gpu_check.sh OUTDIR   (wheels for missing packages may sit in .whl/)
set -uo pipefail
OUT=${1:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
echo "== 1. sweep on CUDA, NCCL fine-tune"
time python3 -m hpcprune.sweep hydra.run.dir=/tmp/g1 device=cuda launcher.tasks=1 2>&1 | tail -25
python3 - <<'PY'
import h5py, json
f = h5py.File("/tmp/g1/run.h5")
print("status", f.attrs["status"], "| sens wall_s", f["sensitivity"].attrs["wall_s"],
      "| latency device", f["baseline"].attrs["latency_device"],
      "| final", dict((k, float(f["final"].attrs[k])) for k in ("metric", "macs_kept", "latency_speedup")))
PY
grep -h "backend\|nccl\|NCCL" /tmp/g1/finetune/submitit/*_0_log.* 2>/dev/null | head -5
echo "== 2. mpiexec -n 2 on CUDA"
time mpiexec -n 2 python3 -m hpcprune.sweep hydra.run.dir=/tmp/g2 device=cuda launcher.tasks=1 finetune.epochs=1 2>&1 | tail -6
python3 -c "
import h5py, numpy as np
a, b = h5py.File('/tmp/g1/run.h5'), h5py.File('/tmp/g2/run.h5')
print('2-rank vs 1-rank sensitivity max diff', float(np.nanmax(abs(a['sensitivity/loss'][()] - b['sensitivity/loss'][()]))))
"
echo "== 3. cells/s CUDA vs CPU (synthetic 28x28, 2000 images)"
python3 benchmarks/sensitivity_bench.py --synthetic --device cuda --no-naive --no-mpi 2>&1 | tail -2 | tee "$OUT/cells_cuda.json"
python3 benchmarks/sensitivity_bench.py --synthetic --device cpu --threads 16 --no-naive --no-mpi 2>&1 | tail -2 | tee "$OUT/cells_cpu16.json"
