#!/usr/bin/env bash
# The prepared GPU check, one command, about 8 minutes on one NVIDIA GPU (a lease has 15):
#   bash benchmarks/device_check.sh [OUT_DIR]
# 1. a jax that sees the GPU: the machine's own, else the CUDA 12 build installed into .venv-gpu;
# 2. the accelerator-path checks on the GPU (benchmarks/device_checks.py: bf16 vs float32 step, cuDNN vs
#    XLA attention for multi-head and grouped-query heads, logits parity with the book's torch model);
# 3. Qwen3-0.6B and Llama 3.2 1B (benchmarks/gpu_families.py): the bf16 T=4096 train steps gptjax.aot sized,
#    run for real (peak memory beside the plan, step time, MFU), and Qwen3's bf16 decode at batch 1 and 8.
# gpt2-small's step against the book's torch model (eager, compile, SDPA + fused AdamW + compile) is
# bench_train.py's (benchmarks/README.md); its H200 figures are in benchmarks/results/device/train_gpu.json.
# JSON and logs go to OUT_DIR (default: $OUT if set, else benchmarks/results/device).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/device}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
if ! "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "no GPU jax in $py: installing gptjax[cuda12,torch] into .venv-gpu"
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -c constraints.txt -e ".[cuda12,torch]" pytest transformers \
    || { echo "could not install the CUDA build"; exit 1; }
  py=.venv-gpu/bin/python
fi
"$py" - <<'PY' | tee "$out/machine.txt"
import jax, sys
print("python", sys.version.split()[0], "jax", jax.__version__, "devices", jax.devices())
try:
    import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except ImportError:
    print("torch: not installed")
PY
status=0
timeout 120 "$py" -m pytest -q -s -p no:cacheprovider benchmarks/device_checks.py 2>&1 | tee "$out/device_checks.log" || status=1
timeout 330 "$py" benchmarks/gpu_families.py --steps 2 --new-tokens 64 --out "$out/gpu_families.json" 2>&1 \
  | tee "$out/gpu_families.log" || status=1
exit $status
