#!/usr/bin/env bash
# GPU checks, run on a machine with an NVIDIA GPU and a CUDA torch (one prepared script):
#  1. the whole sweep on CUDA, fine-tune through submitit with NCCL;
#  2. the sweep under mpiexec -n 2 with both ranks on the GPU;
#  3. sensitivity cells/s, CUDA vs CPU, on the Fashion-MNIST-sized ResNet (synthetic inputs);
#  4. the tiny GPT (heads, blocks, MLP neurons, residual width) swept on CUDA, NCCL fine-tune;
#  5. benchmarks/allocation_bench.py on CUDA (Fashion-MNIST files in $FMNIST);
#  6. energy per sample from NVML's counter (nvidia-ml-py: pip install hpcprune[gpu], or a wheel in .whl/):
#     the default sweep on CUDA, dense vs pruned J/sample, then an energy budget (prune.target.energy=0.7)
#     met on the measured energy; written to OUTDIR/energy_nvml.log and benchmarks/results/energy_nvml.log.
# Usage: bash benchmarks/gpu_check.sh OUTDIR [SECTION ...]   (sections 1-6, default 1 2 3 6; wheels
# for missing packages may sit in .whl/)
set -uo pipefail
OUT=${1:-/tmp/gpu_check}
shift || true
SECTIONS=${*:-1 2 3 6}
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
if has 5; then
  echo "== 5. allocation benchmark on CUDA"
  time python3 benchmarks/allocation_bench.py --device cuda --root "${FMNIST:-/usr/share/datasets/fashion-mnist}" 2>&1 | tee "$OUT/allocation_bench.log" | tail -40
fi
if has 4; then
  echo "== 4. tiny GPT on CUDA: heads, blocks, neurons; NCCL fine-tune"
  time python3 -m hpcprune.sweep hydra.run.dir=/tmp/g4 model=tiny_gpt data=text device=cuda launcher.tasks=1 baseline.epochs=8 \
    prune.target.macs=0.5 importance=activation 2>&1 | tail -12
  python3 - <<'PY'
import h5py, numpy as np
f = h5py.File("/tmp/g4/run.h5")
s = f["sensitivity"]
names = [n.decode() if isinstance(n, bytes) else n for n in f["groups/name"][()]]
print("status", f.attrs["status"], "| cells", int((s["status"][()] == 1).sum()), "| sens wall_s", round(float(s.attrs["wall_s"]), 3),
      "| cells/s", round(float((s["status"][()] == 1).sum() / s.attrs["wall_s"]), 1))
print("kept per group:", dict(zip(names, f["allocation/keep"][()].tolist())))
print("final", {k: round(float(f["final"].attrs[k]), 4) for k in ("metric", "macs_kept", "params_kept")}, "dense", round(float(f["baseline"].attrs["metric"]), 4))
PY
fi
if has 6; then
  echo "== 6. energy per sample (NVML): dense vs pruned, then an energy budget"
  python3 -c "import pynvml" || echo "nvidia-ml-py missing: pip install hpcprune[gpu] (or put its wheel in .whl/)"
  time python3 -m hpcprune.sweep hydra.run.dir=/tmp/g6 device=cuda launcher=debug finetune.epochs=0 2>&1 | tail -4
  # a large batch keeps the GPU busy: at batch 64 this tiny model is launch-bound and no pruning saves energy
  time python3 -m hpcprune.sweep hydra.run.dir=/tmp/g6e device=cuda launcher=debug finetune.epochs=0 \
    baseline.latency_batch=8192 prune.target.macs=null prune.target.energy=0.7 2>&1 | tail -4
  python3 - <<'PY' 2>&1 | tee "$OUT/energy_nvml.log" | tee benchmarks/results/energy_nvml.log
import h5py, json
for run in ("/tmp/g6", "/tmp/g6e"):
    try:
        f = h5py.File(f"{run}/run.h5")
    except OSError as e:
        print(json.dumps({"run": run, "error": str(e)}))
        continue
    out = {"run": run, "status": f.attrs["status"], "targets": f["allocation"].attrs.get("targets") if "allocation" in f else None}
    for g in ("baseline", "pruned"):
        if g in f:
            a = f[g].attrs
            out[g] = {"j_per_sample": float(a.get("energy_j_per_sample", float("nan"))), "source": str(a.get("energy_source")),
                      "latency_ms": float(a["latency_ms"]), "batch": int(f["baseline"].attrs["latency_batch"])}
    if "pruned" in f:
        out["energy_kept"] = float(f["pruned"].attrs.get("energy_kept", float("nan")))
        out["macs_kept"] = float(f["pruned"].attrs["macs_kept"])
        out["adjustments"] = json.loads(f["pruned"].attrs.get("latency_adjustments", "[]"))
    print(json.dumps(out))
PY
fi
has 1 || exit 0
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
has 2 || exit 0
echo "== 2. mpiexec -n 2 on CUDA"
time mpiexec -n 2 python3 -m hpcprune.sweep hydra.run.dir=/tmp/g2 device=cuda launcher.tasks=1 finetune.epochs=1 2>&1 | tail -6
python3 -c "
import h5py, numpy as np
a, b = h5py.File('/tmp/g1/run.h5'), h5py.File('/tmp/g2/run.h5')
print('2-rank vs 1-rank sensitivity max diff', float(np.nanmax(abs(a['sensitivity/loss'][()] - b['sensitivity/loss'][()]))))
"
has 3 || exit 0
echo "== 3. cells/s CUDA vs CPU (synthetic 28x28, 2000 images)"
python3 benchmarks/sensitivity_bench.py --synthetic --device cuda --no-naive --no-mpi 2>&1 | tail -2 | tee "$OUT/cells_cuda.json"
python3 benchmarks/sensitivity_bench.py --synthetic --device cpu --threads 16 --no-naive --no-mpi 2>&1 | tail -2 | tee "$OUT/cells_cpu16.json"
